#!/usr/bin/env python3
"""Placed tensors (issue 15): reads and a GEMV per tier, against a pinned host-to-device
copy of the same bytes, and the time a revocation takes to remap placed pages.

Tiers, each a placed tensor of --bytes (bf16 weights, 8192 rows), made and measured in
one run:

  local      this process's own memory (``local_bytes`` = all of it)
  gpu-lease  CUDA VMM leases from the node's lender on --lender-gpu (``host-lease`` on
             the CPU twin)
  host       the authoritative copy itself: pinned host-NUMA pages the GPU reads in place
  pinned-h2d the comparator: a pinned host-to-device copy of the same bytes (on the CPU:
             ``host-copy``, a copy of them in memory)

Per tier: read bandwidth (an fp32-accumulated sum over the whole span) and a bf16 GEMV
(``x @ W.T``, x one row), each the median of timed launches (CUDA events); --repeats
repeats, the modes in alternating order (benchkit.stats), reported as median (min-max).
Ratios per repeat: GEMV over host pages against the pinned copy, as time
(``gemv_host_over_pinned_h2d_time``, 1.0 = as long) and as speed
(``host_gemv_speed_vs_pinned_h2d``, the issue's target: at least 0.9).

Remap: per chunk size (--chunks), --remap-bytes placed in one lease; each of --rounds
rounds reclaims the lender's capacity (the lease is revoked), waits for the remap, checks
the tensor still equals its source (a kernel right after), restores and refills. Reported
from the broker's notice to the holder's acknowledgement (``Lease.timeline`` "told" to
"acked", on the host's monotonic clock), per GiB, with the placed tensor's remap and the
steps of the evict (sync / unmap / map / access / release): target, median under 10 ms
per GiB.

    python3 scripts/bench_place.py --gpu 0 --lender-gpu 0   # bench/results/place.json + .png
    python3 scripts/bench_place.py --smoke --out /tmp/place_smoke/place.json   # CPU twin

On the CPU (--smoke, or where no GPU is) the same runs over the CPU twin (HostRange, a
host lender as a plain process), tiny sizes, in seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

from benchkit.node import REPO, pyplot
from benchkit.stats import alternating, fmt, spread

from harvestd.sizes import GiB, MiB, format_size, parse_size

ROWS, SMOKE_ROWS = 8192, 256
REMAP_TARGET_MS_PER_GIB = 10.0
GEMV_TARGET = 0.9


def make_timer(device: Any, reps: int, inner: int) -> Callable[[Callable[[], Any]], float]:
    """``timed(fn)``: the median seconds of one ``fn()``: ``reps`` times ``inner`` calls
    back to back, after a warm-up; CUDA events on a GPU, the wall clock on the CPU."""
    import torch

    def timed(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            for _ in range(reps):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(inner):
                    fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                times.append((time.perf_counter() - t0) / inner)
        return statistics.median(times)

    return timed


def weights(nbytes: int, rows: int, device: Any, seed: int = 0) -> Any:
    """Random bf16 weights of ``nbytes``: ``rows`` x the rest."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    cols = nbytes // (2 * rows)
    return torch.randn(rows, cols, generator=gen, device=device, dtype=torch.bfloat16)


def lender_row(node: Any, device: Any, lender_gpu: str) -> dict[str, Any]:
    """The node's lender the placed tensors lease from (``harvestd lenders --json``)."""
    rows = node.lenders()
    if device.type == "cpu":
        return next(l for l in rows if l["backend"] == "host")
    from lender.backends import cuda_driver as cu

    want = lender_gpu if lender_gpu.upper().startswith("GPU-") else cu.device_uuid(int(lender_gpu))
    return next(l for l in rows if l["backend"] == "cuda-vmm" and l["gpu_uuid"] == want)


