"""The KV cache computed where it lies: ``HarvestCache(client, placement="placed")``.

Each layer's K and V live in one placed tensor (:class:`client.placed.PlacedTensor`)
``[2, batch, kv_heads, capacity, head_dim]`` on the layer's device: chunks in leases
(GPU leases on a GPU, host leases on the CPU twin) or in the authoritative host copy,
at one address for the tensor's life. ``update`` writes the new tokens with
``PlacedTensor.write_`` (the placed pages and the authoritative copy together, so a
revocation, which maps the copy back and copies nothing, loses no token) and returns
``[:, :, :tokens]`` views of the placed tensor: attention reads the K/V where they lie.
No staging, no work buffer, no fetch.

Use blocks: a revocation's remap waits for the placed tensor's ``use()`` blocks, then for
the device, before it changes a page. ``update`` enters one ``use()`` block for the two
views it returns and leaves it when the last of them dies: transformers' attention drops
the views when its forward returns, by which time every kernel that reads them has been
launched. So a remap never runs between ``update`` and the launch of the attention that
reads its views, and no timer guesses when that launch happened. Keep no view past the forward: a
revocation of that layer's leases waits for it (``HarvestCache.placed.release()`` ends
the blocks of views still alive; :meth:`PlacedKV.close` does too).

Capacity: ``max_tokens`` tokens per layer, placed once; more is refused. Without it, the
first update places its tokens rounded up to whole ``block_tokens``, and a layer that
outgrows its capacity is placed again at twice it. Placing costs a host buffer of the
capacity (copied into the new tensor's authoritative copy, then freed), the leases'
grants and fills; placing again adds a copy of the held tokens from the old placed
tensor into the new one (device to device, and into the new host copy), then gives the
old one back (both are held meanwhile). Pass ``max_tokens`` to pay it once.

Device memory: nothing of the cache's own. The placed tensors' pages are leases (another
process's memory) or the host copy; ``update`` writes from the new K/V into them and
returns views.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from client.kv.layer import KVLayer
from client.placed.tensor import PlacedTensor
from harvestd.errors import FailedPrecondition, InvalidArgument
from harvestd.sizes import round_up

STACKED_TOKENS = 64  # an update of at most this many tokens writes K and V in one go


@dataclass(frozen=True)
class PlacedOptions:
    """How a :class:`PlacedKV` places its layers."""

    max_tokens: int | None  # each layer's fixed capacity; None: grown by doubling
    granule: int  # capacities are whole multiples of it (the cache's block_tokens)
    borrow_bytes: int  # layers are leased, in order, while their bytes fit under it
    backends: tuple[str, ...]  # a layer leases only if its range's backend is among them
    chunk_bytes: int
    lease_bytes: int
    ttl: float | None
    refill_s: float | None


class PlacedLayer(KVLayer):
    """One layer's K/V: ``tokens`` of them in :attr:`placed`, which has room for
    ``capacity`` (``None`` until the first update)."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.placed: PlacedTensor | None = None
        self.capacity = 0
        self.borrows = False  # whether its placed tensor may lease
        self.holds: set[_Hold] = set()  # uses of views still alive
        # The placed tensor's K and V halves: each update returns narrowings of them.
        # (Not transformers' ``keys`` / ``values``: those mean the layer's K/V.)
        self.key_half = self.value_half = torch.empty(0)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Take the batch, heads, head size, dtype and device of the first K/V."""
        self._take_shape(key_states)
        self.is_initialized = True

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's K and V; of an initialized layer."""
        assert self.shape is not None and self.dtype is not None, "layer not initialized"
        batch, heads, dim = self.shape
        return 2 * batch * heads * dim * self.dtype.itemsize


