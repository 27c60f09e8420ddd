#!/usr/bin/env python3
"""Control-plane benchmark: broker RPCs per second and their latency, grants picked up
and mapped, and reclaim latency, on one node.

Starts its own node (Ray, broker actor, host lender) unless --state-dir names a running one.

- RPC floor: --workers processes loop the cheapest real RPC (a KeepAlive of no lease).
- Mixed RPCs (the headline): --workers processes, each with its own channel and --live
  leases, loop Grant / KeepAlive (--batch lease ids, round robin) / Release; the leases
  are never picked up: the broker alone. Every RPC counts once, whatever it carries; the
  leases renewed inside the batched KeepAlives are reported apart, as what they are.
- Grants picked up: --pickers processes loop the client library's ``lease()`` (Grant,
  pick-up from the lender over its Unix socket, map) and ``release()``; timed from the
  Grant call to the mapped lease, with the Grant RPC's share apart.
- Reclaim: N (--holders) processes each map one lease with the client library; this
  process, as the tenant, reclaims the idle bytes plus the holders' (so exactly their
  leases must go) and times it until the broker answers freed=True.

Unix sockets only.

    python scripts/bench_control_plane.py [--quick] [--out bench/results/control_plane.json]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchkit.node import REPO

log = logging.getLogger("bench_control_plane")
RPCS = ("grant", "keepalive", "release")  # the mixed run's RPC kinds
DEFAULTS = {"workers": 4, "pickers": 4, "seconds": 10.0, "holders": "1,4,16", "repeats": 5}
QUICK = {"workers": 2, "pickers": 2, "seconds": 2.0, "holders": "1,2", "repeats": 2}
WAIT_S = 120.0  # the longest any process waits on another before giving up
STALLED_MS = 1000.0  # a reclaim this slow waited out a grace period: someone did not ack
SPAWN = mp.get_context("spawn")  # never fork a process that has gRPC threads


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0..1) of ``values``; NaN when empty."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else math.nan


def _reap(procs: list[Any], wait_s: float) -> None:
    """Join ``procs`` for up to ``wait_s`` in all, then terminate whoever is left."""
    deadline = time.monotonic() + wait_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.terminate()


def _worker(address: str, node: str, args: argparse.Namespace, start: Any, out: Any) -> None:
    """One throughput worker: fill ``args.live`` leases, wait for ``start``, loop, clean up."""
    import grpc

    from protos import harvest_pb2 as pb
    from protos import harvest_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(address)
    stub, cid = pb_grpc.BrokerStub(channel), f"bench-cp-{os.getpid()}"
    lat: dict[str, list[float]] = {op: [] for op in RPCS}
    errors: collections.Counter[str] = collections.Counter()
    held: collections.deque[str] = collections.deque()
    grant = pb.GrantRequest(
        client_id=cid,
        nbytes=args.lease_bytes,
        ttl_s=args.ttl,
        node=node,
        holder_pid=os.getpid(),
        backend=pb.BACKEND_HOST,
    )

    def call(op: str, method: Any, request: Any, timed: bool = True) -> Any:
        began = time.perf_counter()
        try:
            reply = method(request, timeout=10.0)
        except grpc.RpcError as err:
            errors[f"{op}:{err.code().name}"] += 1
            return None
        if timed:
            lat[op].append(time.perf_counter() - began)
        return reply

    # Filled before the clock starts, so that every timed op runs at the full live count.
    filled = (call("fill", stub.Grant, grant, False) for _ in range(args.live))
    held.extend(r.id for r in filled if r is not None)
    out.put(("ready", os.getpid()))
    elapsed, renewed = 0.0, 0
    if start.wait(WAIT_S):
        began = time.monotonic()
        while time.monotonic() < began + args.seconds:
            if (reply := call("grant", stub.Grant, grant)) is not None:
                held.append(reply.id)
            ids = list(itertools.islice(held, args.batch))
            held.rotate(-len(ids))  # round robin: each lease is renewed every live/batch loops
            reply = call(
                "keepalive", stub.KeepAlive, pb.KeepAliveRequest(client_id=cid, lease_ids=ids)
            )
            if reply is not None:
                renewed += len(reply.alive)
                errors["keepalive:lost"] += len(reply.lost)
            if held:
                call(
                    "release",
                    stub.Release,
                    pb.ReleaseRequest(client_id=cid, lease_id=held.popleft()),
                )
        elapsed = time.monotonic() - began
    else:
        errors["start:timeout"] += 1
    for lease_id in held:  # untimed, but its failures still count
        call("cleanup", stub.Release, pb.ReleaseRequest(client_id=cid, lease_id=lease_id), False)
    channel.close()
    out.put(("done", {"lat": lat, "errors": +errors, "elapsed": elapsed, "renewed": renewed}))


def _latency(seconds: list[float]) -> dict[str, float]:
    """p50, p99 and max of ``seconds``, in ms."""
    ms = [x * 1e3 for x in seconds]
    return {"p50_ms": pct(ms, 0.5), "p99_ms": pct(ms, 0.99), "max_ms": max(ms, default=math.nan)}


def _run_workers(target: Any, args: tuple, n: int, seconds: float) -> list[dict[str, Any]]:
    """Start ``n`` processes of ``target(*args, start, out)``, wait until each is ready,
    start them together and collect what each put last."""
    start, results = SPAWN.Event(), SPAWN.Queue()
    procs = [
        SPAWN.Process(target=target, args=(*args, start, results), daemon=True) for _ in range(n)
    ]
    done: list[dict[str, Any]] = []
    try:
        for p in procs:
            p.start()
        for _ in procs:
            results.get(timeout=WAIT_S)
        start.set()
        done = [results.get(timeout=seconds + WAIT_S)[1] for _ in procs]
    finally:
        # After an error or Ctrl-C, nobody waits for workers that may be blocked.
        _reap(procs, 15.0 if len(done) == len(procs) else 0.0)
    return done


def bench_throughput(address: str, node: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run the mixed workers against the broker at ``address``: RPCs/s and ms per kind."""
    log.info(
        "mixed RPCs: %d workers x %d live leases, %.1f s",
        args.workers,
        args.live,
        args.seconds,
    )
    done = _run_workers(_worker, (address, node, args), args.workers, args.seconds)
    window = max(d["elapsed"] for d in done) or math.nan
    errors = sum((collections.Counter(d["errors"]) for d in done), collections.Counter())
    rpcs = {}
    for op in RPCS:
        seconds = [x for d in done for x in d["lat"][op]]
        rpcs[op] = {"count": len(seconds), "rpcs_per_s": len(seconds) / window}
        rpcs[op].update(_latency(seconds))
    keepalives = rpcs["keepalive"]["count"]
    renewed = sum(d["renewed"] for d in done)
    return {
        "window_s": window,
        "rpcs": rpcs,
        "rpcs_per_s": sum(v["count"] for v in rpcs.values()) / window,
        "errors": sum(errors.values()),
        "errors_by_kind": dict(errors),
        # Not RPCs: the lease ids that the KeepAlive RPCs above carried and renewed.
        "batched_renewals": {
            "what": (
                f"leases renewed inside batched KeepAlive RPCs ({args.batch} lease ids per "
                "call, as the client library renews): lease renewals, not RPCs; each "
                "KeepAlive RPC above counts once in rpcs_per_s"
            ),
            "leases_renewed_per_s": renewed / window,
            "leases_per_keepalive_rpc": renewed / keepalives if keepalives else math.nan,
            "keepalive_rpcs_per_s": rpcs["keepalive"]["rpcs_per_s"],
        },
    }


