"""GPU discovery and the reserve/cap arithmetic (lender/gpus.py), on a machine with no
GPU: the arithmetic as plain functions, the watch against a fake NVML."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from harvestd.errors import BackendUnavailable, InvalidArgument
from harvestd.sizes import GiB
from lender.gpus import GpuSample, GpuWatch, discover_gpus, lendable_bytes, others_used, reserve_for


def test_reserve_is_the_larger_of_bytes_and_fraction():
    assert reserve_for(80 * GiB, 8 * GiB, 0.0) == 8 * GiB
    assert reserve_for(80 * GiB, 8 * GiB, 0.25) == 20 * GiB
    assert reserve_for(80 * GiB, 0, 0.05) == 4 * GiB
    assert reserve_for(80 * GiB) == 0


@pytest.mark.parametrize("reserve_bytes,fraction", [(-1, 0.0), (0, -0.1), (0, 1.5)])
def test_bad_reserve_is_invalid(reserve_bytes, fraction):
    with pytest.raises(InvalidArgument):
        reserve_for(GiB, reserve_bytes, fraction)


@pytest.mark.parametrize(
    "free,held,reserve,cap,expected",
    [
        (40 * GiB, 0, 8 * GiB, None, 32 * GiB),  # free less the reserve
        (40 * GiB, 10 * GiB, 8 * GiB, None, 42 * GiB),  # what we hold counts as ours
        (40 * GiB, 10 * GiB, 8 * GiB, 12 * GiB, 12 * GiB),  # under the cap
        (4 * GiB, 8 * GiB, 8 * GiB, 12 * GiB, 4 * GiB),  # the tenant grew: give 4 GiB back
        (2 * GiB, 0, 8 * GiB, None, 0),  # never negative
        (2 * GiB, 1 * GiB, 8 * GiB, 0, 0),  # a zero cap lends nothing
    ],
)
def test_lendable_is_free_plus_held_less_reserve_clamped(free, held, reserve, cap, expected):
    assert lendable_bytes(free, held, reserve, cap) == expected
    sample = GpuSample(total=80 * GiB, free=free, used_by_others=0, reserve=reserve, cap=cap)
    assert sample.lendable(held) == expected


def test_others_used_skips_own_pids_and_unknown_sizes():
    procs = [(10, GiB), (11, 2 * GiB), (12, None), (13, 3 * GiB)]
    assert others_used(procs, {11}) == 4 * GiB
    assert others_used(procs, []) == 6 * GiB


class FakeNvml:
    """Just enough of pynvml for GpuWatch."""

    class NVMLError(Exception):
        pass

    def __init__(self, total: int, free: int, procs: list[tuple[int, int | None]]) -> None:
        self.total, self.free, self.procs, self.process_queries = total, free, procs, 0

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid != "GPU-fake":
            raise self.NVMLError("Not Found")
        return object()

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=self.total, free=self.free, used=self.total - self.free)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        self.process_queries += 1
        return [SimpleNamespace(pid=p, usedGpuMemory=u) for p, u in self.procs]


def test_watch_applies_reserve_fraction_and_cap():
    fake = FakeNvml(80 * GiB, 30 * GiB, [(1, 10 * GiB), (2, 40 * GiB)])
    watch = GpuWatch(
        "GPU-fake",
        reserve_bytes=4 * GiB,
        reserve_fraction=0.1,
        cap_bytes=20 * GiB,
        own_pids={1},
        nvml=fake,
    )
    sample = watch.sample()
    assert (sample.total, sample.free, sample.reserve) == (80 * GiB, 30 * GiB, 8 * GiB)
    assert sample.used_by_others == 40 * GiB
    assert sample.lendable(0) == 20 * GiB  # 22 GiB, capped
    fake.free = 2 * GiB
    assert watch.sample().lendable(10 * GiB) == 4 * GiB  # 2 + 10 - 8
    assert watch.others_bytes(own_pids=[]) == 50 * GiB
    assert watch.cap_bytes == 20 * GiB


def test_watch_refreshes_processes_only_every_interval():
    fake = FakeNvml(80 * GiB, 30 * GiB, [(7, GiB)])
    watch = GpuWatch("GPU-fake", own_pids=set(), others_interval_s=3600, nvml=fake)
    for _ in range(5):
        watch.sample()
    assert fake.process_queries == 1  # the memory query stays cheap


def test_watch_of_unknown_gpu_is_unavailable():
    with pytest.raises(BackendUnavailable):
        GpuWatch("GPU-other", nvml=FakeNvml(GiB, GiB, []))


def test_discovery_without_a_driver_is_empty_not_an_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert discover_gpus() == []
