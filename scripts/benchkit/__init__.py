"""What the benchmarks in scripts/ share, one module per concern:

- :mod:`benchkit.node`: a Harvest node started for a benchmark and stopped after it, the
  environment its processes need, the repository root, attention kernels, matplotlib;
- :mod:`benchkit.multi`: for the multi-GPU benchmarks, a node of plain host-lender
  processes (their --smoke runs), JSON-line worker processes, GPU and result helpers;
- :mod:`benchkit.peer`: copy-engine ceilings between GPUs (peer copies);
- :mod:`benchkit.gpumem`: what the benchmark's own process holds on its GPU (torch's
  allocator, NVML's per-process figure) and what a setup grew it by;
- :mod:`benchkit.reader`: the borrower process those benchmarks drive
  (``scripts/benchreader.py`` is its command line).

A benchmark run as ``python scripts/bench_x.py`` has scripts/ first on ``sys.path``, so
``from benchkit.node import bench_node`` needs no path edits; the project's packages come
from the installed project (or PYTHONPATH holding the repository root). Tests find
benchkit through pytest's ``pythonpath`` setting (pyproject.toml).
"""
