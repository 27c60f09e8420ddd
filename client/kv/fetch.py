"""Carry out a :class:`client.kv.plan.FetchPlan`: one layer's K and V onto the device.

Layout: token-major. ``out_k`` and ``out_v`` are ``[tokens, kv_heads * head_dim]`` (or
``[tokens, kv_heads, head_dim]``, the same bytes); batch is folded into tokens. Stored
K/V use the same layout and dtype (the sources are byte views, e.g. ``lease.tensor``),
activations are ``[tokens, hidden]``, and ``w_k``/``w_v`` are ``nn.Linear`` weights
``[kv_heads * head_dim, hidden]`` on the output's device (biases optional). A
transformers cache (``[batch, kv_heads, seq, head_dim]``) is transposed by the caller.

Tokens ``[0, r)`` are recomputed (``K = X W_k^T + b_k``), ``[r, r + p)`` copied from the
peer store (a GPU lease), the rest from the host store (pinned host memory). On CUDA
each path has its own stream: the activations go first on their link's stream, chunk by
chunk, each chunk's two GEMMs waiting only for that chunk, while K/V follow them on that
link and the other link carries its own K/V. The caller's stream then waits for all
three. On the CPU the same work runs one path after another.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from client.kv.plan import FetchPlan
from harvestd.errors import InvalidArgument

if TYPE_CHECKING:
    import torch

    from client.lease import Lease

log = logging.getLogger(__name__)

DEFAULT_CHUNK_TOKENS = 1024
_STREAMS: dict[int, tuple[Any, Any, Any]] = {}


@dataclass(frozen=True)
class KVStore:
    """Stored K and V of tokens ``[first_token, first_token + rows)``: row ``i`` of ``k``
    and ``v`` is token ``first_token + i`` (a store may hold only part of the tokens)."""

    k: "torch.Tensor"
    v: "torch.Tensor"
    first_token: int = 0


def _rows(t: Any, what: str) -> "torch.Tensor":
    """``t`` as a 2-D ``[rows, elements]`` view (no copy)."""
    import torch

    if not isinstance(t, torch.Tensor) or t.dim() < 2:
        raise InvalidArgument(f"{what} must be a torch.Tensor of at least 2 dims")
    if not t.is_contiguous():
        raise InvalidArgument(f"{what} must be contiguous")
    return t.view(t.shape[0], -1)


def _store(store: Any, what: str) -> KVStore:
    if isinstance(store, KVStore):
        return store
    if isinstance(store, (tuple, list)) and len(store) == 2:
        return KVStore(store[0], store[1])
    raise InvalidArgument(f"{what} must be a KVStore or a (k, v) pair")


def _check_store(
    store: KVStore, lo: int, hi: int, like: "torch.Tensor", what: str
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """The ``[lo, hi)`` rows of the store's K and V, checked against the output."""
    k, v = _rows(store.k, f"{what}.k"), _rows(store.v, f"{what}.v")
    first = store.first_token
    if (
        k.shape != v.shape
        or k.shape[1] != like.shape[1]
        or k.dtype != like.dtype
        or v.dtype != like.dtype
    ):
        raise InvalidArgument(
            f"{what}: K and V must be [tokens, {like.shape[1]}] "
            f"{like.dtype}, got {tuple(k.shape)} {k.dtype} and "
            f"{tuple(v.shape)} {v.dtype}"
        )
    if lo < first or hi > first + k.shape[0]:
        raise InvalidArgument(
            f"{what} holds tokens [{first}, {first + k.shape[0]}); the plan reads [{lo}, {hi})"
        )
    return k[lo - first : hi - first], v[lo - first : hi - first]


def _check_weights(w: Any, b: Any, hidden: int, out: "torch.Tensor", what: str) -> None:
    import torch

    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (out.shape[1], hidden):
        raise InvalidArgument(
            f"{what} must be a [{out.shape[1]}, {hidden}] tensor (an "
            f"nn.Linear weight), got {getattr(w, 'shape', type(w))}"
        )
    if w.dtype != out.dtype or w.device != out.device:
        raise InvalidArgument(f"{what} must be {out.dtype} on {out.device}")
    if b is not None and (
        not isinstance(b, torch.Tensor)
        or tuple(b.shape) != (out.shape[1],)
        or b.dtype != out.dtype
        or b.device != out.device
    ):
        raise InvalidArgument(
            f"the bias of {what} must be a [{out.shape[1]}] {out.dtype} "
            f"tensor on {out.device}, or None"
        )


