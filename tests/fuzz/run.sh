#!/bin/sh
# tests/fuzz/run.sh — one libFuzzer run for `make fuzz` (tests/fuzz/fuzz.mk):
#   run.sh BINARY SECONDS SCRATCH-CORPUS SEED-CORPUS ARTIFACT-DIR LOG [libFuzzer options...]
# New inputs go to SCRATCH-CORPUS only (libFuzzer writes into its first corpus directory);
# the committed SEED-CORPUS is read, never written. Prints the executions and the final
# coverage line; on a crash, leak or broken invariant exits non-zero with the log's end.
set -u
bin=$1 secs=$2 scratch=$3 seeds=$4 art=$5 log=$6
shift 6
mkdir -p "$scratch" "$art"
name=$(basename "$bin")
rc=0
start=$(date +%s)
"$bin" -max_total_time="$secs" -print_final_stats=1 -artifact_prefix="$art/" "$@" \
  "$scratch" "$seeds" >"$log" 2>&1 || rc=$?
took=$(( $(date +%s) - start ))
execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)
cov=$(grep -a -E '^#[0-9]+[[:space:]].* cov: ' "$log" | tail -n 1 | sed 's/^#[0-9]*[[:space:]]*[A-Z]*[[:space:]]*//')
echo "$name: ${execs:-?} executions (${rate:-?}/s) in ${took}s of ${secs}s; ${cov:-no coverage line}"
if [ "$rc" -ne 0 ]; then
  echo "$name: libFuzzer exited $rc; the end of $log (progress lines left out):"
  grep -a -v -E '^#[0-9]+[[:space:]]' "$log" | tail -n 50
  echo "$name: artifacts in $art:"
  ls -l "$art"
fi
exit "$rc"
