#!/usr/bin/env bash
# callgrind_lib.sh — instructions per decision of the library, counted by valgrind's callgrind
# (repeatable on a noisy machine, unlike time), for one build or two side by side.
#
#   bash bench/callgrind_lib.sh <build-dir> [other-build-dir]
#
# Runs <build-dir>/lib_bench under callgrind, one thread, --keys 100000 --ops 200000, for
# {token_bucket, sliding_window} x {hot key, random keys}, and divides the inclusive
# instructions of lib_bench's run_single (single sl_take calls) and run_batch (sl_take_batch of
# 32) by the decisions each made. The bench loop's own work (~40 instructions per decision:
# the next key, the every-16th rdtsc sample, counting) is included. Prints
#   RESULT name=callgrind_<scenario> metric=instructions_per_decision value=<n> [build=<dir>]
# and, with two builds, RESULT name=callgrind_<scenario> metric=ratio value=<first/other>.
# Takes about a minute per build.
set -euo pipefail

[ $# -ge 1 ] || { echo "usage: bash bench/callgrind_lib.sh <build-dir> [other-build-dir]" >&2; exit 2; }
command -v valgrind >/dev/null && command -v callgrind_annotate >/dev/null ||
    { echo "callgrind_lib.sh: valgrind not installed (make deps)" >&2; exit 1; }
TMP=$(mktemp -d /tmp/sluice-cglib.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
OPS=200000

# inclusive <profile> <function>: inclusive instructions of one function of a profile
inclusive() {
    callgrind_annotate --inclusive=yes "$1" 2>/dev/null |
        awk -v f=":$2 " '$0 ~ f && !t {gsub(",", "", $1); t = $1} END {print t + 0}'
}

# measure <build-dir>: prints "<scenario> <instructions per decision>" lines
measure() {
    local b=$1 algo kind out
    for algo in token_bucket sliding_window; do
        for kind in hot random; do
            out=$TMP/cg.$algo.$kind
            valgrind --tool=callgrind --callgrind-out-file="$out" "$b/lib_bench" \
                --only "${algo}_${kind}_1t" --keys 100000 --ops $OPS --no-floor --reps 1 \
                >/dev/null 2>"$TMP/valgrind.log" ||
                { cat "$TMP/valgrind.log" >&2; exit 1; }
            echo "${algo}_${kind}_1t $(($(inclusive "$out" run_single) / OPS))"
            [ "$kind" = hot ] ||
                echo "${algo}_${kind}_1t_batch32 $(($(inclusive "$out" run_batch) / OPS))"
        done
    done
}

A=$(cd "$1" && pwd)
measure "$A" >"$TMP/a"
while read -r name v; do
    echo "RESULT name=callgrind_$name metric=instructions_per_decision value=$v build=$A"
done <"$TMP/a"
if [ $# -ge 2 ]; then
    B=$(cd "$2" && pwd)
    measure "$B" >"$TMP/b"
    while read -r name v; do
        echo "RESULT name=callgrind_$name metric=instructions_per_decision value=$v build=$B"
    done <"$TMP/b"
    join "$TMP/a" "$TMP/b" | while read -r name a b; do
        awk -v n="$name" -v a="$a" -v b="$b" \
            'BEGIN {printf "RESULT name=callgrind_%s metric=ratio value=%.3f\n", n, (b ? a / b : 0)}'
    done
fi
