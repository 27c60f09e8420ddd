"""``harvestd``: start and stop a node, and inspect and change its leases.

Every command takes ``--state-dir``; read commands take ``--json``. Bad arguments, or no
node where one is needed, end with one line on stderr and exit code 2.
"""

from __future__ import annotations

# Importing the command modules registers their commands with the group.
from harvestd.cli import actions, inspection, lifecycle  # noqa: F401
from harvestd.cli.group import EXIT_USAGE, cli, one_line
from harvestd.cli.inspection import lease_json, lender_json

__all__ = ["EXIT_USAGE", "cli", "lease_json", "lender_json", "main", "one_line"]


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="harvestd")