def bench_tiers(args: argparse.Namespace, client: Any, device: Any) -> dict[str, Any]:
    """Read bandwidth and GEMV per tier and the comparator copy, in alternating order."""
    import torch

    rows = SMOKE_ROWS if args.smoke else ROWS
    source = weights(args.bytes, rows, device)
    nbytes = source.numel() * 2
    x = torch.randn(1, source.shape[1], device=device, dtype=torch.bfloat16)
    lease_tier = "gpu-lease" if device.type == "cuda" else "host-lease"
    copy_mode = "pinned-h2d" if device.type == "cuda" else "host-copy"
    placed: dict[str, Any] = {}
    out: dict[str, Any] = {"bytes": nbytes, "shape": list(source.shape), "tiers": {}}
    made = {
        "local": lambda: client.place(
            source, device=device, chunk_bytes=args.chunk, local_bytes=nbytes, borrow=False
        ),
        lease_tier: lambda: client.place(
            source,
            device=device,
            chunk_bytes=args.chunk,
            lease_bytes=args.lease_bytes,
            refill_s=None,
        ),
        "host": lambda: client.place(source, device=device, chunk_bytes=args.chunk, borrow=False),
    }
    timed = make_timer(device, args.reps, args.inner)
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in [*made, copy_mode]}
    try:
        for tier, make in made.items():
            t0 = time.perf_counter()
            placed[tier] = make()
            out["tiers"][tier] = {
                "place_s": round(time.perf_counter() - t0, 4),
                "tiers": placed[tier].tiers(),
                "equal": bool(torch.equal(placed[tier].tensor, source)),
                "complete": placed[tier].tiers()[tier] == nbytes,
            }
        out["host_location"] = getattr(placed["host"]._space, "host_location", "memfd")
        out["chunk_bytes"] = placed["host"].chunk_bytes  # after the driver's granularity
        src = torch.empty(nbytes, dtype=torch.uint8)
        if device.type == "cuda":
            src = src.pin_memory()
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        for repeat, mode in alternating([*made, copy_mode], args.repeats):
            if mode == copy_mode:
                sec = timed(lambda: dst.copy_(src, non_blocking=True))
                runs[mode].append(
                    {"repeat": repeat, "copy_ms": sec * 1e3, "GBps": nbytes / sec / 1e9}
                )
                continue
            with placed[mode].use() as w:
                read = timed(partial(torch.sum, w, dtype=torch.float32))
                gemv = timed(partial(torch.matmul, x, w.T))
            runs[mode].append(
                {"repeat": repeat, "read_GBps": nbytes / read / 1e9, "gemv_ms": gemv * 1e3}
            )
        for tier in made:
            out["tiers"][tier]["equal_after"] = bool(torch.equal(placed[tier].tensor, source))
            out["tiers"][tier]["read_GBps"] = spread([r["read_GBps"] for r in runs[tier]])
            out["tiers"][tier]["gemv_ms"] = spread([r["gemv_ms"] for r in runs[tier]])
            out["tiers"][tier]["runs"] = runs[tier]
    finally:
        for p in placed.values():
            p.close()
    out["comparator"] = {
        "mode": copy_mode,
        "copy_ms": spread([r["copy_ms"] for r in runs[copy_mode]]),
        "GBps": spread([r["GBps"] for r in runs[copy_mode]]),
        "runs": runs[copy_mode],
    }

    def per_repeat(f: Callable[[int], float]) -> dict[str, Any]:
        return spread([f(i) for i in range(args.repeats)])

    copy, host, lease, local = (runs[m] for m in (copy_mode, "host", lease_tier, "local"))
    out["ratios"] = {
        "gemv_host_over_pinned_h2d_time": per_repeat(
            lambda i: host[i]["gemv_ms"] / copy[i]["copy_ms"]
        ),
        "host_gemv_speed_vs_pinned_h2d": per_repeat(
            lambda i: copy[i]["copy_ms"] / host[i]["gemv_ms"]
        ),
        "host_read_over_pinned_h2d": per_repeat(lambda i: host[i]["read_GBps"] / copy[i]["GBps"]),
        "lease_read_over_local": per_repeat(
            lambda i: lease[i]["read_GBps"] / local[i]["read_GBps"]
        ),
        "gemv_lease_over_local_time": per_repeat(
            lambda i: lease[i]["gemv_ms"] / local[i]["gemv_ms"]
        ),
    }
    out["order"] = [
        [m for r, m in alternating([*made, copy_mode], args.repeats) if r == k]
        for k in range(args.repeats)
    ]
    return out


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _steps(mapping: Any) -> dict[str, float]:
    """The evict's steps in ms (a CUDA range's pages time them), else its whole remap."""
    steps = mapping.steps_ms
    if steps:
        return steps
    remap = getattr(mapping, "fence_ms", None)
    return {"remap": float(remap)} if isinstance(remap, (int, float)) else {}


