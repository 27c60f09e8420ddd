"""KV blocks by id in borrowed memory, for a paged-attention server.

    from client.kv.blocks import KVBlockStore
    store = KVBlockStore(client, block_bytes=2 * 16 * 8 * 128 * 2, device="cuda:0")
    store.put([7, 8], kv_cache[[3, 4]])        # blocks leave the paged cache: one batched write
    store.load([7, 8], kv_cache, slots=[0, 5])  # and come back into any slots: one batched fetch
    store.drop([7, 8])

A block is ``block_bytes`` of anything (a vLLM-style ``[2, block_size, kv_heads,
head_dim]`` page, say); it is kept in a :class:`~client.cache.TieredCache` (borrowed GPU
memory, then borrowed host memory, a pinned host copy as the authority), so a revoked
lease never loses or corrupts one. ``dst`` of :meth:`KVBlockStore.load` is the server's
paged tensor ``[num_slots, ...]`` whose rows are blocks; rows ``slots`` receive the
blocks: straight from borrowed memory when the slots are consecutive, else through one
staging buffer and one ``index_copy_`` (never a copy per block).
"""

from __future__ import annotations

import itertools
import logging
import operator
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from client.cache.entry import CacheStats, Tier
from client.cache.fetch import Fetch
from client.cache.tiered import TieredCache
from harvestd.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

_IDS = itertools.count()
Ids = Sequence[int] | torch.Tensor


