"""The tables ``scripts/bench_kv.py`` ends with, printed from its JSON document alone (tokens
per second, GPU memory, the headline, the placed modes' ratios, reloads, verdicts and
failures), and the context-by-batch label the tables and the plot share.
"""

from __future__ import annotations

from typing import Any, Callable

from benchkit.kvmodes import HARVEST, KNOWN, PLAIN
from benchkit.stats import fmt, spread
from harvestd.sizes import GiB, MiB


def label(context: int, batch: int) -> str:
    """``context x batch`` as the tables and the plot name a point (``8k x 1``)."""
    return f"{context // 1024}k x {batch}" if context >= 1024 else f"{context} x {batch}"


def report(doc: dict[str, Any]) -> None:
    """The tables the run ends with."""
    print(
        f"\n{doc['device']}: {doc['model']['layers']} {doc['model']['shape']}, "
        f"{doc['block_tokens']}-token blocks; {doc['repeats']} repeats of {doc['steps']} "
        f"timed steps (after {doc['warmup']}), modes alternating; median (min-max)"
    )
    summaries = doc["summary"] + doc["placed"]["summary"]
    summary = {(s["context"], s["batch"], s["mode"]): s for s in summaries}
    keys = sorted({(s["context"], s["batch"]) for s in summaries})
    modes = [m for m in KNOWN if any(s["mode"] == m for s in summaries)]

    def table(cell: Callable[[dict[str, Any] | None], str]) -> None:
        """A row per context x batch, a column per mode; ``cell`` of each mode's summary."""
        print(f"{'context x batch':>16s} " + " ".join(f"{m:>24s}" for m in modes))
        for key in keys:
            cells = [cell(summary.get((*key, m))) for m in modes]
            print(f"{label(*key):>16s} " + " ".join(f"{c:>24s}" for c in cells))

    def tokens_per_s(s: dict[str, Any] | None) -> str:
        if s is None:
            return "-"
        return fmt(s["tokens_per_s"]) + ("*" if s["tokens_equal_plain"] is False else "")

    def gpu_mib(s: dict[str, Any] | None) -> str:
        if s is None or s["gpu_bytes"] is None:
            return "-"
        mib = float(s["gpu_bytes"]["median"]) / MiB
        cell = f"{mib:.0f}"
        if s["gpu_bytes_with_leases"] is not None:
            cell += f"+{float(s['gpu_bytes_with_leases']['median']) / MiB - mib:.0f}"
        return f"{cell} ({s['gpu_layers']})"

    def nvml_mib(s: dict[str, Any] | None) -> str:
        nv = s["nvml_delta_bytes"] if s else None
        return f"{float(nv['median']) / MiB:.0f}" if nv else "-"

    print("\ndecode tokens/s (* tokens differ from plain's)")
    table(tokens_per_s)
    if any(s["gpu_bytes"] is not None for s in summaries):
        print(
            "\nGPU MiB held at steady state (torch allocated, + leases on this GPU for "
            "harvest-gpu and harvest-gpu-placed; in layers' worth of K/V)"
        )
        table(gpu_mib)
        if any(s["nvml_delta_bytes"] is not None for s in summaries):
            print(
                "\nwhole-GPU used memory added since before the cache (NVML, MiB; every "
                "process; a lender's pooled memory shows only when first allocated)"
            )
            table(nvml_mib)
    print("\nHarvest against the best baseline with plain's tokens, and against plain")
    for h in doc["headline"]:
        best = h["best_baseline"] or "none"
        for mode in HARVEST:
            if mode not in h:
                continue
            got = h[mode]
            vs_best = fmt(got["vs_best_baseline"], digits=2) if got["vs_best_baseline"] else "-"
            vs_plain = fmt(got["vs_plain"], digits=2) if got["vs_plain"] else "-"
            lose = "  <- Harvest loses" if got["loses_to_best_baseline"] else ""
            print(
                f"{label(h['context'], h['batch']):>16s} {mode:13s} x{vs_best} {best}, "
                f"x{vs_plain} plain{lose}"
            )
    report_placed(doc)
    for context, batch, mode in sorted(
        {(r["context"], r["batch"], r["mode"]) for r in doc["reload"]}
    ):
        rows = [
            r
            for r in doc["reload"]
            if (r["context"], r["batch"], r["mode"]) == (context, batch, mode)
        ]
        print(
            f"reload {mode:13s} {label(context, batch)}, {rows[0]['bytes'] / GiB:.2f} GiB: "
            f"{fmt(spread([r['GBps'] for r in rows]))} GB/s"
        )
    if doc.get("pinned_h2d_1GiB"):
        print(f"pinned host-to-device copy of 1 GiB: {doc['pinned_h2d_1GiB']['GBps']:.1f} GB/s")
    if "host_reload_over_pinned_h2d" in doc:
        got = doc["host_reload_over_pinned_h2d"]
        print(f"host-lease reload / pinned H2D: {got['median']} ({got['min']}-{got['max']})")
    for s in summaries:
        if s["mode"] != PLAIN and s["tokens_equal_plain"] is not True:
            print(f"{label(s['context'], s['batch'])} {s['mode']}: {s['verdict']}")
    print(
        f"Harvest's tokens equal plain's: {doc['harvest_tokens_equal_plain']}; logits: "
        f"{doc['harvest_logits_equal_plain']}; reloads verified: {doc['all_reloads_verified']}"
    )
    for mode, why in {**doc["skipped_modes"], **doc["placed"]["skipped_modes"]}.items():
        print(f"{mode}: {why}")
    for err in doc["errors"]:
        print(
            f"FAILED {err['mode']} {label(err['context'], err['batch'])} "
            f"repeat {err['repeat']}: {err['error']}"
        )
    for failure in doc["failures"]:
        print(f"FAIL: {failure}")


def report_placed(doc: dict[str, Any]) -> None:
    """The placed modes' ratios (issue 15), one line per context, batch and ratio."""
    names = {
        "harvest_gpu_placed_vs_plain": "harvest-gpu-placed / plain",
        "harvest_gpu_placed_vs_best_baseline": "harvest-gpu-placed / best baseline",
        "harvest_gpu_placed_vs_harvest_gpu": "harvest-gpu-placed / harvest-gpu",
        "host_placed_vs_plain": "host-placed / plain",
        "host_placed_vs_harvest_host": "host-placed / harvest-host",
        "host_placed_vs_pinned_host_readonly": "host-placed / pinned-host-readonly",
    }
    lines = [
        (h, name, h[key])
        for h in doc["placed"]["headline"]
        for key, name in names.items()
        if h[key]
    ]
    if not lines:
        return
    target = doc["placed"]["target_vs_plain"]
    print(f"\nplaced K/V, read in place (issue 15; target: harvest-gpu-placed >= {target} x plain)")
    for h, name, got in lines:
        miss = ""
        if (
            name == names["harvest_gpu_placed_vs_plain"]
            and not h["harvest_gpu_placed_meets_target"]
        ):
            miss = "  <- below the target"
        print(f"{label(h['context'], h['batch']):>16s} {name:36s} x{fmt(got, digits=2)}{miss}")
