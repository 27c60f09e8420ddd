"""``harvestd start``, ``config`` and ``stop``: a node's life."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict

import click

from harvestd.cli.group import Seconds, cli, json_option, state_dir_option
from harvestd.config import load_config
from harvestd.errors import HarvestError, InvalidArgument
from harvestd.node import NodeOptions, broker_ready, running_node, stop_node
from harvestd.paths import StateDir
from harvestd.sizes import reserve_parts

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML settings file (default: "
    "$HARVEST_CONFIG); HARVEST_* variables and flags override it.",
)


def _start_flags(
    state_dir,
    address,
    backend,
    host_bytes,
    gpus,
    reserve,
    cap,
    ttl,
    grace,
    listen,
    metrics_port,
    no_ray_broker,
    peak_window=None,
    host_device=None,
    ray_node_id=None,
) -> dict:
    return {
        "state_dir": state_dir,
        "ray_address": address,
        "backend": backend,
        "host_bytes": host_bytes,
        "gpus": gpus,
        "reserve": reserve,
        "cap": cap,
        "ttl": ttl,
        "grace": grace,
        "listen": listen,
        "metrics_port": metrics_port,
        "ray_broker": False if no_ray_broker else None,
        "peak_window": peak_window,
        "host_device": host_device,
    }


def _start_options(f):
    for option in reversed(
        [
            state_dir_option,
            config_option,
            click.option(
                "--address",
                default=None,
                help="Join this Ray cluster (default: "
                "$RAY_ADDRESS, else start a local Ray instance).",
            ),
            click.option(
                "--backend",
                default=None,
                help="auto (GPU memory where a GPU is "
                "found, else host memory), host, cuda-vmm or cuda-ipc.",
            ),
            click.option(
                "--host-bytes",
                default=None,
                help="Host memory a host lender lends "
                "(default: 1GiB on a node without GPUs; beside GPUs, set it to lend "
                "host memory too).",
            ),
            click.option(
                "--gpus",
                default=None,
                help="Comma-separated GPU indexes or UUIDs that lend (default: all).",
            ),
            click.option(
                "--reserve",
                default=None,
                help="GPU memory kept for the GPU's own "
                "tenant: bytes (8GiB) or a percentage (default 10%).",
            ),
            click.option("--cap", default=None, help="Lend at most this much per GPU."),
            click.option("--ttl", default=None, help="Default lease TTL in seconds (30)."),
            click.option(
                "--grace",
                default=None,
                help="Seconds a holder has to acknowledge a revocation (5).",
            ),
            click.option(
                "--listen", default=None, help="Also serve gRPC on this loopback HOST:PORT."
            ),
            click.option(
                "--metrics-port",
                default=None,
                help="Serve Prometheus metrics: the broker on this port, lenders on the next ones.",
            ),
            click.option(
                "--no-ray-broker",
                is_flag=True,
                help="Run the broker as a plain process instead of a Ray actor.",
            ),
            click.option(
                "--peak-window",
                default=None,
                help="Seconds the tenant's peak use keeps memory out of lending "
                "(default 300; 0: its use now only).",
            ),
            click.option(
                "--host-device",
                default=None,
                help="Host lender: lend from this host device file shared with a tenant, "
                "the CPU twin of a GPU (made with --host-bytes as its size if missing).",
            ),
            click.option(
                "--ray-node-id",
                default=None,
                hidden=True,
                help="Pin the lenders to this Ray node (tests of many raylets on one machine).",
            ),
        ]
    ):
        f = option(f)
    return f


@cli.command()
@_start_options
@click.option("--detach", is_flag=True, help="Return once the node answers.")
@click.option(
    "--timeout",
    type=Seconds(),
    default=180.0,
    show_default=True,
    help="With --detach: seconds to wait for the node.",
)
def start(
    state_dir,
    config_path,
    address,
    backend,
    host_bytes,
    gpus,
    reserve,
    cap,
    ttl,
    grace,
    listen,
    metrics_port,
    no_ray_broker,
    peak_window,
    host_device,
    ray_node_id,
    detach,
    timeout,
) -> None:
    """Start a node: Ray, the broker, and one lender per GPU (or a host lender)."""
    config = load_config(
        config_path,
        _start_flags(
            state_dir,
            address,
            backend,
            host_bytes,
            gpus,
            reserve,
            cap,
            ttl,
            grace,
            listen,
            metrics_port,
            no_ray_broker,
            peak_window,
            host_device,
        ),
    )
    if config.host_bytes == 0:
        raise InvalidArgument("host_bytes: must be positive")
    state = StateDir.resolve(config.state_dir or None)
    if running_node(state) is not None:
        raise HarvestError(f"a Harvest node already runs with state dir {state.root}")
    state.create()
    reserve_bytes, reserve_fraction = reserve_parts(config.reserve)
    opts = NodeOptions(
        state_dir=str(state.root),
        ray_address=config.ray_address,
        backend=config.backend,
        host_bytes=config.host_bytes,
        gpus=config.gpus,
        reserve_bytes=reserve_bytes,
        reserve_fraction=reserve_fraction,
        cap_bytes=config.cap,
        peak_window_s=config.peak_window,
        host_device=config.host_device,
        per_gpu=config.per_gpu,
        ttl_s=config.ttl,
        grace_s=config.grace,
        listen=config.listen,
        ray_broker=config.ray_broker,
        metrics_port=config.metrics_port,
        log_format=config.log_format,
        log_level=config.log_level,
        ray_node_id=ray_node_id or "",
    )
    if not detach:
        from harvestd.logs import setup_logging
        from harvestd.node import run_node

        setup_logging(fmt=config.log_format, level=config.log_level)
        run_node(
            opts,
            ready=lambda info: click.echo(
                f"harvest node {info.node} ready: broker {info.broker_address}, lenders "
                f"{', '.join(info.lenders)} (Ctrl-C stops it)"
            ),
        )
        return
    _start_detached(state, opts, timeout)


@cli.command("config")
@_start_options
@json_option
def show_config(
    state_dir,
    config_path,
    address,
    backend,
    host_bytes,
    gpus,
    reserve,
    cap,
    ttl,
    grace,
    listen,
    metrics_port,
    no_ray_broker,
    peak_window,
    host_device,
    ray_node_id,
    as_json,
) -> None:
    """The settings `harvestd start` would use with these flags, and where each came from."""
    config = load_config(
        config_path,
        _start_flags(
            state_dir,
            address,
            backend,
            host_bytes,
            gpus,
            reserve,
            cap,
            ttl,
            grace,
            listen,
            metrics_port,
            no_ray_broker,
            peak_window,
            host_device,
        ),
    )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "settings": {
                        k: {"value": v, "source": config.sources[k]}
                        for k, v in config.values.items()
                    },
                    "gpu": config.per_gpu,
                },
                indent=2,
            )
        )
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
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(state.root),
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = state.read_node()
        if info is not None and info.daemon_pid == daemon.pid and broker_ready(info.broker_address):
            click.echo(
                f"harvest node {info.node} ready: broker {info.broker_address}, "
                f"lenders {', '.join(info.lenders)}, state dir {state.root}"
            )
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
