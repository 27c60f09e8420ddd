#!/usr/bin/env bash
# Everything that needs a GPU, in one command, on a lent GPU machine (run from anywhere):
#   scripts/gpu_tests.sh                 versions, every `-m gpu` test under tests/, benchmark
#   HARVEST_GPU_TESTS="tests/gpu/test_backends_gpu.py" scripts/gpu_tests.sh   a subset
#   HARVEST_GPU_BENCH=0 scripts/gpu_tests.sh                                   no benchmark
# Installs .whl/ (Ray and friends, built by shared/device/prepare-wheels.sh) when present.
#   HARVEST_RECLAIM_BENCH=0 scripts/gpu_tests.sh                               no reclaim benchmark
#   HARVEST_TENANT_BENCH=0 scripts/gpu_tests.sh                                no tenant ramp
# Results: bench/results/bandwidth, reclaim_gpu and tenant_ramp (.json, .png), copied to $OUT.
# Exit status: the tests' (the benchmark still runs after failing tests).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

echo "== versions"
python3 --version
python3 - <<'PY'
import importlib.metadata as md
for name in ("torch", "grpcio", "protobuf", "cuda-bindings", "nvidia-ml-py", "ray", "pytest"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} (not installed)")
try:
    import torch
    print("torch cuda", torch.version.cuda, "devices", torch.cuda.device_count())
except Exception as exc:  # noqa: BLE001
    print("torch:", exc)
try:
    import pynvml
    pynvml.nvmlInit()
    print("driver", pynvml.nvmlSystemGetDriverVersion())
except Exception as exc:  # noqa: BLE001
    print("NVML:", exc)
PY
nvidia-smi -L || true

echo "== tests"
# shellcheck disable=SC2086  # the variable holds several paths on purpose
python3 -m pytest -m gpu -v -rsP -p no:cacheprovider ${HARVEST_GPU_TESTS:-tests/}
status=$?

if [ "${HARVEST_GPU_BENCH:-1}" != "0" ]; then
  echo "== bandwidth benchmark"
  python3 scripts/bench_bandwidth.py --src-gpu "${HARVEST_SRC_GPU:-0}" \
    --dst-gpu "${HARVEST_DST_GPU:-0}" --out bench/results/bandwidth.json || status=$((status ? status : 1))
  if [ -n "${OUT:-}" ]; then
    cp bench/results/bandwidth.json "$OUT/" 2>/dev/null || true
    cp bench/results/bandwidth.png "$OUT/" 2>/dev/null || true
  fi
fi
if [ "${HARVEST_RECLAIM_BENCH:-1}" != "0" ]; then
  echo "== reclaim benchmark"
  python3 scripts/bench_reclaim.py --gpu "${HARVEST_SRC_GPU:-0}" \
    --configs "${HARVEST_RECLAIM_CONFIGS:-10GiB:1,10GiB:4,40GiB:16,40GiB:64}" \
    --out bench/results/reclaim_gpu.json || status=$((status ? status : 1))
  if [ -n "${OUT:-}" ]; then
    cp bench/results/reclaim_gpu.json bench/results/reclaim_gpu.png "$OUT/" 2>/dev/null || true
  fi
fi
if [ "${HARVEST_TENANT_BENCH:-1}" != "0" ]; then
  echo "== tenant ramp benchmark"
  python3 scripts/bench_tenant_ramp.py --gpu "${HARVEST_SRC_GPU:-0}" \
    --out bench/results/tenant_ramp.json || status=$((status ? status : 1))
  if [ -n "${OUT:-}" ]; then
    cp bench/results/tenant_ramp.json bench/results/tenant_ramp.png "$OUT/" 2>/dev/null || true
  fi
fi
exit $status
