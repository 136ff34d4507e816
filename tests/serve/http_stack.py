"""Start `pdbridge serve` / `router` / `up` processes on loopback ports for the HTTP tests,
wait until they listen, and stop them (their whole process groups) afterwards."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx

START_S = 240.0         # a generous bound on start-up (2 cores shared by the suite)


def free_ports(n: int, high: int = 60000) -> int:
    """A base port with n consecutive ports free on 127.0.0.1 now."""
    import random
    for _ in range(200):
        base = random.randrange(20000, high - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


class Proc:
    """One pdbridge process; its stderr is kept (tests print it on failure)."""

    def __init__(self, argv: list[str], env: dict | None = None, prefix: list[str] = ()):
        """prefix: e.g. ["ip", "netns", "exec", NS] to run it in a network namespace."""
        self.argv = argv
        self.p = subprocess.Popen([*prefix, sys.executable, "-m", "pdbridge.cli", *argv],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  env=env or dict(os.environ), start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.p.stderr:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_line(self, text: str, timeout_s: float = START_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(text in line for line in self.lines):
                return
            if self.p.poll() is not None:
                time.sleep(0.2)         # let the reader catch the last lines
                raise AssertionError(f"pdbridge {' '.join(self.argv)} exited with "
                                     f"{self.p.returncode}:\n{self.output}")
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} after {timeout_s} s:\n{self.output}")

    def signal(self, sig) -> None:
        try:
            os.killpg(self.p.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGINT)
            try:
                self.p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.p.wait()
        self.signal(signal.SIGKILL)     # nothing of its group outlives it
        return self.p.returncode


SECRET = "http-tests-" + "0" * 32       # the side channel's shared secret


def env_with_secret(env: dict | None = None) -> dict:
    return dict(env or os.environ, PDBRIDGE_SECRET=SECRET)


def serve(role: str, port: int, tp: int = 1, *extra: str, env=None, prefix=()) -> Proc:
    env = env_with_secret(env)
    return Proc(["serve", "--role", role, "--tp", str(tp), "--port", str(port),
                 "--num-blocks", "128", *extra], env, prefix)


def get_json(url: str, timeout_s: float = 10.0):
    return httpx.get(url, timeout=timeout_s).json()


def wait_until(cond, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what}: not true after {timeout_s} s")
