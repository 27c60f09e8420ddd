#!/usr/bin/env python3
"""Decode throughput with the KV cache in borrowed memory, against transformers' own
caches, in one run on one GPU.

Model: Llama-3-8B-shaped (hidden 4096, 32 heads, 8 KV heads of 128, intermediate 14336,
vocab 128256) with --layers layers, random bfloat16 weights made on the GPU. Per context
and batch: one prefill (plain DynamicCache, one sequence at a time, last logits only),
then decoding from those same K/V with each cache:

  plain         DynamicCache, every token resident: the ceiling
  offloaded     DynamicCache(offloading=True), what generate(cache_implementation=
                "offloaded") runs: each layer to pinned host memory after use, back
                ahead of its next use (up and down every step)
  harvest-host  HarvestCache on host leases (pinned host memory lent through Harvest)
  harvest-gpu   HarvestCache on CUDA VMM leases; on a single-GPU machine lent by that same
                GPU, so the blocks stay in its own memory (the stand-in for a peer GPU)

Timed: --decode steps after --warmup steps, CUDA-synchronized wall clock. Every mode's
tokens are checked against plain's. Reload: every layer's blocks fetched at once from
the leases (the path decoding uses), against a pinned host-to-device copy of 1 GiB.

    python scripts/bench_kv.py --lender-gpu 0 --out bench/results/kv.json  # + kv.png
    python scripts/bench_kv.py --smoke       # tiny sizes, on the CPU, host-backend node
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchkit.node import REPO, bench_node, pyplot, steady_attention

from harvestd.sizes import GiB

MODES = ("plain", "offloaded", "harvest-host", "harvest-gpu")


def build_model(args: argparse.Namespace, device: Any) -> Any:
    """The Llama-3-8B-shaped model (or a tiny one with --smoke), random weights."""
    import torch
    import transformers

    smoke = args.smoke
    cfg = transformers.LlamaConfig(
        num_hidden_layers=args.layers,
        max_position_embeddings=max(args.contexts) + 1024,
        vocab_size=512 if smoke else 128256,
        hidden_size=128 if smoke else 4096,
        intermediate_size=256 if smoke else 14336,
        num_attention_heads=4 if smoke else 32,
        num_key_value_heads=2 if smoke else 8,
        head_dim=32 if smoke else 128,
    )
    torch.manual_seed(0)
    with torch.device(device):  # made where it runs: random init on the GPU is quick
        model = transformers.LlamaForCausalLM(cfg).eval()
    return model if args.smoke else model.to(torch.bfloat16)


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model: Any, ids: Any) -> tuple[list[tuple[Any, Any]], Any]:
    """Every layer's K/V for ``ids`` (one sequence at a time: bounded activations) and
    each sequence's first generated token."""
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import CacheLayerMixin

    layers: list[list[tuple[Any, Any]]] = []
    first = []
    with torch.no_grad():
        for row in range(ids.shape[0]):
            cache = DynamicCache()
            out = model(ids[row : row + 1], past_key_values=cache, use_cache=True, logits_to_keep=1)
            first.append(out.logits[:, -1:].argmax(-1))
            for i, layer in enumerate(cache.layers):
                if not isinstance(layer, CacheLayerMixin):  # a linear-attention layer: no K/V
                    raise TypeError(f"layer {i} keeps no K/V ({type(layer).__name__})")
                if len(layers) <= i:
                    layers.append([])
                layers[i].append((layer.keys, layer.values))
            del cache, out
    kv = [(torch.cat([k for k, _ in pairs]), torch.cat([v for _, v in pairs])) for pairs in layers]
    return kv, torch.cat(first)


def make_cache(mode: str, model: Any, client: Any, args: argparse.Namespace, kv_bytes: int) -> Any:
    """An empty cache of ``mode``."""
    from transformers import DynamicCache

    from client.kv import HarvestCache

    if mode == "plain":
        return DynamicCache()
    if mode == "offloaded":
        return DynamicCache(config=model.config, offloading=True)
    slab = args.slab_bytes
    return HarvestCache(
        client,
        block_tokens=args.block_tokens,
        config=model.config,
        backends=("host",) if mode == "harvest-host" else ("cuda-vmm",),
        slab_bytes=slab,
        borrow_bytes=kv_bytes + 2 * slab + GiB,
        refill_every=None,
    )


