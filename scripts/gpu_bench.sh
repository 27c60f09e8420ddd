#!/usr/bin/env bash
# Every GPU figure, one command, on one lent GPU (nvidia-h200: one H200, 16 cores), within
# one device call (run from anywhere):
#   scripts/gpu_bench.sh                  the default parts, in the order below
#   scripts/gpu_bench.sh kv_batch8 tenant_ramp   only the named parts (optional ones too)
#   HARVEST_DRY_RUN=1 scripts/gpu_bench.sh   print each part's limit and command, run nothing
# Default parts, those with no H200 figures first, their time limits (s) and commands
# (python3 scripts/..., each with --out bench/results/<its>.json and a .png beside it):
#   kv            90  bench_kv.py --lender-gpu 0 --contexts 8192,32768 --batches 1
#   planner       35  bench_planner.py --lender-gpu 0 --tokens 16384
#   bandwidth     40  bench_bandwidth.py --src-gpu 0 --dst-gpu 0 --sizes 16KiB,1MiB,64MiB,1GiB
#                     --gather-blocks 16KiB,1MiB
#   reclaim       55  bench_reclaim.py --gpu 0 --configs 10GiB:4,40GiB:16 --rounds 3
#   moe          270  bench_moe.py --lender-gpu 0
# Optional parts, run only when named (a second call: 280 + 150 s fit in one; place, a
# third, or beside tenant_ramp):
#   kv_batch8    280  bench_kv.py --lender-gpu 0 --contexts 8192,32768 --batches 8 (kv_batch8.json)
#   tenant_ramp  150  bench_tenant_ramp.py --gpu 0
#   place        240  bench_place.py --gpu 0 --lender-gpu 0 (place.json: issue 15's placed tensors)
# The default limits add up to 490 s: with the 15 s grace below and up to 30 s for the
# wheels' install they fit the 540 s budget, so every default part starts even if each one
# before it runs to its limit. Every part keeps 3 repeats and >= 64 timed steps per mode.
# A part runs under `timeout` with its own limit, so a slow part cannot eat the others'
# time. The call keeps within HARVEST_BENCH_BUDGET_S (default 540: 9 minutes, counted from
# its start, the wheels' install included): a part starts only when the budget left covers
# its whole limit, so the budget never cuts a part short; the parts that did not fit are
# named at the end with the command that runs them (a second call).
# HARVEST_<PART>_ARGS replaces a part's arguments, HARVEST_<PART>_TIMEOUT its limit
# (PART in capitals: KV, PLANNER, BANDWIDTH, RECLAIM, MOE, KV_BATCH8, TENANT_RAMP, PLACE):
#   HARVEST_MOE_ARGS="--lender-gpu 0 --models mixtral --out bench/results/moe.json"
# HARVEST_RECLAIM_64=1 adds the 64-holder configuration (40GiB:64; its holders are slow to
# start) and raises the reclaim limit to 135 s (the default parts then no longer all fit
# for sure: moe, last, may be left for another call). HARVEST_GPU (default 0): the GPU.
# HARVEST_WHEELS=0 skips installing .whl/ (Ray and friends, as gpu_tests.sh installs them);
# HARVEST_PYTHON (default python3) runs the benchmarks; HARVEST_BENCH_RESULTS (default
# bench/results) is where they write.
# Results: bench/results/*.json and .png; a log per part and the summary in
# bench/results/gpu_bench/. Whatever a part leaves running (a detached node, Ray, a lender:
# each process it starts carries its marker) is ended before the next part. With $OUT set,
# after every part: $OUT/gpu_bench.tar.gz (every file this call wrote under the results,
# the logs and the summary; unpack it in the repository's root) and each part's JSON: 8
# files at most, and at most 6 in one call of the default parts (a device call brings
# back 8).
# Exit status: 0 when every part ran and exited 0; 1 when a part failed or overran its
# limit; 3 when none failed but parts were left for another call; 2 on bad usage.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

