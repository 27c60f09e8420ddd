"""Harvest's settings: defaults, one TOML file (``--config``), ``HARVEST_*`` environment
variables over it, and command-line flags over those; every value remembers where it
came from, and every mistake is reported at once, one line per key.

    # harvest.toml
    backend = "auto"          # auto | host | cuda-vmm | cuda-ipc
    host_bytes = "8GiB"       # lend host memory too (always, where no GPU is found)
    gpus = ["0", "1"]         # which GPUs lend (indexes or UUIDs; default all)
    reserve = "10%"           # kept for each GPU's own tenant: bytes or a percentage
    cap = "40GiB"             # lend at most this much per GPU
    ttl = 30.0                # default lease TTL, seconds
    grace = 5.0               # seconds a holder has to acknowledge a revocation
    metrics_port = 9400       # Prometheus metrics: broker here, lenders on the next ports
    log_format = "json"       # text | json

    [gpu.1]                   # per GPU (index or UUID): reserve and cap
    reserve = "20GiB"
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harvestd.errors import InvalidArgument
from harvestd.sizes import parse_size
from harvestd.table import MAX_LEASE_BYTES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "HARVEST_"
ENV_CONFIG = "HARVEST_CONFIG"


def _size(value: Any) -> int:
    size = parse_size(value)
    if size < 0:
        raise InvalidArgument("must not be negative")
    return size


def _lendable_size(value: Any) -> int:
    # The broker refuses a lender whose capacity is past this: say so before starting.
    size = _size(value)
    if size > MAX_LEASE_BYTES:
        raise InvalidArgument(f"must be at most {MAX_LEASE_BYTES} bytes")
    return size


def _positive_size(value: Any) -> int:
    size = _size(value)
    if size <= 0:
        raise InvalidArgument("must be positive")
    return size


def _seconds(value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"expected seconds, got {value!r}") from None
    if not 0 < seconds < 1e7:
        raise InvalidArgument(f"must be a positive number of seconds, got {value!r}")
    return seconds


def _window(value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"expected seconds, got {value!r}") from None
    if not 0 <= seconds < 1e7:
        raise InvalidArgument(f"must be 0 or a positive number of seconds, got {value!r}")
    return seconds


def _reserve(value: Any) -> str:
    text = str(value).strip()
    if text.endswith("%"):
        try:
            fraction = float(text[:-1]) / 100
        except ValueError:
            raise InvalidArgument(f"{text!r} is not a percentage") from None
        if not 0 <= fraction < 1:
            raise InvalidArgument("must be between 0% and 100%")
        return text
    _size(text)
    return text


def _choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        text = str(value).lower()
        if text not in options:
            raise InvalidArgument(f"must be one of {', '.join(options)}; got {value!r}")
        return text

    return parse


def _port(value: Any) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"expected a port number, got {value!r}") from None
    if not 0 <= port <= 65535:
        raise InvalidArgument(f"must be between 0 and 65535, got {port}")
    return port


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"expected a string, got {value!r}")
    return value


def _gpus(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise InvalidArgument(f"expected a list of GPU indexes or UUIDs, got {value!r}")
    return [str(v).strip() for v in value]


@dataclass(frozen=True)
class Setting:
    """One setting: its parser, default and help."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str

    @property
    def env(self) -> str:
        """The environment variable that overrides it."""
        return ENV_PREFIX + self.name.upper()


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting(
            "state_dir",
            _string,
            "",
            "state directory (default: $XDG_RUNTIME_DIR/harvest, else ~/.cache/harvest)",
        ),
        Setting("ray_address", _string, "", "Ray cluster to join (default: start a local one)"),
        Setting("backend", _choice("auto", "host", "cuda-vmm", "cuda-ipc"), "auto", "what to lend"),
        Setting(
            "host_bytes",
            _lendable_size,
            None,
            "host memory to lend (default 1GiB without GPUs, none beside them)",
        ),
        Setting("gpus", _gpus, [], "GPUs that lend (default: all)"),
        Setting("reserve", _reserve, "10%", "GPU memory kept for its tenant: bytes or percent"),
        Setting("cap", _size, 0, "lend at most this much per GPU (0: no cap)"),
        Setting(
            "peak_window",
            _window,
            300.0,
            "seconds the tenant's peak use keeps memory out of lending (0: its use now only)",
        ),
        Setting(
            "host_device",
            _string,
            "",
            "host lender: lend from this host device file, shared with a tenant "
            "(the CPU twin of a GPU; made with --host-bytes as its size if missing)",
        ),
        Setting("ttl", _seconds, 30.0, "default lease TTL in seconds"),
        Setting("grace", _seconds, 5.0, "seconds a holder has to acknowledge a revocation"),
        Setting("listen", _string, "", "also serve gRPC on this loopback HOST:PORT"),
        Setting(
            "metrics_port",
            _port,
            0,
            "Prometheus port of the broker; lenders use the next ones (0: off)",
        ),
        Setting("log_format", _choice("text", "json"), "text", "log line format"),
        Setting("log_level", _choice("debug", "info", "warning", "error"), "info", "log level"),
        Setting(
            "ray_broker",
            lambda v: v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes"),
            True,
            "run the broker as a Ray actor (else a process)",
        ),
    ]
}
GPU_KEYS = {"reserve": _reserve, "cap": _size}


