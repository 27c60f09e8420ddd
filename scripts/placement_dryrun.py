#!/usr/bin/env python3
"""Placement decisions for a node's real topology, without granting anything: for every
borrower GPU, the broker's ranking of the lenders (links, load, fit), where successive
leases would go, how many stripes a striped lease would take and on which lenders, and
where one lease per borrower GPU would go when all borrow at once.

It runs the broker's own policy (harvestd/policy.py, through
harvestd/simulation/placement.py) and stripe count (client/striping.py) over the lenders
as the broker lists them; held bytes are simulated, so the node is not touched.

    python scripts/placement_dryrun.py                     # the node at $HARVEST_STATE_DIR
    python scripts/placement_dryrun.py --lenders-json lenders.json   # harvestd lenders --json
    python scripts/placement_dryrun.py --topology nvswitch8          # a synthetic node
Writes JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from client import connect
from client.striping import StripeLayout, auto_stripes
from harvestd.model import LenderRecord
from harvestd.simulation import placement
from harvestd.simulation.placement import TOPOLOGIES, from_json, report, synthetic
from harvestd.sizes import parse_size
from protos import harvest_pb2 as pb


def client_stripes(
    lenders: Sequence[pb.Lender],
    nbytes: int,
    near_gpu: str,
    node: str,
    backend: int,
    max_stripes: int,
) -> list[int]:
    """The stripes a striped lease would take, as ``Client.lease_striped`` splits it:
    the bytes of each (client/striping.py)."""
    k = auto_stripes(lenders, nbytes, near_gpu, node, backend, max_stripes=max_stripes)
    layout = StripeLayout(nbytes, k)
    return [layout.stripe_bytes(s) for s in range(k)]


def dry_run(
    lenders: list[LenderRecord],
    lease_bytes: int,
    leases: int,
    striped_bytes: int,
    max_stripes: int,
    backend: int = 0,
) -> dict[str, Any]:
    """Every decision, as a JSON document, with the client's stripe count."""
    return placement.dry_run(
        lenders, lease_bytes, leases, striped_bytes, max_stripes, backend, stripes=client_stripes
    )


def from_node(state_dir: str | None) -> list[LenderRecord]:
    """The lenders of the running node, as its broker lists them."""
    with connect(state_dir=state_dir) as client:
        return [placement.lender_record(l) for l in client.lenders()]


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
