"""The revocation runs of ``scripts/bench_moe.py``: Harvest's offload decoding while the
lender's tenant keeps reclaiming memory and giving it back, against the same offload left
alone and against host memory, for the copy path (:func:`run_revocations`) and for placed
tensors (:func:`run_placed_revocations`). A :class:`Revocations` says what one such row
runs and :func:`revocation_row` runs it; the tokens are checked against a reference
decoded after the runs, as long as the longest of them."""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from benchkit.gpumem import GpuBytes
from benchkit.moecompare import mode_entry, ratio
from benchkit.moedecode import decode, spy_dump
from benchkit.moemodes import (
    BORROWING,
    PLACED_REVOCATION_MODES,
    REVOCATION_MODES,
    REVOKE_BATCH,
    REVOKE_FRACTION,
)
from benchkit.moerun import borrowed, run_once
from benchkit.moesetup import Setup, close, harvest_setup, measured_setup, placed_tensors, release
from benchkit.stats import alternating, spread


@contextlib.contextmanager
def revoking(
    client: Any, lender: dict[str, Any], every: float, nbytes: int
) -> Iterator[dict[str, Any]]:
    """Act as the lender's tenant: reclaim ``nbytes`` every ``every`` seconds, give them
    back half a period later; yields counts."""
    stop = threading.Event()
    counts = {"reclaims": 0, "revoked": 0}

    def run() -> None:
        while not stop.wait(every / 2):
            # Idle memory goes first: take all of it and ``nbytes`` of leases.
            now = next(l for l in client.lenders() if l.id == lender["id"])
            idle = max(0, now.capacity - now.reclaimed - now.granted)
            result = client.reclaim(lender["id"], idle + nbytes)
            counts["reclaims"] += 1
            counts["revoked"] += len(result.revoked)
            if stop.wait(every / 2):
                break
            client.restore(lender["id"])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield counts
    finally:
        stop.set()
        thread.join(30)
        with contextlib.suppress(Exception):
            client.restore(lender["id"])


def reference_tokens(
    base: Any,
    client: Any,
    args: argparse.Namespace,
    batch: int,
    steps: int,
    device: torch.device,
) -> torch.Tensor:
    """The tokens Harvest's runs must reproduce, ``steps`` of them: every expert resident,
    computed as they compute (``--compute eager``: transformers' own eager experts;
    ``grouped``: Harvest's module with nothing offloaded)."""
    from client.moe import offload_experts

    if args.compute == "eager":
        return decode(base, batch, args.prompt, steps, args.warmup, device)["tokens"]
    model = copy.deepcopy(base)
    offload = offload_experts(
        model, client, fraction=0.0, backends=("host",), compute=args.compute, placement="copy"
    )
    try:
        return decode(model, batch, args.prompt, steps, args.warmup, device)["tokens"]
    finally:
        offload.close()
        del model
        release(device)


@dataclass
class Revocations:
    """One revocation run of a model. ``uses``: its modes, in the order a repeat starts
    from, each with the key of the offload it decodes (``make(key)`` makes one);
    ``revoked``: the mode decoded while ``lender``'s tenant reclaims (``lender`` None:
    this node has no ``lender_backend`` lender, and the row says so); ``per_run``: keys
    made anew for each run of theirs and closed after it, so that no reclaim can fall on
    their leases; ``how``: what the row says of each mode; ``headline``: its ratios,
    name: (mode, baseline)."""

    experiment: str
    uses: dict[str, str]
    revoked: str
    make: Callable[[str], Setup]
    lender: dict[str, Any] | None
    lender_backend: str
    how: dict[str, str]
    headline: dict[str, tuple[str, str]]
    per_run: frozenset[str] = frozenset()


def lease_bytes(offload: Any) -> int:
    """The largest lease under ``offload`` (a slab of its cache, or one of its placed
    tensors' leases): what each reclaim takes beyond the lender's idle memory."""
    if offload.placement == "copy":
        sizes = [s.lease.nbytes for s in offload.cache._slabs.slabs]
    else:
        sizes = [lease.nbytes for p in placed_tensors(offload) for lease in p.leases()]
    if not sizes:
        raise RuntimeError("nothing leased: there is no lease to revoke")
    return max(sizes)


