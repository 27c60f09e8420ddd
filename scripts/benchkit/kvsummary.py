"""What ``scripts/bench_kv.py``'s runs add up to: each run's tokens and logits judged against
plain's, per context, batch and mode the median (min-max) and a verdict, per context and
batch the headline (Harvest against the best baseline and plain, the placed modes'
ratios), and whether the run passes. It rewrites the document's summary fields in place
after every point, so that a run cut short still says what it found.
"""

from __future__ import annotations

from typing import Any

from benchkit.kvmodes import BASELINES, HARVEST, KNOWN, PLACED_MODES, PLAIN, TARGET_VS_PLAIN
from benchkit.stats import spread

MEMORY_FIELDS = (
    "gpu_bytes",
    "gpu_bytes_with_leases",
    "gpu_peak_bytes",
    "nvml_delta_bytes",
    "nvml_used_bytes",
)
"""The runs' memory figures a summary row gives as median (min-max), None where no run
had one (on the CPU)."""


def judge(rows: list[dict[str, Any]], outputs: dict[tuple[str, int], tuple[Any, Any]]) -> None:
    """Each run's tokens and last logits against plain's (its first repeat that ran)."""
    import torch

    plain = sorted(r for m, r in outputs if m == PLAIN)
    ref = outputs[(PLAIN, plain[0])] if plain else None
    for row in rows:
        got = outputs[(row["mode"], row["repeat"])]
        if ref is None:
            row["tokens_equal_plain"] = row["logits_equal_plain"] = None
            continue
        row["tokens_equal_plain"] = bool(torch.equal(got[0], ref[0]))
        row["logits_equal_plain"] = bool(torch.equal(got[1], ref[1]))
        if row["mode"] == PLAIN:
            row["same_as_first_plain_repeat"] = row["tokens_equal_plain"]


def verdict(mode: str, tokens: bool | None, logits: bool | None) -> str:
    """One line: what a mode's outputs say about it."""
    if mode == PLAIN:
        return "reference" if tokens else "reference, but its repeats differ"
    harvest = mode in HARVEST or mode in PLACED_MODES
    if tokens is None:
        return "no reference (plain did not run)" + (": FAIL" if harvest else "")
    if harvest:
        if not tokens:
            return "FAIL: tokens differ from plain"
        return "same tokens and logits as plain" if logits else "FAIL: logits differ from plain"
    if not tokens:
        return "tokens differ from plain: left out of the best baseline (not a failure)"
    return "same tokens as plain" + ("" if logits else " (logits differ)")


def summarize(doc: dict[str, Any]) -> None:
    """Per context, batch and mode: median (min-max) over repeats and the verdict; per
    context and batch: the headline (with the placed modes' ratios); and whether the run
    passes."""
    layers = doc["model"]["layers"]
    placed = doc["placed"]
    keys = sorted({(r["context"], r["batch"]) for r in doc["runs"] + placed["runs"]})
    doc["summary"], doc["headline"] = [], []
    placed["summary"], placed["headline"] = [], []
    for key in keys:
        at = [r for r in doc["runs"] if (r["context"], r["batch"]) == key]
        placed_at = [r for r in placed["runs"] if (r["context"], r["batch"]) == key]
        by_mode: dict[str, dict[str, Any]] = {}
        for mode in KNOWN:
            runs = [r for r in at + placed_at if r["mode"] == mode]
            if not runs:
                continue
            row = summary_row(key, mode, runs, layers)
            (placed["summary"] if mode in PLACED_MODES else doc["summary"]).append(row)
            by_mode[mode] = row
        line = headline(key, at, by_mode)
        ratios = placed_ratios(at + placed_at, line["best_baseline"])
        line.update(ratios)
        doc["headline"].append(line)
        placed["headline"].append({"context": key[0], "batch": key[1], **ratios})
    harvest = [r for r in doc["runs"] if r["mode"] in HARVEST] + placed["runs"]
    doc["harvest_tokens_equal_plain"] = all(r["tokens_equal_plain"] is True for r in harvest)
    doc["harvest_logits_equal_plain"] = all(r["logits_equal_plain"] is True for r in harvest)
    doc["baselines_with_other_tokens"] = [
        {"context": s["context"], "batch": s["batch"], "mode": s["mode"]}
        for s in doc["summary"]
        if s["mode"] in BASELINES and s["tokens_equal_plain"] is False
    ]
    doc["harvest_losses"] = [
        {"context": h["context"], "batch": h["batch"], "mode": mode, "against": against, **got}
        for h in doc["headline"]
        for mode in HARVEST
        if mode in h
        for against in ("best_baseline", PLAIN)
        for got in [h[mode].get(f"vs_{against}")]
        if got is not None and float(got["median"]) < 1
    ]
    h2d = (doc.get("pinned_h2d_1GiB") or {}).get("GBps")
    host = [r for r in doc["reload"] if r["mode"] == "harvest-host"]
    if h2d and host:
        largest = max(r["bytes"] for r in host)
        rates = [r["GBps"] for r in host if r["bytes"] == largest]
        doc["host_reload_over_pinned_h2d"] = {
            k: round(v / h2d, 3) if isinstance(v, float) else v
            for k, v in spread(rates).items()
            if k != "values"
        }
    doc["all_reloads_verified"] = all(r["verified"] for r in doc["reload"])
    failures = []
    if not doc["harvest_tokens_equal_plain"]:
        failures.append("Harvest's tokens differ from plain's (or had no reference)")
    if not doc["harvest_logits_equal_plain"]:
        failures.append("Harvest's last-step logits differ from plain's")
    if not doc["all_reloads_verified"]:
        failures.append("a reload from the leases returned other bytes")
    failures += [
        f"{e['mode']} failed at context {e['context']} batch {e['batch']}: {e['error']}"
        for e in doc["errors"]
        if e["mode"] in HARVEST or e["mode"] in PLACED_MODES or e["mode"] == PLAIN
    ]
    doc["failures"] = failures
    doc["ok"] = not failures