def _int_list(values: Ids, what: str) -> list[int]:
    """``values`` as a list of ints (a sequence, or a 1-D integer tensor)."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.dtype.is_floating_point or values.dtype == torch.bool:
            raise InvalidArgument(f"{what} must be a 1-D integer tensor or a sequence of ints")
        return [int(v) for v in values.tolist()]
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise InvalidArgument(f"{what} must be a sequence of ints, got {type(values).__name__}")
    out = []
    for value in values:
        if isinstance(value, bool):
            raise InvalidArgument(f"{what} must be ints, got {value!r}")
        try:
            out.append(operator.index(value))
        except TypeError:
            raise InvalidArgument(f"{what} must be ints, got {value!r}") from None
    return out


def _rows(t: Any, what: str, block_bytes: int, rows: int | None = None) -> torch.Tensor:
    """``t`` (``[n, ...]``, contiguous) as ``[n, block_bytes]`` bytes, no copy."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        raise InvalidArgument(f"{what} must be a tensor of rows, one per block")
    if not t.is_contiguous():
        raise InvalidArgument(f"{what} must be contiguous")
    if rows is not None and t.shape[0] != rows:
        raise InvalidArgument(f"{what} has {t.shape[0]} rows; {rows} are needed, one per block")
    row_bytes = t[0].numel() * t.element_size() if t.shape[0] else 0
    if t.shape[0] and row_bytes != block_bytes:
        raise InvalidArgument(
            f"{what}: a row of {tuple(t.shape[1:])} {t.dtype} is {row_bytes} "
            f"bytes; blocks of this store are {block_bytes}"
        )
    flat = t.view(t.shape[0], -1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _key(uid: int, block_id: int) -> tuple[str, int, int]:
    return ("kv-block", uid, block_id)


def _release(cache: TieredCache, owns: bool, uid: int, ids: set[int]) -> None:
    """Give a store's borrowed memory back (its own cache), or evict its blocks (a
    shared one). Runs at close, or when the store is collected."""
    try:
        if owns:
            cache.close()
        else:
            for block in list(ids):
                cache.evict(_key(uid, block))
    except Exception:  # noqa: BLE001 - at collection or exit: log, never raise
        log.exception("closing a KVBlockStore failed")


@dataclass
class BlockStoreStats:
    """A store's blocks and where they are, and the cache's reads by tier."""

    blocks: int
    block_bytes: int
    tier_blocks: dict[str, int]
    leased_bytes: int
    cache: CacheStats


class KVLoad:
    """Blocks on their way into a paged tensor (see :meth:`KVBlockStore.start_load`);
    call :meth:`wait` once before reading them."""

    def __init__(
        self, fetch: Fetch, scatter: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    ) -> None:
        self._fetch = fetch
        self._scatter = scatter
        self._done = False

    def wait(self) -> None:
        """Finish: the blocks are in their slots on the caller's stream when this returns
        (a revocation that overlapped is made good: those blocks are read again)."""
        self._fetch.wait()
        if self._scatter is not None and not self._done:
            dst, index, staging = self._scatter
            dst.index_copy_(0, index, staging)
        self._done = True

    def __enter__(self) -> "KVLoad":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wait()


class KVBlockStore:
    """Blocks of ``block_bytes`` by integer id, in memory borrowed through ``client``,
    read back into a paged KV tensor on ``device`` with one batched fetch.

    ``cache``: a :class:`TieredCache` on ``device`` to share; by default the store makes
    its own with ``borrow_bytes``, ``slab_bytes``, ``backends``, ``ttl`` and
    ``refill_every``. Thread-safe as far as the cache is; ids are the caller's."""

    def __init__(
        self,
        client: Any,
        block_bytes: int,
        device: Any = "cpu",
        *,
        cache: TieredCache | None = None,
        borrow_bytes: int = 4 << 30,
        slab_bytes: int = 256 << 20,
        backends: Sequence[str] = ("cuda-vmm", "host"),
        ttl: float | None = None,
        refill_every: float | None = 0.25,
    ) -> None:
        if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes <= 0:
            raise InvalidArgument(f"block_bytes must be a positive int, got {block_bytes!r}")
        self.block_bytes = block_bytes
        self._owns = cache is None
        self.cache = (
            cache
            if cache is not None
            else TieredCache(
                client,
                device=device,
                borrow_bytes=borrow_bytes,
                slab_bytes=slab_bytes,
                backends=backends,
                ttl=ttl,
                refill_every=refill_every,
            )
        )
        self.device = self.cache.device
        self._uid = next(_IDS)
        self._ids: set[int] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._finalizer = weakref.finalize(
            self, _release, self.cache, self._owns, self._uid, self._ids
        )

    def _key(self, block_id: int) -> tuple[str, int, int]:
        return _key(self._uid, block_id)

    def _known(self, block_ids: list[int]) -> None:
        if self._closed:
            raise FailedPrecondition("this KVBlockStore is closed")
        with self._lock:
            missing = [b for b in block_ids if b not in self._ids]
        if missing:
            raise KeyError(
                f"no block {missing[0]} in this store"
                + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "")
            )

    def put(self, block_ids: Ids, blocks: torch.Tensor) -> None:
        """Store row ``i`` of ``blocks`` (``[n, ...]``, ``block_bytes`` a row, on any
        device) as block ``block_ids[i]``, replacing a block of that id: one batched
        write (one host copy, one scatter per borrowed slab)."""
        if self._closed:
            raise FailedPrecondition("this KVBlockStore is closed")
        ids = _int_list(block_ids, "block_ids")
        if len(set(ids)) != len(ids):
            raise InvalidArgument("block_ids must be distinct")
        rows = _rows(blocks, "blocks", self.block_bytes, len(ids))
        self.cache.put_many([self._key(b) for b in ids], rows)
        with self._lock:
            self._ids.update(ids)

    def start_load(self, block_ids: Ids, dst: torch.Tensor, slots: Ids) -> KVLoad:
        """Start copying blocks ``block_ids`` into rows ``slots`` of ``dst`` (the paged
        tensor, ``[num_slots, ...]`` with ``block_bytes`` rows, contiguous, on the store's
        device), on the cache's own stream; the returned :class:`KVLoad`'s ``wait()``
        finishes it."""
        ids = _int_list(block_ids, "block_ids")
        where = _int_list(slots, "slots")
        if len(where) != len(ids):
            raise InvalidArgument(f"{len(ids)} block ids but {len(where)} slots")
        if len(set(where)) != len(where):
            raise InvalidArgument("slots must be distinct")
        table = _rows(dst, "dst", self.block_bytes)
        if dst.device != self.device:
            raise InvalidArgument(f"dst is on {dst.device}; this store loads into {self.device}")
        bad = [s for s in where if not 0 <= s < table.shape[0]]
        if bad:
            raise InvalidArgument(f"slot {bad[0]} is outside dst's {table.shape[0]} rows")
        self._known(ids)
        keys = [self._key(b) for b in ids]
        if not ids or where == list(range(where[0], where[0] + len(where))):
            first = where[0] if where else 0
            return KVLoad(self.cache.fetch(keys, table[first : first + len(ids)]), None)
        staging = torch.empty((len(ids), self.block_bytes), dtype=torch.uint8, device=self.device)
        if self.cache.stream is not None:
            # Written on the cache's stream: were the load dropped unwaited, the allocator
            # must not hand this memory out before those copies are done.
            staging.record_stream(self.cache.stream)
        index = torch.tensor(where, dtype=torch.int64).to(self.device, non_blocking=True)
        return KVLoad(self.cache.fetch(keys, staging), (table, index, staging))

    def load(self, block_ids: Ids, dst: torch.Tensor, slots: Ids) -> torch.Tensor:
        """Copy blocks ``block_ids`` into rows ``slots`` of ``dst`` (see
        :meth:`start_load`) and return ``dst`` once they are there."""
        self.start_load(block_ids, dst, slots).wait()
        return dst

    def drop(self, block_ids: Ids) -> None:
        """Forget blocks (all or none: an unknown id raises ``KeyError`` first)."""
        ids = _int_list(block_ids, "block_ids")
        self._known(ids)
        for block in ids:
            self.cache.evict(self._key(block))
        with self._lock:
            self._ids.difference_update(ids)

    def tier_of(self, block_id: int) -> Tier:
        """The fastest tier holding a block now."""
        self._known(_int_list([block_id], "block_id"))
        return self.cache.tier_of(self._key(block_id))

    def __contains__(self, block_id: object) -> bool:
        with self._lock:
            return block_id in self._ids

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)

    @property
    def stats(self) -> BlockStoreStats:
        """The blocks, where they are, and the cache's reads."""
        with self._lock:
            ids = list(self._ids)
        tiers: dict[str, int] = {}
        for block in ids:
            tier = self.cache.tier_of(self._key(block)).value
            tiers[tier] = tiers.get(tier, 0) + 1
        return BlockStoreStats(
            len(ids), self.block_bytes, tiers, self.cache.borrowed_bytes, self.cache.stats
        )

    def close(self) -> None:
        """Give the borrowed memory back (a shared cache only loses this store's blocks)."""
        if self._closed:
            return
        self._closed = True
        self._finalizer()
        with self._lock:
            self._ids.clear()

    def __enter__(self) -> "KVBlockStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
