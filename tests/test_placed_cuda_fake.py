"""The placed tensor's GPU range (``client/placed/cuda.py``: ``CudaRange``,
``CudaLeasePages``) on a CPU, over a strict fake of the CUDA driver
(``support/fake_cuda.py``): the VMM calls it makes, the order it makes them in, and the
bytes a kernel would read at each step. The real hardware twin is
tests/gpu/test_placed_gpu.py.

The fake is installed as ``cuda.bindings.driver`` only for the duration of each test (the
``fake`` fixture): CI has no ``cuda-bindings`` and GPU machines have the real one, which
the fake must never shadow outside these tests.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import sys
import types
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
from support.fake_cuda import (
    HOST_NUMA,
    VMM_SUPPORTED,
    CUresult,
    FakeDriver,
    Handle,
)

from client.placed import cuda as pc
from harvestd.errors import (
    BackendUnavailable,
    FailedPrecondition,
    HarvestError,
    InvalidArgument,
    NoCapacity,
)
from harvestd.sizes import MiB
from lender.backends import cuda_driver as cu
from lender.backends import vmm_host as vh

MODULES = ("cuda", "cuda.bindings", "cuda.bindings.driver")
SIZE = 40 * MiB  # the range every case asks for
EVICT_STEPS = {"sync", "unmap", "map", "access", "release", "total"}


@dataclass(frozen=True)
class Case:
    host_granularity: int  # the host NUMA node's cuMemCreate granularity
    chunk: int  # the chunk size asked for
    granularity: int  # the chunk size the range must pick


CASES = [
    pytest.param(Case(2 * MiB, 2 * MiB, 2 * MiB), id="host2M-chunk2M"),
    pytest.param(Case(4 * MiB, 2 * MiB, 4 * MiB), id="host4M-chunk2M"),
    pytest.param(Case(2 * MiB, 6 * MiB, 6 * MiB), id="host2M-chunk6M"),
]


def _tensor_over(ptr: int, nbytes: int, ordinal: int, owner: Any) -> Any:
    # No CUDA tensor without a GPU: a stand-in that, like the real one, keeps owner alive.
    return types.SimpleNamespace(ptr=ptr, n=nbytes, owner=owner)


def install(mp: pytest.MonkeyPatch) -> tuple[FakeDriver, list[pc._State]]:
    """Install a fresh fake as ``cuda.bindings.driver`` and clear what the driver modules
    cache (the driver, contexts, host locations, streams), all through ``mp`` so that its
    undo puts back the real import state. Returns the fake and a list that collects every
    range's state made meanwhile."""
    drv = FakeDriver()
    bindings = types.ModuleType("cuda.bindings")
    bindings.driver = drv  # type: ignore[attr-defined]
    package = types.ModuleType("cuda")
    package.__path__ = []  # a package, so the submodules import
    package.bindings = bindings  # type: ignore[attr-defined]
    for name, module in zip(MODULES, (package, bindings, drv), strict=True):
        mp.setitem(sys.modules, name, module)
    mp.setattr(cu, "_driver", None)
    mp.setattr(cu, "_contexts", {})
    mp.setattr(cu, "tensor_over", _tensor_over)
    mp.setattr(vh, "_hosts", {})
    mp.setattr(pc, "_streams", {})
    states: list[pc._State] = []
    real_state = pc._State

    def tracked(*args: Any, **kwargs: Any) -> pc._State:
        states.append(real_state(*args, **kwargs))
        return states[-1]

    mp.setattr(pc, "_State", tracked)
    return drv, states


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDriver]:
    """The fake driver, installed for this test only. Afterwards every range still
    alive (a failed test's traceback keeps its locals) is released while the fake is
    still in place, so no finalizer ever reaches a real driver with fake addresses."""
    drv, states = install(monkeypatch)
    yield drv
    for state in states:
        pc._release(state)
    assert not drv.misuses, drv.misuses  # the release paths log and swallow failures


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


def new_range(fake: FakeDriver, case: Case) -> tuple[pc.CudaRange, bytes]:
    """A range for ``case`` whose authoritative copy holds random bytes (returned)."""
    fake.granularity[HOST_NUMA] = case.host_granularity
    r = pc.CudaRange(SIZE, case.chunk, 0)
    src = hashlib.shake_128(b"placed").digest(r.nbytes)  # every chunk's bytes differ
    fake.write(r._state.auth, src)
    return r, src


