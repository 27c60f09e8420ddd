#!/usr/bin/env python3
"""Tenant reclaim, step by step: HOLDERS processes borrow LENT bytes in all from the
device's lender and read them without pause; then the device's own tenant allocates
until the free memory falls into the lender's reserve. Measured: the time from the
tenant's allocation to the lent memory being free again (NVML; the host device's books
for the CPU twin), and where it went:

- ``notice``: from the start of the tenant's allocation to the lender's watch seeing the
  pressure (``allocate`` is how long the allocation call itself took);
- ``report``: the lender trims its idle pool and tells the broker what it may lend;
- ``tell``: the broker chooses the leases and its REVOKE reaches each holder;
- ``fence``: a holder waits for its reads in flight and cuts its mapping off;
- ``ack``: the holder's acknowledgement reaches the broker;
- ``free``: the lender releases the memory and confirms, the broker answers;
- ``visible``: the device shows the memory free.

Each configuration LENT:HOLDERS runs ROUNDS rounds with the same holder processes (they
borrow again after each round). The lender runs with a peak window of 0: this measures
the reclaim path, not the policy that keeps a tenant's peak out of lending.

    python scripts/bench_reclaim.py --gpu 0 --configs 10GiB:1,10GiB:4,40GiB:16,40GiB:64
    python scripts/bench_reclaim.py --smoke        # the CPU twin (a host device)

Prints a table and writes JSON (bench/results/reclaim_gpu.json) and a plot.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchkit.multi import Worker, write_json
from benchkit.node import REPO, pyplot
from benchkit.tenant import (
    DeviceTenant,
    gpu_uuid,
    lender_node,
    reclaim_traces,
    say,
    wait,
    worker_parser,
)

from harvestd.sizes import GiB, MiB, format_size, parse_size

STEPS = ("allocate", "notice", "report", "tell", "fence", "ack", "free", "visible")


# ---------------------------------------------------------------- worker programs


def holder(args: argparse.Namespace) -> None:
    """``lease NBYTES``: borrow and read until revoked, then say ``done`` with the
    lease's timeline; again for each round."""
    import torch

    from client import LeaseRevoked, connect

    client = connect()
    cuda = args.device.startswith("cuda")
    block, n = 16384, (4096 if cuda else 64)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "exit":
            break
        nbytes = int(cmd[1])
        on_gpu = {"device": args.device, "backend": "cuda-vmm"} if cuda else {}
        for attempt in range(10):
            try:
                lease = client.lease(nbytes, ttl=30, **on_gpu)
                break
            except LeaseRevoked:  # the tenant's last reclaim was still settling
                if attempt == 9:
                    raise
                time.sleep(0.2)
        lease.as_bytes().fill_(5)
        gone = threading.Event()

        def revoked(_lease: Any, _why: str, gone: threading.Event = gone) -> None:
            gone.set()

        lease.on_revoke(revoked)
        out = torch.empty((n, block), dtype=torch.uint8, device=args.device)
        span = nbytes // block
        say(event="leased", id=lease.id)
        moved, wrong, start = 0, 0, time.perf_counter()
        while not gone.is_set():
            offsets = torch.randint(0, span, (n,), device=args.device) * block
            try:
                lease.gather(offsets, block, out)
                if cuda:
                    torch.cuda.synchronize()
            except LeaseRevoked:
                break
            moved += n * block
            if moved % (64 * n * block) == 0:
                wrong += int((out != 5).any())
        elapsed = time.perf_counter() - start
        gone.wait(30)  # a real holder lives on: its fence and acknowledgement free it
        until = time.monotonic() + 5  # the callback may run before the ack is recorded
        while "acked" not in lease.timeline and time.monotonic() < until:
            time.sleep(0.001)
        say(event="done", gbps=moved / elapsed / 1e9, wrong=wrong, timeline=lease.timeline)
    client.close()


