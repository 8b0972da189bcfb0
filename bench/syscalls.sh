#!/usr/bin/env bash
# bench/syscalls.sh — system calls of one connection-per-request memory hit, per thread
# (strace -f), for build/epollclient: the inline limit (a socketpair the client's own thread
# answers: epollclient --inline-limit), direct to the upstream, through the shim with
# fastpath on and off. Each figure is (calls for 61 requests - calls for 11) / 50, so
# start-up and the first miss cancel out. Prints "limit APP+0 direct APP+ENGINE on
# APP+ENGINE off APP+ENGINE" and, with -v, the top calls of each.
#   bash bench/syscalls.sh [-v] [UPSTREAM_PORT]   (starts tests/upstream.py when no port)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
verbose=0; [ "${1:-}" = -v ] && { verbose=1; shift; }
command -v strace >/dev/null || { echo "strace is not installed" >&2; exit 1; }
work=$(mktemp -d); upid=""
cleanup() { [ -n "$upid" ] && { kill "$upid" 2>/dev/null || true; wait "$upid" 2>/dev/null || true; }; rm -rf "$work"; }
trap cleanup EXIT
port=${1:-}
if [ -z "$port" ]; then
  python3 "$ROOT/tests/upstream.py" --port-file "$work/port" --control-port-file "$work/cport" >/dev/null 2>&1 &
  upid=$!
  for _ in $(seq 100); do [ -s "$work/cport" ] && break; sleep 0.1; done
  port=$(cat "$work/port")
fi
for fp in on off; do
  printf '[global]\nfastpath = %s\n[upstream 127.0.0.1:%s]\ncache GET /bytes/1200 ttl=10m\n' "$fp" "$port" >"$work/$fp.conf"
done
# calls per thread in an `strace -f -o` log: "APP ENGINE" (the first thread seen is the app's)
split() {
  awk '$2 !~ /resumed>/ && $0 !~ /\+\+\+$/ && $0 !~ /--- SIG/ && $2 ~ /^[a-z_0-9]+\(/ {
         if (!first) first = $1
         if ($1 == first) app++; else eng++
       } END { print app + 0, eng + 0 }' "$1"
}
count() {   # setup n -> "app engine" calls
  local pre=() how=()
  case $1 in
    on|off) pre=(-E "LD_PRELOAD=$ROOT/build/libhttpshim.so" -E "HTTPSHIM_CONF=$work/$1.conf") ;;
    limit) how=(--inline-limit 1200) ;;
  esac
  strace -f -qq -o "$work/sc.$1.$2" "${pre[@]}" "$ROOT/build/epollclient" --port "$port" --path /bytes/1200 \
    "${how[@]}" --count "$2" >/dev/null 2>&1
  split "$work/sc.$1.$2"
}
line=""
for s in limit direct on off; do
  read -r a1 e1 < <(count "$s" 11); read -r a2 e2 < <(count "$s" 61)
  line+="$s $(awk -v a="$a1" -v b="$a2" 'BEGIN {printf "%.1f", (b - a) / 50}')+$(awk -v a="$e1" -v b="$e2" 'BEGIN {printf "%.1f", (b - a) / 50}') "
  if [ "$verbose" = 1 ]; then
    echo "$s: $(awk '$2 ~ /^[a-z_0-9]+\(/ {sub(/\(.*/, "", $2); n[$2]++} END {for (k in n) print k "=" n[k]}' "$work/sc.$s.61" | sort -t= -k2 -nr | head -14 | tr '\n' ' ')" >&2
  fi
done
echo "${line% }"
