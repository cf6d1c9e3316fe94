"""The interface: keys, invalid input (ValueError / TypeError), rules and tiers, headers
(compared with a real sluiced when one is built), snapshots."""
import http.client
import json
import os
import socket
import subprocess
import tempfile
import time
import unittest

import sluice

S = sluice.SECOND
T0 = 36000 * S
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


class Keys(unittest.TestCase):
    def test_str_bytes_and_tuples(self):
        lim = sluice.RateLimiter(capacity=1, refill_rate=1)
        self.assertTrue(lim.is_allowed("alice", now=T0))
        self.assertFalse(lim.is_allowed(b"alice", now=T0))  # same bytes, same key
        self.assertFalse(lim.is_allowed(("", "", "alice"), now=T0))  # "" is the default
        self.assertFalse(lim.is_allowed((None, "default", "alice"), now=T0))
        self.assertTrue(lim.is_allowed(("acme", "", "alice"), now=T0))
        self.assertTrue(lim.is_allowed(("acme", "login", "alice"), now=T0))
        self.assertTrue(lim.is_allowed("al\x00ice", now=T0))  # NUL is an ordinary byte
        self.assertTrue(lim.is_allowed("žluťoučký", now=T0))
        self.assertTrue(lim.is_allowed(b"\xff\xfe", now=T0))

    def test_empty_or_none_id_is_value_error(self):
        lim = sluice.RateLimiter()
        for bad in ("", b"", None, ("t", "a", ""), ("t", "a", None)):
            for call in (lim.is_allowed, lim.allow_request, lim.get_remaining_tokens,
                         lim.get_burst_allowance, lim.get_rate_limit_headers, lim.take,
                         lim.peek):
                with self.assertRaises(ValueError, msg="%r %r" % (call, bad)) as cm:
                    call(bad)
                self.assertRegex(str(cm.exception), "empty|None")
        with self.assertRaisesRegex(ValueError, "longer than 255"):
            lim.is_allowed("x" * 256)
        self.assertTrue(lim.is_allowed("x" * 255))
        with self.assertRaisesRegex(ValueError, "longer than 255"):
            lim.is_allowed(("t" * 256, "a", "c"))
        with self.assertRaisesRegex(ValueError, r"\(tenant, action, client\)"):
            lim.is_allowed(("t", "c"))

    def test_wrong_types_are_type_error(self):
        lim = sluice.RateLimiter()
        for bad in (42, 1.5, ["a"], {"a": 1}, object(), bytearray(b"a"), ("t", "a", 5),
                    (1, "a", "c")):
            with self.assertRaises(TypeError, msg=repr(bad)):
                lim.is_allowed(bad)
        with self.assertRaises(TypeError):
            lim.allow_request("u", 1.0)
        with self.assertRaises(TypeError):
            lim.allow_request("u", "1")
        with self.assertRaises(TypeError):
            lim.take("u", now=1.5)
        with self.assertRaises(TypeError):
            lim.take()
        with self.assertRaises(TypeError):
            lim.take("u", 1, 2)
        with self.assertRaises(TypeError):
            lim.take("u", bogus=1)
        with self.assertRaises(TypeError):
            lim.take("u", 1, cost=1)

    def test_bad_costs_and_times(self):
        lim = sluice.RateLimiter(capacity=5)
        with self.assertRaisesRegex(ValueError, ">= 0"):
            lim.allow_request("u", -1)
        with self.assertRaisesRegex(ValueError, "exceeds the capacity"):
            lim.allow_request("u", 6)
        with self.assertRaises(ValueError):
            lim.allow_request("u", 2 ** 70)
        with self.assertRaises(ValueError):
            lim.take("u", now=-5)
        with self.assertRaises(ValueError):
            lim.take("u", now=2 ** 62)
        self.assertEqual(lim.stats()["keys"], 0)  # a failed call changes nothing


