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
- ``benchkit.moe*``: ``scripts/bench_moe.py``'s parts: its modes (:mod:`benchkit.moemodes`),
  models (:mod:`benchkit.moemodels`), timed decode (:mod:`benchkit.moedecode`), each mode's
  setup (:mod:`benchkit.moesetup`) and timed run (:mod:`benchkit.moerun`), the comparison
  rows (:mod:`benchkit.moecompare`), the revocation rows (:mod:`benchkit.moerevoke`), the
  tables and verdict (:mod:`benchkit.moereport`) and the plot (:mod:`benchkit.moeplot`).
- ``benchkit.kv*``: ``scripts/bench_kv.py``'s parts: its modes' caches and names
  (:mod:`benchkit.kvmodes`), the model and decode loop (:mod:`benchkit.kvmodel`), the GPU
  memory a run holds (:mod:`benchkit.kvmemory`), the reload check
  (:mod:`benchkit.kvreload`), one mode's run (:mod:`benchkit.kvrun`), verdicts and
  headlines (:mod:`benchkit.kvsummary`), the tables (:mod:`benchkit.kvreport`) and the
  plot (:mod:`benchkit.kvplot`);
- :mod:`benchkit.stats` (repeats, alternating order, spreads), :mod:`benchkit.tenant` (a
  lender node and the device's tenant for the tenant benchmarks) and
  :mod:`benchkit.driver` (the GPU probes' processes, with nothing of Harvest between).

A benchmark run as ``python scripts/bench_x.py`` has scripts/ first on ``sys.path``, so
``from benchkit.node import bench_node`` needs no path edits; the project's packages come
from the installed project (or PYTHONPATH holding the repository root). Tests find
benchkit through pytest's ``pythonpath`` setting (pyproject.toml).
"""
