"""A transformers KV cache whose older tokens live in borrowed memory.

    from client import connect
    from client.kv import HarvestCache
    cache = HarvestCache(connect(), config=model.config)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=256)
    cache.close()                      # or let it go: its leases are released then

Per layer, tokens' K and V are kept in blocks of ``block_tokens`` tokens. A full block is
written once, K and V together as one object (``[2, batch, kv_heads, block_tokens,
head_dim]``), to a :class:`~client.cache.TieredCache` (borrowed GPU memory, then borrowed
host memory, with a pinned host copy as the authority); the block still filling (the
tail) stays on the device. On ``update(k, v, layer)`` the layer's K/V are put together in
a device work buffer from its blocks (one batched fetch per layer, into a staging
buffer), the tail and the new tokens, exactly as :class:`transformers.DynamicCache` would
return them (same values, same contiguous layout, so the same outputs). While layer
``i`` computes, layer ``i + 1``'s blocks are already on their way, on the cache's own CUDA
stream (after the last layer: layer 0's, for the next step), as in transformers'
offloaded cache, but read-only: nothing is written back per step.

Revocation: a revoked lease's blocks fall to their host copy at once, a fetch that a
forced fence overlapped reads them again before anything uses them, and the cache's
background pass moves them back into borrowed memory when lenders have room. The
outputs do not change.

Device memory: the tails (one block per layer), two staging buffers and the K and V work
buffers (one layer each, grown by doubling). The K/V that ``update`` returns are views of
the work buffers: valid until the next ``update``, which is how attention uses them.

``placement="placed"`` computes on the K/V where they lie instead: each layer's K and V
in one placed tensor (leases, or the authoritative host copy), written in place, and
``update`` returns views of it that attention reads there: no staging, no fetch
(:mod:`client.kv.placed`).

Unsupported, refused with :class:`~harvestd.errors.InvalidArgument`: sliding-window,
chunked and linear-attention layers (pass ``config`` to have them refused up front),
K and V of different shapes (MLA), beam search and anything else that reorders the batch
(``reorder_cache``, ``batch_select_indices``, ``batch_repeat_interleave``),
``torch.compile``. ``crop`` is supported.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence, TypedDict, cast

import torch
from transformers.cache_utils import Cache

from client.cache.entry import Tier
from client.cache.tiered import TieredCache
from client.kv.layer import (
    BEAMS,
    HarvestLayer,
    check_config,
    check_update,
    stack_blocks,
    write_tail,
)
from client.kv.placed import PlacedKV, PlacedOptions
from client.kv.prefetch import LayerFetch, Prefetcher
from client.placed.choice import choose_placement
from harvestd.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

_IDS = itertools.count()


@dataclass
class KVStats:
    """Where a :class:`HarvestCache`'s K/V are, and what reading them back cost."""

    layers: int = 0
    tokens: int = 0
    block_tokens: int = 0
    blocks: int = 0  # full blocks stored, all layers
    stored_bytes: int = 0  # their K/V bytes
    tier_bytes: dict[str, int] = field(default_factory=dict)  # where those bytes are now
    leased_bytes: int = 0  # borrowed by this cache's slabs
    device_bytes: int = 0  # tails, staging and work buffers
    fetches: int = 0
    blocks_fetched: int = 0
    bytes_fetched: int = 0
    fetch_launch_s: float = 0.0  # launching the copies
    fetch_wait_s: float = 0.0  # waiting for copies (what compute did not hide)
    redone_rows: int = 0  # blocks read again because a revocation overlapped
    released_idle: int = 0  # unconsumed fetches the watchdog finished
    reads: dict[str, int] = field(default_factory=dict)  # bytes read, by tier
    revocations: int = 0


@dataclass
class _Owned:
    """What a HarvestCache holds outside itself, released when it is closed or
    collected (the finalizer must not refer to the cache)."""

    cache: TieredCache | None = None
    owns_cache: bool = True
    prefetcher: Prefetcher | None = None
    keys: set[Hashable] = field(default_factory=set)
    placed: PlacedKV | None = None
    closed: bool = False


class _CacheOptions(TypedDict):
    """What a HarvestCache passes on to the TieredCache it makes."""

    borrow_bytes: int
    slab_bytes: int
    backends: tuple[str, ...]
    ttl: float | None
    refill_every: float | None