def lease(fake: FakeDriver, alloc: int) -> types.SimpleNamespace:
    """An imported lease of ``alloc`` bytes, as ``lender.backends.cuda_vmm`` gives one."""
    return types.SimpleNamespace(
        handle=fake.import_handle(alloc), alloc_bytes=alloc, gpu_uuid="GPU-fake"
    )


def placed(r: pc.CudaRange, imported: Any, offset: int, nbytes: int) -> pc.CudaLeasePages:
    pages = r.stage(imported, imported.alloc_bytes, offset, nbytes)
    pages.place()
    return pages


def live(fake: FakeDriver, handle: Handle) -> bool:
    return handle.id in fake.handles


# ---------------------------------------------------------------- the range itself


def test_granularity_is_whole_chunks_of_every_allocation(fake: FakeDriver, case: Case) -> None:
    r, _ = new_range(fake, case)
    g = r.granularity
    assert g == case.granularity
    assert g % case.host_granularity == 0 and g % case.chunk == 0
    assert r.nbytes % g == 0 and SIZE <= r.nbytes < SIZE + g


def test_range_reads_the_host_copy_through_the_same_chunks(fake: FakeDriver, case: Case) -> None:
    r, src = new_range(fake, case)
    st, g = r._state, r.granularity
    assert fake.read(st.base, r.nbytes) == src
    for off in range(0, r.nbytes, g):  # one host allocation per chunk, mapped twice
        chunk = fake.mappings[st.base + off].handle
        assert chunk is fake.mappings[st.auth + off].handle
        assert chunk.kind == "host-numa" and chunk.size == g and chunk.refs == 1


def test_no_vmm_is_backend_unavailable(fake: FakeDriver) -> None:
    fake.attributes[VMM_SUPPORTED] = 0
    with pytest.raises(BackendUnavailable):
        pc.CudaRange(SIZE, 2 * MiB, 0)
    assert fake.clean()


def test_host_location_falls_back_to_host_without_numa(fake: FakeDriver) -> None:
    fake.numa_supported = False
    assert pc.host_location(0)[1:] == (2 * MiB, "host")
    assert fake.clean()  # the probe's allocation is released
    r = pc.CudaRange(8 * MiB, 2 * MiB, 0)
    assert r.host_location == "host"
    assert fake.mappings[r._state.auth].handle.kind == "host"


def test_failed_construction_unwinds(fake: FakeDriver) -> None:
    pc.host_location(0)  # cached: its probe is not one of the creates counted below
    fake.fail("cuMemCreate", nth=3, error=CUresult.CUDA_ERROR_OUT_OF_MEMORY)
    with pytest.raises(NoCapacity):
        pc.CudaRange(8 * MiB, 2 * MiB, 0)
    gc.collect()
    assert fake.clean(), (fake.mappings, fake.reserved, fake.handles)


@pytest.mark.parametrize(
    "call, nth",
    [
        ("cuMemAddressReserve", 1),
        ("cuMemAddressReserve", 2),
        ("cuMemCreate", 1),
        ("cuMemMap", 1),
        ("cuMemMap", 2),
        ("cuMemMap", 4),
        ("cuMemSetAccess", 1),
        ("cuMemSetAccess", 2),
    ],
)
def test_construction_failing_at_any_step_unwinds(fake: FakeDriver, call: str, nth: int) -> None:
    pc.host_location(0)
    fake.fail(call, nth)
    with pytest.raises(HarvestError):
        pc.CudaRange(8 * MiB, 2 * MiB, 0)
    gc.collect()
    assert fake.clean(), (fake.mappings, fake.reserved, fake.handles)


# ---------------------------------------------------------------- local memory


def test_map_local_keeps_the_values_in_device_memory(fake: FakeDriver, case: Case) -> None:
    r, src = new_range(fake, case)
    st, g = r._state, r.granularity
    r.map_local(0, g)
    assert fake.read(st.base, r.nbytes) == src
    local = fake.mappings[st.base].handle
    assert local.kind == "device" and local.size == g
    assert local.refs == 0  # released: the mapping alone holds it
    assert not st.scratch  # the fill's staging address is gone


def test_local_writes_do_not_reach_the_host_copy(fake: FakeDriver, case: Case) -> None:
    r, src = new_range(fake, case)
    st = r._state
    r.map_local(0, r.granularity)
    fake.write(st.base, b"\x01" * 16)
    assert fake.read(st.auth, 16) == src[:16]


def test_map_local_over_a_placed_lease_is_refused(fake: FakeDriver, case: Case) -> None:
    r, src = new_range(fake, case)
    g = r.granularity
    placed(r, lease(fake, g), 4 * g, g)
    with pytest.raises(FailedPrecondition):
        r.map_local(4 * g, g)
    assert fake.read(r._state.base, r.nbytes) == src


