"""The detached daemon: ``harvestd start --detach`` runs this module in a new session,
with its output in the state dir's ``logs/daemon.log``."""

from __future__ import annotations

import json
import sys

from harvestd.logs import setup_logging
from harvestd.node import NodeOptions, run_node
from harvestd.paths import StateDir


def main(argv: list[str] | None = None) -> None:
    """``python -m harvestd.daemon OPTIONS_JSON``."""
    argv = sys.argv[1:] if argv is None else argv
    opts = NodeOptions(**json.loads(argv[0]))
    setup_logging(
        StateDir.resolve(opts.state_dir).logs_dir / "daemon.log", opts.log_level, opts.log_format
    )
    run_node(opts)


if __name__ == "__main__":
    main()