def _picker(state_dir: str, args: argparse.Namespace, start: Any, out: Any) -> None:
    """One holder of the pick-up run: ``lease()`` (Grant, pick-up, map), touch the
    memory, ``release()``, in a loop; each lease timed from its Grant to its mapping."""
    from client.connection import Client
    from harvestd.errors import HarvestError
    from harvestd.paths import node_name, resolve_address
    from protos import harvest_pb2 as pb

    class GrantTimed(Client):
        """The client library's Client, noting how long its last Grant RPC took."""

        grant_s = math.nan

        def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
            began = time.perf_counter()
            reply = super()._call(method, request, timeout)
            if isinstance(request, pb.GrantRequest):
                self.grant_s = time.perf_counter() - began
            return reply

    client = GrantTimed(resolve_address(None, state_dir), node=node_name(state_dir))
    lat: dict[str, list[float]] = {"to_mapped": [], "grant_rpc": [], "release": []}
    errors: collections.Counter[str] = collections.Counter()

    def one(timed: bool) -> None:
        began = time.perf_counter()
        try:
            lease = client.lease(args.pickup_bytes, ttl=args.ttl, backend="host")
        except HarvestError as err:
            errors[f"lease:{type(err).__name__}"] += 1
            return
        mapped = time.perf_counter()
        try:
            with lease.use():  # untimed: the memory is there, and it is ours
                view = lease.as_bytes()
                view[0], view[-1] = 1, 2
                if int(view[0]) + int(view[-1]) != 3:
                    errors["use:wrong"] += 1
        except HarvestError as err:
            errors[f"use:{type(err).__name__}"] += 1
        released = time.perf_counter()
        lease.release()
        if timed:
            lat["to_mapped"].append(mapped - began)
            lat["grant_rpc"].append(client.grant_s)
            lat["release"].append(time.perf_counter() - released)

    one(False)  # the first lease imports torch and the backend: not timed
    out.put(("ready", os.getpid()))
    elapsed = 0.0
    if start.wait(WAIT_S):
        began = time.monotonic()
        while time.monotonic() < began + args.seconds:
            one(True)
        elapsed = time.monotonic() - began
    else:
        errors["start:timeout"] += 1
    client.close()
    out.put(("done", {"lat": lat, "errors": +errors, "elapsed": elapsed}))


