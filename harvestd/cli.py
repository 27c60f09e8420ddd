"""``harvestd``: start and stop a node, and inspect and change its leases.

Every command takes ``--state-dir``; read commands take ``--json``. Bad arguments, or no
node where one is needed, end with one line on stderr and exit code 2.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import unicodedata
from dataclasses import asdict
from typing import Any, Callable, NoReturn

import click
import grpc

from harvestd.config import load_config, reserve_parts
from harvestd.errors import HarvestError, InvalidArgument, Unavailable, from_rpc_error
from harvestd.node import NodeOptions, broker_ready, pid_alive, running_node, stop_node
from harvestd.paths import StateDir, node_name, resolve_address
from harvestd.service import MAX_WAIT_S
from harvestd.sizes import format_size, parse_size
from protos import harvest_pb2 as pb
from protos import harvest_pb2_grpc as pb_grpc

EXIT_USAGE = 2


# Characters that end a line (for str.splitlines, a terminal or a log reader) or that
# cannot be written out at all: control characters, line and paragraph separators, and
# the lone surrogates that stand for bytes of an argument that is not UTF-8.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})


def one_line(text: str) -> str:
    """``text`` as one printable line: each line break, control character and lone
    surrogate written as Python's ``repr`` writes it (``\\n``, ``\\x85``, ``\\u2028``,
    ``\\udcff``), so that no argument can split an error or forge a log line."""
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in _ESCAPED_CATEGORIES else c
                   for c in text)


def _fail(message: str) -> NoReturn:
    click.echo(f"harvestd: error: {one_line(message)}", err=True)
    sys.exit(EXIT_USAGE)


class _Cli(click.Group):
    """A group that turns every expected failure into one line and exit code 2."""

    def main(self, *args, **kwargs):  # noqa: D401 - click's signature
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except click.exceptions.Abort:
            click.echo("harvestd: aborted", err=True)
            sys.exit(1)
        except click.exceptions.NoArgsIsHelpError:
            # click's message here is the whole help text.
            _fail("missing command (see `harvestd --help`)")
        except click.exceptions.UsageError as err:
            hint = f" (see `{err.ctx.command_path} --help`)" if err.ctx else ""
            _fail(f"{err.format_message()}{hint}")
        except click.exceptions.ClickException as err:
            _fail(err.format_message())
        except HarvestError as err:
            # Some errors list several problems, one per line (a settings file's).
            _fail("; ".join(str(err).splitlines()) or type(err).__name__)
        except UnicodeError as err:
            _fail(f"an argument is not valid text ({err.reason})")
        except KeyboardInterrupt:
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)


class Seconds(click.ParamType):
    """A finite number of seconds, at least 0 (above it with ``positive``), at most
    ``most``: NaN or infinity would make a wait loop spin or a gRPC deadline
    meaningless, so they are refused here with the option's name."""

    name = "seconds"

    def __init__(self, most: float | None = None, positive: bool = False) -> None:
        self.most = most
        self.positive = positive

    def convert(self, value, param, ctx) -> float:
        """The number of seconds in ``value``, or a usage error that names the option."""
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        if seconds < 0 or (self.positive and seconds == 0):
            self.fail(f"{value!r} must be {'positive' if self.positive else 'at least 0'}",
                      param, ctx)
        if self.most is not None and seconds > self.most:
            self.fail(f"{value!r} is more than {self.most:g} seconds", param, ctx)
        return seconds


def _size(ctx, param, value):
    if value is None:
        return None
    try:
        size = parse_size(value)
    except InvalidArgument as err:
        raise click.BadParameter(str(err)) from None
    return size


state_dir_option = click.option(
    "--state-dir", type=click.Path(file_okay=False), default=None,
    help="The node's state directory (default: $HARVEST_STATE_DIR, else "
         "$XDG_RUNTIME_DIR/harvest, else ~/.cache/harvest).")
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="harvest", prog_name="harvestd")
def cli() -> None:
    """Harvest: lend idle GPU memory to other jobs as a revocable cache tier."""


# ---------------------------------------------------------------- start / stop

config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                             default=None, help="TOML settings file (default: "
                             "$HARVEST_CONFIG); HARVEST_* variables and flags override it.")


