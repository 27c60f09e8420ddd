#!/usr/bin/env python3
"""MoE decode with experts offloaded, against the strongest baselines, in one run: every
expert resident (the ceiling), the best host offload a user would write (routed experts
only, from a pinned host copy, fetched on a side stream), accelerate's CPU offload with
pinned weights and as called by default, and Harvest (experts in host leases, or in GPU
leases).

Models are built from their configs with random weights (no downloads): a Mixtral-8x7B-
shaped and a Qwen1.5-MoE-A2.7B-shaped model (the real expert shapes), with fewer layers so
that every mode's copy fits on one GPU at once. For each model, offloaded fraction and
batch size, one run sets up every mode once and then decodes greedily (a --prompt-token
prefill, --warmup untimed steps, --steps timed steps, each step timed alone) --repeats
times, the modes in a different order each repeat (``benchkit.stats.alternating``);
figures are the median with min-max over the repeats, and the JSON keeps every repeat
(and every step's time). Every mode's tokens are compared with ``resident``'s: a
baseline that differs is reported, and the exit status is non-zero only when Harvest's
tokens differ (or a Harvest mode fails).

Modes (``MODES``; the JSON's ``how`` says the same for each):

- ``resident``: transformers' own model, untouched, every expert on the GPU, eager
  experts. The ceiling and the reference tokens.
- ``resident-same-code``: Harvest's experts module with nothing offloaded
  (``offload_experts(fraction=0)``): the offloaded modes' code without fetches.
- ``best-host-offload``: the routed experts only, read from the model's own pinned host
  copy with one DMA copy each on a side stream as soon as the router has picked, the
  resident experts computing meanwhile. That is Harvest's own path with nothing borrowed
  (``offload_experts(..., borrow_bytes=0, refill_every=None)``): no lease, every read
  from the pinned host copy; each run checks that every read came from that tier.
- ``accelerate-pinned``: ``accelerate.cpu_offload`` of the fused experts modules of
  round(fraction x layers) layers (accelerate offloads whole modules: the same bytes),
  with its ``state_dict`` argument, the host copy it reads from, in pinned memory.
  accelerate 1.15 has no pinned option of its own; its hook copies each weight
  synchronously and empties the CUDA cache after each one, as accelerate does.
- ``accelerate-default``: the same ``cpu_offload`` call without ``state_dict``: accelerate
  keeps a pageable copy (``param.to("cpu")``), as users run it.
- ``harvest-host`` / ``harvest-gpu``: that fraction of every layer's experts in host
  leases / GPU leases (``backends=("host",)`` / ``("cuda-vmm",)``).

Headlines: harvest-gpu against best-host-offload and against resident, each the median of
the per-repeat ratios with min-max. The PCIe bound of a run that copies experts: the
bytes it copied per timed step over the pinned host-to-device bandwidth measured in the
same run. A revocation run (per model, batch 1, half the experts) decodes from GPU leases
while the lender's tenant reclaims a slab every --revoke-every seconds (and gives the
memory back half a period later), against the same offload without revocations and
against host leases, also --repeats times in alternating order, each repeat counting its
revocations. Where harvest-gpu-placed is among --modes, a second revocation run does the
same for placed tensors: the placed experts in GPU leases while the tenant reclaims (each
revoked lease's chunks remapped to the host copy, read there in place until a refill),
against the same placed offload without revocations, against the all-host placed run
(host-placed: nothing leased) and against the copy path's host leases.

GPU memory: each mode records what its setup kept on the GPU (torch's allocator and NVML's
figure for this process) and, from it, its staging: the borrower's own GPU memory beyond
the model's own non-offloaded part (``FIELDS`` says how each is measured).

The defaults are sized for the GPU suite (scripts/gpu_bench.sh): both models at 2 layers,
half the experts offloaded, batch 1, 3 repeats of 64 steps; about 2.5 to 3.5 minutes on an
H200 (estimated from the H100 run), over half of it accelerate-default's 3 x 66 steps of
Mixtral (each copies a whole layer's experts, 2.8 GB, from pageable memory). That
estimate predates the placed revocation run, which adds three setups and 12 runs per
model (not yet timed on a GPU):

    python scripts/bench_moe.py --lender-gpu 0 --out bench/results/moe.json

Batch 16 as well (about 5 to 6.5 minutes; a device call of its own):

    python scripts/bench_moe.py --lender-gpu 0 --batches 1,16 --out bench/results/moe_b16.json

    python scripts/bench_moe.py --smoke          # tiny, on the CPU, with a host node
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from benchkit.gpumem import gpu_memory, grown
from benchkit.moecompare import run_fraction
from benchkit.moedecode import pinned_h2d_gbps
from benchkit.moemodels import build
from benchkit.moemodes import FIELDS, HARVEST_MODES, HOW, MODES, OPTIONAL_MODES
from benchkit.moeplot import plot
from benchkit.moereport import Verdict, headline_line, print_row, row_label, summarise
from benchkit.moerevoke import run_placed_revocations, run_revocations
from benchkit.moesetup import release
from benchkit.node import REPO, bench_node, steady_attention
from benchkit.stats import MIN_REPEATS, MIN_STEPS

log = logging.getLogger("bench_moe")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line, checked and converted (``--smoke``'s settings applied), and its
    parser (for its defaults and errors)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--lender-gpu", default="0", help="the GPU(s) lending (index or UUID)")
    parser.add_argument("--device", default="cuda:0", help="the model's device")
    parser.add_argument("--models", default="mixtral,qwen2-moe")
    parser.add_argument("--mixtral-layers", type=int, default=2)
    parser.add_argument("--qwen-layers", type=int, default=2)
    parser.add_argument("--fractions", default="0.5")
    parser.add_argument("--batches", default="1")
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"of {', '.join(MODES + OPTIONAL_MODES)} (resident is always run)",
    )
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--steps", type=int, default=MIN_STEPS, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=MIN_REPEATS)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--slab-bytes", default="1GiB")
    parser.add_argument("--revoke-every", type=float, default=0.3)
    parser.add_argument(
        "--revoke-seconds",
        type=float,
        default=1.5,
        help="the revoked run decodes at least this long (and at least --steps steps)",
    )
    parser.add_argument("--revoke-models", default="mixtral,qwen2-moe")
    parser.add_argument("--host-bytes", default="40GiB")
    parser.add_argument("--cap", default="30GiB")
    parser.add_argument("--out", default=str(REPO / "bench/results/moe.json"))
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU")
    parser.add_argument(
        "--compute",
        choices=("eager", "grouped"),
        default="eager",
        help="how Harvest's experts module computes (offload_experts' compute=); grouped "
        "runs are checked against the same module with nothing offloaded",
    )
    parser.add_argument(
        "--spy",
        action="store_true",
        help="dump every thread's stack (py-spy) mid-way through the first revoked run",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print torch.profiler's top ops for each Harvest mode's decode",
    )
    args = parser.parse_args(argv)
    from harvestd.sizes import parse_size

    if args.smoke:
        args.device, args.batches = "cpu", "1,3"
        args.host_bytes, args.slab_bytes, args.revoke_seconds = "256MiB", "256KiB", 1.0
        args.mixtral_layers, args.qwen_layers = 2, 2
        args.modes = ",".join([*MODES, "host-placed"])
    if args.repeats < MIN_REPEATS or args.steps < MIN_STEPS:
        parser.error(f"--repeats must be >= {MIN_REPEATS} and --steps >= {MIN_STEPS}")
    args.slab_bytes = parse_size(args.slab_bytes)
    args.fractions = [float(f) for f in args.fractions.split(",")]
    if not all(0.0 < f <= 1.0 for f in args.fractions):
        parser.error("--fractions must lie in (0, 1]")
    args.batches = [int(b) for b in args.batches.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - set(MODES + OPTIONAL_MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}")
    required = {"resident"} | ({"resident-same-code"} if args.compute == "grouped" else set())
    args.modes = [m for m in MODES + OPTIONAL_MODES if m in set(modes) | required]
    args.revoke_models = args.revoke_models.split(",")
    args.layers = {"mixtral": args.mixtral_layers, "qwen2-moe": args.qwen_layers}
    return parser, args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print tables; write JSON and a plot. Exit status 1 when
    Harvest's tokens differ from their reference or a Harvest mode failed."""
    parser, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    attention = steady_attention()
    print(attention)
    result: dict[str, Any] = {
        "benchmark": "moe_decode",
        "command": " ".join(["python"] + sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "host": platform.node(),
        "dtype": str(dtype),
        "lender_gpu": args.lender_gpu,
        "attention": attention,
        "same_gpu": device.type == "cuda" and str(device.index or 0) == str(args.lender_gpu),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parameters": {k: v for k, v in vars(args).items() if k != "layers"}
        | {"layers": args.layers},
        "statistics": {
            "repeats": args.repeats,
            "steps": args.steps,
            "warmup": args.warmup,
            "order": "every mode once per repeat, the order rotated by one and reversed "
            "every other repeat (benchkit.stats.alternating); the order is in each row",
            "figures": "median with min and max over the repeats; every repeat kept "
            "(runs), with every timed step (step_ms); a ratio is the median of the "
            "per-repeat ratios, with their min and max",
        },
        "modes": {m: HOW[m] for m in args.modes},
        "fields": FIELDS,
        "rows": [],
    }
    out = Path(
        args.out
        if not args.smoke or args.out != parser.get_default("out")
        else "/tmp/moe_smoke.json"
    )
    verdict = Verdict()
    began = time.monotonic()

    def save() -> None:
        result["verdict"] = verdict.as_dict()
        result["elapsed_s"] = round(time.monotonic() - began, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))

    def emit(row: dict[str, Any]) -> None:
        label = row_label(row)
        for mode, entry in row["modes"].items():
            harvest = bool(row.get("experiment")) or mode in HARVEST_MODES
            verdict.check(label, mode, entry, harvest)
        result["rows"].append(row)
        print_row(row)
        sys.stdout.flush()
        save()

    backend = "host" if device.type == "cpu" else "cuda-vmm"
    with bench_node(
        backend=backend,
        gpus=None if backend == "host" else args.lender_gpu,
        cap=None if backend == "host" else args.cap,
        host_bytes=args.host_bytes,
        reserve=None if backend == "host" else "4GiB",
        ttl=30,
        grace=2,
    ) as node:
        result["pinned_h2d_gbps"] = pinned_h2d_gbps(device)
        print(f"pinned host-to-device, 1 GiB: {result['pinned_h2d_gbps']:.1f} GB/s")
        with node.connect() as client:
            lenders = {l["backend"]: l for l in node.lenders()}
            for name in args.models.split(","):
                release(device)
                before = gpu_memory(device)
                base = build(name, args.layers[name], device, dtype, args.smoke)
                release(device)
                # What the model as built holds: resident's figures, and each mode's
                # staging is what it holds beyond this less what it offloaded.
                model_gpu = grown(before, gpu_memory(device))
                for fraction in args.fractions:
                    try:
                        run_fraction(
                            name,
                            base,
                            fraction,
                            args,
                            client,
                            lenders,
                            device,
                            result["pinned_h2d_gbps"],
                            emit,
                            model_gpu,
                        )
                    except Exception as exc:  # noqa: BLE001 - the other models still run
                        # Without resident's tokens no Harvest run is checked: a failure.
                        log.exception("%s fraction %s failed", name, fraction)
                        verdict.harvest_errors.append(
                            f"{name} fraction {fraction}: {type(exc).__name__}: {exc}"
                        )
                        save()
                if args.revoke_every > 0 and name in args.revoke_models:
                    runs = [("revocations", run_revocations)]
                    if "harvest-gpu-placed" in args.modes:
                        runs.append(("revocations-placed", run_placed_revocations))
                    for what, run in runs:
                        try:
                            run(name, base, args, client, lenders, device, emit, model_gpu)
                        except Exception as exc:  # noqa: BLE001 - as above
                            log.exception("%s %s failed", name, what)
                            verdict.harvest_errors.append(
                                f"{name} {what}: {type(exc).__name__}: {exc}"
                            )
                            save()
                del base
                release(device)
    result["summary"] = summarise(result)
    save()
    print("\nheadlines (median of per-repeat ratios, min-max):")
    for label, heads in result["summary"].items():
        for key, h in heads.items():
            print(f"  {label}: {headline_line(key, h)}")
    v = result["verdict"]
    for line in v["baselines_with_other_tokens"]:
        print(f"baseline with other tokens (reported, not a failure): {line}")
    for line in v["baseline_errors"]:
        print(f"baseline failed (reported, not a failure of the run): {line}")
    for line in v["harvest_mismatches"]:
        print(f"HARVEST TOKENS DIFFER: {line}")
    for line in v["harvest_errors"]:
        print(f"HARVEST MODE FAILED: {line}")
    if not v["failed"]:
        print("Harvest's tokens: identical to their reference in every run")
    plot(result, out.with_suffix(".png"))
    print(f"results: {out} ({result['elapsed_s']} s)")
    return 1 if v["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
