"""The plumbing of the driver probes (bench_vmm_release, bench_driver_ramp): processes on
one GPU that talk JSON lines over a socket pair and pass VMM handles as file descriptors,
with nothing of Harvest between them, so that what they time is the CUDA driver itself.

Every process that touches CUDA is forked before any CUDA call (:func:`fork`): a forked
CUDA context is unusable.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

POSIX_FD = "CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR"


def send(sock: socket.socket, doc: dict[str, Any], fds: list[int] | None = None) -> None:
    """One JSON line to the other process, with ``fds`` passed alongside."""
    data = (json.dumps(doc) + "\n").encode()
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def recv(reader: Any) -> dict[str, Any]:
    """The next JSON line from ``reader`` (a socket's text file); exits if the other
    process went away."""
    line = reader.readline()
    if not line:
        raise SystemExit("the other process went away")
    return json.loads(line)


def timed(fn: Any, *args: Any) -> float:
    """Milliseconds ``fn(*args)`` took."""
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e3


def fork(program: Callable[..., None], *args: Any) -> tuple[socket.socket, int]:
    """Run ``program(sock, *args)`` in a child process; returns our end of its socket and
    its pid. Call before this process touches CUDA."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        ours.close()
        try:
            program(theirs, *args)
        finally:
            os._exit(0)
    theirs.close()
    return ours, pid


def lend(drv: Any, ordinal: int, count: int, size: int) -> tuple[list[list[Any]], dict]:
    """``count`` allocations of ``size`` made as a lender makes them (``cuMemCreate``,
    mapped, zeroed, exported as POSIX fds): ``[[handle, address, fd], ...]`` and the
    milliseconds of each step. Run inside ``cuda_driver.on_device(ordinal)``."""
    from lender.backends import cuda_driver as cu

    gran = cu.vmm_granularity(ordinal)
    posix = getattr(drv.CUmemAllocationHandleType, POSIX_FD)
    steps: dict[str, list[float]] = {"create": [], "map": [], "zero": [], "export": []}
    allocs = []
    for _ in range(count):
        t0 = time.perf_counter()
        handle = cu.check(drv.cuMemCreate(size, cu.vmm_prop(drv, ordinal), 0), "cuMemCreate")
        t1 = time.perf_counter()
        va = cu.map_range(drv, handle, size, ordinal, gran)
        t2 = time.perf_counter()
        cu.check(drv.cuMemsetD8(va, 0, size), "cuMemsetD8")
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
            steps[key].append((t_to - t_from) * 1e3)
        allocs.append([handle, va, fd])
    return allocs, steps


def holder(sock: socket.socket, ordinal: int) -> None:
    """The borrower: import and map what it is sent (``map``); on ``fence`` (with
    ``threads``), synchronise, unmap and release each, timing every call, and answer
    with the times."""
    from lender.backends import cuda_driver as cu

    drv = cu.driver()
    posix = getattr(drv.CUmemAllocationHandleType, POSIX_FD)
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
                send(sock, {"ms": (time.perf_counter() - t0) * 1e3})
            elif doc["cmd"] == "fence":
                steps: dict[str, list[float]] = {"sync": [], "unmap": [], "release": []}

                def fence(
                    item: tuple[Any, int, int], steps: dict[str, list[float]] = steps
                ) -> None:
                    with cu.on_device(ordinal):
                        handle, va, size = item
                        steps["sync"].append(timed(drv.cuCtxSynchronize))
                        steps["unmap"].append(timed(drv.cuMemUnmap, va, size))
                        steps["release"].append(timed(drv.cuMemRelease, handle))

                t0 = time.perf_counter()
                if doc["threads"] > 1:
                    with ThreadPoolExecutor(doc["threads"]) as pool:
                        list(pool.map(fence, maps))
                else:
                    for item in maps:
                        fence(item)
                wall = (time.perf_counter() - t0) * 1e3
                for _h, va, size in maps:
                    drv.cuMemAddressFree(va, size)
                maps.clear()
                send(sock, {"wall_ms": wall, "steps": steps, "ended": time.monotonic()})


def nvml_free(ordinal: int) -> int:
    """Free bytes on GPU ``ordinal`` as NVML sees them (``pynvml.nvmlInit`` done)."""
    import pynvml

    return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(ordinal)).free)


def wait_visible(ordinal: int, free_before: int, slack: int) -> float:
    """The monotonic time at which NVML shows the GPU's free memory back at
    ``free_before`` (less ``slack``); NaN after 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if nvml_free(ordinal) >= free_before - slack:
            return time.monotonic()
        time.sleep(0.0002)
    return float("nan")


def has_gpu(ordinal: int) -> bool:
    """Whether NVML sees GPU ``ordinal`` (NVML only: CUDA must not start before a fork)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return 0 <= ordinal < pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no library, no driver, no device: all say no GPU
        return False


def no_gpu(script: str, ordinal: int) -> bool:
    """True (having said why on stderr) when GPU ``ordinal`` is missing: a probe that
    measures the GPU itself has no CPU twin and exits 2."""
    if has_gpu(ordinal):
        return False
    print(f"{script}: needs NVIDIA GPU {ordinal} (NVML found none)", file=sys.stderr)
    return True
