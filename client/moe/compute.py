"""How an offloaded experts module computes its routed experts, given where each expert's
weights are (resident on the model's device, or in a fetched staging row).

Two ways, each equal token for token to the model with every expert resident computed
the same way:

- ``eager``: expert by expert, with transformers' eager operations and order, so the
  tokens also equal those of ``experts_implementation="eager"``;
- ``grouped``: one grouped GEMM over the routed resident experts and one over the
  fetched ones (two per projection), as transformers' ``grouped_mm`` implementation
  computes them: far fewer kernels at a serving batch. The reference is the same module
  with nothing offloaded (``fraction=0``): a grouped GEMM's rows for one expert depend
  on that expert's rows and weights only, so splitting the groups in two changes no bit.

Routing is worked out on the CPU after one copy of the router's choice per layer, so
that the kernels queue without a device sync each.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.nn import functional as F

from harvestd.errors import InvalidArgument

# An expert's (gate_up [2I, H], down [H, I]) weights.
Weights = tuple[torch.Tensor, torch.Tensor]


class Compute(str, enum.Enum):
    """How routed experts are computed (see the module's docstring)."""

    EAGER = "eager"
    GROUPED = "grouped"

    @classmethod
    def parse(cls, value: "Compute | str") -> "Compute":
        """``value`` as a :class:`Compute`, or :class:`InvalidArgument` naming the choices."""
        try:
            return cls(value)
        except (TypeError, ValueError):
            raise InvalidArgument(
                f"compute must be one of {[c.value for c in cls]}, got {value!r}"
            ) from None


# ---------------------------------------------------------------------- eager

Routes = dict[int, tuple[torch.Tensor, torch.Tensor]]


def eager_routes(top_k_index: torch.Tensor, num_experts: int) -> Routes:
    """For each expert the router picked, in ascending order: ``(top_k_pos, token_idx)``
    on the device, in the order ``torch.where(expert_mask[e])`` gives them (by top-k
    slot, then token), as the eager implementation visits them."""
    tokens, _ = top_k_index.shape
    flat = top_k_index.t().reshape(-1).to("cpu")  # (slot, token) row-major: one sync
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    on_device = order.to(top_k_index.device, non_blocking=True)
    routes = {}
    start = 0
    for expert, count in enumerate(counts[:num_experts]):
        if count:
            chosen = on_device[start : start + count]
            routes[expert] = (chosen // tokens, chosen % tokens)
        start += count
    return routes


def eager_experts(
    hidden_states: torch.Tensor,
    top_k_weights: torch.Tensor,
    routes: Routes,
    weights: Callable[[int], Weights],
    act_fn: Callable,
    ready: Callable[[int], None] | None,
) -> torch.Tensor:
    """The experts' output, expert by expert; ``ready(e)`` (if given) is called before
    expert ``e``'s weights are read."""
    final = torch.zeros_like(hidden_states)
    for expert, (top_k_pos, token_idx) in routes.items():
        if ready is not None:
            ready(expert)
        gate_up, down = weights(expert)
        current_state = hidden_states[token_idx]
        gate, up = F.linear(current_state, gate_up).chunk(2, dim=-1)
        current = act_fn(gate) * up
        current = F.linear(current, down)
        current = current * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, current.to(final.dtype))
    return final


# ---------------------------------------------------------------------- grouped


@dataclass(frozen=True)
class GroupedPlan:
    """One layer's routed (token, slot) pairs ordered for two grouped GEMMs: first the
    pairs of resident experts, grouped by resident slot, then those of fetched experts,
    grouped by their position in ``fetched``."""

    order: torch.Tensor  # [S] on the device: flat (token * k + slot) index, in group order
    resident_offsets: torch.Tensor  # [R] int32 on the device: cumulative rows per resident slot
    fetched_offsets: torch.Tensor  # [len(fetched)] int32 on the device
    resident_rows: int
    fetched: list[int]  # offloaded experts routed to, ascending
    resident_ends: list[int]  # the offsets on the CPU, for grouped_mm's fallback
    fetched_ends: list[int]


def grouped_plan(
    top_k_index: torch.Tensor,
    slot_of: torch.Tensor,
    resident: int,
    placed: Sequence[int] | None = None,
) -> GroupedPlan:
    """Plan a layer: ``slot_of[e]`` is expert ``e``'s row in the resident weights, or -1
    (a CPU tensor); ``resident`` is how many resident experts there are. ``placed``: the
    offloaded experts sit in placed weights in this order, and the second GEMM groups
    them all, routed or not (an empty group reads nothing), so the placed weights are
    read where they lie; None: group only the routed ones, to be fetched."""
    flat = top_k_index.reshape(-1).to("cpu")  # token-major, as transformers' grouped_mm: one sync
    slots = slot_of[flat]
    offloaded = slots < 0
    if placed is not None:
        fetched = list(placed)
    else:
        fetched = torch.unique(flat[offloaded]).tolist() if bool(offloaded.any()) else []
    key = slots.clone()
    if fetched:
        position = torch.full_like(slot_of, -1)
        position[torch.tensor(fetched, dtype=torch.long)] = torch.arange(len(fetched))
        key[offloaded] = resident + position[flat[offloaded]]
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=resident + len(fetched))
    offsets = torch.cat([counts[:resident].cumsum(0), counts[resident:].cumsum(0)])
    # One copy to the device for the order and both offsets.
    packed = torch.cat([order, offsets]).to(top_k_index.device, non_blocking=True)
    size = order.numel()
    offsets_dev = packed[size:].to(torch.int32)
    ends = offsets.tolist()
    return GroupedPlan(
        order=packed[:size],
        resident_offsets=offsets_dev[:resident],
        fetched_offsets=offsets_dev[resident:],
        resident_rows=int(counts[:resident].sum()),
        fetched=fetched,
        resident_ends=ends[:resident],
        fetched_ends=ends[resident:],
    )