def bench_pickup(state_dir: str, args: argparse.Namespace) -> dict[str, Any]:
    """Grants that a holder picks up and maps: grants/s, and ms from Grant to mapped."""
    log.info(
        "grants picked up: %d holders, leases of %d MiB, %.1f s",
        args.pickers,
        args.pickup_bytes >> 20,
        args.seconds,
    )
    done = _run_workers(_picker, (state_dir, args), args.pickers, args.seconds)
    window = max(d["elapsed"] for d in done) or math.nan
    errors = sum((collections.Counter(d["errors"]) for d in done), collections.Counter())
    lat = {k: [x for d in done for x in d["lat"][k]] for k in ("to_mapped", "grant_rpc", "release")}
    pickup = [t - g for t, g in zip(lat["to_mapped"], lat["grant_rpc"], strict=True)]
    return {
        "window_s": window,
        "what": (
            "client library lease(): Grant RPC, pick-up from the lender over its Unix "
            "socket (fd passed), import and mmap; timed from the Grant call to the mapped "
            "lease; then release() (unmap + Release RPC)"
        ),
        "grants": len(lat["to_mapped"]),
        "grants_per_s": len(lat["to_mapped"]) / window,
        "grant_to_mapped": _latency(lat["to_mapped"]),
        "grant_rpc": _latency(lat["grant_rpc"]),
        "pickup_and_map": _latency(pickup),
        "release": _latency(lat["release"]),
        "errors": sum(errors.values()),
        "errors_by_kind": dict(errors),
    }


