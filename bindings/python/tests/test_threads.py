"""200 threads x 100 users through ThreadPoolExecutor(200) for a few seconds: no user is
admitted more than its token bucket allows, and no token is lost (what was admitted plus
what is left equals what the bucket earned). Run with the GIL held around decisions (the
default) and released (release_gil=True: the library itself runs concurrently)."""
import concurrent.futures
import threading
import time
import unittest

import sluice

THREADS = 200
USERS = 100
CAPACITY = 1000     # 10 s of refill, generous: the bucket can never sit full while a thread is descheduled
RATE = 100.0        # per user per second: far below the demand (>= 1,000/s per user)


def hammer(lim, seconds):
    """Every user's bucket is emptied at t0; then THREADS threads sweep all users, each sweep
    with one timestamp (time.monotonic_ns(), passed as now=) until `seconds` have passed.
    Returns (t0, the latest timestamp used, per-user admitted counts, decisions)."""
    ids = ["user:%d" % i for i in range(USERS)]
    t0 = time.monotonic_ns()
    for u in ids:  # creates every key at t0 and empties it: all later timestamps are >= t0
        assert lim.allow_request(u, CAPACITY, now=t0)
    barrier = threading.Barrier(THREADS + 1)
    stop = threading.Event()

    def worker(i):
        mine = ids[i:] + ids[:i] if i < USERS else ids
        got = dict.fromkeys(mine, 0)
        is_allowed = lim.is_allowed
        last = n = 0
        barrier.wait()
        while not stop.is_set():
            now = time.monotonic_ns()
            for u in mine:
                if is_allowed(u, now=now):
                    got[u] += 1
            last = now
            n += USERS
        return got, last, n

    with concurrent.futures.ThreadPoolExecutor(max_workers=THREADS) as ex:
        futs = [ex.submit(worker, i % USERS) for i in range(THREADS)]
        barrier.wait()
        time.sleep(seconds)
        stop.set()
        results = [f.result(timeout=60) for f in futs]
    admitted = {u: sum(r[0][u] for r in results) for u in ids}
    return t0, max(r[1] for r in results), admitted, sum(r[2] for r in results)


class ManyThreads(unittest.TestCase):
    def check(self, release_gil, seconds):
        lim = sluice.RateLimiter(capacity=CAPACITY, refill_rate=RATE, release_gil=release_gil)
        t0, last, admitted, decisions = hammer(lim, seconds)
        earned = RATE * (last - t0) / 1e9  # every key was emptied at t0
        self.assertGreater(decisions, 3 * sum(admitted.values()))  # demand >> supply
        for u, n in admitted.items():
            left = lim.get_remaining_tokens(u, now=last)
            # no over-admission: at most C + r*T in all (C of them taken at t0)
            self.assertLessEqual(n, earned, u)
            # no lost tokens: admitted + what is left = what the bucket earned
            self.assertAlmostEqual(n + left, earned, delta=1e-3, msg=u)
            self.assertLess(left, 10.0)  # the demand kept every bucket (nearly) empty
        st = lim.stats()
        self.assertEqual(st["allowed"], sum(admitted.values()) + USERS)
        self.assertEqual(st["allowed"] + st["denied"], decisions + USERS)
        return decisions

    def test_gil_held(self):
        self.check(release_gil=False, seconds=3.0)

    def test_gil_released(self):
        self.check(release_gil=True, seconds=2.0)


if __name__ == "__main__":
    unittest.main()
