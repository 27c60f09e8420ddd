"""Discrete-event simulation of one Harvest broker over a whole cluster, on a fake clock.

It drives the broker's real :class:`~harvestd.table.LeaseTable`, :class:`NearestBestFit`
policy and a :class:`MemoryStore`; nothing about placement or leases is re-implemented.
Nodes have 8 GPUs of 80 GiB with NVLink all-to-all (DGX/HGX: NV18 between every pair);
one lender per GPU reports ``capacity = total - tenant - reserve`` every simulated second
from the tenant trace of :mod:`harvestd.simulation.trace`; when the tenant grows past
what is lent, the lender reports and calls ``reclaim(lender, 0)``, as ``lender.Lender``
does, and the holders acknowledge and the lender confirms the free within the same
second (revocation takes milliseconds, the tick is one second).

Borrowers, one per GPU of the *active* nodes, lease on their own node near their own GPU:
MoE expert slabs held until revoked (sizes from public model configs) and KV block groups
that come and go. Every node's lenders report, but for 1,024 GPUs and more only some
nodes carry borrowers, so that the run fits the time budget: leases never cross nodes, so
a node's lent share does not depend on the others, while every grant still scans the
whole table (the placement cost being measured).

``python scripts/simulate_cluster.py`` (about 7 minutes on 2 cores) writes
``bench/results/simulation.json`` and ``.png`` and prints a table; ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import random
import sys
import time
import tracemalloc
from array import array
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from harvestd.errors import NoCapacity
from harvestd.metrics import Silent
from harvestd.model import LeaseRecord, LenderRecord
from harvestd.policy import NearestBestFit
from harvestd.simulation.trace import TenantProcess, TraceModel
from harvestd.sizes import MiB
from harvestd.store import MemoryStore
from harvestd.table import LeaseTable, Timing

log = logging.getLogger(__name__)
GPUS_PER_NODE = 8
CUDA_VMM = 2  # protos: BACKEND_CUDA_VMM
# One MoE expert is three (hidden x intermediate) matrices.
EXPERTS = {
    "mixtral-8x7b bf16": 3 * 4096 * 14336 * 2,  # 336 MiB
    "mixtral-8x22b bf16": 3 * 6144 * 16384 * 2,  # 576 MiB
    "deepseek-v3 fp8, 4 experts": 4 * 3 * 7168 * 2048,
}  # 168 MiB
KV_TOKEN_BYTES = 2 * 80 * 8 * 128 * 2  # llama-3-70b: K+V, 80 layers, 8 KV heads, bf16
KV_GROUP_TOKENS = (128, 256, 512, 1024)  # 40 to 320 MiB a lease
# (gpus, simulated seconds, active nodes): about 7 minutes on 2 cores in all.
SCHEDULE = [
    (8, 4 * 3600, None),
    (64, 3600, None),
    (512, 600, None),
    (1024, 900, 32),
    (4096, 600, 16),
    (10000, 600, 16),
]
QUICK = [(8, 300, None), (64, 120, None)]


@dataclass
class SimConfig:
    """One simulated cluster."""

    gpus: int
    seconds: float
    active_nodes: int | None = None  # nodes with borrowers (None: all)
    seed: int = 0
    tick_s: float = 1.0
    reserve: float = 0.10  # harvestd's default GPU reserve
    appetite: float = 2.0  # demand per GPU / mean lendable per GPU
    expert_share: float = 0.7  # of the appetite, long-lived expert slabs
    kv_life_s: float = 120.0  # median life of a KV block-group lease
    ttl_s: float = 30.0
    keepalive_s: float = 10.0
    warmup_s: float = 60.0  # borrowers fill up first; shares measured after
    check: bool = False  # check_invariants() at the end


class Notes:
    """The table's notifier: what holders and lenders hear, queued for the next settle."""

    def __init__(self) -> None:
        self.revokes: list[LeaseRecord] = []
        self.frees: dict[str, list[str]] = {}
        self.ends: list[LeaseRecord] = []

    def revoke(self, lease: LeaseRecord) -> None:
        """Holder must fence and acknowledge."""
        self.revokes.append(lease)

    def ended(self, lease: LeaseRecord) -> None:
        """Lease ended without the holder."""
        self.ends.append(lease)

    def free(self, lease: LeaseRecord) -> None:
        """Lender must free the memory and confirm."""
        self.frees.setdefault(lease.lender_id, []).append(lease.id)

    def freed(self, lender_id: str) -> None:
        """Nobody waits on reclaim here."""


