"""`harvestd start` in the foreground (Ctrl-C stops it) and with the broker as a plain
process instead of a Ray actor."""

from __future__ import annotations

import shutil
import signal
import subprocess

from support.env import PY, node_env
from support.nodes import Node
from support.sockets import short_tmpdir
from support.waiting import wait_for


def test_foreground_start_stops_on_ctrl_c():
    node = Node(short_tmpdir())
    proc = subprocess.Popen(
        [
            PY,
            "-m",
            "harvestd",
            "start",
            "--backend",
            "host",
            "--host-bytes",
            "16MiB",
            "--state-dir",
            str(node.state_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=node_env(),
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = proc.stdout.readline()
        assert "ready" in line, proc.stderr.read() if proc.poll() is not None else line
        assert node.json("status")["lenders_up"] == 1
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        assert not (node.state_dir / "node.json").exists()
        assert node.cli("status").returncode == 2
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(node.state_dir, ignore_errors=True)


def test_broker_as_plain_process():
    node = Node(short_tmpdir())
    try:
        result = node.cli(
            "start",
            "--detach",
            "--no-ray-broker",
            "--backend",
            "host",
            "--host-bytes",
            "16MiB",
            timeout=240,
        )
        assert result.returncode == 0, result.stderr
        status = node.json("status")
        broker_cmd = open(f"/proc/{status['broker_pid']}/cmdline").read()
        assert "harvestd.broker" in broker_cmd
        with node.connect() as client, client.lease(1 << 20) as lease:
            assert lease.lender.endswith("host0")
        assert node.cli("stop").returncode == 0
        wait_for(
            lambda: (
                subprocess.run(
                    ["kill", "-0", str(status["broker_pid"])], capture_output=True
                ).returncode
                != 0
            ),
            what="the broker process to exit",
        )
    finally:
        node.cli("stop")
        shutil.rmtree(node.state_dir, ignore_errors=True)
