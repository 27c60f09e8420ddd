"""The KV cache on placed tensors (``HarvestCache(placement="placed")``), on host leases
(the CPU twin): attention reads each layer's K/V where they lie, through views of one
placed tensor per layer, and generation gives DynamicCache's tokens and logits bit for
bit, through revocations at chosen and at random moments; a view alive holds off the
remap under it; bad input is refused."""

from __future__ import annotations

import random
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from support.ill_typed import ill_typed
from support.waiting import wait_for

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_kv import NEW, PROMPT, SMALL, generate, llama, mistral, opt, prompt, qwen2  # noqa: E402

from client.kv import HarvestCache  # noqa: E402
from client.kv.placed import PlacedKV  # noqa: E402
from harvestd.errors import FailedPrecondition, InvalidArgument  # noqa: E402

BLOCK = 8  # the capacity granule without max_tokens
HELD = PROMPT + NEW - 1  # tokens each layer holds at the end of generate
PAGE = 4096


def placed_cache(client, model, **kwargs) -> HarvestCache:
    options = dict(
        placement="placed",
        block_tokens=BLOCK,
        config=model.config,
        backends=("host",),
        chunk_bytes=PAGE,
        slab_bytes=4 * PAGE,  # a few leases per layer: revocations hit some, not all
        refill_every=None,
        max_tokens=HELD + 4,
    )
    options.update(kwargs)
    return HarvestCache(client, **options)


def llama_eager() -> torch.nn.Module:
    """Llama with eager attention (matmul, softmax, matmul) instead of SDPA."""
    model: Any = llama()
    model.set_attn_implementation("eager")
    return model


def placed_of(cache: HarvestCache) -> PlacedKV:
    assert cache.placed is not None
    return cache.placed


@pytest.mark.parametrize(
    "build",
    [llama, llama_eager, mistral, qwen2, opt],
    ids=["llama", "llama-eager", "mistral", "qwen2", "opt"],
)
def test_generate_same_tokens_and_logits_as_dynamic_cache(plain_node, build):
    model = build()
    want_tokens, want_logits = generate(model)
    with plain_node.connect() as client:
        cache = placed_cache(client, model)
        tokens, logits = generate(model, cache)
        assert torch.equal(tokens, want_tokens)
        assert torch.equal(logits, want_logits)  # tolerance zero, from strided views
        placed = placed_of(cache)
        stats = cache.stats
        assert stats.tokens == HELD and stats.blocks == 0
        layer_bytes = sum(p.nbytes for p in placed.tensors())
        assert stats.tier_bytes.get("host-lease", 0) > 0  # read where they lie
        assert sum(stats.tier_bytes.values()) == layer_bytes
        if set(stats.tier_bytes) != {"host-lease"}:
            # Under load a lease can expire (the test node's TTL is 2 s): the host copy
            # served meanwhile, and a refill leases it again.
            assert placed.refill() > 0
        assert cache.stats.tier_bytes == {"host-lease": layer_bytes}
        assert stats.stored_bytes == stats.layers * HELD * placed.layers[0].token_bytes
        assert stats.device_bytes == 0 and stats.bytes_fetched == 0 and stats.fetches == 0
        assert cache.stats.leased_bytes >= layer_bytes
        assert cache.cache is None and placed.regrown == 0
        assert all(layer.capacity == HELD + 4 for layer in placed.layers)
        assert all(not layer.holds for layer in placed.layers)  # attention let go
        cache.close()
        assert cache.closed and client.leases() == []


def test_views_are_the_placed_tensor_read_in_place(plain_node):
    model = llama()
    with plain_node.connect() as client:
        cache = placed_cache(client, model, config=None)
        k = torch.randn(2, 2, 5, 16)
        v = torch.randn(2, 2, 5, 16)
        keys, values = cache.update(k, v, 0)
        placed = placed_of(cache).tensors()[0]
        assert keys.data_ptr() == placed.tensor.data_ptr()  # no copy: the placed pages
        assert values.data_ptr() == placed.tensor[1].data_ptr()
        capacity = placed.shape[3]
        assert keys.shape == (2, 2, 5, 16) and keys.stride() == (
            2 * capacity * 16,
            capacity * 16,
            16,
            1,
        )
        assert torch.equal(keys, k) and torch.equal(values, v)
        holds = placed_of(cache).layers[0].holds
        assert len(holds) == 1  # one use() block for the two views
        del keys
        assert len(holds) == 1  # V is still alive
        del values
        assert not holds  # the last view's death ended the block
        keys, values = cache.update(k + 1, v + 1, 0)
        assert torch.equal(keys[:, :, 5:], k + 1) and torch.equal(keys[:, :, :5], k)
        assert placed_of(cache).release() == 1  # views left alive: ended by hand
        del keys, values
        cache.close()


