"""The CLI's calls to the broker: one channel per call, errors as our own exceptions."""

from __future__ import annotations

import grpc

from harvestd.channel import broker_channel
from harvestd.errors import Unavailable, from_rpc_error
from harvestd.paths import resolve_address
from protos import harvest_pb2_grpc as pb_grpc


def _stub(state_dir: str | None) -> tuple[pb_grpc.BrokerStub, grpc.Channel]:
    address = resolve_address(None, state_dir) if state_dir else resolve_address()
    channel = broker_channel(address)
    return pb_grpc.BrokerStub(channel), channel


def call(state_dir: str | None, method: str, request, timeout: float = 10.0):
    """Call ``method`` of the broker of the node at ``state_dir`` (default: the usual
    one); a node that does not answer is ``Unavailable`` with the reason."""
    stub, channel = _stub(state_dir)
    try:
        return getattr(stub, method)(request, timeout=timeout)
    except grpc.RpcError as err:
        error = from_rpc_error(err)
        if isinstance(error, Unavailable):
            raise Unavailable(f"no Harvest node answers ({error})") from None
        raise error from None
    finally:
        channel.close()


def enum_name(enum, value: int, prefix: str = "") -> str:
    """``value``'s name in ``enum``, lower case, less ``prefix``; the number if unknown."""
    # Proto3 enums are open: a newer (or a fuzzed) broker may send a value this CLI does
    # not know, and a listing must still print.
    try:
        return enum.Name(value).removeprefix(prefix).lower()
    except ValueError:
        return str(value)
