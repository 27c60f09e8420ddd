#!/usr/bin/env python3
"""MoE decode with experts offloaded: everything resident, accelerate's CPU offload (as
users run it today), and Harvest (experts in host leases, or in GPU leases), in one run.

Models are built from their configs with random weights (no downloads): a Mixtral-8x7B-
shaped and a Qwen1.5-MoE-A2.7B-shaped model, with fewer layers so that the everything-
resident ceiling fits on one GPU. For each model, offloaded fraction and batch size, a
greedy decode of --tokens tokens is timed (after a prefill of --prompt tokens and
--warmup steps), and its tokens are compared with the resident model's (every mode runs
the eager experts implementation, so they must be identical; with --compute grouped,
Harvest's runs compute with grouped GEMMs and are compared with Harvest's module with
nothing offloaded, computed the same way). Harvest offloads that
fraction of every layer's experts; accelerate can only offload whole modules, so it
offloads the experts of that fraction of the layers (the same bytes).

The PCIe bound of a host-lease run: the offloaded expert bytes it fetched per decode
step over the pinned host-to-device bandwidth measured in the same run (1 GiB copy).
A revocation run reclaims the GPU lender's memory every --revoke-every seconds (and
gives it back half a period later) while Harvest decodes from GPU leases.

    python scripts/bench_moe.py --lender-gpu 0 --out bench/results/moe.json
    python scripts/bench_moe.py --lender-gpu 0 --compute grouped \
        --out bench/results/moe_grouped.json
    python scripts/bench_moe.py --smoke          # tiny, on the CPU, with a host node
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from benchkit.node import REPO, bench_node, pyplot, steady_attention

from harvestd.sizes import GiB

log = logging.getLogger("bench_moe")


def model_config(name: str, layers: int, smoke: bool) -> Any:
    """The transformers config of a model shape, with ``layers`` layers."""
    import transformers

    # experts_implementation: a keyword every config takes (PreTrainedConfig.__post_init__
    # keeps it) that transformers' typed signatures leave out.
    if name == "mixtral":
        return transformers.MixtralConfig(  # type: ignore[call-arg]
            num_hidden_layers=layers,
            max_position_embeddings=4096,
            experts_implementation="eager",
            vocab_size=256 if smoke else 32000,
            hidden_size=64 if smoke else 4096,
            intermediate_size=128 if smoke else 14336,
            num_attention_heads=4 if smoke else 32,
            num_key_value_heads=2 if smoke else 8,
            num_local_experts=8,
            num_experts_per_tok=2,
        )
    if name == "qwen2-moe":
        return transformers.Qwen2MoeConfig(  # type: ignore[call-arg]
            num_hidden_layers=layers,
            max_position_embeddings=4096,
            experts_implementation="eager",
            vocab_size=256 if smoke else 151936,
            hidden_size=64 if smoke else 2048,
            intermediate_size=128 if smoke else 5632,
            moe_intermediate_size=32 if smoke else 1408,
            shared_expert_intermediate_size=64 if smoke else 5632,
            num_attention_heads=4 if smoke else 16,
            num_key_value_heads=4 if smoke else 16,
            num_experts=16 if smoke else 60,
            num_experts_per_tok=4,
        )
    raise SystemExit(f"unknown model {name!r} (mixtral, qwen2-moe)")


def build(name: str, layers: int, device: torch.device, dtype: torch.dtype, smoke: bool) -> Any:
    """A model of that shape with random weights, made on ``device``."""
    import transformers

    config = model_config(name, layers, smoke)
    cls = {
        "mixtral": transformers.MixtralForCausalLM,
        "qwen2-moe": transformers.Qwen2MoeForCausalLM,
    }[name]
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode(
    model: Any,
    batch: int,
    prompt: int,
    tokens: int,
    warmup: int,
    device: torch.device,
    between: Callable[[], None] | None = None,
    seconds: float = 0.0,
) -> dict[str, Any]:
    """Greedy decode: prefill ``prompt`` tokens, ``warmup`` untimed steps, then ``tokens``
    timed steps (each timed alone; with ``seconds``, as many as run in that time, at
    least ``tokens``). Returns tokens/s and the tokens themselves."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=gen).to(device)
    steps: list[float] = []
    out: list[torch.Tensor] = []
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        i = 0
        while i < warmup + tokens or sum(steps) < seconds:
            sync(device)
            began = time.perf_counter()
            logits = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            if i >= warmup:
                steps.append(time.perf_counter() - began)
            out.append(nxt)
            i += 1
            if between is not None:
                between()
    total = sum(steps)
    return {
        "tokens_per_s": batch * len(steps) / total,
        "step_ms_median": statistics.median(steps) * 1e3,
        "step_ms_mean": total / len(steps) * 1e3,
        "step_ms": [s * 1e3 for s in steps],
        "tokens": torch.cat(out, dim=1)[:, warmup:].cpu(),
    }


