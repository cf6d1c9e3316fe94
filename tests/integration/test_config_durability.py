"""Configuration in --data-dir: every acknowledged change survives restarts and kill -9; a failed
write changes nothing; a bad file is refused with file, line, column and item."""
import http.client as httpclient
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import unittest

import redis

from harness import Sluiced, run_sluiced


def rcli(srv):
    return redis.Redis(host="127.0.0.1", port=srv.resp_port, socket_timeout=10)


def hreq(srv, method, path, body=None):
    c = httpclient.HTTPConnection("127.0.0.1", srv.http_port, timeout=10)
    c.request(method, path, body=None if body is None else json.dumps(body))
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, json.loads(data) if data else None


class ConfigDurabilityTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="sluice-data-")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def test_changes_survive_restart(self):
        with Sluiced("--data-dir", self.dir) as s:
            r = rcli(s)
            r.execute_command("SL.RULE", "SET", "ACTION", "acme", "login", "fixed_window",
                              "LIMIT", 3, "WINDOW", 60)
            r.execute_command("SL.RULE", "SET", "CLIENT", "acme", "login", "b\xfcb/%x",
                              "token_bucket", "LIMIT", 9, "RATE", 0.1)
            r.execute_command("SL.TIER", "SET", "gold", "token_bucket", "LIMIT", 100, "RATE", 10)
            r.execute_command("SL.TIER", "ASSIGN", "acme", "vip", "gold")
            r.execute_command("SL.WEIGHT", "SET", "acme", 4)
            self.assertEqual(hreq(s, "PUT", "/api/config/tenant/beta/weight", {"weight": 7}),
                             (200, {"tenant_id": "beta", "weight": 7}))
            self.assertEqual(hreq(s, "PUT", "/api/config/tenant/beta/weight", {"weight": 0})[0],
                             400)
            r.execute_command("SL.ADMISSION", "SET", "max_tenant_queue_size", 77)
            self.assertEqual(hreq(s, "PUT", "/api/config/tenant/other",
                                  {"max_requests": 10, "window_duration_seconds": 1})[0], 200)
            self.assertEqual(hreq(s, "PUT", "/api/config/global",
                                  {"default_policy": {"capacity": 8, "refill_rate": 2}})[0], 200)
            r.execute_command("SL.RULE", "SET", "ACTION", "acme", "gone", "token_bucket",
                              "LIMIT", 1, "RATE", 1)
            r.execute_command("SL.RULE", "DEL", "ACTION", "acme", "gone")
        with Sluiced("--data-dir", self.dir) as s:  # a graceful restart
            r = rcli(s)
            self.assertEqual(r.execute_command("SL.RULE", "GET", "ACTION", "acme", "login"),
                             b"fixed_window LIMIT 3 WINDOW 60")
            self.assertEqual(r.execute_command("SL.RULE", "GET", "CLIENT", "acme", "login",
                                               "b\xfcb/%x"), b"token_bucket LIMIT 9 RATE 0.1")
            self.assertIsNone(r.execute_command("SL.RULE", "GET", "ACTION", "acme", "gone"))
            self.assertEqual(r.execute_command("SL.TAKE", "acme", "x", "vip")[1], 100)  # tier
            self.assertEqual(r.execute_command("SL.WEIGHT", "GET", "acme"), 4)
            self.assertEqual(hreq(s, "GET", "/api/config/tenant/beta/weight")[1]["weight"], 7)
            self.assertEqual(hreq(s, "DELETE", "/api/config/tenant/beta/weight")[1]["weight"], 1)
            adm = r.execute_command("SL.ADMISSION", "GET")
            self.assertEqual(dict(zip(adm[0::2], adm[1::2]))[b"max_tenant_queue_size"], 77)
            self.assertEqual(r.execute_command("SL.TAKE", "other", "a", "c")[1], 10)
            self.assertEqual(r.execute_command("SL.DEFAULT", "GET"),
                             b"token_bucket LIMIT 8 RATE 2")
            with self.assertRaisesRegex(redis.ResponseError, "tier is assigned"):
                r.execute_command("SL.TIER", "DEL", "gold")
        with open(os.path.join(self.dir, "config.json")) as f:
            doc = json.load(f)
        self.assertEqual(doc["sluice_config"], 1)
        self.assertIn("rule/client/acme/login/b%C3%BCb%2F%25x", doc["items"])
        # no temp files left (state.snap: the final bucket-state snapshot; lock: the data dir's)
        self.assertEqual(sorted(os.listdir(self.dir)), ["config.json", "lock", "state.snap"])

    def test_one_server_per_data_dir_and_crash_leftovers_removed(self):
        """A second sluiced on a data dir in use exits 2 (it would rewrite the first one's
        files and lose its changes); temp files a crash left are removed at start, however
        many (a crash loop must not fill the disk), and a pid reused after a crash does not
        trip over them."""
        with Sluiced("--data-dir", self.dir, http=False) as s:
            code, _, err = run_sluiced("--data-dir", self.dir, "--resp-port", 0, "--http-port",
                                       1)
            self.assertEqual(code, 2, err)
            self.assertIn("in use (another sluiced uses it)", err)
            self.assertTrue(rcli(s).ping())
        leftovers = ["config.json.tmp.1", "config.json.tmp.1.0.5", "state.snap.tmp.1.0",
                     "state.snap.tmp.7.3.ff"]
        for name in leftovers:
            with open(os.path.join(self.dir, name), "w") as f:
                f.write("x" * 1000)
        with Sluiced("--data-dir", self.dir, http=False) as s:
            rcli(s).execute_command("SL.RULE", "SET", "ACTION", "t", "a", "token_bucket",
                                    "LIMIT", 3, "RATE", 1)
            self.assertIn("removed 4 temp files left by a crash", s.log())
        self.assertEqual(sorted(os.listdir(self.dir)), ["config.json", "lock", "state.snap"])

    def test_data_dir_overrides_config_file(self):
        cfg = os.path.join(self.dir, "..", os.path.basename(self.dir) + ".json")
        with open(cfg, "w") as f:
            json.dump({"threads": 1, "items": {
                "rule/action/acme/a": {"limits": [{"algorithm": "token_bucket", "limit": 1,
                                                   "rate": 1}]},
                "rule/action/acme/b": {"limits": [{"algorithm": "token_bucket", "limit": 2,
                                                   "rate": 1}]},
                "rule/action/acme/c": {"limits": [{"algorithm": "token_bucket", "limit": 3,
                                                   "rate": 1}]}}}, f)
        try:
            data = os.path.join(self.dir, "d")
            with Sluiced("--config", cfg, "--data-dir", data) as s:
                r = rcli(s)
                self.assertEqual(r.execute_command("SL.TAKE", "acme", "a", "x")[1], 1)
                r.execute_command("SL.RULE", "DEL", "ACTION", "acme", "a")  # from --config
                r.execute_command("SL.RULE", "SET", "ACTION", "acme", "b", "token_bucket",
                                  "LIMIT", 20, "RATE", 1)
            with Sluiced("--config", cfg, "--data-dir", data) as s:
                r = rcli(s)
                self.assertIsNone(r.execute_command("SL.RULE", "GET", "ACTION", "acme", "a"))
                self.assertEqual(r.execute_command("SL.TAKE", "acme", "b", "x")[1], 20)
                self.assertEqual(r.execute_command("SL.TAKE", "acme", "c", "x")[1], 3)
        finally:
            os.unlink(cfg)

    def test_config_file_items_in_any_spelling(self):
        """--config items written "default" for the default tenant or action, or with another
        percent-encoding of the same bytes, are the items the API changes: a deletion
        through the API removes them and stays removed after a kill -9. Two spellings of one
        item are refused."""
        cfg = os.path.join(self.dir, "..", os.path.basename(self.dir) + ".json")
        tb = lambda n: {"limits": [{"algorithm": "token_bucket", "limit": n, "rate": 1}]}
        with open(cfg, "w") as f:
            json.dump({"threads": 1, "items": {
                "rule/action/default/login": tb(10), "rule/action/acme/log%69n": tb(7),
                "tier/gold": tb(50), "assign/default/alice": "gold"}}, f)
        try:
            data = os.path.join(self.dir, "d")
            with Sluiced("--config", cfg, "--data-dir", data) as s:
                r = rcli(s)
                self.assertEqual(r.execute_command("SL.TAKE", "default", "login", "x")[1], 10)
                self.assertEqual(r.execute_command("SL.TAKE", "", "any", "alice")[1], 50)
                self.assertEqual(r.execute_command("SL.RULE", "DEL", "ACTION", "default",
                                                   "login"), 1)
                self.assertEqual(r.execute_command("SL.RULE", "DEL", "ACTION", "acme", "login"), 1)
                self.assertEqual(r.execute_command("SL.TIER", "UNASSIGN", "default", "alice"), 1)
                self.assertEqual(r.execute_command("SL.TIER", "DEL", "gold"), 1)
                s.stop(signal.SIGKILL)
            with Sluiced("--config", cfg, "--data-dir", data) as s:
                r = rcli(s)
                self.assertIsNone(r.execute_command("SL.RULE", "GET", "ACTION", "default",
                                                    "login"))
                self.assertIsNone(r.execute_command("SL.RULE", "GET", "ACTION", "acme", "login"))
                self.assertIsNone(r.execute_command("SL.TIER", "ASSIGNED", "default", "alice"))
                self.assertIsNone(r.execute_command("SL.TIER", "GET", "gold"))
            with open(cfg, "w") as f:
                f.write('{"items": {"rule/action/acme/login": %s,\n "rule/action/acme/log%%69n": %s}}'
                        % (json.dumps(tb(1)), json.dumps(tb(2))))
            code, _, err = run_sluiced("--config", cfg, "--resp-port", 0, "--http-port", 1)
            self.assertEqual(code, 2, err)
            self.assertIn('line 2, column 2: item "rule/action/acme/log%69n": the same item', err)
        finally:
            os.unlink(cfg)

    def test_default_tenant_weight_is_one_item(self):
        """The default tenant's weight, set as "default" or as "", is one item: one entry in
        config.json ("weight/", as rules write the default tenant), the same after a restart,
        from either front end."""
        with Sluiced("--data-dir", self.dir) as s:
            r = rcli(s)
            r.execute_command("SL.WEIGHT", "SET", "default", 5)
            self.assertEqual(hreq(s, "PUT", "/api/config/tenant//weight", {"weight": 7}),
                             (200, {"tenant_id": "default", "weight": 7}))
            self.assertEqual(r.execute_command("SL.WEIGHT", "GET", "default"), 7)
        with open(os.path.join(self.dir, "config.json")) as f:
            self.assertEqual(json.load(f)["items"], {"weight/": 7})
        with Sluiced("--data-dir", self.dir) as s:
            r = rcli(s)
            for t in ("default", ""):
                self.assertEqual(r.execute_command("SL.WEIGHT", "GET", t), 7)
                self.assertEqual(hreq(s, "GET", "/api/config/tenant/%s/weight" % t)[1],
                                 {"tenant_id": "default", "weight": 7})
            self.assertEqual(r.execute_command("SL.WEIGHT", "LIST"), [[b"", 7]])
            self.assertEqual(hreq(s, "GET", "/api/config")[1]["tenant_weights"], {"default": 7})
            r.execute_command("SL.WEIGHT", "SET", "", 1)  # back to the default: no item
        with open(os.path.join(self.dir, "config.json")) as f:
            self.assertEqual(json.load(f)["items"], {})

    def test_old_file_with_two_default_tenant_weights(self):
        """An older sluiced kept "weight/" and "weight/default" apart and may have written
        both. Such a file still loads, as one weight: the "default" spelling's (wherever it
        is in the file), with a warning; the next change writes the file without the other.
        In --config too. Two spellings of "default" stay refused, like any item's."""
        path = os.path.join(self.dir, "config.json")
        with open(path, "w") as f:  # as the old version wrote it: sorted keys
            f.write('{\n "items": {\n  "weight/": 7,\n  "weight/acme": 2,\n'
                    '  "weight/default": 5\n },\n "sluice_config": 1\n}\n')
        with Sluiced("--data-dir", self.dir) as s:
            r = rcli(s)
            for t in ("default", ""):
                self.assertEqual(r.execute_command("SL.WEIGHT", "GET", t), 5)
            self.assertEqual(r.execute_command("SL.WEIGHT", "GET", "acme"), 2)
            self.assertEqual(hreq(s, "GET", "/api/config")[1]["tenant_weights"],
                             {"default": 5, "acme": 2})
            self.assertIn('"weight/default" is used', s.log())
            r.execute_command("SL.WEIGHT", "SET", "acme", 3)
        with open(path) as f:
            self.assertEqual(json.load(f)["items"], {"weight/": 5, "weight/acme": 3})
        os.unlink(path)
        cfg = os.path.join(self.dir, "..", os.path.basename(self.dir) + ".json")
        try:
            for text, want in (('{"items": {"weight/default": 3, "weight/": 9}}', 3),
                               ('{"items": {"weight/": 9, "weight/d%65fault": 4}}', 4),
                               ('{"items": {"weight/": null, "weight/default": 6}}', 6)):
                with open(cfg, "w") as f:
                    f.write(text)
                with Sluiced("--config", cfg) as s:
                    self.assertEqual(rcli(s).execute_command("SL.WEIGHT", "GET", ""), want, text)
                    self.assertEqual(hreq(s, "GET", "/api/config")[1]["tenant_weights"],
                                     {"default": want})
            with open(cfg, "w") as f:
                f.write('{"items": {"weight/default": 3,\n "weight/d%65fault": 4}}')
            code, _, err = run_sluiced("--config", cfg, "--resp-port", 0, "--http-port", 1)
            self.assertEqual(code, 2, err)
            self.assertIn('line 2, column 2: item "weight/d%65fault": the same item', err)
        finally:
            os.unlink(cfg)

    def test_kill_9_during_writes(self):
        """Dozens of times: a stream of acknowledged rule changes, kill -9 at a random moment,
        restart: every acknowledged change is there, and the file is whole."""
        rng = random.Random(7)
        total_acked = 0
        for it in range(30):
            s = Sluiced("--data-dir", self.dir, "--threads", 1, http=False).start()
            acked = []
            stop = threading.Event()

            def writer():
                r = rcli(s)
                i = 0
                while not stop.is_set():
                    try:
                        r.execute_command("SL.RULE", "SET", "ACTION", "k%d" % it, "a%d" % i,
                                          "token_bucket", "LIMIT", i + 1, "RATE", 1)
                    except (redis.ConnectionError, redis.TimeoutError):
                        return
                    acked.append(i)
                    i += 1

            t = threading.Thread(target=writer)
            t.start()
            time.sleep(rng.uniform(0.0, 0.15))
            s.proc.send_signal(signal.SIGKILL)
            s.proc.wait()
            stop.set()
            t.join()
            total_acked += len(acked)
            with Sluiced("--data-dir", self.dir, "--threads", 1, http=False) as s2:
                r = rcli(s2)
                p = r.pipeline(transaction=False)
                for i in acked:
                    p.execute_command("SL.RULE", "GET", "ACTION", "k%d" % it, "a%d" % i)
                got = p.execute()
                for i, v in zip(acked, got):
                    self.assertEqual(v, b"token_bucket LIMIT %d RATE 1" % (i + 1),
                                     "iteration %d: acknowledged change %d lost" % (it, i))
        print(f"\nkill -9 x30: {total_acked} acknowledged changes, none lost")
        self.assertGreater(total_acked, 30)

    def test_bad_files_refused(self):
        path = os.path.join(self.dir, "config.json")
        cases = [
            ('{"sluice_config": 1, "items": {', r"config\.json: line 1, column \d+: "),
            ('', r"config\.json: line \d+, column \d+"),
            ('{"sluice_config": 1,\n "items": {\n  "rule/action/a/b": {"limits": '
             '[{"algorithm": "token_bucket", "limit": -1, "rate": 1}]}}}',
             r'config\.json: line 3, column 3: item "rule/action/a/b": capacity'),
            ('{"sluice_config": 1,\n "items": {"bogus/x": 1}}',
             r'config\.json: line 2, column 12: item "bogus/x": unknown item'),
            # escapes in a key count as decoded; the same text as a value is not the key
            ('{"sluice_config": 1,\n "items": {"assign/t/u": "bogus\\/x",\n   "bogus\\/x": 1}}',
             r'config\.json: line 3, column 4: item "bogus/x": unknown item'),
            ('{"sluice_config": 1,\n "items": {"assign/t/u": "gold"}}',
             r'config\.json: line 2, column 12: item "assign/t/u": unknown tier'),
            # an item applied in the server's own spelling is found as the file spells it
            # (found by fuzz_config)
            ('{"sluice_config": 1,\n "items": {"assign/%a0/u": "gold"}}',
             r'config\.json: line 2, column 12: item "assign/%A0/u": unknown tier'),
            ('{"sluice_config": 2, "items": {}}', r'line 1, column 2: field "sluice_config": version 2'),
            # a field the algorithm does not use is refused here too, as RESP and HTTP do
            ('{"sluice_config": 1,\n "items": {"rule/action/a/b": {"limits": [{"algorithm": '
             '"token_bucket", "limit": 5, "rate": 1, "window": 3}]}}}',
             r'line 2, column 12: item "rule/action/a/b": a field does not apply'),
            ('{"sluice_config": 1,\n "items": {"rule/action/a/b": {"limits": [{"algorithm": '
             '"fixed_window", "limit": 5}]}}}',
             r'item "rule/action/a/b": a field the limit.s algorithm needs is missing'),
            ('[1, 2]', r"expected \{\"sluice_config\""),
        ]
        for text, msg in cases:
            if os.path.isdir(path):
                os.rmdir(path)
            with open(path, "w") as f:
                f.write(text)
            code, _, err = run_sluiced("--data-dir", self.dir, "--resp-port", 0, "--http-port",
                                       1, "--threads", 1)
            self.assertEqual(code, 2, (text, err))
            self.assertEqual(len(err.strip().splitlines()), 1, err)
            self.assertRegex(err, msg)
        os.unlink(path)
        os.mkdir(path)  # a directory where the file should be: named as such
        code, _, err = run_sluiced("--data-dir", self.dir, "--resp-port", 0, "--http-port", 1,
                                   "--threads", 1)
        self.assertEqual(code, 2, err)
        self.assertIn("config.json: not a regular file", err)
        os.rmdir(path)

    def saved_one_rule(self):
        """The data dir's config.json after a sluiced saved one rule there: its text."""
        with Sluiced("--data-dir", self.dir) as s:
            rcli(s).execute_command("SL.RULE", "SET", "ACTION", "t", "a", "token_bucket",
                                    "LIMIT", 5, "RATE", 1)
        return open(os.path.join(self.dir, "config.json")).read()

    def test_failed_write_changes_nothing(self):
        """An injected write failure (ENOSPC): the client gets an error, the running
        configuration and the file are as they were."""
        before = self.saved_one_rule()
        env = dict(os.environ, SLUICED_FAIL_CONFIG_WRITES="1")
        with Sluiced("--data-dir", self.dir, env=env) as s:
            r = rcli(s)
            with self.assertRaisesRegex(redis.ResponseError, "not saved to disk .*nothing changed"):
                r.execute_command("SL.RULE", "SET", "ACTION", "t", "a", "token_bucket",
                                  "LIMIT", 50, "RATE", 1)
            with self.assertRaisesRegex(redis.ResponseError, "not saved"):
                r.execute_command("SL.RULE", "DEL", "ACTION", "t", "a")
            status, body = hreq(s, "PUT", "/api/config/tenant/t/action/a",
                                {"max_requests": 50, "window_duration_seconds": 1})
            self.assertEqual(status, 507)
            self.assertIn("No space left on device", body["error"])
            status, _ = hreq(s, "PUT", "/api/config/global", {"max_tenant_queue_size": 3})
            self.assertEqual(status, 507)
            self.assertEqual(r.execute_command("SL.RULE", "GET", "ACTION", "t", "a"),
                             b"token_bucket LIMIT 5 RATE 1")
            self.assertEqual(r.execute_command("SL.TAKE", "t", "a", "c")[1], 5)
            adm = r.execute_command("SL.ADMISSION", "GET")
            self.assertEqual(dict(zip(adm[0::2], adm[1::2]))[b"max_tenant_queue_size"], 1000)
        self.assertEqual(open(os.path.join(self.dir, "config.json")).read(), before)

    def test_failed_directory_sync_changes_nothing(self):
        """The directory's fsync failing after the rename (a failing disk; injected): the
        client is told nothing changed, and that is true of the file too: the previous one
        is put back, so a restart does not bring the change back."""
        before = self.saved_one_rule()
        env = dict(os.environ, SLUICED_FAIL_CONFIG_WRITES="2")
        with Sluiced("--data-dir", self.dir, env=env) as s:
            status, body = hreq(s, "PUT", "/api/config/tenant/t/action/x",
                                {"max_requests": 4, "window_duration_seconds": 1})
            self.assertEqual(status, 500)
            self.assertIn("Input/output error", body["error"])
            with self.assertRaisesRegex(redis.ResponseError, "not saved"):
                rcli(s).execute_command("SL.RULE", "DEL", "ACTION", "t", "a")
        self.assertEqual(open(os.path.join(self.dir, "config.json")).read(), before)
        with Sluiced("--data-dir", self.dir) as s:
            r = rcli(s)
            self.assertIsNone(r.execute_command("SL.RULE", "GET", "ACTION", "t", "x"))
            self.assertEqual(r.execute_command("SL.RULE", "GET", "ACTION", "t", "a"),
                             b"token_bucket LIMIT 5 RATE 1")

    def test_full_disk(self):
        """A real full filesystem: a small tmpfs as the data dir (skipped where the test may
        not mount one)."""
        mnt = os.path.join(self.dir, "small")
        os.mkdir(mnt)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", mnt],
                          capture_output=True).returncode != 0:
            self.skipTest("cannot mount a tmpfs here (not root?); the injected failure test "
                          "covers the error path")
        try:
            with Sluiced("--data-dir", mnt) as s:
                r = rcli(s)
                r.execute_command("SL.RULE", "SET", "ACTION", "t", "a", "token_bucket",
                                  "LIMIT", 5, "RATE", 1)
                fd = os.open(os.path.join(mnt, "filler"), os.O_WRONLY | os.O_CREAT)
                try:  # fill the disk
                    while True:
                        os.write(fd, b"x" * 4096)
                except OSError:
                    pass
                os.close(fd)
                before = open(os.path.join(mnt, "config.json")).read()
                big = "x" * 200
                with self.assertRaisesRegex(redis.ResponseError, "No space left"):
                    for i in range(100):
                        r.execute_command("SL.RULE", "SET", "CLIENT", "t", "a", big + str(i),
                                          "token_bucket", "LIMIT", 5, "RATE", 1)
                status, body = hreq(s, "PUT", "/api/config/tenant/t/action/a",
                                    {"max_requests": 50, "window_duration_seconds": 1})
                self.assertEqual(status, 507, body)
                self.assertEqual(r.execute_command("SL.TAKE", "t", "a", "c")[1], 5)
                self.assertEqual(open(os.path.join(mnt, "config.json")).read(), before)
                os.unlink(os.path.join(mnt, "filler"))
                self.assertEqual(hreq(s, "PUT", "/api/config/tenant/t/action/a",
                                      {"max_requests": 50, "window_duration_seconds": 1})[0],
                                 200)
            with Sluiced("--data-dir", mnt) as s:
                self.assertEqual(rcli(s).execute_command("SL.TAKE", "t", "a", "c")[1], 50)
        finally:
            subprocess.run(["umount", mnt])


if __name__ == "__main__":
    unittest.main()