# ---------------------------------------------------------------- leases


def test_stage_fills_the_lease_at_a_scratch_address(fake: FakeDriver, case: Case) -> None:
    r, src = new_range(fake, case)
    g, n = r.granularity, 2 * r.granularity
    imported = lease(fake, n)
    r.stage(imported, n, g, n)
    assert imported.handle.data == src[g : g + n]
    assert len(r._state.scratch) == 1
    assert fake.read(r._state.base, r.nbytes) == src  # nothing placed yet


def test_place_maps_the_lease_at_its_offset(fake: FakeDriver, case: Case) -> None:
    r, src = new_range(fake, case)
    st, g, n = r._state, r.granularity, 2 * r.granularity
    imported = lease(fake, n)
    placed(r, imported, g, n)
    assert not st.scratch
    assert fake.mappings[st.base + g].handle is imported.handle
    assert fake.read(st.base, r.nbytes) == src


def test_evict_maps_the_host_copy_back_with_writes(fake: FakeDriver, case: Case) -> None:
    r, src = new_range(fake, case)
    st, g, n = r._state, r.granularity, 2 * r.granularity
    imported = lease(fake, n)
    pages = placed(r, imported, g, n)
    # As PlacedTensor.write_ does: the placed range and the window both.
    fake.write(st.base + g, b"\x07" * 8)
    fake.write(st.auth + g, b"\x07" * 8)
    expected = bytearray(src)
    expected[g : g + 8] = b"\x07" * 8
    pages.evict()
    assert fake.read(st.base, r.nbytes) == bytes(expected)
    assert not live(fake, imported.handle)  # released and unmapped: gone


def test_evict_sets_access_once(fake: FakeDriver, case: Case) -> None:
    r, _ = new_range(fake, case)
    g = r.granularity
    pages = placed(r, lease(fake, 2 * g), g, 2 * g)
    fake.calls.clear()
    pages.evict()
    assert fake.calls.count("cuMemSetAccess") == 1  # per span, never per chunk


def test_evict_times_its_steps(fake: FakeDriver, case: Case) -> None:
    r, _ = new_range(fake, case)
    g = r.granularity
    pages = placed(r, lease(fake, 2 * g), g, 2 * g)
    pages.evict()
    assert set(pages.fence_ms) >= EVICT_STEPS
    assert pages.fence_ms["chunks"] == 2


def test_evict_is_idempotent(fake: FakeDriver, case: Case) -> None:
    r, src = new_range(fake, case)
    g = r.granularity
    pages = placed(r, lease(fake, g), g, g)
    pages.evict()
    fence, fake.calls[:] = pages.fence_ms, []
    pages.evict()
    assert fake.calls == [] and pages.fence_ms is fence
    assert fake.read(r._state.base, r.nbytes) == src


def test_oversized_lease_is_refused_and_released(fake: FakeDriver, case: Case) -> None:
    r, _ = new_range(fake, case)
    g = r.granularity
    big = lease(fake, 3 * g)
    with pytest.raises(FailedPrecondition):
        r.stage(big, 3 * g, g, 2 * g)
    assert not live(fake, big.handle) and not r._state.scratch


@pytest.mark.parametrize("where", ["misaligned", "past-the-end", "empty"])
def test_bad_span_releases_the_handle(fake: FakeDriver, case: Case, where: str) -> None:
    r, _ = new_range(fake, case)
    g = r.granularity
    offset, nbytes = {"misaligned": (1, g), "past-the-end": (r.nbytes, g), "empty": (g, 0)}[where]
    bad = lease(fake, g)
    with pytest.raises(InvalidArgument):
        r.stage(bad, g, offset, nbytes)
    assert not live(fake, bad.handle) and not r._state.scratch


def test_staged_only_evict_frees_scratch_and_handle(fake: FakeDriver, case: Case) -> None:
    r, _ = new_range(fake, case)
    g = r.granularity
    imported = lease(fake, g)
    r.stage(imported, g, 3 * g, g).evict()
    assert not live(fake, imported.handle) and not r._state.scratch


def test_failed_place_restores_the_host_chunks(fake: FakeDriver, case: Case) -> None:
    r, src = new_range(fake, case)
    st, g = r._state, r.granularity
    imported = lease(fake, g)
    pages = r.stage(imported, g, 3 * g, g)
    fake.fail("cuMemMap")  # the lease's map, after its host chunk is unmapped
    with pytest.raises(InvalidArgument):
        pages.place()
    assert not live(fake, imported.handle) and not st.scratch
    assert fake.read(st.base, r.nbytes) == src


