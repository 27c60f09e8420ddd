"""Striped leases (client/striped.py): the split of blocks by stripe on fake stripes, then
real leases on a node of three host lenders (plain processes): data round trips across
stripes, stripes on distinct lenders, one stripe revoked ends the whole, bad input."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, cast

import pytest
import torch
from support.ill_typed import ill_typed
from support.waiting import wait_for

from client.lease import Lease
from client.striped import StripedLease
from client.striping import StripeLayout
from harvestd.errors import InvalidArgument, LeaseRevoked, NoCapacity
from harvestd.sizes import KiB, MiB


class FakeStripe:
    """Just enough of a Lease over a CPU tensor."""

    def __init__(self, nbytes: int, lender: str) -> None:
        self.id, self.lender, self.nbytes = f"lease-{lender}", lender, nbytes
        self.bytes = torch.zeros(nbytes, dtype=torch.uint8)
        self.device = self.bytes.device
        self.callbacks: list = []
        self.state = "granted"

    @contextlib.contextmanager
    def use(self) -> Iterator[None]:
        if self.state != "granted":
            raise LeaseRevoked(self.id)
        yield

    def as_bytes(self) -> torch.Tensor:
        return self.bytes

    def tensor(self, dtype, shape=None, offset=0) -> torch.Tensor:
        return self.bytes[offset:].view(dtype)

    def on_revoke(self, callback) -> None:
        self.callbacks.append(callback)

    def end(self, state: str, reason: str) -> None:
        if self.state == "granted":
            self.state = state
            for callback in self.callbacks:
                callback(self, reason)

    def release(self, wait_s: float = 0.0) -> None:
        self.end("released", "released by its holder")


def fake(nbytes: int, stripes: int, unit: int) -> StripedLease:
    layout = StripeLayout(nbytes, stripes, unit)
    leases = [FakeStripe(layout.stripe_bytes(s), f"l{s}") for s in range(stripes)]
    # A FakeStripe has every method and attribute StripedLease uses of a Lease.
    return StripedLease(cast("list[Lease]", leases), layout)


def fakes(striped: StripedLease) -> list[FakeStripe]:
    """The fake stripes under ``striped`` (made by :func:`fake`)."""
    stripes: list[FakeStripe] = []
    for lease in striped.stripes:
        assert isinstance(lease, FakeStripe)
        stripes.append(lease)
    return stripes


def logical(striped: StripedLease) -> torch.Tensor:
    """The logical bytes, put together from the stripes by ``locate``."""
    unit = striped.layout.unit
    out = torch.empty(striped.nbytes, dtype=torch.uint8)
    for start in range(0, striped.nbytes, unit):
        stripe, local = striped.locate(start)
        n = min(unit, striped.nbytes - start)
        out[start : start + n] = striped.stripes[stripe].as_bytes()[local : local + n]
    return out


@pytest.mark.parametrize(
    "block,aligned,as_tensor",
    [(16 * KiB, True, True), (16 * KiB, True, False), (4 * KiB, False, True), (24, False, False)],
)
def test_scatter_then_gather_round_trips_across_stripes(block, aligned, as_tensor):
    unit, stripes = 64 * KiB, 3
    striped = fake(1 * MiB + 5 * KiB, stripes, unit)
    gen = torch.Generator().manual_seed(block)
    per_unit = unit // block if aligned else 1
    # Distinct blocks that never cross a unit, shuffled so the stripes interleave.
    units = torch.randperm(striped.layout.units - 1, generator=gen)[:12]
    offsets = []
    for u in units.tolist():
        for j in range(per_unit if aligned else 2):
            offsets.append(u * unit + (j * block if aligned else 8 + j * (unit // 2)))
    data = torch.randint(0, 256, (len(offsets) * block,), dtype=torch.uint8, generator=gen)
    index = torch.tensor(offsets) if as_tensor else offsets
    striped.scatter(data, index, block)
    flat = logical(striped)
    for i, o in enumerate(offsets):
        assert torch.equal(flat[o : o + block], data[i * block : (i + 1) * block])
    out = torch.empty_like(data)
    assert striped.gather(index, block, out) is out
    assert torch.equal(out, data)
    counts = [
        int((flat.new_tensor([striped.locate(o)[0] for o in offsets]) == s).sum())
        for s in range(stripes)
    ]
    assert all(counts), f"every stripe should hold some blocks: {counts}"


def test_blocks_in_stripe_order_gather_without_staging():
    striped = fake(6 * 64 * KiB, 3, 64 * KiB)
    for s, lease in enumerate(fakes(striped)):
        lease.bytes.fill_(s + 1)
    offsets = [0, 3 * 64 * KiB, 64 * KiB, 2 * 64 * KiB]  # stripes 0, 0, 1, 2: in order
    out = torch.empty(4 * 16 * KiB, dtype=torch.uint8)
    striped.gather(offsets, 16 * KiB, out)
    assert out.view(4, -1)[:, 0].tolist() == [1, 1, 2, 3]
    assert striped.gather([], 16 * KiB, out) is out


def test_buffers_at_odd_addresses():
    striped = fake(8 * 64 * KiB, 4, 64 * KiB)
    offsets = [3 * 64 * KiB, 0, 64 * KiB + 512, 2 * 64 * KiB]  # not in stripe order
    data = torch.randint(0, 256, (4 * 512 + 1,), dtype=torch.uint8)[1:]
    striped.scatter(data, offsets, 512)
    out = torch.zeros(4 * 512 + 3, dtype=torch.uint8)[3:]
    striped.gather(offsets, 512, out)
    assert torch.equal(out, data)


def test_a_plan_is_reused_without_sorting_again():
    striped = fake(8 * 64 * KiB, 4, 64 * KiB)
    offsets = [7 * 64 * KiB, 64 * KiB + 4096, 0, 5 * 64 * KiB + 8192]
    plan = striped.plan(offsets, 4096)
    assert plan.counts == (1, 2, 0, 1) and plan.order is not None and plan.aligned
    data = torch.arange(4 * 4096, dtype=torch.int32).to(torch.uint8)
    striped.scatter(data, plan, 4096)
    out = torch.zeros_like(data)
    for _ in range(2):
        striped.gather(plan, 4096, out)
        assert torch.equal(out, data)
    with pytest.raises(InvalidArgument, match="the plan is for"):
        striped.gather(plan, 2048, out)
    with pytest.raises(InvalidArgument, match="the plan is for"):
        fake(8 * 64 * KiB, 2, 64 * KiB).gather(plan, 4096, out)
    with pytest.raises(InvalidArgument, match="the plan is for"):
        striped.gather(striped.plan(offsets, 4096, device="meta"), 4096, out)


@pytest.mark.parametrize(
    "offsets,block,message",
    [
        ([0, 64 * KiB - 8], 16, "crosses"),
        ([-64], 16, "must lie in"),
        ([6 * 64 * KiB - 8], 16, "must lie in"),
        ([0], 128 * KiB, "do not fit"),
        ([0], 0, "positive"),
        (["x"], 16, "integers"),
        (torch.zeros(2, 2, dtype=torch.int64), 16, "1-D"),
        (torch.zeros(2, dtype=torch.float32), 16, "1-D"),
    ],
)
def test_bad_blocks_are_refused(offsets, block, message):
    striped = fake(6 * 64 * KiB, 3, 64 * KiB)
    with pytest.raises(InvalidArgument, match=message):
        striped.gather(offsets, block, torch.empty(1 * MiB, dtype=torch.uint8))


def test_bad_buffers_and_stripes_are_refused():
    striped = fake(6 * 64 * KiB, 3, 64 * KiB)
    with pytest.raises(InvalidArgument, match="holds"):
        striped.gather([0, 64], 64, torch.empty(100, dtype=torch.uint8))
    with pytest.raises(InvalidArgument, match="contiguous"):
        striped.scatter(torch.empty(8, 64, dtype=torch.uint8).t(), [0], 64)
    with pytest.raises(InvalidArgument, match="torch.Tensor"):
        striped.gather([0], 64, ill_typed(bytearray(64)))
    with pytest.raises(InvalidArgument, match="stripe must be"):
        striped.tensor(3, torch.uint8)
    assert striped.tensor(2, torch.int32).dtype == torch.int32
    with pytest.raises(InvalidArgument):
        StripedLease(striped.stripes[:2], striped.layout)


def test_one_stripe_gone_ends_the_whole_and_releases_the_rest():
    striped = fake(6 * 64 * KiB, 3, 64 * KiB)
    heard: list[str] = []
    striped.on_revoke(lambda s, why: heard.append(why))
    fakes(striped)[1].end("revoked", "reclaimed by tenant")
    assert striped.revoked and striped.state == "revoked"
    assert heard == ["stripe 1 (l1): reclaimed by tenant"]
    assert [l.state for l in striped.stripes] == ["released", "revoked", "released"]
    with pytest.raises(LeaseRevoked):
        striped.gather([0], 64, torch.empty(64, dtype=torch.uint8))
    late: list[str] = []
    striped.on_revoke(lambda s, why: late.append(why))  # already gone: told at once
    assert late == heard
    striped.release()  # idempotent, tells nobody twice
    assert heard == ["stripe 1 (l1): reclaimed by tenant"]


# ---------------------------------------------------------------- a real node


def test_stripes_land_on_distinct_lenders_and_round_trip(many_lender_node):
    node = many_lender_node
    with node.connect() as client, client.lease_striped(24 * MiB, stripes=3, unit=MiB) as striped:
        assert sorted(striped.lenders) == node.ids
        rows = {l["id"]: l for l in node.json("leases")}
        assert {rows[i]["lender"] for i in striped.ids} == set(node.ids)
        assert all(rows[i]["nbytes"] == 8 * MiB for i in striped.ids)
        gen = torch.Generator().manual_seed(3)
        offsets = torch.randperm(24 * MiB // (16 * KiB), generator=gen)[:300] * 16 * KiB
        data = torch.randint(0, 256, (300 * 16 * KiB,), dtype=torch.uint8, generator=gen)
        striped.scatter(data, offsets, 16 * KiB)
        out = torch.empty_like(data)
        striped.gather(offsets, 16 * KiB, out)
        assert torch.equal(out, data)
        # The bytes live where the layout says, in each lender's own memory.
        stripe, local = striped.locate(int(offsets[0]))
        assert torch.equal(
            striped.tensor(stripe, torch.uint8)[local : local + 16 * KiB], data[: 16 * KiB]
        )
    wait_for(
        lambda: all(l["granted"] == 0 for l in node.json("lenders")),
        what="every stripe to be given back",
    )


def test_revoking_one_stripe_revokes_the_striped_lease(many_lender_node):
    node = many_lender_node
    with node.connect() as client:
        striped = client.lease_striped(12 * MiB, stripes=3, unit=MiB)
        gone = threading.Event()
        reasons: list[str] = []

        def heard(_: StripedLease, why: str) -> None:
            reasons.append(why)
            gone.set()

        striped.on_revoke(heard)
        out = torch.empty(16 * KiB, dtype=torch.uint8)
        striped.gather([5 * MiB], 16 * KiB, out)
        assert node.cli("revoke", striped.ids[1]).returncode == 0
        assert gone.wait(15), "the holder never heard"
        assert striped.revoked and "stripe 1" in reasons[0]
        with pytest.raises(LeaseRevoked):
            striped.gather([0], 16 * KiB, out)
        states = {l["id"]: l["state"] for l in node.json("leases", "--all")}
        assert states[striped.ids[1]] == "revoked"
        assert states[striped.ids[0]] == states[striped.ids[2]] == "released"
        assert client.leases() == []
    wait_for(
        lambda: all(l["granted"] == 0 for l in node.json("lenders")),
        what="every stripe's memory to come back",
    )


def test_striped_requests_that_cannot_be_met(many_lender_node):
    node = many_lender_node
    with node.connect() as client:
        with pytest.raises(NoCapacity, match="avoiding 3 lenders"):
            client.lease_striped(8 * MiB, stripes=4, unit=MiB)  # one lender each: 3 only
        with pytest.raises(NoCapacity):
            client.lease_striped(3 * 40 * MiB, stripes=3, unit=MiB)  # 40 MiB > 32 MiB each
        for bad in [
            dict(nbytes=0),
            dict(nbytes=MiB, stripes=0),
            dict(nbytes=MiB, stripes=2),
            dict(nbytes=MiB, unit=-1),
            dict(nbytes=MiB, max_stripes=0),
            dict(nbytes=1.5),
        ]:
            with pytest.raises(InvalidArgument):
                client.lease_striped(**ill_typed(bad))
        # No GPU to be near: one stripe.
        with client.lease_striped(4 * MiB) as single:
            assert single.layout.stripes == 1
        with pytest.raises(InvalidArgument):
            client.lease(MiB, avoid=[""])
        lease = client.lease(MiB, avoid=node.ids[:2])
        assert lease.lender == node.ids[2]
        lease.release()
    wait_for(
        lambda: all(l["granted"] == 0 for l in node.json("lenders")), what="nothing left granted"
    )
