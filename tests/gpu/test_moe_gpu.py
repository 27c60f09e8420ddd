"""MoE experts in borrowed GPU and host memory on a real GPU: the tokens out equal the
all-resident model's, with a revocation mid-generation too."""

from __future__ import annotations

import copy

import pytest
from support.nodes import started_node
from support.waiting import wait_for

pytest.importorskip("cuda.bindings")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def node():
    with started_node(
        # Other test modules' processes come and go on this GPU: their peaks are not
        # the tenant this module is about.
        "--peak-window",
        "0",
        "--backend",
        "cuda-vmm",
        "--cap",
        "2GiB",
        "--host-bytes",
        "1GiB",
        "--ttl",
        "10",
        "--grace",
        "1",
    ) as n:
        yield n


def qwen_moe():
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=16,
        num_experts_per_tok=4,
        max_position_embeddings=512,
        experts_implementation="eager",
    )
    torch.manual_seed(0)
    with torch.device("cuda:0"):
        return transformers.Qwen2MoeForCausalLM(cfg).to(torch.bfloat16).eval()


def generate(model, tokens: int = 16):
    torch.manual_seed(1)
    ids = torch.randint(0, 512, (4, 12), device="cuda:0")
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
        )


@pytest.mark.parametrize("backend,tier", [("cuda-vmm", "gpu-lease"), ("host", "host-lease")])
def test_experts_in_leases_give_the_resident_tokens(node, backend, tier):
    from client.moe import offload_experts

    reference = qwen_moe()
    want = generate(reference)
    model = copy.deepcopy(reference)
    with node.connect() as client:
        offload = offload_experts(
            model, client, fraction=0.5, backends=(backend,), slab_bytes=8 << 20, placement="copy"
        )
        assert torch.equal(generate(model), want)
        assert set(offload.cache.stats.hits) == {tier}
        offload.close()


def test_revocation_mid_generation_on_gpu_leases(node):
    from client.moe import offload_experts

    reference = qwen_moe()
    want = generate(reference, tokens=24)
    model = copy.deepcopy(reference)
    with node.connect() as client:
        offload = offload_experts(
            model,
            client,
            fraction=0.5,
            backends=("cuda-vmm",),
            slab_bytes=4 << 20,
            refill_every=None,
            placement="copy",
        )
        slabs = list(offload.cache._slabs.slabs)
        calls = {"n": 0}

        def revoke(module, args, output):
            calls["n"] += 1
            if calls["n"] == 4:
                for slab in slabs[:2]:
                    node.cli("revoke", slab.lease.id, check=True)
                wait_for(lambda: offload.cache.stats.revocations >= 2, what="revocations")

        hook = model.register_forward_hook(revoke)
        assert torch.equal(generate(model, tokens=24), want)
        hook.remove()
        assert offload.cache.stats.hits.get("host", 0) > 0
        assert offload.cache.refill() > 0
        assert torch.equal(generate(model, tokens=24), want)
        offload.close()


@pytest.mark.parametrize("backend,tier", [("cuda-vmm", "gpu-lease"), ("host", "host-lease")])
def test_grouped_experts_in_leases_give_the_grouped_resident_tokens(node, backend, tier):
    """``compute="grouped"`` on the GPU (torch's grouped GEMM, bf16): the same tokens as
    the same module with nothing offloaded, and as transformers' grouped_mm experts."""
    from client.moe import offload_experts

    base = qwen_moe()
    base.set_experts_implementation("grouped_mm")
    transformers_grouped = generate(base)
    base.set_experts_implementation("eager")
    with node.connect() as client:
        resident = copy.deepcopy(base)
        ceiling = offload_experts(
            resident, client, fraction=0.0, backends=(backend,), compute="grouped"
        )
        want = generate(resident)
        ceiling.close()
        assert torch.equal(want, transformers_grouped)
        model = copy.deepcopy(base)
        offload = offload_experts(
            model,
            client,
            fraction=0.5,
            backends=(backend,),
            slab_bytes=8 << 20,
            compute="grouped",
            placement="copy",
        )
        assert torch.equal(generate(model), want)
        assert set(offload.cache.stats.hits) == {tier}
        offload.close()
