"""Harvest's wire contract: generated protobuf and gRPC stubs for ``harvest.proto``.

Regenerate with ``scripts/gen_protos.sh``; CI fails when they are stale.
"""

from protos import harvest_pb2 as pb  # noqa: F401
from protos import harvest_pb2_grpc as rpc  # noqa: F401
