#!/usr/bin/env bash
# ab_lib.sh — two builds of lib_bench on one scenario, alternated in one run (A B A B ...), so
# that this shared machine's drift hits both alike: the way to tell whether a change to the
# library made a decision faster when the difference is smaller than the run-to-run noise.
#
#   bash bench/ab_lib.sh <build-A> <build-B> <scenario> [rounds (7)] [lib_bench args...]
#   e.g. bash bench/ab_lib.sh /tmp/old/build build token_bucket_hot_1t 7 --keys 1000
#
# Each round runs `lib_bench --only <scenario> --no-floor --seconds 1 --reps 1` from A, then
# B. Prints per round decisions/s and p99, then
#   RESULT name=ab_<scenario> metric=decisions_per_s_A|decisions_per_s_B value=<median>
#   RESULT name=ab_<scenario> metric=p99_ns_A|p99_ns_B value=<median>
#   RESULT name=ab_<scenario> metric=ratio_B_over_A value=<median of per-round B/A>
#   RESULT name=ab_<scenario> metric=rounds_B_faster value=<n of rounds>
set -euo pipefail

[ $# -ge 3 ] || { sed -n 5,6p "$0" >&2; exit 2; }
A=$(cd "$1" && pwd)/lib_bench
B=$(cd "$2" && pwd)/lib_bench
S=$3
ROUNDS=${4:-7}
shift $(($# < 4 ? $# : 4))
[ -x "$A" ] && [ -x "$B" ] || { echo "ab_lib.sh: lib_bench missing in a build" >&2; exit 2; }

TMP=$(mktemp -d /tmp/sluice-ab.XXXXXX)
. "$(dirname "$0")/bench_lib.sh" # median_of; removes TMP on exit
ERR=$TMP/stderr
# metric <output> <metric>: the value of `name=<S> metric=<metric>`
metric() { awk -v n="name=$S" -v m="metric=$2" '$2 == n && $3 == m {sub("value=", "", $4); print $4}' <<<"$1"; }
# run <lib_bench> <args>: its stdout; its stderr (progress lines) only if it fails
run() { "$@" 2>"$ERR" || { cat "$ERR" >&2; exit 1; }; }

da=() db=() pa=() pb=() ratio=() faster=0
for i in $(seq "$ROUNDS"); do
    oa=$(run "$A" --only "$S" --no-floor --seconds 1 --reps 1 "$@")
    ob=$(run "$B" --only "$S" --no-floor --seconds 1 --reps 1 "$@")
    x=$(metric "$oa" decisions_per_s) y=$(metric "$ob" decisions_per_s)
    [ -n "$x" ] && [ -n "$y" ] || { echo "ab_lib.sh: no scenario $S in lib_bench's output" >&2; exit 1; }
    da+=("$x") db+=("$y") pa+=("$(metric "$oa" p99_ns)") pb+=("$(metric "$ob" p99_ns)")
    ratio+=("$(awk -v a="$x" -v b="$y" 'BEGIN {printf "%.4f", b / a}')")
    awk -v a="$x" -v b="$y" 'BEGIN {exit !(b > a)}' && faster=$((faster + 1))
    echo "round $i: A $x/s p99 ${pa[-1]} ns | B $y/s p99 ${pb[-1]} ns | B/A ${ratio[-1]}"
done
echo "RESULT name=ab_$S metric=decisions_per_s_A value=$(printf '%s\n' "${da[@]}" | median_of)"
echo "RESULT name=ab_$S metric=decisions_per_s_B value=$(printf '%s\n' "${db[@]}" | median_of)"
echo "RESULT name=ab_$S metric=p99_ns_A value=$(printf '%s\n' "${pa[@]}" | median_of)"
echo "RESULT name=ab_$S metric=p99_ns_B value=$(printf '%s\n' "${pb[@]}" | median_of)"
echo "RESULT name=ab_$S metric=ratio_B_over_A value=$(printf '%s\n' "${ratio[@]}" | median_of)"
echo "RESULT name=ab_$S metric=rounds_B_faster value=$faster"
