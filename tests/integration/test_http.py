"""The HTTP/1.1 + JSON front end of sluiced, end to end over loopback.

Every limit here is either generous or exact and small with a window of an hour, so that the
few milliseconds a test takes never change an answer. Nothing sleeps: every wait is a read
with a timeout.
"""
import http.client
import json
import re
import select
import shutil
import socket
import subprocess
import time
import unittest
import urllib.parse
import urllib.request

from harness import Sluiced, resp_command, run_sluiced, send_split, trickle

TIMEOUT = 10.0
HOUR = 3600


# ---- raw HTTP over a socket ------------------------------------------------------------------

def connect(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    s.settimeout(TIMEOUT)
    return s


class Reader:
    """Reads responses off one socket, keeping what arrived past the last one."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _more(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("server closed the connection")
        self.buf += chunk

    def response(self, head_only=False):
        """(status, headers with lower-case names, body bytes)."""
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        if status == 100 or head_only:
            return status, headers, b""
        n = int(headers["content-length"])
        while len(self.buf) < n:
            self._more()
        body, self.buf = self.buf[:n], self.buf[n:]
        return status, headers, body

    def closed(self):
        """True if the server closes the connection (EOF) with nothing more to say."""
        try:
            self._more()
        except EOFError:
            return self.buf == b""
        except ConnectionResetError:
            return True
        return False


def request(method, path, body=None, headers=(), version="HTTP/1.1"):
    """The bytes of one request; a dict/list body is sent as JSON with Content-Length."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    lines = [f"{method} {path} {version}", "Host: sluiced"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body is not None and not any(k.lower() == "transfer-encoding" for k, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def check_body(tenant, client, action, **extra):
    return dict(tenant_id=tenant, client_id=client, action_type=action, **extra)


def bucket(n, window=HOUR, **extra):
    """A token bucket of n per `window` seconds, in the API's max_requests form."""
    return dict(max_requests=n, window_duration_seconds=window, **extra)


class HttpCase(unittest.TestCase):
    """Starts one sluiced per class; `call` is one request on a fresh http.client connection."""

    server_args = ()

    @classmethod
    def setUpClass(cls):
        cls.server = Sluiced(*cls.server_args, resp=False)
        cls.server.start()
        cls.port = cls.server.http_port

    @classmethod
    def tearDownClass(cls):
        code = cls.server.stop()
        if code != 0:
            raise AssertionError(f"sluiced exited with {code}:\n{cls.server.log()}")

    def call(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            data = r.read()
            hdrs = {k.lower(): v for k, v in r.getheaders()}
            if hdrs.get("content-type", "").startswith("application/json") and data:
                data = json.loads(data)
            return r.status, hdrs, data
        finally:
            conn.close()

    def ok(self, method, path, body=None, status=200):
        code, hdrs, data = self.call(method, path, body)
        self.assertEqual(code, status, data)
        return data

    def error(self, method, path, body=None, status=400, contains=""):
        code, hdrs, data = self.call(method, path, body)
        self.assertEqual(code, status, data)
        self.assertEqual(hdrs["content-type"], "application/json")
        self.assertEqual(list(data), ["error"])
        self.assertIn(contains, data["error"])
        return data["error"], hdrs

    def check(self, tenant, client, action, **extra):
        return self.call("POST", "/api/check_and_consume", check_body(tenant, client, action,
                                                                      **extra))

    def rule(self, tenant, action, policy):
        self.ok("PUT", f"/api/config/tenant/{tenant}/action/{action}", policy)


# ---- endpoints ---------------------------------------------------------------------------------

class Endpoints(HttpCase):

    def test_health(self):
        code, hdrs, data = self.call("GET", "/api/health")
        self.assertEqual(code, 200)
        self.assertEqual(hdrs["content-type"], "application/json")
        self.assertEqual(data["status"], "ok")
        self.assertRegex(data["version"], r"^\d+\.\d+\.\d+$")
        self.assertIn("date", hdrs)

    def test_check_reply_fields_and_headers(self):
        self.rule("fields", "login", bucket(3))
        code, hdrs, data = self.check("fields", "u1", "login")
        self.assertEqual(code, 200)
        self.assertEqual(set(data), {"allowed", "remaining_requests", "reset_time_seconds",
                                     "retry_after_seconds", "limit", "status"})
        self.assertIs(data["allowed"], True)
        self.assertEqual(data["remaining_requests"], 2)
        self.assertEqual(data["retry_after_seconds"], 0)
        self.assertEqual(data["limit"], 3)
        self.assertEqual(data["status"], "processed")
        # full again 1200 s after the first unit was taken: Unix seconds, rounded up
        self.assertAlmostEqual(data["reset_time_seconds"], time.time() + 1200, delta=3)
        # draft-ietf-httpapi-ratelimit-headers: sf-string policy name, integer parameters
        self.assertEqual(hdrs["ratelimit-policy"], '"default";q=3;w=3600')
        self.assertEqual(hdrs["ratelimit"], '"default";r=2;t=1200')
        self.assertNotIn("retry-after", hdrs)

    def test_429_with_retry_after(self):
        self.rule("deny", "login", bucket(3))
        for remaining in (2, 1, 0):
            code, _, data = self.check("deny", "u1", "login")
            self.assertEqual((code, data["remaining_requests"]), (200, remaining))
        code, hdrs, data = self.check("deny", "u1", "login")
        self.assertEqual(code, 429)
        self.assertIs(data["allowed"], False)
        self.assertEqual(data["remaining_requests"], 0)
        self.assertIn(data["retry_after_seconds"], (1199, 1200))  # one unit refills in 1200 s
        self.assertEqual(hdrs["retry-after"], str(data["retry_after_seconds"]))
        self.assertEqual(hdrs["ratelimit-policy"], '"default";q=3;w=3600')
        self.assertRegex(hdrs["ratelimit"], r'^"default";r=0;t=(3599|3600)$')
        self.assertEqual(data["status"], "processed")

    def test_ratelimit_header_syntax(self):
        """Structured-field Items: a String, then ;key=Integer parameters, nothing else."""
        item = r'^"[a-z0-9_-]+"(;[a-z][a-z0-9_-]*=[0-9]{1,15})+$'
        for policy in (bucket(7), {"algorithm": "fixed_window", **bucket(5)},
                       {"algorithm": "sliding_log", **bucket(4)}):
            self.rule("sfsyntax", "a", policy)
            _, hdrs, _ = self.check("sfsyntax", "c-" + policy.get("algorithm", "tb"), "a")
            self.assertRegex(hdrs["ratelimit-policy"], item)
            self.assertRegex(hdrs["ratelimit"], item)
            params = dict(p.split("=") for p in hdrs["ratelimit-policy"].split(";")[1:])
            self.assertEqual(set(params), {"q", "w"})
            params = dict(p.split("=") for p in hdrs["ratelimit"].split(";")[1:])
            self.assertEqual(set(params), {"r", "t"})
        # w is the window the policy was given in, though the refill interval is rounded up
        # to whole ns (3 per 1 s: 333,333,334 ns a unit); it used to say w=2
        for per, secs in ((3, 1), (7, 1), (6, 2), (30, 7), (100, 60)):
            _, hdrs, _ = self.check("wround", "c%d" % per, "a", max_requests=per,
                                    window_duration_seconds=secs)
            self.assertEqual(hdrs["ratelimit-policy"], '"default";q=%d;w=%d' % (per, secs))

    def test_cost(self):
        self.rule("cost", "a", bucket(5))
        self.assertEqual(self.check("cost", "c", "a", cost=2)[2]["remaining_requests"], 3)
        self.assertEqual(self.check("cost", "c", "a", cost=0)[2]["remaining_requests"], 3)
        code, _, data = self.check("cost", "c", "a", cost=6)
        self.assertEqual(code, 400)
        self.assertIn("SL_ECOST", data["error"])
        for bad in (-1, 1.5, "2", True, None, -0.5, 1e300):
            code, _, data = self.check("cost", "c", "a", cost=bad)
            self.assertEqual(code, 400, bad)
            self.assertIn('"cost"', data["error"])
        self.assertEqual(self.check("cost", "c", "a")[2]["remaining_requests"], 2)
        # JSON numbers, not integers: 1.0 and 1e0 are whole numbers
        self.assertEqual(self.check("cost", "c", "a", cost=1.0)[2]["remaining_requests"], 1)
        code, _, data = self.call("POST", "/api/check_and_consume",
                                  '{"tenant_id": "cost", "client_id": "c", "action_type": "a", '
                                  '"cost": 1e0}')
        self.assertEqual((code, data["remaining_requests"]), (200, 0))

    def test_inline_policy(self):
        body = check_body("inline", "c", "a", **bucket(2))
        for remaining in (1, 0):
            data = self.ok("POST", "/api/check_and_consume", body)
            self.assertEqual((data["limit"], data["remaining_requests"]), (2, remaining))
        self.ok("POST", "/api/check_and_consume", body, status=429)
        # a rule wins over the inline policy
        self.rule("inline", "ruled", bucket(10))
        data = self.ok("POST", "/api/check_and_consume", check_body("inline", "c", "ruled",
                                                                    **bucket(2)))
        self.assertEqual(data["limit"], 10)
        self.error("POST", "/api/check_and_consume",
                   check_body("inline", "c", "a", max_requests=2), contains="window_duration_seconds")
        self.error("POST", "/api/check_and_consume",
                   check_body("inline", "c", "a", window_duration_seconds=2), contains="max_requests")
        self.error("POST", "/api/check_and_consume", check_body("inline", "c", "a", **bucket(0)),
                   contains="SL_ECAPACITY")
        self.error("POST", "/api/check_and_consume", check_body("inline", "c", "a", **bucket(2, 0)),
                   contains="window_duration_seconds")

    def test_bodies_the_fast_parser_hands_to_jansson(self):
        """Plain bodies are parsed without jansson; bodies with escapes, non-ASCII, exponents
        or odd spacing take the full parser. Both must decide the same key the same way."""
        bodies = [
            '{"tenant_id": "fp", "client_id": "caf\\u00e9", "action_type": "a", '
            '"max_requests": 1e1, "window_duration_seconds": 3600}',
            '{"tenant_id":"fp","client_id":"caf\u00e9","action_type":"a",'
            '"max_requests":10,"window_duration_seconds":3600}',
            ' {\n "action_type" : "a" ,\t"client_id":"caf\u00e9", "tenant_id":"fp",'
            ' "max_requests": 10.0, "window_duration_seconds": 3600, "cost": 2 } ',
        ]
        left = [self.call("POST", "/api/check_and_consume", b.encode())[2]["remaining_requests"]
                for b in bodies]
        self.assertEqual(left, [9, 8, 6])  # one key, whichever parser read it
        for bad, msg in [('{"tenant_id": "fp", "tenant_id": "x", "client_id": "c", '
                          '"action_type": "a"}', "duplicate"),
                         ('{"tenant_id": "fp", "client_id": "c", "action_type": "a", '
                          '"cost": 1.5}', "cost"),
                         ('{"tenant_id": "fp", "client_id": "c", "action_type": "a", '
                          '"cost": 01}', "invalid JSON"),
                         ('{"tenant_id": "fp", "client_id": "c"}', "action_type")]:
            self.error("POST", "/api/check_and_consume", bad, contains=msg)

    def test_check_errors(self):
        url = "/api/check_and_consume"
        msg, _ = self.error("POST", url, '{"tenant_id": "t",\n "client_id": }')
        self.assertRegex(msg, r"^invalid JSON at line 2, column \d+: .+")
        msg, _ = self.error("POST", url, "")
        self.assertRegex(msg, r"^invalid JSON at line 1, column \d+: .+")
        self.error("POST", url, '{"a": 1} trailing', contains="invalid JSON")
        self.error("POST", url, '{"tenant_id": "t", "tenant_id": "u"}', contains="invalid JSON")
        self.error("POST", url, "[1, 2]", contains="JSON object")
        for field in ("tenant_id", "client_id", "action_type"):
            body = check_body("t", "c", "a")
            del body[field]
            self.error("POST", url, body, contains=f'missing field "{field}"')
            body[field] = 42
            self.error("POST", url, body, contains=f'"{field}" must be a string')
        self.error("POST", url, check_body("t", "c", "a", colour="red"),
                   contains='unknown field "colour"')
        self.error("POST", url, check_body("t", "", "a"), contains="SL_EKEYEMPTY")
        self.error("POST", url, check_body("t", "c" * 256, "a"), contains="SL_EKEYLONG")
        self.error("POST", url, check_body("t" * 256, "c", "a"), contains="SL_EKEYLONG")

    def test_status_does_not_consume(self):
        self.rule("status", "login", bucket(3))
        self.check("status", "u1", "login")
        for _ in range(3):
            code, hdrs, data = self.call("GET", "/api/status/status/u1/login")
            self.assertEqual(code, 200)
            self.assertEqual(data["remaining_requests"], 2)
            self.assertIs(data["allowed"], True)
            self.assertEqual(hdrs["ratelimit-policy"], '"default";q=3;w=3600')
        self.check("status", "u1", "login")
        self.check("status", "u1", "login")
        code, hdrs, data = self.call("GET", "/api/status/status/u1/login")
        self.assertEqual(code, 200)  # a status query is answered, not refused
        self.assertIs(data["allowed"], False)  # ... but the next request would be
        self.assertIn(data["retry_after_seconds"], (1199, 1200))
        self.assertNotIn("retry-after", hdrs)
        # a key never seen: full, and looking does not create it
        data = self.ok("GET", "/api/status/status/nobody/login")
        self.assertEqual((data["allowed"], data["remaining_requests"]), (True, 3))

    def test_status_with_inline_policy(self):
        """GET /api/status takes the check's inline policy as query parameters, so a client
        that sends max_requests/window_duration_seconds with its checks sees the same key."""
        for _ in range(3):
            self.check("inl", "c", "a", max_requests=100, window_duration_seconds=60)
        q = "?max_requests=100&window_duration_seconds=60"
        data = self.ok("GET", "/api/status/inl/c/a" + q)
        self.assertEqual((data["limit"], data["remaining_requests"]), (100, 97))
        data = self.ok("GET", "/api/status/inl/c/a?window_duration_seconds=60&max_requests=1e2")
        self.assertEqual((data["limit"], data["remaining_requests"]), (100, 97))
        data = self.ok("GET", "/api/status/inl/c/a")  # the default policy: 97 clamped to 5
        self.assertEqual((data["limit"], data["remaining_requests"]), (5, 5))
        for query, msg in (("?max_requests=100", '"window_duration_seconds" is required'),
                           ("?max_requests=x&window_duration_seconds=1", "must be a number"),
                           ("?max_requests=-1&window_duration_seconds=1",  # as in a body
                            "max_requests/window_duration_seconds: invalid policy"),
                           ("?max_requests=0&window_duration_seconds=1", "max_requests"),
                           ("?max_requests=5&window_duration_seconds=0", "must be > 0"),
                           ("?max_requests=5&max_requests=6&window_duration_seconds=1",
                            "given twice"),
                           ("?limit=5", 'unknown query parameter "limit"')):
            self.error("GET", "/api/status/inl/c/a" + query, contains=msg)
        self.assertEqual(self.ok("GET", "/api/status/inl/c/a" + q)["remaining_requests"], 97)

    def test_status_answers_at_its_place_with_its_inline_policy(self):
        """Whether the next request would pass is answered at the status's place in the
        connection's order, under the status's inline policy. It was sl_peek's answer when
        the reply was written: after the checks pipelined behind the status (allowed false
        with one unit left, then the check passed), and under the default policy (a key
        exhausted under its inline policy read as allowed)."""
        self.rule("place", "a", bucket(5))
        self.check("place", "u", "a", cost=4)
        with connect(self.port) as s:
            s.sendall(request("GET", "/api/status/place/u/a") +
                      request("POST", "/api/check_and_consume", check_body("place", "u", "a")))
            rd = Reader(s)
            code, _, body = rd.response()
            status = json.loads(body)
            code2, _, body2 = rd.response()
        self.assertEqual((code, code2), (200, 200), (body, body2))
        self.assertEqual(status["remaining_requests"], 1)
        self.assertIs(status["allowed"], True, status)
        self.assertEqual(status["retry_after_seconds"], 0, status)
        self.assertIs(json.loads(body2)["allowed"], True)
        # a key exhausted under its inline policy, looked at with that policy
        inline = bucket(10, window=1000)
        code, _, data = self.check("placeinl", "u", "a", cost=10, **inline)
        self.assertEqual(code, 200, data)
        code, _, data = self.check("placeinl", "u", "a", **inline)
        self.assertEqual(code, 429, data)
        data = self.ok("GET", "/api/status/placeinl/u/a?max_requests=10"
                       "&window_duration_seconds=1000")
        self.assertEqual(data["remaining_requests"], 0)
        self.assertIs(data["allowed"], False, data)
        self.assertIn(data["retry_after_seconds"], (99, 100))

    def test_status_query_numbers_as_a_body_writes_them(self):
        """The query's numbers are read as a body's are (JSON's number grammar, the same
        range checks): what a body refuses is a 400 naming the parameter, not another limit
        (strtod read 0x10 as 16 and 010 as 10)."""
        url = "/api/status/qnum/c/a?max_requests=%s&window_duration_seconds=%s"
        for bad in ("0x10", "010", "00", "+5", "5.", ".5", "1.e2", "inf", "nan", "-inf",
                    "Infinity", "1e400", "", "1e", "--1", "5%20", "0x1p3", "true", '"5"'):
            self.error("GET", url % (bad, 60),
                       contains='query parameter "max_requests" must be a number')
            self.error("GET", url % (60, bad),
                       contains='query parameter "window_duration_seconds" must be a number')
            body = ('{"tenant_id": "qnum", "client_id": "c", "action_type": "a", '
                    '"max_requests": %s, "window_duration_seconds": 60}' % bad)
            self.assertEqual(self.call("POST", "/api/check_and_consume", body)[0], 400, bad)
        self.error("GET", "/api/status/qnum/c/a?max_requests=0x10&window_duration_seconds=010",
                   contains='"max_requests"')
        self.error("GET", "/api/status/qnum/c/a?max_requests=16&window_duration_seconds=010",
                   contains='"window_duration_seconds"')
        # a number a body takes is taken: the same key, the same limit
        for good, limit in (("16", 16), ("16.0", 16), ("1.6e1", 16), ("160E-1", 16),
                            ("1e+1", 10), ("0.5e2", 50)):
            data = self.ok("GET", url % (good, "6e1"))
            self.assertEqual((data["limit"], data["remaining_requests"]), (limit, limit), good)
        self.check("qnum", "c", "a", max_requests=16, window_duration_seconds=60)
        data = self.ok("GET", url % ("16", "60.0"))
        self.assertEqual((data["limit"], data["remaining_requests"]), (16, 15))

    def test_status_percent_decoding(self):
        tenant, client, action = "ten ant/é", "user@example.com?x=1&y", "log%in"
        self.rule(urllib.parse.quote(tenant, safe=""), urllib.parse.quote(action, safe=""),
                  bucket(9))
        self.assertEqual(self.check(tenant, client, action)[2]["remaining_requests"], 8)
        q = lambda s: urllib.parse.quote(s, safe="")
        data = self.ok("GET", f"/api/status/{q(tenant)}/{q(client)}/{q(action)}")
        self.assertEqual((data["limit"], data["remaining_requests"]), (9, 8))
        # the query string is not part of the path; it takes only the check's inline policy,
        # strictly, as bodies are taken (a misspelt parameter would silently change the limit)
        data = self.ok("GET", f"/api/status/{q(tenant)}/{q(client)}/{q(action)}?#frag")
        self.assertEqual(data["remaining_requests"], 8)
        self.error("GET", f"/api/status/{q(tenant)}/{q(client)}/{q(action)}?verbose=1",
                   contains='unknown query parameter "verbose"')
        self.error("GET", "/api/status/t/%zz/a", contains="percent-encoding")
        self.error("GET", "/api/status/t/c%2/a", contains="percent-encoding")
        self.error("GET", "/api/status/t//a", contains="SL_EKEYEMPTY")

    def test_not_found_and_method_not_allowed(self):
        for path in ("/", "/api", "/api/healthz", "/api/health/", "/api/status/t/c",
                     "/api/status/t/c/a/x", "/api/config/tenant", "/metrics/x"):
            self.error("GET", path, status=404, contains="no such endpoint")
        for method, path, allow in (("POST", "/api/health", "GET, HEAD"),
                                    ("GET", "/api/check_and_consume", "POST"),
                                    ("DELETE", "/api/config", "GET, HEAD"),
                                    ("POST", "/api/config/tenant/t", "GET, HEAD, PUT, DELETE"),
                                    ("POST", "/api/config/tenant/t/client/c/tier",
                                     "GET, HEAD, PUT, DELETE"),
                                    ("PATCH", "/api/config/global", "GET, HEAD, PUT")):
            _, hdrs = self.error(method, path, status=405, contains="not allowed")
            self.assertEqual(hdrs["allow"], allow)

    def test_head(self):
        _, get_hdrs, _ = self.call("GET", "/api/health")
        code, hdrs, data = self.call("HEAD", "/api/health")
        self.assertEqual((code, data), (200, b""))
        self.assertEqual(hdrs["content-length"], get_hdrs["content-length"])

    def test_release_concurrency_lease(self):
        self.rule("lease", "job", {"algorithm": "concurrency", **bucket(1)})
        code, _, first = self.check("lease", "w1", "job")
        self.assertEqual(code, 200)
        self.assertIsInstance(first["lease_id"], int)
        code, _, second = self.check("lease", "w1", "job")
        self.assertEqual(code, 429)
        self.assertIsNone(second["lease_id"])
        body = dict(check_body("lease", "w1", "job"), lease_id=first["lease_id"])
        self.assertEqual(self.ok("POST", "/api/release", body), {"released": True})
        self.error("POST", "/api/release", body, status=404, contains="SL_ELEASE")
        code, _, third = self.check("lease", "w1", "job")
        self.assertEqual(code, 200)
        self.assertNotEqual(third["lease_id"], first["lease_id"])
        self.error("POST", "/api/release", check_body("lease", "w1", "job"),
                   contains='missing field "lease_id"')
        self.error("POST", "/api/release", dict(body, lease_id=0), contains='"lease_id"')
        self.error("POST", "/api/release", dict(body, lease=1), contains='unknown field "lease"')
        # a plain bucket hands out no leases
        self.rule("lease", "plain", bucket(5))
        self.assertNotIn("lease_id", self.check("lease", "w1", "plain")[2])

    def test_curl(self):
        curl = shutil.which("curl")
        if not curl:
            self.skipTest("curl is not installed")
        self.rule("curl", "search", bucket(2))
        url = f"http://127.0.0.1:{self.port}/api/check_and_consume"
        body = json.dumps(check_body("curl", "10.0.0.7", "search"))
        out = []
        for _ in range(3):
            p = subprocess.run([curl, "-sS", "-i", "-H", "Content-Type: application/json",
                                "--data", body, url], capture_output=True, timeout=TIMEOUT)
            self.assertEqual(p.returncode, 0, p.stderr)
            out.append(p.stdout.decode())
        self.assertRegex(out[0], r"^HTTP/1.1 200 OK\r\n")
        self.assertIn('"remaining_requests": 1', out[0])
        self.assertRegex(out[2], r"^HTTP/1.1 429 Too Many Requests\r\n")
        self.assertRegex(out[2], r"\r\nRetry-After: (1799|1800)\r\n")  # 2 an hour: 1800 s each


# ---- configuration -------------------------------------------------------------------------------

ALL_ALGORITHMS = [
    {"algorithm": "token_bucket", "max_requests": 10, "window_duration_seconds": 5},
    {"algorithm": "token_bucket", "capacity": 20, "refill_rate": 0.5},
    {"algorithm": "token_bucket", "max_requests": 10, "window_duration_seconds": 1, "burst": 30},
    {"algorithm": "leaky_bucket", "max_requests": 4, "window_duration_seconds": 2},
    {"algorithm": "fixed_window", "max_requests": 100, "window_duration_seconds": 60},
    {"algorithm": "sliding_window", "max_requests": 100, "window_duration_seconds": 60},
    {"algorithm": "sliding_log", "max_requests": 50, "window_duration_seconds": 10},
    {"algorithm": "concurrency", "max_requests": 3, "window_duration_seconds": 30},
    {"algorithm": "burst_reserve", "max_requests": 10, "window_duration_seconds": 1,
     "reserve_rate": 2, "reserve_cap": 20},
    {"limits": [{"algorithm": "token_bucket", "max_requests": 10, "window_duration_seconds": 1},
                {"algorithm": "fixed_window", "max_requests": 1000, "window_duration_seconds": 86400}]},
]


class Config(HttpCase):

    def test_rules_round_trip(self):
        """What GET answers, PUT takes back unchanged: every algorithm, stacked limits too."""
        for i, policy in enumerate(ALL_ALGORITHMS):
            path = f"/api/config/tenant/rt/action/a{i}"
            stored = self.ok("PUT", path, policy)
            self.assertEqual(self.ok("GET", path), stored)
            self.assertEqual(self.ok("PUT", path, stored), stored)
            self.assertEqual(self.ok("GET", path), stored)
        self.assertEqual(self.ok("GET", "/api/config/tenant/rt/action/a1"),
                         {"algorithm": "token_bucket", "capacity": 20, "refill_rate": 0.5})
        self.assertEqual(self.ok("GET", "/api/config/tenant/rt/action/a0"),
                         {"algorithm": "token_bucket", "capacity": 10, "refill_rate": 2})
        self.assertEqual(self.ok("GET", "/api/config/tenant/rt/action/a2")["capacity"], 30)
        self.assertEqual(self.ok("GET", "/api/config/tenant/rt/action/a4"), ALL_ALGORITHMS[4])

    def test_scopes_and_tenant_view(self):
        self.ok("PUT", "/api/config/tenant/scoped", bucket(100))
        self.ok("PUT", "/api/config/tenant/scoped/action/login", bucket(5))
        self.ok("PUT", "/api/config/tenant/scoped/client/vip/action/login", bucket(1))
        # client override > action rule > tenant default
        self.assertEqual(self.check("scoped", "vip", "login")[2]["limit"], 1)
        self.assertEqual(self.check("scoped", "other", "login")[2]["limit"], 5)
        self.assertEqual(self.check("scoped", "other", "search")[2]["limit"], 100)
        view = self.ok("GET", "/api/config/tenant/scoped")
        self.assertEqual(view["tenant_id"], "scoped")
        self.assertEqual(view["default_policy"]["capacity"], 100)
        self.assertEqual(list(view["actions"]), ["login"])
        self.assertEqual(view["actions"]["login"]["capacity"], 5)
        self.assertEqual(len(view["clients"]), 1)
        self.assertEqual({k: view["clients"][0][k] for k in ("client_id", "action_type")},
                         {"client_id": "vip", "action_type": "login"})
        everything = self.ok("GET", "/api/config")
        mine = [r for r in everything["rules"] if r["tenant_id"] == "scoped"]
        self.assertEqual(sorted(r["scope"] for r in mine), ["action", "client", "tenant"])
        for key in ("default_policy", "max_global_concurrent_requests", "max_tenant_queue_size",
                    "tiers", "rules"):
            self.assertIn(key, everything)
        # deleting
        self.assertEqual(self.ok("DELETE", "/api/config/tenant/scoped/client/vip/action/login"),
                         {"deleted": True})
        self.assertEqual(self.check("scoped", "vip", "login")[2]["limit"], 5)
        self.ok("DELETE", "/api/config/tenant/scoped/action/login")
        self.ok("DELETE", "/api/config/tenant/scoped")
        for path in ("/api/config/tenant/scoped", "/api/config/tenant/scoped/action/login",
                     "/api/config/tenant/scoped/client/vip/action/login"):
            self.error("DELETE", path, status=404, contains="SL_ENOTFOUND")
        self.error("GET", "/api/config/tenant/scoped/action/login", status=404,
                   contains="SL_ENOTFOUND")
        view = self.ok("GET", "/api/config/tenant/scoped")
        self.assertEqual(view, {"tenant_id": "scoped", "default_policy": None, "actions": {},
                                "clients": [], "client_tiers": {}})

    def test_policy_errors(self):
        path = "/api/config/tenant/bad/action/a"
        self.error("PUT", path, dict(bucket(5), colour=1), contains='unknown field "colour"')
        self.error("PUT", path, dict(bucket(5), algorithm="warp_drive"),
                   contains='"algorithm"')
        self.error("PUT", path, {"algorithm": "fixed_window", "burst": 3, **bucket(5)},
                   contains='"burst" does not apply to algorithm fixed_window')
        self.error("PUT", path, {"max_requests": 5}, contains='missing field "window_duration_seconds"')
        self.error("PUT", path, {"capacity": 5}, contains='missing field "refill_rate"')
        self.error("PUT", path, {"capacity": 5, "refill_rate": 1, "max_requests": 5},
                   contains="either")
        self.error("PUT", path, bucket(0), contains="SL_ECAPACITY")
        self.error("PUT", path, bucket(2.5), contains="SL_ECAPACITY")
        self.error("PUT", path, bucket("5"), contains='"max_requests" must be a number')
        self.error("PUT", path, bucket(5, -1), contains='"window_duration_seconds" must be > 0')
        self.error("PUT", path, {"algorithm": "fixed_window", **bucket(5, 366 * 86400 + 1)},
                   contains="SL_EWINDOW")
        self.error("PUT", path, {"limits": []}, contains='"limits"')
        self.error("PUT", path, {"limits": [bucket(1)] * 5}, contains='"limits"')
        self.error("PUT", path, {"limits": [bucket(1), bucket(0)]},
                   contains='limits[1]: field "max_requests"')
        # a library error names the field the client wrote
        self.error("PUT", path, bucket(1.5), contains='field "max_requests": capacity')
        self.error("PUT", path, {"capacity": 5, "refill_rate": -1},
                   contains='field "refill_rate": rate')
        self.error("PUT", path, dict(bucket(5), burst=0), contains='field "burst"')
        self.error("PUT", path, {"algorithm": "fixed_window", **bucket(5, 0.0001)},
                   contains='field "window_duration_seconds": window')
        self.error("PUT", path, {"algorithm": "burst_reserve", **bucket(5, 1),
                                 "reserve_rate": 1, "reserve_cap": 2.5},
                   contains='field "reserve_cap"')
        self.error("PUT", path, {"limits": [bucket(1)], "max_requests": 3},
                   contains='cannot be used with "limits"')
        self.error("PUT", path, "not json", contains="invalid JSON at line 1")
        self.error("GET", path, status=404)  # nothing was stored

    def test_tiers(self):
        self.ok("PUT", "/api/config/tiers/gold", bucket(50))
        self.ok("PUT", "/api/config/tiers/free", bucket(2))
        tiers = self.ok("GET", "/api/config/tiers")["tiers"]
        self.assertEqual(tiers["gold"]["capacity"], 50)
        self.assertEqual(self.ok("GET", "/api/config/tiers/gold")["capacity"], 50)
        self.assertEqual(self.ok("GET", "/api/config")["tiers"]["free"]["capacity"], 2)
        path = "/api/config/tenant/tiered/client/c1/tier"
        self.assertEqual(self.ok("PUT", path, {"tier": "gold"}),
                         {"tenant_id": "tiered", "client_id": "c1", "tier": "gold"})
        self.assertEqual(self.check("tiered", "c1", "any")[2]["limit"], 50)
        self.assertEqual(self.check("tiered", "c2", "any")[2]["limit"], 5)  # global default
        # an assignment reads back, alone and in the tenant's configuration
        self.assertEqual(self.ok("GET", path),
                         {"tenant_id": "tiered", "client_id": "c1", "tier": "gold"})
        self.assertEqual(self.ok("GET", "/api/config/tenant/tiered")["client_tiers"],
                         {"c1": "gold"})
        self.assertIn({"tenant_id": "tiered", "client_id": "c1", "tier": "gold"},
                      self.ok("GET", "/api/config")["tier_assignments"])
        self.error("GET", "/api/config/tenant/tiered/client/c2/tier", status=404,
                   contains="no tier is assigned")
        self.error("DELETE", "/api/config/tiers/gold", status=409, contains="SL_ETIERINUSE")
        self.error("PUT", path, {"tier": "platinum"}, contains="unknown tier")
        self.error("PUT", path, {"tier": ""}, contains="tier names")
        self.error("PUT", path, {"level": "gold"}, contains='unknown field "level"')
        self.error("PUT", path, {}, contains='missing field "tier"')
        self.assertEqual(self.ok("DELETE", path), {"deleted": True})
        self.error("DELETE", path, status=404, contains="no tier is assigned")  # gone already
        self.assertEqual(self.ok("GET", "/api/config/tenant/tiered")["client_tiers"], {})
        self.assertEqual(self.check("tiered", "c1", "any")[2]["limit"], 5)
        self.ok("DELETE", "/api/config/tiers/gold")
        self.error("DELETE", "/api/config/tiers/gold", status=404, contains="SL_ETIER")
        self.error("GET", "/api/config/tiers/gold", status=404, contains="SL_ETIER")
        self.assertNotIn("gold", self.ok("GET", "/api/config/tiers")["tiers"])


class GlobalConfig(HttpCase):
    """A server of its own: these tests change the global default."""

    def test_defaults(self):
        g = self.ok("GET", "/api/config/global")
        self.assertEqual(g["max_global_concurrent_requests"], 10000)
        self.assertEqual(g["max_tenant_queue_size"], 1000)
        self.assertEqual(g["default_policy"],
                         {"algorithm": "token_bucket", "capacity": 5, "refill_rate": 1})

    def test_put_global(self):
        body = {"max_global_concurrent_requests": 5000, "max_tenant_queue_size": 0,
                "default_policy": bucket(7)}
        g = self.ok("PUT", "/api/config/global", body)
        self.assertEqual((g["max_global_concurrent_requests"], g["max_tenant_queue_size"]),
                         (5000, 0))
        self.assertEqual(self.ok("GET", "/api/config")["max_tenant_queue_size"], 0)
        self.assertEqual(self.check("nobody", "c", "a")[2]["limit"], 7)
        g = self.ok("PUT", "/api/config/global", {"max_tenant_queue_size": 1000,
                                                  "max_global_concurrent_requests": 10000})
        self.assertEqual(g["default_policy"]["capacity"], 7)  # untouched
        # what GET returns, PUT accepts; the ranges are RESP's SL.ADMISSION's (test_admission)
        self.ok("PUT", "/api/config/global", {"max_queue_wait_ms": 3600000})
        g = self.ok("GET", "/api/config/global")
        self.assertEqual(self.ok("PUT", "/api/config/global", g), g)
        self.error("PUT", "/api/config/global", {"max_queue_wait_ms": 3600001},
                   contains='"max_queue_wait_ms"')
        self.error("PUT", "/api/config/global", {"max_tenant_queue_size": 100000001},
                   contains='"max_tenant_queue_size"')
        self.ok("PUT", "/api/config/global", {"max_queue_wait_ms": 1000})

    def test_put_global_is_all_or_nothing(self):
        before = self.ok("GET", "/api/config/global")
        for bad, field in (({"max_global_concurrent_requests": 0}, "max_global_concurrent_requests"),
                           ({"max_tenant_queue_size": -1}, "max_tenant_queue_size"),
                           ({"max_tenant_queue_size": "9"}, "max_tenant_queue_size"),
                           ({"default_policy": bucket(0)}, "default_policy"),
                           ({"default_policy": {"x": 1}}, 'unknown field "x"'),
                           ({"queue": 1}, 'unknown field "queue"')):
            body = {"max_global_concurrent_requests": 1, "default_policy": bucket(99), **bad}
            self.error("PUT", "/api/config/global", body, contains=field)
            self.assertEqual(self.ok("GET", "/api/config/global"), before)


class DefaultTenantWeight(HttpCase):
    """A server of its own: these tests change the default tenant's weight."""

    def test_default_tenant_has_one_weight(self):
        """"default" and "" are one tenant (as for rules): one weight, whichever spelling sets
        or reads it, and one entry in GET /api/config (there were two, under one JSON key)."""
        url = "/api/config/tenant/%s/weight"
        self.assertEqual(self.ok("PUT", url % "default", {"weight": 5}),
                         {"tenant_id": "default", "weight": 5})
        self.assertEqual(self.ok("GET", url % ""), {"tenant_id": "default", "weight": 5})
        self.assertEqual(self.ok("PUT", url % "", {"weight": 7}),
                         {"tenant_id": "default", "weight": 7})
        for t in ("default", "", "d%65fault"):
            self.assertEqual(self.ok("GET", url % t), {"tenant_id": "default", "weight": 7}, t)

        def weights():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
            conn.request("GET", "/api/config")
            text = conn.getresponse().read()
            conn.close()
            # the members as sent: a repeated key would vanish in a dict
            doc = json.loads(text, object_pairs_hook=lambda pairs: pairs)
            return dict(doc)["tenant_weights"]

        self.assertEqual(weights(), [("default", 7)])
        self.ok("DELETE", url % "default")
        self.assertEqual(self.ok("GET", url % ""), {"tenant_id": "default", "weight": 1})
        self.assertEqual(weights(), [])
        # other tenants are not folded in
        self.ok("PUT", url % "defaults", {"weight": 2})
        self.assertEqual(self.ok("GET", url % "default")["weight"], 1)
        self.ok("DELETE", url % "defaults")


class Auth(HttpCase):
    server_args = ("--admin-token", "s3cret-token")

    def test_config_changes_need_the_token(self):
        path = "/api/config/tenant/auth/action/a"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                        {"Authorization": "Basic czNjcmV0LXRva2Vu"},
                        {"Authorization": "Bearer s3cret-token-and-more"},
                        {"Authorization": "Bearer s3cret-toke"}):
            code, hdrs, data = self.call("PUT", path, bucket(5), headers)
            self.assertEqual(code, 401, headers)
            self.assertIn("Authorization", data["error"])
            self.assertTrue(hdrs["www-authenticate"].startswith("Bearer"))
        for method in ("DELETE",):
            self.assertEqual(self.call(method, path)[0], 401)
        self.assertEqual(self.call("PUT", "/api/config/global", {})[0], 401)
        good = {"Authorization": "Bearer s3cret-token"}
        self.assertEqual(self.call("PUT", path, bucket(5), good)[0], 200)
        self.assertEqual(self.call("PUT", path, bucket(5),
                                   {"Authorization": "bearer  s3cret-token"})[0], 200)
        self.assertEqual(self.call("DELETE", path, None, good)[0], 200)
        # reading and deciding need no token
        self.assertEqual(self.call("GET", "/api/config")[0], 200)
        self.assertEqual(self.check("auth", "c", "a")[0], 200)


# ---- the protocol -----------------------------------------------------------------------------

class Protocol(HttpCase):

    def setUp(self):
        self.ok("PUT", "/api/config/tenant/proto", bucket(1000))

    def test_keep_alive(self):
        with connect(self.port) as s:
            r = Reader(s)
            for i in range(20):
                s.sendall(request("POST", "/api/check_and_consume", check_body("proto", "ka", "a")))
                status, hdrs, body = r.response()
                self.assertEqual(status, 200)
                self.assertNotIn("connection", hdrs)
                self.assertEqual(json.loads(body)["remaining_requests"], 999 - i)

    def test_pipelined_config_change_follows_earlier_checks(self):
        """A configuration change pipelined behind checks runs after they are decided, and the
        checks after it see it: the pipeline means what it says, in order. However the target
        is spelled: the absolute form and percent-encoded segments route to the same change
        (they once skipped the wait, and the earlier check saw the later rule)."""
        for n, path in enumerate(["/api/config/tenant/order%d/action/a",
                                  "http://localhost/api/config/tenant/order%d/action/a",
                                  "/api/%%63onfig/tenant/order%d/action/a"]):
            tenant = "order%d" % n
            path = path % n
            reqs = [request("POST", "/api/check_and_consume", check_body(tenant, "c", "a")),
                    request("PUT", path, bucket(1)),
                    request("POST", "/api/check_and_consume", check_body(tenant, "c", "a")),
                    request("DELETE", path),
                    request("POST", "/api/check_and_consume", check_body(tenant, "d", "a"))]
            with connect(self.port) as s:
                s.sendall(b"".join(reqs))  # one write
                r = Reader(s)
                got = [r.response() for _ in reqs]
            limits = [json.loads(body).get("limit") for _, _, body in got]
            self.assertEqual([status for status, _, _ in got], [200] * 5, path)
            self.assertEqual(limits[2], 1, path)
            self.assertNotEqual(limits[0], 1, path)
            self.assertEqual(limits[4], limits[0], path)

    def test_pipelined_release_follows_earlier_checks(self):
        """A release pipelined behind a check runs after it is decided (it once ran at once,
        so the earlier check got the lease the later release freed)."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        c.request("PUT", "/api/config/tenant/plr/action/job",
                  json.dumps({"algorithm": "concurrency", **bucket(1)}))
        resp = c.getresponse()
        resp.read()
        self.assertEqual(resp.status, 200)
        c.request("POST", "/api/check_and_consume", json.dumps(check_body("plr", "w", "job")))
        lease = json.loads(c.getresponse().read())["lease_id"]
        c.close()
        reqs = [request("POST", "/api/check_and_consume", check_body("plr", "w", "job")),
                request("POST", "/api/release", dict(check_body("plr", "w", "job"),
                                                     lease_id=lease)),
                request("POST", "/api/check_and_consume", check_body("plr", "w", "job"))]
        with connect(self.port) as s:
            s.sendall(b"".join(reqs))  # one write
            r = Reader(s)
            got = [r.response() for _ in reqs]
        self.assertEqual([status for status, _, _ in got], [429, 200, 200])

    def test_pipelined_in_order(self):
        reqs = []
        expect = []
        for i in range(30):
            reqs.append(request("POST", "/api/check_and_consume",
                                check_body("proto", "pipe", "a", cost=1)))
            expect.append((200, 999 - i))
            if i % 3 == 0:
                reqs.append(request("GET", "/api/health"))
                expect.append((200, None))
            if i % 5 == 0:
                reqs.append(request("GET", "/nope"))
                expect.append((404, None))
            if i % 7 == 0:
                reqs.append(request("GET", "/api/status/proto/pipe/a"))
                expect.append((200, 999 - i))
        with connect(self.port) as s:
            s.sendall(b"".join(reqs))  # one write
            r = Reader(s)
            got = []
            for _ in expect:
                status, _, body = r.response()
                data = json.loads(body)
                got.append((status, data.get("remaining_requests")))
            self.assertEqual(got, expect)

    def test_chunked_body(self):
        body = json.dumps(check_body("proto", "chunky", "a", cost=3)).encode()
        parts = [body[:5], body[5:20], body[20:]]
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
        with connect(self.port) as s:
            s.sendall(request("POST", "/api/check_and_consume", None,
                              [("Transfer-Encoding", "chunked")]) + chunked)
            status, _, data = Reader(s).response()
            self.assertEqual(status, 200)
            self.assertEqual(json.loads(data)["remaining_requests"], 997)

    def test_body_in_pieces(self):
        """A request split across many writes, even inside the request line."""
        data = request("POST", "/api/check_and_consume", check_body("proto", "slow", "a"))
        with connect(self.port) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(0, len(data), 7):
                s.sendall(data[i:i + 7])
            status, _, _ = Reader(s).response()
            self.assertEqual(status, 200)

    def test_host_header_required_once(self):
        """RFC 9112 3.2: an HTTP/1.1 request without Host, or any request with two, is a 400
        that closes the connection; HTTP/1.0 may leave Host out."""
        cases = [(b"GET /api/health HTTP/1.1\r\n\r\n", "without a Host header"),
                 (b"GET /api/health HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
                  "more than one Host header"),
                 (b"GET /api/health HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
                  "more than one Host header")]
        for raw, why in cases:
            with connect(self.port) as s:
                # a good request first: the bad one is answered after it, then the end
                s.sendall(request("POST", "/api/check_and_consume", check_body("proto", "h", "a")) +
                          raw + request("GET", "/api/health"))
                r = Reader(s)
                self.assertEqual(r.response()[0], 200)
                status, hdrs, body = r.response()
                self.assertEqual((status, hdrs.get("connection")), (400, "close"), raw)
                self.assertIn(why, json.loads(body)["error"])
                self.assertEqual(s.recv(100), b"", "nothing after the 400")
        with connect(self.port) as s:  # HTTP/1.0 without Host; an empty Host value (RFC 9110 7.2)
            s.sendall(b"GET /api/health HTTP/1.0\r\n\r\n")
            self.assertEqual(Reader(s).response()[0], 200)
        with connect(self.port) as s:
            s.sendall(b"GET /api/health HTTP/1.1\r\nHost:\r\n\r\n")
            self.assertEqual(Reader(s).response()[0], 200)

    def test_expect_100_continue(self):
        body = json.dumps(check_body("proto", "expect", "a")).encode()
        head = request("POST", "/api/check_and_consume", None,
                       [("Expect", "100-continue"), ("Content-Length", str(len(body)))])
        with connect(self.port) as s:
            r = Reader(s)
            s.sendall(head)
            status, _, _ = r.response()
            self.assertEqual(status, 100)
            s.sendall(body)
            status, _, data = r.response()
            self.assertEqual(status, 200)
            self.assertEqual(json.loads(data)["remaining_requests"], 999)
            # the body sent along with the head: no interim response
            s.sendall(head + body)
            status, _, _ = r.response()
            self.assertEqual(status, 200)

    def test_expect_with_too_large_body(self):
        head = request("POST", "/api/check_and_consume", None,
                       [("Expect", "100-continue"), ("Content-Length", str(2 << 20))])
        with connect(self.port) as s:
            s.sendall(head)
            r = Reader(s)
            status, hdrs, data = r.response()
            self.assertEqual(status, 413)  # refused before the body is sent
            self.assertEqual(hdrs["connection"], "close")
            self.assertIn("error", json.loads(data))
            self.assertTrue(r.closed())

    def test_header_limit(self):
        def head_of(size):
            base = request("GET", "/api/health", None, [("X-Pad", "")])
            return request("GET", "/api/health", None, [("X-Pad", "p" * (size - len(base)))])
        exact = head_of(16384)
        self.assertEqual(len(exact), 16384)
        with connect(self.port) as s:
            s.sendall(exact)
            self.assertEqual(Reader(s).response()[0], 200)
        with connect(self.port) as s:
            s.sendall(head_of(16385))
            r = Reader(s)
            status, hdrs, data = r.response()
            self.assertEqual(status, 431)
            self.assertEqual(hdrs["connection"], "close")
            self.assertIn("16384", json.loads(data)["error"])
            self.assertTrue(r.closed())
        with connect(self.port) as s:  # far over, in one header, sent in pieces
            s.sendall(b"GET /api/health HTTP/1.1\r\nX-Pad: " + b"p" * 40000)
            r = Reader(s)
            self.assertEqual(r.response()[0], 431)
            self.assertTrue(r.closed())

    def test_body_limit(self):
        prefix = json.dumps(check_body("proto", "big", "a"))
        exact = prefix[:-1] + " " * ((1 << 20) - len(prefix)) + "}"
        self.assertEqual(len(exact), 1 << 20)
        with connect(self.port) as s:
            s.sendall(request("POST", "/api/check_and_consume", exact))
            self.assertEqual(Reader(s).response()[0], 200)
        with connect(self.port) as s:
            s.sendall(request("POST", "/api/check_and_consume", exact + " "))
            r = Reader(s)
            status, hdrs, _ = r.response()
            self.assertEqual((status, hdrs["connection"]), (413, "close"))
            self.assertTrue(r.closed())
        with connect(self.port) as s:  # chunked: only the total tells
            chunk = b" " * 65536
            s.sendall(request("POST", "/api/check_and_consume", None,
                              [("Transfer-Encoding", "chunked")]))
            r = Reader(s)
            for _ in range(17):
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            status, hdrs, _ = r.response()
            self.assertEqual((status, hdrs["connection"]), (413, "close"))

    def test_malformed(self):
        for junk in (b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                     b"POST /api/check_and_consume HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                     b"GET /api/health HTTP/1.1\r\nBad Header\r\n\r\n",
                     b"POST /api/release HTTP/1.1\r\nContent-Length: 1\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"):
            with connect(self.port) as s:
                s.sendall(request("GET", "/api/health") + junk + request("GET", "/api/health"))
                r = Reader(s)
                self.assertEqual(r.response()[0], 200)  # what came before is answered
                status, hdrs, data = r.response()
                self.assertEqual(status, 400, junk)
                self.assertEqual(hdrs["connection"], "close")
                self.assertIn("malformed HTTP request", json.loads(data)["error"])
                self.assertTrue(r.closed())
        text = self.call("GET", "/metrics")[2].decode()
        errors = re.search(r'^sluice_protocol_errors_total\{protocol="http"\} (\d+)$', text, re.M)
        self.assertGreaterEqual(int(errors.group(1)), 5)

    def test_http10(self):
        with connect(self.port) as s:
            s.sendall(request("GET", "/api/health", version="HTTP/1.0"))
            r = Reader(s)
            status, hdrs, _ = r.response()
            self.assertEqual((status, hdrs["connection"]), (200, "close"))
            self.assertTrue(r.closed())
        with connect(self.port) as s:
            r = Reader(s)
            for _ in range(3):
                s.sendall(request("GET", "/api/health", None, [("Connection", "keep-alive")],
                                  version="HTTP/1.0"))
                status, hdrs, _ = r.response()
                self.assertEqual((status, hdrs["connection"]), (200, "keep-alive"))

    def test_connection_close(self):
        with connect(self.port) as s:
            s.sendall(request("POST", "/api/check_and_consume", check_body("proto", "cc", "a"),
                              [("Connection", "close")]) + request("GET", "/api/health"))
            r = Reader(s)
            status, hdrs, _ = r.response()
            self.assertEqual((status, hdrs["connection"]), (200, "close"))
            self.assertTrue(r.closed())  # the request after it is not answered

    def test_head_on_keep_alive(self):
        with connect(self.port) as s:
            s.sendall(request("HEAD", "/api/status/proto/h/a") + request("GET", "/api/health"))
            r = Reader(s)
            status, hdrs, body = r.response(head_only=True)
            self.assertEqual(status, 200)
            self.assertGreater(int(hdrs["content-length"]), 0)
            status, _, body = r.response()
            self.assertEqual((status, json.loads(body)["status"]), (200, "ok"))


# ---- metrics ------------------------------------------------------------------------------------

class Backpressure(unittest.TestCase):
    def test_client_that_does_not_read_its_replies(self):
        """Requests sent without reading the replies (/metrics is large): the server stops
        parsing at 256 KiB of unwritten replies instead of buffering them all (it took ~35 MB
        per connection), keeps serving others, and closes the connection once its replies
        have not moved for --idle-timeout."""
        with Sluiced("--threads", 1, "--idle-timeout", 2, resp=False) as s:
            def rss_kib():
                with open("/proc/%d/status" % s.proc.pid) as f:
                    return int(re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M).group(1))
            for t in range(200):  # a /metrics of some size: 200 tenants
                self.assertEqual(raw_status(s.http_port, "t%d" % t), 200)
            before = rss_kib()
            hogs = []
            for _ in range(3):
                h = socket.create_connection(("127.0.0.1", s.http_port), timeout=5)
                h.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                try:
                    h.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 1500)
                except (socket.timeout, OSError):
                    pass
                hogs.append(h)
            time.sleep(0.5)
            grown = rss_kib() - before
            with open("/proc/%d/maps" % s.proc.pid) as f:
                maps = f.read()
            if "libasan" not in maps and "libtsan" not in maps:  # they keep freed memory
                self.assertLess(grown, 12 * 1024, "kB held for replies nobody reads")
            self.assertEqual(raw_status(s.http_port, "quiet"), 200)  # others are served
            # --idle-timeout 2: the hogs are closed (what the client then sees depends on TCP:
            # a reset, or the rest and a FIN, once it reads again). Each is closed 2-3 s after
            # its replies stopped moving, which under a sanitizer on a loaded machine may be
            # later than the 4 s this once waited: wait for it, for at most 15 s.
            deadline = time.monotonic() + 15
            while (s.log().count("has not read its replies") < 3 and
                   time.monotonic() < deadline):
                time.sleep(0.1)
            self.assertEqual(s.log().count("has not read its replies"), 3, s.log())
            for h in hogs:
                h.close()

    def test_pipeline_of_immediate_replies_is_answered_whole(self):
        """1,000 GET /api/config of ~16 KB each in one write (~16 MB of replies answered at
        once) all come back with nothing more sent. The worker takes up buffered input in
        bounded turns; after the last one it used to wait for another read or write, and the
        rest of the pipeline stalled until the client sent something else."""
        n = 1000
        with Sluiced("--threads", 1, resp=False) as s:
            conn = http.client.HTTPConnection("127.0.0.1", s.http_port, timeout=TIMEOUT)
            for t in range(100):  # a configuration of some size
                conn.request("PUT", f"/api/config/tenant/big{t}/action/a",
                             body=json.dumps(bucket(10)))
                r = conn.getresponse()
                self.assertEqual(r.status, 200, r.read())
                r.read()
            conn.close()
            with connect(s.http_port) as h:
                h.sendall(request("GET", "/api/config") * n)
                r, got = Reader(h), 0
                deadline = time.monotonic() + TIMEOUT
                try:
                    while got < n and time.monotonic() < deadline:
                        status, _, body = r.response()
                        self.assertEqual(status, 200)
                        self.assertGreater(len(body), 10000)
                        got += 1
                except socket.timeout:
                    pass
                self.assertEqual(got, n)


class ScrapeOffTheLoop(unittest.TestCase):
    def test_scrape_does_not_hold_up_other_connections(self):
        """/metrics with 65,536 tenants is ~12 MB and takes ~150 ms to build. It is built on
        the thread pool, so the one worker answers other connections meanwhile (it used to
        serve nothing until the exposition was built: every request behind a scrape waited)."""
        with Sluiced(threads=1) as s:
            # 3T requests over 4T random tenant names: the limiter counts 65,536 apart
            p = subprocess.run(["redis-benchmark", "-p", str(s.resp_port), "-c", "20", "-P",
                                "16", "-n", str(3 * 65536), "-r", str(4 * 65536), "SL.TAKE",
                                "t__rand_int__", "a", "c"], capture_output=True,
                               timeout=120)
            self.assertEqual(p.returncode, 0, p.stderr)
            scrape = socket.create_connection(("127.0.0.1", s.http_port), timeout=TIMEOUT)
            other = socket.create_connection(("127.0.0.1", s.http_port), timeout=TIMEOUT)
            scrape.sendall(request("GET", "/metrics"))
            time.sleep(0.02)  # the worker has read the scrape and is building it
            other.sendall(request("GET", "/api/health"))
            ready, _, _ = select.select([scrape, other], [], [], TIMEOUT)
            self.assertEqual(ready, [other], "the health check waited for the scrape")
            status, _, body = Reader(other).response()
            self.assertEqual((status, json.loads(body)["status"]), (200, "ok"))
            status, _, body = Reader(scrape).response()
            self.assertEqual(status, 200)
            self.assertGreater(body.count(b'sluice_decisions_total{tenant="t'), 65536)
            # the scrape's connection serves its next request as usual
            scrape.sendall(request("GET", "/api/health"))
            self.assertEqual(Reader(scrape).response()[0], 200)
            scrape.close()
            other.close()


class SlowRequest(unittest.TestCase):
    def test_request_trickling_in_is_cut_off(self):
        """A request whose head arrives a byte now and then (slowloris) keeps its connection
        active, so the idle timeout alone never closes it: a request not complete within
        --idle-timeout is. A complete request on a slow but honest link is not affected."""
        with Sluiced("--threads", 1, "--idle-timeout", 2, resp=False) as s:
            # "X-Slow: ..." one byte at a time
            trickle(s.http_port, b"GET /api/health HTTP/1.1\r\nHost: x\r\n", b"X")
            self.assertIn("request not complete after 2 s", s.log())
            self.assertEqual(raw_status(s.http_port, "t"), 200)

    def test_steady_pipeline_is_not_cut_off(self):
        """Requests that keep completing are not a request trickling in, even when every write
        ends in the middle of the next one (the timer once ran from the first partial
        request, however many completed after it)."""
        with Sluiced("--threads", 1, "--idle-timeout", 1, resp=False) as s:
            one = b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
            sent, got = send_split(s.http_port, one, 10, 3.0)  # three timeouts' worth
            self.assertEqual(got.count(b"HTTP/1.1 200"), sent, s.log())
            self.assertNotIn("request not complete", s.log())


def raw_status(port, tenant):
    body = json.dumps({"tenant_id": tenant, "client_id": "c", "action_type": "a"})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("POST", "/api/check_and_consume", body=body)
        return conn.getresponse().status
    finally:
        conn.close()


class Metrics(HttpCase):

    def test_exposition(self):
        self.ok("PUT", "/api/config/tenant/metered/action/a", bucket(2))
        for _ in range(3):
            self.check("metered", "c", "a")
        weird = 'we"ird\\ten\nant'
        self.check(weird, "c", "a")
        code, hdrs, body = self.call("GET", "/metrics")
        self.assertEqual(code, 200)
        self.assertTrue(hdrs["content-type"].startswith("text/plain; version=0.0.4"))
        text = body.decode()
        self.assertIn('sluice_decisions_total{tenant="metered",result="allowed"} 2\n', text)
        self.assertIn('sluice_decisions_total{tenant="metered",result="denied"} 1\n', text)
        self.assertIn('sluice_decisions_total{tenant="we\\"ird\\\\ten\\nant",result="allowed"} 1\n',
                      text)
        for family, kind in (("sluice_decisions_total", "counter"),
                             ("sluice_decision_duration_seconds", "histogram"),
                             ("sluice_keys", "gauge"), ("sluice_keys_evicted_total", "counter"),
                             ("sluice_keys_reclaimed_total", "counter"),
                             ("sluice_connections_open", "gauge"),
                             ("sluice_connections_total", "counter"),
                             ("sluice_connections_rejected_total", "counter"),
                             ("sluice_protocol_errors_total", "counter"),
                             ("sluice_http_requests_total", "counter"),
                             ("sluice_admission_rejected_total", "counter")):
            self.assertIn(f"# TYPE {family} {kind}\n", text)
            self.assertIn(f"# HELP {family} ", text)
        self.assertRegex(text, r'\nsluice_decision_duration_seconds_bucket\{le="\+Inf"\} \d+\n')
        self.assertRegex(text, r'\nsluice_http_requests_total\{endpoint="check_and_consume",'
                               r'code="429"\} [1-9]\d*\n')
        self.assertRegex(text, r"\nsluice_keys [1-9]\d*\n")

    def test_promtool(self):
        promtool = shutil.which("promtool")
        if not promtool:
            self.skipTest("promtool not found: apt-get install --no-install-recommends prometheus")
        self.check('odd "tenant"\\', "c", "a")
        self.check("", "c", "a")
        self.check("ü-tenant", "c", "a")
        text = self.call("GET", "/metrics")[2]
        p = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                           timeout=TIMEOUT)
        self.assertEqual(p.returncode, 0, (p.stdout + p.stderr).decode())


class MetricsTenantLabels(unittest.TestCase):
    def test_distinct_tenants_distinct_series(self):
        """Tenant ids are bytes (RESP): ones that are not UTF-8 print percent-encoded, and %
        too, so no two tenants share a series. \\xff, \\xfe and a real U+FFFD all printed as
        U+FFFD (found by review)."""
        with Sluiced() as s:
            with socket.create_connection(("127.0.0.1", s.resp_port), timeout=TIMEOUT) as k:
                for t in (b"\xff", b"\xfe", "\ufffd".encode(), b"%FF", b"50%", b"caf\xc3\xa9"):
                    k.sendall(resp_command("SL.TAKE", t, "a", "c"))
                    self.assertTrue(k.recv(4096).startswith(b"*7"))
            text = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % s.http_port,
                                          timeout=TIMEOUT).read().decode()
            series = re.findall(r'^sluice_decisions_total\{tenant="([^"]*)",result="allowed"\} 1$',
                                text, re.M)
            for label in ("%FF", "%FE", "\ufffd", "%25FF", "50%25", "café"):
                self.assertEqual(series.count(label), 1, (label, series))
            self.assertEqual(s.stop(), 0)


class MetricsTotals(HttpCase):
    """--metrics-tenants 0: one series per result however many tenants (Prometheus keeps a
    series per label value; a public API's tenants can be too many to scrape)."""

    server_args = ("--metrics-tenants", "0")

    def test_totals_without_tenant_labels(self):
        self.ok("PUT", "/api/config/tenant/t0/action/a", bucket(1))
        for i in range(40):
            self.check(f"t{i}", "c", "a")
        self.check("t0", "c", "a")  # t0's bucket of 1 is empty: denied
        text = self.call("GET", "/metrics")[2].decode()
        self.assertNotIn("tenant=", text)
        self.assertIn('sluice_decisions_total{result="allowed"} 40\n', text)
        self.assertIn('sluice_decisions_total{result="denied"} 1\n', text)
        self.assertIn("\nsluice_keys_evicted_total 0\n", text)
        self.assertIn("# TYPE sluice_decisions_total counter\n", text)
        promtool = shutil.which("promtool")
        if promtool:
            p = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                               capture_output=True, timeout=TIMEOUT)
            self.assertEqual(p.returncode, 0, (p.stdout + p.stderr).decode())

    def test_bad_value_is_refused(self):
        for v in ("2", "-1", "yes", ""):
            code, out, err = run_sluiced("--metrics-tenants", v, "--http-port", "0",
                                         "--resp-port", "0")
            self.assertEqual(code, 2, err)
            self.assertIn("--metrics-tenants", err)


if __name__ == "__main__":
    unittest.main()
