"""`harvestd top` driven in a real pseudo-terminal: it shows a lease a test created and
quits on `q`; Ctrl-C quits too."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time

from support.env import PY, node_env

from harvestd.sizes import MiB

ANSI = re.compile(rb"\x1b\[[0-9;?]*[a-zA-Z]")


def _top(node):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 220, 0, 0))
    proc = subprocess.Popen(
        [PY, "-m", "harvestd", "top", "--interval", "0.2", "--state-dir", str(node.state_dir)],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=node_env(TERM="xterm-256color"),
        start_new_session=True,
    )
    os.close(slave)
    return proc, master


def _screen_until(master: int, needle: bytes, timeout: float = 30.0) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                seen += os.read(master, 65536)
            except OSError:
                break
            if needle in ANSI.sub(b"", seen):
                return ANSI.sub(b"", seen)
    raise AssertionError(f"{needle!r} never appeared; screen: {ANSI.sub(b'', seen)[-2000:]!r}")


def _exit_code(proc, master: int, timeout: float = 10.0) -> int:
    """Wait for the exit while draining the terminal, as a real one would."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                os.read(master, 65536)
            except OSError:
                pass
    return proc.wait(1)


def test_top_shows_a_lease_and_quits_on_q(plain_node):
    with plain_node.connect() as client, client.lease(3 * MiB) as lease:
        proc, master = _top(plain_node)
        try:
            screen = _screen_until(master, lease.id.encode())
            assert plain_node.id.encode() in screen and b"3.0 MiB" in screen
            os.write(master, b"q")
            assert _exit_code(proc, master) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            os.close(master)


def test_top_quits_on_ctrl_c(plain_node):
    proc, master = _top(plain_node)
    try:
        _screen_until(master, b"lenders")
        os.killpg(proc.pid, signal.SIGINT)
        assert _exit_code(proc, master) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
