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
import contextlib
import copy
import functools
import gc
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from benchkit.gpumem import GpuBytes, gpu_memory, grown
from benchkit.node import REPO, bench_node, pyplot, steady_attention
from benchkit.stats import MIN_REPEATS, MIN_STEPS, alternating, fmt, spread

from harvestd.sizes import GiB, MiB

log = logging.getLogger("bench_moe")

# Every mode, in the order a repeat starts from (alternating() rotates it).
MODES = (
    "resident",
    "resident-same-code",
    "best-host-offload",
    "accelerate-pinned",
    "accelerate-default",
    "harvest-host",
    "harvest-gpu",
    "harvest-gpu-placed",
)
# Not run unless asked for (--modes): transformers' grouped GEMM experts, resident.
# host-placed: the placed path with nothing leased (--smoke runs it: on the CPU it is the
# only placed mode; on a GPU, scripts/bench_place.py measures host pages read in place).
OPTIONAL_MODES = ("resident-grouped-mm", "host-placed")
# The modes whose tokens decide the exit status (every mode of a revocation run too).
HARVEST_MODES = (
    "harvest-host",
    "harvest-gpu",
    "host-placed",
    "harvest-gpu-placed",
    "harvest-gpu-revoked",
    "harvest-gpu-placed-revoked",
)
# Modes whose experts sit in placed tensors, read where they lie (issue 15).
PLACED_MODES = ("host-placed", "harvest-gpu-placed")
# Modes that lease memory: before each run every offloaded expert is borrowed again.
# host-placed leases nothing, so that it reads its host copy in place.
BORROWING = ("harvest-host", "harvest-gpu", "harvest-gpu-placed")
REVOCATION_MODES = ("harvest-gpu-revoked", "harvest-gpu", "harvest-host")
# The placed path's revocation run (only when harvest-gpu-placed is among --modes): the
# revoked placed run against the quiet one, the all-host placed run, and the copy path's
# host leases (its all-host figure).
PLACED_REVOCATION_MODES = (
    "harvest-gpu-placed-revoked",
    "harvest-gpu-placed",
    "host-placed",
    "harvest-host",
)
# A revocation run's batch and offloaded fraction.
REVOKE_BATCH, REVOKE_FRACTION = 1, 0.5
# Modes that run Harvest's experts module (computed as --compute says).
HARVEST_CODE = (
    "resident-same-code",
    "best-host-offload",
    "harvest-host",
    "harvest-gpu",
    *PLACED_MODES,
)
NEEDS_CUDA = "skipped (needs CUDA)"