def _start_flags(state_dir, address, backend, host_bytes, gpus, reserve, cap, ttl, grace,
                 listen, metrics_port, no_ray_broker, ray_node_id=None) -> dict:
    return {"state_dir": state_dir, "ray_address": address, "backend": backend,
            "host_bytes": host_bytes, "gpus": gpus, "reserve": reserve, "cap": cap,
            "ttl": ttl, "grace": grace, "listen": listen, "metrics_port": metrics_port,
            "ray_broker": False if no_ray_broker else None}


def _start_options(f):
    for option in reversed([
        state_dir_option, config_option,
        click.option("--address", default=None, help="Join this Ray cluster (default: "
                     "$RAY_ADDRESS, else start a local Ray instance)."),
        click.option("--backend", default=None, help="auto (GPU memory where a GPU is "
                     "found, else host memory), host, cuda-vmm or cuda-ipc."),
        click.option("--host-bytes", default=None, help="Host memory a host lender lends "
                     "(default: 1GiB on a node without GPUs; beside GPUs, set it to lend "
                     "host memory too)."),
        click.option("--gpus", default=None, help="Comma-separated GPU indexes or UUIDs "
                     "that lend (default: all)."),
        click.option("--reserve", default=None, help="GPU memory kept for the GPU's own "
                     "tenant: bytes (8GiB) or a percentage (default 10%)."),
        click.option("--cap", default=None, help="Lend at most this much per GPU."),
        click.option("--ttl", default=None, help="Default lease TTL in seconds (30)."),
        click.option("--grace", default=None, help="Seconds a holder has to acknowledge a "
                     "revocation (5)."),
        click.option("--listen", default=None, help="Also serve gRPC on this loopback "
                     "HOST:PORT."),
        click.option("--metrics-port", default=None, help="Serve Prometheus metrics: the "
                     "broker on this port, lenders on the next ones."),
        click.option("--no-ray-broker", is_flag=True, help="Run the broker as a plain "
                     "process instead of a Ray actor."),
        click.option("--ray-node-id", default=None, hidden=True,
                     help="Pin the lenders to this Ray node (tests of many raylets on one "
                          "machine)."),
    ]):
        f = option(f)
    return f


@cli.command()
@_start_options
@click.option("--detach", is_flag=True, help="Return once the node answers.")
@click.option("--timeout", type=Seconds(), default=180.0, show_default=True,
              help="With --detach: seconds to wait for the node.")
def start(state_dir, config_path, address, backend, host_bytes, gpus, reserve, cap, ttl,
          grace, listen, metrics_port, no_ray_broker, ray_node_id, detach, timeout) -> None:
    """Start a node: Ray, the broker, and one lender per GPU (or a host lender)."""
    config = load_config(config_path, _start_flags(
        state_dir, address, backend, host_bytes, gpus, reserve, cap, ttl, grace, listen,
        metrics_port, no_ray_broker))
    if config.host_bytes == 0:
        raise InvalidArgument("host_bytes: must be positive")
    state = StateDir.resolve(config.state_dir or None)
    if running_node(state) is not None:
        raise HarvestError(f"a Harvest node already runs with state dir {state.root}")
    state.create()
    reserve_bytes, reserve_fraction = reserve_parts(config.reserve)
    opts = NodeOptions(state_dir=str(state.root), ray_address=config.ray_address,
                       backend=config.backend, host_bytes=config.host_bytes, gpus=config.gpus,
                       reserve_bytes=reserve_bytes, reserve_fraction=reserve_fraction,
                       cap_bytes=config.cap, per_gpu=config.per_gpu, ttl_s=config.ttl,
                       grace_s=config.grace, listen=config.listen,
                       ray_broker=config.ray_broker, metrics_port=config.metrics_port,
                       log_format=config.log_format, log_level=config.log_level,
                       ray_node_id=ray_node_id or "")
    if not detach:
        from harvestd.logs import setup_logging
        from harvestd.node import run_node

        setup_logging(fmt=config.log_format, level=config.log_level)
        run_node(opts, ready=lambda info: click.echo(
            f"harvest node {info.node} ready: broker {info.broker_address}, lenders "
            f"{', '.join(info.lenders)} (Ctrl-C stops it)"))
        return
    _start_detached(state, opts, timeout)


