#!/usr/bin/env bash
# metrics_bench.sh — what a Prometheus scrape of /metrics costs sluiced when it has many
# tenants: /metrics is built on libuv's thread pool, and its worker serves other connections
# meanwhile (before 2026-12-07 it was built on the worker's event loop, which then served
# nothing else).
#
#   bash bench/metrics_bench.sh <build-dir> [--quick]
#
# For --metrics-tenants 1 (a series per tenant, the default) and 0 (totals): starts sluiced
# (one worker) on free loopback ports, makes decisions for enough random tenants that it
# counts 65,536 of them apart (the most it does; one redis-benchmark run of SL.TAKE
# t<random> a c, checked in mode 1), then fetches /metrics 5 times with curl. Prints, medians
# over the 5:
#   RESULT name=metrics_tenants_<mode> metric=first_byte_ms value=<time to the first byte>
#   RESULT name=metrics_tenants_<mode> metric=bytes value=<size of the exposition>
#   RESULT name=metrics_tenants_<mode> metric=health_during_scrape_ms value=<first byte of a
#          GET /api/health on another connection sent 20 ms into a scrape>
#   RESULT name=metrics_tenants_<mode> metric=health_idle_ms value=<the same, no scrape>
# and RESULT name=metrics_totals_vs_tenants metric=ratio value=<first byte, 1 over 0>.
# --quick: at least 1,000 tenants, 2 scrapes (a smoke test of the harness). Takes ~5 s.
set -euo pipefail

BUILD=$(cd "${1:?usage: metrics_bench.sh <build-dir> [--quick]}" && pwd)
QUICK=${2:-}
TMP=$(mktemp -d /tmp/sluice-metrics.XXXXXX)
. "$(dirname "$0")/bench_lib.sh"
for t in redis-benchmark curl; do
    command -v "$t" >/dev/null || fail "$t not installed (make deps)"
done
TENANTS=65536 SCRAPES=5
[ "$QUICK" = --quick ] && TENANTS=1000 SCRAPES=2

# health_ms: ms until the first byte of GET /api/health (curl's own start-up excluded)
health_ms() {
    curl -s -o /dev/null -w '%{time_starttransfer}\n' "http://127.0.0.1:$HP/api/health" |
        awk '{printf "%.3f\n", $1 * 1000}'
}

declare -A FIRST
for mode in 1 0; do
    read -r RP HP < <(free_ports 2)
    "$BUILD/sluiced" --threads 1 --bind 127.0.0.1 --resp-port "$RP" --http-port "$HP" \
        --metrics-tenants "$mode" 2>"$TMP/sluiced.$mode.log" &
    SPID=$!
    PIDS+=("$SPID")
    wait_port "$RP"
    # 3T requests over 4T random tenant names: ~2.1T distinct ones, so the limiter counts at
    # least T apart (it counts at most 65,536 apart; the rest go to "_overflow")
    redis-benchmark -p "$RP" -c 20 -P 16 -n $((TENANTS * 3)) -r $((TENANTS * 4)) \
        SL.TAKE t__rand_int__ a c >/dev/null 2>&1 || fail "redis-benchmark"
    if [ "$mode" = 1 ]; then
        n=$(curl -s "http://127.0.0.1:$HP/metrics" | grep -c '^sluice_keys_evicted_total{tenant=' || true)
        [ "$n" -ge "$TENANTS" ] || fail "only $n tenants counted apart"
        echo "RESULT name=metrics_tenants_1 metric=tenants value=$n"
    fi
    ft=() sz=() hb=() hi=()
    for i in $(seq "$SCRAPES"); do
        read -r f s < <(curl -s -o /dev/null -w '%{time_starttransfer} %{size_download}\n' \
            "http://127.0.0.1:$HP/metrics")
        ft+=("$(awk -v f="$f" 'BEGIN {printf "%.3f", f * 1000}')") sz+=("$s")
        # a request on another connection 20 ms into a scrape, and one with no scrape
        curl -s -o /dev/null "http://127.0.0.1:$HP/metrics" &
        CPID=$!
        sleep 0.02
        hb+=("$(health_ms)")
        wait "$CPID"
        hi+=("$(health_ms)")
    done
    kill "$SPID"
    wait "$SPID" || fail "sluiced exited badly (see $TMP/sluiced.$mode.log)"
    FIRST[$mode]=$(printf '%s\n' "${ft[@]}" | median_of)
    echo "RESULT name=metrics_tenants_$mode metric=first_byte_ms value=${FIRST[$mode]}"
    echo "RESULT name=metrics_tenants_$mode metric=bytes value=$(printf '%s\n' "${sz[@]}" | median_of)"
    echo "RESULT name=metrics_tenants_$mode metric=health_during_scrape_ms value=$(printf '%s\n' "${hb[@]}" | median_of)"
    echo "RESULT name=metrics_tenants_$mode metric=health_idle_ms value=$(printf '%s\n' "${hi[@]}" | median_of)"
done
awk -v a="${FIRST[1]}" -v b="${FIRST[0]}" \
    'BEGIN {printf "RESULT name=metrics_totals_vs_tenants metric=ratio value=%.2f\n", (b > 0 ? a / b : 0)}'
