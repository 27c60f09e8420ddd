"""Invariants of a broker's durable state, checked from the outside.

:func:`check_store` opens a broker's SQLite store read-only (the broker may be running
and writing it) and reports every promise the stored state breaks. It reads the file,
not the broker's memory: what it checks is what a restarted broker would come back
with, which is the state that has to be right.

Each check names the rule of :mod:`harvestd.table` that makes it hold, so that a
failure points at the rule that broke (or at a change in the rules that forgot this
module).
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harvestd.model import LeaseState, LenderState

TOKEN_BYTES = 32


@dataclass
class _Lender:
    id: str
    generation: int
    capacity: int
    granularity: int


@dataclass
class _Lease:
    id: str
    lender_id: str
    state: int
    freed: bool
    charged: int
    nbytes: int
    generation: int
    lender_generation: int


def _connect_read_only(path: str) -> sqlite3.Connection:
    # mode=ro: a checker must never be the writer that changes what it checks, and must
    # not create an empty store where there was none.
    uri = Path(path).absolute().as_uri() + "?mode=ro"
    return sqlite3.connect(uri, uri=True, isolation_level=None, timeout=5.0)


def _int(data: dict[str, Any], key: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{key} is {value!r}, not an integer")
    return value


def check_store(path: str, *, capacity_bound: bool = True) -> list[str]:
    """Every invariant the store at ``path`` breaks, one message each; ``[]`` if none.

    The store is opened read-only and read in one transaction, so a broker writing it at
    the same time is seen at one commit, never halfway through one. These hold after
    every commit the lease table makes:

    1. **Records parse; states and tokens are well formed.** Every lease and lender row
       is the JSON that ``LeaseRecord.to_json`` / ``LenderRecord.to_json`` wrote, its
       ``state`` is a :class:`~harvestd.model.LeaseState` (or
       :class:`~harvestd.model.LenderState`) value, a lease's token is 32 bytes (it is
       ``secrets.token_bytes(32)`` at grant and never changes), and the ``id`` and
       ``freed`` columns agree with the JSON (``SqliteStore.commit`` writes both from
       the same record).
    2. **No generation is issued twice.** Leases and lender registrations draw from one
       counter (``LeaseTable._next_generation``) under one lock, so no two leases share a
       generation, and no lease shares one with a lender's current registration.
    3. **No generation lies above the stored counter.** A grant commits the lease with
       the counter in one transaction, and so does a registration, so a stored record
       never carries a generation the stored counter has not reached: a restarted broker
       cannot issue it again.
    4. **A lease was granted by a registration older than itself**:
       ``lender_generation < generation`` (the lender's generation is drawn at
       registration, the lease's later).
    5. **An active lease (granted or revoking) has an existing lender, is of that
       lender's current registration, and is not freed.** Lender rows are never deleted;
       a re-registration ends every active lease of the old one in the same commit
       (``register_lender``), as does ``lenders_lost``; and ``_mark_freed`` only runs on
       a lease after ``_end`` has moved it out of the active states.
    6. **A lease whose memory is not yet freed belongs to its lender's current
       registration.** Re-registration marks every unfreed lease of the lender freed (its
       memory died with the old process) and commits them; a lease that ends after its
       lender re-registered is freed on the spot (``_end``). So unfreed leases of an old
       registration would be memory that nobody will ever free, or confirm freed.
    7. **Charges are whole allocations.** An unfreed lease of a lender's current
       registration charges ``nbytes`` rounded up to that registration's granularity:
       ``nbytes <= charged`` and ``charged % granularity == 0`` (the granularity is fixed
       for a registration).
    8. **(``capacity_bound``) Per lender, bytes of unfreed leases of its current
       registration are at most its capacity.** A grant admits ``n`` bytes only if
       ``held + n <= capacity - reclaimed <= capacity``. A tenant's reclaim raises
       ``reclaimed``, never lowers ``capacity``, and adds nothing to ``held`` (it revokes,
       which only ever frees); restore lowers ``reclaimed``; registration starts ``held``
       at 0 (older leases no longer count, rule 6). The one thing that lowers
       ``capacity`` is a lender's own report (``ReportLender``): a GPU lender whose
       tenant grows reports less than it has lent and then asks the broker to revoke
       down to it. So the bound is an invariant only of stores whose lenders never
       report a capacity below what they have lent (host lenders report a fixed
       budget); pass ``capacity_bound=False`` for the others. Note that ``held <=
       capacity - reclaimed`` is *not* an invariant even then: a reclaim raises
       ``reclaimed`` first and the leases it revokes stay charged until their memory is
       confirmed free.
    """
    problems: list[str] = []
    try:
        db = _connect_read_only(path)
    except sqlite3.Error as exc:
        return [f"store {path} cannot be opened read-only: {exc}"]
    try:
        db.execute("BEGIN")  # one snapshot for every query below
        row = db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        lender_rows = db.execute("SELECT id, data FROM lenders").fetchall()
        lease_rows = db.execute("SELECT id, freed, data FROM leases").fetchall()
        db.execute("COMMIT")
    except sqlite3.Error as exc:
        return [f"store {path} cannot be read: {exc}"]
    finally:
        db.close()

    try:
        counter = int(row[0]) if row else 0
    except ValueError:
        problems.append(f"generation counter {row[0]!r} is not an integer")
        counter = 0

    lenders: dict[str, _Lender] = {}
    for row_id, data in lender_rows:
        try:
            rec = json.loads(data)
            if rec["id"] != row_id:
                problems.append(f"lender row {row_id!r} holds the record of {rec['id']!r}")
            if rec["state"] not in {int(s) for s in LenderState}:
                problems.append(f"lender {row_id}: state {rec['state']!r} is not a LenderState")
            lenders[row_id] = _Lender(
                row_id, _int(rec, "generation"), _int(rec, "capacity"), _int(rec, "granularity")
            )
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"lender row {row_id!r} does not parse: {exc!r}")

    leases: list[_Lease] = []
    for row_id, freed_col, data in lease_rows:
        try:
            rec = json.loads(data)
            if rec["id"] != row_id:
                problems.append(f"lease row {row_id!r} holds the record of {rec['id']!r}")
            if bool(freed_col) != bool(rec["freed"]):
                problems.append(
                    f"lease {row_id}: freed column {freed_col} but record freed={rec['freed']}"
                )
            if rec["state"] not in {int(s) for s in LeaseState}:
                problems.append(f"lease {row_id}: state {rec['state']!r} is not a LeaseState")
            token = bytes.fromhex(rec["token"])
            if len(token) != TOKEN_BYTES:
                problems.append(f"lease {row_id}: token of {len(token)} bytes, not {TOKEN_BYTES}")
            leases.append(
                _Lease(
                    row_id,
                    rec["lender_id"],
                    rec["state"],
                    bool(rec["freed"]),
                    _int(rec, "charged"),
                    _int(rec, "nbytes"),
                    _int(rec, "generation"),
                    _int(rec, "lender_generation"),
                )
            )
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"lease row {row_id!r} does not parse: {exc!r}")

    # 2 and 3: one counter, never reissued.
    by_generation: dict[int, list[str]] = defaultdict(list)
    for lease in leases:
        by_generation[lease.generation].append(lease.id)
    for generation, ids in sorted(by_generation.items()):
        if len(ids) > 1:
            problems.append(
                f"generation {generation} granted {len(ids)} times: {', '.join(sorted(ids))}"
            )
    lender_generations = {l.generation: l.id for l in lenders.values()}
    for lease in leases:
        if lease.generation in lender_generations:
            problems.append(
                f"lease {lease.id}: generation {lease.generation} is also lender "
                f"{lender_generations[lease.generation]}'s registration"
            )
        if lease.generation > counter or lease.lender_generation > counter:
            problems.append(
                f"lease {lease.id}: generation {lease.generation} (lender "
                f"generation {lease.lender_generation}) above the stored "
                f"counter {counter}"
            )
        # 4
        if lease.lender_generation >= lease.generation:
            problems.append(
                f"lease {lease.id}: lender generation {lease.lender_generation} "
                f"not older than the lease's {lease.generation}"
            )
    for lender in lenders.values():
        if lender.generation > counter:
            problems.append(
                f"lender {lender.id}: generation {lender.generation} above the "
                f"stored counter {counter}"
            )

    held: dict[str, int] = defaultdict(int)
    for lease in leases:
        owner = lenders.get(lease.lender_id)
        active = lease.state in (LeaseState.GRANTED, LeaseState.REVOKING)
        # 5
        if active:
            if owner is None:
                problems.append(
                    f"active lease {lease.id} belongs to unknown lender {lease.lender_id!r}"
                )
            elif lease.lender_generation != owner.generation:
                problems.append(
                    f"active lease {lease.id} is of lender {owner.id}'s "
                    f"registration {lease.lender_generation}, not its current "
                    f"{owner.generation}"
                )
            if lease.freed:
                problems.append(f"active lease {lease.id} is marked freed")
        if lease.freed:
            continue
        # 6
        if owner is None:
            problems.append(
                f"unfreed lease {lease.id} belongs to unknown lender {lease.lender_id!r}"
            )
            continue
        if lease.lender_generation != owner.generation:
            problems.append(
                f"unfreed lease {lease.id} ({LeaseState(lease.state).label}) is "
                f"of lender {owner.id}'s old registration "
                f"{lease.lender_generation} (current {owner.generation}): its "
                f"memory will never be confirmed free"
            )
            continue
        # 7
        if lease.charged < lease.nbytes or (
            owner.granularity > 0 and lease.charged % owner.granularity
        ):
            problems.append(
                f"lease {lease.id}: charged {lease.charged} for {lease.nbytes} "
                f"bytes at granularity {owner.granularity}"
            )
        held[owner.id] += lease.charged
    # 8
    if capacity_bound:
        for lender_id, nbytes in sorted(held.items()):
            if nbytes > lenders[lender_id].capacity:
                problems.append(
                    f"lender {lender_id}: {nbytes} bytes held by unfreed leases "
                    f"exceed its capacity {lenders[lender_id].capacity}"
                )
    return problems