@cli.command("config")
@_start_options
@json_option
def show_config(state_dir, config_path, address, backend, host_bytes, gpus, reserve, cap,
                ttl, grace, listen, metrics_port, no_ray_broker, ray_node_id, as_json) -> None:
    """The settings `harvestd start` would use with these flags, and where each came from."""
    config = load_config(config_path, _start_flags(
        state_dir, address, backend, host_bytes, gpus, reserve, cap, ttl, grace, listen,
        metrics_port, no_ray_broker))
    if as_json:
        click.echo(json.dumps({"settings": {k: {"value": v, "source": config.sources[k]}
                                            for k, v in config.values.items()},
                               "gpu": config.per_gpu}, indent=2))
        return
    width = max(len(k) for k in config.values)
    for key, value in config.values.items():
        click.echo(f"{key:<{width}}  {json.dumps(value):<24}  {config.sources[key]}")
    for gpu, table in config.per_gpu.items():
        for key, value in table.items():
            click.echo(f"gpu.{gpu}.{key}  {json.dumps(value)}")


def _start_detached(state: StateDir, opts: NodeOptions, timeout: float) -> None:
    log_path = state.logs_dir / "daemon.log"
    with open(log_path, "ab") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "harvestd.daemon", json.dumps(asdict(opts))],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=str(state.root))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = state.read_node()
        if info is not None and info.daemon_pid == daemon.pid and broker_ready(
                info.broker_address):
            click.echo(f"harvest node {info.node} ready: broker {info.broker_address}, "
                       f"lenders {', '.join(info.lenders)}, state dir {state.root}")
            return
        if daemon.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
            raise HarvestError("the node failed to start: " + " | ".join(tail))
        time.sleep(0.2)
    daemon.terminate()
    raise HarvestError(f"the node did not answer within {timeout:.0f} s; see {log_path}")


@cli.command()
@state_dir_option
@click.option("--timeout", type=Seconds(), default=60.0, show_default=True)
def stop(state_dir, timeout) -> None:
    """Stop the node: lenders, broker, and the Ray instance it started."""
    state = StateDir.resolve(state_dir)
    info = stop_node(state, timeout)
    click.echo(f"harvest node {info.node} stopped")


# ---------------------------------------------------------------- reading

def _stub(state_dir: str | None) -> tuple[pb_grpc.BrokerStub, grpc.Channel]:
    address = resolve_address(None, state_dir) if state_dir else resolve_address()
    channel = grpc.insecure_channel(address)
    return pb_grpc.BrokerStub(channel), channel


def _call(state_dir: str | None, method: str, request, timeout: float = 10.0):
    stub, channel = _stub(state_dir)
    try:
        return getattr(stub, method)(request, timeout=timeout)
    except grpc.RpcError as err:
        error = from_rpc_error(err)
        if isinstance(error, Unavailable):
            raise Unavailable(f"no Harvest node answers ({error})") from None
        raise error from None
    finally:
        channel.close()


def _enum_name(enum, value: int, prefix: str = "") -> str:
    # Proto3 enums are open: a newer (or a fuzzed) broker may send a value this CLI does
    # not know, and a listing must still print.
    try:
        return enum.Name(value).removeprefix(prefix).lower()
    except ValueError:
        return str(value)


def lease_json(lease: pb.Lease) -> dict[str, Any]:
    """The JSON form of a lease (``harvestd leases --json``)."""
    return {"id": lease.id, "lender": lease.lender_id, "nbytes": lease.nbytes,
            "state": _enum_name(pb.LeaseState, lease.state), "holder_pid": lease.holder_pid,
            "expires_at": lease.expires_at, "client_id": lease.client_id,
            "generation": lease.generation, "ttl_s": lease.ttl_s, "node": lease.node,
            "priority": lease.priority, "created_at": lease.created_at, "reason": lease.reason,
            "backend": _enum_name(pb.Backend, lease.backend, "BACKEND_")}


def lender_json(lender: pb.Lender) -> dict[str, Any]:
    """The JSON form of a lender (``harvestd lenders --json``)."""
    lendable = max(0, lender.capacity - lender.reclaimed)
    return {"id": lender.id, "backend": _enum_name(pb.Backend, lender.backend, "BACKEND_")
            .replace("_", "-"), "node": lender.node,
            "capacity": lender.capacity, "granted": lender.granted,
            "reclaimed": lender.reclaimed, "lendable": lendable,
            "free": max(0, lendable - lender.granted),
            "state": _enum_name(pb.LenderState, lender.state, "LENDER_"),
            "gpu_uuid": lender.gpu_uuid, "gpu_index": lender.gpu_index,
            "links": {l.peer_uuid: l.nvlinks for l in lender.links},
            "generation": lender.generation, "pickup_address": lender.pickup_address,
            "last_report": lender.last_report, "pid": lender.pid,
            "device_total": lender.device_total, "device_free": lender.device_free}


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
    reply = _call(state_dir, "Status", pb.StatusRequest())
    data = {"version": reply.version, "address": reply.address, "store": reply.store_path,
            "broker_pid": reply.pid, "started_at": reply.started_at,
            "lenders_up": reply.lenders_up, "leases_active": reply.leases_active,
            "bytes_lendable": reply.bytes_lendable, "bytes_granted": reply.bytes_granted,
            "generation": reply.generation}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"broker     {reply.address} (pid {reply.pid}, up {time.time() - reply.started_at:.0f} s, "
               f"harvest {reply.version})")
    click.echo(f"store      {reply.store_path} (generation {reply.generation})")
    click.echo(f"lenders    {reply.lenders_up} up, {format_size(reply.bytes_lendable)} lendable")
    click.echo(f"leases     {reply.leases_active} active, {format_size(reply.bytes_granted)} granted")


