#!/usr/bin/env python3
"""GPU tenant memory traces: the command line of :mod:`harvestd.simulation.trace`.

python scripts/cluster_trace.py --gpus 8 --seconds 3600 -o trace.json
python scripts/cluster_trace.py --summary --gpus 256 --seconds 86400 --step 60
"""

from __future__ import annotations

import logging
import sys

from harvestd.simulation.trace import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(main())
