#!/usr/bin/env python3
"""Aggregate bandwidth over many GPUs (issue 10), through real leases on a node with a
lender on every GPU, each against the copy-engine ceiling measured in the same run:

  fan-out   one lender (GPU --lender-gpu) read by 1, 2, 4, 7 borrowers at once, one
            borrower process per other GPU, each gathering 16 KiB blocks from its own
            lease on that lender. Ceiling: as many concurrent 1 GiB peer copies out of
            the lender's GPU.
  striped   one borrower (GPU --borrower-gpu) reading a striped lease of 1, 2, 4, 7
            stripes (placed by the broker: fastest links, least loaded), its blocks
            grouped by stripe and in random order. Ceiling: the sum of the single-link
            copy ceilings of the stripes' GPUs, up to the borrower's own limit (the
            concurrent copy from every other GPU into it). Target: >= 0.85 of it.

Counts that need more GPUs than the machine has are skipped (said so); on one GPU the
fan-out runs k=1 with lender and borrower on the same GPU, and striping is skipped.

    python scripts/bench_aggregate.py --out bench/results/aggregate.json
    python scripts/bench_aggregate.py --smoke      # CPU: host lenders, no ceilings
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from pathlib import Path
from typing import Any

from benchkit.multi import READER, Worker, cuda_uuids, lender_of, plain_host_node, write_json
from benchkit.node import REPO, pyplot

from harvestd.sizes import MiB, parse_size

TARGET = 0.85
# 256 MiB per gather: a striped gather costs Python time per stripe, which must stay
# below the GPU's time per call for the launches to keep the links busy.
BATCH = ("--batch-bytes", str(256 * MiB))


def _readers(devices: list[str], env: dict[str, str]) -> list[Worker]:
    """Borrower processes, started together (each imports torch and makes a context)."""
    workers = [Worker([READER, "--device", d, *BATCH], env, f"reader {d}") for d in devices]
    for w in workers:
        w.expect("hello", timeout=180)
    return workers


def _run_together(workers: list[Worker], seconds: float) -> list[dict[str, Any]]:
    start_at = time.time() + 1.0  # every reader starts at the same moment
    for w in workers:
        w.send(f"run {start_at} {seconds}")
    return [w.expect("ran", timeout=seconds + 120) for w in workers]


def _counts_that_fit(
    counts: list[int], available: int, doc: dict[str, Any], part: str, what: str
) -> list[int]:
    """The ``counts`` this machine has GPUs for; each other one is printed and recorded
    in ``doc["skipped"]``."""
    fit = [k for k in counts if k <= available]
    for k in sorted(set(counts) - set(fit)):
        print(f"{part} k={k}: skipped, needs {k} {what}")
        doc["skipped"].append(f"{part} k={k}")
    return fit


def fan_out(args: argparse.Namespace, node: Any, uuids: list[str], doc: dict[str, Any]) -> None:
    """One lender read by k borrowers at once."""
    from benchkit.peer import concurrent_copies

    lenders = node.lenders()
    if args.smoke:
        target, devices = lenders[0]["id"], ["cpu"] * max(args.counts)
    else:
        lender_gpu = args.lender_gpu
        target = lender_of(lenders, uuids[lender_gpu])
        others = [i for i in range(len(uuids)) if i != lender_gpu] or [lender_gpu]
        devices = [f"cuda:{i}" for i in others]
    counts = _counts_that_fit(
        args.counts, len(devices), doc, "fan-out", "borrower GPUs besides the lender's"
    )
    if not counts:
        return
    workers = _readers(devices[: max(counts)], node.env)
    try:
        for w in workers:
            w.ask(f"lease single {target} {args.lease_bytes}", "leased")
        for k in counts:
            runs = _run_together(workers[:k], args.seconds)
            total = sum(r["gbps"] for r in runs)
            row: dict[str, Any] = {
                "k": k,
                "lender": target,
                "borrowers": devices[:k],
                "gbps": total,
                "per_borrower": [r["gbps"] for r in runs],
                "wrong": sum(r["wrong"] for r in runs),
            }
            if not args.smoke:
                lender_gpu = args.lender_gpu
                pairs = [(lender_gpu, int(d.split(":")[1])) for d in devices[:k]]
                row["ceiling"] = concurrent_copies(pairs)
                row["ratio"] = round(total / row["ceiling"]["GBps"], 3)
            doc["fan_out"].append(row)
            ceiling = row.get("ceiling", {}).get("GBps")
            print(
                f"fan-out k={k}: {total:8.1f} GB/s in all "
                f"({', '.join(f'{r:.0f}' for r in row['per_borrower'])}); ceiling "
                f"{ceiling if ceiling is None else round(ceiling, 1)} GB/s; ratio "
                f"{row.get('ratio')}",
                flush=True,
            )
    finally:
        for w in workers:
            w.close()


def striped(args: argparse.Namespace, node: Any, uuids: list[str], doc: dict[str, Any]) -> None:
    """One borrower reading k stripes at once."""
    from benchkit.peer import concurrent_copies, peer_ceiling

    if args.smoke:
        device, peers = "cpu", list(range(len(node.lenders())))
    else:
        b = args.borrower_gpu
        device, peers = f"cuda:{b}", [i for i in range(len(uuids)) if i != b]
    counts = _counts_that_fit(
        args.counts, len(peers), doc, "striped", "lender GPUs besides the borrower's"
    )
    if not counts:
        return
    links: dict[int, float] = {}
    if not args.smoke:
        for i in peers:  # every link alone, then all at once: the borrower's own limit
            links[i] = peer_ceiling(i, args.borrower_gpu)["GBps"]
        doc["link_ceilings"] = {str(i): v for i, v in links.items()}
        doc["ingress_limit"] = concurrent_copies([(i, args.borrower_gpu) for i in peers])
        print(
            f"link ceilings into GPU {args.borrower_gpu}: "
            f"{', '.join(f'{i}: {v:.0f}' for i, v in links.items())} GB/s; all at once "
            f"{doc['ingress_limit']['GBps']:.0f} GB/s",
            flush=True,
        )
    grouped = Worker([READER, "--device", device, "--grouped", *BATCH], node.env, "grouped")
    shuffled = Worker([READER, "--device", device, *BATCH], node.env, "random order")
    try:
        for w in (grouped, shuffled):
            w.expect("hello", timeout=180)
        for k in counts:
            row: dict[str, Any] = {"k": k}
            for name, w in (("grouped", grouped), ("random", shuffled)):
                leased = w.ask(f"lease striped {k} {args.striped_bytes}", "leased")
                (run,) = _run_together([w], args.seconds)
                w.ask("release", "released")
                row[name] = run["gbps"]
                row["wrong"] = row.get("wrong", 0) + run["wrong"]
                row.update(lenders=leased["lenders"], gpus=leased["gpus"])
            if not args.smoke:
                gpus = [uuids.index(g) for g in row["gpus"]]
                row["sum_link_ceilings"] = sum(links[i] for i in gpus)
                row["concurrent_copies"] = concurrent_copies(
                    [(i, args.borrower_gpu) for i in gpus]
                )["GBps"]
                row["ceiling"] = min(row["sum_link_ceilings"], doc["ingress_limit"]["GBps"])
                row["ratio"] = round(row["grouped"] / row["ceiling"], 3)
                row["ratio_random"] = round(row["random"] / row["ceiling"], 3)
                row["met"] = row["ratio"] >= TARGET
            doc["striped"].append(row)
            print(
                f"striped k={k} on {' '.join(row['lenders'])}: grouped "
                f"{row['grouped']:.1f} GB/s, random {row['random']:.1f} GB/s; ceiling "
                f"{row.get('ceiling')}; ratio {row.get('ratio')} (target {TARGET})",
                flush=True,
            )
    finally:
        grouped.close()
        shuffled.close()


def plot(doc: dict[str, Any], path: Path) -> None:
    """GB/s against k for both parts, with their ceilings."""
    plt = pyplot()
    if plt is None or not (doc["fan_out"] or doc["striped"]):
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows = doc["fan_out"]
    axes[0].plot([r["k"] for r in rows], [r["gbps"] for r in rows], "o-", label="borrowers")
    if rows and "ceiling" in rows[0]:
        axes[0].plot(
            [r["k"] for r in rows],
            [r["ceiling"]["GBps"] for r in rows],
            "k--",
            label="concurrent copies",
        )
    axes[0].set_title("one lender, k borrowers")
    rows = doc["striped"]
    for key in ("grouped", "random"):
        axes[1].plot([r["k"] for r in rows], [r[key] for r in rows], "o-", label=key)
    if rows and "ceiling" in rows[0]:
        axes[1].plot([r["k"] for r in rows], [r["ceiling"] for r in rows], "k--", label="ceiling")
    axes[1].set_title("one borrower, k stripes")
    for ax in axes:
        ax.set_xlabel("k")
        ax.set_ylabel("GB/s")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{doc['device']}: aggregate reads of borrowed memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run both parts, report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,2,4,7")
    parser.add_argument("--lender-gpu", type=int, default=0, help="fan-out: the lender")
    parser.add_argument("--borrower-gpu", type=int, default=0, help="striped: the borrower")
    parser.add_argument("--lease-bytes", default="2GiB", help="fan-out: each borrower's lease")
    parser.add_argument("--striped-bytes", default="8GiB")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--cap", default="20GiB", help="what each lender may lend")
    parser.add_argument("--reserve", default="8GiB")
    parser.add_argument("--parts", default="fan-out,striped")
    parser.add_argument("--smoke", action="store_true", help="CPU: host lenders, small")
    parser.add_argument("--out", default=str(REPO / "bench/results/aggregate.json"))
    args = parser.parse_args(argv)
    args.counts = [int(k) for k in args.counts.split(",")]
    parts = set(args.parts.split(","))
    if args.smoke:
        args.lease_bytes, args.striped_bytes = "8MiB", "24MiB"
        args.seconds = min(args.seconds, 0.5)
        args.counts = [k for k in args.counts if k <= 3] or [1]
        if args.out == parser.get_default("out"):
            args.out = "/tmp/aggregate_smoke.json"
    args.lease_bytes, args.striped_bytes = (
        parse_size(args.lease_bytes),
        parse_size(args.striped_bytes),
    )
    uuids = [] if args.smoke else cuda_uuids()
    if not args.smoke and not uuids:
        print("no CUDA GPU here: nothing to measure (try --smoke)")
        return 2
    import torch

    doc: dict[str, Any] = {
        "benchmark": "aggregate",
        "command": " ".join(["python"] + sys.argv),
        "device": torch.cuda.get_device_name(0) if uuids else "cpu",
        "gpus": len(uuids),
        "host": platform.node(),
        "target": TARGET,
        "fan_out": [],
        "striped": [],
        "skipped": [],
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if len(uuids) == 1:
        print("one GPU: fan-out k=1 on the same GPU only; striping needs 2 GPUs or more")
    if args.smoke:
        node_cm = plain_host_node(lenders=3, host_bytes="64MiB")
    else:
        from benchkit.node import bench_node

        node_cm = bench_node(backend="cuda-vmm", cap=args.cap, reserve=args.reserve)
    with contextlib.ExitStack() as stack:
        node = stack.enter_context(node_cm)
        if "fan-out" in parts:
            fan_out(args, node, uuids, doc)
        if "striped" in parts:
            striped(args, node, uuids, doc)
    out = write_json(doc, args.out)
    plot(doc, out.with_suffix(".png"))
    met = [r["met"] for r in doc["striped"] if "met" in r]
    print(f"striped reads at >= {TARGET} of the ceiling: {sum(met)} of {len(met)} counts")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