@dataclass
class Config:
    """The settings in force, and where each came from."""

    values: dict[str, Any]
    sources: dict[str, str]
    per_gpu: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


def load_config(
    path: str | os.PathLike | None = None,
    flags: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> Config:
    """Defaults, then the TOML file (``path`` or ``$HARVEST_CONFIG``), then ``HARVEST_*``
    variables, then ``flags`` (None values are not set). Raises InvalidArgument listing
    every mistake, one per line, each naming its key."""
    env = dict(os.environ if env is None else env)
    values = {name: s.default for name, s in SETTINGS.items()}
    sources = {name: "default" for name in SETTINGS}
    per_gpu: dict[str, dict[str, Any]] = {}
    errors: list[str] = []

    def put(name: str, raw: Any, source: str) -> None:
        try:
            values[name] = SETTINGS[name].parse(raw)
            sources[name] = source
        except InvalidArgument as err:
            errors.append(f"{name} ({source}): {err}")

    path = path or env.get(ENV_CONFIG)
    if path:
        data = _read_toml(Path(path))
        for key, raw in data.items():
            if key == "gpu" and isinstance(raw, dict):
                for gpu, table in raw.items():
                    per_gpu[str(gpu)] = _gpu_table(str(gpu), table, path, errors)
            elif key in SETTINGS:
                put(key, raw, f"file {path}")
            else:
                errors.append(f"{key} (file {path}): unknown setting")
    for name, setting in SETTINGS.items():
        if env.get(setting.env, "") != "":
            put(name, env[setting.env], f"env {setting.env}")
    for name, raw in (flags or {}).items():
        if raw is not None:
            put(name, raw, "flag --" + name.replace("_", "-"))
    if errors:
        raise InvalidArgument("\n".join(errors))
    return Config(values, sources, per_gpu)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise InvalidArgument(f"config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgument(f"config file {path} is not valid TOML: {exc}") from None


def _gpu_table(gpu: str, table: Any, path: str | os.PathLike, errors: list[str]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    if not isinstance(table, dict):
        errors.append(f"gpu.{gpu} (file {path}): expected a table of reserve and cap")
        return parsed
    for key, raw in table.items():
        if key not in GPU_KEYS:
            errors.append(f"gpu.{gpu}.{key} (file {path}): unknown setting")
            continue
        try:
            parsed[key] = GPU_KEYS[key](raw)
        except InvalidArgument as err:
            errors.append(f"gpu.{gpu}.{key} (file {path}): {err}")
    return parsed