def decode(
    model: Any, cache: Any, first: Any, args: argparse.Namespace, device: Any
) -> tuple[Any, float, dict[str, Any]]:
    """Greedy steps from ``first``: the tokens, the seconds of the timed steps, and what
    a HarvestCache fetched during them."""
    import torch

    token, tokens = first, []
    fetched0 = wait0 = 0.0
    with torch.no_grad():
        for step in range(args.warmup + args.decode):
            if step == args.warmup:
                sync(device)
                if hasattr(cache, "stats"):
                    fetched0, wait0 = cache.stats.bytes_fetched, cache.stats.fetch_wait_s
                began = time.perf_counter()
            logits = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            token = logits[:, -1:].argmax(-1)
            tokens.append(token)
        sync(device)
    elapsed = time.perf_counter() - began
    extra: dict[str, Any] = {}
    if hasattr(cache, "stats"):
        stats = cache.stats
        extra = {
            "fetched_GBps": (stats.bytes_fetched - fetched0) / elapsed / 1e9,
            "fetch_wait_s_per_step": (stats.fetch_wait_s - wait0) / args.decode,
            "tier_bytes": stats.tier_bytes,
            "leased_bytes": stats.leased_bytes,
            "device_bytes": stats.device_bytes,
            "revocations": stats.revocations,
            "redone_rows": stats.redone_rows,
        }
    return torch.cat(tokens, 1).cpu(), elapsed, extra


def reload(cache: Any, kv: list[tuple[Any, Any]], device: Any, reps: int = 3) -> dict[str, Any]:
    """Every layer's blocks at once, on the decode path's fetch: bytes per second; and a
    check that the bytes are the K/V that went in."""
    import torch

    layers = [layer for layer in cache.layers if layer.blocks]
    bufs = [
        torch.empty((layer.blocks, layer.row_bytes), dtype=torch.uint8, device=device)
        for layer in layers
    ]
    times = []
    for _ in range(reps):
        sync(device)
        began = time.perf_counter()
        fetches = [
            cache.cache.fetch(cache.block_keys(layer.index), buf)
            for layer, buf in zip(layers, bufs, strict=True)
        ]
        for fetch in fetches:
            fetch.wait()
        sync(device)
        times.append(time.perf_counter() - began)
    size = cache.block_tokens
    k, v = kv[0]
    first = bufs[0][0].view(k.dtype).view(2, *k.shape[:2], size, k.shape[3])
    nbytes = sum(buf.numel() for buf in bufs)
    seconds = statistics.median(times)
    return {
        "bytes": nbytes,
        "s": seconds,
        "GBps": nbytes / seconds / 1e9,
        "verified": bool(
            torch.equal(first[0], k[:, :, :size]) and torch.equal(first[1], v[:, :, :size])
        ),
        "tier_bytes": cache.stats.tier_bytes,
    }


def pinned_h2d(device: Any) -> dict[str, float] | None:
    """A pinned host-to-device copy of 1 GiB: median GB/s over CUDA events."""
    import torch

    if device.type != "cuda":
        return None
    src = torch.empty(GiB, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(GiB, dtype=torch.uint8, device=device)
    times = []
    for i in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    seconds = statistics.median(times)
    return {"bytes": GiB, "s": seconds, "GBps": GiB / seconds / 1e9}


def free_memory(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args: argparse.Namespace, client: Any, device: Any) -> dict[str, Any]:
    """Every context, batch and mode; returns the JSON document."""
    import torch
    import transformers

    model = build_model(args, device)
    free_memory(device)  # the float32 weights it was cast from
    # In this order: plain first, the others are checked against its tokens.
    modes = [
        m
        for m in MODES
        if m in args.modes and (device.type == "cuda" or m in ("plain", "harvest-host"))
    ]
    doc: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": {
            "shape": "tiny (--smoke)" if args.smoke else "Llama-3-8B",
            "layers": args.layers,
            "hidden": model.config.hidden_size,
            "heads": model.config.num_attention_heads,
            "kv_heads": model.config.num_key_value_heads,
            "head_dim": model.config.head_dim,
            "dtype": str(model.dtype),
        },
        "block_tokens": args.block_tokens,
        "decode_steps": args.decode,
        "warmup": args.warmup,
        "timing": "CUDA-synchronized wall clock over the decode steps after the warm-up",
        "skipped_modes": sorted(set(args.modes) - set(modes)),
        "harvest_gpu_note": "GPU leases lent by the GPU that decodes (one-GPU machine): "
        "the blocks stay in its own memory",
        "runs": [],
        "reload": [],
        "errors": [],
    }
    doc["pinned_h2d_1GiB"] = pinned_h2d(device)
    for context in args.contexts:
        for batch in args.batches:
            torch.manual_seed(context + batch)
            ids = torch.randint(0, model.config.vocab_size, (batch, context), device=device)
            began = time.perf_counter()
            kv, first = prefill(model, ids)
            sync(device)
            kv_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in kv)
            print(
                f"context {context} batch {batch}: prefill {time.perf_counter() - began:.1f} s, "
                f"K/V {kv_bytes / GiB:.2f} GiB",
                flush=True,
            )
            want: list[Any] = []
            for mode in modes:
                try:
                    run_mode(doc, mode, model, client, args, device, kv, first, want)
                except Exception as exc:  # noqa: BLE001 - one mode failing must not lose the rest
                    doc["errors"].append(
                        {"context": context, "batch": batch, "mode": mode, "error": repr(exc)}
                    )
                    print(f"  {mode:13s} FAILED: {exc!r}", flush=True)
                free_memory(device)
            del kv, first
            free_memory(device)
    summarize(doc)
    return doc