class Configuration(unittest.TestCase):
    def test_invalid_configuration_is_value_error(self):
        cases = [
            dict(capacity=0), dict(capacity=1.5), dict(capacity=2e9), dict(refill_rate=0),
            dict(refill_rate=-1), dict(refill_rate=float("nan")), dict(refill_rate=float("inf")),
            dict(algorithm="nope"), dict(algorithm="fixed_window"),  # no window
            dict(algorithm="fixed_window", window=0), dict(algorithm="sliding_log", window=1e9),
            dict(algorithm="sliding_log", limit=200000, window=1),
            dict(window=5),  # token buckets have no window
            dict(algorithm="fixed_window", window=1, refill_rate=3),
            dict(capacity=3, limit=3), dict(max_keys=0), dict(max_keys=-3), dict(shards=3),
            dict(algorithm="burst_reserve", reserve_cap=0.5),
            dict(policy=[]), dict(policy=[{}] * 5), dict(policy={"algorithm": "x"}),
            dict(policy={"capacity": 1, "bogus": 2}),
        ]
        for kw in cases:
            with self.assertRaises(ValueError, msg=repr(kw)):
                sluice.RateLimiter(**kw)

    def test_wrong_types_in_configuration_are_type_error(self):
        cases = [
            dict(capacity="5"), dict(refill_rate=None, capacity=[1]), dict(algorithm=1),
            dict(max_keys=1.5), dict(clock=5), dict(policy="token_bucket"), dict(policy=[5]),
            dict(bogus=1), dict(policy={"capacity": 1}, capacity=3),
        ]
        for kw in cases:
            with self.assertRaises(TypeError, msg=repr(kw)):
                sluice.RateLimiter(**kw)
        with self.assertRaises(TypeError):
            sluice.RateLimiter(1, 2, "token_bucket", None, 5)
        with self.assertRaises(TypeError):
            sluice.RateLimiter(3, capacity=3)

    def test_messages_name_the_problem(self):
        with self.assertRaisesRegex(ValueError, "capacity/limit must be .* \\(SL_ECAPACITY\\)"):
            sluice.RateLimiter(capacity=0)
        with self.assertRaisesRegex(ValueError, "rate must be"):
            sluice.RateLimiter(refill_rate=0)
        with self.assertRaisesRegex(ValueError, "fixed_window needs window"):
            sluice.RateLimiter(algorithm="fixed_window")
        with self.assertRaisesRegex(ValueError, "'window' does not apply to token_bucket"):
            sluice.RateLimiter(window=1)

    def test_positional_and_every_algorithm_by_name(self):
        self.assertEqual(sluice.RateLimiter(7, 0.5).get_default(),
                         {"algorithm": "token_bucket", "limit": 7, "rate": 0.5})
        self.assertEqual(sluice.RateLimiter(algorithm=None, window=None).get_default(),
                         {"algorithm": "token_bucket", "limit": 5, "rate": 1.0})  # None: not given
        expect = {
            "token_bucket": dict(capacity=3, refill_rate=2),
            "leaky_bucket": dict(capacity=3, leak_rate=2),
            "fixed_window": dict(limit=3, window=60),
            "sliding_window": dict(limit=3, window=60),
            "sliding_log": dict(limit=3, window=60),
            "burst_reserve": dict(base_rate=3, reserve_rate=2, reserve_cap=10),
            "concurrency": dict(max_in_flight=3, lease_ttl=60),
        }
        self.assertEqual(set(expect), set(sluice.ALGORITHMS))
        for alg, kw in expect.items():
            lim = sluice.RateLimiter(algorithm=alg, **kw)
            pol = lim.get_default()
            self.assertEqual((pol["algorithm"], pol["limit"]), (alg, 3))
            self.assertEqual(lim.take("u", now=T0).limit, 3)
            # the policy read back is accepted as it is
            self.assertEqual(sluice.RateLimiter(policy=pol).get_default(), pol)

    def test_max_keys_evicts(self):
        lim = sluice.RateLimiter(max_keys=100, shards=1)
        for i in range(1000):
            lim.is_allowed("u%d" % i, now=T0)
        st = lim.stats()
        self.assertLessEqual(st["keys"], 100)
        self.assertGreater(st["evicted"], 0)