def _floor_worker(address: str, seconds: float, start: Any, out: Any) -> None:
    """One worker of the RPC floor: the cheapest real broker RPC (a keepalive of no
    lease) in a loop, so that the run shows what any RPC costs on this machine."""
    import grpc

    from protos import harvest_pb2 as pb
    from protos import harvest_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(address)
    stub = pb_grpc.BrokerStub(channel)
    request = pb.KeepAliveRequest(client_id=f"bench-floor-{os.getpid()}")
    stub.KeepAlive(request, timeout=10.0)
    out.put(("ready", os.getpid()))
    calls, elapsed = 0, 0.0
    if start.wait(WAIT_S):
        began = time.monotonic()
        while time.monotonic() < began + seconds:
            stub.KeepAlive(request, timeout=10.0)
            calls += 1
        elapsed = time.monotonic() - began
    channel.close()
    out.put(("done", {"calls": calls, "elapsed": elapsed}))


def bench_rpc_floor(address: str, args: argparse.Namespace) -> dict[str, Any]:
    """The same number of workers doing nothing but empty keepalives: RPCs per second
    that this machine's gRPC stacks and broker can carry at all."""
    done = _run_workers(_floor_worker, (address, args.seconds), args.workers, args.seconds)
    window = max(d["elapsed"] for d in done) or math.nan
    return {"window_s": window, "rpcs_per_s": sum(d["calls"] for d in done) / window}


class _Heard:
    """A lease's revocation callback: when it was called, and an event to wait on."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.at: float | None = None

    def __call__(self, _lease: Any, _why: str) -> None:
        self.at = time.monotonic()
        self.event.set()


def _holder(state_dir: str, nbytes: int, ttl: float, settle: float, conn: Any) -> None:
    """A holder: per "lease" command, map one lease, hold it ``settle`` s, say when it goes."""
    from client import connect

    client = connect(state_dir=state_dir)
    try:
        while conn.poll(WAIT_S) and conn.recv() == "lease":
            heard = _Heard()
            try:
                lease = client.lease(nbytes, ttl=ttl, backend="host")  # the lender we reclaim
            except Exception as exc:  # noqa: BLE001 - the parent must hear, not hang
                conn.send(("error", repr(exc)))
                continue
            lease.on_revoke(heard)
            time.sleep(settle)
            conn.send(("ready", lease.id))
            conn.send(("revoked", lease.id, heard.at if heard.event.wait(WAIT_S) else None))
    finally:
        client.close()


def _expect(conn: Any, kind: str) -> tuple:
    if not conn.poll(WAIT_S):
        raise TimeoutError(f"a holder sent no {kind!r} within {WAIT_S:.0f} s")
    if (message := conn.recv())[0] != kind:
        raise RuntimeError(f"a holder sent {message!r}, expected {kind!r}")
    return message


def _reclaim_once(tenant: Any, lender: Any, conns: list[Any], charged: int) -> dict[str, Any]:
    """Lease on every holder, reclaim their bytes, wait for every callback, restore."""
    for conn in conns:
        conn.send("lease")
    ids = {_expect(conn, "ready")[1] for conn in conns}
    now = next(l for l in tenant.lenders() if l.id == lender.id)
    idle = max(0, now.capacity - now.reclaimed - now.granted)
    began = time.monotonic()
    res = tenant.reclaim(lender.id, idle + len(conns) * charged)
    elapsed = time.monotonic() - began
    called = [m[2] - began for m in (_expect(c, "revoked") for c in conns) if m[2] is not None]
    tenant.restore(lender.id)
    return {
        "elapsed_ms": elapsed * 1e3,
        "broker_ms": res.elapsed_s * 1e3,
        "freed": res.freed,
        "revoked": len(res.revoked),
        "holders_revoked": len(ids & set(res.revoked)),
        "callbacks": len(called),
        "callback_max_ms": max(called, default=math.nan) * 1e3,
    }


def bench_reclaim(state_dir: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Reclaim latency with 1..N mapped holders, timed from this (tenant) process."""
    from client import connect
    from harvestd.sizes import round_up
    from protos import harvest_pb2 as pb

    rows = []
    with contextlib.closing(connect(state_dir=state_dir)) as tenant:
        lender = next(
            l for l in tenant.lenders() if l.backend == pb.BACKEND_HOST and l.state == pb.LENDER_UP
        )
        charged = round_up(args.holder_bytes, lender.granularity)
        for n in args.holders:
            pipes = [SPAWN.Pipe() for _ in range(n)]
            procs = [
                SPAWN.Process(
                    target=_holder,
                    daemon=True,
                    args=(state_dir, args.holder_bytes, args.ttl, args.settle, child),
                )
                for _, child in pipes
            ]
            runs: list[dict[str, Any]] = []
            try:
                for p in procs:
                    p.start()
                for r in range(args.repeats):
                    runs.append(_reclaim_once(tenant, lender, [c for c, _ in pipes], charged))
                    log.info(
                        "reclaim, %d holders, run %d: %.1f ms, freed=%s, callbacks %d/%d",
                        n,
                        r + 1,
                        runs[-1]["elapsed_ms"],
                        runs[-1]["freed"],
                        runs[-1]["callbacks"],
                        n,
                    )
            finally:
                for conn, _ in pipes:
                    with contextlib.suppress(OSError):
                        conn.send("stop")
                # After an error, holders may wait for a revocation that never comes.
                _reap(procs, 15.0 if len(runs) == args.repeats else 0.0)
            ms = [r["elapsed_ms"] for r in runs]
            rows.append(
                {
                    "holders": n,
                    "p50_ms": pct(ms, 0.5),
                    "max_ms": max(ms),
                    "broker_p50_ms": pct([r["broker_ms"] for r in runs], 0.5),
                    "all_freed": all(r["freed"] for r in runs),
                    "callbacks": sum(r["callbacks"] for r in runs),
                    "expected_callbacks": n * len(runs),
                    "stalled": sum(r["elapsed_ms"] > STALLED_MS for r in runs),
                    "runs": runs,
                }
            )
    return rows


