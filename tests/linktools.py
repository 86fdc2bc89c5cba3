"""Links with known properties for the timing tests.

- ``DelayProxy``: a TCP proxy on loopback that holds every byte for a fixed
  time per direction (e.g. 5 ms up, 20 ms down), the asymmetric path that a
  symmetric clock-offset estimate cannot see through.
- ``ShapedNetns``: a network namespace joined to this one by a veth pair
  whose two ends are rate-limited with ``tc tbf`` (this kernel has tbf and
  htb, not netem). Needs root and iproute2; ``ShapedNetns.available()``
  says whether this machine allows it, and why not.
"""
from __future__ import annotations

import collections
import os
import shutil
import socket
import subprocess
import threading
import time
from typing import List, Optional, Tuple


class DelayProxy:
    """Forward 127.0.0.1:<port> to 127.0.0.1:<target_port>, delaying data
    client→server by ``up_s`` and server→client by ``down_s``. Order and
    content are preserved; timing is as good as ``time.sleep`` (~0.1 ms)."""

    def __init__(self, target_port: int, up_s: float, down_s: float):
        self.target_port = target_port
        self.up_s, self.down_s = up_s, down_s
        self._ls = socket.socket()
        self._ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._ls.bind(("127.0.0.1", 0))
        self._ls.listen(16)
        self.port = self._ls.getsockname()[1]
        self._closed = threading.Event()
        self._socks: List[socket.socket] = []
        self._threads: List[threading.Thread] = []
        self._start(self._accept_loop)

    def _start(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                c, _ = self._ls.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                c.close()
                continue
            for s in (c, u):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._socks += [c, u]
            self._pipe(c, u, self.up_s)
            self._pipe(u, c, self.down_s)

    def _pipe(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        q: "collections.deque[Tuple[float, bytes]]" = collections.deque()
        cv = threading.Condition()

        def reader() -> None:
            while True:
                try:
                    data = src.recv(1 << 16)
                except OSError:
                    data = b""
                with cv:
                    q.append((time.monotonic() + delay, data))
                    cv.notify()
                if not data:
                    return

        def writer() -> None:
            while True:
                with cv:
                    while not q:
                        cv.wait()
                    due, data = q.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                if not data:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    return

        self._start(reader)
        self._start(writer)

    def close(self) -> None:
        self._closed.set()
        self._ls.close()
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(2)


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


class ShapedNetns:
    """Namespace ``name`` with address ``inner`` reachable from here at
    ``inner`` via a veth pair (``outer`` on this side); both directions
    limited to ``rate_mbit`` by tbf. ``prefix`` runs a command inside it."""

    SUBNET = "10.203.{n}."

    def __init__(self, rate_mbit: float, tag: Optional[str] = None):
        n = os.getpid() % 200 + 20
        tag = tag or str(os.getpid())
        self.name = f"emtest-{tag}"
        self.veth_out, self.veth_in = f"emo{n}", f"emi{n}"
        base = self.SUBNET.format(n=n)
        self.outer, self.inner = base + "1", base + "2"
        self.rate_mbit = rate_mbit
        self.prefix = ("ip", "netns", "exec", self.name)
        self.close()  # leftovers of a killed run
        try:
            _run("ip", "netns", "add", self.name)
            _run("ip", "link", "add", self.veth_out, "type", "veth", "peer", "name", self.veth_in)
            _run("ip", "link", "set", self.veth_in, "netns", self.name)
            _run("ip", "addr", "add", self.outer + "/24", "dev", self.veth_out)
            _run("ip", "link", "set", self.veth_out, "up")
            _run(*self.prefix, "ip", "addr", "add", self.inner + "/24", "dev", self.veth_in)
            _run(*self.prefix, "ip", "link", "set", self.veth_in, "up")
            _run(*self.prefix, "ip", "link", "set", "lo", "up")
            # tbf: rate, a bucket of 16 KiB, and a queue of 100 ms at that rate
            for dev, pre in ((self.veth_out, ()), (self.veth_in, self.prefix)):
                _run(*pre, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
                     "burst", "16kb", "latency", "100ms")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def available() -> Tuple[bool, str]:
        if os.geteuid() != 0:
            return False, "needs root (network namespaces)"
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                return False, f"needs iproute2's `{tool}`"
        probe = f"emprobe-{os.getpid()}"
        r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
        if r.returncode != 0:
            return False, f"cannot create a network namespace: {r.stderr.strip()}"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
        return True, ""

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.veth_out], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
