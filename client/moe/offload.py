"""A MoE model's experts behind the tiered cache: a fraction of each layer's experts
leave the GPU for borrowed memory (GPU leases, then host leases, with a pinned host copy
as the authority), and each layer fetches the experts its router picks, as it picks them.

    from client import connect
    from client.moe import offload_experts
    offload = offload_experts(model, connect(), fraction=0.5)
    model.generate(...)          # same tokens as with every expert resident
    offload.close()

Works on the fused experts of transformers 5 (``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]``, as in Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE). Each offloaded
expert is one cached object (its ``gate_up`` then its ``down`` bytes), so one layer's
routed experts move in one batched fetch, on the cache's own stream, while the resident
experts compute. By default experts are computed in the order the eager implementation
computes them, with the same operations, so the tokens out are identical to the model's
own eager experts (``experts_implementation="eager"``); ``compute="grouped"`` uses grouped
GEMMs instead (see :mod:`client.moe.compute`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from client.cache.fetch import Fetch
from client.cache.tiered import TieredCache
from client.moe.closer import FetchCloser
from client.moe.compute import (
    Compute,
    Weights,
    eager_experts,
    eager_routes,
    grouped_experts,
    grouped_plan,
    stacked_rows,
)
from client.moe.placed import PlacedExperts
from client.moe.split import SplitExperts, fused_weights
from client.placed.choice import check_placement, choose_placement
from harvestd.errors import FailedPrecondition, InvalidArgument

log = logging.getLogger(__name__)

Select = Callable[[str, int, int], Sequence[int]]


class Ready(Protocol):
    """Orders the caller's stream after fetched row ``i`` (``None``, or no argument:
    after every row)."""

    def __call__(self, index: int | None = None, /) -> None: ...


def _last(name: str, num_experts: int, count: int) -> list[int]:
    """The default choice: the ``count`` highest-numbered experts of every layer."""
    return list(range(num_experts - count, num_experts))


def find_experts(model: nn.Module) -> dict[str, nn.Module]:
    """The fused experts modules of ``model``, by name."""
    found = {}
    for name, module in model.named_modules():
        gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
        if not (
            isinstance(gate_up, torch.Tensor)
            and isinstance(down, torch.Tensor)
            and gate_up.dim() == 3
            and down.dim() == 3
            and gate_up.shape[0] == down.shape[0]
            and hasattr(module, "act_fn")
        ):
            continue
        layout = (
            getattr(module, "is_transposed", False),
            getattr(module, "has_bias", False),
            getattr(module, "has_gate", True),
            getattr(module, "is_concatenated", True),
        )
        if layout != (False, False, True, True):
            raise InvalidArgument(
                f"{name}: experts with layout (transposed, bias, gate, "
                f"concatenated) = {layout} are not supported"
            )
        found[name] = module
    return found


@dataclass
class OffloadStats:
    """What an offload moved: experts and bytes, and the cache's reads by tier."""

    experts_total: int = 0
    experts_offloaded: int = 0
    bytes_offloaded: int = 0
    expert_bytes: dict[str, int] = field(default_factory=dict)
    fetches: int = 0
    experts_fetched: int = 0
    bytes_fetched: int = 0
    recomputed_layers: int = 0  # layers computed again because a revocation overlapped
    unverified_layers: int = 0  # a fence overlapped a read after its layer was computed


