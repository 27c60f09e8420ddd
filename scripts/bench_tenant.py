#!/usr/bin/env python3
"""The tenant's side of lending (issue 9) and contention over many GPUs (issue 10): a
compute-heavy tenant (large bf16 matmuls) on each --tenant-gpus GPU, timed alone, while
borrower processes read that GPU's lent memory at full speed through real leases, and
alone again; its slowdown is contended / mean(alone before, alone after) - 1 (target:
at most 5%). Then, with --reclaim (the default with two tenants or more), the first
tenant allocates until its GPU's free memory falls into the lender's reserve while the
borrowers keep reading: the time until the lent memory is free again (NVML, as
scripts/bench_reclaim.py measures it), which borrowers were revoked (those of that
lender), and how fast the others kept reading.

Borrowers run on --borrower-gpus (default: the GPUs without a tenant; on one GPU, the
tenant's own, which the result flags: the target is for peers); borrower j reads the
lender of tenant j mod T. The node is started with scripts/benchkit/node.py (a lender on
every tenant GPU).

    python scripts/bench_tenant.py --tenant-gpus 1                       # issue 9 (x2)
    python scripts/bench_tenant.py --tenant-gpus 4,5,6,7 --borrower-gpus 0,1,2,3   # x8
    python scripts/bench_tenant.py --smoke                               # CPU, host lenders
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchkit.multi import READER, Worker, cuda_uuids, lender_of, plain_host_node, write_json
from benchkit.node import REPO, pyplot

from harvestd.sizes import GiB, MiB, parse_size

TARGET = 0.05


# ---------------------------------------------------------------- the tenant process


def tenant(args: argparse.Namespace) -> int:
    """Serve `run SECONDS`, `press LEAVE LENT`, `unpress`, `exit` on stdin."""
    import json

    import torch

    def say(**msg: Any) -> None:
        print(json.dumps(msg), flush=True)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    n = args.matrix if cuda else min(args.matrix, 256)
    dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    c = torch.empty(n, n, device=device, dtype=dtype)
    grab = None
    chunk = 10

    def timed_chunk() -> float:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(chunk):
                torch.matmul(a, b, out=c)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / chunk
        began = time.perf_counter()
        for _ in range(chunk):
            torch.matmul(a, b, out=c)
        return (time.perf_counter() - began) * 1e3 / chunk

    for _ in range(5):
        timed_chunk()
    say(event="ready", n=n, dtype=str(dtype))
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "run":
            end, ms = time.monotonic() + float(cmd[1]), []
            while time.monotonic() < end:
                ms.append(timed_chunk())
            med = statistics.median(ms)
            say(
                event="ran",
                ms_median=med,
                ms_mean=statistics.fmean(ms),
                chunks=len(ms),
                tflops=2 * n**3 / (med / 1e3) / 1e12,
            )
        elif cmd[0] == "press":
            import pynvml

            leave, lent = int(cmd[1]), int(cmd[2])
            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByUUID(args.uuid)
            free = lambda h=h: pynvml.nvmlDeviceGetMemoryInfo(h).free  # noqa: E731
            grab = torch.empty(max(0, free() - leave), dtype=torch.uint8, device=device)
            torch.cuda.synchronize(device)
            pressed, low = time.perf_counter(), free()
            while free() < low + lent * 0.99 and time.perf_counter() - pressed < 30:
                pass
            freed = time.perf_counter() - pressed
            say(
                event="pressed",
                freed_s=freed,
                free_at_pressure=low,
                recovered=free() >= low + lent * 0.99,
            )
        elif cmd[0] == "unpress":
            grab = None
            torch.cuda.empty_cache()
            say(event="unpressed")
        elif cmd[0] == "exit":
            break
    del grab
    return 0


# ---------------------------------------------------------------- the benchmark


def _all(workers: list[Worker], line: str, event: str, timeout: float) -> list[dict[str, Any]]:
    for w in workers:
        w.send(line)
    return [w.expect(event, timeout) for w in workers]


def run(args: argparse.Namespace, node: Any, uuids: list[str], doc: dict[str, Any]) -> None:
    """Every phase, with the node up."""
    lenders = node.lenders()
    if args.smoke:
        ids = [l["id"] for l in lenders][: len(args.tenant_gpus)]
        tenant_devices = ["cpu"] * len(ids)
    else:
        ids = [lender_of(lenders, uuids[g]) for g in args.tenant_gpus]
        tenant_devices = [f"cuda:{g}" for g in args.tenant_gpus]
    tenants = [
        Worker(
            [
                __file__,
                "--tenant",
                "--device",
                d,
                "--uuid",
                uuids[g] if not args.smoke else "",
                "--matrix",
                str(args.matrix),
            ],
            node.env,
            f"tenant {d}",
        )
        for d, g in zip(tenant_devices, args.tenant_gpus, strict=True)
    ]
    readers = [
        Worker([READER, "--device", d], node.env, f"reader {d}") for d in args.reader_devices
    ]
    try:
        for w in tenants:
            w.expect("ready", timeout=300)
        for j, w in enumerate(readers):
            w.expect("hello", timeout=300)
            leased = w.ask(f"lease single {ids[j % len(ids)]} {args.lease_bytes}", "leased")
            doc["readers"].append(
                {"device": args.reader_devices[j], "lender": leased["lenders"][0]}
            )
        seconds, slack = args.seconds, args.seconds + 120
        alone1 = _all(tenants, f"run {seconds}", "ran", slack)
        _all(readers, "go", "going", 60)
        time.sleep(1.0)  # the readers at full speed
        contended = _all(tenants, f"run {seconds}", "ran", slack)
        reads = _all(readers, "pause", "paused", 120)
        alone2 = _all(tenants, f"run {seconds}", "ran", slack)
        for i, lender in enumerate(ids):
            base = (alone1[i]["ms_median"] + alone2[i]["ms_median"]) / 2
            slowdown = contended[i]["ms_median"] / base - 1
            row = {
                "device": tenant_devices[i],
                "lender": lender,
                "alone_ms": base,
                "alone_before_ms": alone1[i]["ms_median"],
                "alone_after_ms": alone2[i]["ms_median"],
                "contended_ms": contended[i]["ms_median"],
                "tflops_alone": (alone1[i]["tflops"] + alone2[i]["tflops"]) / 2,
                "slowdown": round(slowdown, 4),
                "read_gbps": sum(
                    r["gbps"] for j, r in enumerate(reads) if doc["readers"][j]["lender"] == lender
                ),
                "met": slowdown <= TARGET,
            }
            doc["tenants"].append(row)
            print(
                f"tenant {row['device']}: alone {base:.3f} ms/matmul, with borrowers "
                f"{row['contended_ms']:.3f} ms: slowdown {slowdown * 100:+.2f}% "
                f"(target <= {TARGET * 100:.0f}%) while they read {row['read_gbps']:.1f} "
                f"GB/s of its memory",
                flush=True,
            )
        doc["wrong_reads"] = sum(r["wrong"] for r in reads)
        if args.reclaim:
            doc["reclaim"] = reclaim(args, node, tenants[0], readers, ids, reads, doc)
    finally:
        for w in tenants + readers:
            w.close()


def reclaim(
    args: argparse.Namespace,
    node: Any,
    first: Worker,
    readers: list[Worker],
    ids: list[str],
    before: list[dict[str, Any]],
    doc: dict[str, Any],
) -> dict[str, Any]:
    """The first tenant presses on its GPU while every reader reads."""
    mine = [j for j, r in enumerate(doc["readers"]) if r["lender"] == ids[0]]
    lent = len(mine) * args.lease_bytes
    _all(readers, "go", "going", 60)
    time.sleep(1.0)
    if args.smoke:  # no NVML on a CPU: the tenant takes it all back, as `harvestd reclaim`
        capacity = next(l["capacity"] for l in node.lenders() if l["id"] == ids[0])
        with node.connect() as client:
            result = client.reclaim(ids[0], capacity)
            client.restore(ids[0])
        pressed = {"freed_s": result.elapsed_s, "recovered": result.freed}
    else:
        pressed = first.ask(f"press {2 * GiB} {lent}", "pressed", 120)
    time.sleep(1.0)  # the others go on reading after the reclaim, too
    during = _all(readers, "pause", "paused", 120)
    if not args.smoke:
        first.ask("unpress", "unpressed", 60)
    others = [j for j in range(len(readers)) if j not in mine]
    out = {
        "lender": ids[0],
        "lent_bytes": lent,
        "freed_ms": pressed["freed_s"] * 1e3,
        "recovered": pressed["recovered"],
        "revoked_readers_of_it": sum(during[j]["revoked"] for j in mine),
        "readers_of_it": len(mine),
        "others_revoked": sum(during[j]["revoked"] for j in others),
        "others_gbps_before": sum(before[j]["gbps"] for j in others),
        "others_gbps_during": sum(during[j]["gbps"] for j in others),
        "wrong_reads": sum(r["wrong"] for r in during),
    }
    print(
        f"reclaim on {ids[0]} under pressure: {out['freed_ms']:.1f} ms to free "
        f"{lent // MiB} MiB (recovered {out['recovered']}); its readers revoked "
        f"{out['revoked_readers_of_it']}/{len(mine)}; the others revoked "
        f"{out['others_revoked']}, read {out['others_gbps_during']:.1f} GB/s "
        f"(before: {out['others_gbps_before']:.1f})",
        flush=True,
    )
    return out


def plot(doc: dict[str, Any], path: Path) -> None:
    """Each tenant's time per matmul alone and with borrowers."""
    plt = pyplot()
    if plt is None or not doc["tenants"]:
        return
    rows = doc["tenants"]
    fig, ax = plt.subplots(figsize=(max(4, 1.5 * len(rows) + 2), 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["alone_ms"] for r in rows], 0.4, label="alone")
    ax.bar([i + 0.2 for i in x], [r["contended_ms"] for r in rows], 0.4, label="borrowers read")
    ax.set_xticks(list(x), [f"{r['device']}\n{r['slowdown'] * 100:+.1f}%" for r in rows])
    ax.set_ylabel("ms per matmul")
    ax.legend()
    ax.set_title(f"{doc['device']}: tenant slowdown while its memory is read")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments; be a tenant, or run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenant-gpus", default="1", help="CUDA ordinals: tenant + lender")
    parser.add_argument("--borrower-gpus", default="", help="default: the other GPUs")
    parser.add_argument("--borrowers", type=int, default=0, help="default: max of the two")
    parser.add_argument("--matrix", type=int, default=8192, help="bf16 n x n matmuls")
    parser.add_argument("--seconds", type=float, default=6.0, help="per phase")
    parser.add_argument("--lease-bytes", default="4GiB", help="each borrower's lease")
    parser.add_argument("--cap", default="", help="default: what the borrowers need")
    parser.add_argument("--reserve", default="", help="default: that plus 4 GiB")
    parser.add_argument("--reclaim", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--smoke", action="store_true", help="CPU: host lenders, small")
    parser.add_argument("--out", default=str(REPO / "bench/results/tenant.json"))
    parser.add_argument("--tenant", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda:0", help=argparse.SUPPRESS)
    parser.add_argument("--uuid", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tenant:
        return tenant(args)
    if args.smoke:
        args.tenant_gpus, args.lease_bytes = "0,1", "16MiB"
        args.seconds = min(args.seconds, 1.0)
        if args.out == parser.get_default("out"):
            args.out = "/tmp/tenant_smoke.json"
    args.lease_bytes = parse_size(args.lease_bytes)
    args.tenant_gpus = [int(g) for g in args.tenant_gpus.split(",")]
    uuids = [] if args.smoke else cuda_uuids()
    if not args.smoke:
        if not uuids:
            print("no CUDA GPU here: nothing to measure (try --smoke)")
            return 2
        missing = [g for g in args.tenant_gpus if g >= len(uuids)]
        if missing:
            print(
                f"tenant GPUs {missing} not here ({len(uuids)} GPUs): using GPU "
                f"{len(uuids) - 1} alone"
            )
            args.tenant_gpus = [len(uuids) - 1]
    borrower = (
        [int(g) for g in args.borrower_gpus.split(",")]
        if args.borrower_gpus
        else [g for g in range(len(uuids)) if g not in args.tenant_gpus] or list(args.tenant_gpus)
    )
    count = args.borrowers or max(len(borrower), len(args.tenant_gpus))
    args.reader_devices = (
        ["cpu"] * count
        if args.smoke
        else [f"cuda:{borrower[j % len(borrower)]}" for j in range(count)]
    )
    per_lender = -(-count // len(args.tenant_gpus))
    if args.reclaim is None:
        args.reclaim = len(args.tenant_gpus) >= 2
    import torch

    same = not args.smoke and bool(set(borrower) & set(args.tenant_gpus))
    doc: dict[str, Any] = {
        "benchmark": "tenant",
        "command": " ".join(["python"] + sys.argv),
        "device": torch.cuda.get_device_name(0) if uuids else "cpu",
        "gpus": len(uuids),
        "host": platform.node(),
        "tenant_gpus": args.tenant_gpus,
        "borrower_gpus": borrower,
        "matrix": args.matrix,
        "seconds": args.seconds,
        "lease_bytes": args.lease_bytes,
        "target_slowdown": TARGET,
        "same_gpu": same,
        "readers": [],
        "tenants": [],
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if same:
        print(
            "borrowers share a GPU with a tenant: its slowdown includes their own kernels "
            "(the 5% target is for borrowers on peer GPUs)"
        )
    if args.smoke:
        node_cm = plain_host_node(lenders=len(args.tenant_gpus), host_bytes="128MiB")
    else:
        from benchkit.node import bench_node

        cap = args.cap or f"{per_lender * args.lease_bytes + GiB}"
        reserve = args.reserve or f"{per_lender * args.lease_bytes + 4 * GiB}"
        node_cm = bench_node(
            backend="cuda-vmm",
            cap=cap,
            reserve=reserve,
            gpus=",".join(uuids[g] for g in args.tenant_gpus),
        )
    with contextlib.ExitStack() as stack:
        node = stack.enter_context(node_cm)
        run(args, node, uuids, doc)
    out = write_json(doc, args.out)
    plot(doc, out.with_suffix(".png"))
    met = [t["met"] for t in doc["tenants"]]
    print(
        f"tenants within {TARGET * 100:.0f}%: {sum(met)} of {len(met)}; wrong reads "
        f"{doc.get('wrong_reads')}"
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
