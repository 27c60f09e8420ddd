"""MoE experts in placed tensors on host leases (the CPU twin): the compute reads the
offloaded experts where they lie, and the tokens out are those of every expert resident,
through revocations that remap the host copy under the experts mid-generation."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import pytest
from support.waiting import wait_for

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_moe import _grouped_reference, generate, mixtral, qwen_moe, qwen_moe_unaligned  # noqa: E402

from client.moe import offload_experts  # noqa: E402
from client.moe.placed import PlacedExperts  # noqa: E402
from harvestd.errors import InvalidArgument  # noqa: E402


def _want(client, build, compute, tokens=12):
    if compute == "eager":
        return generate(build(), tokens)
    return _grouped_reference(client, build, tokens)


@pytest.mark.parametrize(
    "build", [mixtral, qwen_moe, qwen_moe_unaligned], ids=["mixtral", "qwen2-moe", "unaligned"]
)
@pytest.mark.parametrize("compute", ["eager", "grouped"])
def test_placed_experts_give_the_resident_tokens(plain_node, build, compute):
    model = build()
    with plain_node.connect() as client:
        want = _want(client, build, compute)
        offload = offload_experts(
            model,
            client,
            fraction=0.5,
            placement="placed",
            slab_bytes=256 << 10,
            compute=compute,
            refill_every=None,
        )
        try:
            assert offload.placement == "placed"
            assert all(isinstance(m, PlacedExperts) for m in offload.modules.values())
            tiers = offload.tiers()
            assert tiers["host-lease"] == offload.stats.bytes_offloaded  # all leased
            assert torch.equal(generate(model), want)
            assert offload.stats.experts_fetched == 0  # read in place: nothing fetched
        finally:
            offload.close()


def test_placed_experts_without_borrowing_read_the_host_copy(plain_node):
    model = qwen_moe()
    with plain_node.connect() as client:
        want = generate(qwen_moe())
        offload = offload_experts(model, client, fraction=0.5, placement="placed", borrow_bytes=0)
        try:
            assert offload.tiers()["host"] == offload.stats.bytes_offloaded
            assert plain_node.json("leases") == []
            assert torch.equal(generate(model), want)
        finally:
            offload.close()


@pytest.mark.parametrize("compute", ["eager", "grouped"])
def test_revocations_mid_generation_remap_and_change_no_token(plain_node, compute):
    model = qwen_moe()
    with plain_node.connect() as client:
        want = _want(client, qwen_moe, compute, tokens=16)
        offload = offload_experts(
            model,
            client,
            fraction=0.5,
            placement="placed",
            slab_bytes=64 << 10,
            compute=compute,
            refill_every=None,
        )
        placed = [
            p
            for m in offload.modules.values()
            if isinstance(m, PlacedExperts)
            for p in m.placed or ()
        ]
        leases = [lease for p in placed for lease in p.leases()]
        assert len(leases) >= 4
        calls = {"n": 0}
        revoked = threading.Event()

        def revoke_some(module, args, output):
            calls["n"] += 1
            if calls["n"] == 3:
                for lease in leases[:3]:
                    plain_node.cli("revoke", lease.id, check=True)
                wait_for(lambda: sum(p.revocations for p in placed) >= 3, what="the remaps")
                revoked.set()

        hook = model.register_forward_hook(revoke_some)
        got = generate(model, tokens=16)
        hook.remove()
        try:
            assert revoked.is_set()
            assert torch.equal(got, want)
            assert offload.tiers()["host"] > 0  # the remapped experts read the host copy
            assert sum(p.refill() for p in placed) > 0  # lenders have room again
            assert offload.tiers()["host"] == 0
            assert torch.equal(generate(model, tokens=16), want)
        finally:
            offload.close()
        wait_for(lambda: plain_node.json("leases") == [], what="the leases given back")


def test_placement_is_checked(plain_node):
    with plain_node.connect() as client:
        with pytest.raises(InvalidArgument):
            offload_experts(qwen_moe(), client, placement="elsewhere")


def test_auto_placement_is_the_copy_path_on_the_cpu(plain_node):
    with plain_node.connect() as client:
        offload = offload_experts(mixtral(), client, fraction=0.5)  # placement="auto"
        assert offload.placement == "copy" and offload.cache is not None
        offload.close()
