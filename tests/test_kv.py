"""KV cache blocks in borrowed memory, on host leases (the CPU twin of peer GPU memory):
generation with HarvestCache gives DynamicCache's tokens and logits bit for bit (tolerance
zero: the same values reach the same kernels in the same layout), through revocations;
KVBlockStore round trips and refuses bad input."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from support.ill_typed import ill_typed
from support.waiting import wait_for

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from client.cache import Tier  # noqa: E402
from client.kv import HarvestCache  # noqa: E402
from client.kv.blocks import KVBlockStore  # noqa: E402
from harvestd.errors import FailedPrecondition, InvalidArgument  # noqa: E402

BLOCK = 8  # tokens per block: the prompt spans several blocks, decoding fills more
PROMPT = 45
NEW = 24
SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=512,
)


def llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(intermediate_size=128, num_key_value_heads=2, **SMALL)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def mistral() -> torch.nn.Module:
    cfg = transformers.MistralConfig(
        intermediate_size=128, num_key_value_heads=2, sliding_window=None, **SMALL
    )
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(cfg).eval()


def qwen2() -> torch.nn.Module:
    cfg = transformers.Qwen2Config(intermediate_size=128, num_key_value_heads=2, **SMALL)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).eval()


def opt() -> torch.nn.Module:
    cfg = transformers.OPTConfig(ffn_dim=128, word_embed_proj_dim=64, **SMALL)
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(cfg).eval()


def prompt(batch: int = 2, length: int = PROMPT) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randint(3, 128, (batch, length))


def generate(
    model: torch.nn.Module, cache=None, tokens: int = NEW, ids=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and the logits of every step."""
    assert isinstance(model, transformers.GenerationMixin)
    ids = prompt() if ids is None else ids
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


def harvest(client, model, **kwargs) -> HarvestCache:
    options = dict(
        block_tokens=BLOCK,
        config=model.config,
        backends=("host",),
        slab_bytes=16 << 10,
        refill_every=None,
    )
    options.update(kwargs)
    return HarvestCache(client, **options)


