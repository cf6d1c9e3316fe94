#!/usr/bin/env bash
# Install the Debian packages sluice needs to build, test and benchmark. Idempotent and silent
# when everything is already present. Run as root (or with sudo available).
set -euo pipefail

PKGS=(
  build-essential cmake pkg-config          # toolchain
  libxxhash-dev                             # hashing (src/store)
  libcmocka-dev                             # unit tests
  libuv1-dev libjansson-dev node-llhttp     # sluiced: event loops, JSON, HTTP parser sources
  libhiredis-dev                            # the Redis store (library and sluiced)
  redis-server redis-tools python3-redis    # integration tests: real Redis, redis-cli,
  nodejs node-redis curl                    #   redis-benchmark, redis-py, npm redis, curl
  prometheus                                # integration tests: promtool check metrics
  wrk nginx                                 # bench/server_bench.sh: HTTP load, nginx peer
  golang-go golang-golang-x-time-dev        # bench: the Go x/time/rate peer
  valgrind                                  # bench: instruction counts
  python3-dev python3-setuptools            # bindings/python: the extension, built offline
  python3-wheel python3-venv                #   into a venv (build/python-venv)
  clang libclang-rt-14-dev                  # make fuzz: clang and its libFuzzer runtime
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "install-deps: installing ${missing[*]}" >&2
SUDO=
[ "$(id -u)" -ne 0 ] && SUDO=sudo
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
