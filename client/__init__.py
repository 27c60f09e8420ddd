"""Harvest's client library: borrow memory that other jobs lend.

    from client import connect
    c = connect()
    with c.lease(1 << 30, ttl=30) as lease:
        t = lease.tensor(torch.float16, (1024, 1024))   # no copy
        lease.on_revoke(lambda lease, why: ...)
    with c.lease_striped(8 << 30, near="cuda:0") as striped:   # over several lenders
        striped.gather(offsets, 16384, out)

Every error is a :class:`HarvestError`; a lease that is gone raises
:class:`LeaseRevoked`; a request no lender can meet raises :class:`NoCapacity` at once.
"""

from client.connection import Client, ReclaimResult, connect
from client.lease import Lease
from client.striped import StripedLease
from harvestd.errors import (
    FailedPrecondition,
    HarvestError,
    InvalidArgument,
    LeaseRevoked,
    NoCapacity,
    NotFound,
    PermissionDenied,
    Unavailable,
)

__all__ = [
    "Client",
    "FailedPrecondition",
    "HarvestError",
    "InvalidArgument",
    "Lease",
    "LeaseRevoked",
    "NoCapacity",
    "NotFound",
    "PermissionDenied",
    "ReclaimResult",
    "StripedLease",
    "Unavailable",
    "connect",
]
