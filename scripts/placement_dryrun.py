#!/usr/bin/env python3
"""Placement decisions for a node's real topology, without granting anything: for every
borrower GPU, the broker's ranking of the lenders (links, load, fit), where successive
leases would go, how many stripes a striped lease would take and on which lenders, and
where one lease per borrower GPU would go when all borrow at once.

It runs the broker's own policy (harvestd/policy.py) and stripe count (client/striped.py)
over the lenders as the broker lists them; held bytes are simulated, so the node is not
touched.

    python scripts/placement_dryrun.py                     # the node at $HARVEST_STATE_DIR
    python scripts/placement_dryrun.py --lenders-json lenders.json   # harvestd lenders --json
    python scripts/placement_dryrun.py --topology nvswitch8          # a synthetic node
Writes JSON with --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harvestd.model import LenderRecord, LenderState  # noqa: E402
from harvestd.policy import NearestBestFit  # noqa: E402
from harvestd.sizes import format_size, parse_size  # noqa: E402
from protos import harvest_pb2 as pb  # noqa: E402

GiB, MiB = 1 << 30, 1 << 20
NODE = "node"
TOPOLOGIES = ("nvswitch8", "pairs4", "pcie4")


def synthetic(kind: str, capacity: int = 16 * GiB, host: int = 0) -> list[LenderRecord]:
    """A node's GPU lenders as NVML would describe them: ``nvswitch8`` (8 GPUs, every
    pair through NVSwitches, 18 links), ``pairs4`` (GPUs 0-1 and 2-3 joined by 2
    NVLinks, 1 NVLink across the pairs), ``pcie4`` (4 GPUs, no NVLink); plus a host
    lender of ``host`` bytes when nonzero."""
    if kind == "nvswitch8":
        n, links = 8, lambda a, b: 18
    elif kind == "pairs4":
        n, links = 4, lambda a, b: 2 if a // 2 == b // 2 else 1
    elif kind == "pcie4":
        n, links = 4, lambda a, b: 0
    else:
        raise ValueError(f"unknown topology {kind!r} (one of {', '.join(TOPOLOGIES)})")
    uuid = [f"GPU-{i:08d}-0000-0000-0000-000000000000" for i in range(n)]
    lenders = [
        LenderRecord(
            id=f"{NODE}-gpu{i}",
            node=NODE,
            backend=pb.BACKEND_CUDA_VMM,
            pickup_address="/x",
            capacity=capacity,
            generation=1,
            gpu_uuid=uuid[i],
            gpu_index=i,
            links={uuid[j]: links(i, j) for j in range(n) if j != i and links(i, j)},
            granularity=2 * MiB,
        )
        for i in range(n)
    ]
    if host:
        lenders.append(
            LenderRecord(
                id=f"{NODE}-host0",
                node=NODE,
                backend=pb.BACKEND_HOST,
                pickup_address="/x",
                capacity=host,
                generation=1,
            )
        )
    return lenders


def from_json(rows: list[dict[str, Any]]) -> list[LenderRecord]:
    """Lender records from ``harvestd lenders --json`` (held = granted)."""
    backends = {
        "host": pb.BACKEND_HOST,
        "cuda-vmm": pb.BACKEND_CUDA_VMM,
        "cuda-ipc": pb.BACKEND_CUDA_IPC,
    }
    out = []
    for row in rows:
        backend = backends.get(row["backend"], 0)
        out.append(
            LenderRecord(
                id=row["id"],
                node=row["node"],
                backend=backend,
                pickup_address="",
                capacity=row["capacity"],
                generation=row.get("generation", 1),
                gpu_uuid=row["gpu_uuid"],
                gpu_index=row.get("gpu_index", -1),
                links=dict(row.get("links", {})),
                reclaimed=row.get("reclaimed", 0),
                state=LenderState[row["state"].upper()],
                granularity=row.get("granularity") or (2 * MiB if row["gpu_uuid"] else 4096),
                held=row.get("granted", 0),
            )
        )
    return out


def from_node(state_dir: str | None) -> list[LenderRecord]:
    """The lenders of the running node, as its broker lists them."""
    from client import connect

    with connect(state_dir=state_dir) as client:
        return [
            LenderRecord(
                id=l.id,
                node=l.node,
                backend=l.backend,
                pickup_address=l.pickup_address,
                capacity=l.capacity,
                generation=l.generation,
                gpu_uuid=l.gpu_uuid,
                gpu_index=l.gpu_index,
                links={k.peer_uuid: k.nvlinks for k in l.links},
                reclaimed=l.reclaimed,
                state=LenderState(l.state),
                granularity=l.granularity,
                held=l.granted,
            )
            for l in client.lenders()
        ]


def as_pb(lender: LenderRecord) -> pb.Lender:
    """The wire form ``Client.lenders()`` gives (what the stripe count reads)."""
    return lender.to_pb()


def _grant(
    policy: NearestBestFit,
    lenders: list[LenderRecord],
    nbytes: int,
    node: str,
    near: str,
    backend: int,
    avoid: tuple[str, ...] = (),
) -> LenderRecord | None:
    choice = policy.place(lenders, nbytes, node, near, backend, avoid)
    if choice is not None:
        choice.held += -(-nbytes // choice.granularity) * choice.granularity
    return choice


def dry_run(
    lenders: list[LenderRecord],
    lease_bytes: int,
    leases: int,
    striped_bytes: int,
    max_stripes: int,
    backend: int = 0,
) -> dict[str, Any]:
    """Every decision, as a JSON document (the node's records are copied, not changed)."""
    from client.striping import StripeLayout, auto_stripes

    policy = NearestBestFit()
    gpus = sorted((l for l in lenders if l.gpu_uuid), key=lambda l: (l.node, l.gpu_index))
    doc: dict[str, Any] = {
        "lenders": [
            {
                "id": l.id,
                "gpu_index": l.gpu_index,
                "gpu_uuid": l.gpu_uuid,
                "links": l.links,
                "free": l.free,
            }
            for l in lenders
        ],
        "lease_bytes": lease_bytes,
        "striped_bytes": striped_bytes,
        "borrowers": [],
    }
    for borrower in gpus:
        node, near = borrower.node, borrower.gpu_uuid
        ranking = [
            {
                "lender": l.id,
                "links": -key[0],
                "gpu": bool(-key[1]),
                "load": round(key[2], 4),
                "free_after": key[3],
            }
            for key, l in policy.rank(lenders, lease_bytes, node, near, backend)
        ]
        sim = copy.deepcopy(lenders)
        successive = []
        for _ in range(leases):
            choice = _grant(policy, sim, lease_bytes, node, near, backend)
            successive.append(choice.id if choice else None)
        k = auto_stripes(
            [as_pb(l) for l in lenders], striped_bytes, near, node, backend, max_stripes=max_stripes
        )
        sim = copy.deepcopy(lenders)
        layout = StripeLayout(striped_bytes, k)
        stripes: list[str] = []
        for s in range(k):
            choice = _grant(
                policy, sim, layout.stripe_bytes(s), node, near, backend, tuple(stripes)
            )
            stripes.append(choice.id if choice else "NONE")
        doc["borrowers"].append(
            {
                "gpu_index": borrower.gpu_index,
                "gpu_uuid": near,
                "node": node,
                "ranking": ranking,
                "successive_leases": successive,
                "stripes": k,
                "stripe_lenders": stripes,
            }
        )
    sim = copy.deepcopy(lenders)
    doc["all_borrow_at_once"] = {}
    for _ in range(max(1, leases // 2)):
        for borrower in gpus:
            choice = _grant(policy, sim, lease_bytes, borrower.node, borrower.gpu_uuid, backend)
            doc["all_borrow_at_once"].setdefault(str(borrower.gpu_index), []).append(
                choice.id if choice else None
            )
    return doc


def report(doc: dict[str, Any]) -> None:
    """The tables."""
    print(f"lease {format_size(doc['lease_bytes'])}, striped {format_size(doc['striped_bytes'])}")
    for b in doc["borrowers"]:
        print(f"\nborrower GPU {b['gpu_index']} ({b['gpu_uuid']})")
        print(f"  {'lender':24s} {'links':>5s} {'gpu':>4s} {'load':>7s} {'free after':>12s}")
        for r in b["ranking"]:
            print(
                f"  {r['lender']:24s} {r['links']:5d} {str(r['gpu']):>4s} {r['load']:7.3f} "
                f"{format_size(r['free_after']):>12s}"
            )
        print(f"  successive leases: {' '.join(str(x) for x in b['successive_leases'])}")
        print(f"  striped: {b['stripes']} stripes on {' '.join(b['stripe_lenders'])}")
    print("\nall borrower GPUs at once, round by round:")
    for gpu, picks in doc["all_borrow_at_once"].items():
        print(f"  GPU {gpu}: {' '.join(str(p) for p in picks)}")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print, write."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--lenders-json", help="a file of `harvestd lenders --json` ('-': stdin)")
    source.add_argument("--topology", choices=TOPOLOGIES, help="a synthetic node")
    parser.add_argument("--state-dir", default=None, help="the node's (default: the usual)")
    parser.add_argument("--lease-bytes", default="1GiB")
    parser.add_argument("--leases", type=int, default=8, help="successive leases per borrower")
    parser.add_argument("--striped-bytes", default="8GiB")
    parser.add_argument("--max-stripes", type=int, default=8)
    parser.add_argument("--backend", choices=("any", "cuda-vmm", "host"), default="cuda-vmm")
    parser.add_argument("--out", default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    if args.topology:
        lenders = synthetic(args.topology)
    elif args.lenders_json:
        text = sys.stdin.read() if args.lenders_json == "-" else Path(args.lenders_json).read_text()
        lenders = from_json(json.loads(text))
    else:
        lenders = from_node(args.state_dir)
    if not any(l.gpu_uuid for l in lenders):
        print("no GPU lender on this node: nothing to place by topology")
    backend = {"any": 0, "cuda-vmm": pb.BACKEND_CUDA_VMM, "host": pb.BACKEND_HOST}[args.backend]
    doc = dry_run(
        lenders,
        parse_size(args.lease_bytes),
        args.leases,
        parse_size(args.striped_bytes),
        args.max_stripes,
        backend,
    )
    report(doc)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
