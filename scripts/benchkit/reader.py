"""A borrower process for the multi-GPU benchmarks (bench_tenant, bench_aggregate): it
leases through the node at $HARVEST_STATE_DIR, fills the memory with a marker byte, and
reads it with gathers of 16 KiB blocks at full speed when told. Commands on stdin, one
JSON line on stdout per answer:

  lease single LENDER NBYTES   one lease from LENDER (every other lender avoided)
  lease striped K NBYTES       a striped lease of K stripes near this process's GPU
  go                           read until `pause`, then answer {"event": "paused", ...}
  run START SECONDS            read from unix time START for SECONDS: {"event": "ran", ...}
  release                      give the lease back
  exit

Reads launch back to back (a device sync every --sync-every gathers), with offsets made
beforehand: a single lease is read through ``blocks.gather(check=False)`` under
``use()``, a striped lease through a ``StripedLease.plan`` (no sync per call), so neither
pays a sync per gather. With --grouped, a striped read's blocks come grouped by stripe
(no staging copy); without, in random order.

    python scripts/benchreader.py --device cuda:0      # driven by a benchmark

(scripts/benchreader.py is this module's command line; benchkit.multi.Worker runs it.)
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import torch

from client import LeaseRevoked, connect
from client.blocks import gather
from harvestd.sizes import KiB, MiB

MARKER = 0x5A


def say(**msg: Any) -> None:
    """One JSON line to the benchmark."""
    print(json.dumps(msg), flush=True)


class Reader:
    """One lease (or striped lease) and the loop that reads it."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.client = connect()
        self.lease: Any = None
        self.striped = False
        self.revoked = threading.Event()
        self.my_uuid = ""
        if self.device.type == "cuda":
            from client.devices import cuda_uuid

            torch.cuda.set_device(self.device)
            self.my_uuid = cuda_uuid(self.device.index or 0)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def lease_single(self, lender_id: str, nbytes: int) -> None:
        lenders = {l.id: l for l in self.client.lenders()}
        target = lenders[lender_id]
        near = self.device if target.gpu_uuid and target.gpu_uuid != self.my_uuid else None
        self.lease = self.client.lease(
            nbytes,
            ttl=30,
            near=near,
            device=self.device if self.device.type == "cuda" else None,
            avoid=[i for i in lenders if i != lender_id],
        )
        self.striped = False
        self._ready([self.lease.lender], nbytes, lenders)

    def lease_striped(self, stripes: int, nbytes: int) -> None:
        lenders = {l.id: l for l in self.client.lenders()}
        cuda = self.device.type == "cuda"
        self.lease = self.client.lease_striped(
            nbytes,
            stripes=stripes,
            near=self.device if cuda else None,
            backend="cuda-vmm" if cuda else None,
            ttl=30,
        )
        self.striped = True
        self._ready(self.lease.lenders, nbytes, lenders)

    def _ready(self, used: list[str], nbytes: int, lenders: dict[str, Any]) -> None:
        self.revoked.clear()
        self.lease.on_revoke(lambda *_: self.revoked.set())
        parts = self.lease.stripes if self.striped else [self.lease]
        for part in parts:
            with part.use():
                part.as_bytes().fill_(MARKER)
        self._sync()
        block = self.args.block
        n = max(1, min(self.args.batch_bytes, nbytes // 2) // block)
        gen = torch.Generator().manual_seed(len(used))
        sets = [torch.randperm(nbytes // block, generator=gen)[:n] * block for _ in range(4)]
        if self.striped and self.args.grouped:
            layout = self.lease.layout
            sets = [
                s[torch.argsort((s // layout.unit) % layout.stripes, stable=True)] for s in sets
            ]
        self.offsets = [s.to(self.device) for s in sets]
        self.plans = (
            [self.lease.plan(o, block, self.device) for o in self.offsets] if self.striped else []
        )
        self.out = torch.empty(n * block, dtype=torch.uint8, device=self.device)
        say(
            event="leased",
            ids=self.lease.ids if self.striped else [self.lease.id],
            lenders=used,
            gpus=[lenders[i].gpu_uuid for i in used],
            nbytes=nbytes,
            blocks_per_gather=n,
        )

    def _read(self, keep_going: Any) -> dict[str, Any]:
        """Gather until ``keep_going()`` is false; bytes, seconds, GB/s, wrong, revoked."""
        block, moved, i, wrong = self.args.block, 0, 0, 0
        per = self.out.numel()
        self._sync()
        start = time.perf_counter()
        try:
            while keep_going() and not self.revoked.is_set():
                for _ in range(self.args.sync_every):
                    if self.striped:
                        self.lease.gather(self.plans[i % 4], block, self.out)
                    else:
                        with self.lease.use():
                            gather(
                                self.lease.as_bytes(),
                                self.offsets[i % 4],
                                block,
                                self.out,
                                check=False,
                            )
                    i += 1
                    moved += per
                self._sync()
            wrong = int((self.out != MARKER).any()) if moved else 0
        except LeaseRevoked:
            pass
        self._sync()
        elapsed = time.perf_counter() - start
        return {
            "bytes": moved,
            "seconds": elapsed,
            "gbps": moved / elapsed / 1e9 if elapsed else 0.0,
            "gathers": i,
            "wrong": wrong,
            "revoked": self.revoked.is_set() or bool(self.lease and self.lease.revoked),
        }

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def main(argv: list[str] | None = None) -> int:
    """Serve commands until `exit`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--block", type=int, default=16 * KiB)
    parser.add_argument("--batch-bytes", type=int, default=64 * MiB)
    parser.add_argument("--sync-every", type=int, default=16)
    parser.add_argument("--grouped", action="store_true")
    args = parser.parse_args(argv)
    reader = Reader(args)
    say(event="hello", device=str(reader.device), uuid=reader.my_uuid)
    stop = threading.Event()
    running: threading.Thread | None = None
    result: dict[str, Any] = {}
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        try:
            if cmd[0] == "lease" and cmd[1] == "single":
                reader.lease_single(cmd[2], int(cmd[3]))
            elif cmd[0] == "lease" and cmd[1] == "striped":
                reader.lease_striped(int(cmd[2]), int(cmd[3]))
            elif cmd[0] == "go":
                stop.clear()
                running = threading.Thread(
                    target=lambda: result.update(reader._read(lambda: not stop.is_set()))
                )
                running.start()
                say(event="going")
            elif cmd[0] == "pause":
                stop.set()
                if running is not None:
                    running.join()
                say(event="paused", **result)
            elif cmd[0] == "run":
                start_at, seconds = float(cmd[1]), float(cmd[2])
                time.sleep(max(0.0, start_at - time.time()))
                end = time.time() + seconds
                say(event="ran", **reader._read(lambda end=end: time.time() < end))
            elif cmd[0] == "release":
                reader.release()
                say(event="released")
            elif cmd[0] == "exit":
                break
            else:
                say(event="error", error=f"unknown command {line.strip()!r}")
        except Exception as exc:  # noqa: BLE001 - the benchmark reports it and goes on
            say(event="error", error=f"{type(exc).__name__}: {exc}")
    reader.release()
    reader.client.close()
    return 0