def tenant(args: argparse.Namespace) -> None:
    """``press LEAVE LENT``: allocate until only LEAVE bytes are free, then wait until
    LENT more are free again; ``release``."""
    memory = DeviceTenant(args.device, args.host_device)
    if args.device.startswith("cuda"):
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByUUID(args.gpu_uuid)

        def free() -> int:
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
    else:
        from lender.host_device import HostDevice

        device = HostDevice(args.host_device)

        def free() -> int:
            return device.memory()[1]

    free_before = 0
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "exit":
            break
        if cmd[0] == "press":
            leave, lent = int(cmd[1]), int(cmd[2])
            free_before = free()
            began = time.monotonic()
            try:
                memory.take(max(0, free_before - leave))
            except memory.out_of_memory as err:  # the driver says no: report, not hang
                say(event="pressed", error=f"the tenant's allocation failed: {err}")
                continue
            pressed = time.monotonic()
            # Back: all that was lent is free again (to within 1%: other processes' noise).
            # The lender may be done before the allocation returns: the goal is counted
            # from what the tenant left free, not from what it sees after.
            goal = leave + lent * 0.99
            while free() < goal and time.monotonic() - pressed < 30:
                pass
            freed_at = time.monotonic()
            say(
                event="pressed",
                began_at=began,
                pressed_at=pressed,
                freed_at=freed_at,
                freed_s=freed_at - pressed,
                recovered=free() >= goal,
            )
        elif cmd[0] == "release":
            memory.release()
            # Back only once the device shows it all free: a freed allocation leaves the
            # device's books over some milliseconds, and a lender that looks meanwhile sees
            # a tenant still holding it (a reclaim before the next round's press).
            deadline = time.monotonic() + 10
            while free() < free_before - (1 << 30) and time.monotonic() < deadline:
                time.sleep(0.005)
            say(event="released")


# ---------------------------------------------------------------- the driver


def _ms(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values) * 1e3,
        "max": max(values) * 1e3,
    }


def breakdown(press: dict[str, Any], trace: dict[str, Any], done: list[dict]) -> dict[str, Any]:
    """Where one reclaim's time went (see the module doc), in ms; per-holder steps as
    median and max over the holders."""
    start = trace["started_at"]
    told = [d["timeline"]["told"] for d in done if "told" in d["timeline"]]
    fenced = [
        d["timeline"]["fenced"] - d["timeline"]["told"]
        for d in done
        if {"told", "fenced"} <= d["timeline"].keys()
    ]
    acked = [
        d["timeline"]["acked"] - d["timeline"]["fenced"]
        for d in done
        if {"fenced", "acked"} <= d["timeline"].keys()
    ]
    last_ack = max(
        (d["timeline"]["acked"] for d in done if "acked" in d["timeline"]),
        default=start + trace["revoked_s"],
    )
    return {
        "allocate": (press["pressed_at"] - press["began_at"]) * 1e3,
        "notice": (start - press["began_at"]) * 1e3,
        "report": trace["reported_s"] * 1e3,
        "tell": _ms([t - start - trace["reported_s"] for t in told]) if told else None,
        "fence": _ms(fenced) if fenced else None,
        "ack": _ms(acked) if acked else None,
        "free": (start + trace["done_s"] - last_ack) * 1e3,
        "visible": (press["freed_at"] - start - trace["done_s"]) * 1e3,
        "total": (press["freed_at"] - press["began_at"]) * 1e3,
        "after_allocation": press["freed_s"] * 1e3,
        "revoked": trace["revoked"],
    }


def run_config(args: argparse.Namespace, lent: int, holders: int) -> dict[str, Any]:
    """ROUNDS reclaims of ``lent`` bytes from ``holders`` holders, on a fresh node."""
    args.cap = str(lent)
    # The tenant leaves less free than the reserve asks: the whole loan must come back.
    args.reserve = str(lent + args.leave)
    me = [str(Path(__file__).resolve())]
    common = ["--device", args.client_device, "--gpu-uuid", args.gpu_uuid]
    rounds = []
    with lender_node(args, "reclaim") as node:
        common += ["--host-device", args.host_device] if args.smoke else []
        workers = [
            Worker(me + ["--role", "holder", *common], node.env, f"holder {i}")
            for i in range(holders)
        ]
        ten = Worker(me + ["--role", "tenant", *common], node.env, "tenant")
        try:
            for r in range(args.rounds):
                for w in workers:
                    w.send(f"lease {lent // holders}")
                for w in workers:
                    w.expect("leased", 300)
                time.sleep(args.settle)  # holders at full speed
                seen = len(reclaim_traces(node, "reclaim"))
                press = ten.ask(f"press {args.leave} {lent}", "pressed", 120)
                if "error" in press:
                    raise RuntimeError(f"round {r}: {press['error']}")
                done = [w.expect("done", 120) for w in workers]
                wait(lambda seen=seen: len(reclaim_traces(node, "reclaim")) > seen, 30, "the trace")
                trace = reclaim_traces(node, "reclaim")[seen]
                ten.ask("release", "released")
                steps = breakdown(press, trace, done)
                rounds.append(
                    {
                        "round": r,
                        "freed_s": press["freed_s"],
                        "recovered": press["recovered"],
                        "wrong_reads": sum(d["wrong"] for d in done),
                        "holder_gbps": [d["gbps"] for d in done],
                        "steps_ms": steps,
                        "trace": trace,
                    }
                )
                print(
                    f"  {format_size(lent)} / {holders} holders, round {r}: "
                    f"{steps['total']:.1f} ms, wrong reads {rounds[-1]['wrong_reads']} ("
                    + ", ".join(
                        f"{k} {v['median'] if isinstance(v, dict) else v:.1f}"
                        for k, v in steps.items()
                        if k in STEPS and v is not None
                    )
                    + ")",
                    flush=True,
                )
                # The tenant gave its memory back: wait until lending has it again.
                wait(lambda: node.lenders()[0]["capacity"] >= lent, 60, "capacity back")
        finally:
            for w in [*workers, ten]:
                w.close()
    times = [r["freed_s"] for r in rounds]
    totals = [r["steps_ms"]["total"] for r in rounds]
    return {
        "lent": lent,
        "holders": holders,
        "rounds": rounds,
        # From the tenant's allocation returning (as the earlier H100 and H200 figures).
        "freed_ms_median": statistics.median(times) * 1e3,
        "freed_ms_min": min(times) * 1e3,
        "freed_ms_max": max(times) * 1e3,
        # From the start of the tenant's allocation call.
        "total_ms_median": statistics.median(totals),
        "wrong_reads": sum(r["wrong_reads"] for r in rounds),
        "recovered": all(r["recovered"] for r in rounds),
    }


