"""Links with known properties for the timing tests.

- ``FaultProxy``: a TCP proxy on loopback with faults per direction: delay
  (e.g. 5 ms up, 20 ms down, the asymmetric path a symmetric clock-offset
  estimate cannot see through), a bandwidth limit, stalls, and connections
  cut after a given number of bytes (mid-frame). ``DelayProxy`` is one that
  only delays.
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
import struct
import subprocess
import threading
import time
from typing import Dict, List, Optional, Tuple


class FaultProxy:
    """A TCP proxy on 127.0.0.1 in front of 127.0.0.1:<target_port> whose
    faults the test controls, per direction ("up" = client→server, "down"):

    - ``delay``: every byte is held this long (``up_s`` / ``down_s``);
    - ``rate_bps``: bandwidth limit, bytes per second (None = unlimited);
    - ``stall()`` / ``resume()``: stop forwarding (both ways) and go on;
    - ``cut_after(direction, nbytes)``: sever each connection once that many
      more bytes went through in that direction (mid-frame, typically);
    - ``cut_all()``: sever every open connection now.

    Order and content are preserved; timing is as good as ``time.sleep``.
    Severing closes both sockets with RST (SO_LINGER 0), as a dropped link or
    a killed peer would look."""

    def __init__(self, target_port: int, up_s: float = 0.0, down_s: float = 0.0,
                 rate_bps: Optional[float] = None):
        self.target_port = target_port
        self.delay = {"up": up_s, "down": down_s}
        self.rate_bps = rate_bps
        self._ls = socket.socket()
        self._ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._ls.bind(("127.0.0.1", 0))
        self._ls.listen(64)
        self.port = self._ls.getsockname()[1]
        self._closed = threading.Event()
        self._running = threading.Event()
        self._running.set()
        self._lock = threading.Lock()
        self._conns: List[Tuple[socket.socket, socket.socket]] = []
        self._cut_rule: Dict[str, Optional[int]] = {"up": None, "down": None}
        self.connections = 0
        self.cuts = 0
        self._threads: List[threading.Thread] = []
        self._queues: list = []
        self._start(self._accept_loop)

    # -- controls
    def stall(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def cut_after(self, direction: str, nbytes: Optional[int]) -> None:
        """Sever every connection (now open or opened later) after ``nbytes``
        more bytes in ``direction``; None turns the rule off."""
        assert direction in ("up", "down")
        with self._lock:
            self._cut_rule[direction] = nbytes

    def cut_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for pair in conns:
            self._sever(pair)

    # -- internals
    def _start(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _sever(self, pair) -> None:
        for s in pair:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)  # wakes this proxy's own blocked recv()
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass
        self.cuts += 1

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
            pair = (c, u)
            with self._lock:
                self._conns.append(pair)
                self.connections += 1
            state = {"sent": {"up": 0, "down": 0}, "base": dict(self._cut_rule), "dead": False}
            self._pipe(c, u, "up", pair, state)
            self._pipe(u, c, "down", pair, state)

    def _pipe(self, src: socket.socket, dst: socket.socket, direction: str, pair, state) -> None:
        q: "collections.deque[Tuple[float, bytes]]" = collections.deque()
        cv = threading.Condition()
        self._queues.append((q, cv))

        def reader() -> None:
            while True:
                try:
                    data = src.recv(1 << 16)
                except OSError:
                    data = b""
                with cv:
                    q.append((time.monotonic() + self.delay[direction], data))
                    cv.notify()
                if not data:
                    return

        def writer() -> None:
            t_next = time.monotonic()
            while True:
                with cv:
                    while not q:
                        cv.wait()
                    due, data = q.popleft()
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self._running.wait()
                if not data:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                with self._lock:
                    rule = self._cut_rule[direction]
                if rule is not None:
                    left = rule - state["sent"][direction]
                    if left <= len(data):
                        try:
                            dst.sendall(data[:max(0, left)])
                        except OSError:
                            pass
                        with self._lock:
                            if pair in self._conns:
                                self._conns.remove(pair)
                        if not state["dead"]:
                            state["dead"] = True
                            self._sever(pair)
                        return
                if self.rate_bps:
                    t_next = max(t_next, time.monotonic()) + len(data) / self.rate_bps
                    pause = t_next - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                try:
                    dst.sendall(data)
                except OSError:
                    return
                state["sent"][direction] += len(data)

        self._start(reader)
        self._start(writer)

    def close(self) -> None:
        self._closed.set()
        self._running.set()
        try:
            self._ls.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._ls.close()
        self.cut_all()
        for q, cv in self._queues:
            with cv:
                q.append((0.0, b""))
                cv.notify()
        for t in self._threads:
            t.join(2)


def DelayProxy(target_port: int, up_s: float, down_s: float) -> FaultProxy:
    """A FaultProxy that only delays: ``up_s`` client→server, ``down_s`` back."""
    return FaultProxy(target_port, up_s=up_s, down_s=down_s)


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)


class ShapedNetns:
    """Namespace ``name`` with address ``inner`` reachable from here at
    ``inner`` via a veth pair (``outer`` on this side); both directions
    limited to ``rate_mbit`` by tbf. ``prefix`` runs a command inside it."""

    SUBNET = "10.203.{n}."

    def __init__(self, rate_mbit: float, tag: Optional[str] = None, latency_ms: float = 100.0):
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
            # tbf: rate, a bucket of 16 KiB, and a queue of latency_ms (100 ms) at that rate
            for dev, pre in ((self.veth_out, ()), (self.veth_in, self.prefix)):
                _run(*pre, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit",
                     "burst", "16kb", "latency", f"{latency_ms:g}ms")
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
