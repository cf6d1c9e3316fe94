# bench_lib.sh — shell helpers shared by the server benchmarks (sourced, not run).
# The caller sets TMP (a private temp dir), OUT (the results file) and N (requests per run),
# and adds the pid of every server it starts to PIDS: they are killed, and TMP removed, on
# exit.

PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

fail() { echo "${0##*/}: FAILED: $*" >&2; exit 1; }
# N distinct free loopback ports on one line (the tests' picker: below the ephemeral range).
free_ports() {
    PYTHONPATH="$(dirname "${BASH_SOURCE[0]}")/../tests/integration" python3 -c \
        'import sys, harness; print(*(harness.free_port() for _ in range(int(sys.argv[1]))))' "$1"
}
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; fail "port $1 never opened"; }

# A token bucket as people write it in Lua: HMGET, refill, decide, HMSET, PEXPIRE.
# ARGV: capacity, refill per ms, cost. Reply: {allowed, tokens left}.
PEER_LUA='local cap = tonumber(ARGV[1]); local rate = tonumber(ARGV[2]); local cost = tonumber(ARGV[3])
local t = redis.call("TIME"); local now = t[1] * 1000 + math.floor(t[2] / 1000)
local s = redis.call("HMGET", KEYS[1], "tokens", "ts")
local tokens = tonumber(s[1]) or cap; local ts = tonumber(s[2]) or now
tokens = math.min(cap, tokens + (now - ts) * rate / 1000)
local allowed = 0
if tokens >= cost then tokens = tokens - cost; allowed = 1 end
redis.call("HMSET", KEYS[1], "tokens", tokens, "ts", now)
redis.call("PEXPIRE", KEYS[1], math.ceil((cap - tokens) / rate * 1000) + 1000)
return {allowed, math.floor(tokens)}'

# peer_lua_load <redis port>: load PEER_LUA, check it, print its SHA.
peer_lua_load() {
    local sha check
    sha=$(redis-cli -p "$1" SCRIPT LOAD "$PEER_LUA")
    check=$(for _ in 1 2 3; do redis-cli -p "$1" EVALSHA "$sha" 1 chk 2 1 1; done)
    [ "$(echo $check)" = "1 1 1 0 0 0" ] || fail "the Lua token bucket is wrong: $(echo $check)"
    redis-cli -p "$1" DEL chk >/dev/null
    echo "$sha"
}

# rb <name> <port> <pipeline> <keyspace> <command...>: one redis-benchmark run, 50
# connections -> "name rps p50_ms p99_ms redis_us" appended to $OUT. Error replies fail the
# run. DECISIONS (default 1): decisions per request; rps counts decisions. REDIS_PORT, when
# set: redis_us = microseconds Redis spent executing scripts (FCALL and EVALSHA, INFO
# commandstats) per decision of this run, else -1.
rb() {
    local name=$1 port=$2 pipe=$3 keys=$4 csv us=-1 per=${DECISIONS:-1}
    shift 4
    [ -n "${REDIS_PORT:-}" ] && redis-cli -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null
    csv=$(redis-benchmark -p "$port" -c 50 -n "$N" -r "$keys" -P "$pipe" --csv "$@" 2>"$TMP/rb.err") ||
        fail "redis-benchmark $name: $(cat "$TMP/rb.err")"
    grep -q "Error\|ERR\|BUSY" "$TMP/rb.err" && fail "$name: error replies: $(head -3 "$TMP/rb.err")"
    if [ -n "${REDIS_PORT:-}" ]; then
        us=$(redis-cli -p "$REDIS_PORT" INFO commandstats | tr -d '\r' |
            sed -n 's/^cmdstat_\(fcall\|evalsha\):calls=[0-9]*,usec=\([0-9]*\),.*/\2/p' |
            awk -v d="$((N * per))" '{u += $1} END {printf "%.2f", u / d}')
    fi
    # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    echo "$csv" | tail -1 | tr -d '"' |
        awk -F, -v n="$name" -v per="$per" -v us="$us" '{print n, $2 * per, $5, $7, us}' >>"$OUT"
}

# summarize <pairs> <p99 target ms> <scenario regex for p99 targets>: medians of $OUT as
# RESULT lines, then the ratio of each pair "a:b:target" and TARGET lines.
summarize() {
    awk -v pairs="$1" -v p99max="$2" -v p99re="$3" '
function median(arr, n,    i, j, t) {
    for (i = 2; i <= n; i++) { t = arr[i]; for (j = i - 1; j >= 1 && arr[j] > t; j--) arr[j + 1] = arr[j]; arr[j + 1] = t }
    return n % 2 ? arr[(n + 1) / 2] : (arr[n / 2] + arr[n / 2 + 1]) / 2
}
{ k = ++cnt[$1]; rps[$1, k] = $2; p50[$1, k] = $3; p99[$1, k] = $4; rus[$1, k] = NF >= 5 ? $5 : -1; if (k == 1) order[++no] = $1 }
END {
    for (i = 1; i <= no; i++) {
        s = order[i]; n = cnt[s]
        for (k = 1; k <= n; k++) { a[k] = rps[s, k]; b[k] = p50[s, k]; c[k] = p99[s, k]; e[k] = rus[s, k] }
        R[s] = median(a, n); P99[s] = median(c, n)
        printf "RESULT name=%s metric=rps value=%.0f\n", s, R[s]
        printf "RESULT name=%s metric=p50_ms value=%.3f\n", s, median(b, n)
        printf "RESULT name=%s metric=p99_ms value=%.3f\n", s, P99[s]
        if (e[1] >= 0) printf "RESULT name=%s metric=redis_us_per_decision value=%.2f\n", s, median(e, n)
    }
    split(pairs, pr, " ")
    for (i = 1; i in pr; i++) {
        split(pr[i], p, ":")
        if (!(p[1] in R) || !(p[2] in R) || R[p[2]] == 0) continue
        ratio = R[p[1]] / R[p[2]]
        printf "RESULT name=ratio_%s_vs_%s metric=ratio value=%.3f\n", p[1], p[2], ratio
        t[++nt] = sprintf("TARGET %s %s: %.2fx %s (>= %s)", ratio >= p[3] ? "MET   " : "MISSED", p[1], ratio, p[2], p[3])
    }
    for (i = 1; i <= no; i++) if (order[i] ~ p99re) {
        s = order[i]
        t[++nt] = sprintf("TARGET %s %s: p99 %.3f ms at 50 connections (< %s)", P99[s] < p99max + 0 ? "MET   " : "MISSED", s, P99[s], p99max)
    }
    for (i = 1; i <= nt; i++) print t[i]
}' "$OUT"
}
