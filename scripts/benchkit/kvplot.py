"""The figure ``scripts/bench_kv.py`` writes next to its JSON: decode tokens per second by mode
and the GPU memory each holds, one group per context and batch, drawn from the document
alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchkit.kvmodes import KNOWN
from benchkit.kvreport import label
from benchkit.node import pyplot
from harvestd.sizes import GiB


def plot(doc: dict[str, Any], path: Path) -> None:
    """Tokens per second by mode (median, min-max bars; hatched: tokens differ from
    plain's), and the GPU memory each holds, one group per context and batch."""
    plt = pyplot()
    if plt is None:
        return
    rows = doc["summary"] + doc["placed"]["summary"]
    summary = {(s["context"], s["batch"], s["mode"]): s for s in rows}
    keys = sorted({(s["context"], s["batch"]) for s in rows})
    modes = [m for m in KNOWN if any(s["mode"] == m for s in rows)]
    has_memory = any(s["gpu_bytes"] is not None for s in rows)
    fig, axes = plt.subplots(
        2 if has_memory else 1, 1, figsize=(11, 8 if has_memory else 4.5), squeeze=False
    )
    width = 0.8 / len(modes)
    xs = range(len(keys))
    for j, mode in enumerate(modes):
        at = [summary.get((*key, mode)) for key in keys]
        med = [float(s["tokens_per_s"]["median"]) if s else 0.0 for s in at]
        lo = [med[i] - float(s["tokens_per_s"]["min"]) if s else 0.0 for i, s in enumerate(at)]
        hi = [float(s["tokens_per_s"]["max"]) - med[i] if s else 0.0 for i, s in enumerate(at)]
        bars = axes[0][0].bar(
            [i + j * width for i in xs], med, width, yerr=[lo, hi], capsize=2, label=mode
        )
        for bar, s in zip(bars, at, strict=True):
            if s and s["tokens_equal_plain"] is False:
                bar.set_hatch("//")
        if has_memory:
            mem = [float(s["gpu_bytes"]["median"]) / GiB if s and s["gpu_bytes"] else 0 for s in at]
            bars = axes[1][0].bar([i + j * width for i in xs], mem, width, label=mode)
            leased = [
                float(s["gpu_bytes_with_leases"]["median"]) / GiB - mem[i]
                if s and s.get("gpu_bytes_with_leases")
                else 0.0
                for i, s in enumerate(at)
            ]
            if any(leased):  # GPU leases on one GPU: this GPU's memory
                axes[1][0].bar(
                    [i + j * width for i in xs],
                    leased,
                    width,
                    bottom=mem,
                    color=bars[0].get_facecolor(),
                    hatch="xx",
                    alpha=0.5,
                )
    ticks = [i + width * (len(modes) - 1) / 2 for i in xs]
    ax = axes[0][0]
    ax.set_xticks(ticks)
    ax.set_xticklabels([label(*key) for key in keys])
    ax.set_ylabel("decode tokens/s (median, min-max)")
    ax.set_yscale("log")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=3)
    ax.set_title(
        f"{doc['device']}: decode with the KV cache off the GPU ({doc['model']['layers']} "
        f"layers, {doc['repeats']} x {doc['steps']} steps; hatched: other tokens than plain)"
    )
    if has_memory:
        ax = axes[1][0]
        ax.set_xticks(ticks)
        ax.set_xticklabels([label(*key) for key in keys])
        ax.set_xlabel("context tokens x batch")
        ax.set_ylabel("GPU GiB held (hatched: leases on it)")
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
