"""The models ``scripts/bench_moe.py`` decodes: Mixtral-8x7B- and Qwen1.5-MoE-A2.7B-shaped
transformers models built from their configs with random weights (no downloads), with the
real expert shapes and fewer layers so that every mode's copy fits on one GPU at once
(``smoke``: tiny ones for the CPU)."""

from __future__ import annotations

from typing import Any

import torch


def model_config(name: str, layers: int, smoke: bool) -> Any:
    """The transformers config of a model shape, with ``layers`` layers."""
    import transformers

    # experts_implementation: a keyword every config takes (PreTrainedConfig.__post_init__
    # keeps it) that transformers' typed signatures leave out.
    if name == "mixtral":
        return transformers.MixtralConfig(  # type: ignore[call-arg]
            num_hidden_layers=layers,
            max_position_embeddings=4096,
            experts_implementation="eager",
            vocab_size=256 if smoke else 32000,
            hidden_size=64 if smoke else 4096,
            intermediate_size=128 if smoke else 14336,
            num_attention_heads=4 if smoke else 32,
            num_key_value_heads=2 if smoke else 8,
            num_local_experts=8,
            num_experts_per_tok=2,
        )
    if name == "qwen2-moe":
        return transformers.Qwen2MoeConfig(  # type: ignore[call-arg]
            num_hidden_layers=layers,
            max_position_embeddings=4096,
            experts_implementation="eager",
            vocab_size=256 if smoke else 151936,
            hidden_size=64 if smoke else 2048,
            intermediate_size=128 if smoke else 5632,
            moe_intermediate_size=32 if smoke else 1408,
            shared_expert_intermediate_size=64 if smoke else 5632,
            num_attention_heads=4 if smoke else 16,
            num_key_value_heads=4 if smoke else 16,
            num_experts=16 if smoke else 60,
            num_experts_per_tok=4,
        )
    raise SystemExit(f"unknown model {name!r} (mixtral, qwen2-moe)")


def build(name: str, layers: int, device: torch.device, dtype: torch.dtype, smoke: bool) -> Any:
    """A model of that shape with random weights, made on ``device``."""
    import transformers

    config = model_config(name, layers, smoke)
    cls = {
        "mixtral": transformers.MixtralForCausalLM,
        "qwen2-moe": transformers.Qwen2MoeForCausalLM,
    }[name]
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