def _reached(placed: Any, revocations: int) -> bool:
    return bool(placed.revocations >= revocations)


def bench_remap(
    args: argparse.Namespace, client: Any, node: Any, device: Any, chunk: int
) -> dict[str, Any]:
    """--rounds revocations of --remap-bytes placed in one lease with ``chunk``-byte
    chunks: notice to acknowledgement, the placed tensor's remap, the evict's steps."""
    import torch

    lender = lender_row(node, device, args.lender_gpu)
    source = weights(args.remap_bytes, SMOKE_ROWS if args.smoke else ROWS, device, seed=1)
    nbytes = source.numel() * 2
    placed = client.place(
        source, device=device, chunk_bytes=chunk, lease_bytes=nbytes, refill_s=None
    )
    lease_tier = placed._space.lease_tier.value
    rounds: list[dict[str, Any]] = []
    try:
        for r in range(args.rounds):
            if not _wait(lambda: placed.refill() >= 0 and placed.tiers()[lease_tier] == nbytes, 20):
                rounds.append({"round": r, "error": f"not leased: {placed.tiers()}"})
                break
            leases, before = placed.leases(), placed.revocations
            client.reclaim(lender["id"], lender["capacity"])
            done = _wait(partial(_reached, placed, before + len(leases)), 30)
            equal = bool(torch.equal(placed.tensor, source))  # kernels read on at once
            client.restore(lender["id"])
            row: dict[str, Any] = {
                "round": r,
                "leases": len(leases),
                "remapped": done,
                "equal": equal,
            }
            told = [l.timeline.get("told") for l in leases]
            acked = [l.timeline.get("acked") for l in leases]
            if done and None not in told and None not in acked:
                row["told_to_acked_ms"] = (max(acked) - min(told)) * 1e3
            row["remap_ms"] = placed.remap_ms[-len(leases) :] if done else []
            row["steps_ms"] = [_steps(getattr(l, "_mapping", None)) for l in leases]
            rounds.append(row)
    finally:
        placed.close()
    good = [r for r in rounds if "told_to_acked_ms" in r]
    out: dict[str, Any] = {
        "chunk_bytes": chunk,
        "nbytes": nbytes,
        "rounds": rounds,
        "measured": len(good),
        "equal": all(r.get("equal") for r in rounds) and len(good) == args.rounds,
    }
    if good:
        told_acked = [r["told_to_acked_ms"] for r in good]
        out["told_to_acked_ms"] = spread(told_acked)
        out["ms_per_GiB"] = spread([ms * GiB / nbytes for ms in told_acked])
        out["remap_ms"] = spread([sum(r["remap_ms"]) for r in good if r["remap_ms"]] or [0.0])
        steps = [s for r in good for s in r["steps_ms"] if s]
        keys = sorted({k for s in steps for k in s})
        out["steps_median_ms"] = {k: statistics.median(s.get(k, 0.0) for s in steps) for k in keys}
    return out


def run(args: argparse.Namespace, client: Any, node: Any, device: Any) -> dict[str, Any]:
    """Every measurement; the JSON document."""
    import torch

    doc: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "platform": device.type,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "smoke": args.smoke,
        "statistics": {
            "repeats": args.repeats,
            "reps": args.reps,
            "inner": args.inner,
            "rounds": args.rounds,
            "timing": "CUDA events (wall clock on the CPU), median of reps; median (min-max) "
            "over repeats in alternating order; remap: Lease.timeline, host monotonic clock",
        },
    }
    doc["tiers"] = bench_tiers(args, client, device)
    doc["remap"] = [bench_remap(args, client, node, device, c) for c in args.chunks]
    verified = [t["equal"] and t["equal_after"] for t in doc["tiers"]["tiers"].values()]
    doc["verified"] = all(verified) and all(r["equal"] for r in doc["remap"])
    speed = float(doc["tiers"]["ratios"]["host_gemv_speed_vs_pinned_h2d"]["median"])
    doc["targets"] = {
        "host_gemv_speed_vs_pinned_h2d": {
            "target": GEMV_TARGET,
            "median": speed,
            "met": speed >= GEMV_TARGET,
        },
        "remap_ms_per_GiB": {
            str(r["chunk_bytes"]): {
                "target": REMAP_TARGET_MS_PER_GIB,
                "median": r["ms_per_GiB"]["median"] if "ms_per_GiB" in r else None,
                "met": "ms_per_GiB" in r and r["ms_per_GiB"]["median"] < REMAP_TARGET_MS_PER_GIB,
            }
            for r in doc["remap"]
        },
    }
    if device.type != "cuda":
        doc["targets"]["note"] = (
            "the targets are for nvidia-h200; a CPU run only checks the plumbing"
        )
    return doc


