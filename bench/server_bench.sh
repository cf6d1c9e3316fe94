#!/usr/bin/env bash
# server_bench.sh — sluiced against its peers, in one run on this machine.
#
#   bash bench/server_bench.sh <build-dir> [--quick]          (make bench runs it)
#
# RESP (redis-benchmark, 100k random keys, 50 connections, with and without -P 16):
#   sluiced CL.THROTTLE and SL.TAKE   vs   a private redis-server running a token bucket in
#   Lua through EVALSHA, and plain INCR (the ceiling for a RESP server here).
# HTTP (wrk, 50 connections, POST /api/check_and_consume with a random client of 100k, one
# request per write and 16 pipelined per write):
#   sluiced   vs   nginx answering 200/429 from a limit_req zone keyed the same way.
# Each server under test gets one thread / worker / process (redis-server is single-threaded;
# the load generator needs the other core of this 2-core machine). Every measurement runs
# ROUNDS times (default 3), alternating sluiced and its peer; medians are printed as
#   RESULT name=<scenario> metric=<rps|p50_ms|p99_ms> value=<v>
#   RESULT name=<scenario> metric=server_cpu_us_per_request value=<v>  (the server's own CPU)
#   RESULT name=<scenario> metric=client_cpu_share value=<v>  (the load generator's; ~1: it,
#                                                              not the server, set the pace)
#   RESULT name=ratio_<a>_vs_<b> metric=ratio value=<v>       (req/s)
#   RESULT name=cpu_ratio_<a>_vs_<b> metric=ratio value=<v>   (b's server CPU per request / a's)
# followed by TARGET lines (a client-bound comparison says so, with its CPU ratio). Exits
# non-zero only if something fails to run.
set -euo pipefail

BUILD=$(cd "${1:?usage: server_bench.sh <build-dir> [--quick]}" && pwd)
QUICK=0
[ "${2:-}" = "--quick" ] && QUICK=1
ROUNDS=${BENCH_ROUNDS:-3}
N=${BENCH_REQUESTS:-300000} # redis-benchmark requests per run
DUR=${BENCH_SECONDS:-4}     # wrk seconds per run
if [ $QUICK = 1 ]; then ROUNDS=1; N=20000; DUR=1; fi
SLUICED=$BUILD/sluiced
TMP=$(mktemp -d /tmp/sluice-server-bench.XXXXXX)
. "$(dirname "$0")/bench_lib.sh"
for t in redis-server redis-cli redis-benchmark wrk nginx; do
    command -v "$t" >/dev/null || fail "$t not installed (make deps)"
done
[ -x "$SLUICED" ] || fail "$SLUICED not built"


# ---- servers ----
read -r SP SH RP NP < <(free_ports 4)
"$SLUICED" --threads 1 --bind 127.0.0.1 --resp-port "$SP" --http-port "$SH" \
    --log-level warn 2>"$TMP/sluiced.log" & PIDS+=($!)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
    --logfile "$TMP/redis.log" & PIDS+=($!)
nginx_conf "$TMP/nginx" "$NP"
nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" 2>"$TMP/nginx/stderr" & PIDS+=($!)
wait_port "$SP"; wait_port "$SH"; wait_port "$RP"; wait_port "$NP"
# whose CPU each port's runs are charged to (nginx: its one worker process)
SERVER_PID[$SP]=${PIDS[0]}; SERVER_PID[$SH]=${PIDS[0]}; SERVER_PID[$RP]=${PIDS[1]}
SERVER_PID[$NP]=$(pgrep -P "${PIDS[2]}" | head -1)

# The same generous limit everywhere, so that every request does the same work.
redis-cli -p "$SP" SL.DEFAULT SET token_bucket LIMIT 1000000000 RATE 1000000000 >/dev/null
redis-cli -p "$SP" SL.ADMISSION SET max_tenant_queue_size 1000000 >/dev/null
SHA=$(peer_lua_load "$RP")

# ---- measurements ----
OUT=$TMP/results.txt
: >"$OUT"
# wk <name> <port> <pipeline>: one wrk run -> rps p50 p99 (each connection sends <pipeline>
# requests in one write, as redis-benchmark -P does)
wk() {
    local name=$1 port=$2 pipe=$3 o pid c0=0 cpu
    pid=${SERVER_PID[$port]:-}
    # shellcheck disable=SC2086
    [ -n "$pid" ] && c0=$(proc_cpu_ticks $pid)
    run_timed wrk -t 1 -c 50 -d "${DUR}s" --latency -s "$TMP/check.lua" \
        "http://127.0.0.1:$port/api/check_and_consume" -- "$pipe" || fail "wrk $name"
    o=$(cat "$TMP/run.out")
    cpu=$(cpu_fields "$pid" "$c0" "$(echo "$o" | awk '/ requests in /{print $1}')")
    echo "$o" | grep -q "Non-2xx" && fail "$name: non-2xx answers: $(echo "$o" | grep Non-2xx)"
    # wrk's latency percentiles do not count pipelined responses (it prints 0.00us): -1
    echo "$o" | awk -v n="$name" -v cpu="$cpu" -v pipe="$pipe" '
        function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
        /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) } /^Requests\/sec/ { rps = $2 }
        END { if (pipe > 1) p50 = p99 = -1; print n, rps, p50, p99, -1, cpu }' >>"$OUT"
}
check_lua "$TMP/check.lua"

T0=$(date +%s)
for r in $(seq 1 "$ROUNDS"); do
    for P in 1 16; do
        rb "sluiced_cl_throttle_P$P" "$SP" "$P" 100000 CL.THROTTLE key:__rand_int__ 1000000 1000000 1
        rb "redis_lua_P$P" "$RP" "$P" 100000 EVALSHA "$SHA" 1 lua:__rand_int__ 1000000 1000000 1
        rb "sluiced_sl_take_P$P" "$SP" "$P" 100000 SL.TAKE bench api client:__rand_int__
        rb "redis_incr_P$P" "$RP" "$P" 100000 INCR incr:__rand_int__
    done
    for P in 1 16; do
        wk "sluiced_http$([ "$P" = 1 ] || echo _P$P)" "$SH" "$P"
        wk "nginx_limit_req$([ "$P" = 1 ] || echo _P$P)" "$NP" "$P"
    done
done
T1=$(date +%s)
grep -q "BUSY\|error" "$TMP/sluiced.log" && fail "sluiced logged errors: $(head -3 "$TMP/sluiced.log")"

echo "# sluiced server bench: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, $ROUNDS rounds," \
     "redis-benchmark -c 50 -r 100000 -n $N, wrk -t 1 -c 50 -d ${DUR}s, $((T1 - T0)) s"
summarize "sluiced_cl_throttle_P1:redis_lua_P1:3 sluiced_cl_throttle_P16:redis_lua_P16:3 sluiced_cl_throttle_P1:redis_incr_P1:0.9 sluiced_cl_throttle_P16:redis_incr_P16:0.9 sluiced_sl_take_P1:redis_incr_P1:0.9 sluiced_sl_take_P16:redis_incr_P16:0.9 sluiced_http:nginx_limit_req:1 sluiced_http_P16:nginx_limit_req_P16:1" 1 "^sluiced"
