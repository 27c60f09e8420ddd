"""The KV caches ``scripts/bench_kv.py`` decodes with, other than Harvest's, and what each
mode runs, word for word, for the JSON.

Modes (names as they appear in the JSON):

- ``plain``: ``transformers.DynamicCache()``, every token's K/V on the GPU (the reference
  tokens and the ceiling);
- ``offloaded-dynamic``: ``DynamicCache(config=..., offloading=True)``, what
  ``generate(cache_implementation="offloaded")`` makes;
- ``offloaded-static``: ``StaticCache(config=..., max_cache_len=..., offloading=True)``,
  what ``generate(cache_implementation="offloaded_static")`` makes;
- ``pinned-host-readonly``: :class:`PinnedHostCache` (below), what a careful user would
  write by hand: full blocks in pinned host memory, read back with one copy per layer per
  step, never written back;
- ``harvest-host`` / ``harvest-gpu``: ``client.kv.HarvestCache`` on host / GPU leases
  (made by the benchmark, which holds the client);
- ``host-placed`` / ``harvest-gpu-placed`` (:data:`PLACED_MODES`, issue 15):
  ``HarvestCache(placement="placed")``, the K/V in placed tensors that attention reads in
  place, on nothing leased / on GPU leases; the benchmark reports them apart, under its
  JSON's ``placed``.
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from client.kv.layer import stack_blocks, write_tail

PLAIN = "plain"
BASELINES = ("offloaded-dynamic", "offloaded-static", "pinned-host-readonly")
HARVEST = ("harvest-host", "harvest-gpu")
MODES = (PLAIN, *BASELINES, *HARVEST)
NEEDS_CUDA = frozenset({"offloaded-dynamic", "offloaded-static", "harvest-gpu"})
"""Modes that only run on a GPU: transformers' offloading waits on CUDA streams, and GPU
leases need one. A ``--smoke`` run on the CPU records them as skipped."""

CONFIG = {
    PLAIN: "transformers.DynamicCache(): every token's K/V on the GPU; each update "
    "torch.cat's the new token onto the layer's K and V",
    "offloaded-dynamic": "transformers.DynamicCache(config=model.config, offloading=True) "
    '(= generate(cache_implementation="offloaded")): after its update each layer goes to '
    "the host (.to('cpu', non_blocking=True)) and comes back to the GPU on a side stream "
    "while the layer before it computes, every step, both ways",
    "offloaded-static": "transformers.StaticCache(config=model.config, max_cache_len="
    "context + warm-up + timed steps + 1, offloading=True) (= generate(cache_implementation="
    '"offloaded_static")): K/V preallocated at max_cache_len and written in place; each '
    "layer to the host after its update and back ahead of its next one, every step, both "
    "ways; attention over max_cache_len keys under a mask",
    "pinned-host-readonly": "benchkit.kvmodes.PinnedHostCache (in this repository, by hand, "
    "as a careful user would write it): per layer, full blocks of block_tokens tokens in "
    "one preallocated pinned host buffer ([blocks, 2, batch, kv_heads, block_tokens, "
    "head_dim]); each step one host-to-device copy per layer of all its full blocks into "
    "one of two device staging buffers, the next layer's on a side stream while this one "
    "computes; blocks, the on-GPU tail and the new token assembled into contiguous K and V "
    "work buffers (the DynamicCache layout); nothing written back: a block goes to the host "
    "once, when it fills (one device-to-host copy on the side stream)",
    "harvest-host": "client.kv.HarvestCache(backends=('host',), refill_every=None, "
    "placement='copy'): full "
    "blocks in host leases (pinned host memory lent through Harvest) plus their pinned "
    "host copy; one batched fetch per layer per step, the next layer's while this one "
    "computes; read-only",
    "harvest-gpu": "client.kv.HarvestCache(backends=('cuda-vmm',), refill_every=None, "
    "placement='copy'): full "
    "blocks in CUDA VMM leases lent by the GPU of --lender-gpu (on a one-GPU machine the "
    "decoding GPU itself: the stand-in for a peer GPU's memory), plus their pinned host "
    "copy; one batched fetch per layer per step, the next layer's while this one computes",
}

PLACED_MODES = ("host-placed", "harvest-gpu-placed")
"""Modes whose K/V sit in placed tensors, read in place (issue 15): reported apart, under
doc["placed"], so that the issue-14 document (:data:`MODES`) keeps its shape."""
OPTIONAL_MODES = ("host-placed",)
"""Modes the benchmark runs only when named in ``--modes`` (``--smoke`` adds them)."""
PLACED_NEEDS_CUDA = frozenset({"harvest-gpu-placed"})
"""The placed modes that only run on a GPU (GPU leases need one)."""
PLACED_AFTER = {"host-placed": "harvest-host", "harvest-gpu-placed": "harvest-gpu"}
"""Each placed mode's copy counterpart: the mode it runs right after in every repeat."""
KNOWN = (*MODES, *PLACED_MODES)
"""Every mode ``--modes`` takes, in the order the tables and the plot show them."""
TARGET_VS_PLAIN = 0.90
"""Issue 15's target: harvest-gpu-placed decodes at least 0.90 as fast as plain."""
PLACED_CONFIG = {
    "harvest-gpu-placed": "client.kv.HarvestCache(placement='placed', backends=('cuda-vmm',), "
    "max_tokens=context + warm-up + timed steps + 1, refill_every=None): each layer's K and "
    "V in one placed tensor [2, batch, kv_heads, max_tokens, head_dim] whose 2 MiB chunks are "
    "CUDA VMM leases of --lender-gpu mapped into one reserved range (on a one-GPU machine "
    "that GPU's own memory, lent by the lender process), plus the authoritative host-NUMA "
    "copy; each update writes the new token into the leased pages and the host copy and "
    "returns [:, :, :tokens] views that attention reads in place: no fetch, no staging",
    "host-placed": "client.kv.HarvestCache(placement='placed', borrow_bytes=0, max_tokens=..., "
    "refill_every=None): the same placed tensors with nothing leased: attention reads the "
    "authoritative host copy in place (host-NUMA pages mapped for the GPU through the VMM "
    "API; a memfd on the CPU), every step's K/V crossing the PCIe link inside the kernel",
}
"""What each placed mode runs, word for word, for the JSON (as :data:`CONFIG`)."""


