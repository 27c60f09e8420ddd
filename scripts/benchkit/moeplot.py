"""The plot of a run of ``scripts/bench_moe.py``: decode tokens/s of every mode, median
with min-max, a panel per model and batch (the revocation rows are left to the tables);
nothing is drawn without matplotlib."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchkit.moemodes import MODES, OPTIONAL_MODES
from benchkit.node import pyplot


def plot(result: dict[str, Any], path: Path) -> None:
    """Tokens/s of every mode, median with min-max, one panel per model and batch."""
    plt = pyplot()
    if plt is None:
        return
    rows = [r for r in result["rows"] if not r.get("experiment")]
    panels = sorted({(r["model"], r["batch"]) for r in rows})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (model, batch) in zip(axes[0], panels, strict=True):
        ours = sorted(
            (r for r in rows if r["model"] == model and r["batch"] == batch),
            key=lambda r: r["fraction"],
        )
        modes = [m for m in MODES + OPTIONAL_MODES if any(m in r["modes"] for r in ours)]
        width = 0.8 / max(1, len(modes))
        for i, mode in enumerate(modes):
            xs, med, lo, hi = [], [], [], []
            for j, r in enumerate(ours):
                m = r["modes"].get(mode, {})
                if m.get("status") != "measured":
                    continue
                s = m["tokens_per_s"]
                xs.append(j + (i - (len(modes) - 1) / 2) * width)
                med.append(s["median"])
                lo.append(s["median"] - s["min"])
                hi.append(s["max"] - s["median"])
            if xs:
                ax.bar(xs, med, width, yerr=[lo, hi], capsize=2, label=mode)
        ax.set_xticks(range(len(ours)), [f"{r['fraction']:.0%} offloaded" for r in ours])
        ax.set_yscale("log")
        ax.set_title(f"{model}, batch {batch}")
        ax.set_ylabel("decode tokens/s (median, min-max)")
        if ax is axes[0][0]:
            ax.legend(fontsize=7)
    fig.suptitle(result.get("device", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")