def profile_steps(model: Any, batch: int, prompt: int, device: torch.device, label: str) -> None:
    """Print where three decode steps spend their time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        decode(model, batch, prompt, 3, 0, device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"--- profile: {label}")
    print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=40))
    print(
        prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=40
        )
    )


def spy_dump() -> None:
    """Print every thread's Python stack (py-spy, where it is installed): where the
    process spends a slow stretch."""
    import shutil
    import subprocess

    spy = shutil.which("py-spy") or next(
        (str(p) for p in (Path(d) / "bin" / "py-spy" for d in sys.path) if p.exists()), None
    )
    if spy is None:
        print("py-spy is not installed: no stack dump")
        return
    for _ in range(3):
        out = subprocess.run(
            [spy, "dump", "--pid", str(os.getpid())], capture_output=True, text=True, timeout=60
        )
        print("--- py-spy dump\n" + out.stdout + out.stderr, flush=True)
        time.sleep(0.1)


def pinned_h2d_gbps(device: torch.device, nbytes: int = GiB, repeats: int = 5) -> float:
    """The pinned host-to-device copy of ``nbytes`` (median of ``repeats``), GB/s."""
    if device.type != "cuda":
        return float("nan")
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del host, dev
    return nbytes / statistics.median(times[1:]) / 1e9


def accelerate_offload(model: Any, fraction: float, device: torch.device) -> int:
    """accelerate's CPU offload of the experts of ``fraction`` of the layers; the bytes
    it offloaded."""
    from accelerate import cpu_offload

    from client.moe import find_experts

    modules = list(find_experts(model).values())
    count = max(1, round(fraction * len(modules)))
    moved = 0
    for module in modules[:count]:
        moved += sum(p.numel() * p.element_size() for p in module.parameters())
        cpu_offload(module, execution_device=device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return moved


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


def reference(
    base: Any, client: Any, args: argparse.Namespace, batch: int, tokens: int, device: torch.device
) -> dict[str, Any]:
    """The tokens Harvest's runs must reproduce: every expert resident, computed as they
    compute (``--compute eager``: transformers' own eager experts; ``grouped``: Harvest's
    module with nothing offloaded, whose grouped GEMMs give other numerics than eager)."""
    from client.moe import offload_experts

    if args.compute == "eager":
        return decode(base, batch, args.prompt, tokens, args.warmup, device)
    model = copy.deepcopy(base)
    offload = offload_experts(model, client, fraction=0.0, backends=("host",), compute=args.compute)
    try:
        return decode(model, batch, args.prompt, tokens, args.warmup, device)
    finally:
        offload.close()
        del model
        gc.collect()


def run_model(
    name: str,
    args: argparse.Namespace,
    node: Any,
    client: Any,
    device: torch.device,
    dtype: torch.dtype,
    pinned: float,
    record: Callable[[dict[str, Any]], None],
) -> None:
    """Every mode, fraction and batch for one model shape (each offloaded model is set up
    once and decoded at every batch size)."""
    from client.moe import offload_experts

    base = build(name, args.layers[name], device, dtype, args.smoke)
    lenders = {l["backend"]: l for l in node.lenders()}
    # The reference tokens: transformers' own eager experts, every expert resident.
    refs = {}
    for batch in args.batches:
        refs[batch] = decode(base, batch, args.prompt, args.tokens, args.warmup, device)
        record(
            {
                "model": name,
                "mode": "resident-hf",
                "batch": batch,
                "fraction": 0.0,
                **_public(refs[batch]),
            }
        )
    hf_grouped: dict[int, dict[str, Any]] = {}
    if device.type == "cuda" and args.grouped:
        base.config._experts_implementation = "grouped_mm"
        try:
            for batch in args.batches:
                res = hf_grouped[batch] = decode(
                    base, batch, args.prompt, args.tokens, args.warmup, device
                )
                record(
                    {
                        "model": name,
                        "mode": "resident-grouped-mm",
                        "batch": batch,
                        "fraction": 0.0,
                        **_public(res),
                        "tokens_identical": bool(torch.equal(res["tokens"], refs[batch]["tokens"])),
                    }
                )
        except Exception as exc:  # noqa: BLE001 - informative only
            record(
                {
                    "model": name,
                    "mode": "resident-grouped-mm",
                    "batch": 0,
                    "fraction": 0.0,
                    "error": f"{type(exc).__name__}: {exc}",
                }
            )
        finally:
            base.config._experts_implementation = "eager"
    # accelerate runs transformers' eager experts: its tokens are checked against those.
    harvest_refs = (
        refs
        if args.compute == "eager"
        else {
            batch: reference(base, client, args, batch, args.tokens, device)
            for batch in args.batches
        }
    )
    # The ceiling: every expert resident, through the same code as Harvest's runs.
    runs = [("resident", 0.0)] + [
        (mode, f)
        for f in args.fractions
        for mode in args.modes
        if mode != "harvest-gpu" or "cuda-vmm" in lenders
    ]
    for mode, fraction in runs:
        model = copy.deepcopy(base)
        offload = None
        setup: dict[str, Any] = {}
        try:
            if mode == "accelerate":
                setup["offloaded_bytes"] = accelerate_offload(model, fraction, device)
            else:
                backends = ("cuda-vmm",) if mode == "harvest-gpu" else ("host",)
                offload = offload_experts(
                    model,
                    client,
                    fraction=fraction,
                    backends=backends,
                    slab_bytes=args.slab_bytes,
                    compute=args.compute,
                )
                setup.update(
                    offloaded_bytes=offload.stats.bytes_offloaded,
                    borrowed_bytes=offload.cache.borrowed_bytes,
                )
        except Exception as exc:  # noqa: BLE001 - one failed mode must not lose the rest
            log.exception("%s %s fraction %s: setup failed", name, mode, fraction)
            setup["error"] = f"{type(exc).__name__}: {exc}"
        for batch in args.batches:
            row: dict[str, Any] = {
                "model": name,
                "mode": mode,
                "batch": batch,
                "fraction": fraction,
                **setup,
            }
            if "error" not in setup:
                try:
                    ref = refs[batch] if mode == "accelerate" else harvest_refs[batch]
                    if mode == "resident" and args.compute == "grouped" and batch in hf_grouped:
                        ref = hf_grouped[batch]  # is Harvest's grouped module transformers'?
                    row.update(
                        measure(
                            model, offload, mode, batch, ref, args, device, pinned, f"{name} {mode}"
                        )
                    )
                except Exception as exc:  # noqa: BLE001 - as above
                    log.exception("%s %s batch %d fraction %s failed", name, mode, batch, fraction)
                    row["error"] = f"{type(exc).__name__}: {exc}"
            record(row)
        if offload is not None:
            offload.close()
        del model, offload
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.revoke_every > 0 and name in args.revoke_models:
        run_revocations(name, base, args, client, lenders, device, record)
    del base
    gc.collect()


def measure(
    model: Any,
    offload: Any,
    mode: str,
    batch: int,
    ref: dict[str, Any],
    args: argparse.Namespace,
    device: torch.device,
    pinned: float,
    label: str,
) -> dict[str, Any]:
    """One decode of a set-up model: tokens/s, tokens checked against ``ref``, and for a
    Harvest run what it fetched per step against the PCIe bound."""
    row: dict[str, Any] = {}
    if offload is None:  # accelerate: slow, so fewer steps
        res = decode(model, batch, args.prompt, args.accelerate_tokens, args.warmup, device)
        want = ref["tokens"][:, : args.accelerate_tokens]
    else:
        before = offload.stats.bytes_fetched
        fetched_at: list[int] = []
        res = decode(
            model,
            batch,
            args.prompt,
            args.tokens,
            args.warmup,
            device,
            between=lambda: fetched_at.append(offload.stats.bytes_fetched),
        )
        if args.profile and mode != "resident":
            profile_steps(model, batch, args.prompt, device, label)
        timed = fetched_at[-1] - (fetched_at[args.warmup - 1] if args.warmup else before)
        per_step = timed / args.tokens
        row.update(fetched_bytes_per_step=per_step, reads_by_tier=dict(offload.cache.stats.hits))
        if pinned == pinned and per_step:  # not NaN
            # Mean bytes over mean time: steps that route more offloaded experts move
            # more, so a median step would not match.
            bound_s = per_step / (pinned * 1e9)
            row.update(
                pcie_bound_step_ms=bound_s * 1e3,
                of_pcie_bound=bound_s / (res["step_ms_mean"] / 1e3),
            )
        want = ref["tokens"]
    row.update(_public(res), tokens_identical=bool(torch.equal(res["tokens"], want)))
    return row


def run_revocations(
    name: str,
    base: Any,
    args: argparse.Namespace,
    client: Any,
    lenders: dict[str, Any],
    device: torch.device,
    record: Callable[[dict[str, Any]], None],
) -> None:
    """Harvest on GPU leases while the lender's tenant keeps taking memory back; against
    Harvest on host leases and the resident tokens, at half the experts, batch 1."""
    from client.moe import offload_experts

    batch, fraction = 1, 0.5
    # On a node without a GPU lender (the CPU smoke run) the host lender stands in.
    fast = "cuda-vmm" if "cuda-vmm" in lenders else "host"
    tokens, ref = 0, None  # set by the first mode, the revoked one
    for mode in ("harvest-gpu-revoked", "harvest-gpu", "harvest-host"):
        model = copy.deepcopy(base)
        backends = ("host",) if mode == "harvest-host" else (fast,)
        offload = offload_experts(
            model,
            client,
            fraction=fraction,
            backends=backends,
            slab_bytes=args.slab_bytes,
            refill_every=0.05,
            compute=args.compute,
        )
        row: dict[str, Any] = {
            "model": name,
            "mode": mode,
            "batch": batch,
            "fraction": fraction,
            "experiment": "revocations",
        }
        if mode == "harvest-gpu-revoked":
            slab = max(s.lease.nbytes for s in offload.cache._slabs.slabs)
            if args.spy:
                threading.Timer(args.revoke_seconds / 2, spy_dump).start()
            with revoking(client, lenders[fast], args.revoke_every, slab) as counts:
                res = decode(
                    model, batch, args.prompt, 8, args.warmup, device, seconds=args.revoke_seconds
                )
                if args.profile:
                    profile_steps(model, batch, args.prompt, device, f"{name} {mode}")
            row.update(counts, revoke_every_s=args.revoke_every)
            tokens = res["tokens"].shape[1]
            ref = reference(base, client, args, batch, tokens, device)
        else:
            res = decode(model, batch, args.prompt, tokens, args.warmup, device)
        if ref is None:
            raise RuntimeError("the revoked run, first, makes the reference tokens")
        cstats = offload.cache.stats
        row.update(
            _public(res),
            reads_by_tier=dict(cstats.hits),
            revocations_seen=cstats.revocations,
            refills=cstats.refills,
            swaps=cstats.swaps,
            fallbacks=cstats.fallbacks,
            tokens_identical=bool(torch.equal(res["tokens"], ref["tokens"])),
        )
        offload.close()
        record(row)
        del model
        gc.collect()


def _public(res: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in res.items() if k != "tokens"}


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Ratios from the same run: Harvest host vs accelerate, vs the PCIe bound, and the
    revocation run vs host."""
    out: dict[str, Any] = {}
    key = lambda r: (r["model"], r["batch"], r["fraction"])  # noqa: E731
    by = {(r["mode"], *key(r)): r for r in rows if "error" not in r and "experiment" not in r}
    for (mode, model, batch, fraction), row in by.items():
        if mode != "harvest-host":
            continue
        acc = by.get(("accelerate", model, batch, fraction))
        res = by.get(("resident", model, batch, 0.0))
        entry = {
            "harvest_host_tokens_per_s": row["tokens_per_s"],
            "of_pcie_bound": row.get("of_pcie_bound"),
        }
        if acc:
            entry["vs_accelerate"] = row["tokens_per_s"] / acc["tokens_per_s"]
        if res:
            entry["of_resident"] = row["tokens_per_s"] / res["tokens_per_s"]
            if row.get("pcie_bound_step_ms"):
                # No step can beat the resident one, nor the link: the larger of the two
                # is the bound this run can reach.
                bound = max(res["step_ms_mean"], row["pcie_bound_step_ms"])
                entry["of_reachable_bound"] = bound / row["step_ms_mean"]
        gpu = by.get(("harvest-gpu", model, batch, fraction))
        if gpu:
            entry["gpu_lease_vs_host_lease"] = gpu["tokens_per_s"] / row["tokens_per_s"]
        out[f"{model} batch {batch} fraction {fraction}"] = entry
    for model in sorted({r["model"] for r in rows if r.get("experiment") == "revocations"}):
        rev = {
            r["mode"]: r
            for r in rows
            if r.get("experiment") == "revocations" and r["model"] == model
        }
        if {"harvest-gpu-revoked", "harvest-host", "harvest-gpu"} <= set(rev):
            out[f"{model} revocations"] = {
                "revoked_vs_host": rev["harvest-gpu-revoked"]["tokens_per_s"]
                / rev["harvest-host"]["tokens_per_s"],
                "revoked_vs_gpu": rev["harvest-gpu-revoked"]["tokens_per_s"]
                / rev["harvest-gpu"]["tokens_per_s"],
                "revocations": rev["harvest-gpu-revoked"].get("revoked"),
                "tokens_identical": all(r["tokens_identical"] for r in rev.values()),
            }
    return out


