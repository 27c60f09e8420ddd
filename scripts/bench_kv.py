#!/usr/bin/env python3
"""Decode throughput with the KV cache off the GPU, Harvest against transformers' own
caches and against a careful hand-written host offload, in one run on one GPU.

Model: Llama-3-8B-shaped layers (hidden 4096, 32 heads, 8 KV heads of 128, intermediate
14336, vocab 128256), --layers of them (2 by default: the fewest that still let every
cache prefetch one layer while another computes), random bfloat16 weights made on the
GPU. Per context (--contexts, 8k and 32k) and batch (--batches, 1 and 4): one prefill
(plain DynamicCache, one sequence at a time, last logits only), then decoding from those
same K/V with each cache (exactly what each runs: ``benchkit.kvmodes.CONFIG``, copied
into the JSON):

  plain                 DynamicCache, every token on the GPU: the reference and ceiling
  offloaded-dynamic     DynamicCache(offloading=True) (generate's "offloaded"): every
                        layer down to the host and back up, every step
  offloaded-static      StaticCache(offloading=True) (generate's "offloaded_static")
  pinned-host-readonly  benchkit.kvmodes.PinnedHostCache: full blocks in pinned host
                        memory, one copy per layer per step back up (prefetched one layer
                        ahead on a side stream), never written back: what a careful user
                        writes
  harvest-host          HarvestCache on host leases (pinned host memory lent via Harvest)
  harvest-gpu           HarvestCache on CUDA VMM leases; on a one-GPU machine lent by that
                        same GPU (the blocks stay in its memory: a stand-in for a peer GPU)

and, computing on the K/V where they lie (issue 15; reported apart, under "placed"):

  harvest-gpu-placed    HarvestCache(placement="placed"): each layer's K/V in one placed
                        tensor backed by CUDA VMM leases, read in place by attention
  host-placed           the same with nothing leased: the host copy read in place over
                        PCIe (optional: --modes, or --smoke, where it is the placed mode
                        the CPU runs)

Statistics (benchkit.stats): per context and batch, --repeats repeats (at least 3) in
this one run, every mode once per repeat, the modes in alternating order from repeat to
repeat; each run loads a fresh cache, decodes --warmup steps, then times --decode steps
(at least 64), CUDA-synchronized wall clock. The JSON keeps every run; the tables and
the plot show the median with min-max. GPU memory per run, at steady state after the
timed steps: torch.cuda.memory_allocated (and its peak during the timed steps) above
what was allocated before the cache was made; for harvest-gpu also its leases (on one GPU
they are this GPU's memory, in the lender process); NVML's used memory of the whole GPU.

Verdicts: every run's tokens and last-step logits are compared with plain's (repeat 0).
A baseline whose tokens differ is reported as such and left out of "best baseline"; the
exit status is non-zero only when Harvest's tokens or logits differ from plain's (or
plain or a Harvest mode produced none, or a reload check failed). Headline per context
and batch: each Harvest mode against the fastest baseline whose tokens equal plain's, and
against plain, as the median (min-max) of per-repeat ratios; rows where Harvest loses
say so. Reload: every layer's blocks fetched at once from the leases (the decode path's
fetch), against a pinned host-to-device copy of 1 GiB measured in the same run.

Placed modes: each runs right after its copy counterpart in every repeat (host-placed
after harvest-host, harvest-gpu-placed after harvest-gpu; after plain when that one is
not run), so it takes that mode's place in the alternating order. Their runs, summary and
headline are under "placed" in the JSON (the issue-14 document keeps its shape); each
headline row gets harvest_gpu_placed_vs_plain (issue 15's target: 0.90), against the best
baseline and against harvest-gpu, and the host-placed ratios. Their tokens and logits
must equal plain's like every Harvest mode's. No reload (nothing is fetched).

The JSON is written after every context and batch ("complete": false until the last), so
a run cut short keeps the points it finished. On the GPU (nvidia-h200), as
scripts/gpu_bench.sh runs it; about 3 minutes with these defaults (an estimate from the
H100 run of the earlier script: transformers' two offloaded caches take most of it):

    python scripts/bench_kv.py --lender-gpu 0 --out bench/results/kv.json   # + kv.png
    python scripts/bench_kv.py --lender-gpu 0 --batches 1,8   # the earlier grid: ~4.5 min
    python scripts/bench_kv.py --smoke --out /tmp/kv_smoke/kv.json  # CPU, tiny, host node
    python scripts/bench_kv.py --lender-gpu 0 --modes plain,harvest-gpu,harvest-gpu-placed
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from benchkit.kvmodes import (
    BASELINES,
    CONFIG,
    HARVEST,
    MODES,
    NEEDS_CUDA,
    PLAIN,
    PinnedHostCache,
    make_baseline,
)
from benchkit.node import REPO, bench_node, pyplot, steady_attention
from benchkit.stats import MIN_REPEATS, MIN_STEPS, alternating, fmt, spread

from harvestd.sizes import GiB, MiB

SKIPPED_CPU = "skipped (needs CUDA)"
# Modes whose K/V sit in placed tensors, read in place (issue 15): reported apart, under
# doc["placed"], so that the issue-14 document (MODES) keeps its shape.
PLACED_MODES = ("host-placed", "harvest-gpu-placed")
OPTIONAL_MODES = ("host-placed",)  # run only when asked for (--modes); --smoke runs it
PLACED_NEEDS_CUDA = frozenset({"harvest-gpu-placed"})
PLACED_AFTER = {"host-placed": "harvest-host", "harvest-gpu-placed": "harvest-gpu"}
KNOWN = (*MODES, *PLACED_MODES)
TARGET_VS_PLAIN = 0.90  # issue 15: harvest-gpu-placed decode at least 0.90 of plain
PLACED_CONFIG = {
    "harvest-gpu-placed": "client.kv.HarvestCache(placement='placed', backends=('cuda-vmm',), "
    "max_tokens=context + warm-up + timed steps + 1, refill_every=None): each layer's K and "
    "V in one placed tensor [2, batch, kv_heads, max_tokens, head_dim] whose 2 MiB chunks are "
    "CUDA VMM leases of --lender-gpu mapped into one reserved range (on a one-GPU machine "
    "that GPU's own memory, lent by the lender process), plus the authoritative host-NUMA "
    "copy; each update writes the new token into the leased pages and the host copy and "
    "returns [:, :, :tokens] views that attention reads in place: no fetch, no staging",
    "host-placed": "client.kv.HarvestCache(placement='placed', borrow_bytes=0, max_tokens=..., "
    "refill_every=None): the same placed tensors with nothing leased: attention reads the "
    "authoritative host copy in place (host-NUMA pages mapped for the GPU through the VMM "
    "API; a memfd on the CPU), every step's K/V crossing the PCIe link inside the kernel",
}
MEMORY_FIELDS = (
    "gpu_bytes",
    "gpu_bytes_with_leases",
    "gpu_peak_bytes",
    "nvml_delta_bytes",
    "nvml_used_bytes",
)


def build_model(args: argparse.Namespace, device: Any) -> Any:
    """The Llama-3-8B-shaped model (or a tiny one with --smoke), random weights."""
    import torch
    import transformers

    smoke = args.smoke
    cfg = transformers.LlamaConfig(
        num_hidden_layers=args.layers,
        max_position_embeddings=max(args.contexts) + args.warmup + args.decode + 1024,
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


def free_memory(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class GpuMemory:
    """What the decoding process holds on its GPU (torch's allocator), and what the
    whole GPU has in use (NVML, every process: lenders too). None on the CPU."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self._nvml: Any = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            from client.devices import cuda_uuid

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByUUID(cuda_uuid(device.index or 0))
            self._nvml = (pynvml, handle)
        except Exception as exc:  # noqa: BLE001 - NVML is a nicety: say so and go on
            print(f"NVML unavailable ({exc!r}): no NVML column", flush=True)

    def allocated(self) -> int | None:
        import torch

        return int(torch.cuda.memory_allocated(self.device)) if self.device.type == "cuda" else None

    def reset_peak(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        import torch

        if self.device.type != "cuda":
            return None
        return int(torch.cuda.max_memory_allocated(self.device))

    def nvml_used(self) -> int | None:
        if self._nvml is None:
            return None
        pynvml, handle = self._nvml
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def lender_is_here(lender_gpu: str, device: Any) -> bool:
    """Whether the GPU the node lends (an NVML index or a UUID) is the one that decodes."""
    if device.type != "cuda":
        return False
    from client.devices import cuda_uuid

    here = cuda_uuid(device.index or 0)
    if lender_gpu.startswith("GPU-"):
        return lender_gpu == here
    try:
        from benchkit.tenant import gpu_uuid

        return gpu_uuid(lender_gpu) == here
    except Exception:  # noqa: BLE001 - no NVML: CUDA and NVML indices usually agree
        return int(lender_gpu) == (device.index or 0)


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


def make_cache(
    mode: str, model: Any, client: Any, args: argparse.Namespace, kv_bytes: int, max_tokens: int
) -> Any:
    """An empty cache of ``mode``."""
    from client.kv import HarvestCache

    slab = args.slab_bytes
    if mode in PLACED_MODES:
        return HarvestCache(
            client,
            block_tokens=args.block_tokens,
            config=model.config,
            placement="placed",
            max_tokens=max_tokens,
            backends=("cuda-vmm",) if mode == "harvest-gpu-placed" else ("host",),
            slab_bytes=slab,
            borrow_bytes=0 if mode == "host-placed" else kv_bytes + 2 * slab + GiB,
            refill_every=None,
        )
    if mode not in HARVEST:
        return make_baseline(mode, model.config, max_tokens, args.block_tokens)
    return HarvestCache(
        client,
        block_tokens=args.block_tokens,
        config=model.config,
        backends=("host",) if mode == "harvest-host" else ("cuda-vmm",),
        slab_bytes=slab,
        borrow_bytes=kv_bytes + 2 * slab + GiB,
        refill_every=None,
        placement="copy",
    )


def decode(
    model: Any, cache: Any, first: Any, args: argparse.Namespace, device: Any, memory: GpuMemory
) -> tuple[Any, Any, float, dict[str, Any]]:
    """Greedy steps from ``first``: the tokens (all steps), the last step's logits, the
    seconds of the timed steps, and what the cache moved during them."""
    import torch

    token, tokens = first, []
    before: dict[str, float] = {}
    with torch.no_grad():
        for step in range(args.warmup + args.decode):
            if step == args.warmup:
                sync(device)
                memory.reset_peak()
                before = moved(cache)
                began = time.perf_counter()
            logits = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            token = logits[:, -1:].argmax(-1)
            tokens.append(token)
        sync(device)
    elapsed = time.perf_counter() - began
    after = moved(cache)
    extra = {}
    if "read_bytes" in after:  # PinnedHostCache
        extra["read_GBps"] = (after["read_bytes"] - before["read_bytes"]) / elapsed / 1e9
    if "fetched_bytes" in after:  # HarvestCache
        extra["fetched_GBps"] = (after["fetched_bytes"] - before["fetched_bytes"]) / elapsed / 1e9
        extra["fetch_wait_s_per_step"] = (
            after["fetch_wait_s"] - before["fetch_wait_s"]
        ) / args.decode
    return torch.cat(tokens, 1).cpu(), logits[:, -1].float().cpu(), elapsed, extra


def moved(cache: Any) -> dict[str, float]:
    """Cumulative bytes moved and seconds waited, for the caches that count them."""
    if isinstance(cache, PinnedHostCache):
        return {"read_bytes": float(cache.bytes_read)}
    stats = getattr(cache, "stats", None)
    if stats is None:
        return {}
    return {"fetched_bytes": float(stats.bytes_fetched), "fetch_wait_s": stats.fetch_wait_s}


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


def run(args: argparse.Namespace, client: Any, device: Any) -> dict[str, Any]:
    """Every context, batch, repeat and mode; returns the JSON document."""
    import torch
    import transformers

    model = build_model(args, device)
    free_memory(device)  # the float32 weights it was cast from
    memory = GpuMemory(device)
    modes = [m for m in args.modes if device.type == "cuda" or m not in NEEDS_CUDA]
    placed = [m for m in args.placed_modes if device.type == "cuda" or m not in PLACED_NEEDS_CUDA]
    after = {p: PLACED_AFTER[p] if PLACED_AFTER[p] in modes else PLAIN for p in placed}
    doc: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": {
            "shape": "tiny (--smoke)" if args.smoke else "Llama-3-8B layers",
            "layers": args.layers,
            "hidden": model.config.hidden_size,
            "heads": model.config.num_attention_heads,
            "kv_heads": model.config.num_key_value_heads,
            "head_dim": model.config.head_dim,
            "vocab": model.config.vocab_size,
            "dtype": str(model.dtype),
        },
        "block_tokens": args.block_tokens,
        "slab_bytes": args.slab_bytes,
        "lender_gpu": args.lender_gpu,
        "leases_on_decoding_gpu": args.leases_here,
        "repeats": args.repeats,
        "steps": args.decode,
        "warmup": args.warmup,
        "statistics": (
            f"per context and batch, {args.repeats} repeats in this run, every mode once per "
            "repeat, in alternating order (benchkit.stats.alternating); each run: a fresh "
            f"cache, {args.warmup} warm-up steps, {args.decode} timed steps; figures are "
            "median (min-max) over repeats; runs keeps every repeat"
        ),
        "timing": "CUDA-synchronized wall clock over the timed steps",
        "memory": (
            "gpu_bytes: torch.cuda.memory_allocated after the timed steps minus before the "
            "cache was made (the cache's steady state, plus the last step's logits); "
            "gpu_peak_bytes: the peak during the timed steps, same base; "
            "gpu_bytes_with_leases (harvest-gpu): plus its leases, which on one GPU are this "
            "GPU's memory; nvml_used_bytes: the whole GPU's used memory after the timed steps "
            "(every process, lenders included) and nvml_delta_bytes its growth since before "
            "the cache was made (the lender keeps freed memory pooled up to its cap, so after "
            "the first GPU-lease run the delta no longer shows the leases); gpu_layers: the "
            "GPU bytes (with leases for harvest-gpu) in layers' worth of K/V"
        ),
        "modes": {
            m: {
                "config": CONFIG[m],
                "status": "run" if m in modes else SKIPPED_CPU if m in args.modes else "left out",
            }
            for m in MODES
        },
        "skipped_modes": {m: SKIPPED_CPU for m in args.modes if m not in modes},
        "harvest_gpu_note": (
            "GPU leases lent by the GPU that decodes (--lender-gpu is that GPU): the blocks "
            "stay in its own memory, so harvest-gpu saves no GPU memory there "
            "(gpu_bytes_with_leases counts them); it stands in for a peer GPU's memory"
            if args.leases_here
            else f"GPU leases lent by another GPU (--lender-gpu {args.lender_gpu}): the "
            "blocks come from its memory (over NVLink where the GPUs have it)"
        ),
        "complete": False,  # True once every point ran (the JSON is written after each)
        "runs": [],
        "reload": [],
        "errors": [],
        "placed": {
            "about": (
                "issue 15: the K/V in placed tensors, read in place by attention; each "
                "placed mode runs right after the mode of ran_after in every repeat; "
                "headline ratios are per repeat, median (min-max), against modes of "
                "doc['runs'] (same context, batch and repeat)"
            ),
            "modes": {
                m: {
                    "config": PLACED_CONFIG[m],
                    "status": "run"
                    if m in placed
                    else SKIPPED_CPU
                    if m in args.placed_modes
                    else "left out",
                    "ran_after": after.get(m),
                }
                for m in PLACED_MODES
            },
            "skipped_modes": {m: SKIPPED_CPU for m in args.placed_modes if m not in placed},
            "target_vs_plain": TARGET_VS_PLAIN,
            "runs": [],
            "summary": [],
            "headline": [],
        },
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
            outputs: dict[tuple[str, int], tuple[Any, Any]] = {}
            rows: list[dict[str, Any]] = []
            placed_rows: list[dict[str, Any]] = []
            slot, last = 0, -1
            for repeat, mode in with_placed(modes, after, args.repeats):
                if mode not in PLACED_MODES:  # the order among the issue-14 modes
                    slot = slot + 1 if repeat == last else 0
                    last = repeat
                try:
                    row, tokens, logits = run_mode(
                        doc, mode, repeat, model, client, args, device, memory, kv, first
                    )
                    if mode in PLACED_MODES:
                        row["ran_after"] = after[mode]
                        placed_rows.append(row)
                    else:
                        row["order"] = slot
                        rows.append(row)
                    outputs[(mode, repeat)] = (tokens, logits)
                except Exception as exc:  # noqa: BLE001 - one mode failing must not lose the rest
                    doc["errors"].append(
                        {
                            "context": context,
                            "batch": batch,
                            "mode": mode,
                            "repeat": repeat,
                            "error": repr(exc),
                        }
                    )
                    print(f"  r{repeat} {mode:20s} FAILED: {exc!r}", flush=True)
                free_memory(device)
            judge(rows + placed_rows, outputs)
            doc["runs"].extend(rows)
            doc["placed"]["runs"].extend(placed_rows)
            del kv, first, outputs
            free_memory(device)
            summarize(doc)
            save(doc, Path(args.out))  # after every point: a run cut short keeps what it did
    doc["complete"] = True
    return doc


def with_placed(modes: list[str], after: dict[str, str], repeats: int) -> Iterator[tuple[int, str]]:
    """``alternating(modes)``, each placed mode right after the mode ``after`` names."""
    for repeat, mode in alternating(modes, repeats):
        yield repeat, mode
        for placed, before in after.items():
            if before == mode:
                yield repeat, placed


def save(doc: dict[str, Any], out: Path) -> None:
    """Write the JSON document (atomically: a reader never sees half of it)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(out)


def run_mode(
    doc: dict[str, Any],
    mode: str,
    repeat: int,
    model: Any,
    client: Any,
    args: argparse.Namespace,
    device: Any,
    memory: GpuMemory,
    kv: list[tuple[Any, Any]],
    first: Any,
) -> tuple[dict[str, Any], Any, Any]:
    """A fresh cache of ``mode``: load the prefilled K/V, decode, measure its memory and
    (for Harvest) the reload. The run's row, its tokens and its last logits."""
    import torch

    batch, context = first.shape[0], kv[0][0].shape[2]
    kv_bytes = sum(k.numel() * k.element_size() * 2 for k, _ in kv)
    max_tokens = context + args.warmup + args.decode + 1
    base, nvml_base = memory.allocated(), memory.nvml_used()
    cache = make_cache(mode, model, client, args, kv_bytes, max_tokens)
    try:
        began = time.perf_counter()
        with torch.no_grad():
            for i, (k, v) in enumerate(kv):
                cache.update(k, v, i)
        sync(device)
        load_s = time.perf_counter() - began
        tokens, logits, seconds, extra = decode(model, cache, first, args, device, memory)
        allocated, peak, nvml = memory.allocated(), memory.peak(), memory.nvml_used()
        row: dict[str, Any] = {
            "context": context,
            "batch": batch,
            "mode": mode,
            "repeat": repeat,
            "steps": args.decode,
            "warmup": args.warmup,
            "seconds": seconds,
            "tokens_per_s": batch * args.decode / seconds,
            "ms_per_step": seconds / args.decode * 1e3,
            "kv_bytes": kv_bytes,
            "load_s": load_s,
            "gpu_bytes": None if allocated is None or base is None else allocated - base,
            "gpu_peak_bytes": None if peak is None or base is None else peak - base,
            "nvml_used_bytes": nvml,
            "nvml_delta_bytes": None if nvml is None or nvml_base is None else nvml - nvml_base,
            "cache_class": f"{type(cache).__module__}.{type(cache).__name__}",
            "transformers_offloading": getattr(cache, "offloading", None)
            if mode in (PLAIN, "offloaded-dynamic", "offloaded-static")
            else None,
            **extra,
        }
        if hasattr(cache, "host_bytes"):  # PinnedHostCache
            row.update(host_bytes=cache.host_bytes, device_bytes=cache.device_bytes)
        if mode in HARVEST or mode in PLACED_MODES:
            stats = cache.stats
            row.update(
                tier_bytes=stats.tier_bytes,
                leased_bytes=stats.leased_bytes,
                device_bytes=stats.device_bytes,
                host_bytes=stats.stored_bytes,  # the pinned authoritative copy
                revocations=stats.revocations,
                redone_rows=stats.redone_rows,
            )
            if mode in PLACED_MODES:
                # The authoritative copy is the placed tensors' whole capacity.
                row["host_bytes"] = sum(p.nbytes for p in cache.placed.tensors())
            if (
                mode in ("harvest-gpu", "harvest-gpu-placed")
                and args.leases_here
                and row["gpu_bytes"] is not None
            ):
                # On one GPU the leases are this GPU's memory (another process's: torch
                # does not count them, and the lender pools freed memory, so NVML's
                # delta misses them after the first run).
                row["gpu_bytes_with_leases"] = row["gpu_bytes"] + stats.leased_bytes
        gpu = row["gpu_bytes"]
        print(
            f"  r{repeat} {mode:20s} {row['tokens_per_s']:9.1f} tok/s "
            f"{row['ms_per_step']:8.2f} ms/step"
            + (f"  GPU {gpu / MiB:8.1f} MiB" if gpu is not None else ""),
            flush=True,
        )
        if mode in HARVEST and args.reload:
            got = reload(cache, kv, device)
            got.update(context=context, batch=batch, mode=mode, repeat=repeat)
            doc["reload"].append(got)
            print(
                f"  r{repeat} {mode:20s} reload {got['bytes'] / GiB:.2f} GiB: "
                f"{got['GBps']:.1f} GB/s (verified: {got['verified']})",
                flush=True,
            )
    finally:
        if hasattr(cache, "close"):
            cache.close()
        del cache
    return row, tokens, logits


def judge(rows: list[dict[str, Any]], outputs: dict[tuple[str, int], tuple[Any, Any]]) -> None:
    """Each run's tokens and last logits against plain's (its first repeat that ran)."""
    import torch

    plain = sorted(r for m, r in outputs if m == PLAIN)
    ref = outputs[(PLAIN, plain[0])] if plain else None
    for row in rows:
        got = outputs[(row["mode"], row["repeat"])]
        if ref is None:
            row["tokens_equal_plain"] = row["logits_equal_plain"] = None
            continue
        row["tokens_equal_plain"] = bool(torch.equal(got[0], ref[0]))
        row["logits_equal_plain"] = bool(torch.equal(got[1], ref[1]))
        if row["mode"] == PLAIN:
            row["same_as_first_plain_repeat"] = row["tokens_equal_plain"]


def verdict(mode: str, tokens: bool | None, logits: bool | None) -> str:
    """One line: what a mode's outputs say about it."""
    if mode == PLAIN:
        return "reference" if tokens else "reference, but its repeats differ"
    harvest = mode in HARVEST or mode in PLACED_MODES
    if tokens is None:
        return "no reference (plain did not run)" + (": FAIL" if harvest else "")
    if harvest:
        if not tokens:
            return "FAIL: tokens differ from plain"
        return "same tokens and logits as plain" if logits else "FAIL: logits differ from plain"
    if not tokens:
        return "tokens differ from plain: left out of the best baseline (not a failure)"
    return "same tokens as plain" + ("" if logits else " (logits differ)")


def summarize(doc: dict[str, Any]) -> None:
    """Per context, batch and mode: median (min-max) over repeats and the verdict; per
    context and batch: the headline (with the placed modes' ratios); and whether the run
    passes."""
    layers = doc["model"]["layers"]
    placed = doc["placed"]
    keys = sorted({(r["context"], r["batch"]) for r in doc["runs"] + placed["runs"]})
    doc["summary"], doc["headline"] = [], []
    placed["summary"], placed["headline"] = [], []
    for key in keys:
        at = [r for r in doc["runs"] if (r["context"], r["batch"]) == key]
        placed_at = [r for r in placed["runs"] if (r["context"], r["batch"]) == key]
        by_mode: dict[str, dict[str, Any]] = {}
        for mode in KNOWN:
            runs = [r for r in at + placed_at if r["mode"] == mode]
            if not runs:
                continue
            row = summary_row(key, mode, runs, layers)
            (placed["summary"] if mode in PLACED_MODES else doc["summary"]).append(row)
            by_mode[mode] = row
        line = headline(key, at, by_mode)
        ratios = placed_ratios(at + placed_at, line["best_baseline"])
        line.update(ratios)
        doc["headline"].append(line)
        placed["headline"].append({"context": key[0], "batch": key[1], **ratios})
    harvest = [r for r in doc["runs"] if r["mode"] in HARVEST] + placed["runs"]
    doc["harvest_tokens_equal_plain"] = all(r["tokens_equal_plain"] is True for r in harvest)
    doc["harvest_logits_equal_plain"] = all(r["logits_equal_plain"] is True for r in harvest)
    doc["baselines_with_other_tokens"] = [
        {"context": s["context"], "batch": s["batch"], "mode": s["mode"]}
        for s in doc["summary"]
        if s["mode"] in BASELINES and s["tokens_equal_plain"] is False
    ]
    doc["harvest_losses"] = [
        {"context": h["context"], "batch": h["batch"], "mode": mode, "against": against, **got}
        for h in doc["headline"]
        for mode in HARVEST
        if mode in h
        for against in ("best_baseline", PLAIN)
        for got in [h[mode].get(f"vs_{against}")]
        if got is not None and float(got["median"]) < 1
    ]
    h2d = (doc.get("pinned_h2d_1GiB") or {}).get("GBps")
    host = [r for r in doc["reload"] if r["mode"] == "harvest-host"]
    if h2d and host:
        largest = max(r["bytes"] for r in host)
        rates = [r["GBps"] for r in host if r["bytes"] == largest]
        doc["host_reload_over_pinned_h2d"] = {
            k: round(v / h2d, 3) if isinstance(v, float) else v
            for k, v in spread(rates).items()
            if k != "values"
        }
    doc["all_reloads_verified"] = all(r["verified"] for r in doc["reload"])
    failures = []
    if not doc["harvest_tokens_equal_plain"]:
        failures.append("Harvest's tokens differ from plain's (or had no reference)")
    if not doc["harvest_logits_equal_plain"]:
        failures.append("Harvest's last-step logits differ from plain's")
    if not doc["all_reloads_verified"]:
        failures.append("a reload from the leases returned other bytes")
    failures += [
        f"{e['mode']} failed at context {e['context']} batch {e['batch']}: {e['error']}"
        for e in doc["errors"]
        if e["mode"] in HARVEST or e["mode"] in PLACED_MODES or e["mode"] == PLAIN
    ]
    doc["failures"] = failures
    doc["ok"] = not failures


def summary_row(
    key: tuple[int, int], mode: str, runs: list[dict[str, Any]], layers: int
) -> dict[str, Any]:
    """One mode's runs at one context and batch: median (min-max) and the verdict."""
    tokens: bool | None = all(r["tokens_equal_plain"] for r in runs)
    logits: bool | None = all(r["logits_equal_plain"] for r in runs)
    if any(r["tokens_equal_plain"] is None for r in runs):
        tokens = logits = None
    row: dict[str, Any] = {
        "context": key[0],
        "batch": key[1],
        "mode": mode,
        "repeats": len(runs),
        "steps": min(r["steps"] for r in runs),
        "warmup": runs[0]["warmup"],
        "tokens_per_s": spread([r["tokens_per_s"] for r in runs]),
        "ms_per_step": spread([r["ms_per_step"] for r in runs]),
        "load_s": spread([r["load_s"] for r in runs]),
        "kv_bytes": runs[0]["kv_bytes"],
        "tokens_equal_plain": tokens,
        "logits_equal_plain": logits,
        "verdict": verdict(mode, tokens, logits),
    }
    for field in MEMORY_FIELDS:
        values = [r[field] for r in runs if r.get(field) is not None]
        row[field] = spread(values) if values else None
    per_layer = row["kv_bytes"] / layers
    held = row["gpu_bytes_with_leases"] or row["gpu_bytes"]
    if held is not None:  # layers' worth of K/V on this GPU
        row["gpu_layers"] = round(float(held["median"]) / per_layer, 2)
    if mode in HARVEST or mode in PLACED_MODES:
        row["revocations"] = [r["revocations"] for r in runs]
    return row


def placed_ratios(runs: list[dict[str, Any]], best: str | None) -> dict[str, Any]:
    """The placed modes' tokens per second against other modes', per repeat: median
    (min-max), None where either did not run; and whether issue 15's target is met."""
    rate = {(r["mode"], r["repeat"]): r["tokens_per_s"] for r in runs}

    def ratio(mode: str, against: str | None) -> dict[str, Any] | None:
        values = [
            rate[(mode, r)] / rate[(against, r)]
            for m, r in sorted(rate)
            if m == mode and against is not None and (against, r) in rate
        ]
        return spread(values) if values else None

    out: dict[str, Any] = {
        "harvest_gpu_placed_vs_plain": ratio("harvest-gpu-placed", PLAIN),
        "harvest_gpu_placed_vs_best_baseline": ratio("harvest-gpu-placed", best),
        "harvest_gpu_placed_vs_harvest_gpu": ratio("harvest-gpu-placed", "harvest-gpu"),
        "host_placed_vs_plain": ratio("host-placed", PLAIN),
        "host_placed_vs_harvest_host": ratio("host-placed", "harvest-host"),
        "host_placed_vs_pinned_host_readonly": ratio("host-placed", "pinned-host-readonly"),
    }
    vs_plain = out["harvest_gpu_placed_vs_plain"]
    out["harvest_gpu_placed_meets_target"] = (
        None if vs_plain is None else float(vs_plain["median"]) >= TARGET_VS_PLAIN
    )
    return out


def headline(
    key: tuple[int, int], runs: list[dict[str, Any]], by_mode: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Each Harvest mode against the fastest baseline with plain's tokens, and against
    plain: median (min-max) of the ratios of runs of the same repeat."""
    valid = [m for m in BASELINES if m in by_mode and by_mode[m]["tokens_equal_plain"]]
    best = max(valid, key=lambda m: by_mode[m]["tokens_per_s"]["median"], default=None)
    out: dict[str, Any] = {
        "context": key[0],
        "batch": key[1],
        "best_baseline": best,
        "best_baseline_tokens_per_s": by_mode[best]["tokens_per_s"] if best else None,
        "baselines_left_out": [
            m for m in BASELINES if m in by_mode and not by_mode[m]["tokens_equal_plain"]
        ],
    }
    rate = {(r["mode"], r["repeat"]): r["tokens_per_s"] for r in runs}
    for mode in HARVEST:
        if mode not in by_mode:
            continue
        got: dict[str, Any] = {"tokens_per_s": by_mode[mode]["tokens_per_s"]}
        for name, against in (("best_baseline", best), (PLAIN, PLAIN)):
            ratios = [
                rate[(mode, r)] / rate[(against, r)]
                for r in sorted({r for m, r in rate if m == mode})
                if against is not None and (against, r) in rate
            ]
            got[f"vs_{name}"] = spread(ratios) if ratios else None
        vs = got["vs_best_baseline"]
        got["loses_to_best_baseline"] = None if vs is None else float(vs["median"]) < 1
        out[mode] = got
    return out


def label(context: int, batch: int) -> str:
    return f"{context // 1024}k x {batch}" if context >= 1024 else f"{context} x {batch}"


def report(doc: dict[str, Any]) -> None:
    """The tables the run ends with."""
    print(
        f"\n{doc['device']}: {doc['model']['layers']} {doc['model']['shape']}, "
        f"{doc['block_tokens']}-token blocks; {doc['repeats']} repeats of {doc['steps']} "
        f"timed steps (after {doc['warmup']}), modes alternating; median (min-max)"
    )
    summaries = doc["summary"] + doc["placed"]["summary"]
    summary = {(s["context"], s["batch"], s["mode"]): s for s in summaries}
    keys = sorted({(s["context"], s["batch"]) for s in summaries})
    modes = [m for m in KNOWN if any(s["mode"] == m for s in summaries)]

    def table(cell: Callable[[dict[str, Any] | None], str]) -> None:
        """A row per context x batch, a column per mode; ``cell`` of each mode's summary."""
        print(f"{'context x batch':>16s} " + " ".join(f"{m:>24s}" for m in modes))
        for key in keys:
            cells = [cell(summary.get((*key, m))) for m in modes]
            print(f"{label(*key):>16s} " + " ".join(f"{c:>24s}" for c in cells))

    def tokens_per_s(s: dict[str, Any] | None) -> str:
        if s is None:
            return "-"
        return fmt(s["tokens_per_s"]) + ("*" if s["tokens_equal_plain"] is False else "")

    def gpu_mib(s: dict[str, Any] | None) -> str:
        if s is None or s["gpu_bytes"] is None:
            return "-"
        mib = float(s["gpu_bytes"]["median"]) / MiB
        cell = f"{mib:.0f}"
        if s["gpu_bytes_with_leases"] is not None:
            cell += f"+{float(s['gpu_bytes_with_leases']['median']) / MiB - mib:.0f}"
        return f"{cell} ({s['gpu_layers']})"

    def nvml_mib(s: dict[str, Any] | None) -> str:
        nv = s["nvml_delta_bytes"] if s else None
        return f"{float(nv['median']) / MiB:.0f}" if nv else "-"

    print("\ndecode tokens/s (* tokens differ from plain's)")
    table(tokens_per_s)
    if any(s["gpu_bytes"] is not None for s in summaries):
        print(
            "\nGPU MiB held at steady state (torch allocated, + leases on this GPU for "
            "harvest-gpu and harvest-gpu-placed; in layers' worth of K/V)"
        )
        table(gpu_mib)
        if any(s["nvml_delta_bytes"] is not None for s in summaries):
            print(
                "\nwhole-GPU used memory added since before the cache (NVML, MiB; every "
                "process; a lender's pooled memory shows only when first allocated)"
            )
            table(nvml_mib)
    print("\nHarvest against the best baseline with plain's tokens, and against plain")
    for h in doc["headline"]:
        best = h["best_baseline"] or "none"
        for mode in HARVEST:
            if mode not in h:
                continue
            got = h[mode]
            vs_best = fmt(got["vs_best_baseline"], digits=2) if got["vs_best_baseline"] else "-"
            vs_plain = fmt(got["vs_plain"], digits=2) if got["vs_plain"] else "-"
            lose = "  <- Harvest loses" if got["loses_to_best_baseline"] else ""
            print(
                f"{label(h['context'], h['batch']):>16s} {mode:13s} x{vs_best} {best}, "
                f"x{vs_plain} plain{lose}"
            )
    report_placed(doc)
    for context, batch, mode in sorted(
        {(r["context"], r["batch"], r["mode"]) for r in doc["reload"]}
    ):
        rows = [
            r
            for r in doc["reload"]
            if (r["context"], r["batch"], r["mode"]) == (context, batch, mode)
        ]
        print(
            f"reload {mode:13s} {label(context, batch)}, {rows[0]['bytes'] / GiB:.2f} GiB: "
            f"{fmt(spread([r['GBps'] for r in rows]))} GB/s"
        )
    if doc.get("pinned_h2d_1GiB"):
        print(f"pinned host-to-device copy of 1 GiB: {doc['pinned_h2d_1GiB']['GBps']:.1f} GB/s")
    if "host_reload_over_pinned_h2d" in doc:
        got = doc["host_reload_over_pinned_h2d"]
        print(f"host-lease reload / pinned H2D: {got['median']} ({got['min']}-{got['max']})")
    for s in summaries:
        if s["mode"] != PLAIN and s["tokens_equal_plain"] is not True:
            print(f"{label(s['context'], s['batch'])} {s['mode']}: {s['verdict']}")
    print(
        f"Harvest's tokens equal plain's: {doc['harvest_tokens_equal_plain']}; logits: "
        f"{doc['harvest_logits_equal_plain']}; reloads verified: {doc['all_reloads_verified']}"
    )
    for mode, why in {**doc["skipped_modes"], **doc["placed"]["skipped_modes"]}.items():
        print(f"{mode}: {why}")
    for err in doc["errors"]:
        print(
            f"FAILED {err['mode']} {label(err['context'], err['batch'])} "
            f"repeat {err['repeat']}: {err['error']}"
        )
    for failure in doc["failures"]:
        print(f"FAIL: {failure}")


def report_placed(doc: dict[str, Any]) -> None:
    """The placed modes' ratios (issue 15), one line per context, batch and ratio."""
    names = {
        "harvest_gpu_placed_vs_plain": "harvest-gpu-placed / plain",
        "harvest_gpu_placed_vs_best_baseline": "harvest-gpu-placed / best baseline",
        "harvest_gpu_placed_vs_harvest_gpu": "harvest-gpu-placed / harvest-gpu",
        "host_placed_vs_plain": "host-placed / plain",
        "host_placed_vs_harvest_host": "host-placed / harvest-host",
        "host_placed_vs_pinned_host_readonly": "host-placed / pinned-host-readonly",
    }
    lines = [
        (h, name, h[key])
        for h in doc["placed"]["headline"]
        for key, name in names.items()
        if h[key]
    ]
    if not lines:
        return
    target = doc["placed"]["target_vs_plain"]
    print(f"\nplaced K/V, read in place (issue 15; target: harvest-gpu-placed >= {target} x plain)")
    for h, name, got in lines:
        miss = ""
        if (
            name == names["harvest_gpu_placed_vs_plain"]
            and not h["harvest_gpu_placed_meets_target"]
        ):
            miss = "  <- below the target"
        print(f"{label(h['context'], h['batch']):>16s} {name:36s} x{fmt(got, digits=2)}{miss}")


def plot(doc: dict[str, Any], path: Path) -> None:
    """Tokens per second by mode (median, min-max bars; hatched: tokens differ from
    plain's), and the GPU memory each holds, one group per context and batch."""
    plt = pyplot()
    if plt is None:
        return
    rows = doc["summary"] + doc["placed"]["summary"]
    summary = {(s["context"], s["batch"], s["mode"]): s for s in rows}
    keys = sorted({(s["context"], s["batch"]) for s in rows})
    modes = [m for m in KNOWN if any(s["mode"] == m for s in rows)]
    has_memory = any(s["gpu_bytes"] is not None for s in rows)
    fig, axes = plt.subplots(
        2 if has_memory else 1, 1, figsize=(11, 8 if has_memory else 4.5), squeeze=False
    )
    width = 0.8 / len(modes)
    xs = range(len(keys))
    for j, mode in enumerate(modes):
        at = [summary.get((*key, mode)) for key in keys]
        med = [float(s["tokens_per_s"]["median"]) if s else 0.0 for s in at]
        lo = [med[i] - float(s["tokens_per_s"]["min"]) if s else 0.0 for i, s in enumerate(at)]
        hi = [float(s["tokens_per_s"]["max"]) - med[i] if s else 0.0 for i, s in enumerate(at)]
        bars = axes[0][0].bar(
            [i + j * width for i in xs], med, width, yerr=[lo, hi], capsize=2, label=mode
        )
        for bar, s in zip(bars, at, strict=True):
            if s and s["tokens_equal_plain"] is False:
                bar.set_hatch("//")
        if has_memory:
            mem = [float(s["gpu_bytes"]["median"]) / GiB if s and s["gpu_bytes"] else 0 for s in at]
            bars = axes[1][0].bar([i + j * width for i in xs], mem, width, label=mode)
            leased = [
                float(s["gpu_bytes_with_leases"]["median"]) / GiB - mem[i]
                if s and s.get("gpu_bytes_with_leases")
                else 0.0
                for i, s in enumerate(at)
            ]
            if any(leased):  # GPU leases on one GPU: this GPU's memory
                axes[1][0].bar(
                    [i + j * width for i in xs],
                    leased,
                    width,
                    bottom=mem,
                    color=bars[0].get_facecolor(),
                    hatch="xx",
                    alpha=0.5,
                )
    ticks = [i + width * (len(modes) - 1) / 2 for i in xs]
    ax = axes[0][0]
    ax.set_xticks(ticks)
    ax.set_xticklabels([label(*key) for key in keys])
    ax.set_ylabel("decode tokens/s (median, min-max)")
    ax.set_yscale("log")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=3)
    ax.set_title(
        f"{doc['device']}: decode with the KV cache off the GPU ({doc['model']['layers']} "
        f"layers, {doc['repeats']} x {doc['steps']} steps; hatched: other tokens than plain)"
    )
    if has_memory:
        ax = axes[1][0]
        ax.set_xticks(ticks)
        ax.set_xticklabels([label(*key) for key in keys])
        ax.set_xlabel("context tokens x batch")
        ax.set_ylabel("GPU GiB held (hatched: leases on it)")
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    """Parse arguments, start a node, run, report."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--lender-gpu", default="0", help="GPU the node lends (index/UUID)")
    parser.add_argument("--gpu", default="0", help="CUDA index the model runs on")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--contexts", default="8192,32768")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--decode", type=int, default=MIN_STEPS, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS)
    parser.add_argument("--block-tokens", type=int, default=512)
    parser.add_argument("--slab-bytes", default="1GiB")
    parser.add_argument("--cap", default="12GiB", help="GPU memory the node lends")
    parser.add_argument("--reserve", default="4GiB", help="GPU memory kept for its tenant")
    parser.add_argument("--host-bytes", default="12GiB", help="host memory the node lends")
    parser.add_argument(
        "--modes",
        default=",".join([*MODES, "harvest-gpu-placed"]),
        help=f"comma-separated, of {', '.join(KNOWN)} (optional: {', '.join(OPTIONAL_MODES)})",
    )
    parser.add_argument("--no-reload", dest="reload", action="store_false")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--out", default=str(REPO / "bench/results/kv.json"))
    args = parser.parse_args()
    from harvestd.sizes import parse_size

    if args.smoke:
        if args.out == parser.get_default("out"):  # a smoke run's figures are not results
            args.out = "/tmp/kv_smoke/kv.json"
        args.layers, args.block_tokens = 2, 16
        args.contexts, args.batches, args.slab_bytes = "100,300", "1,2", "1MiB"
        if args.modes == parser.get_default("modes"):  # the CPU's placed mode too
            args.modes += ",host-placed"
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    asked = [m for m in args.modes.split(",") if m]
    args.modes = [m for m in MODES if m in asked]  # in MODES' order
    args.placed_modes = [m for m in PLACED_MODES if m in asked]
    args.slab_bytes = parse_size(args.slab_bytes)
    unknown = set(asked) - set(KNOWN)
    if unknown:
        parser.error(f"unknown modes: {', '.join(sorted(unknown))} (known: {', '.join(KNOWN)})")
    if args.decode < MIN_STEPS or args.repeats < MIN_REPEATS:
        parser.error(f"at least {MIN_STEPS} timed steps (--decode) and {MIN_REPEATS} repeats")
    if any(m != PLAIN for m in args.modes + args.placed_modes) and PLAIN not in args.modes:
        parser.error("plain is the reference: keep it in --modes")
    import torch

    device = torch.device("cpu") if args.smoke else torch.device("cuda", int(args.gpu))
    attention = steady_attention()
    print(attention)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    args.leases_here = lender_is_here(str(args.lender_gpu), device)
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
    save(doc, out)
    plot(doc, out.with_suffix(".png"))
    report(doc)
    print(f"wrote {out} in {doc['wall_s']} s: {'ok' if doc['ok'] else 'FAILED'}")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