def grouped_mm(
    x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, ends: Sequence[int] | None = None
) -> torch.Tensor:
    """``x`` [S, K] times ``weight`` [G, K, N], rows ``offsets[g-1]:offsets[g]`` with group
    ``g``: torch's grouped GEMM where it has one for this device and dtype (on a GPU,
    bf16 only), else one matmul per group (``ends``, the offsets on the CPU, spare that
    fallback a device sync)."""
    if (x.device.type == "cpu" or x.dtype == torch.bfloat16) and _aligned(x) and _aligned(weight):
        for op in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)):
            if op is not None:
                return op(x, weight, offs=offsets)
    out = x.new_empty((x.shape[0], weight.shape[-1]))
    start = 0
    for group, end in enumerate(offsets.tolist() if ends is None else ends):
        if end > start:
            torch.matmul(x[start:end], weight[group], out=out[start:end])
        start = end
    return out


def _aligned(t: torch.Tensor) -> bool:
    # torch's grouped GEMM wants 16-byte aligned data and strides (its TMA loads on a GPU).
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(
        stride == 1 or stride * size % 16 == 0 for stride in t.stride()
    )


def _grouped_ffn(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    offsets: torch.Tensor,
    ends: list[int],
    act_fn: Callable,
) -> torch.Tensor:
    gate, up = grouped_mm(x.to(gate_up.dtype), gate_up.transpose(-2, -1), offsets, ends).chunk(
        2, dim=-1
    )
    return grouped_mm(act_fn(gate) * up, down.transpose(-2, -1), offsets, ends)


def grouped_experts(
    hidden_states: torch.Tensor,
    top_k_weights: torch.Tensor,
    plan: GroupedPlan,
    resident: Weights,
    fetched: Weights | None,
    act_fn: Callable,
    ready: Callable[[], None] | None,
) -> torch.Tensor:
    """The experts' output from two grouped GEMMs per projection: ``resident`` holds every
    resident expert (``[R, 2I, H]``, ``[R, H, I]``), ``fetched`` the fetched ones in
    ``plan.fetched`` order; ``ready()`` (if given) is called before they are read."""
    tokens, k = top_k_weights.shape
    x = hidden_states[plan.order // k]
    parts: list[torch.Tensor] = []
    if plan.resident_rows:
        parts.append(
            _grouped_ffn(
                x[: plan.resident_rows],
                *resident,
                plan.resident_offsets,
                plan.resident_ends,
                act_fn,
            )
        )
    if plan.fetched and x.shape[0] > plan.resident_rows:
        if fetched is None:
            raise ValueError("the plan routes to fetched experts but none were given")
        if ready is not None:
            ready()
        parts.append(
            _grouped_ffn(
                x[plan.resident_rows :], *fetched, plan.fetched_offsets, plan.fetched_ends, act_fn
            )
        )
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    weighted = out * top_k_weights.reshape(-1)[plan.order].unsqueeze(-1)
    # Back to (token, slot) order, then the same sum over slots as transformers' grouped_mm.
    restored = torch.empty_like(weighted)
    restored[plan.order] = weighted
    return restored.view(tokens, k, -1).sum(dim=1).to(hidden_states.dtype)


def stacked_rows(
    rows: torch.Tensor,
    gate_up_bytes: int,
    dtype: torch.dtype,
    gate_up_shape: Sequence[int],
    down_shape: Sequence[int],
) -> Weights:
    """Views of fetched staging rows (``[n, bytes]``: each expert's ``gate_up`` then its
    ``down`` bytes) as stacked weights ``[n, 2I, H]`` and ``[n, H, I]``; no copy."""
    n = rows.shape[0]
    gate_up = rows[:, :gate_up_bytes].view(dtype).view(n, *gate_up_shape)
    down = rows[:, gate_up_bytes:].view(dtype).view(n, *down_shape)
    return gate_up, down
