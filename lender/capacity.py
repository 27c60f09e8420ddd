"""How much a lender may lend now: a fixed host budget, or what NVML says its GPU's own
tenant leaves free (less a reserve, under a cap)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from lender.config import LenderConfig


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


class HostCapacity:
    """A fixed budget of host memory (``--host-bytes``); its tenant reclaims by asking."""

    watches_tenant = False

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


class GpuCapacity:
    """What the GPU's tenant leaves free, watched through NVML."""

    watches_tenant = True

    def __init__(
        self, gpu_uuid: str, reserve_bytes: int, reserve_fraction: float, cap_bytes: int
    ) -> None:
        from lender.gpus import GpuWatch, discover_gpus

        self.watch = GpuWatch(
            gpu_uuid,
            reserve_bytes=reserve_bytes,
            reserve_fraction=reserve_fraction,
            cap_bytes=cap_bytes or None,
        )
        self.gpu = next((g for g in discover_gpus() if g.uuid == gpu_uuid), None)

    def describe(self) -> DeviceInfo:
        """The GPU's UUID, NVML index and NVLink peers."""
        if self.gpu is None:
            return DeviceInfo()
        return DeviceInfo(self.gpu.uuid, self.gpu.index, dict(self.gpu.nvlinks))

    def lendable(self, held: int) -> int:
        """Free memory plus what we hold, less the reserve, under the cap."""
        return self.watch.sample().lendable(held)

    def pool_bytes(self) -> int:
        """Keep freed memory up to the cap (or all of it): cuMemCreate is not free."""
        return self.watch.cap_bytes or (1 << 62)

    def device_memory(self) -> tuple[int, int]:
        """The GPU's total and free memory, from NVML."""
        sample = self.watch.sample()
        return sample.total, sample.free


def capacity_for(config: "LenderConfig") -> Capacity:
    """The budget for a lender's configuration."""
    if config.backend == "host":
        return HostCapacity(config.host_bytes)
    return GpuCapacity(
        config.gpu_uuid, config.reserve_bytes, config.reserve_fraction, config.cap_bytes
    )