class ExpertOffload:
    """The experts taken off a model: the cache that holds them and the staging buffers
    they are fetched into (``placement="copy"``), or the placed tensors they are read in
    (``placement="placed"``: ``cache`` is None), and what moved. Made by
    :func:`offload_experts`."""

    def __init__(self, cache: TieredCache | None) -> None:
        self._cache = cache
        self.placement = "copy" if cache is not None else "placed"
        self.stats = OffloadStats()
        self.modules: dict[str, OffloadedExperts | PlacedExperts] = {}
        self._staging: dict[tuple[int, torch.dtype], torch.Tensor] = {}
        self._closer = (
            FetchCloser(self._redone) if cache is not None and cache.stream is not None else None
        )

    @property
    def cache(self) -> TieredCache:
        """The tiered cache the experts are fetched from (``placement="copy"``)."""
        if self._cache is None:
            raise FailedPrecondition("placed experts have no cache: see tiers()")
        return self._cache

    def tiers(self) -> dict[str, int]:
        """Bytes of the offloaded experts in each tier of their placed tensors (empty
        for ``placement="copy"``: ask ``cache``)."""
        out: dict[str, int] = {}
        for module in self.modules.values():
            if isinstance(module, PlacedExperts):
                for tier, nbytes in module.tiers().items():
                    out[tier] = out.get(tier, 0) + nbytes
        return out

    def _redone(self, fetch: Fetch, rows: list[int]) -> None:
        # Cannot happen while the fetch's leases are held with device_work: their fence
        # waits for it. Should it ever, say so loudly: the layer was computed already.
        self.stats.unverified_layers += 1
        log.error("a fence overlapped %d fetched experts after their layer was computed", len(rows))

    def finish(self, fetch: Fetch) -> list[int]:
        """End a layer's fetch: on a GPU, later, once its copies complete (the caller
        goes on); on the CPU, now. Returns rows read again from the source (CPU only)."""
        if self._closer is not None:
            self._closer.add(fetch)
            return []
        return fetch.wait()

    def fetch(
        self, name: str, experts: Sequence[int], row_bytes: int
    ) -> tuple[Fetch, torch.Tensor]:
        """Start fetching ``experts`` of module ``name`` into staging rows (``[n, bytes]``)."""
        key = (row_bytes, torch.uint8)
        buf = self._staging.get(key)
        if buf is None or buf.shape[0] < len(experts):
            buf = torch.empty(
                (max(len(experts), 1 if buf is None else buf.shape[0]), row_bytes),
                dtype=torch.uint8,
                device=self.cache.device,
            )
            self._staging[key] = buf
        rows = buf[: len(experts)]
        self.stats.fetches += 1
        self.stats.experts_fetched += len(experts)
        self.stats.bytes_fetched += len(experts) * row_bytes
        return self.cache.fetch([(name, e) for e in experts], rows), rows

    def close(self) -> None:
        """Release the borrowed memory. With ``placement="copy"`` the model keeps working
        from the host copies; placed experts must not run afterwards."""
        if self._closer is not None:
            self._closer.stop()
        if self._cache is not None:
            self._cache.close()
        for module in self.modules.values():
            if isinstance(module, PlacedExperts):
                module.close()


