"""The KV fetch planner (client/kv/planner.py) and its executor (client/kv/fetch.py) on the
CPU: plan properties against the model and a brute-force search, results equal to K/V
computed directly, and a fetch through a real host lease."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from support.ill_typed import ill_typed

from client.kv.fetch import KVStore, fetch_kv
from client.kv.measure import measure_rates
from client.kv.plan import KVShape, Rates, Via
from client.kv.planner import FetchPlanner
from harvestd.errors import InvalidArgument

OPT_6_7B = KVShape(4096, 32, 128, 2)  # MHA: activations are half of K+V
OPT_13B = KVShape(5120, 40, 128, 2)
LLAMA3_8B = KVShape(4096, 8, 128, 2)  # GQA: activations are twice K+V
H100ISH = Rates(host_bps=50e9, recompute_tokens_per_s=9e6, host_latency_s=10e-6)
THREE = Rates(
    peer_bps=300e9,
    host_bps=50e9,
    recompute_tokens_per_s=2e6,
    peer_latency_s=5e-6,
    host_latency_s=10e-6,
)
RATE_SETS = [
    H100ISH,
    THREE,
    Rates(host_bps=25e9, recompute_tokens_per_s=1e6),
    Rates(peer_bps=50e9, host_bps=50e9, recompute_tokens_per_s=3e6),
    Rates(peer_bps=20e9, host_bps=60e9, recompute_tokens_per_s=5e5, host_latency_s=1e-3),
    Rates(host_bps=50e9, recompute_tokens_per_s=1e3),
]
SHAPES = [OPT_6_7B, OPT_13B, LLAMA3_8B, KVShape(256, 4, 64, 4)]


# ------------------------------------------------------------------ plans


@pytest.mark.parametrize("tokens", [0, 1, 7, 1000, 32768, 131071])
@pytest.mark.parametrize("rates", RATE_SETS)
@pytest.mark.parametrize("shape", SHAPES)
def test_tokens_sum_and_plan_is_well_formed(tokens, rates, shape):
    plan = FetchPlanner().plan(tokens, shape, rates)
    assert plan.tokens == tokens
    assert min(plan.peer_tokens, plan.host_tokens, plan.recompute_tokens) >= 0
    assert all(
        isinstance(n, int) for n in (plan.peer_tokens, plan.host_tokens, plan.recompute_tokens)
    )
    assert (plan.activations_via is None) == (plan.recompute_tokens == 0)
    assert plan.reason and math.isfinite(plan.predicted_s)
    if not rates.peer_bps:
        assert plan.peer_tokens == 0
    r, p = plan.recompute_tokens, plan.peer_tokens
    assert plan.ranges() == {"recompute": (0, r), "peer": (r, r + p), "host": (r + p, tokens)}


@pytest.mark.parametrize("rates", RATE_SETS)
def test_gqa_never_recomputes_and_says_why(rates):
    plan = FetchPlanner().plan(32768, LLAMA3_8B, rates)
    assert plan.recompute_tokens == 0 and plan.activations_via is None
    assert "cannot pay" in plan.reason and "outweigh" in plan.reason
    assert "8,192 B" in plan.reason and "4,096 B" in plan.reason


def test_mha_with_fast_compute_recomputes_over_the_host_link():
    plan = FetchPlanner().plan(32768, OPT_6_7B, H100ISH)
    assert plan.recompute_tokens > 0 and plan.activations_via == "host"
    host_only = FetchPlanner().predict(OPT_6_7B, H100ISH, 0, 0, 32768)
    assert host_only / plan.predicted_s > 1.8  # activations are half of K+V
    assert "lighter than K and V" in plan.reason


def test_no_peer_means_no_peer_tokens():
    assert FetchPlanner().plan(32768, OPT_6_7B, H100ISH).peer_tokens == 0
    plan = FetchPlanner().plan(32768, OPT_6_7B, THREE, peer_available=False)
    assert plan.peer_tokens == 0 and plan.activations_via in (None, "host")
    assert "no peer" in plan.reason


def test_recompute_can_be_refused():
    plan = FetchPlanner().plan(32768, OPT_6_7B, H100ISH, allow_recompute=False)
    assert plan.recompute_tokens == 0 and plan.host_tokens == 32768
    assert "not allowed" in plan.reason


@pytest.mark.parametrize("peer,host", [(100e9, 50e9), (50e9, 100e9), (30e9, 20e9)])
def test_the_faster_link_gets_more_tokens(peer, host):
    for shape in (OPT_6_7B, LLAMA3_8B):
        plan = FetchPlanner().plan(
            65536, shape, Rates(peer_bps=peer, host_bps=host), allow_recompute=False
        )
        assert (plan.peer_tokens > plan.host_tokens) == (peer > host)
        # Both links end together: the split follows the bandwidths.
        assert plan.peer_tokens / plan.host_tokens == pytest.approx(peer / host, rel=1e-3)


@pytest.mark.parametrize("rates", RATE_SETS)
@pytest.mark.parametrize("shape", SHAPES)
def test_predicted_time_beats_every_single_source(rates, shape):
    planner, s = FetchPlanner(), 20000
    plan = planner.plan(s, shape, rates)
    assert plan.predicted_s == pytest.approx(
        planner.predict(
            shape,
            rates,
            plan.recompute_tokens,
            plan.peer_tokens,
            plan.host_tokens,
            plan.activations_via,
        )
    )
    singles = [planner.predict(shape, rates, 0, 0, s)]
    if rates.peer_bps:
        singles.append(planner.predict(shape, rates, 0, s, 0))
    if shape.recompute_pays:
        singles += [
            planner.predict(shape, rates, s, 0, 0, v) for v in ("host", "peer") if rates.link(v)[0]
        ]
    assert plan.predicted_s <= min(singles) * (1 + 1e-12)


@pytest.mark.parametrize("rates", RATE_SETS)
@pytest.mark.parametrize("shape", [OPT_6_7B, OPT_13B, LLAMA3_8B])
def test_plan_is_as_good_as_a_brute_force_search(rates, shape):
    planner, s, step = FetchPlanner(), 24000, 120
    best = math.inf
    grid = range(0, s + 1, step)
    vias: list[Via] = (
        [v for v in ("host", "peer") if rates.link(v)[0]] if shape.recompute_pays else []
    )
    for r, p in itertools.product(grid if vias else [0], grid if rates.peer_bps else [0]):
        if r + p > s:
            continue
        for via in vias if r else [None]:
            best = min(best, planner.predict(shape, rates, r, p, s - r - p, via))
    plan = planner.plan(s, shape, rates)
    # Within the grid's resolution, plus what folding a sliver may cost by design.
    assert plan.predicted_s <= best * (1.005 + FetchPlanner.FOLD_TOLERANCE)


def test_a_sliver_of_a_path_is_folded_into_the_biggest():
    """A path given less than one chunk goes to the biggest path when the model says
    that costs at most FOLD_TOLERANCE (the H100 run measured such slivers as slow)."""
    planner = FetchPlanner(chunk_tokens=1024)
    rates = Rates(host_bps=54e9, recompute_tokens_per_s=6.1e6)
    split: tuple[int, int, int, Via | None] = (32324, 0, 444, "host")
    t = planner.predict(OPT_13B, rates, *split)
    folded, folded_t = planner._fold_slivers(32768, OPT_13B, rates, split, t)
    assert folded == (32768, 0, 0, "host")
    assert folded_t <= t * (1 + FetchPlanner.FOLD_TOLERANCE)
    # Too costly to fold: kept as it was.
    assert planner._fold_slivers(32768, OPT_13B, rates, split, t * 0.5) == (split, t * 0.5)


def test_granularity_rounds_recompute_and_peer():
    plan = FetchPlanner(granularity=256).plan(30000, OPT_6_7B, THREE)
    assert plan.recompute_tokens % 256 == 0 and plan.peer_tokens % 256 == 0
    assert plan.tokens == 30000


def test_sequential_rates_pick_the_cheapest_single_source():
    rates = Rates(peer_bps=10e9, host_bps=5e9, recompute_tokens_per_s=1e9, concurrent=False)
    plan = FetchPlanner().plan(5000, OPT_6_7B, rates)
    assert plan.recompute_tokens == 5000 and plan.activations_via == "peer"
    assert "one after another" in plan.reason


def test_fixed_split_has_the_model_time():
    planner = FetchPlanner()
    plan = planner.fixed(
        10000, OPT_6_7B, THREE, recompute_tokens=3000, peer_tokens=2000, activations_via="peer"
    )
    assert (plan.recompute_tokens, plan.peer_tokens, plan.host_tokens) == (3000, 2000, 5000)
    assert plan.predicted_s == planner.predict(OPT_6_7B, THREE, 3000, 2000, 5000, "peer")
    with pytest.raises(InvalidArgument):
        planner.fixed(100, OPT_6_7B, THREE, recompute_tokens=80, peer_tokens=30)


def test_bad_input_is_refused_with_our_errors():
    planner = FetchPlanner()
    with pytest.raises(InvalidArgument):
        planner.plan(-1, OPT_6_7B, H100ISH)
    with pytest.raises(InvalidArgument, match="peer"):
        planner.plan(10, OPT_6_7B, H100ISH, peer_available=True)
    with pytest.raises(InvalidArgument, match="no link"):
        planner.plan(10, OPT_6_7B, Rates(recompute_tokens_per_s=1e6))
    with pytest.raises(InvalidArgument):
        Rates(host_bps=-1.0)
    with pytest.raises(InvalidArgument):
        Rates(host_bps=float("nan"))
    with pytest.raises(InvalidArgument):
        KVShape(0, 8, 128)
    with pytest.raises(InvalidArgument):
        KVShape(4096, 8, 128, ill_typed("two"))
    with pytest.raises(InvalidArgument):
        FetchPlanner(chunk_tokens=0)


def test_shapes_from_transformers_configs_and_dtypes():
    transformers = pytest.importorskip("transformers")
    llama = KVShape.from_config(
        transformers.LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8)
    )
    assert llama == LLAMA3_8B and not llama.recompute_pays
    assert llama.kv_bytes_per_token == 4096 and llama.act_bytes_per_token == 8192
    opt = KVShape.from_config(transformers.OPTConfig(hidden_size=5120, num_attention_heads=40))
    assert opt == OPT_13B and opt.recompute_pays
    # KVShape takes a torch dtype for dtype_bytes (its docstring); its annotation says int.
    assert KVShape(4096, 32, 128, torch.float32).dtype_bytes == 4  # type: ignore[arg-type]
    assert KVShape.from_config(transformers.OPTConfig(), dtype=torch.bfloat16).dtype_bytes == 2


# ------------------------------------------------------------------ the executor


def layer(
    tokens: int,
    hidden: int,
    kv_dim: int,
    dtype=torch.float32,
    integer: bool = True,
    bias: bool = True,
    seed: int = 0,
):
    """Activations, weights, and the K/V they make. Integer values keep every product and
    sum exact, so any GEMM blocking gives the same bits."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        if integer:
            return torch.randint(-3, 4, shape, generator=gen).to(dtype)
        return torch.randn(shape, generator=gen).to(dtype)

    x = rnd(tokens, hidden)
    w_k, w_v = rnd(kv_dim, hidden), rnd(kv_dim, hidden)
    b_k, b_v = (rnd(kv_dim), rnd(kv_dim)) if bias else (None, None)
    k = x @ w_k.t() + (b_k if bias else 0)
    v = x @ w_v.t() + (b_v if bias else 0)
    return x, w_k, b_k, w_v, b_v, k.to(dtype), v.to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def test_fetch_fills_every_range_exactly_on_the_cpu():
    tokens, hidden, kv_dim = 1000, 64, 96
    x, w_k, b_k, w_v, b_v, k, v = layer(tokens, hidden, kv_dim)
    # Stored K/V made apart from x, so a copied range can only match if it was copied.
    peer_k, peer_v = k + 1000, v + 1000
    host_k, host_v = k - 1000, v - 1000
    plan = FetchPlanner().fixed(
        tokens, OPT_6_7B, THREE, recompute_tokens=300, peer_tokens=250, activations_via="host"
    )
    out_k, out_v = torch.full((tokens, kv_dim), math.nan), torch.full((tokens, kv_dim), math.nan)
    fetch_kv(
        plan,
        out_k=out_k,
        out_v=out_v,
        peer_kv=(peer_k, peer_v),
        host_kv=KVStore(host_k[550:].clone(), host_v[550:].clone(), first_token=550),
        activations=x[:300].clone(),
        w_k=w_k,
        b_k=b_k,
        w_v=w_v,
        b_v=b_v,
        chunk_tokens=64,
    )
    assert torch.equal(out_k[:300], torch.addmm(b_k, x[:300], w_k.t()))
    assert torch.equal(out_v[:300], torch.addmm(b_v, x[:300], w_v.t()))
    assert torch.equal(out_k[:300], k[:300]) and torch.equal(out_v[:300], v[:300])
    assert torch.equal(bits(out_k[300:550]), bits(peer_k[300:550]))
    assert torch.equal(bits(out_v[300:550]), bits(peer_v[300:550]))
    assert torch.equal(bits(out_k[550:]), bits(host_k[550:]))
    assert torch.equal(bits(out_v[550:]), bits(host_v[550:]))


