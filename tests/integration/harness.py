"""Start and stop a real sluiced for integration tests.

    with Sluiced() as s:          # free loopback ports, waits until both accept connections
        s.resp_port, s.http_port
        s.stop()                  # SIGTERM; returns the exit code (also done on exit)
        s.log()                   # what it wrote to stderr

The binary is $SLUICED (set by ctest), else build/sluiced. Every server listens on 127.0.0.1
only and is killed if it does not stop by itself within the timeout.
"""
import os
import signal
import socket
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.environ.get("SLUICED", os.path.join(ROOT, "build", "sluiced"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


class Sluiced:
    def __init__(self, *args, resp=True, http=True, threads=2, env=None):
        self.resp_port = free_port() if resp else 0
        self.http_port = free_port() if http else 0
        self.args = [BINARY, "--bind", "127.0.0.1", "--resp-port", str(self.resp_port),
                     "--http-port", str(self.http_port), "--threads", str(threads),
                     *[str(a) for a in args]]
        self.env = env
        self.proc = None
        self.errfile = tempfile.TemporaryFile()

    def start(self):
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=self.errfile,
                                     env=self.env)
        for port in (self.resp_port, self.http_port):
            if port and not wait_port(port):
                self.kill()
                raise RuntimeError("sluiced did not start listening:\n" + self.log())
            if self.proc.poll() is not None:
                raise RuntimeError("sluiced exited at start:\n" + self.log())
        return self

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

    def log(self):
        self.errfile.seek(0)
        return self.errfile.read().decode(errors="replace")


def run_sluiced(*args, timeout=10.0):
    """Run sluiced to completion (flag errors, --help): (exit code, stdout, stderr)."""
    p = subprocess.run([BINARY, *[str(a) for a in args]], capture_output=True, timeout=timeout)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def raw(port, data, read_until_close=False, timeout=5.0, expect=None):
    """Send bytes on a fresh connection; return what came back (until `expect` bytes, or the
    server closed, or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
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