def plot(result: dict[str, Any], path: Path) -> None:
    """Tokens/s against offloaded fraction, one panel per model and batch."""
    plt = pyplot()
    if plt is None:
        return
    rows = [r for r in result["rows"] if "error" not in r and "experiment" not in r]
    panels = sorted({(r["model"], r["batch"]) for r in rows})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (model, batch) in zip(axes[0], panels, strict=True):
        for mode in ("harvest-gpu", "harvest-host", "accelerate"):
            pts = sorted(
                (r["fraction"], r["tokens_per_s"])
                for r in rows
                if r["model"] == model and r["batch"] == batch and r["mode"] == mode
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=mode)
        res = [
            r["tokens_per_s"]
            for r in rows
            if r["model"] == model and r["batch"] == batch and r["mode"] == "resident"
        ]
        if res:
            ax.axhline(res[0], color="grey", linestyle="--", label="resident")
        ax.set_yscale("log")
        ax.set_title(f"{model}, batch {batch}")
        ax.set_xlabel("experts offloaded")
        ax.set_ylabel("decode tokens/s")
        ax.legend(fontsize=7)
    fig.suptitle(result.get("device", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print a table; write JSON and a plot."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lender-gpu", default="0", help="the GPU lending (index or UUID)")
    parser.add_argument("--device", default="cuda:0", help="the model's device")
    parser.add_argument("--models", default="mixtral,qwen2-moe")
    parser.add_argument("--mixtral-layers", type=int, default=4)
    parser.add_argument("--qwen-layers", type=int, default=8)
    parser.add_argument("--fractions", default="0.25,0.5,1.0")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--modes", default="harvest-host,harvest-gpu,accelerate")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--accelerate-tokens", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--slab-bytes", default="1GiB")
    parser.add_argument("--revoke-every", type=float, default=0.3)
    parser.add_argument(
        "--revoke-seconds", type=float, default=4.0, help="how long the revocation run decodes"
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
        help="how Harvest's experts module computes (offload_experts' "
        "compute=); grouped runs are checked against the same module "
        "with nothing offloaded",
    )
    parser.add_argument(
        "--no-grouped",
        dest="grouped",
        action="store_false",
        help="skip the resident run with transformers' grouped_mm experts",
    )
    parser.add_argument(
        "--spy",
        action="store_true",
        help="dump every thread's stack (py-spy) mid-way through the revocation run",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print torch.profiler's top ops for each Harvest mode's decode",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from harvestd.sizes import parse_size

    if args.smoke:
        args.device, args.batches, args.tokens, args.accelerate_tokens = "cpu", "1,3", 4, 2
        args.host_bytes, args.slab_bytes, args.revoke_seconds = "256MiB", "256KiB", 1.0
        args.mixtral_layers, args.qwen_layers = 2, 2
    args.slab_bytes = parse_size(args.slab_bytes)
    args.fractions = [float(f) for f in args.fractions.split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    args.modes = args.modes.split(",")
    args.revoke_models = args.revoke_models.split(",")
    args.layers = {"mixtral": args.mixtral_layers, "qwen2-moe": args.qwen_layers}
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
        "rows": [],
    }
    out = Path(
        args.out
        if not args.smoke or args.out != parser.get_default("out")
        else "/tmp/moe_smoke.json"
    )

    def record(row: dict[str, Any]) -> None:
        result["rows"].append(row)
        fields = [f"{row['model']:>9} {row['mode']:>20} b{row['batch']:<3} f{row['fraction']:<4}"]
        if "error" in row:
            fields.append(f"ERROR {row['error']}")
        else:
            fields.append(f"{row['tokens_per_s']:9.2f} tok/s  step {row['step_ms_median']:8.2f} ms")
            if "of_pcie_bound" in row:
                fields.append(f"{row['of_pcie_bound']:.2f} of PCIe bound")
            if "tokens_identical" in row:
                fields.append("tokens identical" if row["tokens_identical"] else "TOKENS DIFFER")
        print("  ".join(fields), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))

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
            for name in args.models.split(","):
                run_model(
                    name, args, node, client, device, dtype, result["pinned_h2d_gbps"], record
                )
    result["summary"] = summarise(result["rows"])
    out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps(result["summary"], indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
