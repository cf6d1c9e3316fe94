#!/usr/bin/env bash
# callgrind_server.sh — user-space instructions per request of a server, counted by valgrind's
# callgrind (repeatable on a noisy machine, unlike time): the server runs under callgrind with
# one worker while a load generator drives it, then stops; total instructions ÷ requests.
#
#   bash bench/callgrind_server.sh <build-dir> [sluiced-binary]
#
# Scenarios (each on a fresh server, so start-up is included: ~1-2% of the total):
#   http_check         wrk -t 1 -c 50, 5 s, POST /api/check_and_consume, a random client of
#                      100k, one request per write (requests formatted in wrk's init)
#   cl_throttle_P16    redis-benchmark -c 50 -P 16 -n 200000 -r 100000 CL.THROTTLE
#   nginx_http_check   the http_check load against nginx limit_req (server_bench.sh's config)
# Prints RESULT name=callgrind_<scenario> metric=instructions_per_request value=<n>, and the
# top functions by their own instructions per request (for where the time goes).
# Takes about a minute per scenario. The binary argument measures another build.
set -euo pipefail

BUILD=$(cd "${1:?usage: callgrind_server.sh <build-dir> [sluiced-binary]}" && pwd)
SLUICED=${2:-$BUILD/sluiced}
TMP=$(mktemp -d /tmp/sluice-callgrind.XXXXXX)
. "$(dirname "$0")/bench_lib.sh"
for t in valgrind callgrind_annotate wrk redis-benchmark redis-cli nginx; do
    command -v "$t" >/dev/null || fail "$t not installed (make deps)"
done

# cg_total <out file>: total instructions of a callgrind profile
cg_total() { callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ && !t {gsub(",", "", $1); t = $1} END {print t}'; }
# cg_report <name> <out file> <requests>
cg_report() {
    local tot
    tot=$(cg_total "$2")
    echo "RESULT name=callgrind_$1 metric=instructions_per_request value=$((tot / $3))"
    callgrind_annotate "$2" 2>/dev/null | grep -E '^ *[0-9,]+ ' | sed -n 2,9p |
        awk -v n="$3" '{c = $1; gsub(",", "", c); $1 = ""; $2 = ""; printf "#   %6d %s\n", c / n, $0}'
}

check_lua "$TMP/check.lua"

# sluiced_under_callgrind <out file> <resp port> <http port>: started, configured; sets VPID
sluiced_under_callgrind() {
    valgrind --tool=callgrind --callgrind-out-file="$1" "$SLUICED" --threads 1 --bind 127.0.0.1 \
        --resp-port "$2" --http-port "$3" --log-level warn 2>"$TMP/vg.log" & VPID=$!
    PIDS+=("$VPID")
    for _ in $(seq 300); do redis-cli -p "$2" PING >/dev/null 2>&1 && break; sleep 0.1; done
    redis-cli -p "$2" SL.DEFAULT SET token_bucket LIMIT 1000000000 RATE 1000000000 >/dev/null
    redis-cli -p "$2" SL.ADMISSION SET max_tenant_queue_size 1000000 >/dev/null
}
stop_wait() { kill -TERM "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
wrk_requests() { wrk -t 1 -c 50 -d 5s -s "$TMP/check.lua" "$1" | awk '/ requests in /{print $1}'; }

read -r RP HP NP < <(free_ports 3)

sluiced_under_callgrind "$TMP/http.cg" "$RP" "$HP"
n=$(wrk_requests "http://127.0.0.1:$HP/api/check_and_consume")
stop_wait "$VPID"
cg_report http_check "$TMP/http.cg" "$n"

sluiced_under_callgrind "$TMP/resp.cg" "$RP" 0
redis-benchmark -q -p "$RP" -c 50 -n 200000 -r 100000 -P 16 CL.THROTTLE key:__rand_int__ 1000000 1000000 1 >/dev/null 2>&1 ||
    fail "redis-benchmark"
stop_wait "$VPID"
cg_report cl_throttle_P16 "$TMP/resp.cg" 200000

nginx_conf "$TMP/nginx" "$NP" "master_process off;"
valgrind --tool=callgrind --callgrind-out-file="$TMP/nginx.cg" nginx -p "$TMP/nginx" \
    -c "$TMP/nginx/nginx.conf" 2>"$TMP/vg-nginx.log" & VPID=$!
PIDS+=("$VPID")
for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/"$NP") 2>/dev/null && break; sleep 0.1; done
n=$(wrk_requests "http://127.0.0.1:$NP/api/check_and_consume")
kill -QUIT "$VPID" 2>/dev/null || true
for _ in $(seq 100); do kill -0 "$VPID" 2>/dev/null || break; sleep 0.1; done
stop_wait "$VPID"
cg_report nginx_http_check "$TMP/nginx.cg" "$n"
