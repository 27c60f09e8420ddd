"""KV cache blocks in borrowed memory on a GPU: HarvestCache on CUDA VMM leases and on
pinned host leases gives DynamicCache's tokens and logits, also through a revocation;
KVBlockStore loads from GPU leases into a paged tensor on the GPU.

Two block sizes: small blocks (one gather kernel per slab from either tier) and blocks of
2 MiB and more (one copy each from host leases, on the copy engine; from GPU leases one
gather kernel straight into the staging rows)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from support.nodes import started_node
from support.waiting import wait_for

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEVICE = "cuda:0"


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
        "1GiB",
        "--host-bytes",
        "512MiB",
        "--ttl",
        "5",
        "--grace",
        "1",
    ) as n:
        yield n


def tiny_llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(DEVICE).eval()


def tiny_opt() -> torch.nn.Module:
    cfg = transformers.OPTConfig(
        vocab_size=256,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(cfg).to(DEVICE).eval()


def wide_llama() -> torch.nn.Module:
    """8 KV heads of 128 in bfloat16, as Llama-3-8B: a 256-token block of 2 sequences is
    2 MiB (K and V)."""
    cfg = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).to(DEVICE, torch.bfloat16).eval()


CASES = {  # model, block tokens, prompt tokens
    "llama-small-blocks": (tiny_llama, 16, 150),
    "opt-small-blocks": (tiny_opt, 16, 150),
    "llama-2MiB-blocks": (wide_llama, 256, 1000),  # a block seals while decoding
}


def generate(model, cache=None, prompt: int = 150, tokens: int = 40):
    torch.manual_seed(1)
    ids = torch.randint(3, 256, (2, prompt), device=DEVICE)
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            pad_token_id=0,
            past_key_values=cache,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("backend,tier", [("cuda-vmm", "gpu-lease"), ("host", "host-lease")])
@pytest.mark.parametrize("case", list(CASES))
def test_tokens_and_logits_equal_dynamic_cache(node, case, backend, tier):
    from client.kv import HarvestCache

    build, block, prompt = CASES[case]
    model = build()
    want_tokens, want_logits = generate(model, prompt=prompt)
    with node.connect() as client:
        cache = HarvestCache(
            client,
            block_tokens=block,
            config=model.config,
            backends=(backend,),
            slab_bytes=32 << 20,
            borrow_bytes=256 << 20,
            placement="copy",
        )
        tokens, logits = generate(model, cache, prompt=prompt)
        torch.cuda.synchronize()
        assert torch.equal(tokens, want_tokens)
        # Same values reach the same kernels in the same layout: equal, not just close.
        assert torch.equal(logits, want_logits), (logits - want_logits).abs().max().item()
        stats = cache.stats
        assert set(stats.tier_bytes) == {tier}
        assert set(stats.reads) == {tier} and stats.bytes_fetched > 0
        cache.close()


@pytest.mark.parametrize("backend", ["cuda-vmm", "host"])
def test_revocation_mid_generation_changes_no_token(node, backend):
    from client.kv import HarvestCache

    model = wide_llama()
    want_tokens, want_logits = generate(model, prompt=1000)
    with node.connect() as client:
        cache = HarvestCache(
            client,
            block_tokens=256,
            config=model.config,
            backends=(backend,),
            slab_bytes=8 << 20,
            refill_every=None,
            placement="copy",
        )
        calls = {"n": 0}

        def revoke_all(module, args, output):
            calls["n"] += 1
            if calls["n"] == 5:
                slabs = list(cache.cache._slabs.slabs)
                for slab in slabs:
                    node.cli("revoke", slab.lease.id, check=True)
                wait_for(lambda: cache.stats.revocations >= len(slabs), what="revocations")

        hook = model.register_forward_hook(revoke_all)
        tokens, logits = generate(model, cache, prompt=1000)
        hook.remove()
        assert torch.equal(tokens, want_tokens) and torch.equal(logits, want_logits)
        assert cache.stats.revocations >= 1 and cache.stats.reads.get("host", 0) > 0
        assert cache.cache.refill() > 0
        cache.close()


def test_block_store_loads_from_gpu_leases_into_any_slots(node):
    from client.cache import Tier
    from client.kv.blocks import KVBlockStore

    shape = (2, 16, 8, 128)  # a page: K and V of 16 tokens, 8 heads of 128 (64 KiB)
    page_bytes = 2 * 16 * 8 * 128 * 2
    with node.connect() as client:
        store = KVBlockStore(
            client,
            page_bytes,
            device=DEVICE,
            backends=("cuda-vmm",),
            slab_bytes=4 << 20,
            refill_every=None,
        )
        blocks = torch.randn((96, *shape), device=DEVICE).to(torch.bfloat16)
        store.put(range(96), blocks)
        assert {store.tier_of(b) for b in range(96)} == {Tier.GPU_LEASE}
        paged = torch.zeros((200, *shape), dtype=torch.bfloat16, device=DEVICE)
        slots = torch.randperm(200)[:96]
        store.load(range(96), paged, slots=slots)
        assert torch.equal(paged[slots.to(DEVICE)], blocks)
        store.load(range(10, 20), paged, slots=range(0, 10))
        assert torch.equal(paged[:10], blocks[10:20])
        slab = store.cache._slabs.slabs[0]
        node.cli("revoke", slab.lease.id, check=True)
        wait_for(lambda: store.cache.stats.revocations == 1, what="revocation")
        paged.zero_()
        store.load(range(96), paged, slots=range(50, 146))
        assert torch.equal(paged[50:146], blocks)
        store.close()
