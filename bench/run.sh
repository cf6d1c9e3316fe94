#!/usr/bin/env bash
# run.sh — libsluice's benchmark against its two references, in one run.
#
#   bash bench/run.sh <build-dir> [--quick]        (what `make bench` runs)
#
# 1. Builds the Go peer (bench/go/peer.go, golang.org/x/time/rate) into <build-dir>/.
# 2. Runs <build-dir>/lib_bench and the Go peer alternately, BENCH_ROUNDS times (default 3),
#    swapping which goes first each round so that the machine's noise hits both, with the same
#    parameters (keys, seed, sequence length, seconds per scenario, thread counts). Each
#    program runs every scenario once per round (--reps 1); lib_bench also measures the
#    random-access floor in the same process and prints its ratio to it.
# 3. Prints the median over rounds of every RESULT line, the ratio lines
#      RESULT name=ratio_<scenario>_vs_go    metric=ratio value=...  (C decisions/s / Go's,
#                                                                    per round, then median)
#      RESULT name=ratio_<scenario>_vs_floor metric=ratio value=...  (ns per decision per
#                                                                    thread / ns per access)
#    a table, and which targets were met.
#
# Exits non-zero only when something fails to build or run (or a benchmark's own result check
# fails) — never because a target is missed.
#
# Environment: BENCH_ROUNDS (3), BENCH_SECONDS (1.0 per scenario and round), BENCH_KEYS
# (1000000), BENCH_SEED, BENCH_BATCH (32). Raw outputs: <build-dir>/bench-results/.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: bash bench/run.sh <build-dir> [--quick]" >&2
    exit 2
fi
BUILD=$(cd "$1" && pwd)
QUICK=0
[ "${2:-}" = "--quick" ] && QUICK=1
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

ROUNDS=${BENCH_ROUNDS:-3}
SECONDS_PER=${BENCH_SECONDS:-1.0}
KEYS=${BENCH_KEYS:-1000000}
SEED=${BENCH_SEED:-1592614637}
BATCH=${BENCH_BATCH:-32}
THREADS=2

LIB_BENCH=$BUILD/lib_bench
PEER=$BUILD/sluice_go_peer
OUT=$BUILD/bench-results
mkdir -p "$OUT"
rm -f "$OUT"/round*.txt "$OUT"/round*.err

fail() {
    echo "bench/run.sh: FAILED: $*" >&2
    exit 1
}

[ -x "$LIB_BENCH" ] || fail "$LIB_BENCH not built (run make build)"
command -v go >/dev/null || fail "go not found (make deps installs golang-go)"
[ -d /usr/share/gocode/src/golang.org/x/time/rate ] ||
    fail "golang.org/x/time/rate not found (make deps installs golang-golang-x-time-dev)"

echo "# building the Go peer -> $PEER" >&2
(cd "$SRC/go" && GO111MODULE=off GOPATH=/usr/share/gocode GOCACHE="$BUILD/gocache" \
    GOFLAGS= go build -o "$PEER" peer.go) || fail "go build of bench/go/peer.go"

if [ $QUICK = 1 ]; then
    ARGS=(--quick --threads-max "$THREADS")
    ROUNDS=${BENCH_ROUNDS:-1}
else
    ARGS=(--keys "$KEYS" --seconds "$SECONDS_PER" --seed "$SEED" --threads-max "$THREADS"
          --reps 1)
fi

run_c() {
    echo "# round $1: lib_bench ${ARGS[*]} --batch $BATCH" >&2
    "$LIB_BENCH" "${ARGS[@]}" --batch "$BATCH" >"$OUT/round$1-c.txt" 2>"$OUT/round$1-c.err" ||
        { cat "$OUT/round$1-c.err" >&2; fail "lib_bench (round $1)"; }
}
run_go() {
    echo "# round $1: sluice_go_peer ${ARGS[*]}" >&2
    "$PEER" "${ARGS[@]}" >"$OUT/round$1-go.txt" 2>"$OUT/round$1-go.err" ||
        { cat "$OUT/round$1-go.err" >&2; fail "sluice_go_peer (round $1)"; }
}

T0=$(date +%s)
for r in $(seq 1 "$ROUNDS"); do
    if [ $((r % 2)) = 1 ]; then run_c "$r"; run_go "$r"; else run_go "$r"; run_c "$r"; fi
done
T1=$(date +%s)

echo "# libsluice bench: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(lscpu | sed -n 's/^Model name: *//p' | head -1)," \
     "$(nproc) CPUs, $ROUNDS rounds (C and Go alternating), ${ARGS[*]}, batch $BATCH," \
     "$((T1 - T0)) s"