class _Hold:
    """One use of a placed tensor, begun by ``update`` and ended once: when the last of
    the views it guards dies, or at once by :meth:`leave` (when the cache lets go of the
    tensor). Weak references with callbacks rather than ``weakref.finalize``, and plain
    ``begin_use`` / ``end_use`` calls: this runs for every layer of every decode step."""

    __slots__ = ("__weakref__", "_placed", "_user", "_holds", "_guard", "_views", "_refs")

    def __init__(
        self,
        placed: PlacedTensor,
        holds: set["_Hold"],
        guard: threading.RLock,
        views: tuple[torch.Tensor, ...],
    ) -> None:
        self._placed, self._holds, self._guard = placed, holds, guard
        self._user = placed.begin_use()
        self._views = len(views)
        with guard:
            holds.add(self)
        # The references live as long as the hold: a dead one never calls back.
        self._refs = [weakref.ref(view, self._view_died) for view in views]

    def _view_died(self, _ref: object) -> None:
        with self._guard:
            self._views -= 1
            if self._views > 0 or self not in self._holds:
                return
            self._holds.discard(self)
        self._placed.end_use(self._user)

    def leave(self) -> None:
        with self._guard:
            if self not in self._holds:
                return
            self._holds.discard(self)
        self._placed.end_use(self._user)


def _upto(tokens: int) -> tuple[slice, ...]:
    """The index of a placed tensor's first ``tokens`` tokens, K and V."""
    return (slice(None), slice(None), slice(None), slice(0, tokens))


