"""Lenders: one Ray actor per GPU (or host-memory pool) that lends spare memory.

The memory itself sits behind the :class:`lender.backends.Backend` seam; the actor in
:mod:`lender.actor` registers with the broker, hands allocations out through the
pick-up socket (:mod:`lender.pickup`) and frees them when their leases end.
"""
