"""Support code for Harvest's tests: what tests import, as opposed to the pytest fixtures
in ``tests/conftest.py``.

One concern per module:

- :mod:`support.env`: how a test runs the repo's code in a child process (``PY``,
  ``REPO``, :func:`~support.env.node_env`).
- :mod:`support.sockets`: state dirs short enough for Unix sockets, free TCP ports.
- :mod:`support.waiting`: :func:`~support.waiting.wait_for`, polling with a deadline.
- :mod:`support.nodes`: nodes under test (:class:`~support.nodes.Node`,
  :class:`~support.nodes.PlainNode`, :class:`~support.nodes.ManyLenderNode`) and the
  context managers that start and stop them.
- :mod:`support.holder`: :class:`~support.holder.Holder`, a client process that speaks
  JSON lines.
- :mod:`support.programs`: the programs such processes run (lease holders, a GPU tenant,
  a backend's lender side), as real scripts.
- :mod:`support.lender_process`: :class:`~support.lender_process.LenderProcess`, a GPU
  backend's lender side in a process of its own, for the backend tests.
- :mod:`support.pattern`: a byte pattern that a lender and a client both compute.
- :mod:`support.clock`: a fake clock for the lease table.
- :mod:`support.recorder`: a lease-table notifier that remembers what it was told.
- :mod:`support.ill_typed`: for arguments of the wrong type, passed on purpose.

``tests/`` is on ``sys.path`` (``pythonpath`` in pyproject.toml), so ``support`` imports
the same way from ``tests/`` and from ``tests/gpu/``. :mod:`support.pattern` imports
torch: only tests that have checked for torch import it.
"""
