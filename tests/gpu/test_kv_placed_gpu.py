"""The KV cache on placed tensors on a GPU (``HarvestCache(placement="placed")``): each
layer's K/V in one placed range on cuda:0, its chunks in CUDA VMM leases (lent by
another process on the same GPU) or in the authoritative host-NUMA copy, read in place
by attention through strided views. The GPU side of tests/test_kv_placed.py: tokens and
logits equal DynamicCache's, through revocations at chosen and at random moments, with
no device memory of the cache's own; and the first thing to check on a new GPU, that the
SDPA kernels give the same bits for a view that differs from a contiguous tensor only in
its batch and head strides. Unrun on a GPU so far (written without one): run it with
scripts/gpu_tests.sh on a lent machine.
"""

from __future__ import annotations

import random
import threading
import time
from typing import TYPE_CHECKING

import pytest
from support.nodes import started_node
from support.waiting import wait_for

from harvestd.sizes import MiB

pytest.importorskip("cuda.bindings")
if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
# The models and generate() of the copy path's GPU tests: the placed cache must give
# what they give.
from test_kv_gpu import generate, tiny_llama, tiny_opt, wide_llama  # noqa: E402

DEVICE = "cuda:0"
CAP = 1 << 30


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
        str(CAP),
        "--host-bytes",
        "512MiB",
        "--ttl",
        "5",
        "--grace",
        "1",
    ) as n:
        yield n


CASES = {"llama": (tiny_llama, 150), "opt": (tiny_opt, 150), "llama-8b-heads": (wide_llama, 1000)}
NEW = 40


