"""``harvestd status``, ``lenders``, ``leases``, ``top`` and ``doctor``: reading a node."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from harvestd.cli.group import Seconds, cli, json_option, state_dir_option
from harvestd.cli.rpc import call, enum_name
from harvestd.paths import StateDir
from harvestd.sizes import format_size
from protos import harvest_pb2 as pb


def lease_json(lease: pb.Lease) -> dict[str, Any]:
    """The JSON form of a lease (``harvestd leases --json``)."""
    return {
        "id": lease.id,
        "lender": lease.lender_id,
        "nbytes": lease.nbytes,
        "state": enum_name(pb.LeaseState, lease.state),
        "holder_pid": lease.holder_pid,
        "expires_at": lease.expires_at,
        "client_id": lease.client_id,
        "generation": lease.generation,
        "ttl_s": lease.ttl_s,
        "node": lease.node,
        "priority": lease.priority,
        "created_at": lease.created_at,
        "reason": lease.reason,
        "backend": enum_name(pb.Backend, lease.backend, "BACKEND_"),
    }


def lender_json(lender: pb.Lender) -> dict[str, Any]:
    """The JSON form of a lender (``harvestd lenders --json``)."""
    lendable = max(0, lender.capacity - lender.reclaimed)
    return {
        "id": lender.id,
        "backend": enum_name(pb.Backend, lender.backend, "BACKEND_").replace("_", "-"),
        "node": lender.node,
        "capacity": lender.capacity,
        "granted": lender.granted,
        "reclaimed": lender.reclaimed,
        "lendable": lendable,
        "free": max(0, lendable - lender.granted),
        "state": enum_name(pb.LenderState, lender.state, "LENDER_"),
        "gpu_uuid": lender.gpu_uuid,
        "gpu_index": lender.gpu_index,
        "links": {l.peer_uuid: l.nvlinks for l in lender.links},
        "generation": lender.generation,
        "pickup_address": lender.pickup_address,
        "last_report": lender.last_report,
        "pid": lender.pid,
        "device_total": lender.device_total,
        "device_free": lender.device_free,
        # The device's own tenant (a GPU's, or a host device's): what it uses now and its
        # peak over the lender's window, which stays out of lending. Null: not watched.
        "tenant": lender.tenant_bytes if lender.peak_window_s else None,
        "tenant_peak": lender.tenant_peak if lender.peak_window_s else None,
        "peak_window_s": lender.peak_window_s or None,
    }


def _tenant(l: dict[str, Any]) -> str:
    if l["peak_window_s"] is None:
        return "-"
    peak, window = format_size(l["tenant_peak"]), l["peak_window_s"]
    return f"{format_size(l['tenant'])} (peak {peak} in {window:g}s)"


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _ago(ts: float) -> str:
    delta = ts - time.time()
    return f"in {delta:.1f}s" if delta >= 0 else f"{-delta:.1f}s ago"


@cli.command()
@state_dir_option
@json_option
def status(state_dir, as_json) -> None:
    """The node's summary."""
    reply = call(state_dir, "Status", pb.StatusRequest())
    data = {
        "version": reply.version,
        "address": reply.address,
        "store": reply.store_path,
        "broker_pid": reply.pid,
        "started_at": reply.started_at,
        "lenders_up": reply.lenders_up,
        "leases_active": reply.leases_active,
        "bytes_lendable": reply.bytes_lendable,
        "bytes_granted": reply.bytes_granted,
        "generation": reply.generation,
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(
        f"broker     {reply.address} (pid {reply.pid}, up {time.time() - reply.started_at:.0f} s, "
        f"harvest {reply.version})"
    )
    click.echo(f"store      {reply.store_path} (generation {reply.generation})")
    click.echo(f"lenders    {reply.lenders_up} up, {format_size(reply.bytes_lendable)} lendable")
    click.echo(
        f"leases     {reply.leases_active} active, {format_size(reply.bytes_granted)} granted"
    )


@cli.command()
@state_dir_option
@json_option
def lenders(state_dir, as_json) -> None:
    """Every lender: backend, GPU, capacity, what is granted."""
    reply = call(state_dir, "ListLenders", pb.ListLendersRequest())
    items = [lender_json(l) for l in reply.lenders]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    _table(
        "lenders",
        [
            "id",
            "node",
            "backend",
            "gpu",
            "state",
            "tenant",
            "capacity",
            "reclaimed",
            "granted",
            "free",
            "gen",
        ],
        [
            [
                l["id"],
                l["node"],
                l["backend"],
                str(l["gpu_index"]) if l["gpu_uuid"] else "-",
                l["state"],
                _tenant(l),
                format_size(l["capacity"]),
                format_size(l["reclaimed"]),
                format_size(l["granted"]),
                format_size(l["free"]),
                str(l["generation"]),
            ]
            for l in items
        ],
    )


@cli.command()
@state_dir_option
@json_option
@click.option("--all", "include_ended", is_flag=True, help="Include ended leases.")
@click.option("--lender", default="", help="Only this lender's leases.")
def leases(state_dir, as_json, include_ended, lender) -> None:
    """Leases: who holds what, on which lender, until when."""
    reply = call(
        state_dir, "ListLeases", pb.ListLeasesRequest(lender_id=lender, include_ended=include_ended)
    )
    items = [lease_json(l) for l in reply.leases]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    _table(
        "leases",
        ["node", "id", "lender", "size", "state", "holder pid", "expires", "reason"],
        [
            [
                l["node"],
                l["id"],
                l["lender"],
                format_size(l["nbytes"]),
                l["state"],
                str(l["holder_pid"]),
                _ago(l["expires_at"]) if l["state"] in ("granted", "revoking") else "-",
                l["reason"],
            ]
            for l in sorted(items, key=lambda l: l["node"])
        ],
    )


@cli.command()
@state_dir_option
@click.option(
    "--interval",
    type=Seconds(positive=True),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes.",
)
def top(state_dir, interval) -> None:
    """A live view of the node: lenders, GPUs and links, leases, recent revocations."""
    from harvestd.top import run_top

    def fetch():
        status = call(state_dir, "Status", pb.StatusRequest())
        lenders = call(state_dir, "ListLenders", pb.ListLendersRequest()).lenders
        leases = call(state_dir, "ListLeases", pb.ListLeasesRequest(include_ended=True)).leases
        return status, list(lenders), list(leases)

    fetch()  # fail with one line, before taking over the terminal, if no node answers
    run_top(fetch, interval)


@cli.command()
@state_dir_option
@json_option
def doctor(state_dir, as_json) -> int:
    """Check what Harvest needs here: driver, CUDA, VMM and fd handles, NVLink, Ray, state dir."""
    from harvestd.doctor import run_checks

    checks = run_checks(StateDir.resolve(state_dir).root)
    if as_json:
        click.echo(json.dumps([c.to_json() for c in checks], indent=2))
    else:
        for c in checks:
            mark = {True: "ok     ", False: "MISSING", None: "-      "}[c.ok]
            click.echo(
                f"{mark} {c.name}: {c.detail}"
                + (f"  -> fix: {c.fix}" if c.ok is False and c.fix else "")
            )
    return 1 if any(c.ok is False for c in checks) else 0
