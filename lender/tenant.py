"""What a lender may lend without hurting its device's own tenant.

A tenant that breathes (a training step, a batch of long prompts) comes back to memory it
held a moment ago; a tenant that ramps allocates faster than any revocation runs. So a
lender lends only what lies above both:

* the tenant's **peak** over the last ``peak_window_s`` (its use now is part of that):
  memory the tenant held recently is memory it will want back, and stays unlent;
* where the tenant is heading, once it ramps past that peak (it grew at each of the
  last looks, or it grew into most of the reserve): its use now plus its growth rate
  times the time a reclaim takes (``horizon_s``), so that a reclaim started now frees
  memory before the tenant gets there, not after;

plus the reserve, under the cap. The tenant's use is what the device shows as used and
the lender does not hold: ``total - free - held``. This module is pure arithmetic over
samples; :mod:`lender.capacity` feeds it from NVML (a GPU) or from a host device's
meter (the CPU twin, :mod:`lender.host_device`).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

# The tenant's growth is measured over this much recent history: long enough to see a
# ramp through NVML's sampling noise, short enough to follow a ramp that starts now.
RAMP_WINDOW_S = 0.05
# A reclaim's duration, until one has been measured (the H200's 10 GiB reclaim took
# ~20-35 ms); measured ones are smoothed, and kept within these bounds.
DEFAULT_HORIZON_S = 0.05
MIN_HORIZON_S = 0.01
MAX_HORIZON_S = 1.0
DEFAULT_PEAK_WINDOW_S = 300.0
# A tenant this much of the device above its earlier peak is past it (a process starting
# on the GPU, a borrower's CUDA context, takes ~0.5 GiB: under 1% of an H200).
PEAK_NOISE = 0.01
# A tenant that left less than this share of the reserve free is out of room now: its
# next allocation fails unless memory comes back, so a jump into it counts as a ramp.
STARVING = 0.25


@dataclass(frozen=True)
class MemorySample:
    """One look at a device: ``held`` is what the lender holds there for lending."""

    at: float  # monotonic seconds
    total: int
    free: int
    held: int

    @property
    def tenant(self) -> int:
        """Bytes the tenant (everyone but the lender) uses now."""
        return max(0, self.total - self.free - self.held)


@dataclass(frozen=True)
class TenantView:
    """What the lender knows of its tenant after a sample, as the metrics and
    ``harvestd lenders`` show it."""

    now: int  # bytes the tenant uses now
    peak: int  # its peak over the window
    growth_bps: float  # bytes per second it is growing by (0 when shrinking)
    heading: int  # where it will be one horizon from now
    lendable: int  # what the lender may hold in all


class TenantHistory:
    """The tenant's use over time: its peak over a sliding window and its growth now.

    Samples come every few milliseconds; the peak is a monotonic deque (each sample
    enters and leaves once), so a long window costs no more than a short one."""

    def __init__(self, peak_window_s: float = DEFAULT_PEAK_WINDOW_S) -> None:
        if not peak_window_s >= 0:
            raise ValueError(f"peak window must be >= 0 seconds, got {peak_window_s}")
        self.peak_window_s = peak_window_s
        self._peaks: collections.deque[tuple[float, int]] = collections.deque()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, at: float, tenant: int) -> None:
        """Record the tenant's use ``tenant`` at time ``at`` (monotonic, non-decreasing)."""
        while self._peaks and self._peaks[-1][1] <= tenant:
            self._peaks.pop()
        self._peaks.append((at, tenant))
        while self._peaks[0][0] < at - self.peak_window_s:
            self._peaks.popleft()
        self._recent.append((at, tenant))
        while len(self._recent) > 2 and self._recent[1][0] <= at - RAMP_WINDOW_S:
            self._recent.popleft()

    def peak(self) -> int:
        """The most the tenant used within the window (0 before any sample)."""
        return self._peaks[0][1] if self._peaks else 0

    def growth_bps(self) -> float:
        """How fast the tenant's use grew over the last :data:`RAMP_WINDOW_S`: the fastest
        step between two looks (bytes per second; 0 when it shrank or held still). The
        fastest step, not the average: a ramp that started just now, or one that met the
        end of free memory and now waits for it, shows its rate only there."""
        rate = 0.0
        samples = list(self._recent)
        for (t0, u0), (t1, u1) in zip(samples, samples[1:], strict=False):
            if t1 > t0:
                rate = max(rate, (u1 - u0) / (t1 - t0))
        return rate

    def sustained(self) -> bool:
        """Whether the tenant grew at each of its last two looks: a ramp, where one
        jump and a stop is a step."""
        samples = list(self._recent)[-3:]
        return len(samples) == 3 and samples[0][1] < samples[1][1] < samples[2][1]


