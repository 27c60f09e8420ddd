"""The broker's records: leases and lenders, their states, and their wire form."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields
from typing import Any, cast

from protos import harvest_pb2 as pb


class LeaseState(enum.IntEnum):
    """Where a lease is in its life (values are the wire enum's)."""

    GRANTED = pb.GRANTED
    REVOKING = pb.REVOKING
    RELEASED = pb.RELEASED
    EXPIRED = pb.EXPIRED
    REVOKED = pb.REVOKED

    @property
    def active(self) -> bool:
        """The holder may still have the memory mapped."""
        return self in (LeaseState.GRANTED, LeaseState.REVOKING)

    @property
    def label(self) -> str:
        """Lower-case name for tables and JSON."""
        return self.name.lower()


class LenderState(enum.IntEnum):
    """Whether a lender takes new grants (values are the wire enum's)."""

    UP = pb.LENDER_UP
    DRAINING = pb.LENDER_DRAINING
    DOWN = pb.LENDER_DOWN

    @property
    def label(self) -> str:
        """Lower-case name for tables and JSON."""
        return self.name.lower()


@dataclass
class LenderRecord:
    """A lender as the broker knows it."""

    id: str
    node: str
    backend: int
    pickup_address: str
    capacity: int
    generation: int
    gpu_uuid: str = ""
    gpu_index: int = -1
    links: dict[str, int] = field(default_factory=dict)  # peer GPU uuid -> NVLink count
    reclaimed: int = 0
    state: LenderState = LenderState.UP
    last_report: float = 0.0
    pid: int = 0
    granularity: int = 4096
    device_total: int = 0
    device_free: int = 0
    ray_node_id: str = ""
    tenant_bytes: int = 0  # the device's tenant at the last report: its use now,
    tenant_peak: int = 0  # its peak over the lender's window (kept out of lending),
    peak_window_s: float = 0.0  # and that window (0: no tenant watched)
    held: int = 0  # bytes of leases not yet freed; derived, never stored

    @property
    def lendable(self) -> int:
        """Bytes it may have granted at once now."""
        return max(0, self.capacity - self.reclaimed)

    @property
    def free(self) -> int:
        """Bytes a new grant may take now."""
        return max(0, self.lendable - self.held)

    def to_json(self) -> dict[str, Any]:
        """The stored form (``held`` is derived from the leases on load)."""
        # By hand rather than dataclasses.asdict: this runs on every commit, and asdict's
        # deep copy was most of the broker's time per grant.
        data = {name: getattr(self, name) for name in _LENDER_STORED}
        data["links"] = dict(self.links)
        data["state"] = int(self.state)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LenderRecord":
        """Inverse of :meth:`to_json`."""
        data = dict(data)
        data["state"] = LenderState(data["state"])
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def to_pb(self) -> pb.Lender:
        """Wire form."""
        # The wire enums are plain ints at run time; their stubs give each a type of its own.
        return pb.Lender(
            id=self.id,
            node=self.node,
            backend=cast(pb.Backend, self.backend),
            gpu_uuid=self.gpu_uuid,
            gpu_index=self.gpu_index,
            links=[pb.GpuLink(peer_uuid=k, nvlinks=v) for k, v in sorted(self.links.items())],
            pickup_address=self.pickup_address,
            capacity=self.capacity,
            reclaimed=self.reclaimed,
            granted=self.held,
            generation=self.generation,
            state=cast(pb.LenderState, int(self.state)),
            last_report=self.last_report,
            pid=self.pid,
            granularity=self.granularity,
            device_total=self.device_total,
            device_free=self.device_free,
            ray_node_id=self.ray_node_id,
            tenant_bytes=self.tenant_bytes,
            tenant_peak=self.tenant_peak,
            peak_window_s=self.peak_window_s,
        )


@dataclass
class LeaseRecord:
    """A lease as the broker knows it."""

    id: str
    lender_id: str
    client_id: str
    nbytes: int  # what the client asked for
    charged: int  # what it holds on the lender (rounded to the granularity)
    token: bytes
    generation: int
    lender_generation: int
    ttl_s: float
    created_at: float
    expires_at: float
    node: str = ""
    priority: int = 0
    holder_pid: int = 0
    state: LeaseState = LeaseState.GRANTED
    reason: str = ""
    revoke_deadline: float = 0.0
    picked_up: bool = False
    clean: bool = False  # ended with the holder known to have unmapped
    freed: bool = False  # the lender confirmed its memory is free
    ended_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """The stored form."""
        data = {name: getattr(self, name) for name in _LEASE_FIELDS}
        data["token"] = self.token.hex()
        data["state"] = int(self.state)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "LeaseRecord":
        """Inverse of :meth:`to_json`."""
        data = dict(data)
        data["token"] = bytes.fromhex(data["token"])
        data["state"] = LeaseState(data["state"])
        return cls(**data)

    def to_pb(self, lender: LenderRecord | None = None, with_token: bool = False) -> pb.Lease:
        """Wire form; the token travels only in Grant's reply."""
        msg = pb.Lease(
            id=self.id,
            lender_id=self.lender_id,
            nbytes=self.nbytes,
            state=cast(pb.LeaseState, int(self.state)),
            ttl_s=self.ttl_s,
            expires_at=self.expires_at,
            generation=self.generation,
            client_id=self.client_id,
            holder_pid=self.holder_pid,
            node=self.node,
            priority=self.priority,
            created_at=self.created_at,
            reason=self.reason,
            revoke_deadline=self.revoke_deadline,
            lender_generation=self.lender_generation,
        )
        if with_token:
            msg.token = self.token
        if lender is not None:
            msg.pickup_address = lender.pickup_address
            msg.backend = cast(pb.Backend, lender.backend)
            msg.gpu_uuid = lender.gpu_uuid
        return msg


_LENDER_STORED = tuple(f.name for f in fields(LenderRecord) if f.name != "held")
_LEASE_FIELDS = tuple(f.name for f in fields(LeaseRecord))
