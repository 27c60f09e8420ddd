"""Logging for Harvest's own processes (the CLI prints; everything else logs)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"


def setup_logging(path: str | os.PathLike | None = None, level: str | None = None) -> None:
    """Send Harvest's loggers to ``path`` (or stderr), at ``$HARVEST_LOG_LEVEL`` or INFO."""
    level = (level or os.environ.get("HARVEST_LOG_LEVEL") or "INFO").upper()
    handler: logging.Handler
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    for name in ("harvestd", "lender", "client"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers[:] = [handler]
        logger.propagate = False