def _project(
    x: "torch.Tensor", w: "torch.Tensor", b: "torch.Tensor | None", out: "torch.Tensor"
) -> None:
    """``out = x @ w.T + b``, written in place."""
    import torch

    if b is None:
        torch.mm(x, w.t(), out=out)
    else:
        torch.addmm(b, x, w.t(), out=out)


def _streams(device: "torch.device") -> tuple[Any, Any, Any]:
    """The recompute, peer and host streams of a device, made once."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = (
            torch.cuda.Stream(device=index),
            torch.cuda.Stream(device=index),
            torch.cuda.Stream(device=index),
        )
    return _STREAMS[index]


def fetch_kv(
    plan: FetchPlan,
    *,
    out_k: "torch.Tensor",
    out_v: "torch.Tensor",
    peer_kv: KVStore | tuple[Any, Any] | None = None,
    host_kv: KVStore | tuple[Any, Any] | None = None,
    activations: "torch.Tensor | None" = None,
    w_k: "torch.Tensor | None" = None,
    b_k: "torch.Tensor | None" = None,
    w_v: "torch.Tensor | None" = None,
    b_v: "torch.Tensor | None" = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    leases: Sequence["Lease"] = (),
    synchronize: bool = True,
) -> None:
    """Fill rows ``[0, plan.tokens)`` of ``out_k``/``out_v`` as ``plan`` says (layout in
    the module doc).

    ``peer_kv``, ``host_kv``: the stores (a :class:`KVStore` or a ``(k, v)`` pair from
    token 0) for the peer and host ranges; only the ranges the plan uses must be given.
    ``activations``: ``[>= recompute, hidden]`` rows from token 0 (a pinned CPU tensor
    travels over the host link, a CUDA one over the peer link). ``chunk_tokens``: rows
    per recompute chunk (give the planner the same). ``leases``: held under
    ``lease.use()`` for the whole fetch; a revocation that overlapped it raises
    :class:`client.LeaseRevoked` and the output must be discarded. ``synchronize``: wait
    on the host for the work; with False the caller's current stream merely waits for it
    (then no ``leases`` may be given: their use would end before the reads do).
    """
    import torch

    if not isinstance(plan, FetchPlan):
        raise InvalidArgument("plan must be a FetchPlan")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens <= 0:
        raise InvalidArgument(f"chunk_tokens must be a positive int, got {chunk_tokens!r}")
    if leases and not synchronize:
        raise InvalidArgument(
            "leases are held only while fetch_kv waits: pass "
            "synchronize=True, or hold lease.use() yourself"
        )
    ok, ov = _rows(out_k, "out_k"), _rows(out_v, "out_v")
    if ok.shape != ov.shape or ok.dtype != ov.dtype or ok.device != ov.device:
        raise InvalidArgument("out_k and out_v must have one shape, dtype and device")
    if ok.shape[0] < plan.tokens:
        raise InvalidArgument(
            f"out_k has {ok.shape[0]} rows; the plan fetches {plan.tokens} tokens"
        )
    ranges = plan.ranges()
    copies = []
    for name, store in (("peer", peer_kv), ("host", host_kv)):
        lo, hi = ranges[name]
        if hi > lo:
            if store is None:
                raise InvalidArgument(
                    f"the plan reads {hi - lo} tokens from {name}_kv; none was given"
                )
            src_k, src_v = _check_store(_store(store, f"{name}_kv"), lo, hi, ok, f"{name}_kv")
            copies.append((name, src_k, src_v, lo, hi))
    r = plan.recompute_tokens
    x = None
    if r:
        x = _rows(activations, "activations") if activations is not None else None
        if x is None or x.shape[0] < r or x.dtype != ok.dtype:
            raise InvalidArgument(
                f"recomputing {r} tokens needs activations of at least {r} rows of {ok.dtype}"
            )
        _check_weights(w_k, b_k, x.shape[1], ok, "w_k")
        _check_weights(w_v, b_v, x.shape[1], ok, "w_v")
        via = "host" if x.device.type == "cpu" else "peer"
        if plan.activations_via and via != plan.activations_via:
            log.warning(
                "the plan sends activations over the %s link, but they are on %s: "
                "its predicted time will be off",
                plan.activations_via,
                x.device,
            )
    with contextlib.ExitStack() as held:
        for lease in leases:
            held.enter_context(lease.use(device_work=ok.device.type == "cuda"))
        if ok.device.type == "cuda":
            _run_cuda(r, x, (w_k, b_k, w_v, b_v), copies, ok, ov, chunk_tokens)
            if synchronize:
                torch.cuda.current_stream(ok.device).synchronize()
        else:
            _run_serial(r, x, (w_k, b_k, w_v, b_v), copies, ok, ov, chunk_tokens)


def _run_serial(r: int, x: Any, weights: tuple, copies: list, ok: Any, ov: Any, chunk: int) -> None:
    """The same work, one path after another (no streams on the CPU)."""
    w_k, b_k, w_v, b_v = weights
    for lo in range(0, r, chunk):
        hi = min(r, lo + chunk)
        xs = x[lo:hi] if x.device == ok.device else x[lo:hi].to(ok.device)
        _project(xs, w_k, b_k, ok[lo:hi])
        _project(xs, w_v, b_v, ov[lo:hi])
    for _, src_k, src_v, lo, hi in copies:
        ok[lo:hi].copy_(src_k)
        ov[lo:hi].copy_(src_v)


def _pageable(t: Any) -> bool:
    try:
        return t.device.type == "cpu" and not t.is_pinned()
    except RuntimeError:
        return True


def _run_cuda(r: int, x: Any, weights: tuple, copies: list, ok: Any, ov: Any, chunk: int) -> None:
    """Three streams; the caller's current stream waits for all of them on return."""
    import torch

    w_k, b_k, w_v, b_v = weights
    device = ok.device
    current = torch.cuda.current_stream(device)
    rec_s, peer_s, host_s = _streams(device)
    link = {"peer": peer_s, "host": host_s}
    for stream in (rec_s, peer_s, host_s):
        stream.wait_stream(current)  # the outputs and weights may still be in the making
    if any(_pageable(t) for t in [c[1] for c in copies] + ([x] if r else [])):
        log.warning(
            "a host source is pageable: its copies run synchronously and slowly "
            "(map host leases for the GPU so they are pinned)"
        )
    chunks = []
    if r:
        # Activations go first on their link, so recomputation starts after one chunk
        # and the K/V behind them on the same link do not delay it.
        stream = link["host" if x.device.type == "cpu" else "peer"]
        staging = torch.empty((r, x.shape[1]), dtype=x.dtype, device=device)
        with torch.cuda.stream(stream):
            for lo in range(0, r, chunk):
                hi = min(r, lo + chunk)
                staging[lo:hi].copy_(x[lo:hi], non_blocking=True)
                arrived = torch.cuda.Event()
                arrived.record(stream)
                chunks.append((lo, hi, arrived))
    for name, src_k, src_v, lo, hi in copies:
        with torch.cuda.stream(link[name]):
            ok[lo:hi].copy_(src_k, non_blocking=True)
            ov[lo:hi].copy_(src_v, non_blocking=True)
    # GEMMs are launched last: every copy is already queued, so the links never wait on
    # Python launching kernels.
    with torch.cuda.stream(rec_s):
        for lo, hi, arrived in chunks:
            rec_s.wait_event(arrived)
            _project(staging[lo:hi], w_k, b_k, ok[lo:hi])
            _project(staging[lo:hi], w_v, b_v, ov[lo:hi])
    for stream in (rec_s, peer_s, host_s):
        current.wait_stream(stream)


# ---------------------------------------------------------------- measuring Rates
