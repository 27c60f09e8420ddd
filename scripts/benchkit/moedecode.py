"""How ``scripts/bench_moe.py`` times a model: a greedy decode with every step timed alone
(the device synchronised around it), the pinned host-to-device bandwidth that bounds a
mode which copies experts, and two looks inside a slow decode (torch.profiler's top ops,
py-spy's stacks)."""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from harvestd.sizes import GiB


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (on the CPU there is none)."""
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
