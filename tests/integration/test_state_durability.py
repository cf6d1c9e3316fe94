"""Bucket state across restarts: a client that exhausted its limit is still limited after a
restart; kill -9 hands back at most what one snapshot interval consumed; bad snapshots are moved
aside, never loaded, never deleted."""
import glob
import os
import random
import shutil
import signal
import tempfile
import threading
import time
import unittest

import redis

import subprocess

from harness import LogFile, Sluiced

SNAP = "state.snap"

M64 = (1 << 64) - 1
P1, P2, P3, P4, P5 = (11400714785074694791, 14029467366897019727, 1609587929392839161,
                      9650029242287828579, 2870177450012600261)


def xxh64(data, seed=0):
    """XXH64 (the snapshot's checksum), to forge a whole, checksummed file of another
    version."""
    rotl = lambda x, r: ((x << r) | (x >> (64 - r))) & M64  # noqa: E731
    rnd = lambda acc, v: (rotl((acc + v * P2) & M64, 31) * P1) & M64  # noqa: E731
    le = lambda i, n: int.from_bytes(data[i:i + n], "little")  # noqa: E731
    n, i = len(data), 0
    if n >= 32:
        v = [(seed + P1 + P2) & M64, (seed + P2) & M64, seed, (seed - P1) & M64]
        while i + 32 <= n:
            v = [rnd(v[j], le(i + 8 * j, 8)) for j in range(4)]
            i += 32
        h = (rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18)) & M64
        for x in v:
            h = ((h ^ rnd(0, x)) * P1 + P4) & M64
    else:
        h = (seed + P5) & M64
    h = (h + n) & M64
    while i + 8 <= n:
        h = (rotl(h ^ rnd(0, le(i, 8)), 27) * P1 + P4) & M64
        i += 8
    if i + 4 <= n:
        h = (rotl(h ^ ((le(i, 4) * P1) & M64), 23) * P2 + P3) & M64
        i += 4
    while i < n:
        h = (rotl(h ^ ((data[i] * P5) & M64), 11) * P1) & M64
        i += 1
    h = ((h ^ (h >> 33)) * P2) & M64
    h = ((h ^ (h >> 29)) * P3) & M64
    return h ^ (h >> 32)


def rcli(srv):
    return redis.Redis(host="127.0.0.1", port=srv.resp_port, socket_timeout=10)


class StateDurabilityTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="sluice-state-")

    def tearDown(self):
        shutil.rmtree(self.dir, ignore_errors=True)

    def srv(self, *args):
        return Sluiced("--data-dir", self.dir, *args)

    def test_graceful_restart_hands_back_nothing(self):
        with self.srv("--snapshot-interval", 0) as s:  # only the final snapshot
            r = rcli(s)
            # windows that cannot roll over during the test (a sliding log is not aligned)
            r.execute_command("SL.RULE", "SET", "ACTION", "t", "win", "sliding_log", "LIMIT", 5,
                              "WINDOW", 3600)
            r.execute_command("SL.RULE", "SET", "ACTION", "t", "tb", "token_bucket", "LIMIT", 3,
                              "RATE", 0.001)
            self.assertEqual([r.execute_command("SL.TAKE", "t", "win", "c")[0]
                              for _ in range(6)], [1] * 5 + [0])
            self.assertEqual([r.execute_command("SL.TAKE", "t", "tb", "c")[0]
                              for _ in range(4)], [1] * 3 + [0])
            r.execute_command("SL.TAKE", "t", "win", "half")
        self.assertTrue(os.path.exists(os.path.join(self.dir, SNAP)))
        with self.srv() as s:
            r = rcli(s)
            self.assertEqual(r.execute_command("SL.TAKE", "t", "win", "c")[0], 0)
            self.assertEqual(r.execute_command("SL.TAKE", "t", "tb", "c")[0], 0)
            self.assertEqual(r.execute_command("SL.TAKE", "t", "win", "half")[2], 3)
            self.assertIn("state: loaded", s.log())

    def test_lease_ids_not_reissued_after_kill_9(self):
        """A lease taken after the last snapshot is lost by kill -9 (the crash hands back
        what one interval consumed), but its id must not be handed out again: the old
        holder's late release would free the new holder's lease (ids once restarted at 1)."""
        s = self.srv("--snapshot-interval", 0).start()
        r = rcli(s)
        r.execute_command("SL.RULE", "SET", "ACTION", "acme", "job", "concurrency", "LIMIT", 2,
                          "WINDOW", 3600)
        self.assertTrue(r.execute_command("SL.SAVE"))
        a = r.execute_command("SL.TAKE", "acme", "job", "w")
        self.assertEqual(a[0], 1)
        s.stop(signal.SIGKILL)
        with self.srv() as s:
            r = rcli(s)
            b = r.execute_command("SL.TAKE", "acme", "job", "w")
            self.assertEqual(b[0], 1)
            self.assertNotEqual(b[5], a[5])
            self.assertEqual(r.execute_command("SL.RELEASE", "acme", "job", "w", a[5]), 0)
            self.assertEqual(r.execute_command("SL.TAKE", "acme", "job", "w")[0], 1)
            self.assertEqual(r.execute_command("SL.TAKE", "acme", "job", "w")[0], 0)

    def test_save_on_demand(self):
        with self.srv("--snapshot-interval", 0, "--admin-token", "tok") as s:
            r = rcli(s)
            r.execute_command("SL.TAKE", "t", "a", "c")
            with self.assertRaises(redis.exceptions.NoPermissionError):  # as HTTP's 401
                r.execute_command("SL.SAVE")
            self.assertTrue(r.execute_command("AUTH", "admin", "tok"))
            self.assertTrue(r.execute_command("SL.SAVE"))
            import http.client
            c = http.client.HTTPConnection("127.0.0.1", s.http_port, timeout=10)
            c.request("POST", "/api/admin/snapshot")
            self.assertEqual(c.getresponse().status, 401)
            c.close()
            c = http.client.HTTPConnection("127.0.0.1", s.http_port, timeout=10)
            c.request("POST", "/api/admin/snapshot", headers={"Authorization": "Bearer tok"})
            resp = c.getresponse()
            self.assertEqual(resp.status, 200)
            self.assertIn(b'"saved": true', resp.read())
            c.close()
        with Sluiced(http=False) as s:  # no data dir: nothing to save to
            with self.assertRaisesRegex(redis.ResponseError, "no --data-dir"):
                rcli(s).execute_command("SL.SAVE")

    def test_kill_9_under_load(self):
        """Decisions from 4 threads on 20 keys (buckets of 40 refilling 5/s, so demand always
        exceeds supply); kill -9 twice; per key, admitted over the whole run <= capacity +
        rate x elapsed + what was admitted in the last snapshot interval before each kill
        (what a crash can hand back). A restart that forgot the state would give every key
        40 more."""
        interval = 0.5
        limit, rate = 40, 5
        keys = ["k%d" % i for i in range(20)]
        log = []  # (time, key) of every admission
        lock = threading.Lock()
        kills = []
        rules_set = False
        for phase in range(3):
            s = self.srv("--snapshot-interval", interval).start()
            r = rcli(s)
            if not rules_set:
                r.execute_command("SL.RULE", "SET", "ACTION", "t", "a", "token_bucket", "LIMIT",
                                  limit, "RATE", rate)
                rules_set = True
            stop = threading.Event()

            def load(seed):
                rng = random.Random(seed)
                c = rcli(s)
                while not stop.is_set():
                    k = rng.choice(keys)
                    try:
                        rep = c.execute_command("SL.TAKE", "t", "a", k)
                    except (redis.ConnectionError, redis.TimeoutError):
                        return
                    if rep[0] == 1:
                        with lock:
                            log.append((time.monotonic(), k))
                    time.sleep(0.002)

            threads = [threading.Thread(target=load, args=(phase * 10 + i,)) for i in range(4)]
            for t in threads:
                t.start()
            time.sleep(1.5)
            if phase < 2:
                s.proc.send_signal(signal.SIGKILL)
                s.proc.wait()
                kills.append(time.monotonic())
            stop.set()
            for t in threads:
                t.join()
            if phase == 2:
                self.assertEqual(s.stop(), 0)
        elapsed = log[-1][0] - log[0][0]
        per_key = {k: 0 for k in keys}
        for _, k in log:
            per_key[k] += 1
        for k in keys:
            handed_back = sum(1 for (t, kk) in log for kt in kills
                              if kk == k and kt - interval - 0.25 <= t <= kt)
            bound = limit + rate * elapsed + handed_back + 1
            self.assertLessEqual(per_key[k], bound,
                                 f"{k}: {per_key[k]} admitted, bound {bound:.1f} (limit {limit}"
                                 f", {handed_back} in the last interval before a kill)")
        exhausted = sum(1 for k in keys if per_key[k] >= limit)
        print(f"\nkill -9 x2 under load: {len(log)} admitted over 20 keys in {elapsed:.1f} s "
              f"(bucket {limit}, {rate}/s); max per key {max(per_key.values())}, bound without "
              f"hand-back {limit + rate * elapsed:.1f}")
        self.assertGreater(exhausted, 10)  # the load did use up the buckets

    def test_bad_snapshots_moved_aside(self):
        with self.srv("--snapshot-interval", 0) as s:
            r = rcli(s)
            r.execute_command("SL.RULE", "SET", "ACTION", "t", "a", "sliding_log", "LIMIT", 2,
                              "WINDOW", 3600)
            r.execute_command("SL.TAKE", "t", "a", "c")
            r.execute_command("SL.TAKE", "t", "a", "c")
        path = os.path.join(self.dir, SNAP)
        good = open(path, "rb").read()
        self.assertGreater(len(good), 16)
        flipped = bytearray(good)
        flipped[len(good) // 2] ^= 0x10
        # the checksum is XXH64 of everything before it: forge a whole file of version 2
        self.assertEqual(xxh64(good[:-8]), int.from_bytes(good[-8:], "little"))
        future = bytearray(good)
        future[8:12] = (2).to_bytes(4, "little")
        future[-8:] = xxh64(bytes(future[:-8])).to_bytes(8, "little")
        cases = {
            "future version": bytes(future),
            "truncated": good[: len(good) - 5],
            "bit-flipped": bytes(flipped),
            "empty": b"",
            "wrong magic": b"XXXX" + good[4:],
        }
        for name, data in cases.items():
            for old in glob.glob(path + ".bad-*"):
                os.unlink(old)
            with open(path, "wb") as f:
                f.write(data)
            with self.srv("--snapshot-interval", 0) as s:
                r = rcli(s)
                # not loaded: the key starts fresh (2 left -> 1 after this take)
                self.assertEqual(r.execute_command("SL.TAKE", "t", "a", "c")[2], 1, name)
                log = s.log()
            self.assertIn("not loaded", log, name)
            self.assertIn("SL_EVERSION" if name == "future version" else "SL_ESNAPSHOT", log)
            bad = glob.glob(path + ".bad-*")
            self.assertEqual(len(bad), 1, name)
            self.assertEqual(open(bad[0], "rb").read(), data, name)  # kept, never deleted
        # two bad snapshots within one second: both kept (the second is not written over the
        # first)
        for old in glob.glob(path + ".bad-*"):
            os.unlink(old)
        for data in (b"FIRST corrupt", b"SECOND corrupt"):
            with open(path, "wb") as f:
                f.write(data)
            with self.srv("--snapshot-interval", 0) as s:
                pass
        kept = sorted(open(b, "rb").read() for b in glob.glob(path + ".bad-*"))
        self.assertEqual(kept, [b"FIRST corrupt", b"SECOND corrupt"])


class HarnessLogTest(unittest.TestCase):
    """The captured log of a running server. Reading it used to seek the file whose offset the
    server writes at, so sluiced's "ready" line, written after its ports accept, could land
    at offset 0 over "state: loaded" (seen once under TSan)."""

    def test_late_line_does_not_overwrite_the_log(self):
        with LogFile() as log:
            p = subprocess.Popen(["sh", "-c", "echo first-line-state-loaded >&2; "
                                  "echo second-line-listening >&2; read go; "
                                  "echo a-late-line-longer-than-the-first-two-together >&2"],
                                 stdin=subprocess.PIPE, stderr=log)
            deadline = time.monotonic() + 10
            while "listening" not in log.text() and time.monotonic() < deadline:
                time.sleep(0.01)
            os.lseek(log.fileno(), 0, os.SEEK_SET)  # where any reader may leave the offset
            p.communicate(b"go\n", timeout=10)
            self.assertEqual(log.text().split(), ["first-line-state-loaded",
                                                  "second-line-listening",
                                                  "a-late-line-longer-than-the-first-two-together"])


if __name__ == "__main__":
    unittest.main()
