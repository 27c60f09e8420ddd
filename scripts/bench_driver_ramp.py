#!/usr/bin/env python3
"""The tenant's floor: how fast a device's own job can ramp into memory that another
process gives back, with nothing of Harvest in the way (no notice, no broker, no message:
the lender and a holder release the moment the tenant starts, or before it).

A lender process makes COUNT allocations of SIZE (``cuMemCreate``, mapped, zeroed,
exported as POSIX fds, as Harvest's lender does) and a holder process maps them; a tenant
process allocates PIECE after PIECE with torch until it holds TARGET, retrying a failed
allocation every millisecond (``bench_tenant_ramp``'s tenant, without Harvest).
Scenarios, each round:

- ``nothing-lent``: the ramp alone;
- ``after-release``: the holder and the lender release everything, NVML shows it free,
  then the ramp (what taking memory another process just gave back costs);
- ``after-release-settled``: the same, with a second's pause before the ramp;
- ``during-release``: the ramp and the release start together (holder first, then the
  lender, as a reclaim does): what a reclaim that knew the tenant's plan at once would
  give it. Its time to hold TARGET is the floor under ``bench_tenant_ramp``'s
  ``into-lent`` row.

    python3 scripts/bench_driver_ramp.py --gpu 0      # 24 x 4 GiB lent, TARGET 110 GiB

Needs a GPU (no CPU twin: it measures the driver): without one it exits 2 and says so.
Writes bench/results/driver_ramp.json.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from typing import Any

from benchkit.driver import fork, holder, lend, no_gpu, nvml_free, recv, send, wait_visible
from benchkit.multi import write_json
from benchkit.node import REPO
from benchkit.tenant import slowest_take_ms

from harvestd.sizes import GiB, format_size, parse_size

SCENARIOS = ("nothing-lent", "after-release", "after-release-settled", "during-release")


def tenant(sock: socket.socket, ordinal: int) -> None:
    """The device's own job: ``ramp`` (target, piece) until it holds target, retrying a
    failed allocation every millisecond; ``free``; ``quit``."""
    import torch

    device = torch.device("cuda", ordinal)
    torch.zeros(1, device=device)  # our context first
    reader = sock.makefile("r")
    blocks: list[Any] = []
    while True:
        doc = recv(reader)
        if doc["cmd"] == "quit":
            return
        if doc["cmd"] == "free":
            blocks.clear()
            torch.cuda.empty_cache()
            send(sock, {"ok": True})
            continue
        target, piece = doc["target"], doc["piece"]
        start = time.monotonic()
        deadline = start + doc.get("timeout_s", 20.0)
        took: list[float] = []
        failed: list[float] = []
        while len(blocks) * piece < target and time.monotonic() < deadline:
            try:
                blocks.append(torch.empty(piece, dtype=torch.uint8, device=device))
                torch.cuda.synchronize(device)
            except torch.OutOfMemoryError:
                failed.append(time.monotonic())
                time.sleep(0.001)
                continue
            took.append(time.monotonic())
        send(
            sock,
            {
                "start": start,
                "took": took,
                "failed": failed,
                "complete": len(blocks) * piece >= target,
            },
        )


def _release(drv: Any, allocs: list[list[Any]], size: int) -> list[float]:
    """The lender's side of giving memory back: unmap, free the range, release; the
    monotonic time each allocation's release returned."""
    ended = []
    for handle, va, _fd in allocs:
        drv.cuMemUnmap(va, size)
        drv.cuMemAddressFree(va, size)
        drv.cuMemRelease(handle)
        ended.append(time.monotonic())
    return ended


def _row(scenario: str, rnd: int, ramp: dict[str, Any], released: list[float]) -> dict:
    start = ramp["start"]

    def ms(t: float) -> float:
        return round((t - start) * 1e3, 3)

    took = [ms(t) for t in ramp["took"]]
    return {
        "scenario": scenario,
        "round": rnd,
        "complete": ramp["complete"],
        "hold_ms": took[-1] if took else float("nan"),
        "failures": len(ramp["failed"]),
        "slowest_take_ms": slowest_take_ms(took),
        "took_ms": took,
        "failed_ms": [ms(t) for t in ramp["failed"]],
        "released_ms": [ms(t) for t in released],  # each release returned (during-release)
    }