# Where the limits come from: every default part measured in one call on one H200
# (2026-12-01, 412 s in all, wheels' install included): kv 74 s, planner 27 s, bandwidth
# 31 s, reclaim 41 s, moe 235 s (226 s of its own clock: mixtral with its revocations 114 s,
# accelerate-default's 352 ms steps the largest share; qwen2-moe 58 s; node start 9 s; the
# rest building models and the plot). Each limit is that plus room: moe's most (the placed
# revocation modes joined it after that run, ~15-20 s by their step counts).
# - kv: batch 1 at 8k and 32k only. Batch 8 does not fit beside the others (32k x 8:
#   ~270 ms a step for each offloaded cache, ~150 s for that point alone): it is the
#   optional kv_batch8 (estimate ~230 s).
# - reclaim 55: 2 configurations, each on a fresh node with its holders starting (4 and
#   16 processes) and 3 rounds; the 64-holder one (HARVEST_RECLAIM_64=1) adds ~70 s.
# - tenant_ramp 150: 10 scenario runs, each on a fresh node (91 s on the H200, 2026-12-01,
#   beside reclaim in a second call).
# - place 240: the tiers and the remaps took 25 s of its own clock on the H200 at
#   --rounds 5 (its default is 7); the limit leaves room for larger --bytes.
PARTS=(kv planner bandwidth reclaim moe)  # the default, in this order
OPTIONAL=(kv_batch8 tenant_ramp place)    # run only when named
declare -A LIMIT=([kv]=90 [planner]=35 [bandwidth]=40 [reclaim]=55 [moe]=270
                  [kv_batch8]=280 [tenant_ramp]=150 [place]=240)
declare -A SCRIPT=([bandwidth]=bench_bandwidth.py [reclaim]=bench_reclaim.py
                   [tenant_ramp]=bench_tenant_ramp.py [planner]=bench_planner.py
                   [kv]=bench_kv.py [kv_batch8]=bench_kv.py [moe]=bench_moe.py
                   [place]=bench_place.py)
gpu="${HARVEST_GPU:-0}"
res="${HARVEST_BENCH_RESULTS:-bench/results}"
reclaim_configs="10GiB:4,40GiB:16"
if [ "${HARVEST_RECLAIM_64:-0}" = "1" ]; then
  reclaim_configs="$reclaim_configs,40GiB:64"
  LIMIT[reclaim]=135
fi
declare -A ARGS=(
  [kv]="--lender-gpu $gpu --contexts 8192,32768 --batches 1 --out $res/kv.json"
  [planner]="--lender-gpu $gpu --tokens 16384 --out $res/planner.json"
  [bandwidth]="--src-gpu $gpu --dst-gpu $gpu --sizes 16KiB,1MiB,64MiB,1GiB --gather-blocks 16KiB,1MiB --out $res/bandwidth.json"
  [reclaim]="--gpu $gpu --configs $reclaim_configs --rounds 3 --out $res/reclaim_gpu.json"
  [moe]="--lender-gpu $gpu --out $res/moe.json"
  [kv_batch8]="--lender-gpu $gpu --contexts 8192,32768 --batches 8 --out $res/kv_batch8.json"
  [tenant_ramp]="--gpu $gpu --out $res/tenant_ramp.json"
  [place]="--gpu $gpu --lender-gpu $gpu --out $res/place.json"
)
for part in "${PARTS[@]}" "${OPTIONAL[@]}"; do  # the environment's overrides
  upper="${part^^}"
  args_var="HARVEST_${upper}_ARGS"
  limit_var="HARVEST_${upper}_TIMEOUT"
  [ -n "${!args_var:-}" ] && ARGS[$part]="${!args_var}"
  [ -n "${!limit_var:-}" ] && LIMIT[$part]="${!limit_var}"
