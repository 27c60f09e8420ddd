"""The comparison ``scripts/bench_moe.py`` is for: for one model and offloaded fraction,
every mode set up once and decoded ``--repeats`` times per batch size in alternating
order, a row per batch (:func:`run_fraction`); a measured mode's entry in a row (every
repeat, the spreads, its tokens against its reference) and the per-repeat ratio of two
modes (a headline). The revocation rows (:mod:`benchkit.moerevoke`) are made of the same
entries and ratios."""

from __future__ import annotations

import argparse
import functools
import logging
import time
from typing import Any, Callable

import torch

from benchkit.gpumem import GpuBytes
from benchkit.moedecode import profile_steps
from benchkit.moemodes import HARVEST_CODE, HOW
from benchkit.moerun import run_once
from benchkit.moesetup import Setup, close, measured_setup, release, setup_mode, skip_reason
from benchkit.stats import alternating, spread

log = logging.getLogger("bench_moe")  # the script's own name, as its log lines always said


def reference_of(mode: str, args: argparse.Namespace) -> str:
    """The mode whose tokens ``mode``'s must equal: ``resident``, except Harvest's module
    computed with grouped GEMMs, whose numerics are its own (its reference: the same
    module with nothing offloaded)."""
    if args.compute == "grouped" and mode in HARVEST_CODE:
        return "resident-same-code"
    return "resident"


def same(tokens: torch.Tensor, ref: torch.Tensor) -> bool:
    """Whether ``tokens`` equal the start of ``ref`` (a reference may run longer)."""
    n = tokens.shape[1]
    return ref.shape[1] >= n and bool(torch.equal(tokens, ref[:, :n]))


