#!/usr/bin/env bash
# The multi-GPU runs, one command per issue, on a lent machine (run from anywhere):
#   scripts/multi_gpu_runs.sh x2            nvidia-h200-x2: issue 9 (lender GPU 1, client GPU 0)
#   scripts/multi_gpu_runs.sh x8            nvidia-h200-x4 / -x8: issue 10 (x4 and x8 alike)
#   scripts/multi_gpu_runs.sh x2 tenant     only the named parts
#   scripts/multi_gpu_runs.sh --list        the parts, in order, with their time estimates
# Parts
#   x2: tests bandwidth tenant moe kv planner cachetests
#   x8: placement aggregate contention moespread
# A call runs parts in order until its time budget (HARVEST_BUDGET_S, default 560 s, under
# the 10-minute limit of a call) would be passed, then stops and says so: the same command
# again goes on with the parts not yet run (progress in $HARVEST_RUNS_STATE, default
# /tmp/harvest-multi-gpu, which lives as long as the machine). A part is never cut short
# by the budget unless it overruns: each runs under `timeout` with what is left.
# HARVEST_RETRY=1 reruns parts that failed; HARVEST_RESTART=1 forgets all progress;
# HARVEST_ARGS_<part> adds arguments to a part's command (e.g. HARVEST_ARGS_moe="--models mixtral").
# HARVEST_DRY_RUN=1 prints each part's command and runs nothing (HARVEST_GPUS=N pretends N GPUs);
# HARVEST_WHEELS=0 skips installing .whl/.
# Results and a log per part go to bench/results/h200-x<N>/ (N: GPUs seen), copied to $OUT
# after every part when $OUT is set. Installs .whl/ (Ray and friends) like gpu_tests.sh.
# Exit status: 0 when every part of the machine has run and passed, 3 when parts are left
# for another call, 1 when a part failed, 2 on bad usage or too few GPUs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

declare -A ESTIMATE=([tests]=420 [bandwidth]=150 [tenant]=200 [moe]=450 [kv]=300 [planner]=240
                     [cachetests]=420 [placement]=120 [aggregate]=330 [contention]=300
                     [moespread]=450)
X2_PARTS=(tests bandwidth tenant moe kv planner cachetests)
MANY_PARTS=(placement aggregate contention moespread)

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }
[ $# -ge 1 ] || usage

placement() {  # a lender on every GPU; what the broker lists; where the policy would place
  local out="$1" dir
  dir="$(mktemp -d /tmp/hv-place-XXXXXX)"
  python3 -m harvestd start --detach --backend cuda-vmm --no-ray-broker --state-dir "$dir" \
    --reserve 8GiB --cap 16GiB || return 1
  python3 -m harvestd lenders --state-dir "$dir"
  python3 -m harvestd lenders --json --state-dir "$dir" > "$out/lenders.json"
  python3 scripts/placement_dryrun.py --lenders-json "$out/lenders.json" \
    --out "$out/placement.json" | tee "$out/placement.txt"
  local rc=${PIPESTATUS[0]}
  python3 -m harvestd stop --state-dir "$dir" >/dev/null 2>&1
  rm -rf "$dir"
  return "$rc"
}
if [ "$1" = "--placement" ]; then
  export PYTHONPATH="${PYTHONPATH:-$PWD}"
  placement "$2"; exit $?
fi
if [ "$1" = "--list" ]; then
  for p in "${X2_PARTS[@]}"; do echo "x2  $p  ~${ESTIMATE[$p]} s"; done
  for p in "${MANY_PARTS[@]}"; do echo "x8  $p  ~${ESTIMATE[$p]} s"; done
  exit 0
fi
machine="$1"; shift
case "$machine" in
  x2) parts=("${X2_PARTS[@]}"); need=2 ;;
  x4|x8|many) parts=("${MANY_PARTS[@]}"); need=3 ;;
  *) usage ;;
