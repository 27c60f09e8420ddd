"""Harvest's exceptions, and their one mapping to and from gRPC status codes.

Every layer raises these; the broker's servicer turns them into statuses with
:func:`abort_with`, and every caller turns an ``RpcError`` back with :func:`from_rpc_error`,
so an error keeps its type across the wire.
"""

from __future__ import annotations

import grpc


class HarvestError(Exception):
    """Base of every error Harvest raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class InvalidArgument(HarvestError, ValueError):
    """The request itself is malformed: a size of zero, an unknown backend, ..."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(HarvestError, LookupError):
    """No lease or lender has that id."""

    code = grpc.StatusCode.NOT_FOUND


class NoCapacity(HarvestError):
    """No lender on the client's node can meet the request now."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class PermissionDenied(HarvestError):
    """Wrong token, stale generation, another user's socket, or another client's lease."""

    code = grpc.StatusCode.PERMISSION_DENIED


class LeaseRevoked(HarvestError):
    """The lease is gone (revoked, expired or released): its memory must not be used."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class FailedPrecondition(HarvestError):
    """The system is not in a state that allows the request (a lender draining, ...)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(HarvestError, ConnectionError):
    """No node answers at the address; the broker or a lender is down."""

    code = grpc.StatusCode.UNAVAILABLE


class StoreError(HarvestError):
    """The broker's on-disk store cannot be read or written; the broker refuses to go on."""

    code = grpc.StatusCode.INTERNAL


class BackendUnavailable(HarvestError):
    """A memory backend cannot run here (no GPU, no VMM support, no cuda-bindings)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


_BY_CODE: dict[grpc.StatusCode, type[HarvestError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: NoCapacity,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.INTERNAL: StoreError,
}

# A FAILED_PRECONDITION about a lease that ended is a LeaseRevoked; the servicer marks it so.
LEASE_ENDED_PREFIX = "lease ended: "


def to_wire(err: HarvestError) -> tuple[grpc.StatusCode, str]:
    """The status code and message that carry ``err`` over gRPC or the pick-up socket."""
    message = str(err)
    if isinstance(err, LeaseRevoked):
        message = LEASE_ENDED_PREFIX + message
    return err.code, message


def abort_with(context: grpc.ServicerContext, err: HarvestError) -> None:
    """End an RPC with the status that ``err``'s type maps to (raises, as grpc does)."""
    context.abort(*to_wire(err))


def from_code(code: grpc.StatusCode | str, message: str) -> HarvestError:
    """The Harvest error for a status code (a ``grpc.StatusCode`` or its name)."""
    if isinstance(code, str):
        code = getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN)
    if code == grpc.StatusCode.FAILED_PRECONDITION and message.startswith(LEASE_ENDED_PREFIX):
        return LeaseRevoked(message[len(LEASE_ENDED_PREFIX) :])
    return _BY_CODE.get(code, HarvestError)(message)


def from_rpc_error(err: grpc.RpcError) -> HarvestError:
    """The Harvest error an ``RpcError`` stands for."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    return from_code(code, details or str(code))
