"""Start and stop a real sluiced for integration tests.

    with Sluiced() as s:          # free loopback ports, waits until both accept connections
        s.resp_port, s.http_port
        s.stop()                  # SIGTERM; returns the exit code (also done on exit)
        s.log()                   # what it wrote to stderr

The binary is $SLUICED (set by ctest), else build/sluiced. Every server listens on 127.0.0.1
only and is killed if it does not stop by itself within the timeout.
"""
import atexit
import fcntl
import os
import random
import signal
import socket
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.environ.get("SLUICED", os.path.join(ROOT, "build", "sluiced"))


def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports are picked at random below the kernel's ephemeral range, so that no outgoing
# connection (of this test or of one running in parallel) takes one between the check and the
# server's bind; and none is handed out twice by one process. Two ports asked for in a row
# from the kernel (bind to port 0, close) can be the same one: that made a sluiced bind its
# HTTP port to its own RESP port.
_PORT_LOW = 10000
_PORT_HIGH = max(_PORT_LOW + 2000, _ephemeral_low()) - 1
_given = set()


def _bindable(port):
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


def free_port(bus_offset=None):
    """A loopback port free now, never returned before by this process. With bus_offset,
    port + bus_offset is free too (a Redis Cluster node's bus port)."""
    high = max(_PORT_LOW + 1000, _PORT_HIGH - (bus_offset or 0))
    for _ in range(10000):
        p = random.randint(_PORT_LOW, high)
        ports = (p,) if bus_offset is None else (p, p + bus_offset)
        if any(q in _given for q in ports) or not all(_bindable(q) for q in ports):
            continue
        _given.update(ports)
        return p
    raise RuntimeError("no free loopback port in %d..%d" % (_PORT_LOW, high))


def wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


_running = set()  # every server started and not yet stopped: killed at exit, so that a test
                  # whose setUpClass failed (no tearDownClass) leaves no server behind


@atexit.register
def _kill_leftovers():
    for srv in list(_running):
        srv.kill()


class LogFile:
    """A file a child process writes its stderr to while the test reads it. The child's
    writes append (O_APPEND) and reads use pread, so reading never moves the offset the child
    writes at: with a shared offset, a seek(0) just before a late log line (sluiced writes
    "ready" after its ports accept) let that line overwrite the start of the log."""

    def __init__(self):
        fd, path = tempfile.mkstemp(prefix="sluiced-test-", suffix=".log")
        os.unlink(path)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
        self.fd = fd

    def fileno(self):
        return self.fd

    def text(self):
        chunks, off = [], 0
        while True:
            b = os.pread(self.fd, 1 << 16, off)
            if not b:
                return b"".join(chunks).decode(errors="replace")
            chunks.append(b)
            off += len(b)

    def clear(self):
        os.ftruncate(self.fd, 0)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Sluiced:
    def __init__(self, *args, resp=True, http=True, threads=2, env=None, nice=0):
        self.nice = nice  # run at this niceness (nice(1) execs, so proc.pid is sluiced's)
        self.resp_port = free_port() if resp else 0
        self.http_port = free_port() if http else 0
        self.extra = ["--threads", str(threads), *[str(a) for a in args]]
        self.env = env
        self.proc = None
        self.errfile = LogFile()

    @property
    def args(self):
        nice = ["nice", "-n", str(self.nice)] if self.nice else []
        return [*nice, BINARY, "--bind", "127.0.0.1", "--resp-port", str(self.resp_port),
                "--http-port", str(self.http_port), *self.extra]

    def start(self, attempts=3):
        """Start and wait until every front end accepts connections. A port taken by another
        process since it was picked (a test running in parallel) is picked again."""
        for attempt in range(attempts):
            if attempt:  # the failed attempt's log is not this server's
                self.errfile.clear()
            self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL,
                                         stderr=self.errfile, env=self.env)
            _running.add(self)
            if self._listening():
                return self
            self.kill()
            if "Address already in use" not in self.log() or attempt + 1 == attempts:
                raise RuntimeError("sluiced did not start listening:\n" + self.log())
            self.resp_port = free_port() if self.resp_port else 0
            self.http_port = free_port() if self.http_port else 0
        return self

    def _listening(self):
        for port in (self.resp_port, self.http_port):
            if port and not wait_port(port):
                return False
            if self.proc.poll() is not None:
                return False
        return True

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def stop(self, sig=signal.SIGTERM, timeout=15.0):
        """Stop the server; its exit code. A sanitizer report in its log fails the test."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        _running.discard(self)
        log = self.log()
        for marker in ("WARNING: ThreadSanitizer", "ERROR: AddressSanitizer",
                       "ERROR: LeakSanitizer", "runtime error:"):
            if marker in log:
                raise AssertionError("sanitizer report from sluiced:\n" + log)
        return self.proc.returncode

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __del__(self):
        self.errfile.close()

    def log(self):
        return self.errfile.text()


def resp_command(*args):
    """One command as a RESP array of bulk strings (bytes as they are, anything else as
    str)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, (bytes, bytearray)) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def trickle(port, start, byte, seconds=6.0, every=0.4):
    """Send `start`, then `byte` every `every` s for at most `seconds` (a request trickling
    in): True once the server has closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        c.sendall(start)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                c.sendall(byte)
                time.sleep(every)
            except OSError:
                return True
    return False


def send_split(port, one, cut, seconds, tail=b""):
    """Send request `one` over and over for `seconds`, every write ending `cut` bytes into the
    next one, then the rest and `tail`; shut writing and read to the end: (requests sent,
    bytes received)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        sent, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            c.sendall(one[cut:] + one[:cut] if sent else one[:cut])
            sent += 1
            time.sleep(0.05)
        c.sendall(one[cut:] + tail)
        c.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            d = c.recv(65536)
            if not d:
                return sent, got
            got += d