esac
if [ $# -gt 0 ]; then
  for p in "$@"; do
    [[ " ${parts[*]} " == *" $p "* ]] || { echo "no part '$p' for $machine (${parts[*]})"; exit 2; }
  done
  parts=("$@")
fi

dry="${HARVEST_DRY_RUN:-0}"
if [ "$dry" != "1" ] && [ "${HARVEST_WHEELS:-1}" != "0" ] && compgen -G ".whl/*.whl" >/dev/null; then
  stamp="$(ls -l .whl/*.whl | md5sum | cut -c1-16)"
  if [ "$(cat /tmp/site/.harvest-wheels 2>/dev/null)" != "$stamp" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    echo "$stamp" > /tmp/site/.harvest-wheels
  fi
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

n="${HARVEST_GPUS:-$(python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)}"
if [ "$n" -lt "$need" ] && [ "${HARVEST_ALLOW_FEWER:-0}" != "1" ]; then
  echo "$machine needs $need GPUs or more; this machine has $n (HARVEST_ALLOW_FEWER=1 runs anyway)"
  exit 2
fi
res="bench/results/h200-x$n"
state="${HARVEST_RUNS_STATE:-/tmp/harvest-multi-gpu}"
done_file="$state/$machine-x$n.done"
if [ "$dry" != "1" ]; then
  mkdir -p "$res" "$state"
  [ "${HARVEST_RESTART:-0}" = "1" ] && rm -f "$done_file"
  touch "$done_file"
fi
budget="${HARVEST_BUDGET_S:-560}"
started=$SECONDS
others="$(seq -s, 1 $((n - 1)))"                # every GPU but 0
half=$((n / 2))
low="$(seq -s, 0 $((half - 1)))"                 # borrowers
high="$(seq -s, "$half" $((n - 1)))"             # tenants (and their lenders)
counts="$(python3 -c "n=$n-1; print(','.join(str(k) for k in sorted({k for k in (1,2,4,7) if k<=n} | {n})))")"

copy_out() {
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT/$(basename "$res")" && cp -r "$res/." "$OUT/$(basename "$res")/" 2>/dev/null || true
  fi
}

command_for() {  # the command line of part $1
  case "$1" in
    tests) echo "env HARVEST_LENDER_GPU=1 HARVEST_CLIENT_GPU=0 python3 -m pytest -m gpu -v -rsP \
-p no:cacheprovider tests/gpu/test_two_gpus_gpu.py tests/gpu/test_node_gpu.py \
tests/gpu/test_backends_gpu.py" ;;
    cachetests) echo "env HARVEST_LENDER_GPU=1 HARVEST_CLIENT_GPU=0 python3 -m pytest -m gpu -v \
-rsP -p no:cacheprovider tests/gpu --ignore=tests/gpu/test_two_gpus_gpu.py \
--ignore=tests/gpu/test_node_gpu.py --ignore=tests/gpu/test_backends_gpu.py" ;;
    bandwidth) echo "python3 scripts/bench_bandwidth.py --src-gpu 1 --dst-gpu 0 --out $res/bandwidth_nvlink.json" ;;
    tenant) echo "python3 scripts/bench_tenant.py --tenant-gpus 1 --borrower-gpus 0 --reclaim --out $res/tenant.json" ;;
    moe) echo "python3 scripts/bench_moe.py --lender-gpu 1 --device cuda:0 --out $res/moe.json" ;;
    kv) echo "python3 scripts/bench_kv.py --lender-gpu 1 --out $res/kv.json" ;;
    planner) echo "python3 scripts/bench_planner.py --lender-gpu 1 --out $res/planner.json" ;;
    placement) echo "scripts/multi_gpu_runs.sh --placement $res" ;;
    aggregate) echo "python3 scripts/bench_aggregate.py --counts $counts --out $res/aggregate.json" ;;
    contention) echo "python3 scripts/bench_tenant.py --tenant-gpus $high --borrower-gpus $low --out $res/contention.json" ;;
    moespread) echo "python3 scripts/bench_moe.py --lender-gpu $others --device cuda:0 --out $res/moe_spread.json" ;;
  esac
}

if [ "$dry" = "1" ]; then
  for part in "${parts[@]}"; do
    extra_var="HARVEST_ARGS_$part"
    echo "$part (~${ESTIMATE[$part]} s): $(command_for "$part") ${!extra_var:-}"
  done
  exit 0
fi
echo "== $machine on $n GPUs: parts ${parts[*]}; results in $res"
nvidia-smi topo -m > "$res/topo.txt" 2>&1 || true
status=0
left=()
ran=0
for part in "${parts[@]}"; do
  prior="$(grep -E "^$part " "$done_file" | tail -1 | cut -d' ' -f2)"
  if [ "$prior" = "0" ] || { [ -n "$prior" ] && [ "${HARVEST_RETRY:-0}" != "1" ]; }; then
    echo "== $part: done already (exit $prior)"; [ "$prior" = "0" ] || status=1; continue
  fi
  spent=$((SECONDS - started))
  remaining=$((budget - spent))
  if [ "$ran" = "1" ] && [ "${ESTIMATE[$part]}" -gt "$remaining" ]; then
    left+=("$part"); continue  # the first part of a call always runs: progress is sure
  fi
  ran=1
  extra_var="HARVEST_ARGS_$part"
  cmd="$(command_for "$part") ${!extra_var:-}"
  echo "== $part ($((remaining)) s left in this call): $cmd"
  timeout -k 15 "$((remaining > 60 ? remaining : 60))" bash -c "$cmd" 2>&1 | tee "$res/$part.log"
  rc=${PIPESTATUS[0]}
  echo "$part $rc" >> "$done_file"
  echo "== $part: exit $rc after $((SECONDS - started - spent)) s"
  [ "$rc" = "0" ] || status=1
  copy_out
done
copy_out
if [ ${#left[@]} -gt 0 ]; then
  echo "== time budget spent; parts left: ${left[*]}: run the same command again"
  exit 3
fi
echo "== $machine: every part has run (exit $status)"
exit $status
