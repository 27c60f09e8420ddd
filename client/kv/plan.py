"""What a KV fetch plan is made of: the shape of a layer's KV (:class:`KVShape`), the
measured rates of each path (:class:`Rates`), and the split of a layer's tokens between
the peer link, the host link and recomputation (:class:`FetchPlan`). The planner
(:mod:`client.kv.planner`) chooses plans; :mod:`client.kv.fetch` carries them out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from harvestd.errors import InvalidArgument

Via = Literal["host", "peer"]


def positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgument(f"{what} must be a positive int, got {value!r}")
    return value


@dataclass(frozen=True)
class KVShape:
    """One attention layer's K/V and activation sizes.

    ``dtype_bytes`` may be given as a torch dtype; it is kept as its element size."""

    hidden_size: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    def __post_init__(self) -> None:
        size = self.dtype_bytes
        if not isinstance(size, int):
            size = getattr(size, "itemsize", None)
            if not isinstance(size, int):
                raise InvalidArgument(
                    f"dtype_bytes must be an int or a torch dtype, got {self.dtype_bytes!r}"
                )
            object.__setattr__(self, "dtype_bytes", size)
        for name in ("hidden_size", "kv_heads", "head_dim", "dtype_bytes"):
            positive_int(getattr(self, name), name)

    @classmethod
    def from_config(cls, config: Any, dtype: Any = None) -> "KVShape":
        """From a transformers config: ``hidden_size``, ``num_attention_heads``,
        ``num_key_value_heads`` (default: the attention heads), ``head_dim`` (default:
        hidden / heads). ``dtype`` (bytes or torch dtype) defaults to the config's own
        dtype, else 2 bytes."""
        hidden = getattr(config, "hidden_size", None)
        heads = getattr(config, "num_attention_heads", None)
        if not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0:
            raise InvalidArgument("config needs integer hidden_size and num_attention_heads")
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        if dtype is None:
            # transformers 5 names it dtype (torch_dtype warns there); older ones torch_dtype
            name = "dtype" if hasattr(config, "dtype") else "torch_dtype"
            dtype = getattr(config, name, None)
            if isinstance(dtype, str):  # configs loaded from JSON may keep the name
                import torch

                dtype = getattr(torch, dtype, None)
        return cls(hidden, int(kv_heads), int(head_dim), dtype if dtype is not None else 2)

    @property
    def kv_dim(self) -> int:
        """Elements of K (or of V) per token: ``kv_heads * head_dim``."""
        return self.kv_heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of one token's K and V together, in one layer."""
        return 2 * self.kv_dim * self.dtype_bytes

    @property
    def act_bytes_per_token(self) -> int:
        """Bytes of one token's activations (the attention input), in one layer."""
        return self.hidden_size * self.dtype_bytes

    @property
    def recompute_pays(self) -> bool:
        """Whether activations are lighter than K and V (multi-head attention)."""
        return self.act_bytes_per_token < self.kv_bytes_per_token


@dataclass(frozen=True)
class Rates:
    """What the device does per second: bytes over each link, tokens recomputed.

    ``None`` or 0 means the path is not there. ``concurrent=False`` says the paths run
    one after another (the CPU executor), so their times add up instead of overlapping.
    """

    peer_bps: float | None = None
    host_bps: float | None = None
    recompute_tokens_per_s: float | None = None
    peer_latency_s: float = 0.0
    host_latency_s: float = 0.0
    recompute_latency_s: float = 0.0
    concurrent: bool = True

    def __post_init__(self) -> None:
        for name in (
            "peer_bps",
            "host_bps",
            "recompute_tokens_per_s",
            "peer_latency_s",
            "host_latency_s",
            "recompute_latency_s",
        ):
            value = getattr(self, name)
            if value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
            ):
                raise InvalidArgument(f"{name} must be a finite number >= 0, got {value!r}")

    def link(self, via: Via) -> tuple[float, float]:
        """``(bytes/s, latency s)`` of a link; 0 bytes/s when it is not there."""
        if via == "peer":
            return float(self.peer_bps or 0.0), self.peer_latency_s
        return float(self.host_bps or 0.0), self.host_latency_s


@dataclass(frozen=True)
class FetchPlan:
    """Which tokens come from where: ``[0, recompute)`` recomputed from activations
    (sent over ``activations_via``), then ``peer_tokens`` from the GPU lease, then
    ``host_tokens`` from host memory."""

    peer_tokens: int
    host_tokens: int
    recompute_tokens: int
    activations_via: Via | None
    predicted_s: float
    reason: str

    @property
    def tokens(self) -> int:
        """All tokens the plan fetches."""
        return self.peer_tokens + self.host_tokens + self.recompute_tokens

    def ranges(self) -> dict[str, tuple[int, int]]:
        """``{"recompute": (0, r), "peer": (r, r + p), "host": (r + p, tokens)}``."""
        r, p = self.recompute_tokens, self.peer_tokens
        return {"recompute": (0, r), "peer": (r, r + p), "host": (r + p, self.tokens)}
