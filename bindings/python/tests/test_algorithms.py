"""Each algorithm's contract through Python, with explicit timestamps (now=, integer ns) or
an injected clock: exact allow/deny sequences, remaining, retry_after. No sleeps."""
import unittest

import sluice

S = sluice.SECOND
T0 = 36000 * S  # a multiple of every window below (10 s, 60 s), so windows start at T0


class FakeClock:
    """A clock for RateLimiter(clock=...): integer ns, moved by hand."""

    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t

    def advance(self, seconds):
        self.t += int(seconds * S)


class TokenBucket(unittest.TestCase):
    def test_defaults_are_5_per_second(self):
        clk = FakeClock()
        lim = sluice.RateLimiter(clock=clk)
        self.assertEqual(lim.get_default(),
                         {"algorithm": "token_bucket", "limit": 5, "rate": 1.0})
        self.assertEqual([lim.is_allowed("u") for _ in range(6)], [True] * 5 + [False])
        clk.advance(0.5)
        self.assertFalse(lim.is_allowed("u"))
        self.assertAlmostEqual(lim.get_remaining_tokens("u"), 0.5, places=9)
        clk.advance(0.5)
        self.assertTrue(lim.is_allowed("u"))
        self.assertFalse(lim.is_allowed("u"))

    def test_decision_fields(self):
        lim = sluice.RateLimiter(capacity=5, refill_rate=1.0)
        for want in (4, 3, 2, 1, 0):
            d = lim.take("u", now=T0)
            self.assertTrue(d.allowed)
            self.assertEqual((d.limit, d.remaining, d.retry_after), (5, want, 0.0))
        self.assertEqual(d.reset_after_ns, 5 * S)
        d = lim.take("u", now=T0)
        self.assertFalse(d.allowed)
        self.assertFalse(d)
        self.assertEqual((d.remaining, d.retry_after_ns, d.reset_after_ns), (0, S, 5 * S))
        self.assertEqual((d.retry_after, d.reset_after), (1.0, 5.0))
        self.assertEqual(d.algorithm, "token_bucket")
        d = lim.take("u", now=T0 + S // 4)
        self.assertEqual(d.retry_after_ns, 3 * S // 4)
        self.assertAlmostEqual(d.tokens, 0.25)

    def test_cost_and_peek(self):
        lim = sluice.RateLimiter(capacity=10, refill_rate=2.0)
        self.assertTrue(lim.allow_request("u", 7, now=T0))
        self.assertFalse(lim.allow_request("u", tokens=4, now=T0))  # denied: nothing taken
        self.assertEqual(lim.get_remaining_tokens("u", now=T0), 3.0)
        d = lim.take("u", cost=4, now=T0)
        self.assertEqual(d.retry_after_ns, S // 2)  # one unit at 2/s
        self.assertTrue(lim.take("u", cost=0, now=T0).allowed)  # cost 0 is a peek
        p = lim.peek("u", now=T0)
        self.assertTrue(p.allowed)
        self.assertEqual(lim.get_remaining_tokens("u", now=T0), 3.0)  # peek took nothing
        self.assertTrue(lim.allow_request("u", 3, now=T0))
        self.assertEqual(lim.get_remaining_tokens("u", now=T0), 0.0)

    def test_admitted_never_exceeds_c_plus_rt(self):
        lim = sluice.RateLimiter(capacity=5, refill_rate=10.0)
        admitted = sum(lim.is_allowed("u", now=T0 + i * S // 100) for i in range(300))
        # 3 s at 10/s plus the first 5; requests every 10 ms always find demand
        self.assertEqual(admitted, 5 + 10 * 299 // 100 + 0)

    def test_time_going_backwards_neither_refills_nor_drains(self):
        lim = sluice.RateLimiter(capacity=2, refill_rate=1.0)
        self.assertTrue(lim.is_allowed("u", now=T0 + 10 * S))
        self.assertTrue(lim.is_allowed("u", now=T0 + 10 * S))
        self.assertFalse(lim.is_allowed("u", now=T0))  # earlier: zero elapsed
        self.assertEqual(lim.take("u", now=T0).retry_after_ns, S)

    def test_new_key_is_full_and_peek_creates_nothing(self):
        lim = sluice.RateLimiter(capacity=3, refill_rate=1.0)
        self.assertEqual(lim.get_remaining_tokens("nobody", now=T0), 3.0)
        self.assertEqual(lim.stats()["keys"], 0)


class LeakyBucket(unittest.TestCase):
    def test_shaping_delays(self):
        lim = sluice.RateLimiter(algorithm="leaky_bucket", capacity=3, leak_rate=1.0)
        delays = [lim.take("u", now=T0).delay_ns for _ in range(3)]
        self.assertEqual(delays, [0, S, 2 * S])
        d = lim.take("u", now=T0)
        self.assertFalse(d.allowed)
        self.assertEqual((d.retry_after_ns, d.reset_after_ns), (S, 3 * S))
        d = lim.take("u", now=T0 + S)  # one left the queue
        self.assertTrue(d.allowed)
        self.assertEqual(d.delay, 2.0)

    def test_refill_rate_is_the_leak_rate(self):
        lim = sluice.RateLimiter(algorithm="leaky_bucket", capacity=1, refill_rate=4)
        self.assertTrue(lim.is_allowed("u", now=T0))
        self.assertFalse(lim.is_allowed("u", now=T0 + S // 8))
        self.assertTrue(lim.is_allowed("u", now=T0 + S // 4))


class FixedWindow(unittest.TestCase):
    def test_limit_per_aligned_window(self):
        lim = sluice.RateLimiter(algorithm="fixed_window", limit=3, window=10)
        got = [lim.is_allowed("u", now=T0 + S) for _ in range(4)]
        self.assertEqual(got, [True, True, True, False])
        d = lim.take("u", now=T0 + 2 * S)
        self.assertEqual((d.allowed, d.retry_after_ns, d.remaining), (False, 8 * S, 0))
        self.assertTrue(lim.is_allowed("u", now=T0 + 10 * S))  # the next window

    def test_capacity_is_the_limit(self):
        lim = sluice.RateLimiter(capacity=2, algorithm="fixed_window", window=1)
        self.assertEqual(sum(lim.is_allowed("u", now=T0) for _ in range(5)), 2)


class SlidingWindow(unittest.TestCase):
    def test_weighted_previous_window(self):
        lim = sluice.RateLimiter(algorithm="sliding_window", limit=10, window=10)
        self.assertEqual(sum(lim.is_allowed("u", now=T0 + i * S // 10) for i in range(12)), 10)
        # 2.5 s into the next window the previous 10 weigh 7.5: two more fit
        t = T0 + 12 * S + S // 2
        got = [lim.take("u", now=t) for _ in range(3)]
        self.assertEqual([d.allowed for d in got], [True, True, False])
        self.assertEqual(got[1].remaining, 0)
        self.assertEqual(got[2].retry_after_ns, S // 2)  # at 3 s the weight is 7
        self.assertTrue(lim.is_allowed("u", now=t + S // 2))


class SlidingLog(unittest.TestCase):
    def test_exact_in_every_interval(self):
        lim = sluice.RateLimiter(algorithm="sliding_log", limit=3, window=10)
        for i in range(3):
            self.assertTrue(lim.is_allowed("u", now=T0 + i * S))
        d = lim.take("u", now=T0 + 3 * S)
        self.assertEqual((d.allowed, d.retry_after_ns), (False, 7 * S))
        self.assertFalse(lim.is_allowed("u", now=T0 + 10 * S - 1))
        self.assertTrue(lim.is_allowed("u", now=T0 + 10 * S))  # T0 left (t-W, t]
        self.assertFalse(lim.is_allowed("u", now=T0 + 10 * S))


class BurstReserve(unittest.TestCase):
    def make(self):
        return sluice.RateLimiter(algorithm="burst_reserve", base_rate=50, reserve_rate=1.0,
                                  reserve_cap=100)

    def test_parameters_map_to_the_c_policy(self):
        self.assertEqual(self.make().get_default(),
                         {"algorithm": "burst_reserve", "limit": 50, "rate": 1.0,
                          "reserve_cap": 100})
        self.assertEqual(sluice.RateLimiter(algorithm="burst_reserve").get_default(),
                         self.make().get_default())  # the defaults are 50, 1/s, 100

    def test_reserve_starts_empty_and_grows_one_per_second(self):
        lim = self.make()
        self.assertEqual(sum(lim.is_allowed("u", now=T0) for _ in range(60)), 50)
        self.assertEqual(lim.get_burst_allowance("u", now=T0), 0.0)
        self.assertEqual(lim.get_burst_allowance("u", now=T0 + 10 * S), 10.0)
        self.assertEqual(lim.get_burst_allowance("u", now=T0 + 10 * S + S // 2), 10.5)
        # the base (refilled to 50) first, then the reserve
        self.assertEqual(sum(lim.is_allowed("u", now=T0 + 10 * S) for _ in range(70)), 60)
        self.assertEqual(lim.get_burst_allowance("u", now=T0 + 10 * S), 0.0)

    def test_reserve_is_capped(self):
        lim = self.make()
        self.assertTrue(lim.is_allowed("u", now=T0))
        self.assertEqual(lim.get_burst_allowance("u", now=T0 + 500 * S), 100.0)
        d = lim.take("u", now=T0 + 500 * S)
        self.assertEqual((d.reserve, d.remaining), (100.0, 149))

    def test_reserve_drawn_only_when_base_exhausted(self):
        lim = self.make()
        self.assertTrue(lim.is_allowed("u", now=T0))
        self.assertEqual(lim.get_burst_allowance("u", now=T0 + 20 * S), 20.0)
        for _ in range(50):
            self.assertTrue(lim.is_allowed("u", now=T0 + 20 * S))
        self.assertEqual(lim.get_burst_allowance("u", now=T0 + 20 * S), 20.0)
        self.assertTrue(lim.is_allowed("u", now=T0 + 20 * S))
        self.assertEqual(lim.get_burst_allowance("u", now=T0 + 20 * S), 19.0)

    def test_other_algorithms_have_no_reserve(self):
        self.assertEqual(sluice.RateLimiter().get_burst_allowance("u", now=T0), 0.0)


class Concurrency(unittest.TestCase):
    def test_leases(self):
        lim = sluice.RateLimiter(algorithm="concurrency", max_in_flight=2, lease_ttl=30)
        a, b = lim.take("u", now=T0), lim.take("u", now=T0)
        self.assertTrue(a.allowed and b.allowed)
        self.assertNotEqual(a.lease, b.lease)
        d = lim.take("u", now=T0)
        self.assertEqual((d.allowed, d.lease, d.retry_after_ns), (False, 0, 30 * S))
        self.assertTrue(lim.release("u", a.lease, now=T0 + S))
        self.assertFalse(lim.release("u", a.lease, now=T0 + S))  # already released
        self.assertTrue(lim.is_allowed("u", now=T0 + S))
        self.assertFalse(lim.is_allowed("u", now=T0 + S))
        self.assertTrue(lim.is_allowed("u", now=T0 + 30 * S))  # b expired


class StackedAndRules(unittest.TestCase):
    def test_stacked_limits_consumed_together(self):
        lim = sluice.RateLimiter(policy=[
            {"algorithm": "token_bucket", "capacity": 10, "refill_rate": 10},
            {"algorithm": "fixed_window", "limit": 12, "window": 60}])
        self.assertEqual(sum(lim.is_allowed("u", now=T0) for _ in range(20)), 10)
        d = lim.take("u", now=T0 + S)  # the bucket is full again; the window has 2 left
        self.assertEqual((d.allowed, d.remaining, d.algorithm, d.limit_index),
                         (True, 1, "fixed_window", 1))
        self.assertTrue(lim.is_allowed("u", now=T0 + S))
        d = lim.take("u", now=T0 + S)
        self.assertEqual((d.allowed, d.algorithm, d.retry_after_ns), (False, "fixed_window", 59 * S))

    def test_resolution_most_specific_first(self):
        lim = sluice.RateLimiter(capacity=1, refill_rate=1)
        lim.set_rule("tenant", "acme", {"capacity": 2, "rate": 1})
        lim.set_rule("action", ("acme", "login"), {"capacity": 3, "rate": 1})
        lim.set_rule("client", ("acme", "login", "vip"), {"capacity": 4, "rate": 1})
        lim.set_tier("gold", {"capacity": 5, "rate": 1})
        lim.assign_tier(("other", "alice"), "gold")

        def burst(key):
            return sum(lim.is_allowed(key, now=T0) for _ in range(10))

        self.assertEqual(burst("x"), 1)                              # global default
        self.assertEqual(burst(("acme", "search", "x")), 2)         # tenant default
        self.assertEqual(burst(("acme", "login", "x")), 3)          # tenant + action
        self.assertEqual(burst(("acme", "login", "vip")), 4)        # client override
        self.assertEqual(burst(("other", "any", "alice")), 5)       # tier
        self.assertEqual(burst(("other", "any", "bob")), 1)
        lim.assign_tier(("other", "alice"), None)
        self.assertEqual(burst(("other", "any", "alice")), 0)  # back to 1, already used

    def test_policy_change_carries_tokens_over(self):
        lim = sluice.RateLimiter(capacity=10, refill_rate=1)
        for _ in range(4):
            lim.is_allowed("u", now=T0)
        lim.set_default({"capacity": 20, "rate": 1})
        self.assertEqual(lim.get_remaining_tokens("u", now=T0), 6.0)
        lim.set_default({"capacity": 3, "rate": 1})
        self.assertEqual(lim.get_remaining_tokens("u", now=T0), 3.0)


class InjectedClock(unittest.TestCase):
    def test_clock_callable_and_now_override(self):
        clk = FakeClock()
        lim = sluice.RateLimiter(capacity=1, refill_rate=1, clock=clk)
        self.assertEqual(lim.now(), T0)
        self.assertTrue(lim.is_allowed("u"))
        self.assertFalse(lim.is_allowed("u"))
        self.assertTrue(lim.is_allowed("u", now=T0 + S))  # now= wins over the clock
        clk.advance(2)
        self.assertTrue(lim.is_allowed("u"))

    def test_bad_clock_values(self):
        lim = sluice.RateLimiter(clock=lambda: 1.5)
        with self.assertRaises(TypeError):
            lim.is_allowed("u")
        lim = sluice.RateLimiter(clock=lambda: -1)
        with self.assertRaises(ValueError):
            lim.is_allowed("u")

        def boom():
            raise RuntimeError("clock broke")
        with self.assertRaisesRegex(RuntimeError, "clock broke"):
            sluice.RateLimiter(clock=boom).is_allowed("u")

    def test_library_clock_moves(self):
        lim = sluice.RateLimiter()
        a = lim.now()
        self.assertGreater(a, 0)
        self.assertGreaterEqual(lim.now(), a)


if __name__ == "__main__":
    unittest.main()
