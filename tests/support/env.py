"""How tests run the repo's code in child processes: which Python, which checkout, and
the environment that makes that checkout importable."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
"""The repository's root (the checkout under test)."""

PY = sys.executable
"""The Python that runs the tests; child processes use it too."""


def node_env(**extra: str) -> dict[str, str]:
    """This process's environment for a child that runs Harvest code: the repo first on
    ``PYTHONPATH``, no inherited ``HARVEST_ADDRESS`` (a child finds its node by its state
    dir), and ``extra`` on top."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    env.pop("HARVEST_ADDRESS", None)
    env.update(extra)
    return env
