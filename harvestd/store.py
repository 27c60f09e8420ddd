"""The broker's durable state: the ``Store`` seam and its SQLite implementation.

Every change the lease table makes is one :meth:`Store.commit`; the table acknowledges
nothing to a caller before that commit returns, so a broker killed at any instant comes
back with every acknowledged grant and never hands out a generation twice.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from harvestd.errors import StoreError
from harvestd.model import LeaseRecord, LenderRecord

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass
class Snapshot:
    """What a broker needs to carry on after a restart."""

    generation: int = 0
    lenders: list[LenderRecord] = field(default_factory=list)
    leases: list[LeaseRecord] = field(default_factory=list)  # every lease not yet freed


class Store(Protocol):
    """Durable broker state."""

    def load(self) -> Snapshot:
        """Everything live: the generation counter, lenders, and leases not yet freed."""

    def commit(
        self,
        leases: Iterable[LeaseRecord] = (),
        lenders: Iterable[LenderRecord] = (),
        generation: int | None = None,
    ) -> None:
        """Write these records (and the counter) atomically and durably, or raise StoreError."""

    def history(self, limit: int = 1000) -> list[LeaseRecord]:
        """The most recent leases of every state, newest first."""

    def close(self) -> None:
        """Release the store."""


class MemoryStore:
    """A store that keeps nothing on disk: for simulations and the control-plane model."""

    def __init__(self) -> None:
        self._snapshot = Snapshot()
        self._leases: dict[str, LeaseRecord] = {}
        self._lenders: dict[str, LenderRecord] = {}

    def load(self) -> Snapshot:
        """The records committed so far."""
        return Snapshot(
            self._snapshot.generation,
            list(self._lenders.values()),
            [r for r in self._leases.values() if not r.freed],
        )

    def commit(
        self,
        leases: Iterable[LeaseRecord] = (),
        lenders: Iterable[LenderRecord] = (),
        generation: int | None = None,
    ) -> None:
        """Keep references to the records."""
        for lease in leases:
            self._leases[lease.id] = lease
        for lender in lenders:
            self._lenders[lender.id] = lender
        if generation is not None:
            self._snapshot.generation = generation

    def history(self, limit: int = 1000) -> list[LeaseRecord]:
        """Newest first."""
        return sorted(self._leases.values(), key=lambda r: r.created_at, reverse=True)[:limit]

    def close(self) -> None:
        """Nothing to release."""


class SqliteStore:
    """The broker's state in one SQLite file (WAL journal)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        directory = os.path.dirname(os.path.abspath(path))
        if not os.access(directory, os.W_OK):
            raise StoreError(f"state directory {directory} is not writable")
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            # WAL with synchronous=NORMAL survives the broker's own crash (kill -9) with every
            # committed transaction; only a power loss can take the last few back.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            ok = self._db.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise StoreError(f"store {path} is damaged ({ok}); move it aside to start afresh")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS lenders (id TEXT PRIMARY KEY, data TEXT NOT NULL);
                CREATE TABLE IF NOT EXISTS leases (
                    id TEXT PRIMARY KEY, freed INTEGER NOT NULL, created_at REAL NOT NULL,
                    data TEXT NOT NULL);
                CREATE INDEX IF NOT EXISTS leases_live ON leases (freed);
                CREATE INDEX IF NOT EXISTS leases_created ON leases (created_at);
                """
            )
            self._db.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),)
            )
        except sqlite3.DatabaseError as exc:
            raise StoreError(
                f"store {path} cannot be opened: {exc}; move it aside to start afresh"
            ) from exc

    def load(self) -> Snapshot:
        """Read the live state."""
        try:
            with self._lock:
                row = self._db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
                lenders = [
                    LenderRecord.from_json(json.loads(d))
                    for (d,) in self._db.execute("SELECT data FROM lenders")
                ]
                leases = [
                    LeaseRecord.from_json(json.loads(d))
                    for (d,) in self._db.execute("SELECT data FROM leases WHERE freed=0")
                ]
        except (sqlite3.DatabaseError, ValueError, KeyError, TypeError) as exc:
            raise StoreError(
                f"store {self.path} is damaged ({exc}); move it aside to start afresh"
            ) from exc
        return Snapshot(int(row[0]) if row else 0, lenders, leases)

    def commit(
        self,
        leases: Iterable[LeaseRecord] = (),
        lenders: Iterable[LenderRecord] = (),
        generation: int | None = None,
    ) -> None:
        """One transaction for the whole change."""
        lease_rows = [(r.id, int(r.freed), r.created_at, json.dumps(r.to_json())) for r in leases]
        lender_rows = [(r.id, json.dumps(r.to_json())) for r in lenders]
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    if lease_rows:
                        self._db.executemany(
                            "INSERT OR REPLACE INTO leases VALUES (?,?,?,?)", lease_rows
                        )
                    if lender_rows:
                        self._db.executemany(
                            "INSERT OR REPLACE INTO lenders VALUES (?,?)", lender_rows
                        )
                    if generation is not None:
                        self._db.execute(
                            "INSERT OR REPLACE INTO meta VALUES ('generation', ?)",
                            (str(generation),),
                        )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the store {self.path}: {exc}") from exc

    def history(self, limit: int = 1000) -> list[LeaseRecord]:
        """Newest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT data FROM leases ORDER BY created_at DESC LIMIT ?", (limit,)
            ).fetchall()
        return [LeaseRecord.from_json(json.loads(d)) for (d,) in rows]

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