HOW = {
    "resident": (
        "transformers' own model, untouched (no Harvest code, no hooks): every expert on "
        "the GPU, experts_implementation='eager'. The ceiling, and the reference tokens."
    ),
    "resident-same-code": (
        "Harvest's experts module with nothing offloaded: offload_experts(model, client, "
        "fraction=0): the code of the offloaded modes, no fetch. What the module itself "
        "costs or saves against transformers' eager experts."
    ),
    "best-host-offload": (
        "The routed experts only, from the model's own pinned host copy, fetched on a side "
        "stream: Harvest's own path with nothing borrowed, offload_experts(model, client, "
        "fraction, borrow_bytes=0, refill_every=None). Each offloaded expert's weights are "
        "kept pinned on the host (TieredCache pins the authoritative copy when the model "
        "is on a GPU); in each layer, once the router has picked (one device sync), the "
        "picked offloaded experts are copied with one DMA copy each (non_blocking, from "
        "pinned memory) on the cache's own CUDA stream while the resident experts compute, "
        "and each offloaded expert computes as soon as its own copy has landed (a CUDA "
        "event per expert). Nothing is leased: borrowed_bytes is 0 and each run checks "
        "that every read came from the 'host' tier. This is what a competent hand-written "
        "host offload does (the routing must be known before a routed expert can be "
        "fetched), so the script uses it rather than a second implementation."
    ),
    "accelerate-pinned": (
        "accelerate.cpu_offload(experts_module, execution_device=<the GPU>, "
        "state_dict={name: weight.to('cpu').pin_memory()}) on the fused experts modules of "
        "round(fraction x layers) layers: accelerate offloads whole modules, so each step "
        "copies every expert of those layers (the same bytes offloaded as Harvest's "
        "fraction of every layer's experts). accelerate 1.15 has no pinned-memory option; "
        "cpu_offload's documented state_dict argument is the host copy its hook reads "
        "from, so it is given pinned tensors. Its hook (AlignDevicesHook) copies each "
        "weight before the module runs with a synchronous .to(device) (from pinned memory: "
        "at the link's speed) and calls torch.cuda.empty_cache() after each weight "
        "(set_module_tensor_to_device), as accelerate does."
    ),
    "accelerate-default": (
        "accelerate.cpu_offload(experts_module, execution_device=<the GPU>) on the same "
        "modules, as users call it: accelerate keeps a pageable host copy "
        "(param.to('cpu')) and copies every weight of those layers from it on each step."
    ),
    "harvest-host": (
        "offload_experts(model, client, fraction, backends=('host',)): that fraction of "
        "every layer's experts in host leases (a host lender's memory); each layer's "
        "routed offloaded experts are fetched on the cache's stream while the resident "
        "ones compute."
    ),
    "harvest-gpu": (
        "offload_experts(model, client, fraction, backends=('cuda-vmm',)): that fraction of "
        "every layer's experts in GPU leases (a cuda-vmm lender's memory: when --lender-gpu "
        "is the decoding GPU, its own memory, lent by another process); routed offloaded "
        "experts are fetched with device-to-device copies on the cache's stream."
    ),
    "host-placed": (
        "offload_experts(model, client, fraction, placement='placed', borrow_bytes=0): that "
        "fraction of every layer's experts in placed tensors with nothing leased, so the "
        "compute reads them in place from the authoritative host copy (host-NUMA pages "
        "mapped for the GPU through the VMM API; a memfd on the CPU): no fetch, no "
        "staging, every read of an offloaded expert crosses the PCIe link inside the kernel."
    ),
    "harvest-gpu-placed": (
        "offload_experts(model, client, fraction, placement='placed'): that fraction of "
        "every layer's experts in placed tensors backed by GPU leases (cuda-vmm, mapped into "
        "one address range per tensor), read in place by the same compute as the resident "
        "experts: no fetch, no staging copy."
    ),
    "resident-grouped-mm": (
        "transformers' own model, every expert resident, experts_implementation="
        "'grouped_mm' (its grouped GEMM numerics give other tokens than eager)."
    ),
}

# What a mode's GPU-memory and revocation fields mean (the JSON's "fields"). None: on the
# CPU, or where NVML cannot tell.
FIELDS = {
    "gpu_allocated_bytes": (
        "torch.cuda.memory_allocated(device) after the mode's setup (model copied, experts "
        "offloaded or placed) less before it, before any step: what the setup kept in "
        "torch's allocator (every mode lives in one process, so the growth); resident: the "
        "model as built"
    ),
    "gpu_process_bytes": (
        "the same growth of this process's GPU memory as NVML counts it "
        "(nvmlDeviceGetComputeRunningProcesses, this PID), which also sees memory outside "
        "torch's allocator (ranges mapped through the VMM API)"
    ),
    "staging_bytes": (
        "gpu_allocated_bytes - (resident's gpu_allocated_bytes - offloaded_bytes): the "
        "borrower's own GPU memory beyond the model's own non-offloaded part; for placed "
        "modes, against one page (placed_chunk_bytes) per placed object"
    ),
    "staging_process_bytes": "staging_bytes from gpu_process_bytes (NVML)",
    "placed_objects": "placed modes: how many placed tensors hold the offloaded experts",
    "placed_chunk_bytes": "placed modes: a placed tensor's page (its unit of placement)",
    "gpu_allocated_growth_bytes": (
        "the most torch.cuda.memory_allocated grew across one run, its own tensors freed: "
        "what a mode allocates at its first steps and keeps (the copy path's staging rows, "
        "made at its first fetch, are here, not in staging_bytes)"
    ),
    "revocations": "revoked runs: leases the tenant's reclaims revoked, per repeat",
    "revocations_seen": (
        "revoked runs: revocations of this offload's own leases, per repeat (its cache's, "
        "or the sum over its placed tensors)"
    ),
    "remap_ms": (
        "placed revoked runs: each revocation's remap of a placed tensor's chunks to the "
        "host copy (PlacedTensor.remap_ms), over every repeat"
    ),
}


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
    steps: int,
    warmup: int,
    device: torch.device,
    between: Callable[[], None] | None = None,
    seconds: float = 0.0,
) -> dict[str, Any]:
    """Greedy decode: prefill ``prompt`` tokens, ``warmup`` untimed steps, then ``steps``
    timed steps (each timed alone, the device synchronised around it; with ``seconds``,
    as many as run in that time, at least ``steps``). Returns tokens/s, the steps' times
    and the tokens of the timed steps."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=gen).to(device)
    times: list[float] = []
    out: list[torch.Tensor] = []
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        i = 0
        while i < warmup + steps or sum(times) < seconds:
            sync(device)
            began = time.perf_counter()
            logits = model(input_ids=nxt, past_key_values=cache, use_cache=True).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - began)
            out.append(nxt)
            i += 1
            if between is not None:
                between()
    total = sum(times)
    return {
        "steps": len(times),
        "tokens_per_s": batch * len(times) / total,
        "step_ms_median": statistics.median(times) * 1e3,
        "step_ms_mean": total / len(times) * 1e3,
        "step_ms": [round(s * 1e3, 4) for s in times],
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


# ---------------------------------------------------------------------- setting modes up


@dataclass
class Setup:
    """One mode's model, made once for a model and fraction and decoded at every batch
    size and repeat; ``offload`` is Harvest's :class:`~client.moe.ExpertOffload` where the
    mode runs Harvest's module."""

    mode: str
    model: Any
    offload: Any = None
    info: dict[str, Any] = field(default_factory=dict)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def accelerate_offload(model: Any, fraction: float, device: torch.device, pinned: bool) -> dict:
    """accelerate's CPU offload of the experts of ``fraction`` of the layers (``pinned``:
    with its host copy in pinned memory, given through ``state_dict``); what it did."""
    from accelerate import cpu_offload

    from client.moe import find_experts

    modules = list(find_experts(model).values())
    count = max(1, round(fraction * len(modules)))
    moved = 0
    all_pinned = True
    for module in modules[:count]:
        moved += sum(p.numel() * p.element_size() for p in module.parameters())
        state_dict = None
        if pinned and device.type == "cuda":
            state_dict = {
                n: t.detach().to("cpu").pin_memory() for n, t in module.state_dict().items()
            }
        elif pinned:
            all_pinned = False  # pinning needs CUDA: on the CPU there is no copy to speed up
            state_dict = {n: t.detach().to("cpu") for n, t in module.state_dict().items()}
        cpu_offload(module, execution_device=device, state_dict=state_dict)
    release(device)
    info: dict[str, Any] = {
        "offloaded_bytes": moved,
        # Every weight of an offloaded module is copied in before each call of it.
        "copied_bytes_per_step": moved,
        "offloaded_layers": count,
        "layers": len(modules),
        "host_copy_pinned": bool(pinned and all_pinned and device.type == "cuda"),
    }
    if pinned and device.type != "cuda":
        info["note"] = "on the CPU there is nothing to pin: the host copy is plain memory"
    return info