# Everything below is computed from the raw per-round files.
awk -v rounds="$ROUNDS" -v batch="$BATCH" '
function median(key,    n, i, j, t, a) {
    n = cnt[key]
    for (i = 1; i <= n; i++) a[i] = val[key, i]
    for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
function fmt(m, v) {
    if (m == "ratio" || m == "allowed_fraction" || m == "ticks_per_ns" || m == "cpu_share") return sprintf("%.4f", v)
    if (m == "decisions_per_s" || m == "keys" || m == "bytes") return sprintf("%.0f", v)
    return sprintf("%.1f", v)
}
function add(name, metric, v,    key) {
    key = name SUBSEP metric
    if (!(key in cnt)) { order[++norder] = key; cnt[key] = 0 }
    val[key, ++cnt[key]] = v
}
function get(name, metric,    key) { key = name SUBSEP metric; return (key in cnt) ? median(key) : "" }
function target(ok, text) { ntarget++; if (ok) nmet++; printf "TARGET %s %s\n", ok ? "MET   " : "MISSED", text }
# round number from the file name: .../roundN-c.txt
FNR == 1 { f = FILENAME; sub(/.*round/, "", f); round = f + 0; lang = (FILENAME ~ /-go\.txt$/) ? "go" : "c" }
/^RESULT / {
    name = ""; metric = ""; v = ""
    for (i = 2; i <= NF; i++) {
        split($i, kv, "=")
        if (kv[1] == "name") name = kv[2]; else if (kv[1] == "metric") metric = kv[2]; else if (kv[1] == "value") v = kv[2]
    }
    add(name, metric, v + 0)
    if (metric == "decisions_per_s") dps[lang, name, round] = v + 0
    if (lang == "c" && metric == "decisions_per_s") { if (!(name in isc)) { isc[name] = 1; cs[++ncs] = name } }
}
END {
    # per-round ratio to the Go peer, then the median
    for (i = 1; i <= ncs; i++) {
        s = cs[i]; g = "go_" s; sub(/_batch[0-9]+$/, "", g)
        n = 0
        for (r = 1; r <= rounds; r++)
            if (("c", s, r) in dps && ("go", g, r) in dps && dps["go", g, r] > 0)
                add("ratio_" s "_vs_go", "ratio", dps["c", s, r] / dps["go", g, r])
    }
    for (k = 1; k <= norder; k++) {
        split(order[k], nm, SUBSEP)
        printf "RESULT name=%s metric=%s value=%s\n", nm[1], nm[2], fmt(nm[2], median(order[k]))
    }

    # table
    printf "\n%-34s %11s %11s %6s %6s %6s %8s %7s %6s %6s %5s %5s\n", "scenario", "C dec/s", "Go dec/s", "C/Go",
        "C p50", "C p99", "ns/dec/t", "x floor", "Go p50", "Go p99", "C cpu", "Gocpu"
    for (i = 1; i <= ncs; i++) {
        s = cs[i]; g = "go_" s; sub(/_batch[0-9]+$/, "", g)
        fl = get("ratio_" s "_vs_floor", "ratio")
        printf "%-34s %11.0f %11s %6s %6.1f %6.1f %8.1f %7s %6s %6s %5.2f %5s\n", s, get(s, "decisions_per_s"),
            get(g, "decisions_per_s") == "" ? "-" : sprintf("%.0f", get(g, "decisions_per_s")),
            get("ratio_" s "_vs_go", "ratio") == "" ? "-" : sprintf("%.2f", get("ratio_" s "_vs_go", "ratio")),
            get(s, "p50_ns"), get(s, "p99_ns"), get(s, "ns_per_decision"),
            fl == "" ? "-" : sprintf("%.2f", fl),
            get(g, "p50_ns") == "" ? "-" : sprintf("%.1f", get(g, "p50_ns")),
            get(g, "p99_ns") == "" ? "-" : sprintf("%.1f", get(g, "p99_ns")),
            get(s, "cpu_share"), get(g, "cpu_share") == "" ? "-" : sprintf("%.2f", get(g, "cpu_share"))
    }
    printf "%-34s floor 1t %.1f ns/access, 2t %.1f ns/access over %.0f MB; timer overhead %.1f ns\n",
        "", get("floor_1t", "ns_per_access"), get("floor_2t", "ns_per_access"), get("floor", "bytes") / 1e6,
        get("timer", "overhead_ns")
    printf "%-34s bytes/key: token_bucket %.1f, sliding_window %.1f (Go: %.1f, %.1f)\n\n", "",
        get("token_bucket_populate", "bytes_per_key"), get("sliding_window_populate", "bytes_per_key"),
        get("go_token_bucket_populate", "bytes_per_key"), get("go_sliding_window_populate", "bytes_per_key")

    # targets (from the medians)
    for (i = 1; i <= ncs; i++) {
        s = cs[i]
        fl = get("ratio_" s "_vs_floor", "ratio")
        if (fl != "") {
            if (s ~ /_batch[0-9]+$/) target(fl <= 1.0, sprintf("%s: %.2fx the random-access floor per decision (<= 1)", s, fl))
            else target(fl <= 2.0, sprintf("%s: %.2fx the random-access floor per decision (<= 2)", s, fl))
        }
        rg = get("ratio_" s "_vs_go", "ratio")
        if (rg != "" && s !~ /_batch[0-9]+$/) {
            need = (s ~ /_hot_/) ? 5 : 3
            target(rg >= need, sprintf("%s: %.2fx the Go peer'"'"'s decisions/s (>= %d)", s, rg, need))
        }
        p99 = get(s, "p99_ns")
        target(p99 < 1000, sprintf("%s: p99 %.1f ns (< 1000)", s, p99))
    }
    split("token_bucket sliding_window", al, " ")
    for (i = 1; i <= 2; i++) {
        b = get(al[i] "_populate", "bytes_per_key")
        if (b != "") target(b <= 64, sprintf("%s: %.1f bytes/key (<= 64)", al[i], b))
    }
    printf "# targets met: %d of %d\n", nmet, ntarget
}' $(for r in $(seq 1 "$ROUNDS"); do echo "$OUT/round$r-c.txt" "$OUT/round$r-go.txt"; done)
