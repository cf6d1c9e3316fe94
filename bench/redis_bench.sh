#!/usr/bin/env bash
# redis_bench.sh — sluiced on the Redis store against clients calling a token-bucket Lua script
# on the same Redis directly, in one run on this machine.
#
#   bash bench/redis_bench.sh <build-dir> [--quick]          (make bench runs it)
#
# redis-benchmark, 50 connections, without and with client pipelining (-P 16), two workloads:
#   random  — 100k random keys under a generous limit: nearly every request is allowed, so
#             every decision is a script call; sluiced gains by pipelining the 50 clients'
#             requests onto a few connections to Redis.
#   attack  — 100 hot keys of capacity 1 refilling 1 per hour: after the first request per key
#             everything is denied; sluiced's near cache answers those without Redis.
# sluiced (--threads 1, --store redis://...) runs CL.THROTTLE; the peer runs bench_lib.sh's
# token bucket through EVALSHA on the same redis-server (one instance: single-threaded, so
# its core is the shared bottleneck). A third run calls sluice's own Redis function (FCALL,
# the same exact decision sluiced sends) directly from the 50 clients: sluiced against it
# shows what pipelining the clients onto few connections gains for the same Redis work.
# function_direct_random_group16 calls it with 16 keys per call, as sluiced's groups do, and
# getset_direct_random_group16 a function doing only a GET and a SET per key: the least any
# exact script must do (their rps count decisions, 16 per call).
# redis_ping (Redis answering PING) is the ceiling of this setup: one request per round
# trip per connection, with the load generator on the same 2 cores. Each run is repeated ROUNDS times (default 3),
# alternating; medians are printed as RESULT lines, then ratios and TARGET lines
# (>= 2x the direct script's decisions/s, p99 < 2 ms). Each run also reports the servers' CPU
# per request (through sluiced: sluiced's and Redis's together; direct: Redis's) and the load
# generator's CPU share (bench_lib.sh). Exits non-zero only if something fails to run.
set -euo pipefail

BUILD=$(cd "${1:?usage: redis_bench.sh <build-dir> [--quick]}" && pwd)
QUICK=0
[ "${2:-}" = "--quick" ] && QUICK=1
ROUNDS=${BENCH_ROUNDS:-3}
N=${BENCH_REQUESTS:-300000}
if [ $QUICK = 1 ]; then ROUNDS=1; N=20000; fi
SLUICED=$BUILD/sluiced
TMP=$(mktemp -d /tmp/sluice-redis-bench.XXXXXX)
OUT=$TMP/results.txt
. "$(dirname "$0")/bench_lib.sh"
for t in redis-server redis-cli redis-benchmark; do
    command -v "$t" >/dev/null || fail "$t not installed (make deps)"
done
[ -x "$SLUICED" ] || fail "$SLUICED not built"

read -r RP SP < <(free_ports 2)
redis-server --port "$RP" --bind 127.0.0.1 --save "" --appendonly no --daemonize no \
    --logfile "$TMP/redis.log" & PIDS+=($!)
wait_port "$RP"
"$SLUICED" --threads 1 --bind 127.0.0.1 --resp-port "$SP" --http-port 0 --log-level warn \
    --store "redis://127.0.0.1:$RP" 2>"$TMP/sluiced.log" & PIDS+=($!)
wait_port "$SP"
redis-cli -p "$SP" SL.ADMISSION SET max_tenant_queue_size 1000000 >/dev/null
# server CPU per request (bench_lib.sh): through sluiced, sluiced's and Redis's together
SERVER_PID[$SP]="${PIDS[1]} ${PIDS[0]}"; SERVER_PID[$RP]=${PIDS[0]}
SHA=$(peer_lua_load "$RP")
REDIS_PORT=$RP # rb reports Redis's script time per decision of each run (redis_us_per_decision)
# both sides must agree on what the attack workload decides: 1 allowed, then denied
[ "$(redis-cli -p "$SP" CL.THROTTLE chk 0 1 3600 | head -1)$(redis-cli -p "$SP" CL.THROTTLE chk 0 1 3600 | head -1)" = 01 ] ||
    fail "sluiced does not deny the second request of capacity 1"
