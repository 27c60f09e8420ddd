#!/usr/bin/env python3
"""Bandwidth of every path a borrower reads through, in one run, on one GPU machine.

Sources, each 1 GiB (or --source-bytes), read into the benchmark GPU (--dst-gpu):
  vmm_lease          a CUDA VMM allocation made and exported by a separate lender process
                     on --src-gpu, imported here over a Unix socket (SCM_RIGHTS)
  pinned_host_lease  a host memfd lease mapped with HostBackend for a CUDA device (pinned)
  pageable_host      ordinary (pageable) host memory
  local_gpu          the benchmark GPU's own memory: the ceiling
For each: single copies (one ``.copy_`` of one block, per size in --sizes) and batched
gathers (many blocks in one launch through client/blocks.py, per --gather-blocks), plus a
copy-per-block loop of 16 KiB blocks from the lease and a pinned host-to-device copy of
1 GiB. Timed with CUDA events after warm-ups; the median is kept. With two GPUs
(--src-gpu other than --dst-gpu), also the peer copy ceiling between them (1 GiB
device-to-device, peer access enabled; scripts/benchkit/peer.py) and the reads against it
(``issue9`` in the JSON: large reads >= 0.9 of it, 16 KiB gathers >= 0.85, both >= 6x
pinned host).

    python3 scripts/bench_bandwidth.py --src-gpu 0 --dst-gpu 0 \
        --out bench/results/bandwidth.json      # + bandwidth.png when matplotlib is there
    python3 scripts/bench_bandwidth.py --src-gpu 1 --dst-gpu 0 \
        --out bench/results/bandwidth_nvlink.json   # lender on GPU 1, reads into GPU 0
    python3 scripts/bench_bandwidth.py --smoke --out /tmp/bandwidth_smoke/bandwidth.json

--smoke: the CPU twin, tiny sizes, a few seconds, no GPU. A node with one host lender as
a plain process (benchkit.multi.plain_host_node, as the other --smoke runs start one)
lends a host lease (memfd pages of the lender process, mapped here); the same single
copies and batched gathers read it into this process's memory, against the same reads
from local memory (``local_cpu``, the ceiling) and a copy-per-block loop from the lease,
timed by the wall clock. Same JSON shape (sources, ratios, gather_verified), with
``"platform": "cpu"`` and the CPU as ``device``; the ratios that need a GPU (pinned
host-to-device) are null. These are CPU-twin figures: they check the protocol, and say
nothing about any GPU's bandwidth; never set them beside GPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchkit.node import REPO, pyplot

from harvestd.sizes import GiB, KiB, MiB

TWIN_BUDGET_BYTES = 2e8  # bytes one figure of the CPU twin moves, at most (see timed)


def parse_sizes(text: str) -> list[int]:
    """``16KiB..1GiB`` (powers of 4 between) or a comma list of sizes."""
    from harvestd.sizes import parse_size

    if ".." in text:
        lo, hi = (parse_size(p) for p in text.split(".."))
        sizes = []
        while lo <= hi:
            sizes.append(lo)
            lo *= 4
        return sizes
    return [parse_size(p) for p in text.split(",") if p.strip()]


def serve_lender(fd: int, src_gpu: str, nbytes: int) -> None:
    """The lender process: allocate on ``src_gpu``, fill, send an fd per request."""
    import torch

    from lender.backends.cuda_vmm import CudaVmmBackend

    sock = socket.socket(fileno=fd)
    backend = (
        CudaVmmBackend(gpu_uuid=src_gpu)
        if src_gpu.upper().startswith("GPU-")
        else CudaVmmBackend(device_index=int(src_gpu))
    )
    alloc = backend.allocate(nbytes)
    backend.tensor(alloc).random_(0, 256)
    torch.cuda.synchronize()
    while sock.recv(64) == b"fd":
        exported = backend.export(alloc)
        if exported.fd is None:
            raise RuntimeError("a CUDA VMM export carries no fd")
        meta = json.dumps({"alloc_bytes": alloc.nbytes, "uuid": alloc.gpu_uuid}).encode()
        socket.send_fds(sock, [meta], [exported.fd])
        exported.close()
    backend.free(alloc)


class Lender:
    """The lender as a real second process, asked for fresh fds over a socketpair."""

    def __init__(self, src_gpu: str, nbytes: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve-lender",
                str(theirs.fileno()),
                "--src-gpu",
                src_gpu,
                "--source-bytes",
                str(nbytes),
            ],
            pass_fds=[theirs.fileno()],
            env=env,
        )
        theirs.close()
        self.sock = ours
        self.sock.settimeout(300)

    def exported(self) -> Any:
        from lender.backends import BackendKind, Exported

        self.sock.send(b"fd")
        meta, fds, _, _ = socket.recv_fds(self.sock, 4096, 1)
        info = json.loads(meta)
        return Exported(
            kind=BackendKind.CUDA_VMM,
            alloc_bytes=info["alloc_bytes"],
            fd=fds[0],
            gpu_uuid=info["uuid"],
        )

    def close(self) -> None:
        self.sock.send(b"quit")
        self.proc.wait(60)


def timed(
    fn: Callable[[int], Any],
    nbytes: int,
    warmup: int = 3,
    budget_bytes: float = 4e9,
    reps: int | None = None,
    inner: int = 1,
    wall: bool = False,
) -> dict[str, float]:
    """Median seconds of ``fn(i)`` over CUDA events, and GB/s for ``nbytes`` moved.

    ``inner`` calls run back to back between one pair of events (the time is divided by
    it): sustained throughput, with Python's launch overhead hidden behind the GPU's work.
    With 1, the launch latency of that one call is part of the time. ``wall``: the CPU
    twin's clock (``time.perf_counter`` around the same calls) instead of CUDA events, and
    at most ``TWIN_BUDGET_BYTES`` moved per figure (a CPU copies 100 times slower)."""
    import torch

    if wall:
        budget_bytes = min(budget_bytes, TWIN_BUDGET_BYTES)
    reps = reps or int(max(5, min(50, budget_bytes // max(nbytes * inner, 1))))
    for i in range(warmup):
        fn(i)
    if not wall:
        torch.cuda.synchronize()
    times = []
    for i in range(reps):
        if wall:
            t0 = time.perf_counter()
            for j in range(inner):
                fn(warmup + i * inner + j)
            times.append((time.perf_counter() - t0) / inner)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for j in range(inner):
            fn(warmup + i * inner + j)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / inner)
    sec = statistics.median(times)
    return {
        "bytes": nbytes,
        "us": sec * 1e6,
        "GBps": nbytes / sec / 1e9,
        "reps": reps,
        "inner": inner,
    }


def bench_words(
    src: Any, device: Any, block: int = 16 * KiB, total: int = 256 * MiB, wall: bool = False
) -> dict[str, float]:
    """GB/s of one ``index_select`` gathering ``block``-byte rows, per word type: which
    element width torch's kernel moves bytes fastest in (client/blocks.py picks 16)."""
    import torch

    gen = torch.Generator().manual_seed(1)
    n, slots = total // block, src.numel() // block
    sets = [torch.randperm(slots, generator=gen)[:n].to(device) for _ in range(3)]
    out: dict[str, float] = {}
    for dtype in (torch.uint8, torch.int32, torch.int64, torch.complex128):
        width = torch.empty((), dtype=dtype).element_size()
        table = src[: slots * block].view(dtype).view(slots, block // width)
        dst = torch.empty((n, block // width), dtype=dtype, device=device)

        def select(i: int, table: Any = table, dst: Any = dst) -> None:
            torch.index_select(table, 0, sets[i % 3], out=dst)

        row = timed(select, total, inner=5, wall=wall)
        out[str(dtype).replace("torch.", "")] = round(row["GBps"], 1)
    return out


def bench_lifecycle(lender: "Lender", nbytes: int, device: Any) -> dict[str, Any]:
    """Import + map and fence of the whole lease (fresh fd each time), with fences made
    of granularity-sized chunks only and with large chunks first."""
    from lender.backends import BackendKind, fence_chunks, get_backend
    from lender.backends.cuda_vmm import CudaVmmMapping

    vmm = get_backend(BackendKind.CUDA_VMM)
    result: dict[str, Any] = {}
    saved = fence_chunks.FENCE_CHUNK_BYTES
    try:
        for label, chunk in (("granularity_chunks", 0), ("large_chunks", saved)):
            fence_chunks.FENCE_CHUNK_BYTES = chunk
            map_ms, fence_ms, steps = [], [], {}
            for _ in range(4):
                exported = lender.exported()
                t0 = time.perf_counter()
                m = vmm.map(vmm.import_handle(exported), nbytes, device=device)
                t1 = time.perf_counter()
                if not isinstance(m, CudaVmmMapping):
                    raise TypeError(f"a CUDA VMM lease mapped as {type(m).__name__}")
                m.fence()
                t2 = time.perf_counter()
                m.close()
                map_ms.append((t1 - t0) * 1e3)
                fence_ms.append((t2 - t1) * 1e3)
                steps = m.fence_ms
            result[label] = {
                "import_map_ms": statistics.median(map_ms[1:]),
                "fence_ms": statistics.median(fence_ms[1:]),
                "last_fence_steps_ms": {k: round(v, 3) for k, v in steps.items()},
                "fence_chunk_bytes": chunk,
            }
    finally:
        fence_chunks.FENCE_CHUNK_BYTES = saved
    return result


def bench_source(
    name: str,
    src: Any,
    sizes: list[int],
    gather_blocks: list[int],
    gather_bytes: int,
    device: Any,
    wall: bool = False,
) -> dict[str, list[dict[str, float]]]:
    """Single copies and batched gathers from one source into ``device`` (``wall``: timed
    by the wall clock, the CPU twin)."""
    import torch

    from client.blocks import gather

    result: dict[str, list[dict[str, float]]] = {"single_copy": [], "gather": []}
    span = src.numel()
    for size in sizes:
        if size > span:
            continue
        dst = torch.empty(size, dtype=torch.uint8, device=device)
        slots = max(1, span // size)

        def copy(i: int, dst: Any = dst, size: int = size, slots: int = slots) -> None:
            start = (i % slots) * size  # walk the source: no block stays in L2
            dst.copy_(src[start : start + size], non_blocking=True)

        row = timed(copy, size, wall=wall)
        result["single_copy"].append(row)
        print(f"  {name:18s} copy   {size:>11,d} B  {row['GBps']:8.1f} GB/s", flush=True)
    gen = torch.Generator().manual_seed(0)
    for block in gather_blocks:
        n = max(1, min(gather_bytes, span // 2) // block)
        on = src.device if src.device.type == "cpu" and not _pinned(src) else device
        sets = [
            (torch.randperm(span // block, generator=gen)[:n] * block).to(on) for _ in range(3)
        ]  # rotate: no set stays in L2
        out = torch.empty(n * block, dtype=torch.uint8, device=device)

        def batch(i: int, sets: list = sets, block: int = block, out: Any = out) -> None:
            gather(src, sets[i % 3], block, out, check=False)

        row = timed(batch, n * block, inner=5, wall=wall)
        row.update(block_bytes=block, blocks=n)
        result["gather"].append(row)
        print(f"  {name:18s} gather {block:>11,d} B x {n:6d}  {row['GBps']:8.1f} GB/s", flush=True)
    return result


def _pinned(t: Any) -> bool:
    try:
        return bool(t.is_pinned())
    except RuntimeError:
        return False


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement; returns the JSON document."""
    import torch

    from client.blocks import gather
    from lender.backends import BackendKind, get_backend
    from lender.backends import cuda_driver as cu
    from lender.backends.host import HostBackend

    dst = (
        cu.ordinal_of_uuid(args.dst_gpu)
        if args.dst_gpu.upper().startswith("GPU-")
        else int(args.dst_gpu)
    )
    device = torch.device("cuda", dst)
    torch.cuda.set_device(device)
    sizes, blocks, nbytes = (
        parse_sizes(args.sizes),
        parse_sizes(args.gather_blocks),
        args.source_bytes,
    )
    doc: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "dst_gpu": cu.device_uuid(dst),
        "source_bytes": nbytes,
        "gather_bytes": args.gather_bytes,
        "timing": "CUDA events, median; single_copy: one .copy_ between events (launch "
        "latency included); gather: 5 launches back to back between events "
        "(sustained); lifecycle: wall clock",
        "sources": {},
    }
    lender = Lender(args.src_gpu, nbytes)
    try:
        vmm = get_backend(BackendKind.CUDA_VMM)
        imported = vmm.import_handle(lender.exported())
        doc["src_gpu"] = imported.gpu_uuid
        doc["same_gpu"] = imported.gpu_uuid == doc["dst_gpu"]
        lease_map = vmm.map(imported, imported.alloc_bytes, device=device)
        lease = lease_map.as_tensor()
        doc["vmm_lifecycle"] = bench_lifecycle(lender, nbytes, device)
        large = doc["vmm_lifecycle"]["large_chunks"]
        doc["vmm_import_map_ms"], doc["vmm_fence_ms"] = large["import_map_ms"], large["fence_ms"]
        host = HostBackend()
        halloc = host.allocate(nbytes)
        hmap = host.map(host.import_handle(host.export(halloc)), halloc.nbytes, device=device)
        doc["pinned_host_lease_pinned"] = hmap.pinned
        pinned_lease = hmap.as_tensor()
        pinned_lease.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
        pageable = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        local = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
        for name, src in (
            ("vmm_lease", lease),
            ("pinned_host_lease", pinned_lease),
            ("pageable_host", pageable),
            ("local_gpu", local),
        ):
            doc["sources"][name] = bench_source(name, src, sizes, blocks, args.gather_bytes, device)
        # The anti-pattern: a .copy_ per 16 KiB block, from the lease.
        n = 2048
        idx = torch.randperm(nbytes // (16 * KiB))[:n].tolist()
        out = torch.empty((n, 16 * KiB), dtype=torch.uint8, device=device)

        def loop(_: int) -> None:
            for j, k in enumerate(idx):
                out[j].copy_(lease[k * 16 * KiB : (k + 1) * 16 * KiB])

        doc["loop_copy_16k_lease"] = timed(loop, n * 16 * KiB, warmup=1, reps=5)
        pinned = torch.empty(GiB, dtype=torch.uint8).pin_memory()
        h2d = torch.empty(GiB, dtype=torch.uint8, device=device)
        doc["pinned_h2d_1GiB"] = timed(lambda _: h2d.copy_(pinned, non_blocking=True), GiB)
        doc["pageable_h2d_1GiB_blocking"] = timed(lambda _: h2d.copy_(pageable), GiB)
        doc["gather16k_by_word"] = {
            "local_gpu": bench_words(local, device),
            "vmm_lease": bench_words(lease, device),
        }
        # Check the fast path moved the right bytes, not just many bytes.
        check = torch.randperm(nbytes // (16 * KiB))[:64].to(device) * (16 * KiB)
        got = gather(
            lease, check, 16 * KiB, torch.empty(64 * 16 * KiB, dtype=torch.uint8, device=device)
        )
        ref = torch.cat([lease[o : o + 16 * KiB] for o in check.tolist()])
        doc["gather_verified"] = bool(torch.equal(got, ref))
        if not doc["same_gpu"]:
            from benchkit.peer import peer_ceiling

            # The copy engines' ceiling between the two GPUs, in this same run (issue 9).
            doc["peer_ceiling_1GiB"] = peer_ceiling(cu.ordinal_of_uuid(doc["src_gpu"]), dst)
        lease_map.close()
        hmap.close()
        host.free(halloc)
    finally:
        lender.close()
    g16 = {
        name: next((r["GBps"] for r in src["gather"] if r["block_bytes"] == 16 * KiB), None)
        for name, src in doc["sources"].items()
    }
    doc["ratios"] = {
        "gather16k_lease_over_local": _ratio(g16["vmm_lease"], g16["local_gpu"]),
        "gather16k_pinned_host_lease_over_pinned_h2d_1GiB": _ratio(
            g16["pinned_host_lease"], doc["pinned_h2d_1GiB"]["GBps"]
        ),
        "gather16k_lease_over_pinned_host_lease": _ratio(
            g16["vmm_lease"], g16["pinned_host_lease"]
        ),
        "gather16k_lease_over_loop_copy_16k": _ratio(
            g16["vmm_lease"], doc["loop_copy_16k_lease"]["GBps"]
        ),
    }
    if "peer_ceiling_1GiB" in doc:
        doc["issue9"] = peer_targets(doc, g16)
    return doc


def peer_targets(doc: dict[str, Any], g16: dict[str, float | None]) -> dict[str, Any]:
    """Issue 9's targets across two GPUs: reads of 64 MiB and up at 0.9 of the peer
    copy ceiling, 16 KiB gathers at 0.85 of it, both 6 times the pinned host figure."""
    ceiling = doc["peer_ceiling_1GiB"]["GBps"]
    pinned = doc["pinned_h2d_1GiB"]["GBps"]
    large = {
        str(r["bytes"]): r["GBps"]
        for r in doc["sources"]["vmm_lease"]["single_copy"]
        if r["bytes"] >= 64 * MiB
    }
    worst = min(large.values()) if large else None
    ratios: dict[str, float | None] = {
        "large_read_min_over_peer_ceiling": _ratio(worst, ceiling),
        "gather16k_lease_over_peer_ceiling": _ratio(g16["vmm_lease"], ceiling),
        "large_read_min_over_pinned_h2d_1GiB": _ratio(worst, pinned),
        "gather16k_lease_over_pinned_h2d_1GiB": _ratio(g16["vmm_lease"], pinned),
        "gather16k_lease_over_pinned_host_lease": _ratio(
            g16["vmm_lease"], g16["pinned_host_lease"]
        ),
    }
    targets = {
        "large_read_min_over_peer_ceiling": 0.9,
        "gather16k_lease_over_peer_ceiling": 0.85,
        "large_read_min_over_pinned_h2d_1GiB": 6.0,
        "gather16k_lease_over_pinned_h2d_1GiB": 6.0,
    }
    return {
        "peer_ceiling_GBps": ceiling,
        "pinned_h2d_GBps": pinned,
        "ratios": {
            "large_reads_over_peer_ceiling": {k: _ratio(v, ceiling) for k, v in large.items()},
            **ratios,
        },
        "targets": targets,
        "met": {k: (r := ratios[k]) is not None and r >= v for k, v in targets.items()},
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


# --smoke's sizes, where the command line left the GPU run's defaults.
SMOKE = {
    "sizes": "16KiB,256KiB,4MiB",
    "gather_blocks": "16KiB,256KiB",
    "gather_bytes": 4 * MiB,
    "source_bytes": 32 * MiB,
    "out": "/tmp/bandwidth_smoke/bandwidth.json",
}
TWIN_NOTE = (
    "CPU-twin figures: a host lease (memfd pages of a lender process) and local memory "
    "read into this process's memory on the CPU, wall clock; they check the protocol and "
    "are not comparable with any GPU figure"
)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def run_smoke(args: argparse.Namespace) -> dict[str, Any]:
    """The CPU twin of :func:`run`: a host lease from a node's host lender (a plain
    process) against local memory, both read on the CPU; returns the JSON document."""
    import torch
    from benchkit.multi import plain_host_node

    from client.blocks import gather

    device = torch.device("cpu")
    # One thread: on a small, shared CI machine torch's intra-op pool waits for threads
    # that are not scheduled, and a 256 KiB copy then takes milliseconds.
    torch.set_num_threads(1)
    sizes, blocks, nbytes = (
        parse_sizes(args.sizes),
        parse_sizes(args.gather_blocks),
        args.source_bytes,
    )
    doc: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "platform": "cpu",
        "smoke": True,
        "device": f"cpu: {cpu_name()} ({os.cpu_count()} CPUs)",
        "twin": TWIN_NOTE,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "source_bytes": nbytes,
        "gather_bytes": args.gather_bytes,
        "timing": "wall clock (time.perf_counter), median; single_copy: one .copy_ per "
        "timing; gather: 5 calls back to back per timing; lifecycle: wall clock",
        "sources": {},
    }
    # Room for the measured lease and, beside it, the lifecycle's leases.
    with plain_host_node(lenders=1, host_bytes=f"{2 * nbytes // MiB + 16}MiB") as node:
        client = node.connect()
        try:
            grant_ms, release_ms = [], []
            for _ in range(4):  # the first pays for imports and connections: dropped
                t0 = time.perf_counter()
                probe = client.lease(nbytes, backend="host")
                probe.as_bytes()[::4096].fill_(1)  # touch every page: mapped for real
                t1 = time.perf_counter()
                probe.release()
                grant_ms.append((t1 - t0) * 1e3)
                release_ms.append((time.perf_counter() - t1) * 1e3)
            doc["lease_lifecycle"] = {
                "grant_map_touch_ms": statistics.median(grant_ms[1:]),
                "release_ms": statistics.median(release_ms[1:]),
                "what": "client.lease (grant, pick-up, map) and a write to every page; "
                "then release (fence, unmap, tell the broker)",
            }
            lease = client.lease(nbytes, backend="host")
            with lease.use():
                src = lease.as_bytes()
                doc["lease"] = {
                    "id": lease.id,
                    "lender": lease.lender,
                    "backend": lease.backend.value,
                    "bytes": lease.nbytes,
                }
                src.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
                local = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
                for name, source in (("host_lease", src), ("local_cpu", local)):
                    doc["sources"][name] = bench_source(
                        name, source, sizes, blocks, args.gather_bytes, device, wall=True
                    )
                # The anti-pattern: a .copy_ per 16 KiB block, from the lease.
                n = min(2048, nbytes // (16 * KiB))
                idx = torch.randperm(nbytes // (16 * KiB))[:n].tolist()
                out = torch.empty((n, 16 * KiB), dtype=torch.uint8)

                def loop(_: int) -> None:
                    for j, k in enumerate(idx):
                        out[j].copy_(src[k * 16 * KiB : (k + 1) * 16 * KiB])

                doc["loop_copy_16k_lease"] = timed(loop, n * 16 * KiB, warmup=1, reps=5, wall=True)
                total = min(args.gather_bytes, nbytes // 2)
                doc["gather16k_by_word"] = {
                    "local_cpu": bench_words(local, device, total=total, wall=True),
                    "host_lease": bench_words(src, device, total=total, wall=True),
                }
                # Check the fast path moved the right bytes, not just many bytes.
                check = torch.randperm(nbytes // (16 * KiB))[:64] * (16 * KiB)
                got = gather(src, check, 16 * KiB, torch.empty(64 * 16 * KiB, dtype=torch.uint8))
                ref = torch.cat([src[o : o + 16 * KiB] for o in check.tolist()])
                doc["gather_verified"] = bool(torch.equal(got, ref))
            lease.release()
        finally:
            client.close()
    g16 = {
        name: next((r["GBps"] for r in src["gather"] if r["block_bytes"] == 16 * KiB), None)
        for name, src in doc["sources"].items()
    }
    # The GPU run's ratio names; those that need a GPU (pinned host-to-device) are null.
    doc["ratios"] = {
        "gather16k_lease_over_local": _ratio(g16["host_lease"], g16["local_cpu"]),
        "gather16k_pinned_host_lease_over_pinned_h2d_1GiB": None,
        "gather16k_lease_over_pinned_host_lease": None,
        "gather16k_lease_over_loop_copy_16k": _ratio(
            g16["host_lease"], doc["loop_copy_16k_lease"]["GBps"]
        ),
    }
    doc["ratio_baselines"] = {
        "gather16k_lease_over_local": "local_cpu gather, 16 KiB blocks, this run",
        "gather16k_lease_over_loop_copy_16k": "loop_copy_16k_lease, this run",
    }
    return doc


def report(doc: dict[str, Any]) -> None:
    """The table the reply shows last."""
    print(
        f"\n{doc['device']}  src {doc.get('src_gpu')}  dst {doc['dst_gpu']}  "
        f"same GPU: {doc.get('same_gpu')}"
    )
    print(f"{'source':18s} {'gather 16KiB GB/s':>18s} {'copy 16KiB':>11s} {'copy 1GiB':>10s}")
    for name, src in doc["sources"].items():
        g = next((r["GBps"] for r in src["gather"] if r["block_bytes"] == 16 * KiB), 0.0)
        c = {r["bytes"]: r["GBps"] for r in src["single_copy"]}
        print(f"{name:18s} {g:18.1f} {c.get(16 * KiB, 0.0):11.2f} {c.get(GiB, 0.0):10.1f}")
    print(
        f"pinned H2D 1 GiB: {doc['pinned_h2d_1GiB']['GBps']:.1f} GB/s; "
        f"copy-per-block 16 KiB from the lease: {doc['loop_copy_16k_lease']['GBps']:.2f} GB/s"
    )
    print(f"pageable H2D 1 GiB (blocking): {doc['pageable_h2d_1GiB_blocking']['GBps']:.1f} GB/s")
    for label, row in doc["vmm_lifecycle"].items():
        print(
            f"VMM {doc['source_bytes'] // MiB} MiB, fence with {label}: import+map "
            f"{row['import_map_ms']:.2f} ms, fence {row['fence_ms']:.2f} ms, steps "
            f"{row['last_fence_steps_ms']}"
        )
    print(f"gather 16 KiB by word type: {doc['gather16k_by_word']}")
    print(f"gather verified: {doc['gather_verified']}")
    for key, value in doc["ratios"].items():
        print(f"ratio {key}: {value}")
    if "issue9" in doc:
        peer = doc["peer_ceiling_1GiB"]
        print(
            f"peer copy ceiling {peer['src']} -> {peer['dst']}, 1 GiB: {peer['GBps']:.1f} GB/s "
            f"(peer access {peer['peer_access']})"
        )
        issue = doc["issue9"]
        for key, target in issue["targets"].items():
            print(
                f"target {key}: {issue['ratios'][key]} (>= {target}: "
                f"{'met' if issue['met'][key] else 'NOT MET'})"
            )


def report_twin(doc: dict[str, Any]) -> None:
    """The CPU twin's table, labelled as such."""
    print(f"\nCPU twin (not GPU figures): {doc['device']}  lease from {doc['lease']['lender']}")
    print(f"{'source':18s} {'gather 16KiB GB/s':>18s} {'copy 16KiB':>11s} {'copy largest':>13s}")
    for name, src in doc["sources"].items():
        g = next((r["GBps"] for r in src["gather"] if r["block_bytes"] == 16 * KiB), 0.0)
        c = {r["bytes"]: r["GBps"] for r in src["single_copy"]}
        big = c[max(c)] if c else 0.0
        print(f"{name:18s} {g:18.1f} {c.get(16 * KiB, 0.0):11.2f} {big:13.1f}")
    print(f"copy-per-block 16 KiB from the lease: {doc['loop_copy_16k_lease']['GBps']:.2f} GB/s")
    life = doc["lease_lifecycle"]
    print(
        f"host lease of {doc['source_bytes'] // MiB} MiB: grant+map+touch "
        f"{life['grant_map_touch_ms']:.2f} ms, release {life['release_ms']:.2f} ms"
    )
    print(f"gather 16 KiB by word type: {doc['gather16k_by_word']}")
    print(f"gather verified: {doc['gather_verified']}")
    for key, value in doc["ratios"].items():
        print(f"ratio {key}: {value if value is not None else 'n/a (needs a GPU)'}")
    print(doc["twin"])


def plot(doc: dict[str, Any], path: Path) -> None:
    """Bandwidth against size, single copies and gathers, one line per source."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, src in doc["sources"].items():
        rows = src["single_copy"]
        axes[0].plot([r["bytes"] for r in rows], [r["GBps"] for r in rows], "o-", label=name)
        rows = src["gather"]
        axes[1].plot([r["block_bytes"] for r in rows], [r["GBps"] for r in rows], "o-", label=name)
    if "pinned_h2d_1GiB" in doc:  # none on the CPU twin
        axes[1].axhline(doc["pinned_h2d_1GiB"]["GBps"], ls="--", c="gray", label="pinned H2D 1 GiB")
    for ax, title, xlabel in (
        (axes[0], "one .copy_ of one block", "block bytes"),
        (axes[1], f"gather of {doc['gather_bytes'] // MiB} MiB in one launch", "block bytes"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("GB/s")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"CPU twin, {doc['device']}: a host lease read on the CPU (not GPU figures)"
        if doc.get("platform") == "cpu"
        else f"{doc['device']}: borrowed memory into the GPU"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    """Parse arguments; serve as the lender, or run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src-gpu", default="0", help="lender GPU: CUDA index or UUID")
    parser.add_argument("--dst-gpu", default="0", help="benchmark GPU: CUDA index or UUID")
    parser.add_argument("--sizes", default="16KiB..1GiB", help="single-copy sizes")
    parser.add_argument("--gather-blocks", default="16KiB..1MiB", help="gather block sizes")
    parser.add_argument("--gather-bytes", type=int, default=256 * MiB)
    parser.add_argument("--source-bytes", type=int, default=GiB)
    parser.add_argument("--out", default=str(REPO / "bench/results/bandwidth.json"))
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the CPU twin: a host lease against local memory, tiny sizes, a few seconds",
    )
    parser.add_argument("--serve-lender", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_lender is not None:
        serve_lender(args.serve_lender, args.src_gpu, args.source_bytes)
        return 0
    if args.smoke:
        for key, value in SMOKE.items():  # what the command line left at the GPU defaults
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
        doc = run_smoke(args)
    else:
        import torch

        if not torch.cuda.is_available():
            print("no CUDA GPU here: nothing to measure (try --smoke, the CPU twin)")
            return 2
        doc = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, out.with_suffix(".png"))
    if args.smoke:
        report_twin(doc)
    else:
        report(doc)
    print(f"wrote {out}")
    if args.smoke and not doc["gather_verified"]:
        print("the gather from the lease moved the wrong bytes")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
