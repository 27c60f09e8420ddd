"""gRPC channels to the broker, made one way for every caller on the node."""

from __future__ import annotations

import grpc

# gRPC's default reconnect backoff grows to two minutes. The broker is a local process
# that a restart brings back within seconds; a channel that saw it go away must find it
# again as soon as it listens, or a lender's pick-up check fails long after the broker
# is back. A Unix socket connect costs microseconds, so retrying often is cheap.
_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 500),
]


def broker_channel(address: str) -> grpc.Channel:
    """An insecure channel to the broker at ``address`` that reconnects within half a
    second of the broker coming back."""
    return grpc.insecure_channel(address, options=_OPTIONS)
