#!/usr/bin/env python3
"""A borrower process for the multi-GPU benchmarks: the command line of
:mod:`benchkit.reader` (commands on stdin, JSON lines on stdout; see there).

    python scripts/benchreader.py --device cuda:0      # driven by a benchmark
"""

from __future__ import annotations

import sys

from benchkit.reader import main

if __name__ == "__main__":
    sys.exit(main())