def test_fetch_with_head_layout_no_bias_and_bf16():
    tokens, hidden, heads, head_dim = 300, 64, 4, 16
    x, w_k, _, w_v, _, k, v = layer(
        tokens, hidden, heads * head_dim, torch.bfloat16, integer=False, bias=False
    )
    plan = FetchPlanner().fixed(
        tokens, KVShape(hidden, heads, head_dim, 2), H100ISH, recompute_tokens=200
    )
    out_k = torch.empty(tokens, heads, head_dim, dtype=torch.bfloat16)
    out_v = torch.empty_like(out_k)
    fetch_kv(
        plan,
        out_k=out_k,
        out_v=out_v,
        host_kv=(k, v),
        activations=x,
        w_k=w_k,
        w_v=w_v,
        chunk_tokens=128,
    )
    ref_k = torch.cat([x[:128] @ w_k.t(), x[128:200] @ w_k.t()])
    assert torch.equal(out_k.view(tokens, -1)[:200], ref_k)
    assert torch.allclose(
        out_v.view(tokens, -1)[:200].float(), v[:200].float(), atol=0.1, rtol=0.02
    )
    assert torch.equal(bits(out_k.view(tokens, -1)[200:]), bits(k[200:]))


def test_fetch_refuses_what_it_cannot_do():
    tokens, hidden, kv_dim = 100, 32, 32
    x, w_k, b_k, w_v, b_v, k, v = layer(tokens, hidden, kv_dim)
    planner = FetchPlanner()
    out = torch.empty(tokens, kv_dim), torch.empty(tokens, kv_dim)
    host_only = planner.fixed(tokens, OPT_6_7B, H100ISH)
    with pytest.raises(InvalidArgument, match="host_kv"):
        fetch_kv(host_only, out_k=out[0], out_v=out[1])
    with pytest.raises(InvalidArgument, match="holds tokens"):
        fetch_kv(host_only, out_k=out[0], out_v=out[1], host_kv=KVStore(k, v, first_token=1))
    with pytest.raises(InvalidArgument, match="float32"):
        fetch_kv(host_only, out_k=out[0], out_v=out[1], host_kv=(k.double(), v.double()))
    with pytest.raises(InvalidArgument, match="rows"):
        fetch_kv(planner.fixed(200, OPT_6_7B, H100ISH), out_k=out[0], out_v=out[1], host_kv=(k, v))
    rec = planner.fixed(tokens, OPT_6_7B, H100ISH, recompute_tokens=50)
    with pytest.raises(InvalidArgument, match="activations"):
        fetch_kv(rec, out_k=out[0], out_v=out[1], host_kv=(k, v))
    with pytest.raises(InvalidArgument, match="w_k"):
        fetch_kv(
            rec,
            out_k=out[0],
            out_v=out[1],
            host_kv=(k, v),
            activations=x,
            w_k=w_k.t().contiguous()[:16],
            w_v=w_v,
        )
    with pytest.raises(InvalidArgument):
        fetch_kv(host_only, out_k=out[0], out_v=out[1], host_kv=(k, v), chunk_tokens=0)


