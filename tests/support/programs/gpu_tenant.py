"""The lender GPU's own tenant (``cuda:$HARVEST_LENDER_GPU``, 0 by default): allocates
until NVML reports LEAVE bytes free, then times how long until free memory is back above
RESERVE and reports it (``tenant``); on a line on stdin, allocates half the reserve,
which it must find free (``next_ok``); then waits for one more line.

Usage: ``gpu_tenant.py GPU_UUID LEAVE RESERVE``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pynvml
import torch


def main() -> None:
    uuid, leave, reserve = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    dev = f"cuda:{os.environ.get('HARVEST_LENDER_GPU', '0')}"  # the lender's GPU
    torch.zeros(1, device=dev)  # our own CUDA context first: it takes memory too
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByUUID(uuid)

    def free() -> int:
        return int(pynvml.nvmlDeviceGetMemoryInfo(h).free)

    grab = torch.empty(free() - leave, dtype=torch.uint8, device=dev)
    torch.cuda.synchronize(dev)
    pressed = time.monotonic()
    low = free()
    while free() < reserve and time.monotonic() - pressed < 30:
        time.sleep(0.0005)
    freed_s = time.monotonic() - pressed
    print(
        json.dumps(
            {
                "event": "tenant",
                "free_at_pressure": low,
                "freed_s": freed_s,
                "recovered": free() >= reserve,
            }
        ),
        flush=True,
    )
    sys.stdin.readline()
    nxt = torch.empty(reserve // 2, dtype=torch.uint8, device=dev)  # finds the memory
    torch.cuda.synchronize(dev)
    print(json.dumps({"event": "next_ok"}), flush=True)
    sys.stdin.readline()
    del grab, nxt  # held until here: the pressure lasts as long as the process


if __name__ == "__main__":
    main()