def setup_mode(
    mode: str,
    base: Any,
    fraction: float,
    client: Any,
    args: argparse.Namespace,
    device: torch.device,
) -> Setup:
    """Make ``mode``'s model from ``base`` (``resident`` is ``base`` itself)."""
    if mode == "resident":
        return Setup(mode, base, info={"offloaded_bytes": 0})
    if mode == "resident-grouped-mm":
        model = copy.deepcopy(base)
        model.config._experts_implementation = "grouped_mm"
        return Setup(mode, model, info={"offloaded_bytes": 0})
    if mode in ("accelerate-pinned", "accelerate-default"):
        model = copy.deepcopy(base)
        info = accelerate_offload(model, fraction, device, pinned=mode == "accelerate-pinned")
        return Setup(mode, model, info=info)
    # The copy modes ask for the copy path: the default ("auto") is placed on a GPU.
    kwargs: dict[str, Any] = {"slab_bytes": args.slab_bytes, "compute": args.compute}
    if mode in ("resident-same-code", "best-host-offload", "harvest-host", "harvest-gpu"):
        kwargs["placement"] = "copy"
    if mode == "resident-same-code":
        kwargs.update(fraction=0.0, backends=("host",))
    elif mode == "best-host-offload":
        kwargs.update(fraction=fraction, backends=("host",), borrow_bytes=0, refill_every=None)
    elif mode == "harvest-host":
        kwargs.update(fraction=fraction, backends=("host",))
    elif mode == "harvest-gpu":
        kwargs.update(fraction=fraction, backends=("cuda-vmm",))
    elif mode == "host-placed":
        kwargs.update(fraction=fraction, placement="placed", borrow_bytes=0, refill_every=None)
    elif mode == "harvest-gpu-placed":
        kwargs.update(fraction=fraction, placement="placed")
    else:
        raise SystemExit(f"unknown mode {mode!r} ({', '.join(MODES + OPTIONAL_MODES)})")
    return harvest_setup(mode, base, client, device, **kwargs)


