"""``harvestd revoke``, ``drain``, ``reclaim`` and ``restore``: an operator changing leases."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable

import click

from harvestd.cli.group import Seconds, cli, one_line, size_argument, state_dir_option
from harvestd.cli.rpc import call, enum_name
from harvestd.errors import HarvestError
from harvestd.node import pid_alive
from harvestd.paths import node_name
from harvestd.service import MAX_WAIT_S
from harvestd.sizes import format_size
from protos import harvest_pb2 as pb


@cli.command()
@state_dir_option
@click.argument("lease_id")
@click.option("--force", is_flag=True, help="End it now, without the holder's acknowledgement.")
@click.option(
    "--kill-holder",
    is_flag=True,
    help="Also kill the holder's process (SIGKILL), the only way to make the "
    "driver release pages a stuck holder still maps. Implies --force.",
)
@click.option("--reason", default="revoked by operator")
def revoke(state_dir, lease_id, force, kill_holder, reason) -> None:
    """Revoke one lease: the holder is told, fences and acknowledges."""
    holder_pid = 0
    if kill_holder:
        force = True
        rows = call(state_dir, "ListLeases", pb.ListLeasesRequest()).leases
        lease = next((l for l in rows if l.id == lease_id), None)
        if lease is not None and lease.node == node_name(state_dir):
            holder_pid = lease.holder_pid
    reply = call(
        state_dir, "Revoke", pb.RevokeRequest(lease_id=lease_id, reason=reason, force=force)
    )
    click.echo(f"lease {one_line(lease_id)} {enum_name(pb.LeaseState, reply.lease.state)}")
    if holder_pid and holder_pid != os.getpid() and pid_alive(holder_pid):
        try:
            os.kill(holder_pid, signal.SIGKILL)
        except PermissionError:
            raise HarvestError(f"not allowed to kill holder pid {holder_pid}") from None
        click.echo(f"holder pid {holder_pid} killed")


def _wait_command(
    state_dir, method: str, request, timeout: float, describe: Callable[[Any], str]
) -> None:
    """Run a call that waits for memory to come free, showing on a terminal how many of
    the lender's leases are still on their way out."""
    import threading

    result: dict[str, Any] = {}

    def wait() -> None:
        try:
            result["reply"] = call(state_dir, method, request, timeout=(timeout or 60.0) + 10)
        except HarvestError as err:
            result["error"] = err

    worker = threading.Thread(target=wait, daemon=True)
    worker.start()
    if sys.stderr.isatty():
        from rich.console import Console

        with Console(stderr=True).status(f"{method.lower()} on {request.lender_id}") as shown:
            while worker.is_alive():
                worker.join(0.2)
                try:
                    going = [
                        l
                        for l in call(
                            state_dir,
                            "ListLeases",
                            pb.ListLeasesRequest(lender_id=request.lender_id),
                        ).leases
                        if l.state == pb.REVOKING
                    ]
                    shown.update(
                        f"{method.lower()} on {request.lender_id}: {len(going)} "
                        "leases still being revoked"
                    )
                except HarvestError:
                    pass
    worker.join()
    if "error" in result:
        raise result["error"]
    click.echo(describe(result["reply"]))


@cli.command()
@state_dir_option
@click.argument("lender_id")
@click.option(
    "--timeout",
    type=Seconds(most=MAX_WAIT_S),
    default=0.0,
    help="Seconds to wait for the memory (default: the grace period + 2).",
)
def drain(state_dir, lender_id, timeout) -> None:
    """Stop a lender's grants and revoke all its leases."""
    _wait_command(
        state_dir,
        "Drain",
        pb.DrainRequest(lender_id=lender_id, timeout_s=timeout),
        timeout,
        lambda r: (
            f"lender {lender_id} draining: {len(r.revoked)} leases "
            f"revoked, memory {'free' if r.freed else 'not yet free'}"
        ),
    )


@cli.command()
@state_dir_option
@click.option("--lender", "lender_id", required=True, help="The lender whose tenant reclaims.")
@click.option(
    "--bytes",
    "nbytes",
    required=True,
    callback=size_argument,
    help="How much memory the tenant takes back (e.g. 512MiB).",
)
@click.option(
    "--timeout",
    type=Seconds(most=MAX_WAIT_S),
    default=0.0,
    help="Seconds to wait for the memory (default: the grace period + 2).",
)
def reclaim(state_dir, lender_id, nbytes, timeout) -> None:
    """Act as a lender's tenant: take memory back, revoking just enough leases."""
    _wait_command(
        state_dir,
        "Reclaim",
        pb.ReclaimRequest(lender_id=lender_id, nbytes=nbytes, timeout_s=timeout),
        timeout,
        lambda r: (
            f"reclaimed {format_size(nbytes)} on {lender_id}: {len(r.revoked)} leases "
            f"revoked, memory {'free' if r.freed else 'NOT free yet'} after "
            f"{r.elapsed_s * 1e3:.1f} ms (tenant holds {format_size(r.reclaimed)})"
        ),
    )


@cli.command()
@state_dir_option
@click.option("--lender", "lender_id", required=True)
@click.option(
    "--bytes",
    "nbytes",
    callback=size_argument,
    default="0",
    help="How much to give back to lending (default: all).",
)
def restore(state_dir, lender_id, nbytes) -> None:
    """Give memory a tenant reclaimed back to lending (and end a drain)."""
    reply = call(state_dir, "Restore", pb.RestoreRequest(lender_id=lender_id, nbytes=nbytes))
    click.echo(f"lender {lender_id}: tenant holds {format_size(reply.reclaimed)}")