class Counter(Silent):
    """An observer that counts the table's events (to cross-check the simulator's)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def count(self, event: str, n: int = 1, lender: str = "") -> None:
        """Add ``n`` to ``event``."""
        self.counts[event] = self.counts.get(event, 0) + n


class PruningMemoryStore(MemoryStore):
    """MemoryStore that forgets freed leases: it keeps every record forever otherwise,
    which would measure the simulator's store, not the broker (SqliteStore keeps history
    on disk)."""

    def commit(
        self,
        leases: Iterable[LeaseRecord] = (),
        lenders: Iterable[LenderRecord] = (),
        generation: int | None = None,
    ) -> None:
        """Commit, then drop the leases whose memory is free."""
        batch = list(leases)
        super().commit(batch, lenders, generation)
        for lease in batch:
            if lease.freed:
                self._leases.pop(lease.id, None)


@dataclass
class Borrower:
    """An inference server on one GPU, leasing from its node's other GPUs."""

    client: str
    node: str
    gpu: str
    expert_bytes: int
    experts_wanted: int
    kv_rate: float  # KV lease requests per second
    rng: random.Random
    experts: set[str] = field(default_factory=set)
    kv: dict[str, tuple[float, int]] = field(default_factory=dict)  # id -> (end, bytes)
    queue: list[tuple[int, float]] = field(default_factory=list)  # (bytes, life)
    next_kv: float = 0.0
    next_try: float = 0.0
    backoff: float = 1.0
    next_keepalive: float = 0.0

    def drop(self, lease_id: str) -> None:
        """The lease is gone (revoked, expired): an expert is wanted again."""
        self.experts.discard(lease_id)
        self.kv.pop(lease_id, None)


