"""The model ``scripts/bench_kv.py`` decodes with and its decode loop: the Llama-3-8B-shaped
layers with random weights, the prefill that makes the K/V every cache is loaded from, the
timed greedy steps, and what a cache moved during them. ``scripts/bench_watch_cost.py``
builds the same model and prefill from here, so that both time the same shape.
"""

from __future__ import annotations

import argparse
import gc
import time
from typing import Any

from benchkit.kvmemory import GpuMemory
from benchkit.kvmodes import PinnedHostCache


def build_model(args: argparse.Namespace, device: Any) -> Any:
    """The Llama-3-8B-shaped model (or a tiny one with --smoke), random weights."""
    import torch
    import transformers

    smoke = args.smoke
    cfg = transformers.LlamaConfig(
        num_hidden_layers=args.layers,
        max_position_embeddings=max(args.contexts) + args.warmup + args.decode + 1024,
        vocab_size=512 if smoke else 128256,
        hidden_size=128 if smoke else 4096,
        intermediate_size=256 if smoke else 14336,
        num_attention_heads=4 if smoke else 32,
        num_key_value_heads=2 if smoke else 8,
        head_dim=32 if smoke else 128,
    )
    torch.manual_seed(0)
    with torch.device(device):  # made where it runs: random init on the GPU is quick
        model = transformers.LlamaForCausalLM(cfg).eval()
    return model if args.smoke else model.to(torch.bfloat16)


def sync(device: Any) -> None:
    """Wait for ``device``'s queued work (a no-op on the CPU), so that a clock read after
    it times what ran."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: Any) -> None:
    """Drop what the last run left: unreachable objects, and torch's cached free blocks,
    so that the next run's memory figures start from what is really held."""
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def prefill(model: Any, ids: Any) -> tuple[list[tuple[Any, Any]], Any]:
    """Every layer's K/V for ``ids`` (one sequence at a time: bounded activations) and
    each sequence's first generated token."""
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import CacheLayerMixin

    layers: list[list[tuple[Any, Any]]] = []
    first = []
    with torch.no_grad():
        for row in range(ids.shape[0]):
            cache = DynamicCache()
            out = model(ids[row : row + 1], past_key_values=cache, use_cache=True, logits_to_keep=1)
            first.append(out.logits[:, -1:].argmax(-1))
            for i, layer in enumerate(cache.layers):
                if not isinstance(layer, CacheLayerMixin):  # a linear-attention layer: no K/V
                    raise TypeError(f"layer {i} keeps no K/V ({type(layer).__name__})")
                if len(layers) <= i:
                    layers.append([])
                layers[i].append((layer.keys, layer.values))
            del cache, out
    kv = [(torch.cat([k for k, _ in pairs]), torch.cat([v for _, v in pairs])) for pairs in layers]
    return kv, torch.cat(first)


def decode(
    model: Any, cache: Any, first: Any, args: argparse.Namespace, device: Any, memory: GpuMemory
) -> tuple[Any, Any, float, dict[str, Any]]:
    """Greedy steps from ``first``: the tokens (all steps), the last step's logits, the
    seconds of the timed steps, and what the cache moved during them."""
    import torch

    token, tokens = first, []
    before: dict[str, float] = {}
    with torch.no_grad():
        for step in range(args.warmup + args.decode):
            if step == args.warmup:
                sync(device)
                memory.reset_peak()
                before = moved(cache)
                began = time.perf_counter()
            logits = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
            token = logits[:, -1:].argmax(-1)
            tokens.append(token)
        sync(device)
    elapsed = time.perf_counter() - began
    after = moved(cache)
    extra = {}
    if "read_bytes" in after:  # PinnedHostCache
        extra["read_GBps"] = (after["read_bytes"] - before["read_bytes"]) / elapsed / 1e9
    if "fetched_bytes" in after:  # HarvestCache
        extra["fetched_GBps"] = (after["fetched_bytes"] - before["fetched_bytes"]) / elapsed / 1e9
        extra["fetch_wait_s_per_step"] = (
            after["fetch_wait_s"] - before["fetch_wait_s"]
        ) / args.decode
    return torch.cat(tokens, 1).cpu(), logits[:, -1].float().cpu(), elapsed, extra


def moved(cache: Any) -> dict[str, float]:
    """Cumulative bytes moved and seconds waited, for the caches that count them."""
    if isinstance(cache, PinnedHostCache):
        return {"read_bytes": float(cache.bytes_read)}
    stats = getattr(cache, "stats", None)
    if stats is None:
        return {}
    return {"fetched_bytes": float(stats.bytes_fetched), "fetch_wait_s": stats.fetch_wait_s}
