"""MoE experts behind the cache, on host leases (the CPU twin of peer GPU memory): the
tokens out are those of the model with every expert resident, through revocations."""

from __future__ import annotations

import copy
import threading
from typing import TYPE_CHECKING

import pytest
from support.ill_typed import ill_typed
from support.waiting import wait_for

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from client.moe import find_experts, offload_experts  # noqa: E402
from harvestd.errors import InvalidArgument  # noqa: E402


def mixtral() -> torch.nn.Module:
    cfg = transformers.MixtralConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        experts_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).eval()


def qwen_moe(expert_width: int = 32) -> torch.nn.Module:
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=expert_width,
        shared_expert_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=16,
        num_experts_per_tok=4,
        max_position_embeddings=256,
        experts_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.Qwen2MoeForCausalLM(cfg).eval()


def qwen_moe_unaligned() -> torch.nn.Module:
    """Rows of 30 floats: torch's grouped GEMM refuses strides that are not multiples of
    16 bytes, so the grouped module falls back to one matmul per expert."""
    return qwen_moe(expert_width=30)


def generate(model: torch.nn.Module, tokens: int = 12) -> torch.Tensor:
    assert isinstance(model, transformers.GenerationMixin)
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (3, 10))
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
        )


def _experts_in(module: torch.nn.Module) -> int:
    """How many experts a fused experts module holds: the rows of its ``gate_up_proj``."""
    weight = module.gate_up_proj
    assert isinstance(weight, torch.Tensor)
    return weight.shape[0]


@pytest.mark.parametrize("build", [mixtral, qwen_moe], ids=["mixtral", "qwen2-moe"])
@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_tokens_identical_to_every_expert_resident(plain_node, build, fraction):
    reference = build()
    want = generate(reference)
    model = copy.deepcopy(reference)
    experts = sum(_experts_in(m) for m in find_experts(model).values())
    with plain_node.connect() as client:
        offload = offload_experts(
            model, client, fraction=fraction, slab_bytes=1 << 20, backends=("host",)
        )
        assert offload.stats.experts_offloaded == sum(
            max(1, round(fraction * m.num_experts)) if fraction else 0
            for m in offload.modules.values()
        )
        resident = sum(m.gate_up_proj.shape[0] for m in offload.modules.values())
        assert resident == experts - offload.stats.experts_offloaded
        got = generate(model)
        assert torch.equal(got, want)
        reads = offload.cache.stats.hits
        if fraction == 0:  # the same code with every expert resident: nothing moves
            assert reads == {} and offload.stats.experts_fetched == 0
        else:
            assert reads.get("host-lease", 0) > 0 and offload.stats.experts_fetched > 0
            assert set(reads) == {"host-lease"}  # every routed offloaded expert from a lease
        offload.close()


@pytest.mark.parametrize("compute", ["eager", "grouped"])
def test_revocations_mid_generation_change_no_token(plain_node, compute):
    reference = qwen_moe()
    model = copy.deepcopy(reference)
    with plain_node.connect() as client:
        want = (
            generate(reference, tokens=16)
            if compute == "eager"
            else _grouped_reference(client, qwen_moe, tokens=16)
        )
        offload = offload_experts(
            model,
            client,
            fraction=0.5,
            slab_bytes=256 << 10,
            backends=("host",),
            refill_every=None,
            compute=compute,
        )
        slabs = list(offload.cache._slabs.slabs)
        assert len(slabs) >= 2
        calls = {"n": 0}
        revoked = threading.Event()

        def revoke_some(module, args, output):
            calls["n"] += 1
            if calls["n"] == 3:  # mid-generation: the broker revokes two slabs' leases
                for slab in slabs[:2]:
                    plain_node.cli("revoke", slab.lease.id, check=True)
                wait_for(lambda: offload.cache.stats.revocations >= 2, what="revocations")
                revoked.set()

        hook = model.register_forward_hook(revoke_some)
        got = generate(model, tokens=16)
        hook.remove()
        assert revoked.is_set()
        assert torch.equal(got, want)
        stats = offload.cache.stats
        assert stats.revocations >= 2
        assert stats.hits.get("host", 0) > 0  # read from the authoritative copy meanwhile
        assert offload.cache.refill() > 0  # lenders have room again: back into leases
        assert all(
            offload.cache.tier_of((name, e)).value == "host-lease"
            for name, m in offload.modules.items()
            for e in m.offloaded
        )
        assert torch.equal(generate(model, tokens=16), want)
        offload.close()


