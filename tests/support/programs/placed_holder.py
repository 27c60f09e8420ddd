"""A holder that places a tensor: places NBYTES of float32 (values i % 251) in host
leases, reports ``placed`` (with its tiers) as a JSON line, then keeps verifying the
placed tensor under ``use()`` until told to stop (any line on stdin); a read that ever
differs is counted as ``wrong`` in the final ``done`` line.

Usage: ``placed_holder.py NBYTES TTL`` with ``HARVEST_STATE_DIR`` set.
"""

from __future__ import annotations

import json
import sys
import threading

import torch

from client import connect


def main() -> None:
    nbytes, ttl = int(sys.argv[1]), float(sys.argv[2])
    source = (torch.arange(nbytes // 4) % 251).to(torch.float32)
    c = connect()
    placed = c.place(source, chunk_bytes=1 << 20, lease_bytes=4 << 20, ttl=ttl)
    print(json.dumps({"event": "placed", "tiers": placed.tiers()}), flush=True)
    stop = threading.Event()

    def wait_for_stop() -> None:
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=wait_for_stop, daemon=True).start()
    reads = wrong = 0
    while not stop.wait(0.01):
        with placed.use() as t:
            wrong += not torch.equal(t, source)
        reads += 1
    placed.close()
    print(json.dumps({"event": "done", "reads": reads, "wrong": wrong}), flush=True)


if __name__ == "__main__":
    main()
