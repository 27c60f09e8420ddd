"""Waiting for the signals that stop a Harvest process."""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_event() -> threading.Event:
    """An event set by SIGTERM or SIGINT (installs the handlers; main thread only)."""
    done = threading.Event()
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: done.set())
    return done


def wait_for_stop() -> None:
    """Block until SIGTERM or SIGINT."""
    stop_event().wait()
