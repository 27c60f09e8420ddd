"""Block gather/scatter (client/blocks.py) on the CPU: every path against a naive loop,
and the argument checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from support.ill_typed import ill_typed

from client.blocks import gather, scatter
from harvestd.errors import InvalidArgument


def _random_bytes(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)


def _naive_gather(src: torch.Tensor, offsets: list[int], block: int) -> torch.Tensor:
    return torch.cat([src[o : o + block] for o in offsets]) if offsets else src[:0].clone()


@pytest.mark.parametrize("block", [16, 4096, 16384])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_gather_aligned_blocks_match_a_loop(block, as_tensor):
    src = _random_bytes(64 * block + 5, seed=block)  # a ragged tail must not matter
    offsets = [block * i for i in (63, 0, 7, 7, 31)]
    out = torch.full((len(offsets) * block,), 0xAB, dtype=torch.uint8)  # poisoned
    idx = torch.tensor(offsets) if as_tensor else offsets
    assert gather(src, idx, block, out) is out
    assert torch.equal(out, _naive_gather(src, offsets, block))


@pytest.mark.parametrize(
    "offsets,block",
    [([3, 17, 100, 1], 12), ([8, 24, 40], 16), ([4, 12, 60], 8), ([2, 6, 90], 6), ([0, 5], 5)],
)
def test_gather_unaligned_blocks_match_a_loop(offsets, block):
    src = _random_bytes(123, seed=block)
    out = torch.full((len(offsets) * block,), 0xCD, dtype=torch.uint8)
    gather(src, offsets, block, out)
    assert torch.equal(out, _naive_gather(src, offsets, block))


def test_gather_into_a_typed_out_with_room_to_spare():
    src = _random_bytes(1 << 16, seed=1)
    out = torch.full((4, 1024), -1.0, dtype=torch.float32)  # 16 KiB
    gather(src, [0, 4096], 4096, out)
    got = out.view(torch.uint8).reshape(-1)[:8192]
    assert torch.equal(got, _naive_gather(src, [0, 4096], 4096))
    assert bool((out.reshape(-1)[2048:] == -1.0).all())  # bytes past the blocks untouched


def test_gather_from_a_slice_with_odd_start():
    base = _random_bytes(4096 + 3, seed=2)
    src = base[3:]  # storage offset 3: no wide words possible
    out = torch.empty(3 * 64, dtype=torch.uint8)
    gather(src, [0, 64, 128], 64, out)
    assert torch.equal(out, _naive_gather(src, [0, 64, 128], 64))


@given(data=st.data(), block=st.integers(1, 64), size=st.integers(64, 2048))
@settings(max_examples=60, deadline=None)
def test_gather_and_scatter_agree_with_loops(data, block, size):
    src = _random_bytes(size, seed=size * 131 + block)
    offsets = data.draw(st.lists(st.integers(0, size - block), min_size=0, max_size=20))
    out = torch.zeros(max(1, len(offsets)) * block, dtype=torch.uint8)
    gather(src, offsets, block, out)
    assert torch.equal(out[: len(offsets) * block], _naive_gather(src, offsets, block))

    # Scatter to distinct, non-overlapping slots: the loop's result is then well defined.
    slots = data.draw(st.lists(st.integers(0, size // block - 1), unique=True, max_size=20))
    shift = data.draw(st.integers(0, size - (size // block) * block))
    targets = [s * block + shift for s in slots]
    dst, ref = torch.zeros(size, dtype=torch.uint8), torch.zeros(size, dtype=torch.uint8)
    rows = _random_bytes(max(1, len(targets)) * block, seed=len(targets))
    scatter(dst, rows, targets, block)
    for i, t in enumerate(targets):
        ref[t : t + block] = rows[i * block : (i + 1) * block]
    assert torch.equal(dst, ref)


@pytest.mark.parametrize("block,offsets", [(4096, [0, 8192, 4096]), (12, [1, 40, 77])])
def test_scatter_writes_blocks_and_nothing_else(block, offsets):
    dst = torch.zeros(16 * block, dtype=torch.uint8)
    src = _random_bytes(len(offsets) * block, seed=block)
    scatter(dst, src, torch.tensor(offsets), block)
    ref = torch.zeros_like(dst)
    for i, o in enumerate(offsets):
        ref[o : o + block] = src[i * block : (i + 1) * block]
    assert torch.equal(dst, ref)


def test_round_trip_through_borrowed_bytes():
    lease = torch.zeros(1 << 16, dtype=torch.uint8)
    blocks = _random_bytes(8 * 2048, seed=3).view(8, 2048)
    offsets = [2048 * i for i in (5, 1, 30, 12, 0, 9, 17, 2)]
    scatter(lease, blocks, offsets, 2048)
    back = torch.empty_like(blocks)
    gather(lease, offsets, 2048, back)
    assert torch.equal(back, blocks)


def test_empty_offsets_are_a_no_op():
    src, out = _random_bytes(64, seed=4), torch.zeros(0, dtype=torch.uint8)
    assert gather(src, [], 16, out) is out
    scatter(src, out, torch.empty(0, dtype=torch.int64), 16)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda s, o: gather(s, [0, 60], 8, o), "offsets must lie in"),
        (lambda s, o: gather(s, [-1], 8, o), "offsets must lie in"),
        (lambda s, o: gather(s, torch.tensor([0, 57]), 8, o), "offsets must lie in"),
        (lambda s, o: gather(s, [0, 8, 16], 8, o), "need 24"),
        (lambda s, o: gather(s, [0], 0, o), "block_bytes must be a positive int"),
        (lambda s, o: gather(s, [ill_typed(0.5)], 8, o), "offsets must be integers"),
        (lambda s, o: gather(s, torch.tensor([0.0]), 8, o), "1-D int64 or int32"),
        (lambda s, o: gather(s.view(8, 8), [0], 8, o), "1-D torch.uint8"),
        (lambda s, o: gather(s.to(torch.int8), [0], 8, o), "1-D torch.uint8"),
        (lambda s, o: gather(s, [0], 8, torch.zeros(4, 8, dtype=torch.uint8).t()), "contiguous"),
        (lambda s, o: scatter(s, o, [0, 64], 8), "offsets must lie in"),
        (lambda s, o: scatter(s, o, [0, 8, 16], 8), "need 24"),
    ],
)
def test_bad_arguments_are_invalid_argument(call, match):
    src, out = _random_bytes(64, seed=5), torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(InvalidArgument, match=match):
        call(src, out)