def _daemons(root: str) -> list[int]:
    """Pids of the node daemons running on state dir ``root`` (ours: its name is unique)."""
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            cmd = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
            if b"harvestd.daemon" in cmd and f'"{root}"'.encode() in cmd:
                pids.append(int(proc.name))
    return pids


@contextlib.contextmanager
def node(state_dir: str | None, host_bytes: str) -> Iterator[str]:
    """The state dir of a running node: the one given, or a fresh one stopped afterwards."""
    if state_dir:
        yield state_dir
        return
    root = tempfile.mkdtemp(prefix="hvcp-", dir="/tmp")  # not $TMPDIR: socket paths stay short
    harvestd = [sys.executable, "-m", "harvestd"]
    cut_short = True
    try:
        log.info("starting a node in %s", root)
        # A private Ray temp dir: without it, ray.init() joins any cluster that `ray start`
        # left on this machine (it reads /tmp/ray/ray_current_cluster) and the start fails.
        started = subprocess.run(
            harvestd
            + [
                "start",
                "--detach",
                "--backend",
                "host",
                "--host-bytes",
                host_bytes,
                "--state-dir",
                root,
            ],
            check=False,
            timeout=300,
            capture_output=True,
            text=True,
            env={**os.environ, "RAY_TMPDIR": root},
        )
        cut_short = False
        if started.returncode:
            raise RuntimeError(f"harvestd start failed: {started.stderr.strip()}")
        yield root
    finally:
        if cut_short:
            # The daemon of a start cut short (Ctrl-C) writes node.json, which `harvestd
            # stop` needs, only later, and a stop before that would delete its socket:
            # SIGTERM makes it finish starting, then stop; wait for that.
            for pid in _daemons(root):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 90
            while _daemons(root) and time.monotonic() < deadline:
                time.sleep(0.5)
        stop = subprocess.run(
            harvestd + ["stop", "--state-dir", root],
            check=False,
            timeout=120,
            capture_output=True,
            text=True,
        )
        if stop.returncode and not cut_short:
            log.warning("harvestd stop: %s (logs kept in %s)", stop.stderr.strip(), root)
        else:
            shutil.rmtree(root, ignore_errors=True)
            log.info("node stopped")


