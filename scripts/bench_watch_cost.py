#!/usr/bin/env python3
"""What a lender's watch costs the GPU's own job: a launch-bound decode (plain
DynamicCache, 2 Llama-3-8B layers, 8k context, batch 1, the shape of ``bench_kv``) timed
while another process calls ``nvmlDeviceGetMemoryInfo`` as a lender's tenant watch does
(every 5 ms, its default ``pressure_interval_s``, and every 1 ms), against the same
decode with nothing else running. Repeats alternate the conditions, so the machine's own
jitter falls on all of them alike.

    python3 scripts/bench_watch_cost.py --gpu 0

Needs a GPU (it measures NVML against CUDA): without one it exits 2 and says so. Writes
bench/results/watch_cost.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Any

from benchkit.driver import no_gpu
from benchkit.multi import write_json
from benchkit.node import REPO

CONDITIONS = {"quiet": None, "watch-5ms": 0.005, "watch-1ms": 0.001}

# The watch's NVML call in a loop, in a process of its own (as the lender is).
WATCH = r"""
import sys, time, pynvml
pynvml.nvmlInit()
handle = pynvml.nvmlDeviceGetHandleByIndex(int(sys.argv[1]))
interval = float(sys.argv[2])
while True:
    pynvml.nvmlDeviceGetMemoryInfo(handle)
    time.sleep(interval)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps a repeat")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--out", default=str(REPO / "bench/results/watch_cost.json"))
    args = parser.parse_args()
    if no_gpu("bench_watch_cost", args.gpu):
        return 2
    import torch
    from benchkit.kvmodel import build_model, prefill
    from transformers import DynamicCache

    device = torch.device("cuda", args.gpu)
    shape = argparse.Namespace(smoke=False, layers=2, contexts=[args.context], warmup=2, decode=0)
    model = build_model(shape, device)
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), device=device)
    kv, first = prefill(model, ids)

    def decode() -> float:
        """ms per step over ``args.steps`` steps, after 2 untimed ones."""
        cache = DynamicCache()
        for i, (k, v) in enumerate(kv):
            cache.update(k.clone(), v.clone(), i)
        token, began = first, 0.0
        with torch.no_grad():
            for step in range(2 + args.steps):
                if step == 2:
                    torch.cuda.synchronize(device)
                    began = time.perf_counter()
                out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
                token = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize(device)
        return (time.perf_counter() - began) / args.steps * 1e3

    decode()  # warm: kernels chosen, allocator filled
    ms: dict[str, list[float]] = {name: [] for name in CONDITIONS}
    for rnd in range(args.repeats):
        for name, interval in CONDITIONS.items():
            watch = None
            if interval is not None:
                watch = subprocess.Popen(
                    [sys.executable, "-c", WATCH, str(args.gpu), str(interval)]
                )
                time.sleep(1.0)  # polling before the decode starts
            try:
                ms[name].append(round(decode(), 3))
            finally:
                if watch is not None:
                    watch.terminate()
                    watch.wait()
            print(f"{rnd} {name:10s} {ms[name][-1]:.3f} ms/step", flush=True)
    summary: dict[str, Any] = {
        name: {"median": statistics.median(v), "min": min(v), "max": max(v)}
        for name, v in ms.items()
    }
    quiet = summary["quiet"]["median"]
    for name in ("watch-5ms", "watch-1ms"):
        summary[name]["median_over_quiet"] = summary[name]["median"] / quiet
    doc = {
        "benchmark": "watch_cost",
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "model": "2 Llama-3-8B layers, bf16, random weights (benchkit.kvmodel.build_model)",
        "context": args.context,
        "steps": args.steps,
        "ms_per_step": ms,
        "summary": summary,
    }
    print("wrote", write_json(doc, args.out))
    for name, s in summary.items():
        extra = f", {s['median_over_quiet']:.2f} x quiet" if "median_over_quiet" in s else ""
        print(f"{name:10s} median {s['median']:.3f} ms/step ({s['min']:.3f}-{s['max']:.3f}){extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