def placed_cache(client, model, prompt: int, **kwargs):
    from client.kv import HarvestCache

    options = dict(
        placement="placed",
        config=model.config,
        backends=("cuda-vmm",),
        slab_bytes=4 * MiB,
        refill_every=None,
        max_tokens=prompt + NEW,
    )
    options.update(kwargs)
    return HarvestCache(client, **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sdpa_reads_a_strided_view_as_a_contiguous_tensor(dtype):
    """The placed cache returns ``[:, :, :n]`` of ``[batch, heads, capacity, dim]``:
    same last two strides as DynamicCache's contiguous K/V, other batch and head
    strides. Every SDPA backend that takes both must give the same bits."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    b, h, hk, n, cap, d = 2, 32, 8, 1500, 2048, 128
    buf = torch.randn(2, b, hk, cap, d, device=DEVICE).to(dtype)
    k, v = buf[0, :, :, :n], buf[1, :, :, :n]
    kc, vc = k.contiguous(), v.contiguous()
    differs = []
    names = ("MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")
    backends = [None] + [getattr(SDPBackend, n) for n in names]  # None: torch's own pick
    ran = []
    for q_len in (1, 7):
        q = torch.randn(b, h, q_len, d, device=DEVICE).to(dtype)
        mask = torch.ones(q_len, n, dtype=torch.bool, device=DEVICE).tril(n - q_len)
        for backend in backends:
            for masked in (None, mask):
                name = "default" if backend is None else backend.name
                try:
                    with sdpa_kernel(backends[1:] if backend is None else [backend]):
                        a = torch.nn.functional.scaled_dot_product_attention(
                            q, k, v, attn_mask=masked, enable_gqa=True
                        )
                        c = torch.nn.functional.scaled_dot_product_attention(
                            q, kc, vc, attn_mask=masked, enable_gqa=True
                        )
                except RuntimeError:  # this backend takes neither here
                    continue
                ran.append(name)
                if not torch.equal(a, c):
                    differs.append((name, q_len, masked is not None))
    print(f"{dtype}: compared {sorted(set(ran))}; differ: {differs}")
    assert "default" in ran and differs == []


@pytest.mark.parametrize("borrow", [True, False], ids=["gpu-lease", "host"])
@pytest.mark.parametrize("case", list(CASES))
def test_tokens_and_logits_equal_dynamic_cache(node, case, borrow):
    build, prompt = CASES[case]
    model = build()
    want_tokens, want_logits = generate(model, prompt=prompt)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    with node.connect() as client:
        cache = placed_cache(client, model, prompt, borrow_bytes=(1 << 30) if borrow else 0)
        made = torch.cuda.memory_allocated()
        tokens, logits = generate(model, cache, prompt=prompt)
        torch.cuda.synchronize()
        assert torch.equal(tokens, want_tokens)
        # Same values in the same kernels: equal, not just close.
        assert torch.equal(logits, want_logits), (logits - want_logits).abs().max().item()
        stats = cache.stats
        tier = "gpu-lease" if borrow else "host"
        assert set(stats.tier_bytes) == {tier} and stats.device_bytes == 0
        # No staging, no work buffer: the cache allocated nothing on the device (the
        # outputs of generate are a few KiB).
        assert made == base
        assert torch.cuda.memory_allocated() - base < MiB
        cache.close()


def test_revocation_mid_generation_remaps_and_changes_no_token(node):
    model = wide_llama()
    want_tokens, want_logits = generate(model, prompt=1000)
    with node.connect() as client:
        cache = placed_cache(client, model, 1000)
        placed = cache.placed
        assert placed is not None
        calls = {"n": 0}

        def revoke_all(module, args, output):
            calls["n"] += 1
            if calls["n"] == 5:
                leases = [lease for p in placed.tensors() for lease in p.leases()]
                assert len(leases) >= 4
                for lease in leases:
                    node.cli("revoke", lease.id, check=True)
                wait_for(lambda: placed.revocations >= len(leases), what="the remaps")

        hook = model.register_forward_hook(revoke_all)
        tokens, logits = generate(model, cache, prompt=1000)
        hook.remove()
        assert torch.equal(tokens, want_tokens) and torch.equal(logits, want_logits)
        assert cache.stats.tier_bytes.get("host", 0) > 0
        print("remap ms:", [ms for p in placed.tensors() for ms in p.remap_ms])
        assert placed.refill() > 0
        assert set(cache.stats.tier_bytes) == {"gpu-lease"}
        cache.close()


def test_revocations_at_random_moments_change_no_token(node):
    """The tenant reclaims at random moments while generate runs; the background refill
    leases again in between."""
    model = wide_llama()
    want_tokens, want_logits = generate(model, prompt=1000)
    rng = random.Random(3)
    with node.connect() as client:
        cache = placed_cache(client, model, 1000, refill_every=0.05)
        placed = cache.placed
        assert placed is not None
        stop = threading.Event()

        def reclaim() -> None:
            while not stop.is_set():
                time.sleep(rng.uniform(0.0, 0.1))
                # What the GPU lender has free, and a few MiB of the leases.
                row = next(l for l in client.lenders() if l.gpu_uuid)
                free = max(0, row.capacity - row.reclaimed - row.granted)
                client.reclaim(row.id, free + rng.choice([2, 4, 8]) * MiB)
                time.sleep(rng.uniform(0.0, 0.05))
                client.restore(row.id)

        thread = threading.Thread(target=reclaim)
        thread.start()
        try:
            tokens, logits = generate(model, cache, prompt=1000)
        finally:
            stop.set()
            thread.join()
        assert torch.equal(tokens, want_tokens) and torch.equal(logits, want_logits)
        assert placed.revocations >= 1
        cache.close()


def test_capacity_grows_without_max_tokens(node):
    model = tiny_llama()
    want_tokens, want_logits = generate(model)
    with node.connect() as client:
        cache = placed_cache(client, model, 150, max_tokens=None, block_tokens=16)
        tokens, logits = generate(model, cache)
        assert torch.equal(tokens, want_tokens) and torch.equal(logits, want_logits)
        placed = cache.placed
        assert placed is not None and placed.regrown == 3  # 160 tokens, then 320
        assert {layer.capacity for layer in placed.layers} == {320}
        cache.close()
