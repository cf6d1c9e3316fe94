"""Reference counting: a million calls leak nothing. sys.gettotalrefcount exists only in
debug builds of CPython, so this looks from three sides: the reference counts of the
arguments and of returned objects (sys.getrefcount), Python-allocator memory (tracemalloc)
and the process's resident memory (/proc/self/statm) over a million calls."""
import gc
import os
import sys
import tracemalloc
import unittest

import sluice

S = sluice.SECOND
T0 = 36000 * S
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def workload(lim, keys, n):
    """n calls spread over every entry point, the error paths included."""
    pol = {"algorithm": "fixed_window", "limit": 5, "window": 60}
    for i in range(n // 10):
        k = keys[i % len(keys)]
        now = T0 + i
        lim.take(k, 1, now=now)
        lim.is_allowed(k, now=now)
        lim.allow_request(k, 2, now=now)
        lim.get_remaining_tokens(k, now=now)
        lim.get_burst_allowance(k, now=now)
        lim.get_rate_limit_headers(k, now=now)
        lim.take(k, now=now).headers()
        try:
            lim.is_allowed("", now=now)
        except ValueError:
            pass
        try:
            lim.is_allowed(5)
        except TypeError:
            pass
        if i % 8 == 0:
            lim.set_rule("action", ("t", "a"), pol)
            lim.get_rule("action", ("t", "a"))
            lim.list_rules()
            try:
                lim.set_rule("action", ("t", "a"), {"limit": 0})
            except ValueError:
                pass
        else:
            lim.peek(k, now=now)


class NoLeaks(unittest.TestCase):
    def test_argument_and_result_refcounts(self):
        lim = sluice.RateLimiter(capacity=10)
        key = "user:%d" % 12345  # not interned: only our references
        tup = ("tenant-x", "action-y", key)
        now = T0 + 12345678901  # a big int, not cached
        before = [sys.getrefcount(o) for o in (lim, key, tup, now)]
        for _ in range(10000):
            d = lim.take(tup, now=now)
            lim.is_allowed(key, now=now)
            lim.get_rate_limit_headers(key, now=now)
        self.assertEqual([sys.getrefcount(o) for o in (lim, key, tup, now)], before)
        self.assertEqual(sys.getrefcount(d), 2)  # d and getrefcount's argument
        h = lim.get_rate_limit_headers(key, now=now)
        self.assertEqual(sys.getrefcount(h), 2)
        self.assertIn("Retry-After", h)
        for v in h.values():
            if len(v) > 1:  # one-character strings are CPython's shared singletons
                self.assertEqual(sys.getrefcount(v), 3)  # the dict, v, getrefcount's argument
        pol = lim.get_default()
        self.assertEqual(sys.getrefcount(pol), 2)
        rules = lim.list_rules()
        self.assertEqual(sys.getrefcount(rules), 2)
        clock_calls = []

        def clock():
            clock_calls.append(1)
            return T0
        c = sluice.RateLimiter(clock=clock)
        base = sys.getrefcount(clock)
        for _ in range(1000):
            c.is_allowed("u")
        self.assertEqual(sys.getrefcount(clock), base)
        self.assertEqual(len(clock_calls), 1000)
        del c
        gc.collect()
        self.assertEqual(sys.getrefcount(clock), base - 1)  # the limiter let go of it

    def test_million_calls_tracemalloc_and_rss(self):
        lim = sluice.RateLimiter(capacity=5)
        keys = ["user:%d" % i for i in range(100)]
        tracemalloc.start()
        workload(lim, keys, 100000)  # warm up, traced: keys, caches, free lists
        gc.collect()
        snap = tracemalloc.take_snapshot()
        traced0 = tracemalloc.get_traced_memory()[0]
        workload(lim, keys, 100000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - traced0
        stats = tracemalloc.take_snapshot().compare_to(snap, "lineno")
        tracemalloc.stop()
        self.assertLess(grown, 16 * 1024, "\n".join(map(str, stats[:5])))
        r0 = rss()
        workload(lim, keys, 1000000)
        gc.collect()
        grown = rss() - r0
        self.assertLess(grown, 1 << 20, "RSS grew %d bytes over a million calls" % grown)

    def test_limiters_are_freed(self):
        r0 = None
        for i in range(3000):
            lim = sluice.RateLimiter(capacity=5, clock=lambda: T0)
            for k in range(20):
                lim.is_allowed("k%d" % k)
            del lim
            if i == 500:
                gc.collect()
                r0 = rss()
        gc.collect()
        self.assertLess(rss() - r0, 4 << 20)


if __name__ == "__main__":
    unittest.main()
