"""``harvestd top``: a live view of the node, refreshed in place (rich); ``q`` or Ctrl-C
quits."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import threading
import time
import tty
from typing import Callable, Iterator

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from harvestd.sizes import format_size
from protos import harvest_pb2 as pb

Fetch = Callable[[], "tuple[pb.StatusReply, list[pb.Lender], list[pb.Lease]]"]
RECENT = 8


def _name(enum, value: int, prefix: str = "") -> str:
    return enum.Name(value).removeprefix(prefix).lower().replace("_", "-")


def render(
    status: pb.StatusReply,
    lenders: list[pb.Lender],
    leases: list[pb.Lease],
    now: float | None = None,
) -> Group:
    """One frame: summary, lenders (with their GPUs and links), live leases, and the
    most recent revocations and expiries."""
    now = now or time.time()
    head = Text(
        f"harvest {status.version}  broker {status.address}  generation "
        f"{status.generation}  lenders up {status.lenders_up}  leases "
        f"{status.leases_active}  granted {format_size(status.bytes_granted)} of "
        f"{format_size(status.bytes_lendable)}   (q quits)",
        style="bold",
    )
    lender_table = Table(title="lenders", box=box.SIMPLE_HEAD, title_justify="left")
    for column in (
        "id",
        "node",
        "backend",
        "gpu",
        "links",
        "device used",
        "lent",
        "lendable",
        "free to lend",
        "reclaimed",
        "state",
    ):
        lender_table.add_column(column, no_wrap=True)
    for l in lenders:
        used = (
            format_size(l.device_total - l.device_free) + " / " + format_size(l.device_total)
            if l.device_total
            else "-"
        )
        links = ", ".join(f"{p.peer_uuid[:12]}×{p.nvlinks}" for p in l.links if p.nvlinks) or "-"
        lendable = max(0, l.capacity - l.reclaimed)
        lender_table.add_row(
            l.id,
            l.node,
            _name(pb.Backend, l.backend, "BACKEND_"),
            str(l.gpu_index) if l.gpu_uuid else "-",
            links,
            used,
            format_size(l.granted),
            format_size(lendable),
            format_size(max(0, lendable - l.granted)),
            format_size(l.reclaimed),
            _name(pb.LenderState, l.state, "LENDER_"),
        )
    live = [l for l in leases if l.state in (pb.GRANTED, pb.REVOKING)]
    lease_table = Table(title=f"leases ({len(live)})", box=box.SIMPLE_HEAD, title_justify="left")
    for column in ("id", "lender", "size", "state", "holder pid", "expires in"):
        lease_table.add_column(column, no_wrap=True)
    for l in sorted(live, key=lambda l: l.created_at, reverse=True):
        lease_table.add_row(
            l.id,
            l.lender_id,
            format_size(l.nbytes),
            _name(pb.LeaseState, l.state),
            str(l.holder_pid),
            f"{l.expires_at - now:.1f}s",
        )
    ended = sorted(
        (l for l in leases if l.state in (pb.REVOKED, pb.EXPIRED)),
        key=lambda l: l.created_at,
        reverse=True,
    )[:RECENT]
    recent = Table(
        title="recent revocations and expiries", box=box.SIMPLE_HEAD, title_justify="left"
    )
    for column in ("id", "lender", "size", "state", "holder pid", "why"):
        recent.add_column(column, no_wrap=True)
    for l in ended:
        recent.add_row(
            l.id,
            l.lender_id,
            format_size(l.nbytes),
            _name(pb.LeaseState, l.state),
            str(l.holder_pid),
            l.reason,
        )
    return Group(head, lender_table, lease_table, recent)


@contextlib.contextmanager
def _keys() -> Iterator[Callable[[float], str]]:
    """Read single keys from the terminal without waiting for Enter."""
    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd) if os.isatty(fd) else None
    if old is not None:
        tty.setcbreak(fd)

    def read(timeout: float) -> str:
        ready, _, _ = select.select([fd], [], [], timeout)
        return os.read(fd, 1).decode(errors="ignore") if ready else ""

    try:
        yield read
    finally:
        if old is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, old)


def run_top(fetch: Fetch, interval: float = 1.0, console: Console | None = None) -> None:
    """Redraw every ``interval`` seconds until ``q`` or Ctrl-C."""
    console = console or Console()
    stop = threading.Event()
    # A flag, not KeyboardInterrupt: Ctrl-C must end the loop cleanly wherever it lands.
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        with (
            _keys() as key,
            Live(render(*fetch()), console=console, screen=True, auto_refresh=False) as live,
        ):
            while not stop.is_set():
                if key(interval) in ("q", "Q"):
                    return
                if not stop.is_set():
                    live.update(render(*fetch()), refresh=True)
    finally:
        signal.signal(signal.SIGINT, previous)
