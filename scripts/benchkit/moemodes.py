"""The modes ``scripts/bench_moe.py`` compares, by what the benchmark does with them
(which run by default, which decide the exit status, which lease memory, which the
revocation runs decode), what each mode runs and what each of a mode's fields means, word
for word, for the JSON (``HOW``, ``FIELDS``). The names live in one place so that the
setup, the runs, the report and the plot agree on them."""

from __future__ import annotations

# Every mode, in the order a repeat starts from (alternating() rotates it).
MODES = (
    "resident",
    "resident-same-code",
    "best-host-offload",
    "accelerate-pinned",
    "accelerate-default",
    "harvest-host",
    "harvest-gpu",
    "harvest-gpu-placed",
)
# Not run unless asked for (--modes): transformers' grouped GEMM experts, resident.
# host-placed: the placed path with nothing leased (--smoke runs it: on the CPU it is the
# only placed mode; on a GPU, scripts/bench_place.py measures host pages read in place).
OPTIONAL_MODES = ("resident-grouped-mm", "host-placed")
# The modes whose tokens decide the exit status (every mode of a revocation run too).
HARVEST_MODES = (
    "harvest-host",
    "harvest-gpu",
    "host-placed",
    "harvest-gpu-placed",
    "harvest-gpu-revoked",
    "harvest-gpu-placed-revoked",
)
# Modes whose experts sit in placed tensors, read where they lie (issue 15).
PLACED_MODES = ("host-placed", "harvest-gpu-placed")
# Modes that lease memory: before each run every offloaded expert is borrowed again.
# host-placed leases nothing, so that it reads its host copy in place.
BORROWING = ("harvest-host", "harvest-gpu", "harvest-gpu-placed")
REVOCATION_MODES = ("harvest-gpu-revoked", "harvest-gpu", "harvest-host")
# The placed path's revocation run (only when harvest-gpu-placed is among --modes): the
# revoked placed run against the quiet one, the all-host placed run, and the copy path's
# host leases (its all-host figure).
PLACED_REVOCATION_MODES = (
    "harvest-gpu-placed-revoked",
    "harvest-gpu-placed",
    "host-placed",
    "harvest-host",
)
# A revocation run's batch and offloaded fraction.
REVOKE_BATCH, REVOKE_FRACTION = 1, 0.5
# Modes that run Harvest's experts module (computed as --compute says).
HARVEST_CODE = (
    "resident-same-code",
    "best-host-offload",
    "harvest-host",
    "harvest-gpu",
    *PLACED_MODES,
)
# A mode that needs a GPU, on the CPU: its status in the row.
NEEDS_CUDA = "skipped (needs CUDA)"

