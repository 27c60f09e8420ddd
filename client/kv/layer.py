"""One layer of a :class:`client.kv.HarvestCache` as transformers sees it, and the
checks that a model's layers are ones it can hold (full attention only) and that an
update's K/V are ones it can take."""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin, get_layer_types_and_kwargs

from harvestd.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

BEAMS = (
    "HarvestCache does not reorder its batch ({what}): beam search, contrastive "
    "search and batch selection are not supported; decode greedily or by sampling"
)


def check_config(config: Any) -> int:
    """Refuse a model whose layers are not all full attention; its layer count."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text, "is_encoder_decoder", False):
        raise InvalidArgument("HarvestCache is for decoder-only models")
    types, _ = get_layer_types_and_kwargs(text)
    other = sorted({t for t in types if t != "full_attention"})
    if other:
        raise InvalidArgument(
            f"HarvestCache keeps full-attention K/V only; this model has "
            f"{', '.join(other)} layers (sliding-window, chunked and "
            f"linear-attention layers are not supported)"
        )
    if getattr(text, "num_kv_shared_layers", 0):
        raise InvalidArgument(
            "HarvestCache does not support layers sharing another "
            "layer's K/V (num_kv_shared_layers)"
        )
    return len(types)


def check_update(key_states: Any, value_states: Any, layer_idx: Any) -> None:
    """Refuse an ``update`` a HarvestCache cannot hold (either placement)."""
    if not isinstance(key_states, torch.Tensor) or key_states.dim() != 4:
        raise InvalidArgument("key_states must be a [batch, kv_heads, tokens, head_dim] tensor")
    if (
        not isinstance(value_states, torch.Tensor)
        or value_states.shape != key_states.shape
        or value_states.dtype != key_states.dtype
        or value_states.device != key_states.device
    ):
        raise InvalidArgument(
            "K and V must have the same shape, dtype and device "
            "(K/V of different head sizes, as in MLA, are not supported)"
        )
    if isinstance(layer_idx, bool) or not isinstance(layer_idx, int) or layer_idx < 0:
        raise InvalidArgument(f"layer_idx must be a non-negative int, got {layer_idx!r}")


def stack_blocks(
    keys: torch.Tensor, values: torch.Tensor, first: int, count: int, block_tokens: int
) -> torch.Tensor:
    """``count`` whole blocks of ``block_tokens`` tokens from token ``first`` of a layer's
    K and V (``[batch, kv_heads, tokens, head_dim]`` each), as one
    ``[count, 2, batch, kv_heads, block_tokens, head_dim]`` tensor, K then V per block:
    what a block store takes in one write."""
    batch, heads, _, dim = keys.shape
    blocks = torch.empty(
        (count, 2, batch, heads, block_tokens, dim), dtype=keys.dtype, device=keys.device
    )
    for half, src in ((0, keys), (1, values)):
        blocks[:, half].copy_(
            src[:, :, first : first + count * block_tokens]
            .view(batch, heads, count, block_tokens, dim)
            .permute(2, 0, 1, 3, 4)
        )
    return blocks


def write_tail(
    tail: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, old: int, first: int, last: int
) -> None:
    """Tokens ``[first, last)`` of a layer's K and V into its tail (``[2, batch, kv_heads,
    block_tokens, head_dim]``) from tail position ``old`` on."""
    end = old + last - first
    tail[0, :, :, old:end].copy_(keys[:, :, first:last])
    tail[1, :, :, old:end].copy_(values[:, :, first:last])


class KVLayer(CacheLayerMixin):
    """What the layers of a :class:`HarvestCache` share, whatever holds their K/V:
    ``tokens`` held, the ``(batch, kv_heads, head_dim)`` shape, dtype and device of the
    first K/V. Updated, reset and cropped through the cache."""

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index
        self.tokens = 0
        self.shape: tuple[int, int, int] | None = None  # (batch, kv_heads, head_dim)
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None

    def _take_shape(self, key_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        self.shape = (int(batch), int(heads), int(dim))
        self.dtype, self.device = key_states.dtype, key_states.device

    def check_like(self, key_states: torch.Tensor) -> None:
        """Refuse K/V of another batch, head count, head size or dtype than the layer
        holds: a new batch needs a reset cache."""
        batch, heads, _, dim = key_states.shape
        if (batch, heads, dim) != self.shape or key_states.dtype != self.dtype:
            raise InvalidArgument(
                f"layer {self.index} holds K/V of batch, heads, head size "
                f"{self.shape} in {self.dtype}; got {(batch, heads, dim)} "
                f"in {key_states.dtype} (reset() the cache for a new batch)"
            )

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Not on its own: the cache updates its layers (it fetches across them)."""
        raise FailedPrecondition("a HarvestLayer is updated through its HarvestCache")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` for the attention mask."""
        return self.tokens + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens held."""
        return self.tokens

    def get_max_length(self) -> int:
        """No maximum."""
        return -1

    def offload(self) -> None:
        """Nothing to do: the cache keeps the K/V where they belong itself."""

    def prefetch(self) -> None:
        """Nothing to do: the cache prefetches across layers itself."""

    def reset(self) -> None:
        """Not on its own: see :meth:`HarvestCache.reset`."""
        raise FailedPrecondition("a HarvestLayer is reset through its HarvestCache")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Unsupported."""
        raise InvalidArgument(BEAMS.format(what="reorder_cache"))

    def crop(self, tokens_to_remove: int) -> None:
        """Not on its own: see :meth:`HarvestCache.crop`."""
        raise FailedPrecondition("a HarvestLayer is cropped through its HarvestCache")

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Unsupported."""
        raise InvalidArgument(BEAMS.format(what="batch_repeat_interleave"))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Unsupported."""
        raise InvalidArgument(BEAMS.format(what="batch_select_indices"))


class HarvestLayer(KVLayer):
    """One layer's K/V: ``blocks`` full blocks in the tiered cache, then ``tail_len``
    tokens in ``tail`` on the device. Updated through its :class:`HarvestCache`."""

    def __init__(self, index: int, block_tokens: int) -> None:
        super().__init__(index)
        self.block_tokens = block_tokens
        self.blocks = 0
        self.tail_len = 0
        self.epoch = 0  # a crop or reset starts a new one: fetches in flight go stale
        self.tail: torch.Tensor | None = None  # [2, batch, heads, block_tokens, head_dim]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Take the batch, heads, head size, dtype and device of the first K/V."""
        self._take_shape(key_states)
        assert self.shape is not None  # just taken
        batch, heads, dim = self.shape
        self.tail = torch.empty(
            (2, batch, heads, self.block_tokens, dim), dtype=self.dtype, device=self.device
        )
        self.is_initialized = True

    @property
    def row_bytes(self) -> int:
        """Bytes of one block (K and V); of an initialized layer."""
        assert self.shape is not None and self.dtype is not None, "layer not initialized"
        batch, heads, dim = self.shape
        return 2 * batch * heads * self.block_tokens * dim * self.dtype.itemsize
