"""The RESP front end of sluiced, driven by real clients: redis-py (Debian python3-redis),
redis-cli, redis-benchmark and raw sockets."""
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import unittest

import redis

from harness import Sluiced, raw, recv_all, resp_command, run_sluiced, send_split, trickle


class RespTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.srv = Sluiced(http=False).start()
        cls.port = cls.srv.resp_port

    @classmethod
    def tearDownClass(cls):
        code = cls.srv.stop()
        if code != 0:
            print(cls.srv.log())
        assert code == 0, code

    def client(self, **kw):
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **kw)

    def test_ping_echo_select_client(self):
        r = self.client()
        self.assertTrue(r.ping())
        self.assertEqual(raw(self.port, b"PING hi\r\n", expect=8), b"$2\r\nhi\r\n")
        self.assertEqual(r.echo("hello world"), b"hello world")
        self.assertTrue(r.execute_command("SELECT", 0))
        with self.assertRaisesRegex(redis.ResponseError, "DB index is out of range"):
            r.execute_command("SELECT", 1)
        with self.assertRaisesRegex(redis.ResponseError, "not an integer"):
            r.execute_command("SELECT", "x")
        self.assertTrue(r.client_setname("worker-7"))
        self.assertEqual(r.client_getname(), "worker-7")
        self.assertGreater(r.client_id(), 0)

    def test_take_reply_and_exact_limit(self):
        r = self.client()
        # A window that cannot roll over during the test: exactly 3 admitted.
        self.assertTrue(r.execute_command("SL.RULE", "SET", "ACTION", "t1", "login",
                                          "fixed_window", "LIMIT", 3, "WINDOW", 86400))
        replies = [r.execute_command("SL.TAKE", "t1", "login", "alice") for _ in range(5)]
        self.assertEqual([x[0] for x in replies], [1, 1, 1, 0, 0])
        self.assertEqual([x[1] for x in replies], [3] * 5)  # limit
        self.assertEqual([x[2] for x in replies], [2, 1, 0, 0, 0])  # remaining
        self.assertEqual(replies[0][3], -1)  # retry_after_ms when allowed
        self.assertGreater(replies[3][3], 0)
        self.assertLessEqual(replies[3][3], 86400 * 1000)
        self.assertEqual(replies[0][5], 0)  # no lease
        self.assertEqual(replies[0][6], 0)  # no delay (not a leaky bucket)
        # A leaky bucket shapes: each admitted request says how long to wait before going on.
        self.assertTrue(r.execute_command("SL.RULE", "SET", "ACTION", "t1", "queue",
                                          "leaky_bucket", "LIMIT", 10, "RATE", 0.001))
        delays = [r.execute_command("SL.TAKE", "t1", "queue", "q")[6] for _ in range(3)]
        self.assertEqual(delays[0], 0)
        # one unit's drain time, 1000 s, less the time between the two requests (in ms,
        # rounded up: exact on an idle machine; 999992 once under a sanitizer and load)
        self.assertLessEqual(delays[1], 1000 * 1000)
        self.assertGreater(delays[1], 999 * 1000)
        self.assertGreater(delays[2], 1999 * 1000)
        # Another client of the same action has its own budget.
        self.assertEqual(r.execute_command("SL.TAKE", "t1", "login", "bob")[0], 1)
        # PEEK does not consume: would one more pass, and what would be left after it.
        peek = [r.execute_command("SL.PEEK", "t1", "login", "bob") for _ in range(3)]
        self.assertEqual([p[:3] for p in peek], [[1, 3, 1]] * 3)
        peek = r.execute_command("SL.PEEK", "t1", "login", "alice")  # exhausted
        self.assertEqual(peek[:3], [0, 3, 0])
        self.assertGreater(peek[3], 0)
        # COST
        self.assertEqual(r.execute_command("SL.TAKE", "t1", "login", "bob", "COST", 2)[:3],
                         [1, 3, 0])

    def test_cl_throttle_matches_redis_cell(self):
        r = self.client()
        # redis-cell's README example: 15 burst, 30 per 60 s.
        self.assertEqual(r.execute_command("CL.THROTTLE", "user123", 15, 30, 60, 1),
                         [0, 16, 15, -1, 2])
        self.assertEqual(r.execute_command("CL.THROTTLE", "user123", 15, 30, 60),
                         [0, 16, 14, -1, 4])
        # Exhaust: limit = max_burst + 1 requests pass, then denied with retry-after.
        for i in range(14):
            self.assertEqual(r.execute_command("CL.THROTTLE", "user123", 15, 30, 60)[0], 0)
        d = r.execute_command("CL.THROTTLE", "user123", 15, 30, 60)
        self.assertEqual(d[:3], [1, 16, 0])
        self.assertEqual(d[3], 2)  # one token per 2 s, rounded up
        # quantity 0 looks without consuming; above the limit never passes.
        self.assertEqual(r.execute_command("CL.THROTTLE", "fresh", 4, 1, 1, 0)[:3], [0, 5, 5])
        self.assertEqual(r.execute_command("CL.THROTTLE", "fresh", 4, 1, 1, 6)[:4], [1, 5, 5, -1])
        for bad, msg in [(["k", -1, 1, 1], "max_burst"), (["k", 1, 0, 1], "count"),
                         (["k", 1, 1, 0], "period"), (["k", 1, 1, 1, -2], "quantity"),
                         (["k", "x", 1, 1], "max_burst"),
                         # each argument in range, but the bucket would take 1e16 years to
                         # fill: the error says so (it once spoke of the rate alone)
                         (["k", 999999999, 1, 31622400], "refill the limit within")]:
            with self.assertRaisesRegex(redis.ResponseError, msg):
                r.execute_command("CL.THROTTLE", *bad)

    def test_cl_throttle_rule_for_tenant_cl_decides_quantity(self):
        """A rule for tenant cl wins over the command's arguments, quantity included: a
        quantity above max_burst + 1 passes when the rule's capacity holds it, and one above
        the rule's capacity answers limited with retry -1 (it answered SL_ECOST once)."""
        r = self.client()
        self.assertTrue(r.execute_command("SL.RULE", "SET", "TENANT", "cl", "token_bucket",
                                          "LIMIT", 10, "RATE", 1))
        try:
            self.assertEqual(r.execute_command("CL.THROTTLE", "ruled", 1, 1, 60, 8),
                             [0, 10, 2, -1, 8])
            self.assertEqual(r.execute_command("CL.THROTTLE", "ruled", 1, 1, 60, 11),
                             [1, 10, 2, -1, 8])
            self.assertEqual(r.execute_command("CL.THROTTLE", "ruled", 1, 1, 60, 3),
                             [1, 10, 2, 1, 8])
            self.assertEqual(r.execute_command("CL.THROTTLE", "ruled", 1, 1, 60, 2)[:3],
                             [0, 10, 0])
        finally:
            r.execute_command("SL.RULE", "DEL", "TENANT", "cl")

    def test_cl_throttle_at_10000_per_second(self):
        """redis-cell computes in whole milliseconds and gives up at high rates; here
        10,000/s per key with a burst of 100 admits exactly what the bucket allows."""
        r = self.client()
        p = r.pipeline(transaction=False)
        n = 20000
        t0 = time.monotonic()
        for _ in range(n):
            p.execute_command("CL.THROTTLE", "fast", 99, 10000, 1)
        out = p.execute()
        elapsed = time.monotonic() - t0
        admitted = sum(1 for x in out if x[0] == 0)
        self.assertEqual(out[0][1], 100)
        self.assertGreaterEqual(admitted, 100)  # the whole burst
        self.assertLessEqual(admitted, 100 + 10000 * elapsed + 1)  # never more than the rate

    def test_rules_tiers_default_roundtrip(self):
        r = self.client()
        pol = "sliding_window LIMIT 100 WINDOW 60 AND token_bucket LIMIT 10 RATE 0.5"
        self.assertTrue(r.execute_command("SL.RULE", "SET", "CLIENT", "t2", "search", "carol",
                                          *pol.split()))
        self.assertEqual(r.execute_command("SL.RULE", "GET", "CLIENT", "t2", "search",
                                           "carol").decode(), pol)
        rules = r.execute_command("SL.RULE", "LIST")
        self.assertIn([b"client", b"t2", b"search", b"carol", pol.encode()], rules)
        self.assertEqual(r.execute_command("SL.RULE", "DEL", "CLIENT", "t2", "search", "carol"), 1)
        self.assertEqual(r.execute_command("SL.RULE", "DEL", "CLIENT", "t2", "search", "carol"), 0)
        self.assertIsNone(r.execute_command("SL.RULE", "GET", "CLIENT", "t2", "search", "carol"))

        self.assertTrue(r.execute_command("SL.TIER", "SET", "gold", "token_bucket", "LIMIT",
                                          1000, "RATE", 100))
        self.assertTrue(r.execute_command("SL.TIER", "ASSIGN", "t2", "dave", "gold"))
        self.assertEqual(r.execute_command("SL.TAKE", "t2", "any", "dave")[1], 1000)
        with self.assertRaisesRegex(redis.ResponseError, "tier is assigned"):
            r.execute_command("SL.TIER", "DEL", "gold")
        self.assertIn([b"gold", b"token_bucket LIMIT 1000 RATE 100"],
                      r.execute_command("SL.TIER", "LIST"))
        self.assertEqual(r.execute_command("SL.TIER", "ASSIGNED", "t2", "dave"), b"gold")
        self.assertIsNone(r.execute_command("SL.TIER", "ASSIGNED", "t2", "erin"))
        self.assertIn([b"t2", b"dave", b"gold"], r.execute_command("SL.TIER", "ASSIGNMENTS"))
        self.assertEqual(r.execute_command("SL.TIER", "UNASSIGN", "t2", "dave"), 1)
        self.assertEqual(r.execute_command("SL.TIER", "UNASSIGN", "t2", "dave"), 0)  # none
        self.assertNotIn([b"t2", b"dave", b"gold"], r.execute_command("SL.TIER", "ASSIGNMENTS"))
        self.assertEqual(r.execute_command("SL.TIER", "DEL", "gold"), 1)
        with self.assertRaisesRegex(redis.ResponseError, "unknown tier"):
            r.execute_command("SL.TIER", "ASSIGN", "t2", "dave", "platinum")

        old = r.execute_command("SL.DEFAULT", "GET")
        self.assertTrue(r.execute_command("SL.DEFAULT", "SET", "token_bucket", "LIMIT", 7,
                                          "RATE", 1))
        self.assertEqual(r.execute_command("SL.TAKE", "t3", "x", "erin")[1], 7)
        self.assertTrue(r.execute_command("SL.DEFAULT", "SET", *old.decode().split()))

    def test_bad_input_changes_nothing(self):
        r = self.client()
        cases = [
            (["SL.RULE", "SET", "ACTION", "t4", "a", "token_bucket", "LIMIT", 0, "RATE", 1],
             "capacity"),
            (["SL.RULE", "SET", "ACTION", "t4", "a", "token_bucket", "LIMIT", 5, "RATE", "nan"],
             "not a number|rate"),
            (["SL.RULE", "SET", "ACTION", "t4", "a", "token_bucket", "LIMIT", 5, "RATE", "inf"],
             "not a number|rate"),
            (["SL.RULE", "SET", "ACTION", "t4", "a", "token_bucket", "LIMIT", 5, "RATE", "0x10"],
             "not a number|rate"),
            (["SL.RULE", "SET", "ACTION", "t4", "a", "token_bucket", "LIMIT", 5, "RATE", "\v5"],
             "not a number|rate"),
            (["SL.RULE", "SET", "ACTION", "t4", "a", "fixed_window", "LIMIT", 5, "WINDOW", -1],
             "window"),
            (["SL.RULE", "SET", "ACTION", "t4", "a", "bogus", "LIMIT", 5], "unknown algorithm"),
            (["SL.RULE", "SET", "ACTION", "t4", "a", "token_bucket", "RATE", 1], "LIMIT"),
            (["SL.RULE", "SET", "ACTION", "t4", "a", "token_bucket", "LIMIT"], "missing value"),
            # words an algorithm does not use, twice, or missing: refused, not ignored
            (["SL.RULE", "SET", "ACTION", "t4", "a", "token_bucket", "LIMIT", 5, "RATE", 1,
              "WINDOW", 5], "token_bucket takes no WINDOW"),
            (["SL.RULE", "SET", "ACTION", "t4", "a", "sliding_window", "LIMIT", 100, "WINDOW",
              60, "RATE", 5], "sliding_window takes no RATE"),
            (["SL.RULE", "SET", "ACTION", "t4", "a", "token_bucket", "LIMIT", 5, "RATE", 1,
              "LIMIT", 6], "given twice: 'LIMIT'"),
            (["SL.RULE", "SET", "ACTION", "t4", "a", "fixed_window", "LIMIT", 5],
             "fixed_window needs WINDOW"),
            (["SL.RULE", "SET", "ACTION", "t4", "a", "leaky_bucket", "LIMIT", 5],
             "leaky_bucket needs RATE"),
            (["SL.RULE", "SET", "GALAXY", "t4", "token_bucket", "LIMIT", 5], "syntax"),
            (["SL.RULE", "FROB", "ACTION", "t4", "a"], "unknown SL.RULE subcommand"),
            (["SL.TAKE", "t4", "a", ""], "client id is empty"),
            (["SL.TAKE", "t4", "a", "x" * 256], "longer than 255"),
            (["SL.TAKE", "t4", "a", "c", "COST", -1], "COST"),
            (["SL.TAKE", "t4", "a", "c", "COST", 1000000], "cost exceeds"),
            (["SL.TAKE", "t4", "a"], "wrong number of arguments for 'sl.take'"),
            (["SL.RELEASE", "t4", "a", "c", 12345], None),
        ]
        for args, msg in cases:
            if msg is None:
                self.assertEqual(r.execute_command(*args), 0)  # no such lease
                continue
            with self.assertRaisesRegex(redis.ResponseError, msg, msg=str(args)):
                r.execute_command(*args)
        self.assertIsNone(r.execute_command("SL.RULE", "GET", "ACTION", "t4", "a"))
        with self.assertRaisesRegex(redis.ResponseError, "unknown command 'NOPE'"):
            r.execute_command("NOPE", "x")
        self.assertTrue(r.ping())  # the connection is still good

    def test_concurrency_lease(self):
        r = self.client()
        r.execute_command("SL.RULE", "SET", "ACTION", "t5", "upload", "concurrency", "LIMIT", 2,
                          "WINDOW", 3600)
        a = r.execute_command("SL.TAKE", "t5", "upload", "u")
        b = r.execute_command("SL.TAKE", "t5", "upload", "u")
        c = r.execute_command("SL.TAKE", "t5", "upload", "u")
        self.assertEqual([a[0], b[0], c[0]], [1, 1, 0])
        self.assertGreater(a[5], 0)
        self.assertNotEqual(a[5], b[5])
        self.assertEqual(r.execute_command("SL.RELEASE", "t5", "upload", "u", a[5]), 1)
        self.assertEqual(r.execute_command("SL.RELEASE", "t5", "upload", "u", a[5]), 0)
        self.assertEqual(r.execute_command("SL.TAKE", "t5", "upload", "u")[0], 1)

    def test_pipelined_release_follows_earlier_takes(self):
        """A release pipelined behind a take runs after it is decided (it once ran at once,
        so the earlier take got the lease the later release freed)."""
        r = self.client()
        r.execute_command("SL.RULE", "SET", "ACTION", "t6", "job", "concurrency", "LIMIT", 1,
                          "WINDOW", 3600)
        lease = r.execute_command("SL.TAKE", "t6", "job", "u")[5]
        p = r.pipeline(transaction=False)
        p.execute_command("SL.TAKE", "t6", "job", "u")
        p.execute_command("SL.RELEASE", "t6", "job", "u", lease)
        p.execute_command("SL.TAKE", "t6", "job", "u")
        first, released, last = p.execute()
        self.assertEqual((first[0], released, last[0]), (0, 1, 1))

    def test_info_command_stats(self):
        r = self.client()
        info = r.info()
        self.assertEqual(info["redis_mode"], "standalone")
        self.assertIn("sluice_version", info)
        self.assertGreaterEqual(info["connected_clients"], 1)
        # INFO <section>: only that one, as Redis answers (names in any case)
        server = r.info("server")
        self.assertIn("redis_version", server)
        self.assertNotIn("keys", server)
        two = r.execute_command("INFO", "LIMITER", "clients")
        self.assertIn("keys", two)
        self.assertIn("connected_clients", two)
        self.assertNotIn("redis_version", two)
        out = raw(self.port, b"INFO LIMITER clients\r\nINFO nosuch\r\n", expect=10_000, timeout=1)
        self.assertEqual(out.count(b"# "), 2)
        self.assertTrue(out.endswith(b"$0\r\n\r\n"), out)  # an unknown section: empty
        self.assertEqual(raw(self.port, b"COMMAND\r\n", expect=4), b"*0\r\n")
        r.execute_command("SL.TAKE", "t6", "a", "c")
        st = r.execute_command("SL.STATS", "t6")
        self.assertEqual(st, [b"allowed", 1, b"denied", 0, b"evicted", 0])
        with self.assertRaisesRegex(redis.ResponseError,
                                    "no decisions for this tenant yet .SL_ENOTFOUND"):
            r.execute_command("SL.STATS", "never-seen")

    def test_hello(self):
        out = raw(self.port, b"HELLO 3\r\nSL.RULE GET ACTION none none\r\nHELLO 2\r\n"
                  b"SL.RULE GET ACTION none none\r\nHELLO 4\r\n", expect=10_000, timeout=1)
        self.assertTrue(out.startswith(b"%7\r\n$6\r\nserver\r\n$6\r\nsluice\r\n"), out)
        self.assertIn(b"$5\r\nproto\r\n:3\r\n", out)
        self.assertIn(b"_\r\n*14\r\n", out)  # RESP3 null, then the RESP2 HELLO reply
        self.assertTrue(out.endswith(b"$-1\r\n-NOPROTO unsupported protocol version\r\n"), out)

    def test_pipeline_order(self):
        r = self.client()
        r.execute_command("SL.RULE", "SET", "ACTION", "t7", "p", "fixed_window", "LIMIT", 500,
                          "WINDOW", 86400)
        p = r.pipeline(transaction=False)
        for i in range(1000):
            p.execute_command("SL.TAKE", "t7", "p", "c%d" % (i % 2))
            if i % 100 == 0:
                p.echo("marker-%d" % i)
        out = p.execute()
        takes = [x for x in out if isinstance(x, list)]
        echos = [x for x in out if isinstance(x, bytes)]
        self.assertEqual(echos, [b"marker-%d" % i for i in range(0, 1000, 100)])
        # Each client's remaining counts down 499..0 in request order.
        c0 = [x[2] for x in takes[0::2]]
        self.assertEqual(c0, list(range(499, -1, -1)))

    def test_pipelined_rule_change_follows_earlier_takes(self):
        """A rule change pipelined behind takes of the same connection runs after they are
        decided: the first take is under the default policy, the second under the rule, the
        third under the default again."""
        r = self.client()
        p = r.pipeline(transaction=False)
        p.execute_command("SL.TAKE", "t8", "a", "c")
        p.execute_command("SL.RULE", "SET", "CLIENT", "t8", "a", "c", "token_bucket",
                          "LIMIT", 3, "RATE", 0.001)
        p.execute_command("SL.TAKE", "t8", "a", "c")
        p.execute_command("SL.RULE", "DEL", "CLIENT", "t8", "a", "c")
        p.execute_command("SL.TAKE", "t8", "a", "c")
        out = p.execute()
        default_limit = out[0][1]
        self.assertNotEqual(default_limit, 3)
        self.assertEqual(out[2][1], 3)
        self.assertEqual(out[4][1], default_limit)

    def test_inline_and_protocol_errors(self):
        self.assertEqual(raw(self.port, b"PING\r\nECHO 'two words'\r\n\r\n", expect=21),
                         b"+PONG\r\n$9\r\ntwo words\r\n")
        self.assertEqual(raw(self.port, b"SL.TAKE t8 a \"c d\"\n", expect=4)[:4], b"*7\r\n")
        cases = [
            (b"*abc\r\n", b"invalid multibulk length"),
            (b"*1\r\n$-5\r\n", b"invalid bulk length"),
            (b"*1\r\n$999999999\r\n", b"invalid bulk length"),  # refused before allocating
            (b"*100000\r\n", b"too many arguments"),
            (b"*1\r\n+PING\r\n", b"expected '$'"),
            (b"ECHO \"unterminated\r\n", b"unbalanced quotes"),
            (b"*1\r\n$4\r\nPINGxx", b"not followed by CRLF"),
        ]
        for data, msg in cases:
            out = raw(self.port, b"PING\r\n" + data, read_until_close=True)
            self.assertTrue(out.startswith(b"+PONG\r\n-ERR Protocol error"), (data, out))
            self.assertIn(msg, out)
        out = raw(self.port, b"x" * (64 * 1024 + 10), read_until_close=True)
        self.assertIn(b"too big inline request", out)
        # QUIT answers, then closes.
        self.assertEqual(raw(self.port, b"QUIT\r\nPING\r\n", read_until_close=True), b"+OK\r\n")
        self.assertTrue(self.client().ping())

    def test_slow_client_byte_by_byte(self):
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            for b in b"*2\r\n$4\r\nECHO\r\n$3\r\nabc\r\n":
                s.sendall(bytes([b]))
            self.assertEqual(s.recv(100), b"$3\r\nabc\r\n")

    def test_pipeline_of_immediate_replies_is_answered_whole(self):
        """10,000 INFOs in one write (~5 MB of replies, none waiting on a decision) are all
        answered with nothing more sent. The worker takes up buffered input in bounded turns;
        after the last one it used to wait for another read or write, and ~8,300 replies in
        the pipeline stalled until the client sent something else."""
        n = 10000
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(b"INFO\r\n" * n)
            buf, pos, got = bytearray(), 0, 0
            deadline = time.monotonic() + 10
            while got < n and time.monotonic() < deadline:
                try:
                    chunk = s.recv(1 << 20)
                except socket.timeout:
                    break
                if not chunk:
                    break
                buf += chunk
                while True:  # count whole bulk replies: $<len>\r\n<len bytes>\r\n
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        break
                    self.assertEqual(buf[pos:pos + 1], b"$", bytes(buf[pos:pos + 40]))
                    end = eol + 2 + int(buf[pos + 1:eol]) + 2
                    if end > len(buf):
                        break
                    pos, got = end, got + 1
            self.assertEqual(got, n)
            self.assertEqual(pos, len(buf))

    def test_redis_cli(self):
        cli = shutil.which("redis-cli")
        if not cli:
            self.skipTest("redis-cli not installed")
        out = subprocess.run([cli, "-p", str(self.port), "CL.THROTTLE", "cli-key", "1", "1", "60"],
                             capture_output=True, text=True, timeout=10).stdout
        self.assertEqual(out.split(), ["0", "2", "1", "-1", "60"])
        out = subprocess.run([cli, "-p", str(self.port)], input="SL.TAKE t9 a b\nPING\n",
                             capture_output=True, text=True, timeout=10).stdout
        self.assertEqual(out.split()[-1], "PONG")

    def test_node_redis_client(self):
        node = shutil.which("node", path="/usr/bin:/usr/local/bin")
        if not node or not os.path.isdir("/usr/share/nodejs/redis"):
            self.skipTest("node or Debian's node-redis not installed")
        here = os.path.dirname(os.path.abspath(__file__))
        p = subprocess.run([node, os.path.join(here, "node_client.js"), str(self.port)],
                           capture_output=True, text=True, timeout=30,
                           env={**os.environ, "NODE_PATH": "/usr/share/nodejs"})
        self.assertEqual(p.returncode, 0, p.stderr)
        out = json.loads(p.stdout)
        self.assertEqual(out["ping"], "PONG")
        self.assertEqual(out["rule"], "OK")
        self.assertEqual([t[0] for t in out["takes"]], [1, 1, 1, 0])
        self.assertEqual([t[2] for t in out["takes"]], [2, 1, 0, 0])
        self.assertEqual(out["throttle"], [0, 16, 15, -1, 2])
        self.assertIn("client id is empty", out["error"])

    def test_redis_benchmark(self):
        bench = shutil.which("redis-benchmark")
        if not bench:
            self.skipTest("redis-benchmark not installed")
        p = subprocess.run([bench, "-p", str(self.port), "-n", "20000", "-c", "10", "-r", "1000",
                            "-P", "8", "-q", "CL.THROTTLE", "bench:__rand_int__", "5", "100", "1"],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("requests per second", p.stdout)
        self.assertNotIn("ERR", p.stdout + p.stderr)
        self.assertTrue(self.client().ping())


class ConnectionLimitTest(unittest.TestCase):
    def test_max_connections_refusal_says_why(self):
        """Past --max-connections a new connection is told why, as Redis does (RESP) or with
        a 503 (HTTP), then closed; the open ones keep working."""
        with Sluiced("--max-connections", 2, "--threads", 1) as s:
            deadline = time.monotonic() + 10
            while True:  # until the start's own probes of both ports have closed
                held = [socket.create_connection(("127.0.0.1", s.resp_port), timeout=5)
                        for _ in range(2)]
                for h in held:
                    h.sendall(b"PING\r\n")
                answers = [recv_all(h, 5, expect=7) for h in held]
                if answers == [b"+PONG\r\n"] * 2 or time.monotonic() > deadline:
                    break
                for h in held:
                    h.close()
                time.sleep(0.1)
            try:
                self.assertEqual(answers, [b"+PONG\r\n"] * 2)
                out = raw(s.resp_port, b"", read_until_close=True)
                self.assertEqual(out, b"-ERR max number of clients reached\r\n")
                out = raw(s.http_port, b"", read_until_close=True)
                head, _, body = out.partition(b"\r\n\r\n")
                self.assertTrue(head.startswith(b"HTTP/1.1 503 "), out)
                self.assertIn(b"Content-Length: %d" % len(body), head)
                self.assertEqual(json.loads(body), {"error": "max number of connections reached"})
                held[0].sendall(b"PING\r\n")
                self.assertEqual(recv_all(held[0], 5, expect=7), b"+PONG\r\n")
            finally:
                for h in held:
                    h.close()


class AuthTest(unittest.TestCase):
    def test_admin_token_guards_config_changes(self):
        """--admin-token guards configuration changes on RESP as on HTTP: they need the
        "admin" user (AUTH admin <token>); reads and decisions do not, and the default user
        of --requirepass may not change anything."""
        with Sluiced("--admin-token", "T0ken", "--requirepass", "pw", http=False) as s:
            r = redis.Redis(host="127.0.0.1", port=s.resp_port, password="pw")
            changes = [("SL.RULE", "SET", "ACTION", "t", "a", "token_bucket", "LIMIT", "3",
                        "RATE", "1"),
                       ("SL.RULE", "DEL", "ACTION", "t", "a"),
                       ("SL.TIER", "SET", "gold", "token_bucket", "LIMIT", "9", "RATE", "1"),
                       ("SL.TIER", "ASSIGN", "t", "c", "gold"),
                       ("SL.DEFAULT", "SET", "token_bucket", "LIMIT", "9", "RATE", "1"),
                       ("SL.ADMISSION", "SET", "max_tenant_queue_size", "5"),
                       ("SL.WEIGHT", "SET", "t", "3"),
                       ("SL.SAVE",)]
            for cmd in changes:
                with self.assertRaisesRegex(redis.exceptions.NoPermissionError, "AUTH admin"):
                    r.execute_command(*cmd)
            self.assertEqual(r.execute_command("SL.RULE", "LIST"), [])
            self.assertIsNone(r.execute_command("SL.RULE", "GET", "ACTION", "t", "a"))
            self.assertEqual(r.execute_command("SL.TAKE", "t", "a", "c")[1], 5)  # the default
            with self.assertRaisesRegex(redis.ResponseError, "invalid username-password"):
                r.execute_command("AUTH", "admin", "wrong")
            with self.assertRaisesRegex(redis.ResponseError, "invalid username-password"):
                r.execute_command("AUTH", "admin", "pw")  # the default user's password
            admin = redis.Redis(host="127.0.0.1", port=s.resp_port, username="admin",
                                password="T0ken")
            self.assertEqual(admin.execute_command(*changes[0]), b"OK")
            self.assertEqual(admin.execute_command("SL.TAKE", "t", "a", "c")[1], 3)
            out = raw(s.resp_port, b"HELLO 2 AUTH admin T0ken\r\nSL.WEIGHT SET t 2\r\n",
                      expect=10_000, timeout=1)
            self.assertTrue(out.endswith(b"+OK\r\n"), out)
        # without --requirepass, only the changes need a login
        with Sluiced("--admin-token", "T0ken", http=False) as s:
            r = redis.Redis(host="127.0.0.1", port=s.resp_port)
            self.assertEqual(r.execute_command("SL.TAKE", "t", "a", "c")[0], 1)
            with self.assertRaises(redis.exceptions.NoPermissionError):
                r.execute_command(*changes[0])
            self.assertTrue(r.execute_command("AUTH", "admin", "T0ken"))
            self.assertEqual(r.execute_command(*changes[0]), b"OK")

    def test_refused_hello_logs_nobody_in(self):
        """A HELLO refused for a later option changes nothing, as in Redis (it once logged the
        client in before checking the rest); AUTH switches the user, so the default user's
        AUTH after admin's drops admin's rights."""
        with Sluiced("--admin-token", "adm", "--requirepass", "pw", http=False) as s:
            out = raw(s.resp_port, b"HELLO 3 AUTH default pw BOGUS\r\nPING\r\n",
                      expect=10_000, timeout=1)
            self.assertTrue(out.startswith(b"-ERR syntax error in HELLO option 'BOGUS'"), out)
            self.assertTrue(out.endswith(b"-NOAUTH Authentication required.\r\n"), out)
            out = raw(s.resp_port, b"HELLO 3 AUTH admin adm SETNAME\r\n"
                      b"SL.DEFAULT SET token_bucket LIMIT 7 RATE 1\r\n", expect=10_000,
                      timeout=1)
            self.assertTrue(out.startswith(b"-ERR syntax error in HELLO option 'SETNAME'"), out)
            self.assertTrue(out.endswith(b"-NOAUTH Authentication required.\r\n"), out)
            hello = resp_command("HELLO", 2, "AUTH", "default", "pw", "SETNAME", "a\tb")
            out = raw(s.resp_port, hello + b"PING\r\n", expect=10_000, timeout=1)
            self.assertTrue(out.startswith(b"-ERR Client names cannot contain"), out)
            self.assertTrue(out.endswith(b"-NOAUTH Authentication required.\r\n"), out)
            r = redis.Redis(host="127.0.0.1", port=s.resp_port, password="pw")
            self.assertNotIn(b"LIMIT 7", r.execute_command("SL.DEFAULT", "GET"))
            r = redis.Redis(host="127.0.0.1", port=s.resp_port, username="admin", password="adm",
                            single_connection_client=True)
            self.assertEqual(r.execute_command("SL.WEIGHT", "SET", "t", "2"), b"OK")
            self.assertTrue(r.execute_command("AUTH", "default", "pw"))
            with self.assertRaises(redis.exceptions.NoPermissionError):
                r.execute_command("SL.WEIGHT", "SET", "t", "3")
            with self.assertRaisesRegex(redis.ResponseError, "invalid username-password"):
                r.execute_command("AUTH", "admin", "wrong")  # a failed AUTH changes nothing
            self.assertTrue(r.ping())
            with self.assertRaises(redis.exceptions.NoPermissionError):
                r.execute_command("SL.WEIGHT", "SET", "t", "3")
        with Sluiced("--admin-token", "adm", http=False) as s:  # no --requirepass
            r = redis.Redis(host="127.0.0.1", port=s.resp_port, single_connection_client=True)
            self.assertTrue(r.execute_command("AUTH", "admin", "adm"))
            self.assertTrue(r.execute_command("AUTH", "default", "anything"))  # nopass, as Redis
            with self.assertRaises(redis.exceptions.NoPermissionError):
                r.execute_command("SL.WEIGHT", "SET", "t", "3")

    def test_requirepass(self):
        with Sluiced("--requirepass", "s3cret", http=False) as s:
            r = redis.Redis(host="127.0.0.1", port=s.resp_port, socket_timeout=5)
            with self.assertRaisesRegex(redis.AuthenticationError, "Authentication required"):
                r.execute_command("SL.TAKE", "t", "a", "c")
            with self.assertRaises(redis.AuthenticationError):
                r.ping()
            with self.assertRaisesRegex(redis.ResponseError, "invalid username-password"):
                r.execute_command("AUTH", "wrong")
            good = redis.Redis(host="127.0.0.1", port=s.resp_port, password="s3cret")
            self.assertTrue(good.ping())
            self.assertEqual(good.execute_command("SL.TAKE", "t", "a", "c")[0], 1)
            out = raw(s.resp_port, b"HELLO 2 AUTH default s3cret\r\nPING\r\n", expect=10_000,
                      timeout=1)
            self.assertTrue(out.endswith(b"+PONG\r\n"), out)


class SlowCommandTest(unittest.TestCase):
    def test_command_trickling_in_is_cut_off(self):
        """A command arriving a byte now and then keeps its connection active, so the idle
        timeout alone never closes it: one not complete within --idle-timeout is (as on
        HTTP; RESP once had no such timer)."""
        with Sluiced("--threads", 1, "--idle-timeout", 2, http=False) as s:
            trickle(s.resp_port, b"*2\r\n$4\r\nECHO\r\n$1000\r\n", b"x")
            self.assertIn("request not complete after 2 s", s.log())
            self.assertTrue(redis.Redis(host="127.0.0.1", port=s.resp_port).ping())

    def test_steady_pipeline_is_not_cut_off(self):
        """Commands that keep completing are not a command trickling in, even when every
        write ends in the middle of the next one."""
        with Sluiced("--threads", 1, "--idle-timeout", 1, http=False) as s:
            one = b"*1\r\n$4\r\nPING\r\n"
            sent, got = send_split(s.resp_port, one, 5, 3.0, b"QUIT\r\n")  # 3 timeouts' worth
            self.assertEqual(got.count(b"+PONG"), sent, s.log())
            self.assertNotIn("request not complete", s.log())


class ProcessTest(unittest.TestCase):
    def test_flags(self):
        code, out, err = run_sluiced("--help")
        self.assertEqual(code, 0)
        self.assertIn("--resp-port", out)
        code, out, _ = run_sluiced("--version")
        self.assertEqual(code, 0)
        self.assertRegex(out, r"^sluiced \d+\.\d+\.\d+\n$")
        for args, msg in [(["--bogus"], "unknown option '--bogus'"),
                          (["--resp-port", "70000"], "--resp-port: '70000'"),
                          (["--threads", "0"], "--threads"),
                          (["--threads"], "--threads: missing value"),
                          (["--log-level", "loud"], "not a log level"),
                          (["--resp-port", "0", "--http-port", "0"], "nothing to serve"),
                          (["--bind", "localhost"], "--bind: 'localhost' is not an IPv4"),
                          (["--bind", "300.1.1.1"], "--bind: '300.1.1.1'"),
                          (["--bind", "::1::2"], "--bind: '::1::2'"),
                          # the memory store too: a typo is not silently "closed"
                          (["--fail-mode", "maybe"], "--fail-mode: 'maybe' is not open"),
                          # an empty secret (an unset variable) would leave the server open
                          (["--admin-token", ""], "--admin-token: must not be empty"),
                          (["--requirepass="], "--requirepass: must not be empty"),
                          (["--redis-password", ""], "--redis-password: must not be empty"),
                          (["--config", "/nonexistent/c.json"],
                           "--config /nonexistent/c.json: unable to open")]:
            code, _, err = run_sluiced(*args)
            self.assertEqual(code, 2, args)
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertIn(msg, err)

    def test_config_file(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "c.json")
            with open(path, "w") as f:
                f.write('{"threads": 1,\n "resp_port": 1,\n "bogus": 2}')
            code, _, err = run_sluiced("--config", path)
            self.assertEqual(code, 2)
            self.assertIn('line 3, column 2: field "bogus": unknown setting', err)
            with open(path, "w") as f:
                f.write('{"threads": 1,\n "resp_port": }')
            code, _, err = run_sluiced("--config", path)
            self.assertEqual(code, 2)
            self.assertRegex(err, r"line 2, column \d+")
            with open(path, "w") as f:
                f.write('{"threads": "two"}')
            code, _, err = run_sluiced("--config", path)
            self.assertIn('field "threads": must be a whole number', err)
            # An escaped key is found where it is; an item's error names its place too.
            with open(path, "w") as f:
                f.write('{"items": {"rule/action/t/thr\\u0065ads": {}},\n  "thr\\u0065ads": "two"}')
            code, _, err = run_sluiced("--config", path)
            self.assertIn('line 2, column 3: field "threads": must be a whole number', err)
            with open(path, "w") as f:
                f.write('{"threads": 1,\n "items": {"tier/gold": {"limits": [{"algorithm": '
                        '"token_bucket", "limit": 5, "rate": 1}]},\n  "assign/t/c": "silver"}}')
            code, _, err = run_sluiced("--config", path, "--resp-port", 0, "--http-port", 1)
            self.assertEqual(code, 2)
            self.assertIn('line 3, column 3: item "assign/t/c": unknown tier', err)
            # Flags override the file.
            with open(path, "w") as f:
                f.write('{"requirepass": "fromfile", "threads": 1}')
            with Sluiced("--config", path, "--requirepass", "fromflag", http=False) as s:
                r = redis.Redis(host="127.0.0.1", port=s.resp_port, password="fromflag")
                self.assertTrue(r.ping())

    def test_port_in_use(self):
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            code, _, err = run_sluiced("--resp-port", port, "--http-port", 0)
            self.assertEqual(code, 1)
            self.assertIn("Address already in use", err)

    def test_sigterm_with_open_connections(self):
        s = Sluiced(http=False).start()
        idle = socket.create_connection(("127.0.0.1", s.resp_port))
        busy = redis.Redis(host="127.0.0.1", port=s.resp_port)
        busy.execute_command("SL.TAKE", "t", "a", "c")
        t0 = time.monotonic()
        code = s.stop(signal.SIGTERM)
        self.assertEqual(code, 0, s.log())
        self.assertLess(time.monotonic() - t0, 6)
        self.assertIn("stopped", s.log())
        idle.close()

    def test_sigint(self):
        s = Sluiced(http=False).start()
        self.assertEqual(s.stop(signal.SIGINT), 0)


if __name__ == "__main__":
    unittest.main()