def mode_entry(
    mode: str,
    setup: Setup,
    runs: list[dict[str, Any]],
    tokens: list[torch.Tensor],
    ref_name: str,
    ref: torch.Tensor | None,
    resident: torch.Tensor | None,
) -> dict[str, Any]:
    """A measured mode in a row: every repeat, the spreads, the token verdicts."""
    entry: dict[str, Any] = {
        "status": "measured",
        "how": HOW.get(mode, ""),
        **setup.info,
        "repeats": len(runs),
        "steps": min(r["steps"] for r in runs),
        "tokens_per_s": spread([r["tokens_per_s"] for r in runs]),
        "step_ms_median": spread([r["step_ms_median"] for r in runs]),
        "step_ms_mean": spread([r["step_ms_mean"] for r in runs]),
    }
    for key in ("of_pcie_bound", "fetched_bytes_per_step"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if len(values) == len(runs):
            entry[key] = spread(values)
    if runs[0].get("pcie_bound_step_ms") is not None:
        entry["pcie_bound_step_ms"] = spread([r["pcie_bound_step_ms"] for r in runs])
    growth = [r["gpu_allocated_growth_bytes"] for r in runs if "gpu_allocated_growth_bytes" in r]
    entry["gpu_allocated_growth_bytes"] = max(growth) if growth else None
    if any("borrowed_experts" in r for r in runs):
        # Whether each run started with every offloaded expert in borrowed memory.
        entry["all_borrowed"] = all(
            r.get("borrowed_experts") == r.get("offloaded_experts") for r in runs
        )
    entry["reference"] = ref_name
    if ref is not None:
        for run, tok in zip(runs, tokens, strict=True):
            run["tokens_identical"] = same(tok, ref)
        entry["tokens_identical"] = all(r["tokens_identical"] for r in runs)
    if resident is not None:
        entry["tokens_identical_to_resident"] = all(same(t, resident) for t in tokens)
    entry["runs"] = runs
    return entry


def ratio(modes: dict[str, Any], num: str, den: str) -> dict[str, Any] | None:
    """``num``'s tokens/s over ``den``'s, repeat by repeat (they ran in the same repeat,
    close in time): a spread of the per-repeat ratios, naming the baseline."""
    a, b = modes.get(num, {}), modes.get(den, {})
    if a.get("status") != "measured" or b.get("status") != "measured":
        reason = next(
            (m.get("status", "absent") for m in (a, b) if m.get("status") != "measured"),
            "absent",
        )
        return {"baseline": den, "unavailable": f"{num} or {den}: {reason}"}
    pairs = zip(a["tokens_per_s"]["values"], b["tokens_per_s"]["values"], strict=True)
    return {"baseline": den, "ratio": spread([x / y for x, y in pairs])}


def run_fraction(
    name: str,
    base: Any,
    fraction: float,
    args: argparse.Namespace,
    client: Any,
    lenders: dict[str, Any],
    device: torch.device,
    pinned: float,
    emit: Callable[[dict[str, Any]], None],
    model_gpu: GpuBytes,
) -> None:
    """Every mode for one model and fraction: set up once, then one row per batch size,
    each mode decoded ``args.repeats`` times in alternating order (``model_gpu``: what
    the model as built holds on the GPU, for each mode's staging)."""
    setups: dict[str, Setup] = {}
    absent: dict[str, dict[str, Any]] = {}
    # GPU leases last: the lender sees no more of this process's allocations after them.
    for mode in sorted(args.modes, key=lambda m: m in ("harvest-gpu", "harvest-gpu-placed")):
        reason = skip_reason(mode, device, lenders)
        if reason is not None:
            absent[mode] = {"status": reason, "how": HOW.get(mode, "")}
            continue
        began = time.monotonic()
        try:
            make = functools.partial(setup_mode, mode, base, fraction, client, args, device)
            setups[mode] = measured_setup(make, device, model_gpu)
            setups[mode].info["setup_s"] = round(time.monotonic() - began, 2)
        except Exception as exc:  # noqa: BLE001 - one failed mode must not lose the rest
            if mode == "resident":
                raise
            log.exception("%s %s fraction %s: setup failed", name, mode, fraction)
            absent[mode] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    try:
        for batch in args.batches:
            began = time.monotonic()
            runs: dict[str, list[dict[str, Any]]] = {m: [] for m in setups}
            tokens: dict[str, list[torch.Tensor]] = {m: [] for m in setups}
            failed: dict[str, dict[str, Any]] = {}
            order: list[list[str]] = [[] for _ in range(args.repeats)]
            measured = [m for m in args.modes if m in setups]
            for r, mode in alternating(measured, args.repeats):
                if mode in failed:
                    continue
                order[r].append(mode)
                try:
                    run = run_once(setups[mode], batch, args, device, pinned, args.steps)
                except Exception as exc:  # noqa: BLE001 - as above
                    if mode == "resident":
                        raise
                    log.exception("%s %s batch %d fraction %s", name, mode, batch, fraction)
                    failed[mode] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
                    continue
                tokens[mode].append(run.pop("tokens"))
                runs[mode].append({"repeat": r, "position": len(order[r]) - 1, **run})
                if args.profile and r == 0 and setups[mode].offload is not None:
                    profile_steps(setups[mode].model, batch, args.prompt, device, f"{name} {mode}")
            modes: dict[str, Any] = {}
            resident = tokens["resident"][0]
            for mode in args.modes:
                if mode in absent or mode in failed:
                    modes[mode] = {"how": HOW.get(mode, ""), **(absent.get(mode) or failed[mode])}
                    continue
                ref_name = reference_of(mode, args)
                ref = tokens[ref_name][0] if tokens.get(ref_name) else None
                modes[mode] = mode_entry(
                    mode, setups[mode], runs[mode], tokens[mode], ref_name, ref, resident
                )
            emit(
                {
                    "model": name,
                    "batch": batch,
                    "fraction": fraction,
                    "layers": args.layers[name],
                    "order": order,
                    "modes": modes,
                    "headline": {
                        "harvest_gpu_vs_best_host_offload": ratio(
                            modes, "harvest-gpu", "best-host-offload"
                        ),
                        "harvest_gpu_vs_resident": ratio(modes, "harvest-gpu", "resident"),
                        "harvest_gpu_placed_vs_resident": ratio(
                            modes, "harvest-gpu-placed", "resident"
                        ),
                        "harvest_gpu_placed_vs_best_host_offload": ratio(
                            modes, "harvest-gpu-placed", "best-host-offload"
                        ),
                    },
                    "also": {
                        f"{a}_vs_{b}".replace("-", "_"): ratio(modes, a, b)
                        for a, b in (
                            ("harvest-gpu", "resident-same-code"),
                            ("harvest-gpu-placed", "resident-same-code"),
                            ("harvest-gpu-placed", "harvest-gpu"),
                            ("host-placed", "best-host-offload"),
                            ("harvest-gpu", "accelerate-pinned"),
                            ("harvest-gpu", "accelerate-default"),
                            ("harvest-host", "best-host-offload"),
                            ("best-host-offload", "accelerate-pinned"),
                            ("accelerate-pinned", "accelerate-default"),
                        )
                    },
                    "elapsed_s": round(time.monotonic() - began, 1),
                }
            )
    finally:
        for setup in setups.values():
            close(setup)
        setups.clear()
        release(device)