@cli.command()
@state_dir_option
@json_option
def lenders(state_dir, as_json) -> None:
    """Every lender: backend, GPU, capacity, what is granted."""
    reply = _call(state_dir, "ListLenders", pb.ListLendersRequest())
    items = [lender_json(l) for l in reply.lenders]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    _table("lenders", ["id", "node", "backend", "gpu", "state", "capacity", "reclaimed",
                       "granted", "free", "gen"],
           [[l["id"], l["node"], l["backend"], str(l["gpu_index"]) if l["gpu_uuid"] else "-",
             l["state"], format_size(l["capacity"]), format_size(l["reclaimed"]),
             format_size(l["granted"]), format_size(l["free"]), str(l["generation"])]
            for l in items])


@cli.command()
@state_dir_option
@json_option
@click.option("--all", "include_ended", is_flag=True, help="Include ended leases.")
@click.option("--lender", default="", help="Only this lender's leases.")
def leases(state_dir, as_json, include_ended, lender) -> None:
    """Leases: who holds what, on which lender, until when."""
    reply = _call(state_dir, "ListLeases", pb.ListLeasesRequest(
        lender_id=lender, include_ended=include_ended))
    items = [lease_json(l) for l in reply.leases]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    _table("leases", ["node", "id", "lender", "size", "state", "holder pid", "expires",
                      "reason"],
           [[l["node"], l["id"], l["lender"], format_size(l["nbytes"]), l["state"],
             str(l["holder_pid"]),
             _ago(l["expires_at"]) if l["state"] in ("granted", "revoking") else "-",
             l["reason"]] for l in sorted(items, key=lambda l: l["node"])])


@cli.command()
@state_dir_option
@click.option("--interval", type=Seconds(positive=True), default=1.0, show_default=True,
              help="Seconds between refreshes.")
def top(state_dir, interval) -> None:
    """A live view of the node: lenders, GPUs and links, leases, recent revocations."""
    from harvestd.top import run_top

    def fetch():
        status = _call(state_dir, "Status", pb.StatusRequest())
        lenders = _call(state_dir, "ListLenders", pb.ListLendersRequest()).lenders
        leases = _call(state_dir, "ListLeases", pb.ListLeasesRequest(include_ended=True)).leases
        return status, list(lenders), list(leases)

    fetch()  # fail with one line, before taking over the terminal, if no node answers
    run_top(fetch, interval)


@cli.command()
@state_dir_option
@json_option
def doctor(state_dir, as_json) -> None:
    """Check what Harvest needs here: driver, CUDA, VMM and fd handles, NVLink, Ray, state dir."""
    from harvestd.doctor import run_checks

    checks = run_checks(StateDir.resolve(state_dir).root)
    if as_json:
        click.echo(json.dumps([c.to_json() for c in checks], indent=2))
    else:
        for c in checks:
            mark = {True: "ok     ", False: "MISSING", None: "-      "}[c.ok]
            click.echo(f"{mark} {c.name}: {c.detail}" + (f"  -> fix: {c.fix}"
                                                         if c.ok is False and c.fix else ""))
    return 1 if any(c.ok is False for c in checks) else 0


# ---------------------------------------------------------------- changing

@cli.command()
@state_dir_option
@click.argument("lease_id")
@click.option("--force", is_flag=True, help="End it now, without the holder's acknowledgement.")
@click.option("--kill-holder", is_flag=True,
              help="Also kill the holder's process (SIGKILL), the only way to make the "
                   "driver release pages a stuck holder still maps. Implies --force.")
