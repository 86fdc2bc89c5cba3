"""Shared fixtures: servers on loopback, port 0, always stopped."""
import os
import subprocess
import sys
import textwrap

import pytest

import edgeml

# Slow (sanitized, loaded) runs can stretch every wait in the tests.
TIMEOUT_MULTIPLIER = float(os.environ.get("EDGEML_TEST_TIMEOUT_MULTIPLIER", "1"))


def scaled(seconds: float) -> float:
    return seconds * TIMEOUT_MULTIPLIER


@pytest.fixture
def make_server():
    servers = []

    def make(interfaces=None, **kw):
        s = edgeml.InferenceServer(0, host="127.0.0.1", **kw)
        for name, fn in (interfaces or {"echo": lambda p: p}).items():
            s.register_interface(name, fn)
        s.start(threaded=True)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def server(make_server):
    return make_server()


@pytest.fixture
def make_client():
    clients = []

    def make(port, **kw):
        kw.setdefault("timeout", scaled(10))
        c = edgeml.InferenceClient("127.0.0.1", port, **kw)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.close()


@pytest.fixture
def client(server, make_client):
    return make_client(server.port)


class ServerProcess:
    """An InferenceServer in a child process (to kill it for real)."""

    def __init__(self, body: str, port: int = 0, env=None, host: str = "127.0.0.1", prefix=()):
        code = textwrap.dedent(f"""
            import os, sys, time, signal
            import numpy as np
            import edgeml
            s = edgeml.InferenceServer({port}, host={host!r})
        """) + textwrap.dedent(body) + textwrap.dedent("""
            s.start(threaded=True)
            print(s.port, flush=True)
            import threading
            threading.Event().wait()
        """)
        self.proc = subprocess.Popen([*prefix, sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                     env=None if env is None else {**os.environ, **env})
        line = self.proc.stdout.readline()
        if not line:
            self.proc.kill()
            raise RuntimeError("server process failed to start")
        self.port = int(line)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def server_process():
    procs = []

    def make(body="s.register_interface('echo', lambda p: p)\n", port=0, **kw):
        p = ServerProcess(body, port, **kw)
        procs.append(p)
        return p

    yield make
    for p in procs:
        p.kill()


@pytest.fixture
def cleanup():
    """Register things with a stop() or close() to run after the test, last
    registered first (clients before their servers)."""
    items = []

    def add(obj):
        items.append(obj)
        return obj

    yield add
    for obj in reversed(items):
        try:
            (getattr(obj, "stop", None) or obj.close)()
        except Exception:
            pass


def wait_until(cond, timeout=5.0, interval=0.01):
    """Poll cond() until it is true; False after `timeout` (scaled) seconds."""
    import time
    end = time.monotonic() + scaled(timeout)
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())


def port_is_free(port: int) -> bool:
    import socket
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def proc_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of a process from /proc (VmRSS now, VmHWM its peak), in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} for process {pid}")
