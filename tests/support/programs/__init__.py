"""Programs that tests run in child processes, as real scripts; the constants below are
their paths.

The client programs (``holder.py``, ``gpu_holder.py``, ``peer_holder.py``,
``gpu_tenant.py``, ``placed_holder.py``) go to :meth:`support.nodes.Node.spawn`: each
reads its arguments from ``sys.argv``, finds its node through ``HARVEST_STATE_DIR``,
reports on stdout as JSON lines (read them with :class:`support.holder.Holder`) and
takes commands on stdin. They
import Harvest's packages and torch, never ``support``.

``backend_lender.py`` is driven over a socket by
:class:`support.lender_process.LenderProcess`; it imports :mod:`support.pattern`, so that
process puts ``tests/`` on its ``PYTHONPATH``.
"""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent

HOLDER = _HERE / "holder.py"
"""``holder.py NBYTES MARKER TTL``: a host or default lease, verified until revoked."""

GPU_HOLDER = _HERE / "gpu_holder.py"
"""``gpu_holder.py NBYTES MARKER BACKEND TTL``: a lease on the GPU, gathered and
verified until revoked."""

GPU_TENANT = _HERE / "gpu_tenant.py"
"""``gpu_tenant.py GPU_UUID LEAVE RESERVE``: the lender GPU's own tenant, growing into
the reserve."""

PLACED_HOLDER = _HERE / "placed_holder.py"
"""``placed_holder.py NBYTES TTL``: a placed tensor in host leases, verified until told
to stop."""

PEER_HOLDER = _HERE / "peer_holder.py"
"""``peer_holder.py NBYTES MARKER TTL NEAR``: a borrower placed near its own GPU, reading
a peer GPU's lease."""

BACKEND_LENDER = _HERE / "backend_lender.py"
"""``backend_lender.py SOCKET_FD KIND OPTIONS_JSON``: a GPU backend's lender side,
driven over a socket (:class:`support.lender_process.LenderProcess`)."""