def run_mode(
    doc: dict[str, Any],
    mode: str,
    model: Any,
    client: Any,
    args: argparse.Namespace,
    device: Any,
    kv: list[tuple[Any, Any]],
    first: Any,
    want: list[Any],
) -> None:
    """Load the prefilled K/V into a cache of ``mode``, decode, and (for Harvest)
    reload; append the rows to ``doc``. ``want`` holds plain's tokens once it ran."""
    import torch

    batch, context = first.shape[0], kv[0][0].shape[2]
    kv_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in kv)
    cache = make_cache(mode, model, client, args, kv_bytes)
    try:
        began = time.perf_counter()
        with torch.no_grad():
            for i, (k, v) in enumerate(kv):
                cache.update(k, v, i)
        sync(device)
        load_s = time.perf_counter() - began
        tokens, seconds, extra = decode(model, cache, first, args, device)
        if mode == "plain":
            want.append(tokens)
        row = {
            "context": context,
            "batch": batch,
            "mode": mode,
            "tokens_per_s": batch * args.decode / seconds,
            "ms_per_step": seconds / args.decode * 1e3,
            "kv_bytes": kv_bytes,
            "load_s": load_s,
            "tokens_equal_plain": bool(torch.equal(tokens, want[0])) if want else None,
            **extra,
        }
        doc["runs"].append(row)
        print(
            f"  {mode:13s} {row['tokens_per_s']:9.1f} tok/s  {row['ms_per_step']:8.2f} "
            f"ms/step  same tokens: {row['tokens_equal_plain']}",
            flush=True,
        )
        if mode.startswith("harvest") and args.reload:
            got = reload(cache, kv, device)
            got.update(context=context, batch=batch, mode=mode)
            doc["reload"].append(got)
            print(
                f"  {mode:13s} reload {got['bytes'] / GiB:.2f} GiB: {got['GBps']:.1f} GB/s "
                f"(verified: {got['verified']})",
                flush=True,
            )
    finally:
        if hasattr(cache, "close"):
            cache.close()


def summarize(doc: dict[str, Any]) -> None:
    """Ratios against plain, and the host reload against the pinned copy."""
    plain = {
        (r["context"], r["batch"]): r["tokens_per_s"] for r in doc["runs"] if r["mode"] == "plain"
    }
    for row in doc["runs"]:
        base = plain.get((row["context"], row["batch"]))
        row["vs_plain"] = round(row["tokens_per_s"] / base, 3) if base else None
    doc["all_tokens_equal_plain"] = all(
        r["tokens_equal_plain"] in (True, None) for r in doc["runs"]
    )
    h2d = (doc.get("pinned_h2d_1GiB") or {}).get("GBps")
    host = [r for r in doc["reload"] if r["mode"] == "harvest-host"]
    if h2d and host:
        best = max(host, key=lambda r: r["bytes"])
        doc["host_reload_over_pinned_h2d"] = round(best["GBps"] / h2d, 3)
    doc["all_reloads_verified"] = all(r["verified"] for r in doc["reload"])


