"""Operating Harvest: `doctor` on this GPU-less machine, configuration files and their
mistakes, where each setting came from, and JSON logs."""

from __future__ import annotations

import json
import logging

import pytest
from support.nodes import Node
from support.sockets import short_tmpdir

from harvestd.config import load_config
from harvestd.errors import InvalidArgument
from harvestd.logs import JsonFormatter


@pytest.fixture
def node():
    return Node(short_tmpdir())


def test_doctor_names_what_is_absent(node):
    result = node.cli("doctor")
    has_gpu = False
    try:
        import pynvml

        pynvml.nvmlInit()
        has_gpu = pynvml.nvmlDeviceGetCount() > 0
    except Exception:  # noqa: BLE001 - no driver here
        pass
    checks = {c["name"]: c for c in json.loads(node.cli("doctor", "--json").stdout)}
    assert checks["ray installed"]["ok"] is True
    if not has_gpu:
        assert result.returncode == 1
        assert "MISSING NVIDIA driver" in result.stdout and "fix:" in result.stdout
        assert checks["NVIDIA driver (NVML)"]["ok"] is False
    node.state_dir.chmod(0o755)
    checks = {c["name"]: c for c in json.loads(node.cli("doctor", "--json").stdout)}
    assert checks["state dir private"]["ok"] is False
    assert "chmod 700" in checks["state dir private"]["fix"]


def test_config_errors_exit_2_naming_each_key(node, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('ttl = "soon"\nreserve = "150%"\nfrobs = 3\n[gpu.0]\ncap = "-1"\n')
    result = node.cli("config", "--config", str(bad))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    for key in ("ttl", "reserve", "frobs", "gpu.0.cap"):
        assert key in result.stderr
    result = node.cli("start", "--config", str(bad))
    assert result.returncode == 2 and "ttl" in result.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("ttl = = 3")
    assert "not valid TOML" in node.cli("config", "--config", str(broken)).stderr
    assert "No such file" in node.cli("config", "--config", str(tmp_path / "nope")).stderr


def test_config_precedence_and_sources(tmp_path):
    path = tmp_path / "h.toml"
    path.write_text(
        'ttl = 12\ngrace = 2\nreserve = "8GiB"\ngpus = ["0", "2"]\n'
        '[gpu.2]\nreserve = "20%"\ncap = "40GiB"\n'
    )
    config = load_config(
        path,
        flags={"grace": "3", "backend": None},
        env={"HARVEST_TTL": "20", "HARVEST_LOG_FORMAT": "json"},
    )
    assert config.ttl == 20.0 and config.sources["ttl"] == "env HARVEST_TTL"
    assert config.grace == 3.0 and config.sources["grace"] == "flag --grace"
    assert config.reserve == "8GiB" and config.sources["reserve"] == f"file {path}"
    assert config.backend == "auto" and config.sources["backend"] == "default"
    assert config.log_format == "json" and config.gpus == ["0", "2"]
    assert config.per_gpu == {"2": {"reserve": "20%", "cap": 40 << 30}}
    with pytest.raises(InvalidArgument, match="metrics_port"):
        load_config(None, env={"HARVEST_METRICS_PORT": "99999"})


def test_config_command_shows_sources(node, tmp_path):
    path = tmp_path / "h.toml"
    path.write_text("ttl = 12\n")
    out = json.loads(node.cli("config", "--config", str(path), "--grace", "2", "--json").stdout)
    assert out["settings"]["ttl"] == {"value": 12.0, "source": f"file {path}"}
    assert out["settings"]["grace"] == {"value": 2.0, "source": "flag --grace"}
    assert out["settings"]["state_dir"]["source"] == "flag --state-dir"


def test_json_log_lines_carry_ids():
    record = logging.LogRecord(
        "harvestd.table", logging.INFO, __file__, 1, "lease %s revoked", ("lease-1",), None
    )
    record.lease, record.lender = "lease-1", "gpu0"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "lease lease-1 revoked" and line["lease"] == "lease-1"
    assert line["lender"] == "gpu0" and line["level"] == "info"


def test_json_log_lines_name_leases_passed_as_arguments():
    record = logging.LogRecord(
        "client.lease",
        logging.INFO,
        __file__,
        1,
        "lease %s %s: %s",
        ("lease-abc", "revoked", "why"),
        None,
    )
    assert json.loads(JsonFormatter().format(record))["lease"] == "lease-abc"