def report(doc: dict[str, Any]) -> None:
    """The tables the run ends with."""
    tiers = doc["tiers"]
    print(
        f"\n{doc['device']}: {format_size(tiers['bytes'])} bf16 {tiers['shape']}, host copy in "
        f"{tiers['host_location']}; {doc['statistics']['repeats']} repeats, median (min-max)"
    )
    print(f"{'tier':>12s} {'read GB/s':>24s} {'GEMV ms':>24s} {'place s':>8s}")
    for name, t in tiers["tiers"].items():
        mark = "" if t["complete"] else f"  (partial: {t['tiers']})"
        print(
            f"{name:>12s} {fmt(t['read_GBps']):>24s} {fmt(t['gemv_ms'], digits=3):>24s} "
            f"{t['place_s']:8.2f}{mark}"
        )
    c = tiers["comparator"]
    print(f"{c['mode']:>12s} {fmt(c['GBps']):>24s} {fmt(c['copy_ms'], digits=3):>24s} (copy)")
    for name, r in tiers["ratios"].items():
        print(f"  {name}: {fmt(r, digits=3)}")
    print(
        f"\nremap of placed pages, notice to acknowledgement ({doc['statistics']['rounds']} rounds)"
    )
    head = ("chunk", "bytes", "told->acked ms", "ms per GiB")
    print(f"{head[0]:>8s} {head[1]:>9s} {head[2]:>24s} {head[3]:>24s}  evict steps (median ms)")
    for r in doc["remap"]:
        if "ms_per_GiB" not in r:
            print(f"{format_size(r['chunk_bytes']):>8s} not measured: {r['rounds'][-1:]}")
            continue
        steps = ", ".join(f"{k} {v:.2f}" for k, v in r["steps_median_ms"].items())
        print(
            f"{format_size(r['chunk_bytes']):>8s} {format_size(r['nbytes']):>9s} "
            f"{fmt(r['told_to_acked_ms'], digits=2):>24s} "
            f"{fmt(r['ms_per_GiB'], digits=2):>24s}  {steps}"
        )
    print(f"\ntargets: {json.dumps(doc['targets'])}")
    print(f"values equal throughout: {doc['verified']}")


