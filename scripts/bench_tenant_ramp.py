#!/usr/bin/env python3
"""The tenant's side of lending: a device's own job ramping its memory up while others
borrow what it left. A holder borrows LENT bytes in LEASE-sized leases and reads them
without pause (checking every read); the tenant then allocates PIECE after PIECE until it
holds TARGET, retrying a failed allocation every millisecond. Per scenario and piece:
failed allocations, time to hold everything, leases revoked, the holder's wrong reads,
and a ``timeline`` on one clock (ms from the ramp's start): when each piece was held,
when each allocation failed, the slowest gap between two pieces, and each of the
lender's reclaims from start to end, so that a run shows what the tenant waited for.

Scenarios (each on a fresh node, so that no earlier peak is remembered unless wanted):

- ``nothing-lent``: the ramp alone (the floor);
- ``into-lent``: the ramp into lent memory, no earlier peak (the tenant that does not
  cooperate: what the lender's watch and the broker's revocations give it);
- ``back-to-peak``: the tenant ramped to TARGET once and let go; the holder borrowed
  what lending then allowed; the ramp back to the same peak;
- ``cooperating``: the ramp through ``client.tenant.Tenant.allocate`` (an allocation that
  fails waits for the lender to make room, then runs again);
- ``room-ahead``: ``Tenant.make_room(TARGET)`` first, then the plain ramp.

The node is a broker and one lender as plain processes (the same Lender class the
daemon runs as a Ray actor), with the default reserve (10%) and peak window (300 s).

    python scripts/bench_tenant_ramp.py                 # GPU 0: LENT 96GiB, TARGET 110GiB
    python scripts/bench_tenant_ramp.py --smoke         # the CPU twin: a 512 MiB host device

Writes bench/results/tenant_ramp.json (and .png).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchkit.multi import Worker, write_json
from benchkit.node import REPO, BenchNode, pyplot
from benchkit.tenant import (
    DeviceTenant,
    gpu_uuid,
    lender_node,
    reclaim_traces,
    say,
    slowest_take_ms,
    wait,
    worker_parser,
)

from harvestd.sizes import MiB, format_size, parse_size

SCENARIOS = ("nothing-lent", "into-lent", "back-to-peak", "cooperating", "room-ahead")


# ---------------------------------------------------------------- worker programs


def holder(args: argparse.Namespace) -> None:
    """Borrow and read without pause: ``lease COUNT SIZE``, ``stats``, ``release``."""
    from client import LeaseRevoked, NoCapacity, connect

    client = connect()
    leases: list[Any] = []
    counts = {"reads": 0, "wrong": 0}
    stop = threading.Event()

    def read() -> None:
        import torch

        chunk = 64 * MiB
        while not stop.is_set():
            live = [(i, l) for i, l in enumerate(leases) if not l.revoked]
            if not live:
                time.sleep(0.001)
            for i, lease in live:
                try:
                    with lease.use(device_work=True):
                        data = lease.as_bytes()[:chunk]
                        lo, hi = int(data.min()), int(data.max())
                        if data.is_cuda:
                            torch.cuda.synchronize(data.device)
                except LeaseRevoked:
                    continue
                counts["reads"] += 1
                counts["wrong"] += int(lo != hi or lo != (i % 250) + 1)

    reader = threading.Thread(target=read, daemon=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "lease":
            count, size = int(cmd[1]), int(cmd[2])
            got = 0
            with contextlib.suppress(NoCapacity):
                for _ in range(count):
                    on_gpu = {"device": args.device} if args.device.startswith("cuda") else {}
                    lease = client.lease(size, ttl=30, **on_gpu)
                    lease.as_bytes().fill_((len(leases) % 250) + 1)
                    leases.append(lease)
                    got += 1
            if not reader.is_alive():
                reader.start()
            say(event="leased", count=got, bytes=got * size)
        elif cmd[0] == "stats":
            revoked = sum(l.revoked for l in leases)
            told = [l.timeline for l in leases if l.timeline]
            say(event="stats", leases=len(leases), revoked=revoked, timelines=told, **counts)
        elif cmd[0] == "release":
            for lease in leases:
                lease.release()
            say(event="released")
        elif cmd[0] == "exit":
            break
    stop.set()
    client.close()


def tenant(args: argparse.Namespace) -> None:
    """The device's own job: ``ramp TARGET PIECE MODE`` (plain | cooperating | room),
    ``free``."""
    memory = DeviceTenant(args.device, args.host_device)
    out_of_memory = memory.out_of_memory
    find: dict[str, Any] = (
        {"device": args.device} if args.device.startswith("cuda") else {"lender": args.lender}
    )
    from client import connect
    from client.tenant import Tenant

    cooperating = Tenant(connect(), **find, timeout=60.0)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "ramp":
            target, piece, mode = int(cmd[1]), int(cmd[2]), cmd[3]
            retries, room_s = 0, 0.0

            def counted(piece: int = piece) -> Any:
                nonlocal retries
                try:
                    return memory.take(piece)
                except out_of_memory:
                    retries += 1
                    raise

            start = time.perf_counter()
            started_at = time.monotonic()  # the clock of the lender's reclaim traces
            deadline = started_at + 60.0
            took_ms: list[float] = []  # when each piece was held, ms from the start
            failed_ms: list[float] = []  # when each allocation failed
            if mode == "room":
                room_s = cooperating.make_room(target).elapsed_s
            while len(memory.blocks) * piece < target and time.monotonic() < deadline:
                try:
                    if mode == "cooperating":  # waits for room itself
                        cooperating.allocate(counted, nbytes=piece)
                    else:
                        memory.take(piece)
                except out_of_memory:
                    failed_ms.append((time.perf_counter() - start) * 1e3)
                    if mode != "cooperating":
                        time.sleep(0.001)  # the plain tenant retries every millisecond
                    continue
                took_ms.append((time.perf_counter() - start) * 1e3)
            seconds = time.perf_counter() - start
            say(
                event="ramped",
                failures=len(failed_ms),
                retries=retries,
                seconds=seconds,
                room_s=room_s,
                held=len(memory.blocks) * piece,
                complete=len(memory.blocks) * piece >= target,
                started_at=started_at,
                took_ms=[round(t, 3) for t in took_ms],
                failed_ms=[round(t, 3) for t in failed_ms],
                slowest_take_ms=slowest_take_ms(took_ms),
            )
        elif cmd[0] == "free":
            memory.release()
            say(event="freed")
        elif cmd[0] == "exit":
            break


# ---------------------------------------------------------------- the driver


def _workers(args: argparse.Namespace, node: BenchNode) -> tuple[Worker, Worker]:
    me = [str(Path(__file__).resolve())]
    common = ["--device", args.client_device]
    if args.smoke:
        common += ["--host-device", args.host_device, "--lender", "ramp"]
    hold = Worker(me + ["--role", "holder", *common], node.env, "holder")
    ten = Worker(me + ["--role", "tenant", *common], node.env, "tenant")
    return hold, ten


def run_scenario(args: argparse.Namespace, scenario: str, piece: int) -> dict[str, Any]:
    """One scenario on a fresh node; its row."""
    lease, lent, target = (parse_size(x) for x in (args.lease, args.lent, args.target))
    with lender_node(args, "ramp") as node:
        hold, ten = _workers(args, node)
        try:
            row: dict[str, Any] = {"scenario": scenario, "piece": piece, "target": target}
            if scenario == "back-to-peak":
                first = ten.ask(f"ramp {target} {piece} plain", "ramped", 120)
                row["first_ramp"] = first
                time.sleep(0.2)  # a tenant holds its peak a while (a step, a batch)
                ten.ask("free", "freed")
                # The lender's next reports carry the tenant's drop (and its peak).
                wait(lambda: node.lenders()[0]["tenant"] < target // 2, 30, "the drop")
            borrowed = {"count": 0, "bytes": 0}
            if scenario != "nothing-lent":
                borrowed = hold.ask(f"lease {lent // lease} {lease}", "leased", 300)
                time.sleep(args.settle)  # the holder reads at full speed
            row["borrowed"] = borrowed["bytes"]
            row["lendable_before"] = node.lenders()[0]["capacity"]
            mode = {"cooperating": "cooperating", "room-ahead": "room"}.get(scenario, "plain")
            ramp = ten.ask(f"ramp {target} {piece} {mode}", "ramped", 120)
            time.sleep(0.5)  # reads go on past the ramp
            stats = hold.ask("stats", "stats") if borrowed["count"] else {}
            reclaims = reclaim_traces(node, "ramp")
            row.update(
                failures=ramp["failures"],
                oom_retries=ramp["retries"],
                seconds=ramp["seconds"],
                room_s=ramp["room_s"],
                complete=ramp["complete"],
                timeline=_timeline(ramp, reclaims),
                revoked=stats.get("revoked", 0),
                wrong_reads=stats.get("wrong", 0),
                reads=stats.get("reads", 0),
                reclaims=reclaims,
            )
            return row
        finally:
            hold.close()
            ten.close()


def _timeline(ramp: dict[str, Any], reclaims: list[dict[str, Any]]) -> dict[str, Any]:
    """The ramp and the lender's reclaims on one clock (ms from the ramp's start; both
    sides read the host's monotonic clock): each piece held, each failure, each reclaim's
    start and end, so that a reader sees what the tenant waited for."""
    t0 = ramp["started_at"]
    return {
        "took_ms": ramp["took_ms"],
        "failed_ms": ramp["failed_ms"],
        "slowest_take_ms": ramp["slowest_take_ms"],
        "reclaims_ms": [
            {
                "why": r.get("why"),
                "start": round((r["started_at"] - t0) * 1e3, 3),
                "done": round((r["started_at"] + r.get("done_s", 0.0) - t0) * 1e3, 3),
                "revoked": r.get("revoked", 0),
            }
            for r in reclaims
            if "started_at" in r
        ],
    }


def _print(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'scenario':14} {'piece':>9} {'failed':>7} {'hold all':>10} "
        f"{'revoked':>8} {'wrong':>6} {'reclaims':>9}"
    )
    for r in rows:
        print(
            f"{r['scenario']:14} {format_size(r['piece']):>9} {r['failures']:>7} "
            f"{r['seconds'] * 1e3:>8.1f}ms {r['revoked']:>8} {r['wrong_reads']:>6} "
            f"{len(r['reclaims']):>9}" + ("" if r["complete"] else "  (incomplete)")
        )


def _plot(rows: list[dict[str, Any]], out: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    labels = [f"{r['scenario']}\n{format_size(r['piece'])}" for r in rows]
    axes[0].bar(labels, [r["seconds"] * 1e3 for r in rows])
    axes[0].set_ylabel("time to hold everything (ms)")
    axes[1].bar(labels, [r["failures"] for r in rows], color="tab:red")
    axes[1].set_ylabel("failed allocations")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7, rotation=45)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> int:
    """Run the benchmark (or one of its worker roles)."""
    parser = worker_parser(__doc__)
    parser.add_argument("--lender", default="", help="(workers, --smoke) the lender's id")
    parser.add_argument("--lent", default="96GiB")
    parser.add_argument("--lease", default="4GiB")
    parser.add_argument("--target", default="110GiB")
    parser.add_argument("--pieces", default="2GiB,64MiB")
    parser.add_argument("--reserve", default="10%")
    parser.add_argument("--peak-window", type=float, default=300.0)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--out", default=str(REPO / "bench/results/tenant_ramp.json"))
    args = parser.parse_args()
    if args.role == "holder":
        holder(args)
        return 0
    if args.role == "tenant":
        tenant(args)
        return 0
    if args.smoke:
        args.device_bytes = "512MiB"
        args.lent, args.lease, args.target, args.pieces = "384MiB", "32MiB", "400MiB", "32MiB,4MiB"
        args.client_device = "cpu"
        args.settle = 0.3
    else:
        args.gpu_uuid = gpu_uuid(args.gpu)
        args.client_device = "cuda:0"
    rows = []
    for scenario in args.scenarios.split(","):
        for piece in (parse_size(p) for p in args.pieces.split(",")):
            print(f"{scenario} with {format_size(piece)} pieces ...", flush=True)
            rows.append(run_scenario(args, scenario, piece))
    _print(rows)
    into = [t for r in rows if r["scenario"] == "into-lent" for t in r["reclaims"]]
    doc = {
        "benchmark": "tenant_ramp",
        "host": platform.node(),
        "device": "cpu twin (host device)" if args.smoke else f"GPU {args.gpu_uuid}",
        "settings": {
            k: getattr(args, k)
            for k in ("lent", "lease", "target", "pieces", "reserve", "peak_window", "smoke")
        },
        "rows": rows,
        "slowest_reclaim_into_lent_s": max((t["done_s"] for t in into), default=None),
    }
    out = write_json(doc, args.out)
    _plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}")
    harvest_wrong = sum(r["wrong_reads"] for r in rows)
    incomplete = [r for r in rows if not r["complete"]]
    return 1 if harvest_wrong or incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