class Simulation:
    """A cluster of lenders and borrowers around one real lease table."""

    def __init__(self, cfg: SimConfig, model: TraceModel | None = None) -> None:
        model = model or TraceModel()
        self.cfg, self.model, self.now = cfg, model, 0.0
        self.notes, self.counter = Notes(), Counter()
        self.table = LeaseTable(
            PruningMemoryStore(),
            NearestBestFit(),
            self.notes,
            Timing(default_ttl=cfg.ttl_s, grace=5.0, lender_timeout=30.0),
            clock=lambda: self.now,
            observer=self.counter,
        )
        self.nodes = max(1, round(cfg.gpus / GPUS_PER_NODE))
        n = self.nodes * GPUS_PER_NODE
        self.reserve = int(cfg.reserve * model.gpu_bytes)
        self.tenants = [TenantProcess(model, cfg.seed, i) for i in range(n)]
        self.ids = [f"node{i // 8:05d}/gpu{i % 8}" for i in range(n)]
        for i, lid in enumerate(self.ids):
            node, g = divmod(i, GPUS_PER_NODE)
            self.table.register_lender(
                LenderRecord(
                    id=lid,
                    node=f"node{node:05d}",
                    backend=CUDA_VMM,
                    generation=0,
                    pickup_address=f"/run/harvest/{lid}.sock",
                    capacity=self._lendable(i),
                    gpu_uuid=self._uuid(node, g),
                    gpu_index=g,
                    granularity=2 * MiB,
                    links={self._uuid(node, p): 18 for p in range(GPUS_PER_NODE) if p != g},
                )
            )
        active = min(self.nodes, cfg.active_nodes or self.nodes)
        step = self.nodes / active
        self.active = [int(k * step) for k in range(active)]  # spread over the cluster
        self.borrowers = {b.client: b for b in self._borrowers()}
        self.granted: set[str] = set()
        self.generations: set[int] = set()
        self.grant_ns, self.refused_ns = array("q"), array("q")
        self.reclaim_ns, self.sweep_ns = array("q"), array("q")
        self.revocations = self.measured_revocations = self.misplaced = 0
        self.lent_bs = self.lendable_bs = 0
        self.lease_s = 0.0
        self.calls: dict[str, int] = {}  # broker calls by name, as the RPCs would be
        self.result: dict[str, Any] = {}  # the last run's measurements

    def _call(self, name: str) -> None:
        if self.now > self.cfg.warmup_s:  # the initial fill is not the steady state
            self.calls[name] = self.calls.get(name, 0) + 1

    @staticmethod
    def _uuid(node: int, gpu: int) -> str:
        return f"GPU-{node:05d}-{gpu}"

    def _lendable(self, i: int) -> int:
        return max(0, self.model.gpu_bytes - self.tenants[i].used(self.now) - self.reserve)

    def _borrowers(self) -> list[Borrower]:
        # Mean lendable bytes per GPU, from the trace itself, sets the borrowers' appetite.
        probe = [TenantProcess(self.model, self.cfg.seed + 1, g) for g in range(256)]
        mean = sum(max(0, self.model.gpu_bytes - p.used(0) - self.reserve) for p in probe) / len(
            probe
        )
        appetite = self.cfg.appetite * mean
        kv_mean = sum(KV_GROUP_TOKENS) / len(KV_GROUP_TOKENS) * KV_TOKEN_BYTES
        kv_life = self.cfg.kv_life_s * math.exp(0.5)  # mean of log-normal, sigma 1
        out = []
        for a in self.active:
            for g in range(GPUS_PER_NODE):
                rng = random.Random(f"harvest-borrower/{self.cfg.seed}/{a}/{g}")
                size = rng.choice(list(EXPERTS.values()))
                out.append(
                    Borrower(
                        client=f"client-{a:05d}-{g}",
                        node=f"node{a:05d}",
                        gpu=self._uuid(a, g),
                        expert_bytes=size,
                        rng=rng,
                        experts_wanted=int(self.cfg.expert_share * appetite / size),
                        kv_rate=(1 - self.cfg.expert_share) * appetite / (kv_mean * kv_life),
                        next_kv=rng.expovariate(1.0),
                        next_keepalive=rng.uniform(0, 10),
                    )
                )
        return out

    # ------------------------------------------------------------------ events

    def _grant(self, b: Borrower, nbytes: int) -> str | None:
        self._call("grant")
        start = time.perf_counter_ns()
        try:
            lease, lender = self.table.grant(b.client, nbytes, node=b.node, near_gpu=b.gpu)
        except NoCapacity:
            self.refused_ns.append(time.perf_counter_ns() - start)
            b.backoff = min(8.0, b.backoff * 2)
            b.next_try = self.now + b.backoff
            return None
        self.grant_ns.append(time.perf_counter_ns() - start)
        if lease.id in self.granted or lease.generation in self.generations:
            raise AssertionError(f"lease {lease.id} granted twice")
        if lender.node != b.node or lender.gpu_uuid == b.gpu:
            self.misplaced += 1
        self.granted.add(lease.id)
        self.generations.add(lease.generation)
        b.backoff = 1.0
        return lease.id

    def _borrow(self, b: Borrower) -> None:
        for kv_id, (end, _) in list(b.kv.items()):
            if end <= self.now:
                del b.kv[kv_id]
                self._call("release")
                self.table.release(b.client, kv_id)
        while b.next_kv <= self.now:
            life = b.rng.lognormvariate(math.log(self.cfg.kv_life_s), 1.0)
            b.queue.append((b.rng.choice(KV_GROUP_TOKENS) * KV_TOKEN_BYTES, life))
            b.next_kv += b.rng.expovariate(b.kv_rate)
        del b.queue[:-32]  # requests waiting longer went to host memory instead
        if self.now >= b.next_keepalive:
            b.next_keepalive = self.now + self.cfg.keepalive_s
            self._call("keepalive")
            _, lost = self.table.keepalive(b.client, list(b.experts) + list(b.kv))
            for lease in lost:
                b.drop(lease.id)
        while self.now >= b.next_try and (len(b.experts) < b.experts_wanted or b.queue):
            if len(b.experts) < b.experts_wanted:
                lease_id = self._grant(b, b.expert_bytes)
                if lease_id:
                    b.experts.add(lease_id)
            else:
                nbytes, life = b.queue[0]
                lease_id = self._grant(b, nbytes)
                if lease_id:
                    b.queue.pop(0)
                    b.kv[lease_id] = (self.now + life, nbytes)

    def settle(self) -> None:
        """Holders acknowledge revocations, lenders confirm frees, until nothing is left."""
        while self.notes.revokes or self.notes.frees or self.notes.ends:
            revokes, self.notes.revokes = self.notes.revokes, []
            self.revocations += len(revokes)
            if self.now > self.cfg.warmup_s:
                self.measured_revocations += len(revokes)
            for lease in revokes:
                self._call("ack_revoke")
                self.borrowers[lease.client_id].drop(lease.id)
                self.table.ack_revoke(lease.client_id, lease.id)
            ends, self.notes.ends = self.notes.ends, []
            for lease in ends:
                self.borrowers[lease.client_id].drop(lease.id)
            frees, self.notes.frees = self.notes.frees, {}
            for lender_id, ids in frees.items():
                self._call("confirm_free")
                self.table.confirm_free(lender_id, self.table.lenders[lender_id].generation, ids)

    def tick(self) -> None:
        """One simulated second: tenants move, lenders report or reclaim, borrowers act."""
        self.now += self.cfg.tick_s
        total = self.model.gpu_bytes
        for i, lender_id in enumerate(self.ids):
            lender = self.table.lenders[lender_id]
            used = self.tenants[i].used(self.now)
            lendable = max(0, total - used - self.reserve)
            if lendable != lender.capacity:
                self._call("report_changed")  # a report carrying news, not a heartbeat
            self.table.report_lender(lender_id, lender.generation, lendable, total, total - used)
            if lendable < lender.held:  # the tenant grew into what is lent
                self._call("reclaim")
                start = time.perf_counter_ns()
                self.table.reclaim(lender_id, 0)
                self.settle()
                self.reclaim_ns.append(time.perf_counter_ns() - start)
        for b in self.borrowers.values():
            self._borrow(b)
        self.settle()
        start = time.perf_counter_ns()
        self.table.sweep()
        self.sweep_ns.append(time.perf_counter_ns() - start)
        self.settle()
        if self.now > self.cfg.warmup_s:
            self._measure()

    def _measure(self) -> None:
        lenders = self.table.lenders
        for a in self.active:
            lent = sum(lenders[self.ids[a * 8 + g]].held for g in range(8))
            lendable = sum(lenders[self.ids[a * 8 + g]].lendable for g in range(8))
            self.lent_bs += lent
            self.lendable_bs += lendable
        live = sum(len(b.experts) + len(b.kv) for b in self.borrowers.values())
        self.lease_s += live * self.cfg.tick_s

    def run(self) -> dict[str, Any]:
        """Run the configured seconds; return the measurements."""
        start = time.perf_counter()
        for _ in range(int(self.cfg.seconds / self.cfg.tick_s)):
            self.tick()
        wall = time.perf_counter() - start
        self.result = self.report(wall)
        return self.result

    def report(self, wall: float) -> dict[str, Any]:
        """Measurements, with the accounting cross-checks."""
        c = self.counter.counts
        if self.cfg.check:
            self.table.check_invariants()
        lease_h = self.lease_s / 3600
        gpu_s = len(self.active) * 8 * (self.cfg.seconds - self.cfg.warmup_s)
        calls = {name: n / gpu_s for name, n in sorted(self.calls.items())}
        calls["report_changed"] = self.calls.get("report_changed", 0) / (
            self.nodes * 8 * (self.cfg.seconds - self.cfg.warmup_s)
        )  # every lender reports
        calls["report_lender"] = 1.0 / self.cfg.tick_s  # every lender, every tick
        return {
            "gpus": self.nodes * 8,
            "nodes": self.nodes,
            "active_gpus": len(self.active) * 8,
            "sim_hours": self.cfg.seconds / 3600,
            "wall_s": round(wall, 1),
            "lent_share": self.lent_bs / max(1, self.lendable_bs),
            "revocations": self.revocations,
            "table_revocations": c.get("revoke", 0),
            "forced_revocations": c.get("revoke_forced", 0),
            "expiries": c.get("expiry", 0),
            "lease_hours": lease_h,
            "revocations_per_lease_hour": self.measured_revocations / max(lease_h, 1e-9),
            "grants": len(self.grant_ns),
            "refused": len(self.refused_ns),
            "misplaced": self.misplaced,
            "grant_us": percentiles(self.grant_ns),
            "refused_us": percentiles(self.refused_ns),
            "reclaim_us": percentiles(self.reclaim_ns),
            "sweep_us": percentiles(self.sweep_ns),
            "live_leases": len(self.table.leases),
            "leases_per_active_gpu": len(self.table.leases) / (len(self.active) * 8),
            "bytes_per_lease": deep_bytes_per_lease(self.table),
            "broker_calls_per_gpu_s": calls,
            "placement_probe_us": placement_probe(self),
            "invariants": "checked" if self.cfg.check else "skipped",
        }