def _release(owned: _Owned) -> None:
    if owned.closed:
        return
    owned.closed = True
    try:
        if owned.placed is not None:
            owned.placed.close()
        if owned.prefetcher is not None:
            owned.prefetcher.close()
        if owned.cache is not None:
            if owned.owns_cache:
                owned.cache.close()
            else:
                for key in owned.keys:
                    owned.cache.evict(key)
        owned.keys.clear()
    except Exception:  # noqa: BLE001 - at collection or exit: log, never raise
        log.exception("closing a HarvestCache failed")


class HarvestCache(Cache):
    """A transformers ``Cache`` that keeps full blocks of K/V in memory borrowed through
    ``client`` (see the module docstring). Same outputs as ``DynamicCache``.

    ``block_tokens``: tokens per block. ``config``: the model's config, to refuse
    unsupported layer kinds up front and know the layer count from the first step.
    ``cache``: a :class:`TieredCache` to share (on the model's device); by default one
    is made on the first update, with ``borrow_bytes``, ``slab_bytes``, ``backends``,
    ``ttl`` and ``refill_every`` (see :class:`TieredCache`). ``prefetch``: fetch the
    next layer while this one computes. ``release_idle_s``: once the cache has been idle
    this long (generation over), finish the fetch it launched for a step that did not
    come, so that it holds no lease in use (``None``: never; a revocation of an idle
    cache then waits out its grace period).

    ``placement``: ``"auto"`` (the default) is ``"placed"`` where this process's CUDA
    device maps VMM host memory and ``"copy"`` elsewhere (:mod:`client.placed.choice`;
    the CPU, or with ``cache=``); :attr:`placement` says which was chosen.
    ``placement="placed"``: compute on the K/V where they lie (:mod:`client.kv.placed`):
    each layer in one placed tensor with room for ``max_tokens`` tokens (more is
    refused; without it, the first update's tokens rounded up to whole ``block_tokens``,
    doubled when outgrown, which places the layer again), in chunks of ``chunk_bytes``,
    leased ``slab_bytes`` at most at a time, with ``ttl``; ``refill_every`` is how often
    each placed tensor leases again what a revocation sent back to its host copy. A
    layer leases only if its device's lease backend (``cuda-vmm`` on a GPU, ``host`` on
    the CPU) is in ``backends`` and its bytes fit, with the layers placed before it,
    under ``borrow_bytes`` (``0``: nothing is leased, the host copy is read in place).
    ``cache``, ``prefetch`` and ``release_idle_s`` are the copy path's; the copy path
    ignores ``max_tokens`` when ``"auto"`` chose it."""

    def __init__(
        self,
        client: Any,
        *,
        block_tokens: int = 512,
        config: Any = None,
        cache: TieredCache | None = None,
        borrow_bytes: int = 16 << 30,
        slab_bytes: int = 256 << 20,
        backends: Sequence[str] = ("cuda-vmm", "host"),
        ttl: float | None = None,
        refill_every: float | None = 0.25,
        prefetch: bool = True,
        release_idle_s: float | None = 0.05,
        placement: str = "auto",
        max_tokens: int | None = None,
        chunk_bytes: int = 2 << 20,
    ) -> None:
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens <= 0:
            raise InvalidArgument(f"block_tokens must be a positive int, got {block_tokens!r}")
        asked = placement
        if placement == "auto" and cache is not None:
            placement = "copy"  # a shared tiered cache is the copy path's
        placement = choose_placement(placement)
        if max_tokens is not None and (
            asked == "copy"
            or isinstance(max_tokens, bool)
            or not isinstance(max_tokens, int)
            or max_tokens <= 0
        ):
            raise InvalidArgument(
                "max_tokens must be a positive int, for placement 'placed' or 'auto' (the "
                f"copy path has no capacity); got {max_tokens!r}"
            )
        if placement == "placed" and cache is not None:
            raise InvalidArgument("placed K/V are in placed tensors: cache= is the copy path's")
        super().__init__(layers=[])
        self.placement = placement
        self.block_tokens = block_tokens
        self._num_layers = check_config(config) if config is not None else None
        self._client = client
        self._options = _CacheOptions(
            borrow_bytes=borrow_bytes,
            slab_bytes=slab_bytes,
            backends=tuple(backends),
            ttl=ttl,
            refill_every=refill_every,
        )
        self._prefetch = prefetch
        self._release_idle_s = release_idle_s
        self._uid = next(_IDS)
        self._owned = _Owned(cache=cache, owns_cache=cache is None)
        self._work: list[torch.Tensor | None] = [None, None]
        if placement == "placed":
            options = PlacedOptions(
                max_tokens=max_tokens,
                granule=block_tokens,
                borrow_bytes=borrow_bytes,
                backends=tuple(backends),
                chunk_bytes=chunk_bytes,
                lease_bytes=slab_bytes,
                ttl=ttl,
                refill_s=refill_every,
            )
            self._owned.placed = PlacedKV(client, self.layers, options)
        self._finalizer = weakref.finalize(self, _release, self._owned)
        if cache is not None:
            self._owned.prefetcher = Prefetcher(cache, release_idle_s)

    def __repr__(self) -> str:
        return (
            f"HarvestCache(layers={len(self.layers)}, tokens={self.get_seq_length()}, "
            f"block_tokens={self.block_tokens})"
        )

    @property
    def _layers(self) -> list[HarvestLayer]:
        """``self.layers``, as what they are: only :meth:`_layer` adds layers, and it adds
        HarvestLayers (transformers types the list for every kind of layer)."""
        return cast("list[HarvestLayer]", self.layers)

    # ------------------------------------------------------------ the tiered cache

    @property
    def cache(self) -> TieredCache | None:
        """The tiered cache holding the blocks (made on the first update; None with
        ``placement="placed"``)."""
        return self._owned.cache

    @property
    def placed(self) -> PlacedKV | None:
        """The placed layers (``placement="placed"``; None for ``"copy"``): their placed
        tensors, tiers, leases, refill."""
        return self._owned.placed

    def _open(self, device: torch.device) -> TieredCache:
        if self._owned.closed:
            raise FailedPrecondition("this HarvestCache is closed")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if self._owned.cache is None:
            self._owned.cache = TieredCache(self._client, device=device, **self._options)
            self._owned.prefetcher = Prefetcher(self._owned.cache, self._release_idle_s)
        elif self._owned.cache.device != device:
            raise InvalidArgument(
                f"K/V on {device}, but the cache serves {self._owned.cache.device}"
            )
        return self._owned.cache

    def block_keys(self, layer_idx: int) -> list[Hashable]:
        """The tiered cache's keys of a layer's full blocks, in token order (none when
        placed)."""
        if self._owned.placed is not None:
            return []
        layer = self._layers[layer_idx]
        return [(self._uid, layer_idx, block) for block in range(layer.blocks)]

    # ------------------------------------------------------------ update

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new tokens' K/V to layer ``layer_idx``; return all its K/V
        (``[batch, kv_heads, tokens, head_dim]`` each, views valid until the next update;
        placed: views of the placed tensor, which hold off its remaps while alive)."""
        if self._owned.placed is not None:
            check_update(key_states, value_states, layer_idx)
            return self._owned.placed.update(key_states, value_states, layer_idx)
        layer = self._layer(key_states, value_states, layer_idx)
        fetched = self._fetch_blocks(layer)
        return self._assemble(layer, fetched, key_states, value_states)

    def _layer(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int
    ) -> HarvestLayer:
        check_update(key_states, value_states, layer_idx)
        self._open(key_states.device)
        if (
            layer_idx == 0
            and self._num_layers is None
            and len(self.layers) > 1
            and self._layers[0].tokens
        ):
            self._num_layers = len(self.layers)  # a second pass begins: the count is known
        while len(self.layers) <= layer_idx:
            self.layers.append(HarvestLayer(len(self.layers), self.block_tokens))
        layer = self._layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        layer.check_like(key_states)
        return layer

    def _next_layer(self, index: int) -> HarvestLayer | None:
        """The layer updated after ``index``: the next one, or layer 0 after the last."""
        if index + 1 < len(self.layers):
            return self._layers[index + 1]
        if self._num_layers is not None and index + 1 == self._num_layers > 1:
            return self._layers[0]
        return None

    def _fetch_blocks(self, layer: HarvestLayer) -> LayerFetch | None:
        """This layer's blocks in staging rows (fetched now if no prefetch brought them),
        with the next layer's fetch launched first, to run while this one computes."""
        prefetcher = self._owned.prefetcher
        assert prefetcher is not None  # _layer opened the cache, which makes the prefetcher
        following = self._next_layer(layer.index) if self._prefetch else None
        if following is not None and following.blocks and following is not layer:
            prefetcher.launch(
                following.index,
                following.epoch,
                self.block_keys(following.index),
                following.row_bytes,
                keep=layer.index,
            )
        if not layer.blocks:
            prefetcher.take(layer.index, layer.epoch, 0)  # drop a stale one, if any
            return None
        fetched = prefetcher.take(layer.index, layer.epoch, layer.blocks)
        if fetched is None:
            prefetcher.launch(
                layer.index,
                layer.epoch,
                self.block_keys(layer.index),
                layer.row_bytes,
                keep=following.index if following else None,
            )
            fetched = prefetcher.take(layer.index, layer.epoch, layer.blocks)
        return fetched

    def _work_buffer(self, which: int, like: torch.Tensor, numel: int) -> torch.Tensor:
        """The first ``numel`` elements of the K (0) or V (1) work buffer, grown by
        doubling. Only this stream uses it, so one of each serves every layer."""
        buf = self._work[which]
        if (
            buf is None
            or buf.numel() < numel
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            grown = 0  # a buffer of the same dtype and device grows by doubling
            if buf is not None and buf.dtype == like.dtype and buf.device == like.device:
                grown = 2 * buf.numel()
            size = max(numel, grown)
            self._work[which] = None
            buf = torch.empty(size, dtype=like.dtype, device=like.device)
            self._work[which] = buf
        return buf[:numel]

    def _assemble(
        self,
        layer: HarvestLayer,
        fetched: LayerFetch | None,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks, tail and new tokens into the work buffers; seal the blocks that filled."""
        # _layer initialized the layer: it has its shape, dtype and tail.
        assert layer.shape is not None and layer.dtype is not None and layer.tail is not None
        batch, heads, dim = layer.shape
        size = self.block_tokens
        stored = layer.blocks * size
        start = stored + layer.tail_len
        total = start + key_states.shape[2]
        numel = batch * heads * total * dim
        keys = self._work_buffer(0, key_states, numel).view(batch, heads, total, dim)
        values = self._work_buffer(1, value_states, numel).view(batch, heads, total, dim)
        if fetched is not None:
            staged = fetched.rows.view(layer.dtype).view(layer.blocks, 2, batch, heads, size, dim)
            for out, half in ((keys, 0), (values, 1)):
                out[:, :, :stored].view(batch, heads, layer.blocks, size, dim).copy_(
                    staged[:, half].permute(1, 2, 0, 3, 4)
                )
        if layer.tail_len:
            keys[:, :, stored:start].copy_(layer.tail[0, :, :, : layer.tail_len])
            values[:, :, stored:start].copy_(layer.tail[1, :, :, : layer.tail_len])
        keys[:, :, start:].copy_(key_states)
        values[:, :, start:].copy_(value_states)
        self._seal(layer, keys, values, total)
        return keys, values

    def _seal(
        self, layer: HarvestLayer, keys: torch.Tensor, values: torch.Tensor, total: int
    ) -> None:
        """Write the blocks that filled to the tiered cache (one batched write); keep the
        rest as the tail."""
        assert layer.shape is not None and layer.tail is not None  # initialized by _layer
        size = self.block_tokens
        stored = layer.blocks * size
        full = (total - stored) // size
        if full:
            blocks = stack_blocks(keys, values, stored, full, size)
            new = [(self._uid, layer.index, layer.blocks + j) for j in range(full)]
            assert self._owned.cache is not None  # _layer opened it
            self._owned.cache.put_many(new, blocks)
            self._owned.keys.update(new)
            layer.blocks += full
        kept = layer.blocks * size
        rest = total - kept
        old = 0 if full else layer.tail_len  # what the tail holds already
        write_tail(layer.tail, keys, values, old, kept + old, total)
        layer.tail_len = rest
        layer.tokens = total

    # ------------------------------------------------------------ shrinking

    def crop(self, tokens_to_remove: int) -> None:
        """Remove ``-tokens_to_remove`` tokens from every layer (a positive value, as in
        transformers, is the length to keep). A block that becomes the tail again is read
        back to the device (placed: nothing moves)."""
        if self._owned.placed is not None:
            self._owned.placed.crop(tokens_to_remove)
            return
        for layer in self._layers:
            length = layer.tokens
            if tokens_to_remove > 0:
                keep = min(tokens_to_remove, length)
            else:
                keep = max(0, length + tokens_to_remove)
            if keep < length:
                self._crop_layer(layer, keep)

    def _crop_layer(self, layer: HarvestLayer, keep: int) -> None:
        size = self.block_tokens
        blocks, rest = divmod(keep, size)
        if blocks < layer.blocks:
            # The layer holds full blocks: an update opened the cache and initialized it.
            cache = self._owned.cache
            assert cache is not None and layer.tail is not None
            if rest:
                cache.get((self._uid, layer.index, blocks), out=layer.tail.view(1, -1))
            for block in range(blocks, layer.blocks):
                key = (self._uid, layer.index, block)
                cache.evict(key)
                self._owned.keys.discard(key)
            layer.blocks = blocks
        layer.tail_len = rest
        layer.tokens = keep
        layer.epoch += 1

    def reset(self) -> None:
        """Forget every token (the layers stay; a new batch size is accepted after)."""
        if self._owned.placed is not None:
            self._owned.placed.reset()
            return
        for layer in self._layers:
            if not self._owned.closed:
                for key in self.block_keys(layer.index):
                    assert self._owned.cache is not None  # the layer's blocks are in it
                    self._owned.cache.evict(key)
                    self._owned.keys.discard(key)
            layer.blocks = layer.tokens = layer.tail_len = 0
            layer.epoch += 1
            layer.is_initialized = False
            layer.tail = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Unsupported: see the module docstring."""
        raise InvalidArgument(BEAMS.format(what="reorder_cache"))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Unsupported: see the module docstring."""
        raise InvalidArgument(BEAMS.format(what="batch_repeat_interleave"))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Unsupported: see the module docstring."""
        raise InvalidArgument(BEAMS.format(what="batch_select_indices"))

    def update_conv_state(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Unsupported: linear-attention layers."""
        raise InvalidArgument(
            "HarvestCache holds attention K/V only: linear-attention "
            "(conv and recurrent state) layers are not supported"
        )

    update_recurrent_state = update_conv_state

    def update_indexer(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Unsupported: indexer key caches."""
        raise InvalidArgument("HarvestCache does not hold indexer keys")

    # ------------------------------------------------------------ reporting and closing

    @property
    def stats(self) -> KVStats:
        """Where the K/V are now, and what fetching them cost so far."""
        stats = KVStats(
            layers=len(self.layers), tokens=self.get_seq_length(), block_tokens=self.block_tokens
        )
        if self._owned.placed is not None:
            self._owned.placed.fill_stats(stats)
            return stats
        cache, prefetcher = self._owned.cache, self._owned.prefetcher
        for layer in self._layers:
            if not layer.is_initialized:
                continue
            assert layer.tail is not None  # an initialized layer has its tail
            stats.blocks += layer.blocks
            stats.stored_bytes += layer.blocks * layer.row_bytes
            stats.device_bytes += layer.tail.numel() * layer.tail.element_size()
            for key in self.block_keys(layer.index):
                assert cache is not None  # the layer's blocks are in it
                tier = cache.tier_of(key).value
                stats.tier_bytes[tier] = stats.tier_bytes.get(tier, 0) + layer.row_bytes
        stats.device_bytes += sum(b.numel() * b.element_size() for b in self._work if b is not None)
        if prefetcher is not None:
            moved = prefetcher.stats
            stats.device_bytes += prefetcher.device_bytes
            stats.fetches, stats.blocks_fetched, stats.bytes_fetched = (
                moved.fetches,
                moved.blocks,
                moved.bytes,
            )
            stats.fetch_launch_s, stats.fetch_wait_s = moved.launch_s, moved.wait_s
            stats.redone_rows, stats.released_idle = moved.redone_rows, moved.released_idle
        if cache is not None:
            stats.leased_bytes = cache.borrowed_bytes
            stats.reads = dict(cache.stats.bytes)
            stats.revocations = cache.stats.revocations
        return stats

    def tier_of(self, layer_idx: int, block: int) -> Tier:
        """The fastest tier holding a layer's full block now."""
        if self._owned.placed is not None:
            raise InvalidArgument("placed K/V have no blocks: see cache.placed.tiers()")
        if not 0 <= layer_idx < len(self.layers) or not 0 <= block < self._layers[layer_idx].blocks:
            raise KeyError(f"layer {layer_idx} has no full block {block}")
        assert self._owned.cache is not None  # the block is in it
        return self._owned.cache.tier_of((self._uid, layer_idx, block))

    def close(self) -> None:
        """Finish fetches in flight and give the borrowed memory back (blocks in a shared
        cache are evicted). The cache cannot be updated after."""
        self._work = [None, None]
        self._finalizer()
        self.reset()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""
        return self._owned.closed