class OffloadedExperts(SplitExperts):
    """Stands in for a fused experts module: resident experts stay in ``gate_up_proj`` /
    ``down_proj`` (only those), offloaded ones are fetched per call."""

    def __init__(
        self,
        original: nn.Module,
        name: str,
        offloaded: Sequence[int],
        owner: ExpertOffload,
        compute: Compute = Compute.EAGER,
    ) -> None:
        super().__init__(original, name, offloaded, compute)
        gate_up, down = fused_weights(original)
        self._owner = owner
        self._gate_up_shape = tuple(gate_up.shape[1:])
        self._down_shape = tuple(down.shape[1:])
        self._dtype = gate_up.dtype
        self._gate_up_bytes = gate_up[0].numel() * gate_up.element_size()
        cache = owner.cache
        with torch.no_grad():
            for e in self.offloaded:
                row = torch.cat(
                    [
                        gate_up.detach()[e].reshape(-1).view(torch.uint8),
                        down.detach()[e].reshape(-1).view(torch.uint8),
                    ]
                )
                cache.put((name, e), row)

    def _stacked(self, rows: torch.Tensor) -> Weights:
        return stacked_rows(
            rows, self._gate_up_bytes, self._dtype, self._gate_up_shape, self._down_shape
        )

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """The experts' output for the routed tokens, computed as ``self.compute`` says;
        offloaded experts are fetched as the router picks them."""
        if self.compute is Compute.GROUPED:
            plan = grouped_plan(top_k_index, self._slot_of, self.gate_up_proj.shape[0])
            return self._run(
                plan.fetched,
                lambda fetched, ready: grouped_experts(
                    hidden_states,
                    top_k_weights,
                    plan,
                    (self.gate_up_proj, self.down_proj),
                    fetched,
                    self.act_fn,
                    ready,
                ),
            )
        routes = eager_routes(top_k_index, self.num_experts)

        def eager(fetched: Weights | None, ready: Ready | None) -> torch.Tensor:
            position = {e: i for i, e in enumerate(wanted)}

            def weights(expert: int) -> Weights:
                slot = self._slot[expert]
                if slot >= 0:
                    return self.gate_up_proj[slot], self.down_proj[slot]
                i = position[expert]
                assert fetched is not None  # an offloaded expert is routed to: it was fetched
                return fetched[0][i], fetched[1][i]

            def ready_expert(expert: int) -> None:
                if self._slot[expert] < 0 and ready is not None:
                    ready(position[expert])

            return eager_experts(
                hidden_states,
                top_k_weights,
                routes,
                weights,
                self.act_fn,
                None if ready is None else ready_expert,
            )

        wanted = [e for e in routes if self._slot[e] < 0]
        return self._run(wanted, eager)

    def _run(
        self, wanted: list[int], compute: Callable[[Weights | None, Ready | None], torch.Tensor]
    ) -> torch.Tensor:
        """Fetch ``wanted`` (offloaded experts, ascending) and compute: ``compute(fetched,
        ready)`` gets the fetched weights stacked in ``wanted`` order and a ``ready(i)`` to
        call before it reads row ``i`` (``ready()``: every row)."""
        if not wanted:
            return compute(None, None)
        fetch, rows = self._owner.fetch(self.name, wanted, self.row_bytes)
        fetched = self._stacked(rows)

        def ready(index: int | None = None) -> None:
            for i in range(len(wanted)) if index is None else (index,):
                fetch.ready(i)

        try:
            out = compute(fetched, ready)
        finally:
            redone = self._owner.finish(fetch)
        if redone:  # a forced revocation overlapped the read: those rows are re-read now
            self._owner.stats.recomputed_layers += 1
            out = compute(fetched, None)
        return out