def revocation_run(
    setup: Setup,
    args: argparse.Namespace,
    client: Any,
    device: torch.device,
    revoke: tuple[dict[str, Any], int] | None,
    spy: bool,
) -> dict[str, Any]:
    """One run of a revocation row: every expert borrowed again first (after a revoked
    run too), then a decode; with ``revoke`` (the lender, the bytes of a lease) while
    the lender's tenant reclaims, at least ``args.revoke_seconds`` long, counting the
    reclaims and the leases they revoked."""
    off = setup.offload
    run: dict[str, Any] = borrowed(off) if setup.mode in BORROWING else {}
    copies = off.placement == "copy"
    refills = off.cache.stats.refills if copies else 0
    nan = float("nan")  # no PCIe bound here
    if revoke is None:
        res = run_once(setup, REVOKE_BATCH, args, device, nan, args.steps, refill=False)
    else:
        if spy:
            threading.Timer(args.revoke_seconds / 2, spy_dump).start()
        lender, nbytes = revoke
        with revoking(client, lender, args.revoke_every, nbytes) as counts:
            res = run_once(
                setup, REVOKE_BATCH, args, device, nan, args.steps, args.revoke_seconds, False
            )
        run.update(counts)
    if copies:
        res["refills"] = off.cache.stats.refills - refills
    return {**run, **res}