def test_capacity_grows_by_doubling_and_keeps_every_token(plain_node):
    model = llama()
    want_tokens, want_logits = generate(model)
    with plain_node.connect() as client:
        cache = placed_cache(client, model, max_tokens=None)
        tokens, logits = generate(model, cache)
        assert torch.equal(tokens, want_tokens) and torch.equal(logits, want_logits)
        placed = placed_of(cache)
        # 45 prompt tokens: 48 (whole blocks of 8), outgrown at token 49: 96.
        assert [layer.capacity for layer in placed.layers] == [96] * 3
        assert placed.regrown == 3
        # The first placed tensors gave their leases back: only the 96-token ones remain.
        leased = sum(lease.nbytes for p in placed.tensors() for lease in p.leases())
        assert {lease.id for lease in client.leases()} == {
            lease.id for p in placed.tensors() for lease in p.leases()
        }
        assert cache.stats.leased_bytes == leased
        cache.close()


def test_manual_decode_loop_chunked_prefill_crop_and_reset(plain_node):
    model = llama()
    ids = prompt(batch=3, length=30)
    with plain_node.connect() as client:
        ours = placed_cache(client, model, config=None, max_tokens=None)
        theirs = transformers.DynamicCache()

        def step(inputs: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                a = model(inputs, past_key_values=ours, use_cache=True).logits
                b = model(inputs, past_key_values=theirs, use_cache=True).logits
            assert torch.equal(a, b)
            return a[:, -1:].argmax(-1)

        for lo, hi in ((0, 13), (13, 14), (14, 30)):
            token = step(ids[:, lo:hi])
        for _ in range(12):
            token = step(token)
        assert ours.get_seq_length() == theirs.get_seq_length() == 42
        for cut in (-3, -BLOCK - 2, 20):  # negative: tokens to drop; positive: to keep
            ours.crop(cut)
            theirs.crop(cut)
            assert ours.get_seq_length() == theirs.get_seq_length()
            for _ in range(4):
                token = step(token)
        ours.reset()
        assert ours.get_seq_length() == 0 and placed_of(ours).tensors() == []
        assert client.leases() == []  # reset gives the placed tensors back
        theirs = transformers.DynamicCache()
        step(prompt(batch=1, length=20))  # a new batch size after reset
        ours.close()


def _revoke_at_third_call(node, model, placed: PlacedKV, count: int, done: list[str]):
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] == 3:  # mid-generation: the broker revokes leases under the K/V
            leases = [lease for p in placed.tensors() for lease in p.leases()][:count]
            for lease in leases:
                node.cli("revoke", lease.id, check=True)
                done.append(lease.id)
            wait_for(lambda: placed.revocations >= len(leases), what="the remaps")

    return model.register_forward_hook(hook)


def test_revocations_mid_generation_change_no_token_and_refill(plain_node):
    model = llama()
    theirs = transformers.DynamicCache()
    want_tokens, want_logits = generate(model, theirs)
    with plain_node.connect() as client:
        cache = placed_cache(client, model)
        placed = placed_of(cache)
        revoked: list[str] = []
        hook = _revoke_at_third_call(plain_node, model, placed, 100, revoked)
        tokens, logits = generate(model, cache)
        hook.remove()
        assert len(revoked) >= 6  # every lease of every layer
        assert torch.equal(tokens, want_tokens) and torch.equal(logits, want_logits)
        stats = cache.stats
        assert stats.revocations >= len(revoked)
        assert stats.tier_bytes == {"host": sum(p.nbytes for p in placed.tensors())}
        assert placed.refill() > 0  # lenders have room again: the K/V move back up
        assert set(cache.stats.tier_bytes) == {"host-lease"}
        # Every token, those written after the remap too, is in the refilled leases.
        for p, layer in zip(placed.tensors(), theirs.layers, strict=True):
            with p.use() as t:
                assert torch.equal(t[0, :, :, :HELD], layer.keys)
                assert torch.equal(t[1, :, :, :HELD], layer.values)
        cache.close()


def test_revocations_at_random_moments_change_no_token(plain_node):
    """Reclaims land at random moments while generate runs (no hook waits for them), the
    background refill leases again between them: the tokens never change."""
    model = opt()
    want_tokens, want_logits = generate(model, tokens=40)
    rng = random.Random(7)
    with plain_node.connect() as client:
        cache = placed_cache(client, model, refill_every=0.02, max_tokens=PROMPT + 40)
        placed = placed_of(cache)
        stop = threading.Event()
        reclaims = []

        def reclaim() -> None:
            while not stop.is_set():
                time.sleep(rng.uniform(0.0, 0.05))
                # All the lender's free memory and a few of our leases' worth more.
                (row,) = client.lenders()
                free = max(0, row.capacity - row.reclaimed - row.granted)
                reclaims.append(client.reclaim(row.id, free + rng.choice([1, 3, 8]) * 4 * PAGE))
                time.sleep(rng.uniform(0.0, 0.03))
                client.restore(row.id)

        thread = threading.Thread(target=reclaim)
        thread.start()
        try:
            tokens, logits = generate(model, cache, tokens=40)
        finally:
            stop.set()
            thread.join()
        assert torch.equal(tokens, want_tokens) and torch.equal(logits, want_logits)
        assert placed.revocations >= 1 and any(r.revoked for r in reclaims)
        wait_for(lambda: cache.stats.tier_bytes.get("host", 0) == 0, what="the refill")
        cache.close()


