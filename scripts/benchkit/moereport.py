"""What a run of ``scripts/bench_moe.py`` tells its reader: each row as a table (every
mode's median with min-max, its staging, its tokens' verdict), the headlines by row, and
the verdict on tokens and failures over every row (:class:`Verdict`), which decides the
exit status."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from benchkit.stats import fmt
from harvestd.sizes import MiB


@dataclass
class Verdict:
    """What the run found about tokens and failures, over every row."""

    harvest_mismatches: list[str] = field(default_factory=list)
    harvest_errors: list[str] = field(default_factory=list)
    baselines_with_other_tokens: list[str] = field(default_factory=list)
    baseline_errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The verdict as the JSON keeps it; ``failed`` (Harvest's tokens differ or a
        Harvest mode failed) is the exit status."""
        return {
            "harvest_tokens_identical": not self.harvest_mismatches,
            "harvest_mismatches": self.harvest_mismatches,
            "harvest_errors": self.harvest_errors,
            "baselines_with_other_tokens": self.baselines_with_other_tokens,
            "baseline_errors": self.baseline_errors,
            "failed": bool(self.harvest_mismatches or self.harvest_errors),
        }

    def check(self, label: str, mode: str, entry: dict[str, Any], harvest: bool) -> None:
        """Note what ``entry`` (``mode`` of the row ``label``) shows: an error, a Harvest
        mode with no reference, or tokens that differ (``harvest``: a Harvest mode, whose
        failures fail the run; a baseline's are only reported)."""
        if entry.get("status") == "error":
            (self.harvest_errors if harvest else self.baseline_errors).append(
                f"{label} {mode}: {entry.get('error')}"
            )
        elif harvest and entry.get("status") == "measured" and "tokens_identical" not in entry:
            self.harvest_errors.append(f"{label} {mode}: no reference tokens to check against")
        elif entry.get("tokens_identical") is False:
            if harvest:
                self.harvest_mismatches.append(f"{label} {mode}")
            else:
                self.baselines_with_other_tokens.append(
                    f"{label} {mode} (against {entry.get('reference')})"
                )


def print_row(row: dict[str, Any]) -> None:
    """A row as a table: each mode's median (min-max) over the repeats, and its staging
    (``FIELDS``: torch's figure / NVML's, MiB)."""
    what = f"{row['experiment']}, " if row.get("experiment") else ""
    modes = row["modes"]
    measured = [m for m in modes.values() if m.get("status") == "measured"]
    shape = (
        f"{measured[0]['repeats']} repeats x >= {measured[0]['steps']} steps" if measured else ""
    )
    print(
        f"\n{row['model']} batch {row['batch']} fraction {row['fraction']} ({what}"
        f"{row['layers']} layers; {shape}; median (min-max); {row['elapsed_s']} s)"
    )
    print(
        f"  {'mode':<26} {'tokens/s':>26} {'step ms':>24} {'of PCIe bound':>20} "
        f"{'staging MiB torch/NVML':>22}  tokens"
    )
    for mode, m in modes.items():
        if m.get("status") != "measured":
            print(f"  {mode:<26} {m.get('status')} {m.get('error', '')}")
            continue
        bound = fmt(m["of_pcie_bound"], digits=2) if "of_pcie_bound" in m else "-"
        if m["reference"] == mode:
            verdict = "reference" if m.get("tokens_identical") else "reference; repeats DIFFER"
        elif m.get("tokens_identical"):
            verdict = f"identical to {m['reference']}"
        else:
            verdict = f"DIFFER from {m['reference']}"
        extra = revocation_note(m) + memory_note(m)
        if m.get("all_borrowed") is False:
            extra += "  (NOT every expert borrowed: some read from the host copy)"
        print(
            f"  {mode:<26} {fmt(m['tokens_per_s'], digits=2):>26} "
            f"{fmt(m['step_ms_median'], digits=2):>24} {bound:>20} {staging_cell(m):>22}"
            f"  {verdict}{extra}"
        )
    for key, h in row["headline"].items():
        print(f"  {headline_line(key, h)}")


def revocation_note(m: dict[str, Any]) -> str:
    """What a mode's runs saw of revocations, for its line in the table."""
    if "revocations" in m:
        placed = "remap_ms" in m
        note = (
            f"  leases revoked per repeat {m['revocations']}, seen by its "
            f"{'placed tensors' if placed else 'cache'} {m['revocations_seen']}"
        )
        if m.get("remap_ms"):
            note += f", remap ms {fmt(m['remap_ms'], digits=2)}"
        return note
    if any(r.get("revocations_seen") for r in m["runs"]):
        return "  (REVOKED during the run)"
    return ""


def staging_cell(m: dict[str, Any]) -> str:
    """A mode's staging, MiB: torch's figure / NVML's (``-`` where unknown)."""
    cells = [m.get(k) for k in ("staging_bytes", "staging_process_bytes")]
    if cells[0] is None:
        return "-"
    return " / ".join("-" if c is None else f"{c / MiB:.1f}" for c in cells)


def memory_note(m: dict[str, Any]) -> str:
    """What to compare a placed mode's staging with (one page per placed object), and
    what a mode's runs allocated and kept (the copy path's staging rows)."""
    note = ""
    if m.get("staging_bytes") is not None and m.get("placed_objects"):
        n, page = m["placed_objects"], m["placed_chunk_bytes"] / MiB
        note += f"  (vs one page per placed object: {n} x {page:g} = {n * page:g} MiB)"
    growth = m.get("gpu_allocated_growth_bytes")
    if growth is not None and growth >= MiB:
        note += f"  (+{growth / MiB:.1f} MiB kept after its steps)"
    return note


def row_label(row: dict[str, Any]) -> str:
    """How the summary and the verdicts name a row."""
    if row.get("experiment"):
        return f"{row['model']} {row['experiment']}"
    return f"{row['model']} batch {row['batch']} fraction {row['fraction']}"


def headline_line(key: str, h: dict[str, Any] | None) -> str:
    """A headline in one line: its ratio and baseline, or why there is none."""
    if h is None:
        return f"{key}: -"
    if "ratio" not in h:
        return f"{key}: {h.get('unavailable')}"
    return f"{key}: {fmt(h['ratio'], digits=2)} x (baseline: {h['baseline']})"


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """The headlines of every row, by row."""
    out: dict[str, Any] = {}
    for row in result["rows"]:
        out[row_label(row)] = row["headline"]
    return out