def percentiles(ns: array) -> dict[str, float]:
    """p50, p99 and max of nanosecond samples, in microseconds."""
    if not ns:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "n": 0}
    s = sorted(ns)
    return {
        "p50": s[len(s) // 2] / 1e3,
        "p99": s[min(len(s) - 1, int(len(s) * 0.99))] / 1e3,
        "max": s[-1] / 1e3,
        "n": len(s),
    }


def placement_probe(sim: Simulation, samples: int = 500) -> dict[str, float]:
    """NearestBestFit.place over every lender (what grant does today) against over the
    client's node only (what an index of lenders by node would hand it): same answer,
    median microseconds."""
    by_node: dict[str, list[LenderRecord]] = {}
    for lender in sim.table.lenders.values():
        by_node.setdefault(lender.node, []).append(lender)
    policy, clients = sim.table.policy, list(sim.borrowers.values())
    every, node_only = array("q"), array("q")
    for k in range(samples):
        b = clients[k % len(clients)]
        start = time.perf_counter_ns()
        a = policy.place(list(sim.table.lenders.values()), 40 * MiB, b.node, b.gpu)
        mid = time.perf_counter_ns()
        c = policy.place(by_node.get(b.node, []), 40 * MiB, b.node, b.gpu)
        every.append(mid - start)
        node_only.append(time.perf_counter_ns() - mid)
        if a is not c:
            raise AssertionError("an index of lenders by node changed the placement")
    return {
        "all_lenders_p50": percentiles(every)["p50"],
        "node_index_p50": percentiles(node_only)["p50"],
    }


def deep_bytes_per_lease(table: LeaseTable) -> float:
    """Bytes of the table's lease dict and every object its records reach, per live lease
    (an object shared by many records, e.g. a client id, is counted once)."""
    if not table.leases:
        return 0.0
    seen: set[int] = set()
    total = sys.getsizeof(table.leases)
    for key, lease in table.leases.items():
        for obj in (key, lease, vars(lease), *vars(lease).values()):
            if id(obj) not in seen:
                seen.add(id(obj))
                total += sys.getsizeof(obj)
    return total / len(table.leases)


def calibrate_memory(leases: int = 20000) -> dict[str, float]:
    """tracemalloc's count of what a lease and a lender cost the broker process."""
    store = MemoryStore()
    table = LeaseTable(store, clock=lambda: 0.0)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for g in range(GPUS_PER_NODE):
        table.register_lender(
            LenderRecord(
                id=f"n/g{g}",
                node="n",
                backend=CUDA_VMM,
                pickup_address="/x",
                generation=0,
                capacity=1 << 50,
                gpu_uuid=f"G{g}",
                granularity=2 * MiB,
                links={f"G{p}": 18 for p in range(8) if p != g},
            )
        )
    mid = tracemalloc.take_snapshot()
    for k in range(leases):
        table.grant(f"client-{k % 64}", 200 * MiB, node="n", near_gpu=f"G{k % 8}")
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    lender_b = sum(s.size_diff for s in mid.compare_to(before, "filename"))
    lease_b = sum(s.size_diff for s in after.compare_to(mid, "filename"))
    return {
        "bytes_per_lender": lender_b / GPUS_PER_NODE,
        "bytes_per_lease": lease_b / leases,
        "of_which_memorystore_index": sys.getsizeof(store._leases) / leases,
    }


def scan_costs(leases: int = 200_000) -> dict[str, float]:
    """Wall time of the table's whole-table scans with ``leases`` live leases on one node
    (sweep and reclaim walk every lease, whatever node it is on), per lease."""
    table = LeaseTable(MemoryStore(), clock=lambda: 0.0)
    for g in range(GPUS_PER_NODE):
        table.register_lender(
            LenderRecord(
                id=f"n/g{g}",
                node="n",
                backend=CUDA_VMM,
                pickup_address="/x",
                generation=0,
                capacity=1 << 50,
                gpu_uuid=f"G{g}",
                granularity=2 * MiB,
            )
        )
    for k in range(leases):
        table.grant(f"client-{k % 64}", 200 * MiB, node="n", near_gpu=f"G{k % 8}")
    # A lender with a realistic few hundred leases of its own: reclaim and pending_frees
    # walk every lease in the table to find them.
    table.register_lender(
        LenderRecord(
            id="m/g0",
            node="m",
            backend=CUDA_VMM,
            generation=0,
            pickup_address="/x",
            capacity=1 << 50,
            granularity=2 * MiB,
        )
    )
    for _ in range(200):
        table.grant("client-m", 200 * MiB, node="m")
    out: dict[str, float] = {"leases": leases + 200}
    for name, call in (
        ("sweep", table.sweep),
        ("reclaim", lambda: table.reclaim("m/g0", 0)),
        ("pending_frees", lambda: table.pending_frees("m/g0")),
    ):
        start = time.perf_counter_ns()
        call()
        out[f"{name}_ns_per_lease"] = (time.perf_counter_ns() - start) / out["leases"]
    return out


def project(
    result: dict[str, Any], memory: dict[str, float], scans: dict[str, float]
) -> dict[str, float]:
    """What one broker would carry if every node of the cluster were as busy as the
    simulated active nodes: leases, memory, and the time of one sweep and one reclaim."""
    leases = result["leases_per_active_gpu"] * result["gpus"]
    return {
        "leases": leases,
        "broker_mib": (
            leases * memory["bytes_per_lease"] + result["gpus"] * memory["bytes_per_lender"]
        )
        / MiB,
        "sweep_ms": leases * scans["sweep_ns_per_lease"] / 1e6,
        "reclaim_ms": leases * scans["reclaim_ns_per_lease"] / 1e6,
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Placement latency, lent share, revocations and projected table scans against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r["gpus"] for r in results]
    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    ax[0][0].loglog(n, [r["grant_us"]["p50"] for r in results], "o-", label="p50")
    ax[0][0].loglog(n, [r["grant_us"]["p99"] for r in results], "s-", label="p99")
    ax[0][0].loglog(
        n,
        [r["placement_probe_us"]["node_index_p50"] for r in results],
        "^:",
        label="place() over the node's lenders only, p50",
    )
    ax[0][0].axhline(1000, color="r", ls="--", label="target: p99 under 1 ms")
    ax[0][0].set(title="grant (placement) wall time", xlabel="GPUs", ylabel="µs")
    ax[0][1].semilogx(n, [100 * r["lent_share"] for r in results], "o-")
    ax[0][1].axhline(90, color="r", ls="--", label="target: 90%")
    ax[0][1].set(
        title="lendable memory lent out, time-averaged", xlabel="GPUs", ylabel="%", ylim=(80, 100.5)
    )
    ax[1][0].semilogx(n, [r["revocations_per_lease_hour"] for r in results], "o-")
    ax[1][0].set(title="revocations per lease-hour", xlabel="GPUs", ylim=(0, None))
    ax[1][1].loglog(n, [r["projected"]["sweep_ms"] for r in results], "o-", label="sweep ms")
    ax[1][1].loglog(n, [r["projected"]["reclaim_ms"] for r in results], "s-", label="reclaim ms")
    ax[1][1].loglog(n, [r["projected"]["broker_mib"] for r in results], "^-", label="broker MiB")
    ax[1][1].axhline(50, color="r", ls=":", label="sweep period 50 ms")
    ax[1][1].set(title="projected for a fully busy cluster", xlabel="GPUs")
    for a in ax.flat:
        a.grid(True, which="both", alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.suptitle("One Harvest broker (LeaseTable + NearestBestFit), simulated")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table_text(results: list[dict[str, Any]]) -> str:
    """The results as a fixed-width table."""
    rows = [
        (
            f"{'GPUs':>6} {'active':>6} {'sim h':>5} {'wall s':>6} {'lent %':>6} "
            f"{'rev/lease-h':>11} {'grants':>7} {'p50 µs':>7} {'p99 µs':>7} {'B/lease':>7} "
            f"{'full-table leases':>17} {'MiB':>6} {'sweep ms':>8} {'reclaim ms':>10}"
        )
    ]
    for r in results:
        pr = r["projected"]
        rows.append(
            f"{r['gpus']:>6} {r['active_gpus']:>6} {r['sim_hours']:>5.2f} {r['wall_s']:>6.0f} "
            f"{100 * r['lent_share']:>6.1f} {r['revocations_per_lease_hour']:>11.3f} "
            f"{r['grants']:>7} {r['grant_us']['p50']:>7.0f} {r['grant_us']['p99']:>7.0f} "
            f"{r['bytes_per_lease']:>7.0f} {pr['leases']:>17.0f} {pr['broker_mib']:>6.0f} "
            f"{pr['sweep_ms']:>8.1f} {pr['reclaim_ms']:>10.1f}"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Run the schedule (or ``--quick``), write JSON and PNG, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, under a minute")
    parser.add_argument("--gpus", type=int, nargs="*", help="only these sizes of the schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--appetite",
        type=float,
        default=2.0,
        help="borrower demand per GPU, in mean lendable bytes per GPU",
    )
    parser.add_argument("--out", default="bench/results", help="directory for the results")
    parser.add_argument(
        "--check",
        action="store_true",
        help="check_invariants() after every size (slow past 512 GPUs)",
    )
    args = parser.parse_args(argv)
    schedule = [
        s for s in (QUICK if args.quick else SCHEDULE) if not args.gpus or s[0] in args.gpus
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "simulation.quick" if args.quick else "simulation"
    started = time.perf_counter()
    memory = calibrate_memory(5000 if args.quick else 20000)
    scans = scan_costs(20_000 if args.quick else 200_000)
    results = []
    for gpus, seconds, active in schedule:
        cfg = SimConfig(
            gpus=gpus,
            seconds=seconds,
            active_nodes=active,
            seed=args.seed,
            appetite=args.appetite,
            check=args.check or gpus <= 64,
        )
        log.info("simulating %d GPUs for %.0f s, %s active nodes", gpus, seconds, active or "all")
        load_before = os.getloadavg()[0]
        result = Simulation(cfg).run()
        # Other work on the machine inflates wall times; say how busy it was.
        result["loadavg_1min"] = [load_before, os.getloadavg()[0]]
        result["projected"] = project(result, memory, scans)
        result["config"] = asdict(cfg)
        results.append(result)
        log.info(
            "%d GPUs: %.1f s wall, grant p99 %.0f µs, lent %.1f%%",
            gpus,
            result["wall_s"],
            result["grant_us"]["p99"],
            100 * result["lent_share"],
        )
        gc.collect()
    doc = {
        "cpus": os.cpu_count(),
        "trace_model": asdict(TraceModel()),
        "memory_calibration": memory,
        "scan_costs": scans,
        "total_wall_s": round(time.perf_counter() - started, 1),
        "results": results,
    }
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    plot(results, out / f"{stem}.png")
    print(table_text(results))
    print(
        f"tracemalloc: {memory['bytes_per_lease']:.0f} B per lease, "
        f"{memory['bytes_per_lender']:.0f} B per lender; sweep "
        f"{scans['sweep_ns_per_lease']:.0f} ns and reclaim {scans['reclaim_ns_per_lease']:.0f}"
        f" ns per live lease; total wall {doc['total_wall_s']:.0f} s"
    )
    return 0