def revocation_entry(
    mode: str,
    spec: Revocations,
    info: dict[str, Any],
    runs: list[dict[str, Any]],
    tokens: list[torch.Tensor],
    ref: torch.Tensor,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """A mode of a revocation row; the revoked one with its revocations per repeat."""
    ref_name = "resident" if args.compute == "eager" else "resident-same-code"
    entry = mode_entry(mode, Setup(mode, None, info=info), runs, tokens, ref_name, ref, None)
    entry["how"] = spec.how[mode]
    if mode == spec.revoked:
        # Per repeat: leases the tenant's reclaims revoked, and revocations this
        # offload saw (its own leases taken mid-run).
        entry["revocations"] = [r.get("revoked", 0) for r in runs]
        entry["reclaims"] = [r.get("reclaims", 0) for r in runs]
        entry["revocations_seen"] = [r.get("revocations_seen", 0) for r in runs]
        if "remap_ms" in runs[0]:
            remaps = [ms for r in runs for ms in r["remap_ms"]]
            entry["remap_ms"] = spread(remaps) if remaps else None
    return entry


def revocation_row(
    spec: Revocations,
    name: str,
    base: Any,
    args: argparse.Namespace,
    client: Any,
    device: torch.device,
    model_gpu: GpuBytes,
) -> dict[str, Any]:
    """``spec``'s row: half the experts offloaded, batch 1, every mode decoded
    ``args.repeats`` times (:func:`revocation_modes`), or why none could be."""
    began = time.monotonic()
    if spec.lender is None:
        reason = f"skipped (no {spec.lender_backend} lender on this node)"
        order: list[list[str]] = []
        entries: dict[str, Any] = {m: {"status": reason, "how": spec.how[m]} for m in spec.uses}
    else:
        order, entries = revocation_modes(spec, base, args, client, device, model_gpu)
    return {
        "model": name,
        "batch": REVOKE_BATCH,
        "fraction": REVOKE_FRACTION,
        "layers": args.layers[name],
        "experiment": spec.experiment,
        "lender_backend": spec.lender_backend,
        "revoke_every_s": args.revoke_every,
        "order": order,
        "modes": entries,
        "headline": {k: ratio(entries, a, b) for k, (a, b) in spec.headline.items()},
        "elapsed_s": round(time.monotonic() - began, 1),
    }


def revocation_modes(
    spec: Revocations,
    base: Any,
    args: argparse.Namespace,
    client: Any,
    device: torch.device,
    model_gpu: GpuBytes,
) -> tuple[list[list[str]], dict[str, Any]]:
    """``spec``'s modes decoded ``args.repeats`` times in alternating order, the revoked
    one while the lender's tenant reclaims (:func:`revoking`); each mode's entry, its
    tokens checked against the reference; and the order of each repeat."""
    assert spec.lender is not None  # revocation_row says why there is no run without one
    modes = list(spec.uses)
    revoked_key = spec.uses[spec.revoked]
    made: dict[str, Setup] = {}
    info: dict[str, dict[str, Any]] = {}

    def setup_of(key: str) -> Setup:
        return measured_setup(functools.partial(spec.make, key), device, model_gpu)

    try:
        # The revoked run's offload last: a GPU lender sees none of this process's
        # allocations after its leases (each other setup copies the model on the GPU).
        for key in sorted(dict.fromkeys(spec.uses.values()), key=lambda k: k == revoked_key):
            if key not in spec.per_run:
                made[key] = setup_of(key)
        revoke = (spec.lender, lease_bytes(made[revoked_key].offload))
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        tokens: dict[str, list[torch.Tensor]] = {m: [] for m in modes}
        order: list[list[str]] = [[] for _ in range(args.repeats)]
        for r, mode in alternating(modes, args.repeats):
            order[r].append(mode)
            key = spec.uses[mode]
            setup = setup_of(key) if key in spec.per_run else made[key]
            try:
                res = revocation_run(
                    setup,
                    args,
                    client,
                    device,
                    revoke if mode == spec.revoked else None,
                    spy=args.spy and r == 0,
                )
            finally:
                if key in spec.per_run:
                    close(setup)
            info[mode] = setup.info
            tokens[mode].append(res.pop("tokens"))
            runs[mode].append({"repeat": r, "position": len(order[r]) - 1, **res})
        longest = max(t.shape[1] for ts in tokens.values() for t in ts)
        ref = reference_tokens(base, client, args, REVOKE_BATCH, longest, device)
    finally:
        for setup in made.values():
            close(setup)
        made.clear()
        release(device)
    entries = {m: revocation_entry(m, spec, info[m], runs[m], tokens[m], ref, args) for m in modes}
    return order, entries


def run_revocations(
    name: str,
    base: Any,
    args: argparse.Namespace,
    client: Any,
    lenders: dict[str, Any],
    device: torch.device,
    emit: Callable[[dict[str, Any]], None],
    model_gpu: GpuBytes,
) -> None:
    """Harvest on GPU leases while the lender's tenant keeps taking memory back, against
    the same offload with no revocations and against host leases; half the experts, batch
    1, ``args.repeats`` repeats in alternating order. The revoked and the quiet GPU runs
    share one offload (two would share the lender, and a reclaim could take the quiet
    one's leases); before each run every expert is back in borrowed memory. Where the
    host lender stands in for a GPU lender (no GPU), the host-lease offload lives only
    for its own runs, so that every reclaim falls on the revoked run's leases."""
    # On a node without a GPU lender (the CPU smoke run) the host lender stands in.
    fast = "cuda-vmm" if "cuda-vmm" in lenders else "host"
    shared = fast == "host"

    def make(key: str) -> Setup:
        return harvest_setup(
            f"harvest-{key}",
            base,
            client,
            device,
            fraction=REVOKE_FRACTION,
            backends=(fast if key == "gpu" else "host",),
            slab_bytes=args.slab_bytes,
            refill_every=0.05,
            compute=args.compute,
            placement="copy",
        )

    every = args.revoke_every
    spec = Revocations(
        experiment="revocations",
        uses=dict(zip(REVOCATION_MODES, ("gpu", "gpu", "host"), strict=True)),
        revoked="harvest-gpu-revoked",
        make=make,
        lender=lenders[fast],
        lender_backend=fast
        if fast == "cuda-vmm"
        else "host (standing in for a GPU lender: no cuda-vmm lender on this node)",
        how={
            "harvest-gpu-revoked": (
                f"harvest-gpu (refill_every=0.05) while the {fast} lender's tenant "
                f"reclaims all idle memory and one slab every {every} s and gives it back "
                f"{every / 2} s later; decodes at least {args.steps} steps and "
                f"{args.revoke_seconds} s"
            ),
            "harvest-gpu": f"the same offload, no revocations ({fast} lender)",
            "harvest-host": "half the experts in host leases, no revocations"
            + (" (set up for each of its runs: one lender stands in for both)" if shared else ""),
        },
        headline={
            "revoked_vs_host": ("harvest-gpu-revoked", "harvest-host"),
            "revoked_vs_gpu": ("harvest-gpu-revoked", "harvest-gpu"),
        },
        per_run=frozenset({"host"} if shared else ()),
    )
    emit(revocation_row(spec, name, base, args, client, device, model_gpu))


def run_placed_revocations(
    name: str,
    base: Any,
    args: argparse.Namespace,
    client: Any,
    lenders: dict[str, Any],
    device: torch.device,
    emit: Callable[[dict[str, Any]], None],
    model_gpu: GpuBytes,
) -> None:
    """:func:`run_revocations` for placed tensors (issue 15): the placed experts in GPU
    leases while the lender's tenant reclaims (each revoked lease's chunks remapped to
    the host copy, read there in place until a refill leases them again), against the
    same placed offload with no revocations, the all-host placed run (host-placed:
    nothing leased) and the copy path's host leases (its all-host figure). On the CPU the
    placed tensors lease host memory (the CPU twin's placed range maps host leases): the
    host lender stands in for the GPU lender, and harvest-host's offload lives only for
    its own runs; host-placed leases nothing, so one offload serves every run."""
    backend = "cuda-vmm" if device.type == "cuda" else "host"
    shared = backend == "host"

    def make(key: str) -> Setup:
        common: dict[str, Any] = {
            "fraction": REVOKE_FRACTION,
            "slab_bytes": args.slab_bytes,
            "compute": args.compute,
        }
        if key == "host-placed":
            common.update(placement="placed", borrow_bytes=0, refill_every=None)
        elif key == "harvest-host":
            common.update(backends=("host",), refill_every=0.05, placement="copy")
        else:
            common.update(placement="placed", refill_every=0.05)
        return harvest_setup(key, base, client, device, **common)

    every = args.revoke_every
    spec = Revocations(
        experiment="revocations-placed",
        uses=dict(
            zip(
                PLACED_REVOCATION_MODES,
                ("harvest-gpu-placed", "harvest-gpu-placed", "host-placed", "harvest-host"),
                strict=True,
            )
        ),
        revoked="harvest-gpu-placed-revoked",
        make=make,
        lender=lenders.get(backend),
        lender_backend=backend
        if not shared
        else "host (standing in for a GPU lender: on the CPU placed tensors lease host memory)",
        how={
            "harvest-gpu-placed-revoked": (
                f"harvest-gpu-placed (refill_every=0.05: each placed tensor leases again "
                f"what reads the host copy every 0.05 s) while the {backend} lender's "
                f"tenant reclaims all idle memory and one lease every {every} s and gives "
                f"it back {every / 2} s later: each revoked lease's chunks are remapped to "
                f"the host copy (nothing copied) and read there in place until a refill; "
                f"decodes at least {args.steps} steps and {args.revoke_seconds} s"
            ),
            "harvest-gpu-placed": f"the same placed offload, no revocations ({backend} lender)",
            "host-placed": (
                "the same experts placed with nothing leased (borrow_bytes=0): every "
                "offloaded expert read in place from the host copy (the all-host placed run)"
            ),
            "harvest-host": (
                "the copy path's all-host figure: half the experts in host leases, fetched "
                "as routed, no revocations"
            )
            + (" (set up for each of its runs: one lender stands in for both)" if shared else ""),
        },
        headline={
            "placed_revoked_vs_host_placed": ("harvest-gpu-placed-revoked", "host-placed"),
            "placed_revoked_vs_placed": ("harvest-gpu-placed-revoked", "harvest-gpu-placed"),
        },
        per_run=frozenset({"harvest-host"} if shared else ()),
    )
    emit(revocation_row(spec, name, base, args, client, device, model_gpu))