@pytest.mark.parametrize("n", [8, 5], ids=["aligned", "unaligned-fallback"])
def test_grouped_mm_is_one_matmul_per_group(n):
    from client.moe.compute import grouped_mm

    torch.manual_seed(2)
    x, weight = torch.randn(7, 4), torch.randn(3, 4, n)
    offsets = torch.tensor([2, 2, 7], dtype=torch.int32)  # group 1 is empty
    want = torch.cat([x[:2] @ weight[0], x[2:] @ weight[2]])
    assert torch.allclose(grouped_mm(x, weight, offsets), want)


def _grouped_reference(client, build, tokens: int = 12):
    """Tokens of the model with every expert resident, computed grouped: the reference
    of ``compute="grouped"``."""
    model = build()
    offload = offload_experts(model, client, fraction=0.0, backends=("host",), compute="grouped")
    try:
        return generate(model, tokens)
    finally:
        offload.close()


def test_grouped_resident_equals_transformers_grouped_mm(plain_node):
    """With nothing offloaded, the grouped module is transformers' grouped_mm experts
    (on the CPU kernel, exactly): same tokens."""
    reference = qwen_moe()
    assert isinstance(reference, transformers.PreTrainedModel)
    reference.set_experts_implementation("grouped_mm")
    want = generate(reference)
    with plain_node.connect() as client:
        assert torch.equal(_grouped_reference(client, qwen_moe), want)


@pytest.mark.parametrize(
    "build",
    [mixtral, qwen_moe, qwen_moe_unaligned],
    ids=["mixtral", "qwen2-moe", "qwen2-moe-unaligned"],
)
@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_grouped_tokens_identical_to_every_expert_resident(plain_node, build, fraction):
    with plain_node.connect() as client:
        want = _grouped_reference(client, build)
        model = build()
        offload = offload_experts(
            model,
            client,
            fraction=fraction,
            slab_bytes=1 << 20,
            backends=("host",),
            compute="grouped",
        )
        assert all(m.compute.value == "grouped" for m in offload.modules.values())
        assert torch.equal(generate(model), want)
        assert offload.cache.stats.hits.get("host-lease", 0) > 0
        assert offload.stats.experts_fetched > 0
        offload.close()


def test_offload_without_leases_still_right(plain_node):
    """No lender has room: every expert is served from its pinned host copy."""
    reference = mixtral()
    want = generate(reference)
    model = copy.deepcopy(reference)
    with plain_node.connect() as client:
        offload = offload_experts(
            model, client, fraction=0.5, borrow_bytes=0, backends=("host",), refill_every=None
        )
        assert torch.equal(generate(model), want)
        assert set(offload.cache.stats.hits) == {"host"}
        offload.close()


def test_bad_arguments(plain_node):
    with plain_node.connect() as client:
        for fraction in (-0.5, 1.5, float("nan"), "half", True):
            with pytest.raises(InvalidArgument, match="fraction"):
                offload_experts(mixtral(), client, fraction=ill_typed(fraction))
        with pytest.raises(InvalidArgument, match="no MoE experts"):
            offload_experts(torch.nn.Linear(4, 4), client)
        with pytest.raises(InvalidArgument, match="compute must be one of"):
            offload_experts(mixtral(), client, compute="fused")
        with pytest.raises(InvalidArgument, match="must lie in"):
            offload_experts(mixtral(), client, select=lambda name, n, k: [n + 3])
