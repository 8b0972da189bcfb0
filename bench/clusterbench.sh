#!/usr/bin/env bash
# bench/clusterbench.sh — Redis-tier hits/s from 4 processes against a 3-master Redis
# Cluster vs a single Redis, side by side (issue 24): each process is `ab -c C -n N` under
# LD_PRELOAD on a URL of its own (4 keys, spread over the masters), memory_max = 1KB so every
# hit is a Redis round trip; the 4 run at once and their requests/s add up. RUNS rounds,
# the two setups alternated; prints a markdown table (median, min–max) and the ratio.
#   bash bench/clusterbench.sh        (CB_N [20000] per process, CB_C [8], RUNS [3])
# Starts its own upstream (tests/upstream.py), redis-server and cluster; stops them by PID.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=${CB_N:-20000}; C=${CB_C:-8}; RUNS=${RUNS:-3}
work=$(mktemp -d /tmp/httpshim-cluster.XXXXXX); pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
            for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
# a port whose cluster bus port (+10000) is free too
port() { python3 - <<'PY'
import random, socket
for _ in range(500):
    p = random.randint(20000, 50000)
    ok = True
    for q in (p, p + 10000):
        s = socket.socket()
        try: s.bind(("127.0.0.1", q))
        except OSError: ok = False
        finally: s.close()
    if ok: print(p); break
PY
}
python3 "$ROOT/tests/upstream.py" --port-file "$work/up" --control-port-file "$work/ctl" >/dev/null 2>&1 &
pids+=($!)
SP=$(port)
redis-server --port "$SP" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" >/dev/null 2>&1 &
pids+=($!)
CP=()
for i in 1 2 3; do
  p=$(port); CP+=("$p"); mkdir -p "$work/n$p"
  (cd "$work/n$p" && exec redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file nodes.conf \
     --save '' --appendonly no) >/dev/null 2>&1 &
  pids+=($!)
done
for _ in $(seq 100); do [ -s "$work/ctl" ] && break; sleep 0.1; done
for p in "$SP" "${CP[@]}"; do
  for _ in $(seq 100); do redis-cli -p "$p" PING 2>/dev/null | grep -q PONG && break; sleep 0.1; done
done
redis-cli --cluster create "127.0.0.1:${CP[0]}" "127.0.0.1:${CP[1]}" "127.0.0.1:${CP[2]}" --cluster-yes >/dev/null
for p in "${CP[@]}"; do
  for _ in $(seq 100); do redis-cli -p "$p" CLUSTER INFO | grep -q cluster_state:ok && break; sleep 0.1; done
done
UP=$(cat "$work/up")
for s in single cluster; do
  {
    echo "[global]"
    echo "stats_socket = $work/%p.sock"
    echo "memory_max = 1KB"
    if [ $s = single ]; then echo "cache = redis://127.0.0.1:$SP/0"
    else echo "cache = redis-cluster://127.0.0.1:${CP[0]},127.0.0.1:${CP[1]}"; fi
    echo "[upstream 127.0.0.1:$UP]"
    echo "cache GET /bytes/* ttl=10m"
  } >"$work/$s.conf"
done
# four keys: one warming request each writes them to Redis
for s in single cluster; do
  for k in 1 2 3 4; do
    env LD_PRELOAD="$ROOT/build/libhttpshim.so" HTTPSHIM_CONF="$work/$s.conf" \
      curl -s -o /dev/null "http://127.0.0.1:$UP/bytes/$((1200 + k))"
  done
done
sleep 0.5
keys_on() { for p in "$@"; do echo -n "$(redis-cli -p "$p" DBSIZE) "; done; }
declare -A RPS
for r in $(seq "$RUNS"); do
  for s in single cluster; do
    for k in 1 2 3 4; do
      env LD_PRELOAD="$ROOT/build/libhttpshim.so" HTTPSHIM_CONF="$work/$s.conf" \
        ab -q -c "$C" -n "$N" "http://127.0.0.1:$UP/bytes/$((1200 + k))" >"$work/ab.$s.$k" 2>&1 &
      abp[$k]=$!
    done
    for k in 1 2 3 4; do wait "${abp[$k]}"; done
    total=$(for k in 1 2 3 4; do sed -n 's/^Requests per second: *\([0-9.]*\).*/\1/p' "$work/ab.$s.$k"; done \
            | awk '{t += $1} END {printf "%.0f", t}')
    fails=$(for k in 1 2 3 4; do sed -n 's/^Failed requests: *\([0-9]*\).*/\1/p' "$work/ab.$s.$k"; done | awk '{t += $1} END {print t + 0}')
    [ "$fails" = 0 ] || { echo "clusterbench: $s: $fails failed requests" >&2; exit 1; }
    RPS[$s]+="$total "
    echo "run $r $s: $total req/s" >&2
  done
done
stats3() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {printf "%s %s %s", a[int((NR+1)/2)], a[1], a[NR]}'; }
read -r sm smin smax <<<"$(stats3 <<<"${RPS[single]}")"
read -r cm cmin cmax <<<"$(stats3 <<<"${RPS[cluster]}")"
echo "| setup | Redis-tier hits/s, 4 processes (median, min–max) | entries on the servers |"
echo "|---|---|---|"
echo "| single Redis | $sm ($smin–$smax) | $(keys_on "$SP")|"
echo "| 3-master Redis Cluster | $cm ($cmin–$cmax) | $(keys_on "${CP[@]}")|"
echo
echo "Cluster vs single: $(awk -v a="$cm" -v b="$sm" 'BEGIN {printf "%.2f×", a / b}') (target ≥ 0.9×). Each process: \`ab -q -c $C -n $N\` under LD_PRELOAD on a URL of its own, \`memory_max = 1KB\` (every hit a Redis round trip); $RUNS rounds, the setups alternated."
