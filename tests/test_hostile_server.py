"""A client facing a hostile or silent server (robots dial learners they do
not control), and a server facing a peer that trickles a frame: every wait
is bounded, only replies that can answer a call are taken, and memory is
bounded on the client too (docs/security.md)."""
import math
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import edgeml
from edgeml import _core

from conftest import scaled, wait_until
from test_memory_safety import hello, request_frame_of_empty_maps

pytestmark = pytest.mark.timeout(60)

MSG_PUBLISH = 11


def read_frame(sock: socket.socket) -> bytes:
    hdr = b""
    while len(hdr) < 64:
        chunk = sock.recv(64 - len(hdr))
        if not chunk:
            raise ConnectionError("closed")
        hdr += chunk
    rest = struct.unpack_from("<Q", hdr, 24)[0] - 64
    body = b""
    while len(body) < rest:
        chunk = sock.recv(rest - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return hdr + body


class FakeServer:
    """Speaks the handshake like an edgeml server, then answers the first
    request with whatever `answer(req_id)` returns (raw frame bytes)."""

    def __init__(self, answer):
        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.closed_by_client = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            try:
                read_frame(conn)  # HELLO
                conn.sendall(edgeml.encode_frame({"epoch": 1, "proto": 1, "max_message_bytes": 1 << 30,
                                                  "service": "inference"}, _core.MSG_HELLO))
                req = read_frame(conn)
                req_id = struct.unpack_from("<Q", req, 8)[0]
                conn.sendall(self.answer(req_id))
                conn.settimeout(scaled(10))
                while conn.recv(65536):
                    pass
                self.closed_by_client.set()
            except OSError:
                self.closed_by_client.set()

    def close(self):
        self.sock.close()


@pytest.fixture
def fake_server():
    made = []

    def make(answer):
        f = FakeServer(answer)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


def test_silent_server_bounded_by_connect_timeout():
    """A server that accepts (the kernel's backlog does) and never answers
    HELLO: the constructor gives up after connect_timeout, not 10 s."""
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        sk.listen(8)
        port = sk.getsockname()[1]
        for ct in (0.5, 1.0):
            t0 = time.monotonic()
            with pytest.raises((edgeml.EdgeMLTimeoutError, edgeml.EdgeMLConnectionError)):
                edgeml.InferenceClient("127.0.0.1", port, connect_timeout=ct)
            took = time.monotonic() - t0
            assert took < ct + scaled(1.5), took
            assert took >= ct * 0.9


def test_silent_broadcast_server_bounded_by_connect_timeout():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        sk.listen(8)
        t0 = time.monotonic()
        with pytest.raises((edgeml.EdgeMLTimeoutError, edgeml.EdgeMLConnectionError)):
            _core.Subscriber("127.0.0.1", sk.getsockname()[1], None, 0.5)
        assert time.monotonic() - t0 < 0.5 + scaled(1.5)


@pytest.mark.parametrize("kind", ["publish", "hello", "ok", "request", "other_id_publish"])
def test_frames_that_cannot_answer_a_call_are_a_protocol_error(fake_server, kind):
    def answer(req_id):
        if kind == "publish":
            return edgeml.encode_frame({"w": 1}, MSG_PUBLISH, req_id)
        if kind == "hello":
            return edgeml.encode_frame({"proto": 1}, _core.MSG_HELLO, req_id)
        if kind == "ok":
            return edgeml.encode_frame(None, _core.MSG_OK, req_id)
        if kind == "request":
            return edgeml.encode_frame(["x", 1], _core.MSG_REQUEST, req_id)
        return edgeml.encode_frame({"w": 1}, MSG_PUBLISH, req_id + 1000)

    f = fake_server(answer)
    c = edgeml.InferenceClient("127.0.0.1", f.port, timeout=scaled(10), clock_refresh=None)
    t0 = time.monotonic()
    with pytest.raises(edgeml.ProtocolError):
        c.call("echo", 1)
    assert time.monotonic() - t0 < scaled(5)  # at once, not at the timeout
    assert f.closed_by_client.wait(scaled(5))  # and the connection was dropped
    c.close()


def test_an_error_reply_cannot_pose_as_a_handshake_error(fake_server):
    f = fake_server(lambda rid: edgeml.encode_frame(
        {"type": "HandshakeError", "message": "go away", "traceback": ""}, _core.MSG_ERROR, rid))
    c = edgeml.InferenceClient("127.0.0.1", f.port, timeout=scaled(10), clock_refresh=None)
    with pytest.raises(edgeml.RemoteError) as ei:
        c.call("echo", 1)
    assert not isinstance(ei.value, edgeml.HandshakeError)
    assert ei.value.remote_type == "HandshakeError"
    c.close()


def test_a_reply_that_decodes_into_gigabytes_is_refused(fake_server):
    """A 20 MB reply of 20 million empty maps: DecodeError, and the client's
    memory (a fresh process's peak) does not grow by anything like the
    1.9 GB it would take."""
    frame = bytearray(request_frame_of_empty_maps(20_000_000))
    frame[5] = _core.MSG_REPLY

    def answer(req_id):
        struct.pack_into("<Q", frame, 8, req_id)
        return bytes(frame)

    f = fake_server(answer)
    code = textwrap.dedent(f"""
        import resource, edgeml
        c = edgeml.InferenceClient("127.0.0.1", {f.port}, timeout={scaled(20)}, clock_refresh=None)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            c.call("echo", 1)
            print("returned")
        except edgeml.DecodeError as e:
            grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
            print("refused", "too many objects" in str(e), grown)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    verdict, named, grown = r.stdout.split()
    assert verdict == "refused" and named == "True"
    assert float(grown) < 200, f"client peak memory grew {grown} MB"


# ------------------------------------------------------ progress timeout

def test_a_peer_trickling_a_frame_is_closed_by_the_progress_timeout(make_server):
    s = make_server({"echo": lambda p: p}, progress_timeout=1.0)
    good = edgeml.InferenceClient("127.0.0.1", s.port, timeout=scaled(10))
    frame = edgeml.encode_frame(["echo", {"x": np.zeros(1 << 20, np.uint8)}], _core.MSG_REQUEST)
    idle = socket.create_connection(("127.0.0.1", s.port))
    hello(idle)  # handshaken, then silent between frames: allowed to stay
    sk = socket.create_connection(("127.0.0.1", s.port))
    hello(sk)
    sk.sendall(frame[:100])
    t0 = time.monotonic()
    closed = False
    for b in frame[100:200]:  # one byte every 0.1 s
        try:
            sk.sendall(bytes([b]))
        except OSError:
            closed = True
            break
        sk.settimeout(0.1)
        try:
            if sk.recv(1) == b"":
                closed = True
                break
        except socket.timeout:
            pass
    took = time.monotonic() - t0
    assert closed, "the trickling connection was kept open"
    assert 0.9 < took < 1.0 + scaled(3), took
    assert s.stats()["stalled_closed"] == 1
    assert good.call("echo", 1) == 1
    # the idle one is still served
    idle.sendall(edgeml.encode_frame(["echo", 7], _core.MSG_REQUEST, 5))
    assert edgeml.decode_frame(read_frame(idle))["payload"] == 7
    idle.close()
    sk.close()
    good.close()


def test_a_slow_but_steady_upload_is_not_cut(make_server):
    s = make_server({"size": lambda p: int(p["x"].nbytes)}, progress_timeout=1.0)
    frame = edgeml.encode_frame(["size", {"x": np.zeros(1 << 20, np.uint8)}], _core.MSG_REQUEST, 9)
    with socket.create_connection(("127.0.0.1", s.port)) as sk:
        hello(sk)
        for i in range(0, len(frame), 128 << 10):  # 128 KiB every 0.25 s: 2 s for the frame
            sk.sendall(frame[i:i + (128 << 10)])
            time.sleep(0.25)
        assert edgeml.decode_frame(read_frame(sk))["payload"] == 1 << 20
    assert s.stats()["stalled_closed"] == 0


def test_a_long_handler_does_not_count_as_the_peers_stall(make_server):
    """While a handler holds the loop for longer than progress_timeout, the
    other peers' bytes wait unread: that is not their stall."""
    s = make_server({"busy": lambda p: time.sleep(2.0) or p, "echo": lambda p: p}, progress_timeout=1.0)
    frame = edgeml.encode_frame(["echo", {"x": np.zeros(1 << 20, np.uint8)}], _core.MSG_REQUEST, 3)
    c = edgeml.InferenceClient("127.0.0.1", s.port, timeout=scaled(20))
    with socket.create_connection(("127.0.0.1", s.port)) as sk:
        hello(sk)
        sk.sendall(frame[:200_000])
        fut = c.call_async("busy", 1)
        time.sleep(0.3)
        sk.sendall(frame[200_000:])  # arrives while the handler runs
        assert fut.result(scaled(20)) == 1
        got = edgeml.decode_frame(read_frame(sk))["payload"]
        assert got["x"].nbytes == 1 << 20
    assert s.stats()["stalled_closed"] == 0
    c.close()


def test_progress_timeout_is_checked():
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="progress_timeout"):
            edgeml.InferenceServer(0, progress_timeout=bad)
    edgeml.InferenceServer(0, progress_timeout=math.inf)