@click.option("--reason", default="revoked by operator")
def revoke(state_dir, lease_id, force, kill_holder, reason) -> None:
    """Revoke one lease: the holder is told, fences and acknowledges."""
    holder_pid = 0
    if kill_holder:
        force = True
        rows = _call(state_dir, "ListLeases", pb.ListLeasesRequest()).leases
        lease = next((l for l in rows if l.id == lease_id), None)
        if lease is not None and lease.node == node_name(state_dir):
            holder_pid = lease.holder_pid
    reply = _call(state_dir, "Revoke", pb.RevokeRequest(lease_id=lease_id, reason=reason,
                                                        force=force))
    click.echo(f"lease {one_line(lease_id)} {_enum_name(pb.LeaseState, reply.lease.state)}")
    if holder_pid and holder_pid != os.getpid() and pid_alive(holder_pid):
        try:
            os.kill(holder_pid, signal.SIGKILL)
        except PermissionError:
            raise HarvestError(f"not allowed to kill holder pid {holder_pid}") from None
        click.echo(f"holder pid {holder_pid} killed")


def _wait_command(state_dir, method: str, request, timeout: float,
                  describe: Callable[[Any], str]) -> None:
    """Run a call that waits for memory to come free, showing on a terminal how many of
    the lender's leases are still on their way out."""
    import threading

    result: dict[str, Any] = {}

    def call() -> None:
        try:
            result["reply"] = _call(state_dir, method, request, timeout=(timeout or 60.0) + 10)
        except HarvestError as err:
            result["error"] = err

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    if sys.stderr.isatty():
        from rich.console import Console

        with Console(stderr=True).status(f"{method.lower()} on {request.lender_id}") as shown:
            while worker.is_alive():
                worker.join(0.2)
                try:
                    going = [l for l in _call(state_dir, "ListLeases", pb.ListLeasesRequest(
                        lender_id=request.lender_id)).leases if l.state == pb.REVOKING]
                    shown.update(f"{method.lower()} on {request.lender_id}: {len(going)} "
                                 "leases still being revoked")
                except HarvestError:
                    pass
    worker.join()
    if "error" in result:
        raise result["error"]
    click.echo(describe(result["reply"]))


@cli.command()
@state_dir_option
@click.argument("lender_id")
@click.option("--timeout", type=Seconds(most=MAX_WAIT_S), default=0.0,
              help="Seconds to wait for the memory (default: the grace period + 2).")
def drain(state_dir, lender_id, timeout) -> None:
    """Stop a lender's grants and revoke all its leases."""
    _wait_command(state_dir, "Drain", pb.DrainRequest(lender_id=lender_id, timeout_s=timeout),
                  timeout, lambda r: f"lender {lender_id} draining: {len(r.revoked)} leases "
                  f"revoked, memory {'free' if r.freed else 'not yet free'}")


@cli.command()
@state_dir_option
@click.option("--lender", "lender_id", required=True, help="The lender whose tenant reclaims.")
@click.option("--bytes", "nbytes", required=True, callback=_size,
              help="How much memory the tenant takes back (e.g. 512MiB).")
@click.option("--timeout", type=Seconds(most=MAX_WAIT_S), default=0.0,
              help="Seconds to wait for the memory (default: the grace period + 2).")
def reclaim(state_dir, lender_id, nbytes, timeout) -> None:
    """Act as a lender's tenant: take memory back, revoking just enough leases."""
    _wait_command(state_dir, "Reclaim", pb.ReclaimRequest(
        lender_id=lender_id, nbytes=nbytes, timeout_s=timeout), timeout,
        lambda r: f"reclaimed {format_size(nbytes)} on {lender_id}: {len(r.revoked)} leases "
                  f"revoked, memory {'free' if r.freed else 'NOT free yet'} after "
                  f"{r.elapsed_s * 1e3:.1f} ms (tenant holds {format_size(r.reclaimed)})")


@cli.command()
@state_dir_option
@click.option("--lender", "lender_id", required=True)
@click.option("--bytes", "nbytes", callback=_size, default="0",
              help="How much to give back to lending (default: all).")
def restore(state_dir, lender_id, nbytes) -> None:
    """Give memory a tenant reclaimed back to lending (and end a drain)."""
    reply = _call(state_dir, "Restore", pb.RestoreRequest(lender_id=lender_id, nbytes=nbytes))
    click.echo(f"lender {lender_id}: tenant holds {format_size(reply.reclaimed)}")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="harvestd")


if __name__ == "__main__":
    main()
