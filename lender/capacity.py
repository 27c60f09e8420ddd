"""How much a lender may lend now: a fixed host budget, or what its device's own tenant
leaves free (through NVML for a GPU, through the books of a host device for the CPU
twin), less what the tenant will want back (:mod:`lender.tenant`), under a cap."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from lender.tenant import DEFAULT_PEAK_WINDOW_S, LendingPolicy, MemorySample, TenantView

if TYPE_CHECKING:
    from lender.config import LenderConfig
    from lender.host_device import HostDevice


@dataclass
class DeviceInfo:
    """Which device a lender lends from, for placement."""

    gpu_uuid: str = ""
    gpu_index: int = -1
    links: dict[str, int] = field(default_factory=dict)  # peer GPU uuid -> NVLink count


class Capacity(Protocol):
    """A lender's budget."""

    watches_tenant: bool  # whether the lender must poll it for its tenant's pressure

    def describe(self) -> DeviceInfo:
        """The device and its links."""

    def lendable(self, held: int) -> int:
        """Bytes it may lend in all, given ``held`` bytes it already holds for lending."""

    def pool_bytes(self) -> int:
        """How many freed bytes it may keep allocated for reuse."""

    def device_memory(self) -> tuple[int, int]:
        """``(total, free)`` bytes of the device; ``(0, 0)`` for host memory."""

    def tenant(self) -> TenantView | None:
        """The device's tenant at the last look (None: no tenant is watched)."""

    def promise(self, nbytes: int, ttl_s: float) -> None:
        """Keep ``nbytes`` more out of lending for the tenant, who asked for them."""

    def reclaimed_in(self, seconds: float) -> None:
        """A reclaim for the tenant took ``seconds``."""

    @property
    def peak_window_s(self) -> float:
        """How long the tenant's peak keeps memory out of lending (0: no tenant)."""


class HostCapacity:
    """A fixed budget of host memory (``--host-bytes``); its tenant reclaims by asking."""

    watches_tenant = False
    peak_window_s = 0.0

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def describe(self) -> DeviceInfo:
        """Host memory sits on no GPU."""
        return DeviceInfo()

    def lendable(self, held: int) -> int:
        """The budget, whatever is held."""
        return self.nbytes

    def pool_bytes(self) -> int:
        """Fresh memfds come zeroed from the kernel for free: nothing to pool."""
        return 0

    def device_memory(self) -> tuple[int, int]:
        """Host memory is no device."""
        return 0, 0

    def tenant(self) -> TenantView | None:
        """A fixed budget has no tenant to watch."""
        return None

    def promise(self, nbytes: int, ttl_s: float) -> None:
        """Nothing to keep: the tenant of a fixed budget reclaims through the broker."""

    def reclaimed_in(self, seconds: float) -> None:
        """Nothing to learn."""


class _TenantWatch:
    """A device shared with a tenant: what may be lent follows the tenant, through a
    :class:`~lender.tenant.LendingPolicy` fed by :meth:`_memory` (NVML or the host
    device). One look at the device per call of :meth:`lendable`."""

    watches_tenant = True

    def __init__(self, policy: LendingPolicy) -> None:
        self.policy = policy

    def _memory(self) -> tuple[int, int]:
        raise NotImplementedError

    @property
    def peak_window_s(self) -> float:
        """See :class:`Capacity`."""
        return self.policy.history.peak_window_s

    def lendable(self, held: int) -> int:
        """What lies above the tenant's peak, its heading and the reserve, under the cap."""
        total, free = self._memory()
        return self.policy.sample(MemorySample(time.monotonic(), total, free, held)).lendable

    def device_memory(self) -> tuple[int, int]:
        """The device's total and free memory now."""
        return self._memory()

    def tenant(self) -> TenantView | None:
        """The tenant at the last :meth:`lendable`."""
        return self.policy.last

    def promise(self, nbytes: int, ttl_s: float) -> None:
        """See :meth:`lender.tenant.LendingPolicy.promise`."""
        self.policy.promise(nbytes, time.monotonic(), ttl_s)

    def reclaimed_in(self, seconds: float) -> None:
        """See :meth:`lender.tenant.LendingPolicy.reclaimed_in`."""
        self.policy.reclaimed_in(seconds)


class GpuCapacity(_TenantWatch):
    """What the GPU's tenant leaves free, watched through NVML."""

    def __init__(
        self,
        gpu_uuid: str,
        reserve_bytes: int,
        reserve_fraction: float,
        cap_bytes: int,
        peak_window_s: float = DEFAULT_PEAK_WINDOW_S,
    ) -> None:
        from lender.gpus import GpuWatch, discover_gpus

        self.watch = GpuWatch(
            gpu_uuid,
            reserve_bytes=reserve_bytes,
            reserve_fraction=reserve_fraction,
            cap_bytes=cap_bytes or None,
        )
        first = self.watch.sample()
        super().__init__(LendingPolicy(first.reserve, first.cap, peak_window_s))
        self.gpu = next((g for g in discover_gpus() if g.uuid == gpu_uuid), None)

    def _memory(self) -> tuple[int, int]:
        sample = self.watch.sample()
        return sample.total, sample.free

    def describe(self) -> DeviceInfo:
        """The GPU's UUID, NVML index and NVLink peers."""
        if self.gpu is None:
            return DeviceInfo()
        return DeviceInfo(self.gpu.uuid, self.gpu.index, dict(self.gpu.nvlinks))

    def pool_bytes(self) -> int:
        """Keep freed memory up to the cap (or all of it): cuMemCreate is not free."""
        return self.watch.cap_bytes or (1 << 62)


class HostDeviceCapacity(_TenantWatch):
    """The CPU twin of :class:`GpuCapacity`: host memory of a
    :class:`~lender.host_device.HostDevice` that a tenant shares, watched through the
    device's books as a GPU is through NVML."""

    def __init__(
        self,
        device: HostDevice,
        reserve_bytes: int,
        reserve_fraction: float,
        cap_bytes: int,
        peak_window_s: float = DEFAULT_PEAK_WINDOW_S,
    ) -> None:
        from lender.gpus import reserve_for

        self.device = device
        total, _ = device.memory()
        reserve = reserve_for(total, reserve_bytes, reserve_fraction)
        super().__init__(LendingPolicy(reserve, cap_bytes or None, peak_window_s))

    def _memory(self) -> tuple[int, int]:
        return self.device.memory()

    def describe(self) -> DeviceInfo:
        """Host memory sits on no GPU."""
        return DeviceInfo()

    def pool_bytes(self) -> int:
        """Fresh memfds come zeroed from the kernel for free: nothing to pool."""
        return 0


def capacity_for(config: LenderConfig, device: HostDevice | None = None) -> Capacity:
    """The budget for a lender's configuration (``device``: its host device, if any)."""
    if config.backend == "host":
        if device is None:
            return HostCapacity(config.host_bytes)
        return HostDeviceCapacity(
            device,
            config.reserve_bytes,
            config.reserve_fraction,
            config.cap_bytes,
            config.peak_window_s,
        )
    return GpuCapacity(
        config.gpu_uuid,
        config.reserve_bytes,
        config.reserve_fraction,
        config.cap_bytes,
        config.peak_window_s,
    )
