"""A MoE model's experts in borrowed memory: ``offload_experts(model, client, fraction)``.

Modules: :mod:`client.moe.offload` (which experts live where, fetched as the router picks
them), :mod:`client.moe.compute` (the experts' arithmetic, eager or grouped GEMMs).
"""

from client.moe.offload import ExpertOffload, OffloadStats, find_experts, offload_experts

__all__ = ["ExpertOffload", "OffloadStats", "find_experts", "offload_experts"]
