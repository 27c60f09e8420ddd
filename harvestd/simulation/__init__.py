"""The broker's placement played over a simulated cluster: nothing is granted on a real
node, and nothing about placement or leases is re-implemented.

- :mod:`harvestd.simulation.trace`: GPU tenant memory traces fitted to published
  statistics of production GPU clusters (``python scripts/cluster_trace.py``).
- :mod:`harvestd.simulation.cluster`: one broker's real lease table and policy driven by
  thousands of simulated lenders and borrowers on a fake clock
  (``python scripts/simulate_cluster.py``).
- :mod:`harvestd.simulation.placement`: a node's placement decisions by topology and
  load, without granting anything (``python scripts/placement_dryrun.py``).

Part of the broker's layer: it imports the broker's modules and the common ones, never
``lender/`` or ``client/`` (the placement dry run is handed the client's stripe
arithmetic by its caller).
"""