def offload_experts(
    model: nn.Module,
    client: Any,
    fraction: float = 0.5,
    *,
    select: Select | None = None,
    local_bytes: int = 0,
    borrow_bytes: int | None = None,
    slab_bytes: int = 1 << 30,
    backends: Sequence[str] = ("cuda-vmm", "host"),
    ttl: float | None = None,
    refill_every: float | None = 0.25,
    compute: Compute | str = Compute.EAGER,
    placement: str = "auto",
) -> ExpertOffload:
    """Take ``fraction`` of every MoE layer's experts off the model's device into memory
    borrowed through ``client`` (a :func:`client.connect` client); the model then fetches
    them as its routers pick them. Returns the :class:`ExpertOffload` (its ``stats``, its
    ``cache``, ``close()``). ``fraction=0`` offloads nothing but runs the same code: the
    all-resident baseline of a benchmark.

    ``select(module_name, num_experts, count)`` chooses which experts leave (default:
    the highest-numbered). ``backends`` orders the lenders borrowed from; what borrowed
    memory cannot hold is read from the pinned host copy. ``borrow_bytes`` caps the
    borrowing (default: all offloaded experts). ``refill_every`` is how often the cache
    moves experts back into borrowed memory after a revocation (``None``: never).
    ``compute`` is how routed experts are computed: ``"eager"`` (expert by expert, the
    tokens of transformers' eager experts) or ``"grouped"`` (grouped GEMMs, far fewer
    kernels at a serving batch; the tokens of the same module with ``fraction=0``).

    ``placement``: ``"auto"`` (the default) is ``"placed"`` where the experts' CUDA
    device maps VMM host memory and ``"copy"`` elsewhere, the CPU included
    (:mod:`client.placed.choice`; the result's ``placement`` says which).
    ``"copy"`` fetches the routed experts into staging rows before they
    are computed; ``"placed"`` puts each layer's offloaded experts in placed tensors
    (:meth:`client.connection.Client.place`) that the compute reads where they lie, with
    leases of ``slab_bytes`` at most, and reads the authoritative host copy in place where
    nothing is leased (``borrow_bytes=0``: nothing is). ``backends`` and ``local_bytes``
    are the copy path's: a placed tensor leases what its device can map (GPU leases on a
    GPU, host leases on the CPU)."""
    check_placement(placement)  # bad input fails before the model is looked at
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0.0 <= float(fraction) <= 1.0
    ):
        raise InvalidArgument(f"fraction must be in [0, 1], got {fraction!r}")
    compute = Compute.parse(compute)
    modules = find_experts(model)
    if not modules:
        raise InvalidArgument(
            "no MoE experts found in this model (supported: transformers' "
            "fused experts with gate_up_proj and down_proj, e.g. Mixtral, "
            "Qwen2-MoE, Qwen3-MoE, OLMoE)"
        )
    choose = select or _last
    plan: dict[str, list[int]] = {}
    total = 0
    for name, module in modules.items():
        gate_up, down = fused_weights(module)
        count = gate_up.shape[0]
        share = max(1, round(float(fraction) * count)) if fraction > 0 else 0
        plan[name] = list(choose(name, count, share)) if share else []
        row = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
        total += row * len(plan[name])
    device = fused_weights(next(iter(modules.values())))[0].device
    if choose_placement(placement, device) == "placed":
        return _place_experts(
            model,
            client,
            modules,
            plan,
            compute,
            device,
            borrow_bytes != 0,
            slab_bytes,
            ttl,
            refill_every,
        )
    cache = TieredCache(
        client,
        device=device,
        local_bytes=local_bytes,
        borrow_bytes=total + slab_bytes if borrow_bytes is None else borrow_bytes,
        slab_bytes=slab_bytes,
        backends=backends,
        ttl=ttl,
        refill_every=refill_every,
    )
    owner = ExpertOffload(cache)
    for name, module in modules.items():
        _replace(model, owner, name, OffloadedExperts(module, name, plan[name], owner, compute))
    return _offloaded(owner, device)


def _replace(
    model: nn.Module, owner: ExpertOffload, name: str, replacement: OffloadedExperts | PlacedExperts
) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, replacement)
    owner.modules[name] = replacement
    owner.stats.experts_total += replacement.num_experts
    owner.stats.experts_offloaded += len(replacement.offloaded)
    owner.stats.bytes_offloaded += len(replacement.offloaded) * replacement.row_bytes
    owner.stats.expert_bytes[name] = replacement.row_bytes


def _place_experts(
    model: nn.Module,
    client: Any,
    modules: dict[str, nn.Module],
    plan: dict[str, list[int]],
    compute: Compute,
    device: torch.device,
    borrow: bool,
    lease_bytes: int,
    ttl: float | None,
    refill_every: float | None,
) -> ExpertOffload:
    owner = ExpertOffload(None)
    options = dict(
        device=device, lease_bytes=lease_bytes, ttl=ttl, refill_s=refill_every, borrow=borrow
    )
    try:
        for name, module in modules.items():
            replacement = PlacedExperts(module, name, plan[name], client, compute, options)
            _replace(model, owner, name, replacement)
    except BaseException:
        owner.close()
        raise
    return _offloaded(owner, device)


def _offloaded(owner: ExpertOffload, device: torch.device) -> ExpertOffload:
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the offloaded experts' memory goes back to the device
    log.info(
        "offloaded %d of %d experts (%d bytes) from %d layers",
        owner.stats.experts_offloaded,
        owner.stats.experts_total,
        owner.stats.bytes_offloaded,
        len(owner.modules),
    )
    return owner
