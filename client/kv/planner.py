"""How to bring one layer's KV cache back onto the GPU fastest: KVPR, generalised.

KVPR (arXiv 2411.17089) reloads the K and V of ``s`` tokens from host memory by
recomputing the first ``l`` tokens' K and V from their stored activations
(``K = X W_k^T + b_k``, ``V = X W_v^T + b_v``) while the other ``s - l`` tokens' K and V
cross the link, so that both end together. Here a token's K and V can come from three
places at once:

* ``peer``: a GPU lease (a borrowed GPU, reached over NVLink or the same GPU);
* ``host``: pinned host memory (a host lease), over PCIe;
* ``recompute``: from activations that themselves cross one of the two links.

The model (every term a per-layer figure): a link carries its tokens' K+V bytes, plus
the activations when it is the one carrying them, at its bandwidth after a fixed
latency; recomputation runs at ``recompute_tokens_per_s`` but its first chunk can start
only once that chunk's activations have arrived, and its last chunk only once the last
activations have. The executor (:mod:`client.kv.fetch`) sends activations first on their
link, then K/V, so the arrival terms are exact. The paths run at once, so the fetch
takes the longest of them: the planner finds the smallest time ``T`` at which the paths
together can deliver every token (the capacity of each path at ``T`` is linear in ``T``,
so ``T`` is found by bisection), for activations over each link, and keeps the best.
Recomputation is never chosen when a token's activations weigh at least as much as its
K and V (grouped-query attention): shipping them would cost more link time than
shipping K and V.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from client.kv.measure import measure_rates
from client.kv.plan import FetchPlan, KVShape, Rates, Via, positive_int
from harvestd.errors import InvalidArgument

log = logging.getLogger(__name__)


class FetchPlanner:
    """Splits a layer's tokens between peer, host and recomputation (see the module doc).

    ``chunk_tokens``: the executor's recompute chunk (its first and last chunks cannot
    overlap with the link, so they enter the model). ``granularity``: the recompute and
    peer token counts are multiples of it (or all the tokens); host takes what is left.
    Without it (1) token counts are exact integers."""

    def __init__(self, chunk_tokens: int = 1024, granularity: int = 1) -> None:
        self.chunk_tokens = positive_int(chunk_tokens, "chunk_tokens")
        self.granularity = positive_int(granularity, "granularity")

    # ------------------------------------------------------------ the model

    def predict(
        self,
        shape: KVShape,
        rates: Rates,
        recompute: int,
        peer: int,
        host: int,
        via: Via | None = "host",
    ) -> float:
        """Seconds until a given split is on the device (``inf`` if a path it uses is
        not there)."""
        kv, act = shape.kv_bytes_per_token, shape.act_bytes_per_token
        if recompute and via is None:
            raise InvalidArgument("recomputed tokens need activations_via 'host' or 'peer'")
        link_bytes: dict[Via, int] = {"peer": peer * kv, "host": host * kv}
        if recompute and via is not None:  # (via is never None here: refused above)
            link_bytes[via] += recompute * act
        times = []
        for name, nbytes in link_bytes.items():
            if nbytes:
                bps, latency = rates.link(name)
                times.append(latency + nbytes / bps if bps > 0 else math.inf)
        if recompute and via is not None:
            times.append(self._recompute_s(shape, rates, recompute, via))
        if not times:
            return 0.0
        return sum(times) if not rates.concurrent else max(times)

    def _recompute_s(self, shape: KVShape, rates: Rates, r: int, via: Via) -> float:
        bps, latency = rates.link(via)
        rate = rates.recompute_tokens_per_s or 0.0
        if bps <= 0 or rate <= 0:
            return math.inf
        act = shape.act_bytes_per_token
        if not rates.concurrent:  # the activations' copy is already in the link's time
            return rates.recompute_latency_s + r / rate
        c = min(self.chunk_tokens, r)
        start = latency + rates.recompute_latency_s
        return start + max(
            c * act / bps + r / rate,  # compute-bound after the first chunk
            r * act / bps + c / rate,
        )  # arrival-bound, plus the last chunk

    def _capacity(
        self,
        t: float,
        shape: KVShape,
        rates: Rates,
        via: Via | None,
        use_peer: bool,
        recompute: bool,
    ) -> tuple[float, float, float]:
        """``(r, p, h)``: the most tokens each path delivers by time ``t`` (continuous)."""
        kv, act = shape.kv_bytes_per_token, shape.act_bytes_per_token
        budget = {}
        for name in ("peer", "host"):
            bps, latency = rates.link(name)
            usable = bps > 0 and (name == "host" or use_peer)
            budget[name] = max(0.0, t - latency) * bps if usable else 0.0
        r = 0.0
        rate = rates.recompute_tokens_per_s or 0.0
        if recompute and via is not None and rate > 0 and budget[via] > 0:
            bps, latency = rates.link(via)
            c, start = self.chunk_tokens, latency + rates.recompute_latency_s
            r = max(
                0.0,
                min(
                    (t - start - c * act / bps) * rate,
                    (t - start - c / rate) * bps / act,
                    budget[via] / act,
                ),
            )
            # Per byte of link, a recomputed token beats a sent one (act < kv), so
            # recomputation takes all it can and K/V get the rest of the link.
            budget[via] -= r * act
        return r, budget["peer"] / kv, budget["host"] / kv

    # ------------------------------------------------------------ planning

    def plan(
        self,
        tokens: int,
        shape: KVShape,
        rates: Rates,
        peer_available: bool | None = None,
        allow_recompute: bool = True,
    ) -> FetchPlan:
        """The split of ``tokens`` that ends soonest under ``rates`` (see the module doc).

        ``peer_available``: use the peer link (default: when ``rates.peer_bps`` is set).
        ``allow_recompute=False`` keeps to transfers. Raises :class:`InvalidArgument` for
        bad input, or when no link is there to fetch from."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise InvalidArgument(f"tokens must be an int >= 0, got {tokens!r}")
        if not isinstance(shape, KVShape) or not isinstance(rates, Rates):
            raise InvalidArgument("plan needs a KVShape and a Rates")
        has_peer = bool(rates.peer_bps)
        if peer_available is None:
            peer_available = has_peer
        elif peer_available and not has_peer:
            raise InvalidArgument("peer_available=True but rates.peer_bps is not set")
        if not rates.host_bps and not peer_available:
            raise InvalidArgument("no link to fetch from: rates have no host_bps and no peer")
        why_not = self._why_no_recompute(shape, rates, allow_recompute)
        vias: list[Via] = [
            v
            for v in ("host", "peer")
            if why_not is None and rates.link(v)[0] > 0 and (v == "host" or peer_available)
        ]
        candidates = self._vertices(tokens, peer_available, vias)
        candidates += self._solve(tokens, shape, rates, None, peer_available, False)
        for link in vias:
            candidates += self._solve(tokens, shape, rates, link, peer_available, True)
        best, best_t = None, math.inf
        for cand in candidates:  # ties keep the earlier: fewer paths, activations via host
            t = self.predict(shape, rates, *cand)
            if t < best_t - 1e-15:
                best, best_t = cand, t
        if best is None:
            raise InvalidArgument("no path can deliver these tokens with the given rates")
        best, best_t = self._fold_slivers(tokens, shape, rates, best, best_t)
        r, p, h, via = best
        plan = FetchPlan(
            peer_tokens=p,
            host_tokens=h,
            recompute_tokens=r,
            activations_via=via if r else None,
            predicted_s=best_t,
            reason=self._reason(tokens, shape, rates, best, best_t, why_not, peer_available),
        )
        log.debug("plan for %d tokens: %s", tokens, plan)
        return plan

    # A path given less than one chunk costs a stream, its launches and a sync that the
    # model does not count (measured on an H100: a 444-token host share next to 32k
    # recomputed tokens made the fetch 20% slower than recomputing them all). Such a
    # sliver goes to the biggest path when the model says that costs under this much.
    FOLD_TOLERANCE = 0.02

    def _fold_slivers(
        self,
        tokens: int,
        shape: KVShape,
        rates: Rates,
        split: tuple[int, int, int, Via | None],
        t: float,
    ) -> tuple[tuple[int, int, int, Via | None], float]:
        r, p, h, via = split
        shares = {"recompute": r, "peer": p, "host": h}
        slivers = [k for k, n in shares.items() if 0 < n < min(self.chunk_tokens, tokens)]
        if not slivers:
            return split, t
        main = max(shares, key=lambda k: shares[k])
        for k in slivers:
            if k != main:
                shares[main] += shares[k]
                shares[k] = 0
        folded = (
            shares["recompute"],
            shares["peer"],
            shares["host"],
            via if shares["recompute"] else None,
        )
        folded_t = self.predict(shape, rates, *folded)
        if folded_t <= t * (1 + self.FOLD_TOLERANCE):
            return folded, folded_t
        return split, t

    def fixed(
        self,
        tokens: int,
        shape: KVShape,
        rates: Rates,
        *,
        recompute_tokens: int = 0,
        peer_tokens: int = 0,
        activations_via: Via = "host",
    ) -> FetchPlan:
        """A plan for a split chosen by the caller (host takes the rest), with the
        model's time for it: for baselines and sweeps."""
        host = tokens - recompute_tokens - peer_tokens
        if min(recompute_tokens, peer_tokens, host) < 0:
            raise InvalidArgument(
                f"recompute {recompute_tokens} + peer {peer_tokens} "
                f"tokens exceed the {tokens} tokens"
            )
        via = activations_via if recompute_tokens else None
        t = self.predict(shape, rates, recompute_tokens, peer_tokens, host, via)
        return FetchPlan(
            peer_tokens,
            host,
            recompute_tokens,
            via,
            t,
            f"fixed split: recompute {recompute_tokens}, peer {peer_tokens}, "
            f"host {host} (chosen by the caller, not the planner)",
        )

    def _vertices(
        self, s: int, use_peer: bool, vias: list[Via]
    ) -> list[tuple[int, int, int, Via | None]]:
        """Every token from one source: the best split is never worse than these."""
        out: list[tuple[int, int, int, Via | None]] = [(0, 0, s, None)]
        if use_peer:
            out.append((0, s, 0, None))
        out += [(s, 0, 0, v) for v in vias]
        return out

    def _solve(
        self, s: int, shape: KVShape, rates: Rates, via: Via | None, use_peer: bool, recompute: bool
    ) -> list[tuple[int, int, int, Via | None]]:
        """Integer splits around the continuous optimum for activations over ``via``."""
        if s == 0:
            return []

        def total(t: float) -> float:
            return sum(self._capacity(t, shape, rates, via, use_peer, recompute))

        lo, hi = 0.0, 1.0
        while total(hi) < s:
            hi *= 2.0
            if hi > 1e9:
                return []
        for _ in range(200):
            mid = (lo + hi) / 2
            if total(mid) >= s:
                hi = mid
            else:
                lo = mid
            if hi - lo <= 1e-12 * hi:
                break
        r, p, _ = self._capacity(hi, shape, rates, via, use_peer, recompute)
        # Capacity at ``hi`` may exceed s by a hair: give the excess back, host last.
        r = min(r, float(s))
        p = min(p, s - r)
        g = self.granularity
        out = []
        for rr in {math.floor(r / g) * g, math.ceil(r / g) * g}:
            for pp in {math.floor(p / g) * g, math.ceil(p / g) * g}:
                rr_, pp_ = min(rr, s), min(pp, s - min(rr, s))
                out.append((rr_, pp_, s - rr_ - pp_, via if rr_ else None))
        return out

    # ------------------------------------------------------------ explaining

    @staticmethod
    def _why_no_recompute(shape: KVShape, rates: Rates, allow: bool) -> str | None:
        if not allow:
            return "recomputation is not allowed by the caller"
        if not shape.recompute_pays:
            return (
                f"recomputation cannot pay: one token's activations "
                f"({shape.act_bytes_per_token:,} B) outweigh its K and V "
                f"({shape.kv_bytes_per_token:,} B), so sending them costs more link time "
                f"than sending K and V"
            )
        if not rates.recompute_tokens_per_s:
            return "no recompute rate is known"
        return None

    def _reason(
        self,
        s: int,
        shape: KVShape,
        rates: Rates,
        split: tuple[int, int, int, Via | None],
        t: float,
        why_not: str | None,
        use_peer: bool,
    ) -> str:
        r, p, h, via = split
        if r:
            head = (
                f"activations ({shape.act_bytes_per_token:,} B/token) are lighter than "
                f"K and V ({shape.kv_bytes_per_token:,} B/token) and compute runs at "
                f"{rates.recompute_tokens_per_s:,.0f} tokens/s, so recomputing pays"
            )
        elif why_not is not None:
            head = why_not
        else:
            head = (
                f"recomputing at {rates.recompute_tokens_per_s:,.0f} tokens/s would not end sooner"
            )
        parts = [f"{r:,} recomputed (activations over the {via} link)"] if r else []
        parts.append(f"{p:,} from the peer GPU lease" if use_peer else "no peer")
        parts.append(f"{h:,} from host memory")
        mode = "together" if rates.concurrent else "one after another (no overlap here)"
        alone = (
            f"{self.predict(shape, rates, 0, 0, s) * 1e3:.3f} ms"
            if rates.host_bps
            else "no host link"
        )
        return (
            f"{head}. Of {s:,} tokens: {', '.join(parts)}; the paths run {mode} and "
            f"end after {t * 1e3:.3f} ms (host alone: {alone})."
        )

    # ------------------------------------------------------------ measuring

    @classmethod
    def profile(cls, shape: KVShape, device: Any = "cuda", **kwargs: Any) -> Rates:
        """Measure :class:`Rates` on ``device`` for ``shape``: see
        :func:`client.kv.measure.measure_rates` for the arguments (a host lease's and a
        GPU lease's tensors, sizes, repeats). Runs on the CPU too, with small sizes."""
        return measure_rates(shape, device, **kwargs)