def test_measured_rates_on_the_cpu():
    shape = KVShape(128, 2, 64, torch.float32)  # type: ignore[arg-type]  # a dtype: see above
    peer = torch.zeros(1 << 20, dtype=torch.uint8)
    rates = measure_rates(shape, "cpu", peer=peer, nbytes=1 << 20, repeats=3)
    assert rates.host_bps is not None and rates.peer_bps is not None
    assert rates.recompute_tokens_per_s is not None
    assert rates.host_bps > 0 and rates.peer_bps > 0 and rates.recompute_tokens_per_s > 0
    assert not rates.concurrent  # the CPU executor runs the paths one after another
    plan = FetchPlanner().plan(4096, shape, rates)
    assert plan.tokens == 4096 and "one after another" in plan.reason


def test_fetch_through_a_real_host_lease(plain_node):
    tokens, hidden, kv_dim = 2048, 64, 128
    shape = KVShape(hidden, 2, 64, torch.float32)  # type: ignore[arg-type]  # a dtype: see above
    x, w_k, b_k, w_v, b_v, k, v = layer(tokens, hidden, kv_dim, seed=3)
    kv_bytes = tokens * kv_dim * 4
    with plain_node.connect() as client:
        host = client.lease(2 * kv_bytes + tokens * hidden * 4, backend="host")
        peer = client.lease(2 * kv_bytes, backend="host")  # a host lease stands in here
        hk, hv = (
            host.tensor(torch.float32, (tokens, kv_dim)),
            host.tensor(torch.float32, (tokens, kv_dim), offset=kv_bytes),
        )
        hx = host.tensor(torch.float32, (tokens, hidden), offset=2 * kv_bytes)
        pk, pv = (
            peer.tensor(torch.float32, (tokens, kv_dim)),
            peer.tensor(torch.float32, (tokens, kv_dim), offset=kv_bytes),
        )
        with host.use(), peer.use():
            hk.copy_(k), hv.copy_(v), hx.copy_(x), pk.copy_(k), pv.copy_(v)
        rates = FetchPlanner.profile(
            shape, "cpu", host=host.as_bytes(), peer=peer.as_bytes(), nbytes=1 << 20, repeats=3
        )
        planner = FetchPlanner(chunk_tokens=256)
        for plan in (
            planner.plan(tokens, shape, rates),
            planner.fixed(tokens, shape, rates, recompute_tokens=700, peer_tokens=600),
        ):
            out_k, out_v = torch.empty(tokens, kv_dim), torch.empty(tokens, kv_dim)
            fetch_kv(
                plan,
                out_k=out_k,
                out_v=out_v,
                peer_kv=(pk, pv),
                host_kv=(hk, hv),
                activations=hx,
                w_k=w_k,
                b_k=b_k,
                w_v=w_v,
                b_v=b_v,
                chunk_tokens=256,
                leases=[host, peer],
            )
            assert torch.equal(bits(out_k), bits(k)) and torch.equal(bits(out_v), bits(v))
        host.release()
        peer.release()