FN=$(redis-cli -p "$RP" --raw FUNCTION LIST | grep -m1 '^sluice_') ||
    fail "sluiced did not load its function library into Redis"
# The least any exact script must do per key: read the state, write it back with a TTL. A
# function doing only that (a 51-byte value, like the token bucket's) for each of its keys:
# the ceiling for sluice's function, or any other, on this Redis.
GETSET_LUA="#!lua name=sluice_bench_getset
redis.register_function('sluice_bench_getset', function(keys, args)
    local out = {}
    for i = 1, #keys do
        redis.call('GET', keys[i])
        redis.call('SET', keys[i], string.rep('x', 51), 'PX', 60000)
        out[i] = 1
    end
    return out
end)"
redis-cli -p "$RP" FUNCTION LOAD REPLACE "$GETSET_LUA" >/dev/null ||
    fail "could not load the GET+SET function"

: >"$OUT"
T0=$(date +%s)
for r in $(seq 1 "$ROUNDS"); do
    redis-cli -p "$RP" FLUSHALL >/dev/null
    rb sluiced_redis_random "$SP" 1 100000 CL.THROTTLE "r$r:__rand_int__" 1000000 1000000 1
    rb lua_direct_random "$RP" 1 100000 EVALSHA "$SHA" 1 "l$r:__rand_int__" 1000000 1000000 1
    # CL.THROTTLE k 1000000 1000000 1 = a token bucket of 1000001 refilling every 1000 ns
    rb function_direct_random "$RP" 1 100000 FCALL "$FN" 1 "f$r:__rand_int__" "" take 1 1 1 1000001 1000 0 0 0
    # the same function deciding 16 keys per call, as sluiced's groups do (rps: decisions/s)
    DECISIONS=16 rb function_direct_random_group16 "$RP" 1 100000 FCALL "$FN" 16 $(for i in $(seq 16); do printf 'g%s:__rand_int__ ' "$r"; done) "" take 1 1 1 1000001 1000 0 0 0
    # the ceiling: only a GET and a SET per key, 16 keys per call
    DECISIONS=16 rb getset_direct_random_group16 "$RP" 1 100000 FCALL sluice_bench_getset 16 $(for i in $(seq 16); do printf 'h%s:__rand_int__ ' "$r"; done)
    rb sluiced_redis_attack "$SP" 1 100 CL.THROTTLE "a$r:__rand_int__" 0 1 3600
    rb lua_direct_attack "$RP" 1 100 EVALSHA "$SHA" 1 "b$r:__rand_int__" 1 0.000277 1
    # the ceiling of this setup: Redis answering PING, no work at all
    rb redis_ping "$RP" 1 100 PING
    # clients that pipeline (16 deep): the same workloads
    rb sluiced_redis_random_P16 "$SP" 16 100000 CL.THROTTLE "s$r:__rand_int__" 1000000 1000000 1
    rb lua_direct_random_P16 "$RP" 16 100000 EVALSHA "$SHA" 1 "m$r:__rand_int__" 1000000 1000000 1
    rb sluiced_redis_attack_P16 "$SP" 16 100 CL.THROTTLE "c$r:__rand_int__" 0 1 3600
    rb lua_direct_attack_P16 "$RP" 16 100 EVALSHA "$SHA" 1 "d$r:__rand_int__" 1 0.000277 1
done
T1=$(date +%s)
grep -q "error\|unreachable" "$TMP/sluiced.log" && fail "sluiced logged errors: $(head -3 "$TMP/sluiced.log")"

echo "# sluiced Redis-store bench: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPUs, $ROUNDS rounds," \
     "redis-benchmark -c 50 -P 1 and -P 16 -n $N, $((T1 - T0)) s"
summarize "sluiced_redis_random:lua_direct_random:2 sluiced_redis_attack:lua_direct_attack:2 sluiced_redis_random:function_direct_random:1 sluiced_redis_attack:redis_ping:0.9 sluiced_redis_random_P16:lua_direct_random_P16:2 sluiced_redis_attack_P16:lua_direct_attack_P16:2" 2 "^sluiced"