class RulesAndTiers(unittest.TestCase):
    def test_rule_crud(self):
        lim = sluice.RateLimiter()
        pol = {"algorithm": "sliding_window", "limit": 100, "window": 60.0}
        self.assertIsNone(lim.get_rule("action", ("acme", "login")))
        lim.set_rule("action", ("acme", "login"), pol)
        lim.set_rule("tenant", "acme", {"capacity": 10, "refill_rate": 1})
        lim.set_rule("client", ("acme", "login", "bob"),
                     [{"capacity": 1, "rate": 1}, {"algorithm": "fixed_window", "limit": 5, "window": 10}])
        self.assertEqual(lim.get_rule("action", ("acme", "login")), pol)
        self.assertEqual(lim.get_rule("tenant", ("acme",)),
                         {"algorithm": "token_bucket", "limit": 10, "rate": 1.0})
        rules = sorted(lim.list_rules())
        self.assertEqual([r[:2] for r in rules], [("action", ("acme", "login")),
                                                   ("client", ("acme", "login", "bob")),
                                                   ("tenant", ("acme",))])
        self.assertEqual(len(rules[1][2]), 2)
        self.assertTrue(lim.delete_rule("action", ("acme", "login")))
        self.assertFalse(lim.delete_rule("action", ("acme", "login")))
        self.assertEqual(len(lim.list_rules()), 2)

    def test_rule_errors(self):
        lim = sluice.RateLimiter()
        with self.assertRaises(ValueError):
            lim.set_rule("galaxy", "acme", {"capacity": 1})
        with self.assertRaises(TypeError):
            lim.set_rule(1, "acme", {"capacity": 1})
        with self.assertRaises(ValueError):
            lim.set_rule("action", ("acme",), {"capacity": 1})
        with self.assertRaises(TypeError):
            lim.set_rule("action", "acme", {"capacity": 1})
        with self.assertRaises(ValueError):
            lim.set_rule("client", ("acme", "login", ""), {"capacity": 1})
        with self.assertRaises(ValueError):
            lim.set_rule("tenant", "acme", {"capacity": 0})
        with self.assertRaises(ValueError):
            lim.set_rule("tenant", "acme", {"algorithm": "fixed_window", "limit": 1})
        self.assertEqual(lim.list_rules(), [])

    def test_tiers(self):
        lim = sluice.RateLimiter()
        gold = {"algorithm": "token_bucket", "limit": 100, "rate": 10.0}
        lim.set_tier("gold", gold)
        self.assertEqual(lim.get_tier("gold"), gold)
        self.assertIsNone(lim.get_tier("silver"))
        self.assertEqual(lim.list_tiers(), {"gold": gold})
        lim.assign_tier("alice", "gold")  # default tenant
        self.assertEqual(lim.take("alice", now=T0).limit, 100)
        lim.assign_tier(("acme", "bob"), "gold")
        self.assertEqual(lim.take(("acme", "any", "bob"), now=T0).limit, 100)
        with self.assertRaisesRegex(ValueError, "assigned"):
            lim.delete_tier("gold")
        with self.assertRaisesRegex(ValueError, "unknown tier"):
            lim.assign_tier("carol", "silver")
        lim.assign_tier("alice", None)
        lim.assign_tier(("acme", "bob"), None)
        self.assertTrue(lim.delete_tier("gold"))
        self.assertFalse(lim.delete_tier("gold"))
        with self.assertRaises(ValueError):
            lim.set_tier("", gold)
        with self.assertRaises(TypeError):
            lim.set_tier(b"gold", gold)

    def test_default(self):
        lim = sluice.RateLimiter()
        lim.set_default({"algorithm": "fixed_window", "limit": 2, "window": 1})
        self.assertEqual(sum(lim.is_allowed("u", now=T0) for _ in range(5)), 2)
        with self.assertRaises(ValueError):
            lim.set_default({"capacity": -1})


