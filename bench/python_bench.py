#!/usr/bin/env python3
"""python_bench.py — sluice.RateLimiter against a pure-Python limiter, same load, same run.

    build/python-venv/bin/python bench/python_bench.py [--quick] [--seconds S] [--rounds N]
                                                       [--threads T] [--users U]

The load (the issue's): a ThreadPoolExecutor of T threads (200), each calling
`limiter.is_allowed(user)` in a loop over U users (100; thread i starts at user i mod U and
steps through all of them) until the scenario's time is up. Limiters, each a token bucket per
user of capacity 1,000 refilling 10,000/s (so both the allow and the deny path run):

  sluice          sluice.RateLimiter, GIL held during the decision (the default)
  sluice_nogil    sluice.RateLimiter(release_gil=True): the GIL released around each decision
  dict_locks      the straightforward pure-Python limiter: a dict of buckets, one
                  threading.Lock per bucket plus one for inserting, time.monotonic(), floats

Each round runs every limiter once (the order rotates each round, so the machine's noise hits
all of them); the result is the median over rounds. Printed:

  RESULT name=<limiter> metric=decisions_per_s value=...   (decisions of all threads / wall s)
  RESULT name=<limiter> metric=allowed_fraction value=...
  RESULT name=ratio_sluice_vs_dict_locks metric=ratio value=...         (per round, median)
  RESULT name=ratio_sluice_nogil_vs_sluice metric=ratio value=...

Every run checks its results: no user was admitted more than capacity + rate * elapsed (the
token bucket's bound), for every limiter, and the sluice limiters' own counters agree with the
harness's. A failed check exits 1; a slow run never does. --quick (what ctest runs): 0.2 s
per scenario, one round.
"""
import argparse
import concurrent.futures
import os
import statistics
import sys
import threading
import time

CAPACITY = 1000
RATE = 10000.0


class DictLocksLimiter:
    """The pure-Python peer: what a Python service writes without a library."""

    class Bucket:
        __slots__ = ("tokens", "last", "lock")

        def __init__(self, capacity, now):
            self.tokens = float(capacity)
            self.last = now
            self.lock = threading.Lock()

    def __init__(self, capacity, refill_rate):
        self.capacity = capacity
        self.rate = refill_rate
        self.buckets = {}
        self.lock = threading.Lock()

    def is_allowed(self, user_id):
        b = self.buckets.get(user_id)
        if b is None:
            with self.lock:
                b = self.buckets.get(user_id)
                if b is None:
                    b = self.buckets[user_id] = self.Bucket(self.capacity, time.monotonic())
        with b.lock:
            now = time.monotonic()
            if now > b.last:
                b.tokens = min(self.capacity, b.tokens + (now - b.last) * self.rate)
                b.last = now
            if b.tokens >= 1.0:
                b.tokens -= 1.0
                return True
            return False


def make(name):
    if name == "dict_locks":
        return DictLocksLimiter(CAPACITY, RATE)
    import sluice
    return sluice.RateLimiter(capacity=CAPACITY, refill_rate=RATE,
                              release_gil=(name == "sluice_nogil"))


def run_load(limiter, threads, users, seconds):
    """Returns (decisions, allowed, wall seconds, per-user allowed counts)."""
    ids = ["user:%d" % i for i in range(users)]
    start = threading.Barrier(threads + 1)
    is_allowed = limiter.is_allowed
    state = {"stop": False}

    def worker(i):
        mine = ids[i % users:] + ids[:i % users]
        per = [0] * users
        n = 0
        start.wait()
        while not state["stop"]:
            for j, u in enumerate(mine):
                if is_allowed(u):
                    per[j] += 1
            n += users
        # back to user order
        k = i % users
        return n, per[users - k:] + per[:users - k]

    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as ex:
        futs = [ex.submit(worker, i) for i in range(threads)]
        start.wait()
        t0 = time.monotonic()
        time.sleep(seconds)
        state["stop"] = True
        res = [f.result() for f in futs]
        wall = time.monotonic() - t0
    decisions = sum(r[0] for r in res)
    per_user = [sum(r[1][u] for r in res) for u in range(users)]
    return decisions, sum(per_user), wall, per_user


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="0.2 s per scenario, one round")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=200)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--only", help="comma-separated limiters (sluice,sluice_nogil,dict_locks)")
    a = ap.parse_args()
    if a.quick:
        a.seconds, a.rounds = 0.2, 1
    names = ["sluice", "sluice_nogil", "dict_locks"]
    if a.only:
        names = a.only.split(",")
    import sluice
    print("# python_bench: %s, Python %s, sluice %s, %d CPUs, %d threads x %d users, "
          "%.1f s x %d rounds, token bucket %d refilling %g/s per user"
          % (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), sys.version.split()[0],
             sluice.__version__, os.cpu_count(), a.threads, a.users, a.seconds, a.rounds,
             CAPACITY, RATE), flush=True)
    dps = {n: [] for n in names}
    frac = {n: [] for n in names}
    ok = True
    for r in range(a.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            lim = make(n)
            t_begin = time.monotonic()
            dec, allowed, wall, per_user = run_load(lim, a.threads, a.users, a.seconds)
            elapsed = time.monotonic() - t_begin  # from the limiter's creation: the bound's T
            bound = CAPACITY + RATE * elapsed
            worst = max(per_user)
            if worst > bound:
                print("# FAILED: %s admitted %d for one user, bound %.0f" % (n, worst, bound))
                ok = False
            if n != "dict_locks":
                st = lim.stats()
                if st["allowed"] != allowed or st["allowed"] + st["denied"] != dec:
                    print("# FAILED: %s counters %s, harness %d allowed of %d" % (n, st, allowed, dec))
                    ok = False
            dps[n].append(dec / wall)
            frac[n].append(allowed / dec if dec else 0.0)
            print("# round %d %-13s %11.0f decisions/s  allowed %.3f  max/user %d (bound %.0f)"
                  % (r + 1, n, dec / wall, allowed / max(dec, 1), worst, bound), flush=True)
    for n in names:
        print("RESULT name=python_%s metric=decisions_per_s value=%.0f" % (n, statistics.median(dps[n])))
        print("RESULT name=python_%s metric=allowed_fraction value=%.4f" % (n, statistics.median(frac[n])))
    for x, y in (("sluice", "dict_locks"), ("sluice_nogil", "sluice"), ("sluice_nogil", "dict_locks")):
        if x in dps and y in dps:
            ratio = statistics.median(dps[x][i] / dps[y][i] for i in range(a.rounds))
            print("RESULT name=ratio_python_%s_vs_%s metric=ratio value=%.3f" % (x, y, ratio))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
