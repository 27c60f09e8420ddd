#!/usr/bin/env python3
"""Where a reclaim's time goes inside the CUDA driver: the VMM calls that give lent memory
back, timed one by one, with the lender and a holder as two processes on one GPU.

A lender process makes COUNT allocations of SIZE (``cuMemCreate``, mapped and zeroed as
the lender does), exports each as a POSIX fd and hands them to a holder process, which
imports and maps them. Then, per ordering, the memory is given back and each driver call
is timed; ``visible`` is when NVML shows the GPU's free memory back where it was:

- ``holder-then-lender``: the holder fences each (sync, unmap, release), then the lender
  frees each (unmap, address free, release): what a reclaim does today;
- ``holder-then-lender-threads``: the same with 8 threads on each side;
- ``lender-released-first``: the lender releases its handles first (the pages stay while
  the holder maps them), then the holder fences: the pages go with the holder's release;
- ``lender-unmapped-early``: the lender unmapped its own view right after zeroing; at the
  reclaim it only releases its handle, after the holder's fence.

    python3 scripts/bench_vmm_release.py --gpu 0 --count 24 --size 4GiB

Needs a GPU (CUDA VMM with POSIX fds, NVML): without one it exits 2 and says so (it has
no CPU twin: it measures the driver itself). Writes bench/results/vmm_release.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchkit.multi import write_json
from benchkit.node import REPO

from harvestd.sizes import GiB, format_size, parse_size

ORDERINGS = (
    "holder-then-lender",
    "holder-then-lender-threads",
    "lender-released-first",
    "lender-unmapped-early",
)


def _send(sock: socket.socket, doc: dict[str, Any], fds: list[int] | None = None) -> None:
    data = (json.dumps(doc) + "\n").encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def _recv(reader: Any) -> dict[str, Any]:
    line = reader.readline()
    if not line:
        raise SystemExit("the other process went away")
    return json.loads(line)


def _timed(fn: Any, *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e3


def holder(sock: socket.socket, ordinal: int) -> None:
    """The borrower: import and map what it is sent; fence on command, timing each call."""
    from lender.backends import cuda_driver as cu

    drv = cu.driver()
    posix = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
    gran = cu.vmm_granularity(ordinal)
    maps: list[tuple[Any, int, int]] = []
    with cu.on_device(ordinal):
        while True:
            msg, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, 256)
            doc: dict[str, Any] = (
                json.loads(msg.decode().splitlines()[0]) if msg else {"cmd": "quit"}
            )
            if doc["cmd"] == "quit":
                return
            if doc["cmd"] == "map":
                size = doc["size"]
                t0 = time.perf_counter()
                for fd in fds:
                    handle = cu.check(drv.cuMemImportFromShareableHandle(fd, posix), "import")
                    os.close(fd)
                    va = cu.map_range(drv, handle, size, ordinal, gran)
                    maps.append((handle, va, size))
                _send(sock, {"ms": (time.perf_counter() - t0) * 1e3})
            elif doc["cmd"] == "fence":
                steps: dict[str, list[float]] = {"sync": [], "unmap": [], "release": []}

                def fence(
                    item: tuple[Any, int, int], steps: dict[str, list[float]] = steps
                ) -> None:
                    handle, va, size = item
                    steps["sync"].append(_timed(drv.cuCtxSynchronize))
                    steps["unmap"].append(_timed(drv.cuMemUnmap, va, size))
                    steps["release"].append(_timed(drv.cuMemRelease, handle))

                t0 = time.perf_counter()
                if doc["threads"] > 1:

                    def fence_on_device(item: tuple[Any, int, int]) -> None:
                        with cu.on_device(ordinal):
                            fence(item)

                    with ThreadPoolExecutor(doc["threads"]) as pool:
                        list(pool.map(fence_on_device, maps))
                else:
                    for item in maps:
                        fence(item)
                wall = (time.perf_counter() - t0) * 1e3
                for _h, va, size in maps:
                    drv.cuMemAddressFree(va, size)
                maps.clear()
                _send(sock, {"wall_ms": wall, "steps": steps})


def _nvml_free(ordinal: int) -> int:
    import pynvml

    return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(ordinal)).free)


def _wait_visible(ordinal: int, free_before: int, slack: int) -> float:
    """Milliseconds (monotonic) at which NVML shows the memory free again."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _nvml_free(ordinal) >= free_before - slack:
            return time.monotonic()
        time.sleep(0.0002)
    return float("nan")