class Headers(unittest.TestCase):
    def test_values(self):
        lim = sluice.RateLimiter(capacity=3, refill_rate=0.05)  # 20 s per unit, full in 60
        d = lim.take("u", now=T0)
        self.assertEqual(d.headers(), {"RateLimit-Policy": '"default";q=3;w=60',
                                       "RateLimit": '"default";r=2;t=20'})
        self.assertEqual(lim.get_rate_limit_headers("u", now=T0), d.headers())
        lim.take("u", cost=2, now=T0)
        d = lim.take("u", now=T0 + S)
        want = {"RateLimit-Policy": '"default";q=3;w=60', "RateLimit": '"default";r=0;t=59',
                "Retry-After": "19"}
        self.assertEqual(d.headers(), want)
        self.assertEqual(lim.get_rate_limit_headers("u", now=T0 + S), want)
        self.assertEqual(lim.get_rate_limit_headers("new", now=T0),
                         {"RateLimit-Policy": '"default";q=3;w=60', "RateLimit": '"default";r=3;t=0'})

    def test_same_as_sluiced(self):
        binary = os.environ.get("SLUICED") or os.path.join(ROOT, "build", "sluiced")
        if not os.access(binary, os.X_OK):
            self.skipTest("no sluiced binary at %s" % binary)
        ports = []
        for _ in range(2):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                ports.append(s.getsockname()[1])
        proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--resp-port", str(ports[0]),
                                 "--http-port", str(ports[1]), "--threads", "1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", ports[1]), timeout=0.5).close()
                    break
                except OSError:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        self.fail("sluiced did not start")
                    time.sleep(0.02)

            def call(method, path, body):
                c = http.client.HTTPConnection("127.0.0.1", ports[1], timeout=5)
                c.request(method, path, json.dumps(body))
                r = c.getresponse()
                r.read()
                c.close()
                return r.status, {k: r.getheader(k) for k in
                                  ("RateLimit-Policy", "RateLimit", "Retry-After") if r.getheader(k)}

            pol = {"capacity": 3, "refill_rate": 0.05}
            self.assertEqual(call("PUT", "/api/config/tenant/acme/action/login", pol)[0], 200)
            lim = sluice.RateLimiter()
            lim.set_rule("action", ("acme", "login"), pol)
            key = ("acme", "login", "10.0.0.7")
            req = {"tenant_id": "acme", "client_id": "10.0.0.7", "action_type": "login"}
            for cost in (1, 2, 1):
                status, hdrs = call("POST", "/api/check_and_consume", dict(req, cost=cost))
                d = lim.take(key, cost)
                self.assertEqual(status, 200 if d.allowed else 429)
                self.assertEqual(hdrs, d.headers())
            self.assertEqual(status, 429)
            self.assertEqual(hdrs, lim.get_rate_limit_headers(key))
        finally:
            proc.terminate()
            proc.wait(10)


class Objects(unittest.TestCase):
    def test_decision_is_read_only_and_printable(self):
        d = sluice.RateLimiter().take("u", now=T0)
        with self.assertRaises(AttributeError):
            d.allowed = False
        self.assertIn("allowed=True", repr(d))
        self.assertIsInstance(d.remaining, int)
        self.assertIsInstance(d.retry_after, float)
        with self.assertRaises(TypeError):
            sluice.Decision()

    def test_stats(self):
        lim = sluice.RateLimiter(capacity=1)
        lim.is_allowed(("acme", "", "u"), now=T0)
        lim.is_allowed(("acme", "", "u"), now=T0)
        self.assertEqual(lim.stats("acme"), {"allowed": 1, "denied": 1, "evicted": 0})
        with self.assertRaises(KeyError):
            lim.stats("never")

    def test_snapshot_roundtrip(self):
        lim = sluice.RateLimiter(capacity=3)
        for _ in range(3):
            lim.is_allowed("u", now=T0)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "state.snap")
            lim.save(path)
            other = sluice.RateLimiter(capacity=3)
            other.load(path)
            self.assertFalse(other.is_allowed("u", now=T0))
            with self.assertRaises(FileNotFoundError):
                other.load(os.path.join(d, "missing"))
            with open(path, "wb") as f:
                f.write(b"garbage")
            with self.assertRaisesRegex(ValueError, "SL_ESNAPSHOT"):
                other.load(path)
            lim.save(path=path)  # every argument may be given by keyword
            other.load(path=path)
            self.assertFalse(other.is_allowed("u", now=T0))

    def test_one_argument_methods_take_keywords_and_errors_name_the_argument(self):
        lim = sluice.RateLimiter()
        lim.set_default(policy={"algorithm": "token_bucket", "capacity": 4, "refill_rate": 1})
        lim.set_tier("gold", {"algorithm": "token_bucket", "capacity": 9, "refill_rate": 1})
        self.assertEqual(lim.get_tier(name="gold"), lim.get_tier("gold"))
        self.assertIsNotNone(lim.get_tier(name="gold"))
        self.assertTrue(lim.delete_tier(name="gold"))
        with self.assertRaisesRegex(TypeError, "lease must be int"):
            lim.release("x", "abc")
        with self.assertRaisesRegex(ValueError, "lease must be >= 0"):
            lim.release("x", -1)
        with self.assertRaisesRegex(ValueError, "budget must be >= 0"):
            lim.sweep(-1)
        with self.assertRaisesRegex(TypeError, "cost must be int"):
            lim.take("x", "2")

    def test_subclass_and_version(self):
        class Mine(sluice.RateLimiter):
            pass
        self.assertTrue(Mine(capacity=2).is_allowed("u"))
        self.assertEqual(sluice.__version__, "0.2.0")
        self.assertFalse(sluice.RateLimiter().release_gil)
        self.assertTrue(sluice.RateLimiter(release_gil=True).release_gil)


if __name__ == "__main__":
    unittest.main()
