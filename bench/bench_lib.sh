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
# The median of the numbers on stdin, one per line.
median_of() { sort -g | awk '{v[NR] = $1} END {printf "%.10g\n", (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }
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

# CPU accounting. SERVER_PID[port] (set by the caller for each server it starts): the pids
# (space-separated: a server and the store behind it) whose CPU time a run on that port is
# charged to. A run then also reports
#   server_us  microseconds of their CPU (user + system, from /proc) per request
#   client     the load generator's CPU time / wall time (its own `time`): near 1 means the
#              load generator, not the server, set the pace of the run
# (-1 when unknown). On this 2-core machine the client and the server each get one core; with
# one request in flight per connection both make the same two system calls per request, so
# the client saturates first and every server it drives shows about the same req/s. The
# server's CPU per request is then what still tells servers apart.
declare -A SERVER_PID=()
proc_cpu_ticks() { # pids -> their utime + stime in clock ticks, summed (0 for one gone)
    local p t=0
    for p in "$@"; do
        t=$((t + $(awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$p/stat" 2>/dev/null || echo 0)))
    done
    echo "$t"
}
# run_timed <cmd...>: runs it with stdout to $TMP/run.out, stderr to $TMP/run.err; sets RT_REAL,
# RT_CPU (the command's own user + system seconds); returns its status.
run_timed() {
    local TIMEFORMAT='%R %U %S' t rc=0
    { time "$@" >"$TMP/run.out" 2>"$TMP/run.err"; } 2>"$TMP/run.time" || rc=$?
    read -r RT_REAL t RT_CPU <"$TMP/run.time"
    RT_CPU=$(awk -v a="$t" -v b="$RT_CPU" 'BEGIN {print a + b}')
    return $rc
}
# cpu_fields <pids or ""> <ticks before> <requests>: "server_us client" for the last run_timed.
cpu_fields() {
    local su=-1
    if [ -n "$1" ]; then
        # shellcheck disable=SC2086 # the pids, one word each
        su=$(awk -v a="$2" -v b="$(proc_cpu_ticks $1)" -v n="$3" -v hz="$(getconf CLK_TCK)" \
            'BEGIN {printf "%.2f", (n > 0 ? (b - a) / hz * 1e6 / n : -1)}')
    fi
    echo "$su $(awk -v c="$RT_CPU" -v r="$RT_REAL" 'BEGIN {printf "%.2f", (r > 0 ? c / r : -1)}')"
}

# rb <name> <port> <pipeline> <keyspace> <command...>: one redis-benchmark run, 50
# connections -> "name rps p50_ms p99_ms redis_us server_us client" appended to $OUT. Error
# replies fail the run. DECISIONS (default 1): decisions per request; rps counts decisions
# (server_us is per request). REDIS_PORT, when set: redis_us = microseconds Redis spent
# executing scripts (FCALL and EVALSHA, INFO commandstats) per decision of this run, else -1.
rb() {
    local name=$1 port=$2 pipe=$3 keys=$4 csv us=-1 per=${DECISIONS:-1} pid c0=0 cpu
    shift 4
    pid=${SERVER_PID[$port]:-}
    [ -n "${REDIS_PORT:-}" ] && redis-cli -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null
    # shellcheck disable=SC2086
    [ -n "$pid" ] && c0=$(proc_cpu_ticks $pid)
    run_timed redis-benchmark -p "$port" -c 50 -n "$N" -r "$keys" -P "$pipe" --csv "$@" ||
        fail "redis-benchmark $name: $(cat "$TMP/run.err")"
    cpu=$(cpu_fields "$pid" "$c0" "$N")
    csv=$(cat "$TMP/run.out")
    grep -q "Error\|ERR\|BUSY" "$TMP/run.err" && fail "$name: error replies: $(head -3 "$TMP/run.err")"
    if [ -n "${REDIS_PORT:-}" ]; then
        us=$(redis-cli -p "$REDIS_PORT" INFO commandstats | tr -d '\r' |
            sed -n 's/^cmdstat_\(fcall\|evalsha\):calls=[0-9]*,usec=\([0-9]*\),.*/\2/p' |
            awk -v d="$((N * per))" '{u += $1} END {printf "%.2f", u / d}')
    fi
    # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    echo "$csv" | tail -1 | tr -d '"' |
        awk -F, -v n="$name" -v per="$per" -v us="$us" -v cpu="$cpu" '{print n, $2 * per, $5, $7, us, cpu}' >>"$OUT"
}

# summarize <pairs> <p99 target ms> <scenario regex for p99 targets>: medians of $OUT as
# RESULT lines, then the ratio of each pair "a:b:target" and TARGET lines.
summarize() {
    awk -v pairs="$1" -v p99max="$2" -v p99re="$3" '
function median(arr, n,    i, j, t) {
    for (i = 2; i <= n; i++) { t = arr[i]; for (j = i - 1; j >= 1 && arr[j] > t; j--) arr[j + 1] = arr[j]; arr[j + 1] = t }
    return n % 2 ? arr[(n + 1) / 2] : (arr[n / 2] + arr[n / 2 + 1]) / 2
}
{ k = ++cnt[$1]; rps[$1, k] = $2; p50[$1, k] = $3; p99[$1, k] = $4; rus[$1, k] = NF >= 5 ? $5 : -1
  sus[$1, k] = NF >= 6 ? $6 : -1; cli[$1, k] = NF >= 7 ? $7 : -1; if (k == 1) order[++no] = $1 }
END {
    for (i = 1; i <= no; i++) {
        s = order[i]; n = cnt[s]
        for (k = 1; k <= n; k++) { a[k] = rps[s, k]; b[k] = p50[s, k]; c[k] = p99[s, k]; e[k] = rus[s, k]; f[k] = sus[s, k]; g[k] = cli[s, k] }
        R[s] = median(a, n); P99[s] = median(c, n); SU[s] = f[1] >= 0 ? median(f, n) : -1; CL[s] = g[1] >= 0 ? median(g, n) : -1
        printf "RESULT name=%s metric=rps value=%.0f\n", s, R[s]
        if (P99[s] >= 0) { # -1: not measured
            printf "RESULT name=%s metric=p50_ms value=%.3f\n", s, median(b, n)
            printf "RESULT name=%s metric=p99_ms value=%.3f\n", s, P99[s]
        }
        if (e[1] >= 0) printf "RESULT name=%s metric=redis_us_per_decision value=%.2f\n", s, median(e, n)
        if (SU[s] >= 0) printf "RESULT name=%s metric=server_cpu_us_per_request value=%.2f\n", s, SU[s]
        if (CL[s] >= 0) printf "RESULT name=%s metric=client_cpu_share value=%.2f\n", s, CL[s]
    }
    split(pairs, pr, " ")
    for (i = 1; i in pr; i++) {
        split(pr[i], p, ":")
        if (!(p[1] in R) || !(p[2] in R) || R[p[2]] == 0) continue
        ratio = R[p[1]] / R[p[2]]
        printf "RESULT name=ratio_%s_vs_%s metric=ratio value=%.3f\n", p[1], p[2], ratio
        note = ""
        if (SU[p[1]] > 0 && SU[p[2]] > 0) {
            # how many times less server CPU a request of p[1] needs than one of p[2]
            cr = SU[p[2]] / SU[p[1]]
            printf "RESULT name=cpu_ratio_%s_vs_%s metric=ratio value=%.3f\n", p[1], p[2], cr
            if (CL[p[1]] >= 0.9 && CL[p[2]] >= 0.9)
                note = sprintf(" [client-bound: the load generator used %.0f%% / %.0f%% of a core; server CPU per request %.2fx less]", CL[p[1]] * 100, CL[p[2]] * 100, cr)
        }
        t[++nt] = sprintf("TARGET %s %s: %.2fx %s (>= %s)%s", ratio >= p[3] ? "MET   " : "MISSED", p[1], ratio, p[2], p[3], note)
    }
    for (i = 1; i <= no; i++) if (order[i] ~ p99re && P99[order[i]] >= 0) {
        s = order[i]
        t[++nt] = sprintf("TARGET %s %s: p99 %.3f ms at 50 connections (< %s)", P99[s] < p99max + 0 ? "MET   " : "MISSED", s, P99[s], p99max)
    }
    for (i = 1; i <= nt; i++) print t[i]
}' "$OUT"
}

# nginx_conf <dir> <port> [extra main-context line]: the nginx peer of the HTTP benches, in
# <dir>/nginx.conf: one worker answering POST /api/check_and_consume 200 from a limit_req zone
# keyed by X-Tenant, X-Client and X-Action, as generous as sluiced's bench limit.
nginx_conf() {
    mkdir -p "$1/logs"
    cat >"$1/nginx.conf" <<EOF
worker_processes 1;
${3:-}
daemon off;
pid $1/nginx.pid;
error_log $1/logs/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $1/body;
    limit_req_zone \$http_x_tenant:\$http_x_client:\$http_x_action zone=rl:64m rate=1000000r/s;
    limit_req_status 429;
    server {
        listen 127.0.0.1:$2;
        location = /api/check_and_consume {
            limit_req zone=rl burst=1000000 nodelay;
            default_type application/json;
            return 200 '{"allowed": true, "status": "processed"}';
        }
    }
}
EOF
}

# check_lua <file>: wrk's script for POST /api/check_and_consume, a random client of 100k. The
# requests are made once, before the clock starts (wrk's per-request Lua call then only picks
# the next one): the cheaper the load generator, the more of the run is the server's. Its one
# argument (wrk ... -- N) sends N requests per write.
check_lua() {
    cat >"$1" <<'EOF'
local reqs, n, i = {}, 100000, 0
init = function(args) -- here, not at load: wrk adds the Host header after loading the script
    local depth = tonumber(args[1]) or 1
    math.randomseed(42)
    for k = 1, n do
        local c = "client:" .. math.random(100000)
        local body = '{"tenant_id": "bench", "client_id": "' .. c .. '", "action_type": "api"}'
        reqs[k] = wrk.format("POST", nil, {["Content-Type"] = "application/json", ["X-Tenant"] = "bench",
                                           ["X-Client"] = c, ["X-Action"] = "api"}, body)
    end
    if depth > 1 then -- `depth` requests per write; wrk counts each response
        local batches = {}
        for b = 0, math.floor(n / depth) - 1 do
            batches[b + 1] = table.concat(reqs, "", b * depth + 1, (b + 1) * depth)
        end
        reqs, n = batches, #batches
    end
end
request = function()
    i = i % n + 1
    return reqs[i]
end
EOF
}