def summary_row(
    key: tuple[int, int], mode: str, runs: list[dict[str, Any]], layers: int
) -> dict[str, Any]:
    """One mode's runs at one context and batch: median (min-max) and the verdict."""
    tokens: bool | None = all(r["tokens_equal_plain"] for r in runs)
    logits: bool | None = all(r["logits_equal_plain"] for r in runs)
    if any(r["tokens_equal_plain"] is None for r in runs):
        tokens = logits = None
    row: dict[str, Any] = {
        "context": key[0],
        "batch": key[1],
        "mode": mode,
        "repeats": len(runs),
        "steps": min(r["steps"] for r in runs),
        "warmup": runs[0]["warmup"],
        "tokens_per_s": spread([r["tokens_per_s"] for r in runs]),
        "ms_per_step": spread([r["ms_per_step"] for r in runs]),
        "load_s": spread([r["load_s"] for r in runs]),
        "kv_bytes": runs[0]["kv_bytes"],
        "tokens_equal_plain": tokens,
        "logits_equal_plain": logits,
        "verdict": verdict(mode, tokens, logits),
    }
    for field in MEMORY_FIELDS:
        values = [r[field] for r in runs if r.get(field) is not None]
        row[field] = spread(values) if values else None
    per_layer = row["kv_bytes"] / layers
    held = row["gpu_bytes_with_leases"] or row["gpu_bytes"]
    if held is not None:  # layers' worth of K/V on this GPU
        row["gpu_layers"] = round(float(held["median"]) / per_layer, 2)
    if mode in HARVEST or mode in PLACED_MODES:
        row["revocations"] = [r["revocations"] for r in runs]
    return row


def placed_ratios(runs: list[dict[str, Any]], best: str | None) -> dict[str, Any]:
    """The placed modes' tokens per second against other modes', per repeat: median
    (min-max), None where either did not run; and whether issue 15's target is met."""
    rate = {(r["mode"], r["repeat"]): r["tokens_per_s"] for r in runs}

    def ratio(mode: str, against: str | None) -> dict[str, Any] | None:
        values = [
            rate[(mode, r)] / rate[(against, r)]
            for m, r in sorted(rate)
            if m == mode and against is not None and (against, r) in rate
        ]
        return spread(values) if values else None

    out: dict[str, Any] = {
        "harvest_gpu_placed_vs_plain": ratio("harvest-gpu-placed", PLAIN),
        "harvest_gpu_placed_vs_best_baseline": ratio("harvest-gpu-placed", best),
        "harvest_gpu_placed_vs_harvest_gpu": ratio("harvest-gpu-placed", "harvest-gpu"),
        "host_placed_vs_plain": ratio("host-placed", PLAIN),
        "host_placed_vs_harvest_host": ratio("host-placed", "harvest-host"),
        "host_placed_vs_pinned_host_readonly": ratio("host-placed", "pinned-host-readonly"),
    }
    vs_plain = out["harvest_gpu_placed_vs_plain"]
    out["harvest_gpu_placed_meets_target"] = (
        None if vs_plain is None else float(vs_plain["median"]) >= TARGET_VS_PLAIN
    )
    return out


def headline(
    key: tuple[int, int], runs: list[dict[str, Any]], by_mode: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Each Harvest mode against the fastest baseline with plain's tokens, and against
    plain: median (min-max) of the ratios of runs of the same repeat."""
    valid = [m for m in BASELINES if m in by_mode and by_mode[m]["tokens_equal_plain"]]
    best = max(valid, key=lambda m: by_mode[m]["tokens_per_s"]["median"], default=None)
    out: dict[str, Any] = {
        "context": key[0],
        "batch": key[1],
        "best_baseline": best,
        "best_baseline_tokens_per_s": by_mode[best]["tokens_per_s"] if best else None,
        "baselines_left_out": [
            m for m in BASELINES if m in by_mode and not by_mode[m]["tokens_equal_plain"]
        ],
    }
    rate = {(r["mode"], r["repeat"]): r["tokens_per_s"] for r in runs}
    for mode in HARVEST:
        if mode not in by_mode:
            continue
        got: dict[str, Any] = {"tokens_per_s": by_mode[mode]["tokens_per_s"]}
        for name, against in (("best_baseline", best), (PLAIN, PLAIN)):
            ratios = [
                rate[(mode, r)] / rate[(against, r)]
                for r in sorted({r for m, r in rate if m == mode})
                if against is not None and (against, r) in rate
            ]
            got[f"vs_{name}"] = spread(ratios) if ratios else None
        vs = got["vs_best_baseline"]
        got["loses_to_best_baseline"] = None if vs is None else float(vs["median"]) < 1
        out[mode] = got
    return out