@pytest.mark.parametrize(
    "build", [llama, mistral, qwen2, opt], ids=["llama", "mistral", "qwen2", "opt"]
)
def test_generate_same_tokens_and_logits_as_dynamic_cache(plain_node, build):
    model = build()
    want_tokens, want_logits = generate(model)
    with plain_node.connect() as client:
        cache = harvest(client, model)
        tokens, logits = generate(model, cache)
        assert torch.equal(tokens, want_tokens)
        assert torch.equal(logits, want_logits)  # tolerance zero
        stats = cache.stats
        assert stats.tokens == PROMPT + NEW - 1
        assert stats.blocks == stats.layers * (stats.tokens // BLOCK)
        assert stats.tier_bytes == {"host-lease": stats.stored_bytes}
        assert set(stats.reads) == {"host-lease"} and stats.bytes_fetched > 0
        assert stats.redone_rows == 0 and stats.revocations == 0
        # The device keeps a tail per layer and buffers for one layer at a time (two
        # staging, K and V work; each at most twice its need): not every layer's K/V.
        block_bytes = stats.stored_bytes // stats.blocks
        one_layer = (stats.tokens // BLOCK + 1) * block_bytes
        assert stats.device_bytes <= stats.layers * block_bytes + 2 * (2 + 1) * one_layer
        cache.close()
        assert cache.closed and client.leases() == []


def test_manual_decode_loop_chunked_prefill_and_crop(plain_node):
    """Forward calls by hand (no config: the layer count is learned on the second
    pass), a prefill in chunks that straddle blocks, a crop back into a stored block."""
    model = llama()
    ids = prompt(batch=3, length=30)
    with plain_node.connect() as client:
        ours = harvest(client, model, config=None)
        theirs = transformers.DynamicCache()

        def step(inputs: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                a = model(inputs, past_key_values=ours, use_cache=True).logits
                b = model(inputs, past_key_values=theirs, use_cache=True).logits
            assert torch.equal(a, b)
            return a[:, -1:].argmax(-1)

        for lo, hi in ((0, 13), (13, 14), (14, 30)):  # 13 tokens: a block and a tail
            token = step(ids[:, lo:hi])
        for _ in range(12):
            token = step(token)
        assert ours.get_seq_length() == theirs.get_seq_length() == 42
        for cut in (-3, -BLOCK - 2):  # within the tail; then back into a stored block
            ours.crop(cut)
            theirs.crop(cut)
            assert ours.get_seq_length() == theirs.get_seq_length()
            for _ in range(4):
                token = step(token)
        assert ours.stats.fetches > 0 and ours.stats.reads.get("host-lease", 0) > 0
        ours.reset()
        assert ours.get_seq_length() == 0 and ours.stats.blocks == 0
        theirs = transformers.DynamicCache()
        step(prompt(batch=1, length=20))  # a new batch size after reset
        ours.close()


def _revoke_all_at_third_call(node, model, cache, revoked: list[str]):
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:  # mid-generation: the broker revokes every slab we hold
            slabs = list(cache.cache._slabs.slabs)
            for slab in slabs:
                node.cli("revoke", slab.lease.id, check=True)
                revoked.append(slab.lease.id)
            wait_for(lambda: cache.stats.revocations >= len(slabs), what="revocations")

    return model.register_forward_hook(hook)


def test_revocations_mid_generation_change_no_token(plain_node):
    model = llama()
    want_tokens, want_logits = generate(model)
    with plain_node.connect() as client:
        cache = harvest(client, model)
        revoked: list[str] = []
        hook = _revoke_all_at_third_call(plain_node, model, cache, revoked)
        tokens, logits = generate(model, cache)
        hook.remove()
        assert len(revoked) >= 2
        assert torch.equal(tokens, want_tokens) and torch.equal(logits, want_logits)
        stats = cache.stats
        assert stats.revocations == len(revoked)
        assert stats.reads.get("host", 0) > 0  # the authoritative copies meanwhile
        assert stats.reads.get("host-lease", 0) > 0  # new blocks found new leases
        # The fetch waiting for the next step was finished by the watchdog, not held
        # until the fence: no read was overlapped.
        assert stats.released_idle >= 1 and stats.redone_rows == 0
        assert cache.cache.refill() > 0  # lenders have room again: blocks move back up
        assert set(cache.stats.tier_bytes) == {"host-lease"}
        cache.close()


def test_fence_under_an_unfinished_fetch_reads_the_blocks_again(plain_node):
    """No watchdog: the next step's fetch holds its leases in use while the generation
    waits in a hook; the revocation fences under it after the grace period, and those
    blocks are read again from their host copies before anything uses them."""
    model = opt()
    want_tokens, want_logits = generate(model)
    with plain_node.connect() as client:
        cache = harvest(client, model, release_idle_s=None)
        revoked: list[str] = []
        hook = _revoke_all_at_third_call(plain_node, model, cache, revoked)
        tokens, logits = generate(model, cache)
        hook.remove()
        assert torch.equal(tokens, want_tokens) and torch.equal(logits, want_logits)
        assert cache.stats.redone_rows > 0
        assert cache.cache.stats.fallbacks > 0
        cache.close()


def test_without_leases_still_right(plain_node):
    model = qwen2()
    want = generate(model)
    with plain_node.connect() as client:
        cache = harvest(client, model, borrow_bytes=0)
        got = generate(model, cache)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert set(cache.stats.reads) == {"host"}
        assert cache.stats.leased_bytes == 0
        cache.close()


def test_unsupported_uses_are_refused(plain_node):
    with plain_node.connect() as client:
        with pytest.raises(InvalidArgument, match="sliding_attention"):
            HarvestCache(client, config=transformers.MistralConfig(**SMALL))  # window 4096
        with pytest.raises(InvalidArgument, match="block_tokens"):
            HarvestCache(client, block_tokens=0)
        model = llama()
        assert isinstance(model, transformers.GenerationMixin)
        cache = harvest(client, model)
        with pytest.raises(InvalidArgument, match="beam search"):
            with torch.no_grad():
                model.generate(
                    prompt(),
                    max_new_tokens=4,
                    num_beams=2,
                    do_sample=False,
                    past_key_values=cache,
                    pad_token_id=0,
                )
        cache = harvest(client, model)
        k = torch.zeros(2, 2, 5, 16)
        with pytest.raises(InvalidArgument, match="same shape"):
            cache.update(k, torch.zeros(2, 2, 5, 8), 0)
        cache.update(k, k, 0)
        with pytest.raises(InvalidArgument, match="reset"):
            cache.update(torch.zeros(3, 2, 1, 16), torch.zeros(3, 2, 1, 16), 0)
        with pytest.raises(InvalidArgument, match="beam search"):
            cache.reorder_cache(torch.tensor([1, 0]))
        with pytest.raises(FailedPrecondition):
            cache.layers[0].update(k, k)
        cache.close()
        with pytest.raises(FailedPrecondition, match="closed"):
            cache.update(k, k, 0)


# ------------------------------------------------------------ KVBlockStore


def pages(n: int, seed: int) -> torch.Tensor:
    """``n`` vLLM-style pages: [n, 2 (K, V), 4 tokens, 2 heads, 16 dims] in bfloat16."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((n, 2, 4, 2, 16), generator=gen).to(torch.bfloat16)


PAGE_BYTES = 2 * 4 * 2 * 16 * 2


def test_block_store_round_trips_into_any_slots(plain_node):
    with plain_node.connect() as client:
        store = KVBlockStore(
            client,
            PAGE_BYTES,
            borrow_bytes=8 << 10,
            slab_bytes=8 << 10,
            backends=("host",),
            refill_every=None,
        )
        blocks = pages(24, seed=0)
        store.put(list(range(100, 124)), blocks)  # one batched write
        assert len(store) == 24 and 100 in store and 99 not in store
        tiers = [store.tier_of(b) for b in range(100, 124)]
        assert tiers.count(Tier.HOST_LEASE) == 16 and tiers.count(Tier.HOST) == 8  # budget
        paged = torch.zeros((40, 2, 4, 2, 16), dtype=torch.bfloat16)
        store.load([105, 101, 123, 110], paged, slots=[7, 0, 31, 12])  # arbitrary slots
        for block, slot in ((105, 7), (101, 0), (123, 31), (110, 12)):
            assert torch.equal(paged[slot], blocks[block - 100])
        assert paged[1].abs().sum() == 0  # nothing else written
        store.load(torch.arange(100, 124), paged, slots=torch.arange(16, 40))  # consecutive
        assert torch.equal(paged[16:40], blocks)
        store.put([101], pages(1, seed=9))  # replaces
        store.load([101], paged, slots=[3])
        assert torch.equal(paged[3], pages(1, seed=9)[0])
        store.drop([100, 101])
        assert len(store) == 22
        with pytest.raises(KeyError, match="no block 100"):
            store.load([100], paged, slots=[0])
        raw = torch.empty((2, PAGE_BYTES), dtype=torch.uint8)  # rows of bytes work too
        store.load([102, 103], raw, slots=[1, 0])
        assert torch.equal(raw[1], blocks[2].view(-1).view(torch.uint8))
        stats = store.stats
        assert stats.blocks == 22 and sum(stats.tier_blocks.values()) == 22
        store.close()


def test_block_store_survives_revocation(plain_node):
    with plain_node.connect() as client:
        store = KVBlockStore(
            client, PAGE_BYTES, slab_bytes=8 << 10, backends=("host",), refill_every=None
        )
        blocks = pages(12, seed=3)
        store.put(range(12), blocks)
        slab = store.cache._slabs.slabs[0]
        plain_node.cli("revoke", slab.lease.id, check=True)
        wait_for(lambda: store.cache.stats.revocations == 1, what="the revocation")
        assert Tier.HOST in {store.tier_of(b) for b in range(12)}
        paged = torch.zeros((12, 2, 4, 2, 16), dtype=torch.bfloat16)
        store.load(range(12), paged, slots=list(range(11, -1, -1)))
        assert torch.equal(paged.flip(0), blocks)
        assert store.cache.refill() > 0
        assert {store.tier_of(b) for b in range(12)} == {Tier.HOST_LEASE}
        store.close()


def test_block_store_refuses_bad_input(plain_node):
    with plain_node.connect() as client:
        for bad in (0, -4, 2.5, True, "64"):
            with pytest.raises(InvalidArgument, match="block_bytes"):
                KVBlockStore(client, ill_typed(bad))
        store = KVBlockStore(client, PAGE_BYTES, backends=("host",), refill_every=None)
        with pytest.raises(InvalidArgument, match="bytes; blocks of this store are"):
            store.put([1], torch.zeros((1, 2, 4, 2, 8), dtype=torch.bfloat16))
        with pytest.raises(InvalidArgument, match="2 rows; 3 are needed"):
            store.put([1, 2, 3], pages(2, seed=0))
        with pytest.raises(InvalidArgument, match="distinct"):
            store.put([1, 1], pages(2, seed=0))
        with pytest.raises(InvalidArgument, match="ints"):
            store.put([ill_typed(1.5)], pages(1, seed=0))
        with pytest.raises(InvalidArgument, match="contiguous"):
            store.put([1, 2], pages(2, seed=0).transpose(1, 2))
        store.put([1, 2], pages(2, seed=0))
        paged = torch.zeros((4, 2, 4, 2, 16), dtype=torch.bfloat16)
        with pytest.raises(KeyError, match="no block 7"):
            store.load([1, 7], paged, slots=[0, 1])
        with pytest.raises(InvalidArgument, match="outside dst's 4 rows"):
            store.load([1], paged, slots=[4])
        with pytest.raises(InvalidArgument, match="2 block ids but 1 slots"):
            store.load([1, 2], paged, slots=[0])
        with pytest.raises(InvalidArgument, match="slots must be distinct"):
            store.load([1, 2], paged, slots=[0, 0])
        with pytest.raises(InvalidArgument, match="bytes; blocks of this store are"):
            store.load([1], torch.zeros((4, 16), dtype=torch.bfloat16), slots=[0])
        with pytest.raises(KeyError, match="no block 9"):
            store.drop([1, 9])
        assert 1 in store  # all or none
        with pytest.raises(KeyError, match="no block 5"):
            store.tier_of(5)
        store.close()
        with pytest.raises(FailedPrecondition, match="closed"):
            store.put([3], pages(1, seed=0))
