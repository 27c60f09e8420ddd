"""Placement decisions for a node's topology, without granting anything: for every
borrower GPU, the broker's ranking of the lenders (links, load, fit), where successive
leases would go, how many stripes a striped lease would take and on which lenders, and
where one lease per borrower GPU would go when all borrow at once.

It runs the broker's own policy (:mod:`harvestd.policy`) over lender records (a synthetic
node, ``harvestd lenders --json``, or what a running broker lists); held bytes are
simulated, so no node is touched. How many stripes a striped lease takes is the client's
arithmetic (``client/striping.py``), which this layer may not import: :func:`dry_run` is
handed it as a :class:`StripeSplit` (``scripts/placement_dryrun.py`` does that, and is
the command line).
"""

from __future__ import annotations

import copy
from typing import Any, Protocol, Sequence

from harvestd.model import LenderRecord, LenderState
from harvestd.policy import NearestBestFit
from harvestd.sizes import GiB, MiB, format_size, round_up
from protos import harvest_pb2 as pb

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


def lender_record(lender: pb.Lender) -> LenderRecord:
    """The record of a lender as ``Client.lenders()`` gives it (held = granted)."""
    return LenderRecord(
        id=lender.id,
        node=lender.node,
        backend=lender.backend,
        pickup_address=lender.pickup_address,
        capacity=lender.capacity,
        generation=lender.generation,
        gpu_uuid=lender.gpu_uuid,
        gpu_index=lender.gpu_index,
        links={k.peer_uuid: k.nvlinks for k in lender.links},
        reclaimed=lender.reclaimed,
        state=LenderState(lender.state),
        granularity=lender.granularity,
        held=lender.granted,
    )


class StripeSplit(Protocol):
    """How a striped lease of ``nbytes`` read into GPU ``near_gpu`` of ``node`` would be
    split: the bytes of each of its stripes (their count is the stripe count), from
    ``lenders`` in their wire form, at most ``max_stripes`` of them."""

    def __call__(
        self,
        lenders: Sequence[pb.Lender],
        nbytes: int,
        near_gpu: str,
        node: str,
        backend: int,
        max_stripes: int,
    ) -> list[int]: ...


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
        choice.held += round_up(nbytes, choice.granularity)
    return choice


def dry_run(
    lenders: list[LenderRecord],
    lease_bytes: int,
    leases: int,
    striped_bytes: int,
    max_stripes: int,
    backend: int = 0,
    *,
    stripes: StripeSplit,
) -> dict[str, Any]:
    """Every decision, as a JSON document (the node's records are copied, not changed);
    ``stripes`` splits the striped lease (the client's stripe count and layout)."""
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
        sizes = stripes(
            [as_pb(l) for l in lenders], striped_bytes, near, node, backend, max_stripes
        )
        sim = copy.deepcopy(lenders)
        placed: list[str] = []
        for size in sizes:
            choice = _grant(policy, sim, size, node, near, backend, tuple(placed))
            placed.append(choice.id if choice else "NONE")
        doc["borrowers"].append(
            {
                "gpu_index": borrower.gpu_index,
                "gpu_uuid": near,
                "node": node,
                "ranking": ranking,
                "successive_leases": successive,
                "stripes": len(sizes),
                "stripe_lenders": placed,
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
