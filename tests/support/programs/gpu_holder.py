"""A holder on the GPU: leases NBYTES with BACKEND on ``cuda:$HARVEST_CLIENT_GPU`` (0 by
default), fills them with its MARKER byte, gathers 64 blocks of 16 KiB in one launch,
then verifies under ``lease.use()`` until revoked or told to stop (any line on stdin);
after that it reads its stale tensor once, which must neither fault nor show anything
but its own (fenced) memory. It reports on stdout as JSON lines (``leased``,
``revoked``, ``done``).

Usage: ``gpu_holder.py NBYTES MARKER BACKEND TTL`` with ``HARVEST_STATE_DIR`` set.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import torch

from client import Lease, LeaseRevoked, connect


def main() -> None:
    nbytes, marker = int(sys.argv[1]), int(sys.argv[2])
    backend, ttl = sys.argv[3], float(sys.argv[4])
    dev = f"cuda:{os.environ.get('HARVEST_CLIENT_GPU', '0')}"
    c = connect()
    lease = c.lease(nbytes, ttl=ttl, backend=backend, device=dev)
    t = lease.tensor(torch.uint8)
    t.fill_(marker)
    blocks = 64
    out = torch.empty((blocks, 16384), dtype=torch.uint8, device=dev)
    lease.gather([i * 32768 for i in range(blocks)], 16384, out)
    gathered_ok = bool((out == marker).all())
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
                "backend": lease.backend.value,
                "device": str(t.device),
                "gathered_ok": gathered_ok,
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
            reads += 1
            wrong += not ok
        except LeaseRevoked:
            break
    if lease.state == "revoked":
        revoked.wait(10)
    # The fence cut the lender's pages off at once; the range is covered with local
    # memory shortly after the acknowledgement (client.lease._COVER_DELAY_S).
    time.sleep(0.5)
    int(t[:4096].sum())  # the stale tensor, fenced and covered: local memory, no fault
    torch.cuda.synchronize()
    print(
        json.dumps(
            {
                "event": "done",
                "reads": reads,
                "wrong": wrong,
                "state": lease.state,
                "stale_ok": True,
            }
        ),
        flush=True,
    )
    c.close()


if __name__ == "__main__":
    main()
