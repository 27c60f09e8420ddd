"""A borrower placed by topology (near its own GPU, NEAR): leases NBYTES on a peer GPU,
fills the lease with its MARKER byte and gathers 64 random blocks of 16 KiB back until
revoked or told to stop (any line on stdin), counting reads that saw a wrong byte; then
reads its stale tensor once (fenced: no fault). It reports on stdout as JSON lines
(``leased``, ``revoked``, ``done``).

Usage: ``peer_holder.py NBYTES MARKER TTL NEAR`` with ``HARVEST_STATE_DIR`` set.
"""

from __future__ import annotations

import json
import sys
import threading

import torch

from client import Lease, LeaseRevoked, connect
from client.devices import cuda_uuid


def main() -> None:
    nbytes, marker = int(sys.argv[1]), int(sys.argv[2])
    ttl, near = float(sys.argv[3]), sys.argv[4]
    c = connect()
    lease = c.lease(nbytes, ttl=ttl, backend="cuda-vmm", near=near)
    dev = lease.device
    t = lease.tensor(torch.uint8)
    t.fill_(marker)
    out = torch.empty((64, 16384), dtype=torch.uint8, device=dev)
    offsets = torch.randperm(nbytes // 16384, device=dev)[:64] * 16384
    revoked = threading.Event()

    def on_revoke(l: Lease, why: str) -> None:
        print(json.dumps({"event": "revoked", "id": l.id}), flush=True)
        revoked.set()

    lease.on_revoke(on_revoke)
    print(
        json.dumps(
            {
                "event": "leased",
                "id": lease.id,
                "lender": lease.lender,
                "lender_gpu": lease.gpu_uuid,
                "device": str(dev),
                "device_uuid": cuda_uuid(dev.index),
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
                lease.gather(offsets, 16384, out)
                ok = bool((out == marker).all())
            reads += 1
            wrong += not ok
        except LeaseRevoked:
            break
    if lease.state == "revoked":
        revoked.wait(10)
    int(t[:4096].sum())  # the stale tensor, fenced: this process's own memory, no fault
    torch.cuda.synchronize(dev)
    print(
        json.dumps({"event": "done", "reads": reads, "wrong": wrong, "state": lease.state}),
        flush=True,
    )
    c.close()


if __name__ == "__main__":
    main()
