"""``harvestd doctor``: what Harvest needs on this machine, checked one by one, each
missing piece with its fix."""

from __future__ import annotations

import importlib.metadata
import os
import stat
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Check:
    """One finding: ``ok`` is True, False, or None for not applicable here."""

    name: str
    ok: bool | None
    detail: str
    fix: str = ""

    def to_json(self) -> dict:
        """Plain dict for ``--json``."""
        return asdict(self)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_python_packages() -> list[Check]:
    """Ray, torch, grpc and the GPU extra's cuda-bindings."""
    checks = []
    for package, _need, fix in (
        ("ray", "2.40", "pip install 'ray>=2.40'"),
        ("torch", "2.4", "pip install 'torch>=2.4'"),
        ("grpcio", "1.66", "pip install 'grpcio>=1.75'"),
        ("protobuf", "5.28", "pip install 'protobuf>=6.31'"),
    ):
        have = _version(package)
        checks.append(
            Check(
                f"{package} installed",
                have is not None,
                f"{package} {have}" if have else f"{package} is missing",
                fix,
            )
        )
    have = _version("cuda-bindings") or _version("cuda-python")
    checks.append(
        Check(
            "cuda-bindings (GPU lending)",
            have is not None,
            f"cuda-bindings {have}"
            if have
            else "cuda-bindings is missing: GPU memory cannot be lent or mapped",
            "pip install 'harvest[gpu]'  (cuda-bindings matching your driver)",
        )
    )
    return checks


def check_gpus() -> list[Check]:
    """Driver and CUDA versions, VMM and fd handles per GPU, peer access and NVLink per pair."""
    checks: list[Check] = []
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - no driver is a finding, not a crash
        return [
            Check(
                "NVIDIA driver (NVML)",
                False,
                f"NVML unavailable: {exc}",
                "install the NVIDIA driver; without a GPU Harvest lends host memory "
                "(harvestd start --backend host)",
            )
        ]
    driver = pynvml.nvmlSystemGetDriverVersion()
    cuda = pynvml.nvmlSystemGetCudaDriverVersion()
    checks.append(
        Check(
            "NVIDIA driver",
            True,
            f"driver {_text(driver)}, CUDA {cuda // 1000}.{cuda % 1000 // 10}",
        )
    )
    from lender.gpus import discover_gpus

    gpus = discover_gpus()
    if not gpus:
        checks.append(
            Check(
                "GPUs",
                False,
                "NVML answers but reports no GPU",
                "check nvidia-smi; lend host memory meanwhile",
            )
        )
    for gpu in gpus:
        checks.append(
            Check(
                f"GPU {gpu.index} VMM",
                gpu.vmm_supported,
                f"{gpu.name} {gpu.uuid}: virtual memory management "
                + ("supported" if gpu.vmm_supported else "NOT supported"),
                "use --backend cuda-ipc (weaker revocation guarantees)",
            )
        )
        checks.append(
            Check(
                f"GPU {gpu.index} fd handles",
                gpu.fd_handles_supported,
                "POSIX file-descriptor handles "
                + ("supported" if gpu.fd_handles_supported else "NOT supported"),
                "use --backend cuda-ipc, or a driver that exports fd handles",
            )
        )
    checks += [_placed_path(gpu.index, gpu.uuid) for gpu in gpus]
    for a in gpus:
        for b in gpus:
            if a.index < b.index:
                links = a.nvlinks.get(b.uuid, 0)
                checks.append(
                    Check(
                        f"GPU {a.index} <-> GPU {b.index}",
                        True,
                        f"{links} NVLink links" if links else "no NVLink: peer reads go over PCIe",
                    )
                )
    return checks


def _placed_path(index: int, uuid: str) -> Check:
    """Which path placed tensors take on a GPU: read in place, where the driver can map
    pinned host memory through the VMM API (the authoritative copy), or the copy path."""
    name = f"GPU {index} placed tensors"
    try:
        from lender.backends import cuda_driver
        from lender.backends.vmm_host import host_location

        _, granularity, where = host_location(cuda_driver.ordinal_of_uuid(uuid))
    except Exception as exc:  # noqa: BLE001 - no bindings, no VMM host memory: a finding
        return Check(
            name,
            False,
            f"copy path: the driver cannot map VMM host memory here ({exc})",
            "workloads fetch into staging (placement='copy'); a driver with host-NUMA "
            "cuMemCreate (CUDA 12.2+) reads placed tensors in place",
        )
    return Check(
        name,
        True,
        f"in place: the authoritative copy in {where} memory, chunks of "
        f"{granularity >> 20} MiB (c.place, placement='placed')",
    )


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def check_state_dir(root: Path) -> list[Check]:
    """The state dir exists (or can be made), belongs to this user, and is private."""
    if not root.exists():
        parent = next((p for p in root.parents if p.exists()), Path("/"))
        ok = os.access(parent, os.W_OK)
        return [
            Check(
                "state dir",
                ok,
                f"{root} does not exist yet; "
                + ("it will be created" if ok else f"{parent} is not writable"),
                "" if ok else "choose another --state-dir",
            )
        ]
    info = root.stat()
    checks = [
        Check(
            "state dir owner",
            info.st_uid == os.getuid(),
            f"{root} belongs to uid {info.st_uid}",
            f"chown {os.getuid()} {root}",
        )
    ]
    private = not info.st_mode & (stat.S_IRWXG | stat.S_IRWXO)
    checks.append(
        Check(
            "state dir private",
            private,
            f"{root} mode {oct(info.st_mode & 0o777)}",
            f"chmod 700 {root}",
        )
    )
    checks.append(
        Check(
            "state dir writable",
            os.access(root, os.W_OK),
            str(root),
            f"make {root} writable, or choose another --state-dir",
        )
    )
    return checks


def run_checks(state_dir: Path) -> list[Check]:
    """Every check, in the order ``doctor`` prints them."""
    return check_python_packages() + check_gpus() + check_state_dir(state_dir)
