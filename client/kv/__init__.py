"""A model's KV cache in borrowed memory: :class:`HarvestCache` (a transformers ``Cache``)
and :class:`KVBlockStore` (paged KV blocks for any engine).

Modules: :mod:`client.kv.cache` (HarvestCache), :mod:`client.kv.layer` (one layer as
transformers sees it), :mod:`client.kv.placed` (``placement="placed"``: the K/V in placed
tensors, read in place; :class:`PlacedKV`), :mod:`client.kv.prefetch` (whole-layer fetches),
:mod:`client.kv.blocks` (KVBlockStore), :mod:`client.kv.plan` and
:mod:`client.kv.planner` (how to split a fetch between links and recomputation),
:mod:`client.kv.fetch` (carrying a plan out), :mod:`client.kv.measure` (the rates a plan
is made from).
"""

from __future__ import annotations

from typing import Any

from client.kv.blocks import KVBlockStore

__all__ = ["HarvestCache", "KVBlockStore", "PlacedKV"]


def __getattr__(name: str) -> Any:
    # HarvestCache subclasses transformers' Cache (PlacedKV's layers its layer class):
    # transformers is an optional dependency (the `models` extra), so it is imported only
    # when asked for.
    if name == "HarvestCache":
        from client.kv.cache import HarvestCache

        return HarvestCache
    if name == "PlacedKV":
        from client.kv.placed import PlacedKV

        return PlacedKV
    raise AttributeError(f"module 'client.kv' has no attribute {name!r}")
