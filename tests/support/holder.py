"""A client process under test that reports on stdout in JSON lines and takes commands on
stdin: what :meth:`support.nodes.Node.spawn` returns. The programs such processes run
are in :mod:`support.programs`."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import time
from typing import Any


class Holder:
    """A client process that speaks JSON lines on stdout and takes commands on stdin."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None, (
            "a holder's stdin, stdout and stderr must be pipes"
        )
        self.proc = proc
        self.pid = proc.pid
        self._stdin = proc.stdin
        self._stdout = proc.stdout
        self._stderr_pipe = proc.stderr

    def read(self, timeout: float = 30.0) -> dict[str, Any]:
        """The next JSON line the process printed."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("holder printed nothing in time; stderr: " + self._stderr())
            ready, _, _ = select.select([self._stdout], [], [], left)
            if ready:
                line = self._stdout.readline()
                if not line:
                    raise AssertionError("holder exited; stderr: " + self._stderr())
                if line.startswith("{"):
                    message: dict[str, Any] = json.loads(line)
                    return message

    def expect(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        """Read lines until one whose ``event`` is ``event``."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.read(max(0.1, deadline - time.monotonic()))
            if msg.get("event") == event:
                return msg

    def send(self, line: str) -> None:
        """Write a command line to the process's stdin (nothing if it has exited)."""
        if self.proc.poll() is not None:
            return
        try:
            self._stdin.write(line + "\n")
            self._stdin.flush()
        except BrokenPipeError:
            pass  # it exited between the check and the write

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self._stderr_pipe.read()[-3000:]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send a signal."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def finish(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit; its return code."""
        try:
            return self.proc.wait(timeout)
        finally:
            for stream in (self._stdin, self._stdout, self._stderr_pipe):
                try:
                    stream.close()
                except Exception:  # noqa: BLE001
                    pass