def lender(sock: socket.socket, args: argparse.Namespace) -> dict[str, Any]:
    """Run each ordering on fresh allocations; return the timings."""
    import pynvml

    from lender.backends import cuda_driver as cu

    pynvml.nvmlInit()
    drv = cu.driver()
    ordinal = args.gpu
    reader = sock.makefile("r")
    rows = []
    with cu.on_device(ordinal):
        cu.check(drv.cuCtxSynchronize(), "sync")
        gran = cu.vmm_granularity(ordinal)
        posix = drv.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
        for rnd in range(args.rounds):
            for ordering in ORDERINGS:
                free_before = _nvml_free(ordinal)
                setup: dict[str, list[float]] = {"create": [], "map": [], "zero": [], "export": []}
                allocs = []
                for _ in range(args.count):
                    t0 = time.perf_counter()
                    handle = cu.check(
                        drv.cuMemCreate(args.size, cu.vmm_prop(drv, ordinal), 0), "cuMemCreate"
                    )
                    t1 = time.perf_counter()
                    va = cu.map_range(drv, handle, args.size, ordinal, gran)
                    t2 = time.perf_counter()
                    cu.check(drv.cuMemsetD8(va, 0, args.size), "cuMemsetD8")
                    cu.check(drv.cuCtxSynchronize(), "sync")
                    t3 = time.perf_counter()
                    fd = int(cu.check(drv.cuMemExportToShareableHandle(handle, posix, 0), "export"))
                    t4 = time.perf_counter()
                    for key, t_from, t_to in (
                        ("create", t0, t1),
                        ("map", t1, t2),
                        ("zero", t2, t3),
                        ("export", t3, t4),
                    ):
                        setup[key].append((t_to - t_from) * 1e3)
                    allocs.append([handle, va, fd])
                _send(sock, {"cmd": "map", "size": args.size}, [a[2] for a in allocs])
                for a in allocs:
                    os.close(a[2])
                imported_ms = _recv(reader)["ms"]
                early: list[float] = []
                if ordering == "lender-unmapped-early":
                    for a in allocs:
                        early.append(_timed(drv.cuMemUnmap, a[1], args.size))
                        drv.cuMemAddressFree(a[1], args.size)
                        a[1] = None
                time.sleep(0.2)
                lender_steps: dict[str, list[float]] = {
                    "unmap": [],
                    "address_free": [],
                    "release": [],
                }

                def free(a: list[Any], lender_steps: dict[str, list[float]] = lender_steps) -> None:
                    with cu.on_device(ordinal):
                        if a[1] is not None:
                            lender_steps["unmap"].append(_timed(drv.cuMemUnmap, a[1], args.size))
                            lender_steps["address_free"].append(
                                _timed(drv.cuMemAddressFree, a[1], args.size)
                            )
                        lender_steps["release"].append(_timed(drv.cuMemRelease, a[0]))

                threads = 8 if ordering.endswith("threads") else 1
                start = time.monotonic()
                lender_wall = 0.0
                if ordering == "lender-released-first":
                    t0 = time.perf_counter()
                    for a in allocs:
                        free(a)
                    lender_wall = (time.perf_counter() - t0) * 1e3
                _send(sock, {"cmd": "fence", "threads": threads})
                fenced = _recv(reader)
                if ordering != "lender-released-first":
                    t0 = time.perf_counter()
                    if threads > 1:
                        with ThreadPoolExecutor(threads) as pool:
                            list(pool.map(free, allocs))
                    else:
                        for a in allocs:
                            free(a)
                    lender_wall = (time.perf_counter() - t0) * 1e3
                visible = _wait_visible(ordinal, free_before, slack=args.size // 2)
                row = {
                    "round": rnd,
                    "ordering": ordering,
                    "count": args.count,
                    "size": args.size,
                    "setup_ms_median": {k: statistics.median(v) for k, v in setup.items()},
                    "import_and_map_ms": imported_ms,
                    "lender_early_unmap_ms": sum(early),
                    "holder_wall_ms": fenced["wall_ms"],
                    "holder_steps_ms": {k: _summary(v) for k, v in fenced["steps"].items()},
                    "lender_wall_ms": lender_wall,
                    "lender_steps_ms": {k: _summary(v) for k, v in lender_steps.items() if v},
                    "total_to_visible_ms": (visible - start) * 1e3,
                }
                rows.append(row)
                print(
                    f"{rnd} {ordering:28s} holder {fenced['wall_ms']:7.1f} ms "
                    f"(unmap {row['holder_steps_ms']['unmap']['median']:.2f}, release "
                    f"{row['holder_steps_ms']['release']['median']:.2f} median/call)  lender "
                    f"{lender_wall:7.1f} ms {json.dumps(row['lender_steps_ms'])}  "
                    f"visible {row['total_to_visible_ms']:7.1f} ms",
                    flush=True,
                )
    _send(sock, {"cmd": "quit"})
    return {"rows": rows}


def _summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "max": max(values),
        "sum": sum(values),
        "n": len(values),
    }


def _has_gpu(ordinal: int) -> bool:
    """Whether NVML sees GPU ``ordinal`` (NVML only: CUDA must not start before the fork)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return 0 <= ordinal < pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no library, no driver, no device: all say no GPU
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--count", type=int, default=24)
    parser.add_argument("--size", type=parse_size, default=4 * GiB)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench/results/vmm_release.json"))
    args = parser.parse_args()
    if not _has_gpu(args.gpu):
        print(f"bench_vmm_release: needs NVIDIA GPU {args.gpu} (NVML found none)", file=sys.stderr)
        return 2
    # Fork before either side touches CUDA: a forked CUDA context is unusable.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        ours.close()
        try:
            holder(theirs, args.gpu)
        finally:
            os._exit(0)
    theirs.close()
    doc = {
        "benchmark": "vmm_release",
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "count": args.count,
        "size": format_size(args.size),
        **lender(ours, args),
    }
    os.waitpid(pid, 0)
    print("wrote", write_json(doc, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
