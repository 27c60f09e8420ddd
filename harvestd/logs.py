"""Logging for Harvest's own processes (the CLI prints; everything else logs).

Two formats: ``text`` for people, ``json`` (one object a line) for log shippers. Lines
about a lease or a lender carry its id; pass it as ``extra={"lease": id}`` or
``extra={"lender": id}`` to get it as its own JSON field too.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s"
_FIELDS = ("lease", "lender", "client")
LEASE_PREFIX = "lease-"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, pid, message, ids, exception."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        for key in _FIELDS:
            if hasattr(record, key):
                data[key] = getattr(record, key)
        if "lease" not in data:
            # Lease ids have one fixed form, so a line about a lease names it as a field
            # even where the call passed it only as a format argument.
            ids = [
                a
                for a in (record.args if isinstance(record.args, tuple) else ())
                if isinstance(a, str) and a.startswith(LEASE_PREFIX)
            ]
            if ids:
                data["lease"] = ids[0] if len(ids) == 1 else ids
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def setup_logging(
    path: str | os.PathLike | None = None, level: str | None = None, fmt: str | None = None
) -> None:
    """Send Harvest's loggers to ``path`` (or stderr), at ``level`` (else
    ``$HARVEST_LOG_LEVEL``, else INFO), as ``fmt`` (``text`` or ``json``; else
    ``$HARVEST_LOG_FORMAT``, else text)."""
    level = (level or os.environ.get("HARVEST_LOG_LEVEL") or "INFO").upper()
    fmt = (fmt or os.environ.get("HARVEST_LOG_FORMAT") or "text").lower()
    handler: logging.Handler
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    for name in ("harvestd", "lender", "client"):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.handlers[:] = [handler]
        logger.propagate = False
