"""A lease-table notifier that remembers what the table told holders and lenders."""

from __future__ import annotations

from harvestd.model import LeaseRecord


class Recorder:
    """A :class:`~harvestd.table.Notifier` that records each notice, in order: whom the
    table asked to give a lease up (REVOKE), whom it told a lease ended (ENDED), and which
    leases' memory it sent back to their lender (FREE, with whether the lease ended
    cleanly). Nobody waits for freed memory in these tests."""

    def __init__(self) -> None:
        self.revoked: list[str] = []
        self.ends: list[str] = []
        self.frees: list[tuple[str, bool]] = []

    def revoke(self, lease: LeaseRecord) -> None:
        """A REVOKE for the holder."""
        self.revoked.append(lease.id)

    def ended(self, lease: LeaseRecord) -> None:
        """An ENDED for the holder."""
        self.ends.append(lease.id)

    def free(self, lease: LeaseRecord) -> None:
        """A FREE for the lender."""
        self.frees.append((lease.id, lease.clean))

    def freed(self, lender_id: str) -> None:
        """Nobody waits in these tests."""