def run_sluiced(*args, timeout=10.0):
    """Run sluiced to completion (flag errors, --help): (exit code, stdout, stderr)."""
    p = subprocess.run([BINARY, *[str(a) for a in args]], capture_output=True, timeout=timeout)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def recv_all(s, timeout, expect=None, read_until_close=False):
    """What comes back on socket `s` until `expect` bytes (unless read_until_close), or the
    server closed, or the timeout."""
    s.settimeout(timeout)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if expect is not None and len(out) >= expect and not read_until_close:
            break
        try:
            chunk = s.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not chunk:
            break
        out += chunk
    return out


def raw(port, data, read_until_close=False, timeout=5.0, expect=None):
    """Send bytes on a fresh connection; return what came back (until `expect` bytes, or the
    server closed, or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return recv_all(s, timeout, expect, read_until_close)


class RedisServer:
    """A private redis-server on a free loopback port, in its own temp dir, no persistence.

        with RedisServer() as r:       # r.port, r.client() (redis-py)
            r.kill(); r.start()        # SIGKILL it, start it again on the same port
    """

    def __init__(self, *args, port=None):
        self.port = port or free_port()
        self.dir = tempfile.TemporaryDirectory(prefix="sluice-redis-")
        self.extra = [str(a) for a in args]
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", self.dir.name, *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_port(self.port):
            self.kill()
            raise RuntimeError("redis-server did not start on port %d" % self.port)
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.kill()
        self.dir.cleanup()

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def client(self):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


def free_cluster_port():
    """A free port p whose cluster bus port p + 10000 is free too."""
    return free_port(bus_offset=10000)


class RedisCluster:
    """A Redis Cluster of real redis-server processes on loopback: `masters` masters with
    `replicas` replicas each, created with redis-cli --cluster create; waits until
    cluster_state is ok everywhere.

        with RedisCluster() as c:      # c.nodes (RedisServer), c.addrs ("127.0.0.1:p,...")
    """

    def __init__(self, masters=3, replicas=0):
        self.replicas = replicas
        # diskless sync without Redis's default 5 s delay, so that replicas are in sync
        # (and can be promoted) within moments of the cluster's creation
        self.nodes = [RedisServer("--cluster-enabled", "yes", "--cluster-config-file",
                                  "nodes.conf", "--cluster-node-timeout", "1000",
                                  "--repl-diskless-sync-delay", "0",
                                  port=free_cluster_port())
                      for _ in range(masters * (1 + replicas))]
        self.addrs = ",".join("127.0.0.1:%d" % n.port for n in self.nodes)

    def wait_ok(self, nodes=None, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(b"cluster_state:ok" in subprocess.run(
                    ["redis-cli", "-p", str(n.port), "cluster", "info"],
                    capture_output=True, timeout=5).stdout for n in (nodes or self.nodes)):
                return
            time.sleep(0.1)
        raise RuntimeError("the cluster did not become ok")

    def __enter__(self):
        try:
            for n in self.nodes:
                n.start()
            subprocess.run(["redis-cli", "--cluster", "create",
                            *["127.0.0.1:%d" % n.port for n in self.nodes],
                            "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                           check=True, capture_output=True, timeout=30)
            self.wait_ok()
            return self
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc):
        for n in self.nodes:
            n.__exit__()
