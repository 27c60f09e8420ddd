#!/usr/bin/env bash
# Regenerate the Python stubs in protos/ from protos/harvest.proto.
#   scripts/gen_protos.sh          write the stubs
#   scripts/gen_protos.sh --check  fail (exit 1) if the committed stubs are stale
# The generator is pinned so that the stubs are the same on every machine; the stubs
# must run on protobuf runtimes 6.31+ (the GPU machines') as well as 7.x.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TOOLS_VERSION="1.75.1"   # bundles protobuf 6.31 gencode
if ! "$PY" -c "import grpc_tools, importlib.metadata as m, sys; sys.exit(m.version('grpcio-tools') != '$TOOLS_VERSION')" 2>/dev/null; then
  tools_env="${HARVEST_PROTOC_ENV:-${TMPDIR:-/tmp}/harvest-protoc-$TOOLS_VERSION}"
  if [ ! -x "$tools_env/bin/python" ]; then
    "$PY" -m venv "$tools_env"
    "$tools_env/bin/pip" install -q "grpcio-tools==$TOOLS_VERSION"
  fi
  PY="$tools_env/bin/python"
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$PY" -m grpc_tools.protoc -I. --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" protos/harvest.proto
status=0
for f in harvest_pb2.py harvest_pb2.pyi harvest_pb2_grpc.py; do
  if [ "${1:-}" = "--check" ]; then
    if ! cmp -s "$out/protos/$f" "protos/$f"; then
      echo "protos/$f is stale: run scripts/gen_protos.sh" >&2
      status=1
    fi
  else
    cp "$out/protos/$f" "protos/$f"
  fi
done
exit $status