def make_baseline(mode: str, config: Any, max_tokens: int, block_tokens: int) -> Cache:
    """An empty cache of ``mode`` (``plain`` or one of :data:`BASELINES`) for a model of
    ``config`` that will hold at most ``max_tokens`` tokens."""
    from transformers import DynamicCache, StaticCache

    if mode == PLAIN:
        return DynamicCache()
    if mode == "offloaded-dynamic":
        return DynamicCache(config=config, offloading=True)
    if mode == "offloaded-static":
        return StaticCache(config=config, max_cache_len=max_tokens, offloading=True)
    if mode == "pinned-host-readonly":
        return PinnedHostCache(
            num_layers=config.num_hidden_layers, max_tokens=max_tokens, block_tokens=block_tokens
        )
    raise ValueError(f"not a baseline mode: {mode!r}")


class PinnedHostLayer(CacheLayerMixin):
    """One layer of a :class:`PinnedHostCache`: ``blocks`` full blocks in ``host``
    (pinned when the K/V are on a GPU), then ``tail_len`` tokens in ``tail`` on the
    device. Updated through its cache (which prefetches across layers)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, index: int, block_tokens: int, max_tokens: int) -> None:
        super().__init__()
        self.index = index
        self.block_tokens = block_tokens
        self.max_blocks = -(-max_tokens // block_tokens)
        self.tokens = 0
        self.blocks = 0
        self.tail_len = 0
        self.host: torch.Tensor | None = None  # [max_blocks, 2, batch, heads, block, dim]
        self.tail: torch.Tensor | None = None  # [2, batch, heads, block, dim] on the device
        self.shape: tuple[int, int, int] | None = None  # (batch, kv_heads, head_dim)
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Allocate the host blocks (all of them, once: pinning is slow) and the tail."""
        batch, heads, _, dim = key_states.shape
        self.shape = (int(batch), int(heads), int(dim))
        self.dtype, self.device = key_states.dtype, key_states.device
        block = (2, batch, heads, self.block_tokens, dim)
        self.host = torch.empty(
            (self.max_blocks, *block), dtype=self.dtype, pin_memory=self.device.type == "cuda"
        )
        self.tail = torch.empty(block, dtype=self.dtype, device=self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Not on its own: the cache updates its layers."""
        raise RuntimeError("a PinnedHostLayer is updated through its PinnedHostCache")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for the attention mask."""
        return self.tokens + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens held."""
        return self.tokens

    def get_max_length(self) -> int:
        """No maximum as transformers means it (masks sized by the tokens held)."""
        return -1

    def offload(self) -> None:
        """Nothing to do: full blocks are on the host already."""

    def prefetch(self) -> None:
        """Nothing to do: the cache prefetches across layers itself."""

    def reset(self) -> None:
        """Forget every token (the buffers stay)."""
        self.tokens = self.blocks = self.tail_len = 0


class PinnedHostCache(Cache):
    """A read-only host offload, written as a careful user would (see :data:`CONFIG`).

    Per layer, the full blocks live in one preallocated pinned host buffer; the block
    still filling (the tail) and the new token stay on the device. ``update`` returns the
    layer's K and V as contiguous ``[batch, kv_heads, tokens, head_dim]`` views of two
    work buffers (valid until the next update), exactly as ``DynamicCache`` returns them
    (same values, same layout: the same outputs). Its full blocks come back with one
    host-to-device copy (they are contiguous on the host) into one of two staging buffers;
    while layer ``i`` computes, layer ``i + 1``'s copy (after the last layer: layer 0's,
    for the next step) runs on a side stream. A block goes to the host once, when it fills.

    ``max_tokens``: the most tokens it will hold (prompt plus new tokens), which sizes the
    host and device buffers once. Greedy or sampled decoding of one batch; no beam search,
    no crop."""

    def __init__(
        self, *, num_layers: int, max_tokens: int, block_tokens: int = 512, prefetch: bool = True
    ) -> None:
        if num_layers <= 0 or max_tokens <= 0 or block_tokens <= 0:
            raise ValueError("num_layers, max_tokens and block_tokens must be positive")
        super().__init__(
            layers=[PinnedHostLayer(i, block_tokens, max_tokens) for i in range(num_layers)]
        )
        self.block_tokens = block_tokens
        self.max_tokens = max_tokens
        self._prefetch = prefetch
        self._stream: Any = None  # the side stream (CUDA only)
        self._staging: list[torch.Tensor | None] = [None, None]
        self._pending: list[tuple[int, int] | None] = [None, None]  # (layer, blocks) launched
        self._ready: list[Any] = [None, None]  # event: that buffer's copy is complete
        self._consumed: list[Any] = [None, None]  # event: the model's stream read that buffer
        self._work: list[torch.Tensor | None] = [None, None]  # K, V (flat, max_tokens each)
        self.bytes_read = 0  # host to device, all steps
        self.copies_read = 0  # host-to-device copies launched (one per layer per step)
        self.bytes_written = 0  # device to host (blocks, once each)

    @property
    def _layers(self) -> list[PinnedHostLayer]:
        return cast("list[PinnedHostLayer]", self.layers)

    # ------------------------------------------------------------ update

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new tokens' K/V to layer ``layer_idx``; return all of its K/V."""
        layer = self._layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
            if layer.device is not None and layer.device.type == "cuda" and self._stream is None:
                self._stream = torch.cuda.Stream(layer.device)
        batch, heads, _, dim = key_states.shape
        if (
            (batch, heads, dim) != layer.shape
            or key_states.dtype != layer.dtype
            or value_states.shape != key_states.shape
        ):
            raise ValueError(
                f"layer {layer_idx} holds K/V of (batch, heads, head size) {layer.shape} in "
                f"{layer.dtype}; got K {tuple(key_states.shape)}, V {tuple(value_states.shape)}"
            )
        buffer = self._take(layer)
        following = self._layers[(layer_idx + 1) % len(self.layers)]
        if self._prefetch and following is not layer and following.blocks:
            other = 1 - buffer if buffer is not None else self._free_buffer()
            self._launch(following, other)
        keys, values, total = self._assemble(layer, buffer, key_states, value_states)
        self._seal(layer, keys, values, total)
        return keys, values

    def _free_buffer(self) -> int:
        return next((b for b in (0, 1) if self._pending[b] is None), 0)

    def _take(self, layer: PinnedHostLayer) -> int | None:
        """The staging buffer holding this layer's full blocks, ready on the model's
        stream (copied now if no prefetch brought them); None if it has none."""
        for b in (0, 1):
            pending = self._pending[b]
            if pending is not None and pending[0] == layer.index and pending[1] != layer.blocks:
                self._pending[b] = None  # stale (layers out of order): copy again
        if not layer.blocks:
            return None
        found = next((b for b in (0, 1) if self._pending[b] == (layer.index, layer.blocks)), None)
        if found is None:
            found = self._free_buffer()
            self._launch(layer, found)
        self._pending[found] = None
        if self._stream is not None:
            torch.cuda.current_stream(layer.device).wait_event(self._ready[found])
        return found

    def _launch(self, layer: PinnedHostLayer, b: int) -> None:
        """One copy of all of ``layer``'s full blocks into staging buffer ``b`` (on the
        side stream, after the model's stream has read what the buffer held)."""
        assert layer.host is not None and layer.device is not None  # initialized
        n = layer.blocks
        staging = self._staging[b]
        if staging is None:
            staging = torch.empty(layer.host.shape, dtype=layer.host.dtype, device=layer.device)
            self._staging[b] = staging
        elif staging.shape != layer.host.shape:
            raise ValueError("layers of different shapes are not supported")
        src, dst = layer.host[:n], staging[:n]
        if self._stream is None:
            dst.copy_(src)
        else:
            with torch.cuda.stream(self._stream):
                if self._consumed[b] is not None:
                    self._stream.wait_event(self._consumed[b])
                dst.copy_(src, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self._stream)
            self._ready[b] = ready
        self._pending[b] = (layer.index, n)
        self.bytes_read += src.numel() * src.element_size()
        self.copies_read += 1

    def _work_view(self, which: int, like: torch.Tensor, numel: int) -> torch.Tensor:
        """The first ``numel`` elements of the K (0) or V (1) work buffer, which holds
        ``max_tokens`` tokens of one layer (allocated once)."""
        buf = self._work[which]
        if buf is None:
            batch, heads, _, dim = like.shape
            buf = torch.empty(
                batch * heads * self.max_tokens * dim, dtype=like.dtype, device=like.device
            )
            self._work[which] = buf
        return buf[:numel]

    def _assemble(
        self,
        layer: PinnedHostLayer,
        buffer: int | None,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Blocks, tail and new tokens into the work buffers (contiguous, in order)."""
        assert layer.shape is not None and layer.tail is not None  # initialized
        batch, heads, dim = layer.shape
        size = self.block_tokens
        stored = layer.blocks * size
        start = stored + layer.tail_len
        total = start + key_states.shape[2]
        if total > self.max_tokens:
            raise ValueError(f"{total} tokens: more than max_tokens={self.max_tokens}")
        numel = batch * heads * total * dim
        keys = self._work_view(0, key_states, numel).view(batch, heads, total, dim)
        values = self._work_view(1, value_states, numel).view(batch, heads, total, dim)
        if buffer is not None:
            staging = self._staging[buffer]
            assert staging is not None  # _take launched into it
            staged = staging[: layer.blocks]
            for out, half in ((keys, 0), (values, 1)):
                out[:, :, :stored].view(batch, heads, layer.blocks, size, dim).copy_(
                    staged[:, half].permute(1, 2, 0, 3, 4)
                )
            if self._stream is not None:
                consumed = torch.cuda.Event()
                consumed.record(torch.cuda.current_stream(layer.device))
                self._consumed[buffer] = consumed
        if layer.tail_len:
            keys[:, :, stored:start].copy_(layer.tail[0, :, :, : layer.tail_len])
            values[:, :, stored:start].copy_(layer.tail[1, :, :, : layer.tail_len])
        keys[:, :, start:].copy_(key_states)
        values[:, :, start:].copy_(value_states)
        return keys, values, total

    def _seal(
        self, layer: PinnedHostLayer, keys: torch.Tensor, values: torch.Tensor, total: int
    ) -> None:
        """Blocks that filled go to the host (one copy, on the side stream); the rest
        stays the tail."""
        assert layer.shape is not None and layer.tail is not None and layer.host is not None
        size = self.block_tokens
        stored = layer.blocks * size
        full = (total - stored) // size
        if full:
            blocks = stack_blocks(keys, values, stored, full, size)
            dst = layer.host[layer.blocks : layer.blocks + full]
            if self._stream is None:
                dst.copy_(blocks)
            else:
                filled = torch.cuda.Event()
                filled.record(torch.cuda.current_stream(layer.device))
                self._stream.wait_event(filled)
                with torch.cuda.stream(self._stream):
                    dst.copy_(blocks, non_blocking=True)
                blocks.record_stream(self._stream)  # freed only once the copy is done
            self.bytes_written += blocks.numel() * blocks.element_size()
            layer.blocks += full
        kept = layer.blocks * size
        rest = total - kept
        old = 0 if full else layer.tail_len  # what the tail holds already
        write_tail(layer.tail, keys, values, old, kept + old, total)
        layer.tail_len = rest
        layer.tokens = total

    # ------------------------------------------------------------ the rest

    def reset(self) -> None:
        """Forget every token (buffers kept; copies in flight finished first)."""
        self.synchronize()
        for layer in self._layers:
            layer.reset()
        self._pending = [None, None]

    def crop(self, tokens_to_remove: int) -> None:
        """Unsupported (a benchmark cache)."""
        raise NotImplementedError("PinnedHostCache does not crop")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Unsupported (a benchmark cache)."""
        raise NotImplementedError("PinnedHostCache does not reorder its batch")

    def synchronize(self) -> None:
        """Wait for the side stream's copies."""
        if self._stream is not None:
            self._stream.synchronize()

    @property
    def device_bytes(self) -> int:
        """Bytes it holds on the device: tails, staging and work buffers."""
        tensors = [layer.tail for layer in self._layers] + self._staging + self._work
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def host_bytes(self) -> int:
        """Bytes of its (pinned) host buffers, allocated for ``max_tokens``."""
        return sum(
            layer.host.numel() * layer.host.element_size()
            for layer in self._layers
            if layer.host is not None
        )

    def close(self) -> None:
        """Finish the copies in flight and let every buffer go."""
        with contextlib.suppress(Exception):
            self.synchronize()
        self._staging, self._work = [None, None], [None, None]
        self._pending = [None, None]
        for layer in self._layers:
            layer.host = layer.tail = None
            layer.is_initialized = False
            layer.reset()
