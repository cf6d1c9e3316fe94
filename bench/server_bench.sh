#!/usr/bin/env bash
# server_bench.sh — sluiced against its peers, in one run on this machine.
#
#   bash bench/server_bench.sh <build-dir> [--quick]          (make bench runs it)
#
# RESP (redis-benchmark, 100k random keys, 50 connections, with and without -P 16):
#   sluiced CL.THROTTLE and SL.TAKE   vs   a private redis-server running a token bucket in
#   Lua through EVALSHA, and plain INCR (the ceiling for a RESP server here).
# HTTP (wrk, 50 connections, POST /api/check_and_consume with a random client of 100k):
#   sluiced   vs   nginx answering 200/429 from a limit_req zone keyed the same way.
# Each server under test gets one thread / worker / process (redis-server is single-threaded;
# the load generator needs the other core of this 2-core machine). Every measurement runs
# ROUNDS times (default 3), alternating sluiced and its peer; medians are printed as
#   RESULT name=<scenario> metric=<rps|p50_ms|p99_ms> value=<v>
#   RESULT name=ratio_<a>_vs_<b> metric=ratio value=<v>
# followed by TARGET lines. Exits non-zero only if something fails to run.
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
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
fail() { echo "server_bench: FAILED: $*" >&2; exit 1; }
for t in redis-server redis-cli redis-benchmark wrk nginx; do
    command -v "$t" >/dev/null || fail "$t not installed (make deps)"
done
[ -x "$SLUICED" ] || fail "$SLUICED not built"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; fail "port $1 never opened"; }

# ---- servers ----
SP=$(free_port); SH=$(free_port); RP=$(free_port); NP=$(free_port)
"$SLUICED" --threads 1 --bind 127.0.0.1 --resp-port "$SP" --http-port "$SH" \
    --log-level warn 2>"$TMP/sluiced.log" & PIDS+=($!)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
    --logfile "$TMP/redis.log" & PIDS+=($!)
mkdir -p "$TMP/nginx/logs"
cat >"$TMP/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/logs/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $TMP/nginx/body;
    limit_req_zone \$http_x_tenant:\$http_x_client:\$http_x_action zone=rl:64m rate=1000000r/s;
    limit_req_status 429;
    server {
        listen 127.0.0.1:$NP;
        location = /api/check_and_consume {
            limit_req zone=rl burst=1000000 nodelay;
            default_type application/json;
            return 200 '{"allowed": true, "status": "processed"}';
        }
    }
}
EOF
nginx -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" 2>"$TMP/nginx/stderr" & PIDS+=($!)
wait_port "$SP"; wait_port "$SH"; wait_port "$RP"; wait_port "$NP"

# The same generous limit everywhere, so that every request does the same work.
redis-cli -p "$SP" SL.DEFAULT SET token_bucket LIMIT 1000000000 RATE 1000000000 >/dev/null
redis-cli -p "$SP" SL.ADMISSION SET max_tenant_queue_size 1000000 >/dev/null
# A token bucket as people write it in Lua: HMGET, refill, decide, HMSET, PEXPIRE.
LUA='local cap = tonumber(ARGV[1]); local rate = tonumber(ARGV[2]); local cost = tonumber(ARGV[3])
local t = redis.call("TIME"); local now = t[1] * 1000 + math.floor(t[2] / 1000)
local s = redis.call("HMGET", KEYS[1], "tokens", "ts")
local tokens = tonumber(s[1]) or cap; local ts = tonumber(s[2]) or now
tokens = math.min(cap, tokens + (now - ts) * rate / 1000)
local allowed = 0
if tokens >= cost then tokens = tokens - cost; allowed = 1 end
redis.call("HMSET", KEYS[1], "tokens", tokens, "ts", now)
redis.call("PEXPIRE", KEYS[1], math.ceil((cap - tokens) / rate * 1000) + 1000)
return {allowed, math.floor(tokens)}'
SHA=$(redis-cli -p "$RP" SCRIPT LOAD "$LUA")
check=$(redis-cli -p "$RP" EVALSHA "$SHA" 1 chk 2 1 1; redis-cli -p "$RP" EVALSHA "$SHA" 1 chk 2 1 1; redis-cli -p "$RP" EVALSHA "$SHA" 1 chk 2 1 1)
[ "$(echo $check)" = "1 1 1 0 0 0" ] || fail "the Lua token bucket is wrong: $(echo $check)"