done

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }
parts=("${PARTS[@]}")
if [ $# -gt 0 ]; then
  for p in "$@"; do
    [[ " ${PARTS[*]} ${OPTIONAL[*]} " == *" $p "* ]] ||
      { echo "no part '$p' (${PARTS[*]}; optional: ${OPTIONAL[*]})"; usage; }
  done
  parts=("$@")
fi
py="${HARVEST_PYTHON:-python3}"
command_for() { echo "$py scripts/${SCRIPT[$1]} ${ARGS[$1]}"; }
json_of() {  # the JSON a part writes: its --out
  local re='--out[= ]([^ ]+)'
  [[ " ${ARGS[$1]} " =~ $re ]] && echo "${BASH_REMATCH[1]}"
}

budget="${HARVEST_BENCH_BUDGET_S:-540}"
GRACE=15  # from a part's SIGINT at its limit to its KILL
if [ "${HARVEST_DRY_RUN:-0}" = "1" ]; then
  total=0
  for part in "${parts[@]}"; do
    echo "$part ${LIMIT[$part]} s: $(command_for "$part")"
    total=$((total + LIMIT[$part]))
  done
  echo "limits: $total s in all, budget $budget s"
  exit 0
fi

started=$SECONDS
logs="$res/gpu_bench"
mkdir -p "$logs"
stamp="$(mktemp /tmp/gpu-bench-stamp-XXXXXX)"  # results newer than this are this call's
run_id="$$-$(date +%s)"

if [ "${HARVEST_WHEELS:-1}" != "0" ] && compgen -G ".whl/*.whl" >/dev/null; then
  echo "== installing .whl/"
  timeout 120 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
echo "== $("$py" --version 2>&1); $(nvidia-smi -L 2>/dev/null | head -1 || echo 'no nvidia-smi')"

gpu_used() { nvidia-smi --query-gpu=memory.used --format=csv,noheader -i "$gpu" 2>/dev/null || echo "?"; }

leftovers() {  # processes a part started that still run (detached nodes, Ray, lenders)
  local e pid
  for e in /proc/[0-9]*/environ; do
    pid="${e#/proc/}"; pid="${pid%/environ}"
    [ "$pid" = "$$" ] && continue
    grep -qzxF "HARVEST_GPU_BENCH_PART=$run_id-$1" "$e" 2>/dev/null && echo "$pid"
  done
}

clean_up() {  # end what part $1 left running: TERM (a node's daemon stops its node), then KILL
  local pids pid waited=0
  pids="$(leftovers "$1")"
  [ -z "$pids" ] && return 0
  echo "== $1 left processes running; ending them:"
  for pid in $pids; do
    echo "   $pid $(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | cut -c1-120)"
    kill -TERM "$pid" 2>/dev/null
  done
  while [ -n "$(leftovers "$1")" ] && [ "$waited" -lt 20 ]; do sleep 1; waited=$((waited + 1)); done
  for pid in $(leftovers "$1"); do kill -KILL "$pid" 2>/dev/null; done
}

copy_out() {
  [ -n "${OUT:-}" ] || return 0
  local part json
  for part in "${parts[@]}"; do
    json="$(json_of "$part")"
    [ -n "$json" ] && [ -f "$json" ] && [ "$json" -nt "$stamp" ] && cp "$json" "$OUT/"
  done
  find "$res" -type f -newer "$stamp" -print0 |
    tar --null -czf "$OUT/gpu_bench.tar.gz" -T - 2>/dev/null || echo "== could not write $OUT/gpu_bench.tar.gz"
}

declare -A STATUS=() TOOK=()
status=0
rest=()
for part in "${parts[@]}"; do
  left=$((budget - (SECONDS - started)))
  limit="${LIMIT[$part]}"
  if [ $((limit + GRACE)) -gt "$left" ]; then  # its limit and the KILL's grace
    STATUS[$part]="not run: needs $limit+$GRACE s, $left s left"; rest+=("$part"); continue
  fi
  cmd="$(command_for "$part")"
  echo "== $part (limit $limit s; GPU memory used $(gpu_used)): $cmd"
  began=$SECONDS
  # The output goes to a file, followed on the console: a process the part leaves running
  # cannot hold a pipe open. The part runs in the foreground (a background job of a script
  # ignores SIGINT), and gets SIGINT first: the benchmarks stop their nodes on the way out;
  # KILL $GRACE s later. Every process it starts carries its marker, for clean_up.
  : > "$logs/$part.log"
  tail -n +1 -f "$logs/$part.log" &
  follower=$!
  # shellcheck disable=SC2086  # the arguments are words on purpose
  env "HARVEST_GPU_BENCH_PART=$run_id-$part" timeout -s INT -k "$GRACE" "$limit" \
    $cmd > "$logs/$part.log" 2>&1 < /dev/null
  rc=$?
  sleep 0.5
  kill "$follower" 2>/dev/null
  wait "$follower" 2>/dev/null
  TOOK[$part]=$((SECONDS - began))
  case "$rc" in
    0) STATUS[$part]="ok" ;;
    124|137) STATUS[$part]="timed out (limit $limit s)"; status=1 ;;
    *) STATUS[$part]="failed (exit $rc)"; status=1 ;;
  esac
  json="$(json_of "$part")"
  if [ "$rc" = "0" ] && { [ -z "$json" ] || [ ! "$json" -nt "$stamp" ]; }; then
    STATUS[$part]="failed (exit 0, but no new ${json:-JSON})"; status=1
  fi
  echo "== $part: ${STATUS[$part]} after ${TOOK[$part]} s"
  clean_up "$part"
  copy_out
done

[ ${#rest[@]} -gt 0 ] && [ "$status" = "0" ] && status=3
{
  echo "== summary ($((SECONDS - started)) s of a $budget s budget)"
  for part in "${parts[@]}"; do
    printf '%-12s %-40s %5s s  %s\n' "$part" "${STATUS[$part]}" "${TOOK[$part]:--}" \
      "$(json_of "$part")"
  done
  [ ${#rest[@]} -gt 0 ] && echo "left for another call: scripts/gpu_bench.sh ${rest[*]}"
  echo "exit $status"
} | tee "$logs/summary.txt"
copy_out
rm -f "$stamp"
exit $status