def plot(doc: dict[str, Any], path: Path) -> None:
    """Read GB/s and GEMV ms per tier (with the comparator copy), remap ms per GiB per
    chunk size; median with min-max bars."""
    plt = pyplot()
    if plt is None:
        return
    tiers = doc["tiers"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    names = [*tiers["tiers"], tiers["comparator"]["mode"]]
    cells = [*tiers["tiers"].values(), tiers["comparator"]]
    for ax, key, title in (
        (axes[0], ("read_GBps", "GBps"), "read GB/s"),
        (axes[1], ("gemv_ms", "copy_ms"), "bf16 GEMV ms (comparator: its copy)"),
    ):
        s = [cell[key[0]] if key[0] in cell else cell[key[1]] for cell in cells]
        med = [float(v["median"]) for v in s]
        err = [
            [m - float(v["min"]) for m, v in zip(med, s, strict=True)],
            [float(v["max"]) - m for m, v in zip(med, s, strict=True)],
        ]
        ax.bar(names, med, yerr=err, capsize=3)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    measured = [r for r in doc["remap"] if "ms_per_GiB" in r]
    med = [float(r["ms_per_GiB"]["median"]) for r in measured]
    err = [
        [m - float(r["ms_per_GiB"]["min"]) for m, r in zip(med, measured, strict=True)],
        [float(r["ms_per_GiB"]["max"]) - m for m, r in zip(med, measured, strict=True)],
    ]
    axes[2].bar([format_size(r["chunk_bytes"]) for r in measured], med, yerr=err, capsize=3)
    if doc["platform"] == "cuda":
        axes[2].axhline(REMAP_TARGET_MS_PER_GIB, color="red", linestyle="--", label="target")
        axes[2].legend()
    axes[2].set_title("revocation, notice to ack: ms per GiB")
    axes[2].set_xlabel("chunk size")
    fig.suptitle(f"placed tensors on {doc['device']} ({format_size(tiers['bytes'])})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="the CPU twin, tiny sizes, seconds")
    parser.add_argument("--gpu", type=int, default=0, help="the GPU the tensors are placed on")
    parser.add_argument(
        "--lender-gpu", default="", help="the lender's GPU (index or UUID; default --gpu)"
    )
    parser.add_argument("--bytes", type=parse_size, default=None, help="each tier's tensor (1GiB)")
    parser.add_argument(
        "--remap-bytes", type=parse_size, default=None, help="revoked each round (1GiB)"
    )
    parser.add_argument("--chunks", default=None, help="chunk sizes for the remap (2MiB,32MiB)")
    parser.add_argument(
        "--chunk", type=parse_size, default=None, help="the tiers' chunk size (2MiB)"
    )
    parser.add_argument(
        "--lease-bytes", type=parse_size, default=256 * MiB, help="the lease tier's lease size"
    )
    parser.add_argument("--rounds", type=int, default=7, help="revocations per chunk size (>= 5)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the tier modes (>= 3)")
    parser.add_argument("--reps", type=int, default=10, help="timed launches per measurement")
    parser.add_argument("--inner", type=int, default=3, help="launches between one pair of events")
    parser.add_argument("--cap", default="8GiB", help="the GPU lender's capacity")
    parser.add_argument("--out", default=str(REPO / "bench/results/place.json"))
    args = parser.parse_args()
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA GPU here: the CPU twin, tiny sizes (as --smoke)")
        args.smoke = True
    if args.smoke:
        if args.out == parser.get_default("out"):  # a smoke run's figures are not results
            args.out = "/tmp/place_smoke/place.json"
        args.bytes = args.bytes or 8 * MiB
        args.remap_bytes = args.remap_bytes or 4 * MiB
        args.chunks = args.chunks or "64KiB,1MiB"
        args.chunk = args.chunk or 64 * 1024
        args.lease_bytes = min(args.lease_bytes, 2 * MiB)
        args.reps, args.inner = min(args.reps, 3), 1
    args.bytes = args.bytes or GiB
    args.remap_bytes = args.remap_bytes or GiB
    args.chunk = args.chunk or 2 * MiB
    args.chunks = [parse_size(c) for c in (args.chunks or "2MiB,32MiB").split(",") if c.strip()]
    args.lender_gpu = args.lender_gpu or str(args.gpu)
    if args.rounds < 5 or args.repeats < 3:
        parser.error("--rounds must be at least 5 and --repeats at least 3")
    if args.smoke:
        from benchkit.multi import plain_host_node

        device = torch.device("cpu")
        node_cm: Any = plain_host_node(lenders=1, host_bytes="64MiB")
    else:
        from benchkit.node import bench_node

        device = torch.device("cuda", args.gpu)
        torch.cuda.set_device(device)
        node_cm = bench_node(backend="cuda-vmm", gpus=args.lender_gpu, cap=args.cap)
    began = time.perf_counter()
    with node_cm as node:
        client = node.connect()
        try:
            doc = run(args, client, node, device)
        finally:
            client.close()
    doc["wall_s"] = round(time.perf_counter() - began, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, out.with_suffix(".png"))
    report(doc)
    print(f"wrote {out} in {doc['wall_s']} s: {'ok' if doc['verified'] else 'VALUES DIFFER'}")
    return 0 if doc["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
