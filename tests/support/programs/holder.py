"""A holder process: leases NBYTES, fills them with its MARKER byte, then keeps verifying
them under ``lease.use()`` until it is revoked or told to stop (any line on stdin). It
reports on stdout as JSON lines (``leased``, ``revoked``, ``done``); a read that ever
sees a wrong byte is counted as ``wrong``.

Usage: ``holder.py NBYTES MARKER TTL`` with ``HARVEST_STATE_DIR`` set.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import torch

from client import Lease, LeaseRevoked, connect


def main() -> None:
    nbytes, marker, ttl = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    c = connect()
    lease = c.lease(nbytes, ttl=ttl)
    t = lease.tensor(torch.uint8)
    t.fill_(marker)
    revoked = threading.Event()

    def on_revoke(l: Lease, why: str) -> None:
        print(json.dumps({"event": "revoked", "id": l.id, "reason": why}), flush=True)
        revoked.set()

    lease.on_revoke(on_revoke)
    print(
        json.dumps(
            {
                "event": "leased",
                "id": lease.id,
                "lender": lease.lender,
                "nbytes": lease.nbytes,
                "generation": lease.generation,
            }
        ),
        flush=True,
    )
    reads = wrong = 0
    stop = threading.Event()

    def wait_for_stop() -> None:
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=wait_for_stop, daemon=True).start()
    while not stop.is_set() and not revoked.is_set():
        try:
            with lease.use():
                ok = bool((t == marker).all())
            reads += 1  # counted only when use() vouched for the read
            wrong += not ok
        except LeaseRevoked:
            break
        time.sleep(0.01)
    if lease.state == "revoked":
        revoked.wait(10)  # the callback runs on the revoking thread: let it report first
    print(
        json.dumps({"event": "done", "reads": reads, "wrong": wrong, "state": lease.state}),
        flush=True,
    )
    c.close()


if __name__ == "__main__":
    main()
