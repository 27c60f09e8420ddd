"""Run one lender as a plain process (no Ray): ``python -m lender --id ID --state-dir D``."""

from __future__ import annotations

import argparse

from harvestd.logs import setup_logging
from harvestd.paths import StateDir
from harvestd.signals import wait_for_stop
from harvestd.sizes import parse_size, reserve_parts
from lender.config import LenderConfig
from lender.lender import Lender
from lender.tenant import DEFAULT_PEAK_WINDOW_S


def main(argv: list[str] | None = None) -> None:
    """Lend until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m lender")
    parser.add_argument("--id", required=True)
    parser.add_argument("--state-dir", default=None)
    parser.add_argument("--broker", default="", help="gRPC target (default: the state dir's)")
    parser.add_argument("--backend", default="host")
    parser.add_argument("--host-bytes", default="1GiB")
    parser.add_argument("--gpu-uuid", default="")
    parser.add_argument("--node", default="")
    parser.add_argument("--report-interval", type=float, default=1.0)
    parser.add_argument("--metrics-port", type=int, default=0)
    parser.add_argument(
        "--host-device", default="", help="lend from this host device (the CPU twin of a GPU)"
    )
    parser.add_argument("--reserve", default="0", help="bytes or percent kept for the tenant")
    parser.add_argument("--peak-window", type=float, default=DEFAULT_PEAK_WINDOW_S)
    parser.add_argument("--cap", default="0", help="lend at most this much (0: no cap)")
    args = parser.parse_args(argv)
    reserve_bytes, reserve_fraction = reserve_parts(args.reserve)
    state = StateDir.resolve(args.state_dir).create()
    setup_logging(state.logs_dir / f"lender-{args.id}.log")
    lender = Lender(
        LenderConfig(
            lender_id=args.id,
            state_dir=str(state.root),
            broker_address=args.broker or state.broker_address,
            backend=args.backend,
            host_bytes=parse_size(args.host_bytes),
            gpu_uuid=args.gpu_uuid,
            node=args.node,
            report_interval_s=args.report_interval,
            metrics_port=args.metrics_port,
            host_device=args.host_device,
            reserve_bytes=reserve_bytes,
            reserve_fraction=reserve_fraction,
            peak_window_s=args.peak_window,
            cap_bytes=parse_size(args.cap),
        )
    ).start()
    wait_for_stop()
    lender.stop()


if __name__ == "__main__":
    main()