def report(doc: dict[str, Any]) -> None:
    """The table the run ends with."""
    print(
        f"\n{doc['device']}: {doc['model']['layers']} {doc['model']['shape']} layers, "
        f"{doc['block_tokens']}-token blocks, {doc['decode_steps']} timed steps"
    )
    modes = [m for m in MODES if any(r["mode"] == m for r in doc["runs"])]
    print(
        f"{'context':>8s} {'batch':>5s} "
        + " ".join(f"{m + ' tok/s':>19s}" for m in modes)
        + "  same tokens"
    )
    keys = sorted({(r["context"], r["batch"]) for r in doc["runs"]})
    for key in keys:
        rows = {r["mode"]: r for r in doc["runs"] if (r["context"], r["batch"]) == key}
        cells = [
            f"{rows[m]['tokens_per_s']:10.1f} ({rows[m]['vs_plain'] or 0:.2f}x)"
            if m in rows
            else "-"
            for m in modes
        ]
        same = all(r["tokens_equal_plain"] in (True, None) for r in rows.values())
        print(f"{key[0]:8d} {key[1]:5d} " + " ".join(f"{c:>19s}" for c in cells) + f"  {same}")
    for row in doc["reload"]:
        print(
            f"reload {row['mode']:13s} context {row['context']} batch {row['batch']}: "
            f"{row['GBps']:.1f} GB/s ({row['bytes'] / GiB:.2f} GiB)"
        )
    if doc.get("pinned_h2d_1GiB"):
        print(f"pinned host-to-device copy of 1 GiB: {doc['pinned_h2d_1GiB']['GBps']:.1f} GB/s")
    if "host_reload_over_pinned_h2d" in doc:
        print(
            f"host-lease reload / pinned H2D: {doc['host_reload_over_pinned_h2d']} (target >= 0.9)"
        )
    print(
        f"every mode's tokens equal plain's: {doc['all_tokens_equal_plain']}; "
        f"reloads verified: {doc['all_reloads_verified']}"
    )
    if doc["skipped_modes"]:
        print(f"skipped (need CUDA): {', '.join(doc['skipped_modes'])}")
    for err in doc["errors"]:
        print(f"FAILED {err['mode']} context {err['context']} batch {err['batch']}: {err['error']}")


def plot(doc: dict[str, Any], path: Path) -> None:
    """Tokens per second by mode, one group per context and batch."""
    plt = pyplot()
    if plt is None:
        return
    keys = sorted({(r["context"], r["batch"]) for r in doc["runs"]})
    modes = [m for m in MODES if any(r["mode"] == m for r in doc["runs"])]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(modes)
    for j, mode in enumerate(modes):
        values = [
            next(
                (
                    r["tokens_per_s"]
                    for r in doc["runs"]
                    if r["mode"] == mode and (r["context"], r["batch"]) == key
                ),
                0.0,
            )
            for key in keys
        ]
        ax.bar([i + j * width for i in range(len(keys))], values, width, label=mode)
    ax.set_xticks([i + width * (len(modes) - 1) / 2 for i in range(len(keys))])
    ax.set_xticklabels([f"{c // 1024}k x {b}" if c >= 1024 else f"{c} x {b}" for c, b in keys])
    ax.set_xlabel("context tokens x batch")
    ax.set_ylabel("decode tokens/s")
    ax.set_yscale("log")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(
        f"{doc['device']}: decode with the KV cache in borrowed memory "
        f"({doc['model']['layers']} layers)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    """Parse arguments, start a node, run, report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lender-gpu", default="0", help="GPU the node lends (index/UUID)")
    parser.add_argument("--gpu", default="0", help="CUDA index the model runs on")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--contexts", default="8192,32768")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--decode", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--block-tokens", type=int, default=512)
    parser.add_argument("--slab-bytes", default="1GiB")
    parser.add_argument("--cap", default="12GiB", help="GPU memory the node lends")
    parser.add_argument("--reserve", default="4GiB", help="GPU memory kept for its tenant")
    parser.add_argument("--host-bytes", default="12GiB", help="host memory the node lends")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--no-reload", dest="reload", action="store_false")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--out", default=str(REPO / "bench/results/kv.json"))
    args = parser.parse_args()
    from harvestd.sizes import parse_size

    if args.smoke:
        if args.out == parser.get_default("out"):  # a smoke run's figures are not results
            args.out = "/tmp/kv_smoke.json"
        args.layers, args.decode, args.warmup, args.block_tokens = 2, 4, 1, 16
        args.contexts, args.batches, args.slab_bytes = "100,300", "1,2", "1MiB"
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.modes = [m for m in args.modes.split(",") if m]
    args.slab_bytes = parse_size(args.slab_bytes)
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes: {', '.join(sorted(unknown))} (known: {', '.join(MODES)})")
    import torch

    device = torch.device("cpu") if args.smoke else torch.device("cuda", int(args.gpu))
    attention = steady_attention()
    print(attention)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    node_args = (
        dict(backend="host", host_bytes="256MiB")
        if args.smoke
        else dict(
            backend="cuda-vmm",
            gpus=str(args.lender_gpu),
            cap=args.cap,
            reserve=args.reserve,
            host_bytes=args.host_bytes,
        )
    )
    began = time.perf_counter()
    with bench_node(**node_args) as node:
        client = node.connect()
        try:
            doc = run(args, client, device)
            doc["attention"] = attention
        finally:
            client.close()
    doc["wall_s"] = round(time.perf_counter() - began, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, out.with_suffix(".png"))
    report(doc)
    print(f"wrote {out} in {doc['wall_s']} s")
    ok = doc["all_tokens_equal_plain"] and doc["all_reloads_verified"] and not doc["errors"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
