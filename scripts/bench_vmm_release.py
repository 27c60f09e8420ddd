#!/usr/bin/env python3
"""Where a reclaim's time goes inside the CUDA driver: the VMM calls that give lent memory
back, timed one by one, with the lender and a holder as two processes on one GPU.

A lender process makes COUNT allocations of SIZE (``cuMemCreate``, mapped and zeroed as
the lender does), exports each as a POSIX fd and hands them to a holder process, which
imports and maps them. Then, per ordering, the memory is given back and each driver call
is timed; ``visible`` is when NVML shows the GPU's free memory back where it was:

- ``holder-then-lender``: the holder fences each (sync, unmap, release), then the lender
  frees each (unmap, address free, release): what a reclaim does today;
- ``holder-then-lender-threads``: the same with 8 threads on each side;
- ``lender-released-first``: the lender releases its handles first (the pages stay while
  the holder maps them), then the holder fences: the pages go with the holder's release;
- ``lender-unmapped-early``: the lender unmapped its own view right after zeroing; at the
  reclaim it only releases its handle, after the holder's fence.

    python3 scripts/bench_vmm_release.py --gpu 0 --count 24 --size 4GiB

Needs a GPU (CUDA VMM with POSIX fds, NVML): without one it exits 2 and says so (it has
no CPU twin: it measures the driver itself). Writes bench/results/vmm_release.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchkit.driver import fork, holder, lend, no_gpu, nvml_free, recv, send, timed, wait_visible
from benchkit.multi import write_json
from benchkit.node import REPO

from harvestd.sizes import GiB, format_size, parse_size

ORDERINGS = (
    "holder-then-lender",
    "holder-then-lender-threads",
    "lender-released-first",
    "lender-unmapped-early",
)


def lender(sock: socket.socket, args: argparse.Namespace) -> dict[str, Any]:
    """Run each ordering on fresh allocations; return the timings."""
    import pynvml

    from lender.backends import cuda_driver as cu

    pynvml.nvmlInit()
    drv = cu.driver()
    ordinal = args.gpu
    reader = sock.makefile("r")
    rows = []
    with cu.on_device(ordinal):
        cu.check(drv.cuCtxSynchronize(), "sync")
        for rnd in range(args.rounds):
            for ordering in ORDERINGS:
                free_before = nvml_free(ordinal)
                allocs, setup = lend(drv, ordinal, args.count, args.size)
                send(sock, {"cmd": "map", "size": args.size}, [a[2] for a in allocs])
                for a in allocs:
                    os.close(a[2])
                imported_ms = recv(reader)["ms"]
                early: list[float] = []
                if ordering == "lender-unmapped-early":
                    for a in allocs:
                        early.append(timed(drv.cuMemUnmap, a[1], args.size))
                        drv.cuMemAddressFree(a[1], args.size)
                        a[1] = None
                time.sleep(0.2)
                lender_steps: dict[str, list[float]] = {
                    "unmap": [],
                    "address_free": [],
                    "release": [],
                }

                def free(a: list[Any], lender_steps: dict[str, list[float]] = lender_steps) -> None:
                    with cu.on_device(ordinal):
                        if a[1] is not None:
                            lender_steps["unmap"].append(timed(drv.cuMemUnmap, a[1], args.size))
                            lender_steps["address_free"].append(
                                timed(drv.cuMemAddressFree, a[1], args.size)
                            )
                        lender_steps["release"].append(timed(drv.cuMemRelease, a[0]))

                threads = 8 if ordering.endswith("threads") else 1
                start = time.monotonic()
                lender_wall = 0.0
                if ordering == "lender-released-first":
                    t0 = time.perf_counter()
                    for a in allocs:
                        free(a)
                    lender_wall = (time.perf_counter() - t0) * 1e3
                send(sock, {"cmd": "fence", "threads": threads})
                fenced = recv(reader)
                if ordering != "lender-released-first":
                    t0 = time.perf_counter()
                    if threads > 1:
                        with ThreadPoolExecutor(threads) as pool:
                            list(pool.map(free, allocs))
                    else:
                        for a in allocs:
                            free(a)
                    lender_wall = (time.perf_counter() - t0) * 1e3
                visible = wait_visible(ordinal, free_before, slack=args.size // 2)
                row = {
                    "round": rnd,
                    "ordering": ordering,
                    "count": args.count,
                    "size": args.size,
                    "setup_ms_median": {k: statistics.median(v) for k, v in setup.items()},
                    "import_and_map_ms": imported_ms,
                    "lender_early_unmap_ms": sum(early),
                    "holder_wall_ms": fenced["wall_ms"],
                    "holder_steps_ms": {k: _summary(v) for k, v in fenced["steps"].items()},
                    "lender_wall_ms": lender_wall,
                    "lender_steps_ms": {k: _summary(v) for k, v in lender_steps.items() if v},
                    "total_to_visible_ms": (visible - start) * 1e3,
                }
                rows.append(row)
                print(
                    f"{rnd} {ordering:28s} holder {fenced['wall_ms']:7.1f} ms "
                    f"(unmap {row['holder_steps_ms']['unmap']['median']:.2f}, release "
                    f"{row['holder_steps_ms']['release']['median']:.2f} median/call)  lender "
                    f"{lender_wall:7.1f} ms {json.dumps(row['lender_steps_ms'])}  "
                    f"visible {row['total_to_visible_ms']:7.1f} ms",
                    flush=True,
                )
    send(sock, {"cmd": "quit"})
    return {"rows": rows}


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "max": max(values),
        "sum": sum(values),
        "n": len(values),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--size", type=parse_size, default=4 * GiB)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench/results/vmm_release.json"))
    args = parser.parse_args()
    if no_gpu("bench_vmm_release", args.gpu):
        return 2
    ours, pid = fork(holder, args.gpu)  # before this process touches CUDA
    doc = {
        "benchmark": "vmm_release",
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "count": args.count,
        "size": format_size(args.size),
        **lender(ours, args),
    }
    os.waitpid(pid, 0)
    print("wrote", write_json(doc, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