def run(args: argparse.Namespace, hold: socket.socket, ten: socket.socket) -> list[dict]:
    """Every scenario, ``args.rounds`` times; returns the rows."""
    import pynvml

    from lender.backends import cuda_driver as cu

    pynvml.nvmlInit()
    drv = cu.driver()
    ordinal = args.gpu
    held_by, ten_by = hold.makefile("r"), ten.makefile("r")
    ramp_cmd = {"cmd": "ramp", "target": args.target, "piece": args.piece}
    rows = []
    with cu.on_device(ordinal):
        cu.check(drv.cuCtxSynchronize(), "sync")
        for rnd in range(args.rounds):
            for scenario in SCENARIOS:
                free_before = nvml_free(ordinal)
                released: list[float] = []
                if scenario == "nothing-lent":
                    send(ten, ramp_cmd)
                    ramp = recv(ten_by)
                else:
                    allocs, _setup = lend(drv, ordinal, args.count, args.size)
                    send(hold, {"cmd": "map", "size": args.size}, [a[2] for a in allocs])
                    for a in allocs:
                        os.close(a[2])
                    recv(held_by)
                    time.sleep(0.2)
                    if scenario == "during-release":
                        send(ten, ramp_cmd)  # the ramp and the reclaim start together
                    send(hold, {"cmd": "fence", "threads": 1})
                    recv(held_by)
                    released = _release(drv, allocs, args.size)
                    if scenario != "during-release":
                        wait_visible(ordinal, free_before, slack=args.size // 2)
                        if scenario == "after-release-settled":
                            time.sleep(1.0)
                        send(ten, ramp_cmd)
                    ramp = recv(ten_by)
                row = _row(scenario, rnd, ramp, released)
                rows.append(row)
                print(
                    f"{rnd} {scenario:22s} hold {format_size(args.target)} in "
                    f"{row['hold_ms']:7.1f} ms, {row['failures']} failed, slowest piece "
                    f"{row['slowest_take_ms']:.1f} ms"
                    + (f", last release at {row['released_ms'][-1]:.1f} ms" if released else ""),
                    flush=True,
                )
                send(ten, {"cmd": "free"})
                recv(ten_by)
                wait_visible(ordinal, free_before, slack=args.size // 2)
                # Memory freed moments ago is slow to allocate (what this measures): the
                # next scenario starts from memory that has settled.
                time.sleep(args.settle)
    return rows


def _medians(rows: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for scenario in SCENARIOS:
        mine = [r for r in rows if r["scenario"] == scenario]
        if mine:
            out[scenario] = {
                "hold_ms_median": statistics.median(r["hold_ms"] for r in mine),
                "hold_ms_min": min(r["hold_ms"] for r in mine),
                "hold_ms_max": max(r["hold_ms"] for r in mine),
                "failures_median": statistics.median(r["failures"] for r in mine),
            }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--count", type=int, default=24, help="allocations lent")
    parser.add_argument("--size", type=parse_size, default=4 * GiB, help="each allocation")
    parser.add_argument("--target", type=parse_size, default=110 * GiB, help="the tenant's")
    parser.add_argument("--piece", type=parse_size, default=2 * GiB, help="each of its allocations")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds between scenarios (memory settles)"
    )
    parser.add_argument("--out", default=str(REPO / "bench/results/driver_ramp.json"))
    args = parser.parse_args()
    if no_gpu("bench_driver_ramp", args.gpu):
        return 2
    hold, hold_pid = fork(holder, args.gpu)  # both before this process touches CUDA
    ten, ten_pid = fork(tenant, args.gpu)
    rows = run(args, hold, ten)
    for sock in (hold, ten):
        send(sock, {"cmd": "quit"})
    for pid in (hold_pid, ten_pid):
        os.waitpid(pid, 0)
    summary = _medians(rows)
    doc = {
        "benchmark": "driver_ramp",
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "lent": f"{args.count} x {format_size(args.size)}",
        "target": format_size(args.target),
        "piece": format_size(args.piece),
        "settle_s": args.settle,
        "summary": summary,
        "rows": rows,
    }
    print("wrote", write_json(doc, args.out))
    for scenario, m in summary.items():
        print(
            f"{scenario:22s} median {m['hold_ms_median']:7.1f} ms "
            f"({m['hold_ms_min']:.1f}-{m['hold_ms_max']:.1f}), failures {m['failures_median']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