class PlacedKV:
    """The layers of a ``HarvestCache(placement="placed")`` (see the module docstring).
    ``layers`` is the cache's own list: transformers reads the layers there."""

    def __init__(self, client: Any, layers: list[Any], options: PlacedOptions) -> None:
        for name in ("chunk_bytes", "lease_bytes"):
            value = getattr(options, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                shown = "slab_bytes" if name == "lease_bytes" else name
                raise InvalidArgument(f"{shown} must be a positive int, got {value!r}")
        self._client = client
        self._layers = layers
        self.options = options
        self._guard = threading.RLock()
        self.regrown = 0  # layers placed again at a larger capacity
        self._revocations_gone = 0  # revocations of placed tensors given up since
        self.closed = False

    @property
    def layers(self) -> list[PlacedLayer]:
        """The cache's layers (all of them PlacedLayers in this mode)."""
        return self._layers

    # ------------------------------------------------------------ update

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' K/V (checked by the caller) into layer ``layer_idx``'s
        placed tensor; return views of all its K/V, both under one use of it."""
        if self.closed:
            raise FailedPrecondition("this HarvestCache is closed")
        while len(self._layers) <= layer_idx:
            self._layers.append(PlacedLayer(len(self._layers)))
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        layer.check_like(key_states)
        if key_states.device != layer.device:  # its placed tensor lives on that device
            raise InvalidArgument(
                f"layer {layer_idx} holds K/V on {layer.device}; got {key_states.device}"
            )
        start = layer.tokens
        end = start + int(key_states.shape[2])
        if layer.placed is None or end > layer.capacity:
            self._place(layer, end)
        placed = layer.placed
        assert placed is not None  # just placed
        span = (slice(None), slice(None), slice(start, end))
        if end - start <= STACKED_TOKENS:  # decoding: one write (of a few KiB) for both
            placed.write_((slice(None), *span), torch.stack((key_states, value_states)))
        else:  # a prefill: no stacked copy of its K/V
            placed.write_((0, *span), key_states)
            placed.write_((1, *span), value_states)
        layer.tokens = end
        keys, values = layer.key_half.narrow(2, 0, end), layer.value_half.narrow(2, 0, end)
        _Hold(placed, layer.holds, self._guard, (keys, values))  # ends when both die
        return keys, values

    def _capacity(self, layer: PlacedLayer, need: int) -> int:
        limit = self.options.max_tokens
        if limit is None:
            return round_up(max(need, 2 * layer.capacity), self.options.granule)
        if need > limit:
            raise InvalidArgument(
                f"layer {layer.index} would hold {need} tokens; max_tokens={limit} is its "
                f"capacity (crop() or reset() the cache, or make it with more)"
            )
        return limit

    def _place(self, layer: PlacedLayer, need: int) -> None:
        """Place the layer at a capacity for ``need`` tokens (again, if it has a placed
        tensor: its tokens are copied over, then it is given back)."""
        assert layer.shape is not None and layer.dtype is not None and layer.device is not None
        capacity = self._capacity(layer, need)
        batch, heads, dim = layer.shape
        # Empty: only tokens written from here on are ever read, so nothing is copied in.
        shape = (2, batch, heads, capacity, dim)
        nbytes = math.prod(shape) * torch.empty((), dtype=layer.dtype).element_size()
        borrow = self._may_borrow(layer, nbytes)
        opts = self.options
        placed = self._client.place(
            None,
            device=layer.device,
            shape=shape,
            dtype=layer.dtype,
            chunk_bytes=opts.chunk_bytes,
            lease_bytes=opts.lease_bytes,
            ttl=opts.ttl,
            refill_s=opts.refill_s,
            borrow=borrow,
        )
        old = layer.placed
        if old is not None:
            try:
                if layer.tokens:  # device to device (and to the new host copy): no staging
                    with old.use() as held:
                        placed.write_(_upto(layer.tokens), held[_upto(layer.tokens)])
            except BaseException:
                placed.close()
                raise
            self._let_go(layer)
            self.regrown += 1
        layer.placed, layer.capacity, layer.borrows = placed, capacity, borrow
        layer.key_half, layer.value_half = placed.tensor[0], placed.tensor[1]

    def _may_borrow(self, layer: PlacedLayer, nbytes: int) -> bool:
        assert layer.device is not None
        backend = "host" if layer.device.type == "cpu" else "cuda-vmm"
        if backend not in self.options.backends:
            return False
        others = sum(
            other.placed.nbytes
            for other in self.layers
            if other is not layer and other.placed is not None and other.borrows
        )
        return others + nbytes <= self.options.borrow_bytes

    def _let_go(self, layer: PlacedLayer) -> None:
        """End the layer's use blocks and give its placed tensor back."""
        with self._guard:
            holds = list(layer.holds)
        for hold in holds:
            hold.leave()
        placed, layer.placed, layer.capacity, layer.borrows = layer.placed, None, 0, False
        layer.key_half = layer.value_half = torch.empty(0)
        if placed is not None:
            placed.close()
            self._revocations_gone += placed.revocations

    # ------------------------------------------------------------ shrinking and the rest

    def crop(self, tokens_to_remove: int) -> None:
        """Keep ``tokens_to_remove`` tokens if positive, else drop ``-tokens_to_remove``:
        nothing moves, the tokens past the new end are overwritten by later updates."""
        for layer in self.layers:
            length = layer.tokens
            if tokens_to_remove > 0:
                layer.tokens = min(tokens_to_remove, length)
            else:
                layer.tokens = max(0, length + tokens_to_remove)

    def reset(self) -> None:
        """Forget every token and give every placed tensor back (a new batch size is
        accepted after)."""
        for layer in self.layers:
            self._let_go(layer)
            layer.tokens = 0
            layer.is_initialized = False
            layer.shape = layer.dtype = layer.device = None

    def release(self) -> int:
        """End the use blocks of views still alive (they must not be read after); how
        many there were."""
        with self._guard:
            holds = [hold for layer in self.layers for hold in layer.holds]
        for hold in holds:
            hold.leave()
        return len(holds)

    def tensors(self) -> list[PlacedTensor]:
        """The layers' placed tensors (layers not placed yet left out)."""
        return [layer.placed for layer in self.layers if layer.placed is not None]

    def tiers(self) -> dict[str, int]:
        """Bytes of every layer's placed tensor (whole capacity) in each tier."""
        out: dict[str, int] = {}
        for placed in self.tensors():
            for tier, nbytes in placed.tiers().items():
                out[tier] = out.get(tier, 0) + nbytes
        return out

    def refill(self) -> int:
        """Lease again what sits in the authoritative copies; the bytes placed."""
        return sum(p.refill() for p in self.tensors())

    @property
    def revocations(self) -> int:
        """Leases revoked under this cache's placed tensors, given-back ones included."""
        return self._revocations_gone + sum(p.revocations for p in self.tensors())

    def fill_stats(self, stats: Any) -> None:
        """Fill a :class:`client.kv.cache.KVStats` (made by the cache) for this mode."""
        for layer in self.layers:
            if layer.is_initialized:
                stats.stored_bytes += layer.tokens * layer.token_bytes
        stats.tier_bytes = {tier: n for tier, n in self.tiers().items() if n}
        stats.leased_bytes = sum(lease.nbytes for p in self.tensors() for lease in p.leases())
        stats.device_bytes = stats.tier_bytes.get("local", 0)
        stats.revocations = self.revocations

    def close(self) -> None:
        """Give every placed tensor back. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for layer in self.layers:
            self._let_go(layer)
