"""A node of one lender that watches its device's tenant, for the benchmarks of the
tenant's side (bench_tenant_ramp, bench_reclaim): a broker and the lender as plain
processes (the same Lender class the daemon runs as a Ray actor), on a GPU or on the CPU
twin of one (a host device), and the reclaim traces that lender logs."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from benchkit.node import BenchNode, node_env
from harvestd.sizes import parse_size


@contextlib.contextmanager
def lender_node(args: argparse.Namespace, lender_id: str) -> Iterator[BenchNode]:
    """A broker and one lender in a fresh state dir. ``args``: ``smoke`` (the CPU twin:
    a host device of ``device_bytes``, whose path lands in ``args.host_device``) or
    ``gpu_uuid``; ``reserve``, ``peak_window``, and ``cap`` if set. The state dir goes
    at the end unless ``HARVEST_BENCH_KEEP_STATE=1``."""
    state = Path(tempfile.mkdtemp(prefix="hv-tenant-", dir="/tmp"))
    node = BenchNode(state, node_env(state))
    os.environ["HARVEST_STATE_DIR"] = str(state)
    lender = [sys.executable, "-m", "lender", "--id", lender_id, "--state-dir", str(state)]
    lender += ["--reserve", str(args.reserve), "--report-interval", "0.2"]
    lender += ["--peak-window", str(args.peak_window)]
    if getattr(args, "cap", None):
        lender += ["--cap", str(args.cap)]
    if args.smoke:
        from lender.host_device import HostDevice

        args.host_device = str(state / "device")
        HostDevice.create(args.host_device, parse_size(args.device_bytes)).close()
        lender += ["--backend", "host", "--host-device", args.host_device]
        lender += ["--host-bytes", args.device_bytes]
    else:
        lender += ["--backend", "cuda-vmm", "--gpu-uuid", args.gpu_uuid]
    broker = [sys.executable, "-m", "harvestd.broker", "--state-dir", str(state)]
    broker += ["--ttl", "30", "--grace", "2"]
    logs = open(state / "node.out", "ab")
    procs = [subprocess.Popen(broker, env=node.env, stdout=logs, stderr=logs)]
    try:
        wait(lambda: (state / "broker.sock").exists(), 60, "the broker")
        procs.append(subprocess.Popen(lender, env=node.env, stdout=logs, stderr=logs))
        wait(lambda: _up(node), 120, "the lender")
        yield node
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        logs.close()
        if os.environ.get("HARVEST_BENCH_KEEP_STATE") == "1":  # the node's logs, for a post-mortem
            print(f"kept the node's state dir (logs under it): {state}", file=sys.stderr)
        else:
            shutil.rmtree(state, ignore_errors=True)


def _up(node: BenchNode) -> bool:
    with contextlib.suppress(RuntimeError):
        return any(l["state"] == "up" for l in node.lenders())
    return False


def wait(predicate: Any, timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.1 s; RuntimeError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def reclaim_traces(node: BenchNode, lender_id: str) -> list[dict[str, Any]]:
    """The lender's reclaim traces (:class:`lender.tenant_watch.ReclaimTrace`), from its
    log, oldest first."""
    marker = "reclaim for the tenant: "
    path = node.state_dir / "logs" / f"lender-{lender_id}.log"
    if not path.exists():
        return []
    return [
        json.loads(line.split(marker, 1)[1])
        for line in path.read_text().splitlines()
        if marker in line
    ]


def gpu_uuid(gpu: str) -> str:
    """The UUID of GPU ``gpu`` (an NVML index or a UUID)."""
    import pynvml

    pynvml.nvmlInit()
    handle = (
        pynvml.nvmlDeviceGetHandleByIndex(int(gpu))
        if gpu.isdigit()
        else pynvml.nvmlDeviceGetHandleByUUID(gpu)
    )
    return str(pynvml.nvmlDeviceGetUUID(handle))


def slowest_take_ms(took_ms: list[float]) -> float:
    """The longest a ramping tenant waited for one piece: the largest gap between the
    times (ms from the ramp's start) at which it held each piece, the first counted from
    the start; rounded to the microsecond."""
    gaps = [b - a for a, b in zip([0.0, *took_ms[:-1]], took_ms, strict=True)]
    return round(max(gaps, default=0.0), 3)


def say(**msg: Any) -> None:
    """One JSON line from a worker to its driver."""
    print(json.dumps(msg), flush=True)


def worker_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every tenant benchmark shares: its worker role, the lender's GPU,
    the workers' device, and (``--smoke``) the host device."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--role", choices=("driver", "holder", "tenant"), default="driver")
    parser.add_argument("--gpu", default="0", help="the lender's GPU (index or UUID)")
    parser.add_argument("--device", default="", help="(workers) their device")
    parser.add_argument("--host-device", default="", help="(workers, --smoke) the twin")
    parser.add_argument("--smoke", action="store_true", help="the CPU twin, small sizes")
    return parser


class DeviceTenant:
    """A device's own job in a worker: it allocates on ``device`` (a CUDA device, or the
    CPU twin's host device at ``host_device``), failing as that device fails."""

    def __init__(self, device: str, host_device: str = "") -> None:
        self.blocks: list[Any] = []
        self.out_of_memory: tuple[type[BaseException], ...]
        if device.startswith("cuda"):
            import torch

            self._torch: Any = torch
            self._device = torch.device(device)
            torch.zeros(1, device=self._device)  # our own CUDA context first: it takes memory
            self.out_of_memory = (torch.OutOfMemoryError,)
            self._twin = None
        else:
            from harvestd.errors import NoCapacity
            from lender.host_device import HostDevice, HostTenant

            self._twin = HostTenant(HostDevice(host_device))
            self.out_of_memory = (NoCapacity,)

    def take(self, nbytes: int) -> Any:
        """``nbytes`` more (kept until :meth:`release`); raises one of
        ``out_of_memory`` when the device has no room."""
        if self._twin is not None:
            block = self._twin.allocate(nbytes)
        else:
            block = self._torch.empty(nbytes, dtype=self._torch.uint8, device=self._device)
            self._torch.cuda.synchronize(self._device)
        self.blocks.append(block)
        return block

    def release(self) -> None:
        """Give everything back."""
        self.blocks.clear()
        if self._twin is not None:
            self._twin.free_all()
        else:
            self._torch.cuda.empty_cache()