def print_table(res: dict[str, Any]) -> None:
    """The human summary of ``res`` (the JSON's figures)."""
    p, tp, pu = res["parameters"], res["throughput"], res["pickup"]
    m, head = res["machine"], res["headline"]
    print(
        f"\nmixed RPCs: {p['workers']} workers x {p['live']} live leases, {tp['window_s']:.1f}"
        f" s, keepalive batch {p['batch']}; {m['cpus']} CPUs, load average "
        f"{m['loadavg_before'][0]:.1f} before the run"
    )
    print(f"{'RPC':<22}{'RPCs/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for op, v in tp["rpcs"].items():
        name = f"{op} ({p['batch']} leases)" if op == "keepalive" else op
        print(
            f"{name:<22}{v['rpcs_per_s']:>10.0f}{v['p50_ms']:>10.2f}{v['p99_ms']:>10.2f}"
            f"{v['max_ms']:>10.2f}"
        )
    print(
        f"{'all':<22}{tp['rpcs_per_s']:>10.0f}   errors {tp['errors']} {tp['errors_by_kind'] or ''}"
    )
    print(
        f"RPC floor (empty keepalives, same workers): {res['rpc_floor']['rpcs_per_s']:.0f} "
        f"RPCs/s; the mixed run reaches {tp['of_rpc_floor']:.2f} of it"
    )
    br = tp["batched_renewals"]
    print(
        f"not RPCs: leases renewed inside the batched keepalives: "
        f"{br['leases_renewed_per_s']:.0f}/s ({br['leases_per_keepalive_rpc']:.1f} per RPC)"
    )
    print(
        f"\ngrants picked up and mapped: {p['pickers']} holders, {p['pickup_bytes'] >> 20} MiB "
        f"host leases, {pu['window_s']:.1f} s: {pu['grants_per_s']:.0f} grants/s, "
        f"errors {pu['errors']} {pu['errors_by_kind'] or ''}"
    )
    print(f"{'from Grant call to':<22}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for key, name in (
        ("grant_to_mapped", "mapped lease"),
        ("grant_rpc", "Grant reply"),
        ("pickup_and_map", "(reply to mapped)"),
        ("release", "release() (apart)"),
    ):
        v = pu[key]
        print(f"{name:<22}{v['p50_ms']:>10.2f}{v['p99_ms']:>10.2f}{v['max_ms']:>10.2f}")
    print(
        f"\nheadline: {head['rpcs_per_s']:.0f} broker RPCs/s (mixed); "
        f"{head['grants_picked_up_per_s']:.0f} grants/s picked up and mapped, Grant to "
        f"mapped p50 {head['grant_to_mapped_p50_ms']:.2f} ms, p99 "
        f"{head['grant_to_mapped_p99_ms']:.2f} ms"
    )
    print(
        f"\nreclaim: holders of {p['holder_bytes'] >> 20} MiB each, {p['repeats']} repeats, "
        f"settle {p['settle']} s"
    )
    print(
        f"{'holders':<9}{'p50 ms':>9}{'max ms':>9}{'broker p50':>12}{'freed':>7}"
        f"{'callbacks':>11}{'stalled':>9}"
    )
    for r in res["reclaim"]:
        print(
            f"{r['holders']:<9}{r['p50_ms']:>9.1f}{r['max_ms']:>9.1f}{r['broker_p50_ms']:>12.1f}"
            f"{r['all_freed']!s:>7}{r['callbacks']:>6}/{r['expected_callbacks']:<4}"
            f"{r['stalled']:>9}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run every part; 0 when every RPC and lease succeeded and every reclaim freed its
    memory."""
    from harvestd.paths import node_name, resolve_address
    from harvestd.sizes import parse_size

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, help=f"mixed-RPC workers ({DEFAULTS['workers']})")
    ap.add_argument("--seconds", type=float, help=f"each timed run ({DEFAULTS['seconds']})")
    ap.add_argument("--live", type=int, default=250, help="leases each worker holds")
    ap.add_argument("--batch", type=int, default=50, help="leases per keepalive")
    ap.add_argument("--lease-bytes", type=parse_size, default="4KiB")
    ap.add_argument("--ttl", type=float, default=30.0, help="lease TTL, seconds")
    ap.add_argument("--pickers", type=int, help=f"pick-up holders ({DEFAULTS['pickers']})")
    ap.add_argument("--pickup-bytes", type=parse_size, default="64MiB", help="their leases")
    ap.add_argument("--holders", help=f"reclaim holder counts ({DEFAULTS['holders']})")
    ap.add_argument("--holder-bytes", type=parse_size, default="64MiB")
    ap.add_argument("--repeats", type=int, help=f"reclaims per count ({DEFAULTS['repeats']})")
    ap.add_argument(
        "--settle",
        type=float,
        default=0.25,
        help="seconds a holder holds its "
        "lease before the reclaim (0 lands it on the lease's first keepalive)",
    )
    ap.add_argument("--host-bytes", default="4GiB", help="the started node's host lender")
    ap.add_argument("--state-dir", help="use this running node instead of starting one")
    ap.add_argument("--out", default=str(REPO / "bench/results/control_plane.json"))
    ap.add_argument("--quick", action="store_true", help=f"smoke test: {QUICK}")
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():  # explicit flags win
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    args.holders = [int(n) for n in str(args.holders).split(",") if n.strip()]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # SIGTERM takes the same way out as Ctrl-C: through the finally that stops the node.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load_before = os.getloadavg()  # other work on the machine skews every figure: record it
    with node(args.state_dir, args.host_bytes) as state_dir:
        address = resolve_address(None, state_dir)
        # Load averages after each part (its own processes included): other work on the
        # machine shows as more than the part's own.
        load_after = {}
        floor = bench_rpc_floor(address, args)
        load_after["rpc_floor"] = os.getloadavg()
        throughput = bench_throughput(address, node_name(state_dir), args)
        load_after["mixed"] = os.getloadavg()
        pickup = bench_pickup(state_dir, args)
        load_after["pickup"] = os.getloadavg()
        reclaim = bench_reclaim(state_dir, args)
        load_after["reclaim"] = os.getloadavg()
    throughput["of_rpc_floor"] = throughput["rpcs_per_s"] / floor["rpcs_per_s"]
    headline = {
        "what": (
            "rpcs_per_s: broker gRPC calls answered per second in the mixed run (Grant + "
            f"KeepAlive of {args.batch} lease ids + Release), each call counted once; "
            "grants_picked_up_per_s: leases granted, picked up from the lender and mapped "
            "by holders through the client library, per second; latency from the Grant "
            "call to the mapped lease"
        ),
        "rpcs_per_s": throughput["rpcs_per_s"],
        "rpc_ms": {
            op: {"p50": v["p50_ms"], "p99": v["p99_ms"]} for op, v in throughput["rpcs"].items()
        },
        "grants_picked_up_per_s": pickup["grants_per_s"],
        "grant_to_mapped_p50_ms": pickup["grant_to_mapped"]["p50_ms"],
        "grant_to_mapped_p99_ms": pickup["grant_to_mapped"]["p99_ms"],
    }
    res = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "host": platform.node(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "command": [sys.executable, *sys.argv],
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "parameters": {k: v for k, v in vars(args).items() if k != "out"},
        "node_started_here": args.state_dir is None,
        "headline": headline,
        "rpc_floor": floor,
        "throughput": throughput,
        "pickup": pickup,
        "reclaim": reclaim,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))
    print_table(res)
    print(f"\nwritten: {args.out}")
    ok = (
        throughput["errors"] == 0
        and pickup["errors"] == 0
        and all(r["all_freed"] and r["callbacks"] == r["expected_callbacks"] for r in reclaim)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
