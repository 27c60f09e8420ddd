"""The KV decode benchmark on the CPU: scripts/bench_kv.py --smoke end to end (a host node,
every mode the CPU can run, repeats in alternating order, verdicts), and its hand-written
baseline (benchkit.kvmodes.PinnedHostCache) against DynamicCache, bit for bit."""

from __future__ import annotations

import json
import subprocess
from typing import TYPE_CHECKING, Any, cast

import pytest
from support.env import PY, REPO, node_env

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from benchkit.kvmodes import (  # noqa: E402
    BASELINES,
    HARVEST,
    MODES,
    NEEDS_CUDA,
    PinnedHostCache,
    PinnedHostLayer,
    make_baseline,
)
from benchkit.stats import MIN_REPEATS, MIN_STEPS  # noqa: E402

BLOCK = 8


def _llama() -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _generate(model: torch.nn.Module, cache: object, ids: torch.Tensor, chunks: list[int]):
    """Prefill in ``chunks``, then 30 greedy steps: every token and every step's logits."""
    tokens, logits, pos = [], [], 0
    with torch.no_grad():
        for chunk in chunks:
            out = model(ids[:, pos : pos + chunk], past_key_values=cache, use_cache=True)
            pos += chunk
        for _ in range(30):
            logits.append(out.logits[:, -1])
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
            out = model(token, past_key_values=cache, use_cache=True)
    return torch.cat(tokens, 1), torch.stack(logits)


@pytest.mark.parametrize("chunks", [[45], [5, 8, 32], [16, 16, 13]])
def test_pinned_host_cache_gives_dynamic_cache_outputs_bit_for_bit(chunks):
    model = _llama()
    ids = torch.randint(0, 128, (2, 45), generator=torch.Generator().manual_seed(1))
    want = _generate(model, transformers.DynamicCache(), ids, chunks)
    cache = PinnedHostCache(num_layers=3, max_tokens=80, block_tokens=BLOCK)
    got = _generate(model, cache, ids, chunks)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # 45 + 30 tokens: 9 full blocks on the host per layer, 3 tokens in the tail.
    layers = cast("list[PinnedHostLayer]", cache.layers)
    assert [layer.blocks for layer in layers] == [9] * 3
    assert [layer.tail_len for layer in layers] == [3] * 3
    assert cache.bytes_written == 3 * 9 * 2 * 2 * 2 * BLOCK * 16 * 4  # each block once
    with pytest.raises(ValueError, match="max_tokens"):
        model(ids[:, :10], past_key_values=cache, use_cache=True)
    cache.close()


def test_pinned_host_cache_plugs_into_generate():
    model: Any = _llama()  # a LlamaForCausalLM: generate is there
    ids = torch.randint(0, 128, (2, 45), generator=torch.Generator().manual_seed(2))
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=30,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    want = model.generate(ids, past_key_values=transformers.DynamicCache(), **kwargs)
    cache = PinnedHostCache(num_layers=3, max_tokens=80, block_tokens=BLOCK)
    got = model.generate(ids, past_key_values=cache, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits, strict=True))


def test_baseline_factory_makes_what_the_json_says():
    cfg = _llama().config
    assert type(make_baseline("plain", cfg, 64, BLOCK)).__name__ == "DynamicCache"
    dynamic = make_baseline("offloaded-dynamic", cfg, 64, BLOCK)
    assert type(dynamic).__name__ == "DynamicCache" and dynamic.offloading
    static = make_baseline("offloaded-static", cfg, 64, BLOCK)
    assert type(static).__name__ == "StaticCache" and static.offloading
    assert static.get_max_length() == 64
    assert isinstance(make_baseline("pinned-host-readonly", cfg, 64, BLOCK), PinnedHostCache)
    with pytest.raises(ValueError):
        make_baseline("harvest-host", cfg, 64, BLOCK)


@pytest.mark.slow
def test_kv_smoke_runs_every_cpu_mode_repeated_with_verdicts(tmp_path):
    out = tmp_path / "kv.json"
    proc = subprocess.run(
        [PY, str(REPO / "scripts" / "bench_kv.py"), "--smoke", "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
        env=node_env(),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    ran = {m for m in MODES if m not in NEEDS_CUDA}
    assert set(doc["modes"]) == set(MODES)
    for mode, info in doc["modes"].items():
        assert info["config"], mode
        assert info["status"] == ("run" if mode in ran else "skipped (needs CUDA)"), mode
    assert doc["repeats"] >= MIN_REPEATS and doc["steps"] >= MIN_STEPS
    keys = {(r["context"], r["batch"]) for r in doc["runs"]}
    assert keys == {(100, 1), (100, 2), (300, 1), (300, 2)}
    for key in keys:
        runs = [r for r in doc["runs"] if (r["context"], r["batch"]) == key]
        assert sorted((r["repeat"], r["mode"]) for r in runs) == sorted(
            (rep, m) for rep in range(doc["repeats"]) for m in ran
        )
        firsts = {
            next(r["mode"] for r in runs if r["repeat"] == rep and r["order"] == 0)
            for rep in range(doc["repeats"])
        }
        assert len(firsts) > 1  # the order alternates
        for r in runs:
            assert r["steps"] >= MIN_STEPS and r["tokens_per_s"] > 0
            assert r["tokens_equal_plain"] is True and r["logits_equal_plain"] is True, r
    assert len(doc["summary"]) == 4 * len(ran)
    for s in doc["summary"]:
        assert s["repeats"] >= MIN_REPEATS and s["steps"] >= MIN_STEPS
        assert len(s["tokens_per_s"]["values"]) == s["repeats"]
        assert s["tokens_per_s"]["min"] <= s["tokens_per_s"]["median"] <= s["tokens_per_s"]["max"]
        assert s["verdict"] and s["tokens_equal_plain"] is True
        if s["mode"] in HARVEST:
            assert s["verdict"] == "same tokens and logits as plain"
            assert s["revocations"] == [0] * s["repeats"]
    for h in doc["headline"]:
        assert h["best_baseline"] in BASELINES  # pinned-host-readonly, the one the CPU runs
        vs = h["harvest-host"]["vs_best_baseline"]
        assert len(vs["values"]) == doc["repeats"] and vs["median"] > 0
        assert isinstance(h["harvest-host"]["loses_to_best_baseline"], bool)
    assert doc["harvest_tokens_equal_plain"] is True and doc["harvest_logits_equal_plain"] is True
    assert doc["all_reloads_verified"] and doc["ok"] and doc["failures"] == []
    assert doc["complete"] is True
    assert doc["skipped_modes"] == {m: "skipped (needs CUDA)" for m in MODES if m in NEEDS_CUDA}
    assert (tmp_path / "kv.png").exists()