def harvest_setup(mode: str, base: Any, client: Any, device: torch.device, **kwargs: Any) -> Setup:
    """``mode``'s model: a copy of ``base`` with ``offload_experts(model, client,
    **kwargs)``; what it offloaded and borrowed (and, placed, in how many placed
    tensors). A mode that must read its host copy and borrowed is refused."""
    from client.moe import offload_experts

    model = copy.deepcopy(base)
    offload = offload_experts(model, client, **kwargs)
    release(device)
    info: dict[str, Any] = {
        "offloaded_bytes": offload.stats.bytes_offloaded,
        "offloaded_experts": offload.stats.experts_offloaded,
        "experts": offload.stats.experts_total,
        "host_copy_pinned": device.type == "cuda",
    }
    if offload.placement == "placed":
        tiers = offload.tiers()
        placed = placed_tensors(offload)
        info.update(
            tiers=tiers,
            borrowed_bytes=tiers["gpu-lease"] + tiers["host-lease"],
            placed_objects=len(placed),
            placed_chunk_bytes=max((p.chunk_bytes for p in placed), default=0),
        )
    else:
        info["borrowed_bytes"] = offload.cache.borrowed_bytes
    if mode in ("best-host-offload", "host-placed") and info["borrowed_bytes"]:
        offload.close()
        raise RuntimeError(f"{mode} borrowed memory: it must read its host copy")
    return Setup(mode, model, offload, info)


def measured_setup(make: Callable[[], Setup], device: torch.device, model: GpuBytes) -> Setup:
    """``make()``, with what it kept on the GPU and its staging in its info (``FIELDS``);
    ``model``: what the model as built holds (``resident``'s figures: it is that model)."""
    release(device)
    before = gpu_memory(device)
    setup = make()
    release(device)
    if setup.mode == "resident":
        setup.info.update(model)
    else:
        setup.info.update(grown(before, gpu_memory(device)))
        setup.info.update(staging(setup.info, model))
    return setup


def staging(info: dict[str, Any], model: GpuBytes) -> GpuBytes:
    """A set-up mode's own GPU memory beyond the model's own non-offloaded part (what
    the model as built holds, ``model``, less what the mode offloaded), both ways."""
    out: GpuBytes = {}
    for key, of in (
        ("staging_bytes", "gpu_allocated_bytes"),
        ("staging_process_bytes", "gpu_process_bytes"),
    ):
        own, whole = info.get(of), model.get(of)
        out[key] = None if own is None or whole is None else own - (whole - info["offloaded_bytes"])
    return out


def close(setup: Setup) -> None:
    if setup.offload is not None:
        setup.offload.close()


def skip_reason(mode: str, device: torch.device, lenders: dict[str, Any]) -> str | None:
    """Why ``mode`` cannot run here (None: it can)."""
    if mode in ("harvest-gpu", "harvest-gpu-placed", "resident-grouped-mm") and (
        device.type != "cuda"
    ):
        return NEEDS_CUDA
    if mode in ("harvest-gpu", "harvest-gpu-placed") and "cuda-vmm" not in lenders:
        return "skipped (no cuda-vmm lender on this node)"
    return None


# ---------------------------------------------------------------------- measuring


def offloaded_keys(offload: Any) -> list[tuple[str, int]]:
    return [(name, e) for name, module in offload.modules.items() for e in module.offloaded]


def placed_tensors(offload: Any) -> list[Any]:
    """The placed tensors (:class:`client.placed.PlacedTensor`) of a placed offload."""
    return [p for m in offload.modules.values() for p in getattr(m, "placed", None) or ()]


def borrowed(offload: Any, timeout: float = 5.0) -> dict[str, Any]:
    """Bring every offloaded expert back into borrowed memory (a refill, as the cache's
    background pass does), waiting up to ``timeout``; how many are there now. A run
    starts from the state the mode promises: nothing left on the host copy after an
    earlier revocation."""
    from client.cache import Tier

    if offload.placement == "placed":
        return placed_borrowed(offload, timeout)
    keys = offloaded_keys(offload)
    began = time.monotonic()
    while True:
        n = sum(offload.cache.tier_of(k) in (Tier.GPU_LEASE, Tier.HOST_LEASE) for k in keys)
        if n == len(keys) or time.monotonic() - began > timeout:
            break
        offload.cache.refill()
        time.sleep(0.02)
    return {
        "borrowed_experts": n,
        "offloaded_experts": len(keys),
        "refill_wait_s": round(time.monotonic() - began, 3),
    }