def test_stage_failing_to_grant_access_lets_the_lease_go(fake: FakeDriver) -> None:
    r = pc.CudaRange(8 * MiB, 2 * MiB, 0)
    imported = lease(fake, 2 * MiB)
    fake.fail("cuMemSetAccess")
    with pytest.raises(InvalidArgument):
        r.stage(imported, 2 * MiB, 2 * MiB, 2 * MiB)
    assert not r._state.scratch and not live(fake, imported.handle)


@pytest.mark.parametrize("call", ["cuMemMap", "cuMemSetAccess"])
def test_failed_evict_leaves_the_span_readable_once_retried(fake: FakeDriver, call: str) -> None:
    r = pc.CudaRange(8 * MiB, 2 * MiB, 0)
    st = r._state
    pages = placed(r, lease(fake, 2 * MiB), 2 * MiB, 2 * MiB)
    fake.fail(call)
    with pytest.raises(InvalidArgument):
        pages.evict()
    pages.evict()  # the retry maps (or grants) what the failed one left out
    assert fake.read(st.base, r.nbytes) == fake.read(st.auth, r.nbytes)


# ---------------------------------------------------------------- release


def _busy_range(fake: FakeDriver, case: Case) -> tuple[pc.CudaRange, list[pc.CudaLeasePages]]:
    """A range with local memory, a placed lease, a staged one and an evicted one."""
    r, _ = new_range(fake, case)
    g = r.granularity
    r.map_local(0, g)
    pages = [placed(r, lease(fake, g), 4 * g, g), r.stage(lease(fake, g), g, 2 * g, g)]
    placed(r, lease(fake, g), g, g).evict()
    return r, pages


def test_finalizer_frees_everything(fake: FakeDriver, case: Case) -> None:
    r, pages = _busy_range(fake, case)
    r.close()
    del r
    gc.collect()
    assert fake.clean(), (fake.mappings, fake.reserved, fake.handles)
    assert pages  # the leases' pages outlive the range


def test_a_tensor_keeps_the_range_after_close(fake: FakeDriver, case: Case) -> None:
    r, _ = new_range(fake, case)
    tensor = r.tensor()
    r.close()
    gc.collect()
    assert fake.reserved and fake.mappings
    del tensor
    gc.collect()
    assert fake.clean()


def test_evict_after_release_is_a_no_op(fake: FakeDriver, case: Case) -> None:
    r, pages = _busy_range(fake, case)
    r.close()
    gc.collect()
    fake.calls.clear()
    for p in pages:
        p.evict()
        assert p.fence_ms == {}
    assert fake.calls == []


# ---------------------------------------------------------------- the fixture


def test_the_fake_is_gone_after_the_fixture() -> None:
    before = {name: sys.modules.get(name) for name in MODULES}
    caches = (cu._driver, cu._contexts, cu.tensor_over, vh._hosts, pc._streams, pc._State)
    with pytest.MonkeyPatch.context() as mp:
        drv, _ = install(mp)
        from cuda.bindings import driver as inside

        assert inside is drv and cu.driver() is drv
    assert {name: sys.modules.get(name) for name in MODULES} == before
    assert all(m is not drv for m in sys.modules.values())
    after = (cu._driver, cu._contexts, cu.tensor_over, vh._hosts, pc._streams, pc._State)
    assert all(a is b for a, b in zip(after, caches, strict=True))
    try:  # the real bindings where installed (GPU machines), else none at all (CI)
        real: Any = importlib.import_module("cuda.bindings.driver")
    except ImportError:
        real = None
    assert real is not drv


# ---------------------------------------------------------------- harvestd doctor


def test_doctor_names_the_in_place_path_where_the_driver_maps_host_memory(
    fake: FakeDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from harvestd.doctor import _placed_path

    monkeypatch.setattr(cu, "ordinal_of_uuid", lambda uuid: 0)
    check = _placed_path(0, "GPU-fake")
    assert check.ok is True and "in place" in check.detail and "host-numa" in check.detail


def test_doctor_names_the_copy_path_where_it_cannot(
    fake: FakeDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    from harvestd.doctor import _placed_path

    monkeypatch.setattr(cu, "ordinal_of_uuid", lambda uuid: 0)
    fake.numa_supported = False  # no host-NUMA memory, and the plain host one fails too
    fake.fail("cuMemCreate", nth=2)
    check = _placed_path(0, "GPU-fake")
    assert check.ok is False and "copy path" in check.detail and check.fix