# What each mode runs, word for word (the JSON's "modes" and each entry's "how").
HOW = {
    "resident": (
        "transformers' own model, untouched (no Harvest code, no hooks): every expert on "
        "the GPU, experts_implementation='eager'. The ceiling, and the reference tokens."
    ),
    "resident-same-code": (
        "Harvest's experts module with nothing offloaded: offload_experts(model, client, "
        "fraction=0): the code of the offloaded modes, no fetch. What the module itself "
        "costs or saves against transformers' eager experts."
    ),
    "best-host-offload": (
        "The routed experts only, from the model's own pinned host copy, fetched on a side "
        "stream: Harvest's own path with nothing borrowed, offload_experts(model, client, "
        "fraction, borrow_bytes=0, refill_every=None). Each offloaded expert's weights are "
        "kept pinned on the host (TieredCache pins the authoritative copy when the model "
        "is on a GPU); in each layer, once the router has picked (one device sync), the "
        "picked offloaded experts are copied with one DMA copy each (non_blocking, from "
        "pinned memory) on the cache's own CUDA stream while the resident experts compute, "
        "and each offloaded expert computes as soon as its own copy has landed (a CUDA "
        "event per expert). Nothing is leased: borrowed_bytes is 0 and each run checks "
        "that every read came from the 'host' tier. This is what a competent hand-written "
        "host offload does (the routing must be known before a routed expert can be "
        "fetched), so the script uses it rather than a second implementation."
    ),
    "accelerate-pinned": (
        "accelerate.cpu_offload(experts_module, execution_device=<the GPU>, "
        "state_dict={name: weight.to('cpu').pin_memory()}) on the fused experts modules of "
        "round(fraction x layers) layers: accelerate offloads whole modules, so each step "
        "copies every expert of those layers (the same bytes offloaded as Harvest's "
        "fraction of every layer's experts). accelerate 1.15 has no pinned-memory option; "
        "cpu_offload's documented state_dict argument is the host copy its hook reads "
        "from, so it is given pinned tensors. Its hook (AlignDevicesHook) copies each "
        "weight before the module runs with a synchronous .to(device) (from pinned memory: "
        "at the link's speed) and calls torch.cuda.empty_cache() after each weight "
        "(set_module_tensor_to_device), as accelerate does."
    ),
    "accelerate-default": (
        "accelerate.cpu_offload(experts_module, execution_device=<the GPU>) on the same "
        "modules, as users call it: accelerate keeps a pageable host copy "
        "(param.to('cpu')) and copies every weight of those layers from it on each step."
    ),
    "harvest-host": (
        "offload_experts(model, client, fraction, backends=('host',)): that fraction of "
        "every layer's experts in host leases (a host lender's memory); each layer's "
        "routed offloaded experts are fetched on the cache's stream while the resident "
        "ones compute."
    ),
    "harvest-gpu": (
        "offload_experts(model, client, fraction, backends=('cuda-vmm',)): that fraction of "
        "every layer's experts in GPU leases (a cuda-vmm lender's memory: when --lender-gpu "
        "is the decoding GPU, its own memory, lent by another process); routed offloaded "
        "experts are fetched with device-to-device copies on the cache's stream."
    ),
    "host-placed": (
        "offload_experts(model, client, fraction, placement='placed', borrow_bytes=0): that "
        "fraction of every layer's experts in placed tensors with nothing leased, so the "
        "compute reads them in place from the authoritative host copy (host-NUMA pages "
        "mapped for the GPU through the VMM API; a memfd on the CPU): no fetch, no "
        "staging, every read of an offloaded expert crosses the PCIe link inside the kernel."
    ),
    "harvest-gpu-placed": (
        "offload_experts(model, client, fraction, placement='placed'): that fraction of "
        "every layer's experts in placed tensors backed by GPU leases (cuda-vmm, mapped into "
        "one address range per tensor), read in place by the same compute as the resident "
        "experts: no fetch, no staging copy."
    ),
    "resident-grouped-mm": (
        "transformers' own model, every expert resident, experts_implementation="
        "'grouped_mm' (its grouped GEMM numerics give other tokens than eager)."
    ),
}

# What a mode's GPU-memory and revocation fields mean (the JSON's "fields"). None: on the
# CPU, or where NVML cannot tell.
FIELDS = {
    "gpu_allocated_bytes": (
        "torch.cuda.memory_allocated(device) after the mode's setup (model copied, experts "
        "offloaded or placed) less before it, before any step: what the setup kept in "
        "torch's allocator (every mode lives in one process, so the growth); resident: the "
        "model as built"
    ),
    "gpu_process_bytes": (
        "the same growth of this process's GPU memory as NVML counts it "
        "(nvmlDeviceGetComputeRunningProcesses, this PID), which also sees memory outside "
        "torch's allocator (ranges mapped through the VMM API)"
    ),
    "staging_bytes": (
        "gpu_allocated_bytes - (resident's gpu_allocated_bytes - offloaded_bytes): the "
        "borrower's own GPU memory beyond the model's own non-offloaded part; for placed "
        "modes, against one page (placed_chunk_bytes) per placed object"
    ),
    "staging_process_bytes": "staging_bytes from gpu_process_bytes (NVML)",
    "placed_objects": "placed modes: how many placed tensors hold the offloaded experts",
    "placed_chunk_bytes": "placed modes: a placed tensor's page (its unit of placement)",
    "gpu_allocated_growth_bytes": (
        "the most torch.cuda.memory_allocated grew across one run, its own tensors freed: "
        "what a mode allocates at its first steps and keeps (the copy path's staging rows, "
        "made at its first fetch, are here, not in staging_bytes)"
    ),
    "revocations": "revoked runs: leases the tenant's reclaims revoked, per repeat",
    "revocations_seen": (
        "revoked runs: revocations of this offload's own leases, per repeat (its cache's, "
        "or the sum over its placed tensors)"
    ),
    "remap_ms": (
        "placed revoked runs: each revocation's remap of a placed tensor's chunks to the "
        "host copy (PlacedTensor.remap_ms), over every repeat"
    ),
}