def placed_borrowed(offload: Any, timeout: float) -> dict[str, Any]:
    """:func:`borrowed` for placed experts: refill until no byte reads the host copy."""
    began = time.monotonic()
    placed = placed_tensors(offload)
    while offload.tiers()["host"] and time.monotonic() - began < timeout:
        for p in placed:
            p.refill()
        time.sleep(0.02)
    return {"tiers": offload.tiers(), "refill_wait_s": round(time.monotonic() - began, 3)}


def placed_revocations(placed: list[Any], marks: list[tuple[int, int]]) -> dict[str, Any]:
    """What revocations ``placed`` (placed tensors) saw since ``marks`` (each one's
    ``(revocations, len(remap_ms))`` then): their count, summed, and each remap's ms."""
    pairs = list(zip(placed, marks, strict=True))
    return {
        "revocations_seen": sum(p.revocations - seen for p, (seen, _) in pairs),
        "remap_ms": [round(ms, 3) for p, (_, n) in pairs for ms in p.remap_ms[n:]],
    }


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def run_once(
    setup: Setup,
    batch: int,
    args: argparse.Namespace,
    device: torch.device,
    pinned: float,
    steps: int,
    seconds: float = 0.0,
    refill: bool = True,
) -> dict[str, Any]:
    """One timed decode of a set-up mode: its figures, and for a mode that copies experts
    what it copied per step against the PCIe bound (``tokens``: popped by the caller);
    for placed experts, their tiers after the run and the revocations they saw. A mode
    that borrows starts with every expert borrowed (``refill``: see to it here)."""
    off = setup.offload
    run: dict[str, Any] = {}
    fetched_at: list[int] = []
    copies = off is not None and off.placement == "copy"
    placed = placed_tensors(off) if off is not None and not copies else []
    if off is not None and refill and setup.mode in BORROWING:
        run.update(borrowed(off))
    marks = [(p.revocations, len(p.remap_ms)) for p in placed]
    kept = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    if copies:
        stats = off.cache.stats
        before = (dict(stats.hits), stats.revocations, stats.fallbacks, off.stats.bytes_fetched)
    res = decode(
        setup.model,
        batch,
        args.prompt,
        steps,
        args.warmup,
        device,
        between=None if not copies else lambda: fetched_at.append(off.stats.bytes_fetched),
        seconds=seconds,
    )
    per_step: float | None = None
    if kept is not None:
        gc.collect()  # the decode's cache and activations go: only what stays counts
        run["gpu_allocated_growth_bytes"] = torch.cuda.memory_allocated(device) - kept
    if off is not None and not copies:
        tiers = run["tiers_after"] = off.tiers()
        if setup.mode == "host-placed" and tiers["gpu-lease"] + tiers["host-lease"]:
            raise RuntimeError(f"host-placed read leased memory: {tiers}")
        run.update(placed_revocations(placed, marks))
    if copies:
        stats = off.cache.stats
        start = fetched_at[args.warmup - 1] if args.warmup else before[3]
        per_step = (fetched_at[-1] - start) / res["steps"]
        run.update(
            fetched_bytes_per_step=per_step,
            reads_by_tier=_delta(dict(stats.hits), before[0]),
            revocations_seen=stats.revocations - before[1],
            fallbacks=stats.fallbacks - before[2],
        )
    elif "copied_bytes_per_step" in setup.info:
        per_step = float(setup.info["copied_bytes_per_step"])
    if per_step and pinned == pinned:  # not NaN
        # Mean bytes over mean time: steps that route more offloaded experts move more,
        # so a median step would not match.
        bound_s = per_step / (pinned * 1e9)
        run.update(
            pcie_bound_step_ms=bound_s * 1e3, of_pcie_bound=bound_s / (res["step_ms_mean"] / 1e3)
        )
    run.update(res)
    return run


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


# ---------------------------------------------------------------------- the experiments


@dataclass
class Verdict:
    """What the run found about tokens and failures, over every row."""

    harvest_mismatches: list[str] = field(default_factory=list)
    harvest_errors: list[str] = field(default_factory=list)
    baselines_with_other_tokens: list[str] = field(default_factory=list)
    baseline_errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "harvest_tokens_identical": not self.harvest_mismatches,
            "harvest_mismatches": self.harvest_mismatches,
            "harvest_errors": self.harvest_errors,
            "baselines_with_other_tokens": self.baselines_with_other_tokens,
            "baseline_errors": self.baseline_errors,
            "failed": bool(self.harvest_mismatches or self.harvest_errors),
        }

    def check(self, label: str, mode: str, entry: dict[str, Any], harvest: bool) -> None:
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


# ---------------------------------------------------------------------- reporting


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


# ---------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
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
