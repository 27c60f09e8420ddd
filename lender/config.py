"""What one lender lends and where it reports: its settings, shared by the lender, its
capacity rules and the node that starts it."""

from __future__ import annotations

from dataclasses import dataclass

from lender.backends.base import BackendKind
from lender.tenant import DEFAULT_PEAK_WINDOW_S


@dataclass(frozen=True)
class LenderConfig:
    """What one lender lends and where it reports."""

    lender_id: str
    state_dir: str
    broker_address: str
    backend: str = BackendKind.HOST.value
    host_bytes: int = 1 << 30
    gpu_uuid: str = ""
    reserve_bytes: int = 0
    reserve_fraction: float = 0.0
    cap_bytes: int = 0  # 0: no cap
    # How long the tenant's peak use keeps memory out of lending (lender.tenant).
    peak_window_s: float = DEFAULT_PEAK_WINDOW_S
    # The CPU twin of a GPU's memory (lender.host_device): a host lender with this set
    # lends from a device shared with a tenant, and watches that tenant as a GPU lender
    # watches its GPU's. Empty: a fixed budget of host_bytes, reclaimed by asking.
    host_device: str = ""
    node: str = ""
    report_interval_s: float = 1.0
    pressure_interval_s: float = 0.005  # how often a lender looks at its tenant (NVML)
    # CUDA_VISIBLE_DEVICES as the daemon saw it (None: unset). Ray rewrites the variable
    # in actors that ask for no GPU; the lender restores the node's own view, then finds
    # its GPU by UUID.
    cuda_visible_devices: str | None = None
    metrics_port: int = 0  # 0: no metrics endpoint
    log_format: str = "text"
    log_level: str = "info"
    ray_node_id: str = ""  # set by the actor: the Ray node it runs on