# ---- measurements ----
OUT=$TMP/results.txt
: >"$OUT"
# rb <name> <port> <pipeline> <command...>: one redis-benchmark run -> rps p50 p99
rb() {
    local name=$1 port=$2 pipe=$3; shift 3
    local csv
    csv=$(redis-benchmark -p "$port" -c 50 -n "$N" -r 100000 -P "$pipe" --csv "$@" 2>"$TMP/rb.err") ||
        fail "redis-benchmark $name: $(cat "$TMP/rb.err")"
    grep -q "Error\|ERR\|BUSY" "$TMP/rb.err" && fail "$name: error replies: $(head -3 "$TMP/rb.err")"
    # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    echo "$csv" | tail -1 | tr -d '"' | awk -F, -v n="$name" '{print n, $2, $5, $7}' >>"$OUT"
}
# wk <name> <port> : one wrk run -> rps p50 p99
wk() {
    local name=$1 port=$2 o
    o=$(wrk -t 1 -c 50 -d "${DUR}s" --latency -s "$TMP/check.lua" "http://127.0.0.1:$port/api/check_and_consume") ||
        fail "wrk $name"
    echo "$o" | grep -q "Non-2xx" && fail "$name: non-2xx answers: $(echo "$o" | grep Non-2xx)"
    echo "$o" | awk -v n="$name" '
        function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
        /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) } /^Requests\/sec/ { rps = $2 }
        END { print n, rps, p50, p99 }' >>"$OUT"
}
cat >"$TMP/check.lua" <<'EOF'
math.randomseed(42)
request = function()
    local c = "client:" .. math.random(100000)
    local body = '{"tenant_id": "bench", "client_id": "' .. c .. '", "action_type": "api"}'
    return wrk.format("POST", nil, {["Content-Type"] = "application/json", ["X-Tenant"] = "bench",
                                    ["X-Client"] = c, ["X-Action"] = "api"}, body)
end
EOF

T0=$(date +%s)
for r in $(seq 1 "$ROUNDS"); do
    for P in 1 16; do
        rb "sluiced_cl_throttle_P$P" "$SP" "$P" CL.THROTTLE key:__rand_int__ 1000000 1000000 1
        rb "redis_lua_P$P" "$RP" "$P" EVALSHA "$SHA" 1 lua:__rand_int__ 1000000 1000000 1
        rb "sluiced_sl_take_P$P" "$SP" "$P" SL.TAKE bench api client:__rand_int__
        rb "redis_incr_P$P" "$RP" "$P" INCR incr:__rand_int__
    done
    wk sluiced_http "$SH"
    wk nginx_limit_req "$NP"
done
T1=$(date +%s)
grep -q "BUSY\|error" "$TMP/sluiced.log" && fail "sluiced logged errors: $(head -3 "$TMP/sluiced.log")"

echo "# sluiced server bench: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, $ROUNDS rounds," \
     "redis-benchmark -c 50 -r 100000 -n $N, wrk -t 1 -c 50 -d ${DUR}s, $((T1 - T0)) s"
awk '
function median(arr, n,    i, j, t) {
    for (i = 2; i <= n; i++) { t = arr[i]; for (j = i - 1; j >= 1 && arr[j] > t; j--) arr[j + 1] = arr[j]; arr[j + 1] = t }
    return n % 2 ? arr[(n + 1) / 2] : (arr[n / 2] + arr[n / 2 + 1]) / 2
}
{ k = ++cnt[$1]; rps[$1, k] = $2; p50[$1, k] = $3; p99[$1, k] = $4; if (k == 1) order[++no] = $1 }
END {
    for (i = 1; i <= no; i++) {
        s = order[i]; n = cnt[s]
        for (k = 1; k <= n; k++) { a[k] = rps[s, k]; b[k] = p50[s, k]; c[k] = p99[s, k] }
        R[s] = median(a, n); P99[s] = median(c, n)
        printf "RESULT name=%s metric=rps value=%.0f\n", s, R[s]
        printf "RESULT name=%s metric=p50_ms value=%.3f\n", s, median(b, n)
        printf "RESULT name=%s metric=p99_ms value=%.3f\n", s, P99[s]
    }
    split("sluiced_cl_throttle_P1:redis_lua_P1:3 sluiced_cl_throttle_P16:redis_lua_P16:3 sluiced_cl_throttle_P1:redis_incr_P1:0.9 sluiced_cl_throttle_P16:redis_incr_P16:0.9 sluiced_sl_take_P1:redis_incr_P1:0.9 sluiced_sl_take_P16:redis_incr_P16:0.9 sluiced_http:nginx_limit_req:1", pairs, " ")
    for (i = 1; i in pairs; i++) {
        split(pairs[i], p, ":")
        if (!(p[1] in R) || !(p[2] in R) || R[p[2]] == 0) continue
        ratio = R[p[1]] / R[p[2]]
        printf "RESULT name=ratio_%s_vs_%s metric=ratio value=%.3f\n", p[1], p[2], ratio
        t[++nt] = sprintf("TARGET %s %s: %.2fx %s (>= %s)", ratio >= p[3] ? "MET   " : "MISSED", p[1], ratio, p[2], p[3])
    }
    for (s in R) if (s ~ /^sluiced/)
        t[++nt] = sprintf("TARGET %s %s: p99 %.3f ms at 50 connections (< 1)", P99[s] < 1 ? "MET   " : "MISSED", s, P99[s])
    for (i = 1; i <= nt; i++) print t[i]
}' "$OUT"
