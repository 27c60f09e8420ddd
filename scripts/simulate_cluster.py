#!/usr/bin/env python3
"""One Harvest broker over a simulated cluster: the command line of
:mod:`harvestd.simulation.cluster`.

    python scripts/simulate_cluster.py            # the whole schedule, about 7 minutes
    python scripts/simulate_cluster.py --quick    # a smoke run
    python scripts/simulate_cluster.py --gpus 10000
"""

from __future__ import annotations

import logging
import sys

from harvestd.simulation.cluster import main

if __name__ == "__main__":
    # Configured here, not in main(), so that tests calling main() keep their logging.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("harvestd").setLevel(logging.WARNING)  # a line per lender is noise
    logging.getLogger("harvestd.simulation").setLevel(logging.INFO)  # the progress lines
    sys.exit(main())