def _plot(rows: list[dict[str, Any]], out: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{format_size(r['lent'])}\n{r['holders']} holders" for r in rows]
    bottom = [0.0] * len(rows)
    for step in STEPS:
        values = []
        for r in rows:
            v = statistics.median(
                (
                    s["steps_ms"][step]["median"]
                    if isinstance(s["steps_ms"][step], dict)
                    else s["steps_ms"][step] or 0.0
                )
                for s in r["rounds"]
            )
            values.append(max(0.0, v))
        ax.bar(labels, values, bottom=bottom, label=step)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("ms (median over rounds; holder steps: median holder)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> int:
    """Run the benchmark (or one of its worker roles)."""
    parser = worker_parser(__doc__)
    parser.add_argument("--gpu-uuid", default="", help="(workers) the lender's GPU")
    parser.add_argument("--configs", default="10GiB:1,10GiB:4,40GiB:16,40GiB:64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--out", default=str(REPO / "bench/results/reclaim_gpu.json"))
    args = parser.parse_args()
    if args.role == "holder":
        holder(args)
        return 0
    if args.role == "tenant":
        tenant(args)
        return 0
    args.peak_window = 0.0
    if args.smoke:
        args.device_bytes, args.leave = "512MiB", 16 * MiB
        args.configs, args.rounds, args.settle = "128MiB:1,128MiB:4", 2, 0.3
        args.client_device, args.gpu_uuid = "cpu", ""
    else:
        args.gpu_uuid = gpu_uuid(args.gpu)
        args.client_device = "cuda:0"
        args.leave = 2 * GiB
    configs = [
        (parse_size(lent), int(holders))
        for lent, holders in (c.split(":") for c in args.configs.split(","))
    ]
    rows: list[dict[str, Any]] = []
    doc: dict[str, Any] = {
        "benchmark": "reclaim",
        "command": " ".join(sys.argv),
        "device": "cpu twin (host device)" if args.smoke else f"GPU {args.gpu_uuid}",
        "host": platform.node(),
        "leave": args.leave,
        "rows": rows,
    }
    for lent, holders in configs:
        rows.append(run_config(args, lent, holders))
        # Written after each configuration: a run cut short keeps what it measured.
        doc["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        out = write_json(doc, args.out)
    print("ms from the tenant's allocation returning (median, min, max), and from its start")
    print(
        f"{'lent':>9} {'holders':>8} {'median':>9} {'min':>8} {'max':>8} {'start':>8} {'wrong':>6}"
    )
    for r in rows:
        print(
            f"{format_size(r['lent']):>9} {r['holders']:>8} {r['freed_ms_median']:>7.1f}ms "
            f"{r['freed_ms_min']:>6.1f}ms {r['freed_ms_max']:>6.1f}ms "
            f"{r['total_ms_median']:>6.1f}ms {r['wrong_reads']:>6}"
        )
    _plot(rows, out.with_suffix(".png"))
    print(f"wrote {out}")
    bad = any(r["wrong_reads"] or not r["recovered"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
