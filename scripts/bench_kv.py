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
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from benchkit.kvmemory import GpuMemory, lender_is_here
from benchkit.kvmodel import build_model, free_memory, prefill, sync
from benchkit.kvmodes import (
    CONFIG,
    KNOWN,
    MODES,
    NEEDS_CUDA,
    OPTIONAL_MODES,
    PLACED_AFTER,
    PLACED_CONFIG,
    PLACED_MODES,
    PLACED_NEEDS_CUDA,
    PLAIN,
    TARGET_VS_PLAIN,
)
from benchkit.kvplot import plot
from benchkit.kvreload import pinned_h2d
from benchkit.kvreport import report
from benchkit.kvrun import run_mode
from benchkit.kvsummary import judge, summarize
from benchkit.node import REPO, bench_node, steady_attention
from benchkit.stats import MIN_REPEATS, MIN_STEPS, alternating

from harvestd.sizes import GiB

SKIPPED_CPU = "skipped (needs CUDA)"
"""A mode's status in the JSON when it was asked for but the run has no GPU."""


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