def test_a_live_view_holds_off_the_remap_under_it(plain_node):
    model = llama()
    with plain_node.connect() as client:
        cache = placed_cache(client, model, config=None)
        k = torch.randn(2, 2, 40, 16)
        keys, values = cache.update(k, -k, 0)
        placed = placed_of(cache)
        leases = placed.tensors()[0].leases()
        assert leases
        revoke = threading.Thread(
            target=plain_node.cli, args=("revoke", leases[0].id), kwargs={"check": True}
        )
        revoke.start()
        wait_for(lambda: leases[0].state == "revoked", what="the revocation to begin")
        time.sleep(1.2)  # past the grace period: the remap still waits for the view
        assert placed.revocations == 0 and placed.tiers()["host"] == 0
        assert torch.equal(keys, k) and torch.equal(values, -k)
        del keys, values  # attention is done with them
        wait_for(lambda: placed.revocations == 1, what="the remap")
        revoke.join()
        assert placed.tiers()["host"] > 0
        keys, values = cache.update(k[:, :, :1], k[:, :, :1], 0)
        assert torch.equal(keys[:, :, :40], k) and torch.equal(values[:, :, :40], -k)
        del keys, values
        cache.close()


def test_without_leases_reads_the_host_copy_in_place(plain_node):
    model = qwen2()
    want = generate(model)
    with plain_node.connect() as client:
        cache = placed_cache(client, model, borrow_bytes=0)
        got = generate(model, cache)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert set(cache.stats.tier_bytes) == {"host"} and cache.stats.leased_bytes == 0
        assert client.leases() == []
        cache.close()
        # A budget of one layer: the first layer leases, the others read the host copy.
        cache = placed_cache(client, model, borrow_bytes=(HELD + 4) * 2 * 2 * 2 * 16 * 4)
        got = generate(model, cache)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert [layer.borrows for layer in placed_of(cache).layers] == [True, False, False]
        cache.close()


def test_bad_input_is_refused(plain_node):
    model = llama()
    with plain_node.connect() as client:
        with pytest.raises(InvalidArgument, match="placement"):
            HarvestCache(client, placement=ill_typed("elsewhere"))
        for bad in (0, -1, 2.5, True):
            with pytest.raises(InvalidArgument, match="max_tokens"):
                HarvestCache(client, placement="placed", max_tokens=ill_typed(bad))
        with pytest.raises(InvalidArgument, match="max_tokens"):
            HarvestCache(client, placement="copy", max_tokens=64)  # no capacity there
        with pytest.raises(InvalidArgument, match="chunk_bytes"):
            HarvestCache(client, placement="placed", chunk_bytes=0)
        with pytest.raises(InvalidArgument, match="slab_bytes"):
            HarvestCache(client, placement="placed", slab_bytes=ill_typed(1.5))
        with pytest.raises(InvalidArgument, match="cache="):
            HarvestCache(client, placement="placed", cache=ill_typed(object()))
        with pytest.raises(InvalidArgument, match="sliding_attention"):
            HarvestCache(client, placement="placed", config=transformers.MistralConfig(**SMALL))
        cache = placed_cache(client, model, max_tokens=8)
        k = torch.zeros(2, 2, 5, 16)
        with pytest.raises(InvalidArgument, match="same shape"):
            cache.update(k, torch.zeros(2, 2, 5, 8), 0)
        with pytest.raises(InvalidArgument, match="layer_idx"):
            cache.update(k, k, -1)
        cache.update(k, k, 0)
        with pytest.raises(InvalidArgument, match="max_tokens=8"):
            cache.update(k, k, 0)  # 10 tokens: past the capacity, nothing written
        assert cache.get_seq_length() == 5
        with pytest.raises(InvalidArgument, match="reset"):
            cache.update(torch.zeros(3, 2, 1, 16), torch.zeros(3, 2, 1, 16), 0)
        with pytest.raises(InvalidArgument, match="reset"):
            cache.update(k.double(), k.double(), 0)
        with pytest.raises(InvalidArgument, match="beam search"):
            cache.reorder_cache(torch.tensor([1, 0]))
        with pytest.raises(InvalidArgument, match="no blocks"):
            cache.tier_of(0, 0)
        assert cache.block_keys(0) == []
        with pytest.raises(FailedPrecondition):
            cache.layers[0].update(k, k)
        assert isinstance(model, transformers.GenerationMixin)
        with pytest.raises(InvalidArgument, match="beam search"):
            with torch.no_grad():
                model.generate(
                    prompt(),
                    max_new_tokens=4,
                    num_beams=2,
                    do_sample=False,
                    past_key_values=placed_cache(client, model),
                    pad_token_id=0,
                )
        cache.close()
        with pytest.raises(FailedPrecondition, match="closed"):
            cache.update(k, k, 0)


def test_auto_placement_is_the_copy_path_on_the_cpu(plain_node):
    with plain_node.connect() as client:
        cache = HarvestCache(client, config=llama().config, max_tokens=64)  # "auto"
        assert cache.placement == "copy"  # which ignores max_tokens
        cache.close()