class LendingPolicy:
    """Turns samples of a device into what its lender may hold: see the module doc.

    ``reserve``: bytes always kept free for the tenant. ``cap``: the most to lend (None:
    no cap). ``peak_window_s``: how long the tenant's peak keeps memory out of lending
    (0: only its use now). ``horizon_s``: the first guess of a reclaim's duration, until
    :meth:`reclaimed_in` reports measured ones."""

    def __init__(
        self,
        reserve: int,
        cap: int | None = None,
        peak_window_s: float = DEFAULT_PEAK_WINDOW_S,
        horizon_s: float = DEFAULT_HORIZON_S,
    ) -> None:
        if reserve < 0:
            raise ValueError(f"reserve must be >= 0 bytes, got {reserve}")
        self.reserve = reserve
        self.cap = cap
        self.history = TenantHistory(peak_window_s)
        self.horizon_s = min(MAX_HORIZON_S, max(MIN_HORIZON_S, horizon_s))
        self.last: TenantView | None = None
        self._promises: list[tuple[float, int]] = []  # (lapses at, tenant's use to reach)

    def promise(self, nbytes: int, at: float, ttl_s: float) -> None:
        """The tenant asked for ``nbytes`` more (:class:`client.tenant.Tenant`): count
        them as its own until its use shows them, or ``ttl_s`` after ``at``."""
        now = self.last.now if self.last is not None else 0
        self._promises.append((at + ttl_s, now + nbytes))

    def reclaimed_in(self, seconds: float) -> None:
        """A reclaim took ``seconds``: ramps are now looked at that far ahead (smoothed,
        so that one slow reclaim does not stop lending for long)."""
        seen = min(MAX_HORIZON_S, max(MIN_HORIZON_S, seconds))
        self.horizon_s = max(seen, 0.5 * self.horizon_s + 0.5 * seen)

    def sample(self, sample: MemorySample) -> TenantView:
        """Take one look at the device; returns what the lender may hold now."""
        tenant = sample.tenant
        earlier_peak = self.history.peak()
        self.history.add(sample.at, tenant)
        growth = self.history.growth_bps()
        # Below or at its earlier peak, a growing tenant is breathing back in: the peak
        # already keeps its memory free. Past it (by more than the noise of a new CUDA
        # context or two) and still growing, or grown into most of the reserve, it is
        # ramping somewhere new: meet it where it is heading. A single jump that stops
        # is a step, and costs borrowers no more than it took.
        past_peak = tenant > earlier_peak + sample.total * PEAK_NOISE
        starving = sample.free < self.reserve * STARVING
        ramping = past_peak and growth > 0 and (self.history.sustained() or starving)
        heading = tenant + int(growth * self.horizon_s) if ramping else tenant
        self._promises = [(t, u) for t, u in self._promises if t > sample.at and u > tenant]
        wanted = max([self.history.peak(), heading] + [u for _, u in self._promises])
        lendable = max(0, sample.total - wanted - self.reserve)
        if self.cap is not None:
            lendable = min(lendable, max(0, self.cap))
        self.last = TenantView(tenant, self.history.peak(), growth, heading, lendable)
        return self.last
