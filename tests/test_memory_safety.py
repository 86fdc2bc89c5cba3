"""Memory safety under careless programs and hostile peers (docs/security.md,
"Memory bounds"): close() and stop() racing other threads, fork() with calls
in flight, frames that decode into far more memory than their bytes, many
peers each holding most of a large frame, and timeouts of inf and NaN.

These tests also run against the extension built with ASan/UBSan
(scripts/test.sh), where a use-after-free aborts the run."""
import math
import multiprocessing
import os
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

from conftest import proc_mb, scaled, wait_until

pytestmark = pytest.mark.timeout(120)


def hello(sock: socket.socket) -> None:
    sock.sendall(edgeml.encode_frame({"proto": 1, "role": "client"}, _core.MSG_HELLO))
    hdr = b""
    while len(hdr) < 64:
        hdr += sock.recv(64 - len(hdr))
    rest = struct.unpack_from("<Q", hdr, 24)[0] - 64
    while rest:
        rest -= len(sock.recv(rest))


def request_frame_of_empty_maps(n: int, method: str = "echo") -> bytes:
    """A valid REQUEST whose payload is a list of n empty maps: n bytes of
    body that would decode into n dicts."""
    m = method.encode()
    body = bytes([0x92, 0xA0 | len(m)]) + m + b"\xdd" + struct.pack(">I", n) + b"\x80" * n
    pad = -len(body) % 8
    hdr = bytearray(64)
    hdr[0:4] = b"EDGM"
    hdr[4] = _core.PROTOCOL_VERSION
    hdr[5] = _core.MSG_REQUEST
    struct.pack_into("<Q", hdr, 8, 7)
    struct.pack_into("<I", hdr, 16, len(body))
    struct.pack_into("<Q", hdr, 24, 64 + len(body) + pad)
    return bytes(hdr) + body + b"\0" * pad


# ---------------------------------------------------------------- 1. close()

@pytest.mark.parametrize("round_", range(5))
def test_close_while_other_threads_are_inside_call(make_server, round_):
    """close() from one thread while eight others wait in call(): each of
    them gets ClosedError promptly, nothing is freed under them, and the
    server is unharmed."""
    release = threading.Event()
    s = make_server({"slow": lambda p: release.wait(scaled(10)) and p, "echo": lambda p: p})
    c = edgeml.InferenceClient("127.0.0.1", s.port, timeout=scaled(30))
    results = []

    def call(i):
        try:
            results.append(c.call("slow" if i == 0 else "echo", i))
        except edgeml.ClosedError as e:
            results.append(e)
        except Exception as e:  # pragma: no cover - reported below
            results.append(("unexpected", e))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    time.sleep(0.05 * round_)  # close at different points of the calls
    t0 = time.monotonic()
    c.close()
    for t in threads:
        t.join(scaled(10))
    release.set()
    assert not any(t.is_alive() for t in threads), "a call hung after close()"
    assert time.monotonic() - t0 < scaled(5)
    assert len(results) == 8
    assert not [r for r in results if isinstance(r, tuple)], results
    assert any(isinstance(r, edgeml.ClosedError) for r in results)  # the slow one at least
    with pytest.raises(edgeml.ClosedError):
        c.call("echo", 1)
    c.close()  # idempotent
    with edgeml.InferenceClient("127.0.0.1", s.port) as c2:
        assert c2.call("echo", 5) == 5


def test_close_races_many_callers_repeatedly(make_server):
    s = make_server({"echo": lambda p: p})
    for _ in range(20):
        c = edgeml.InferenceClient("127.0.0.1", s.port, timeout=scaled(10))
        stop = threading.Event()
        errors = []

        def hammer():
            while not stop.is_set():
                try:
                    c.call("echo", b"x" * 100)
                except edgeml.ClosedError:
                    return
                except Exception as e:  # pragma: no cover
                    errors.append(e)
                    return

        ts = [threading.Thread(target=hammer) for _ in range(4)]
        for t in ts:
            t.start()
        time.sleep(0.01)
        c.close()
        stop.set()
        for t in ts:
            t.join(scaled(10))
        assert not any(t.is_alive() for t in ts)
        assert not errors, errors


# ---------------------------------------------------------------- 2. stop()

def test_stop_from_other_threads_races_the_serving_threads_close():
    """stop() from several threads at once, while the serving thread closes
    the server as run() returns: no use-after-free, no hang, port freed."""
    for i in range(30):
        s = edgeml.InferenceServer(0, host="127.0.0.1")
        s.register_interface("echo", lambda p: p)
        s.start(threaded=True)
        port = s.port
        if i % 3 == 0:
            with edgeml.InferenceClient("127.0.0.1", port) as c:
                assert c.call("echo", i) == i
        stoppers = [threading.Thread(target=s.stop) for _ in range(4)]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(scaled(10))
        assert not any(t.is_alive() for t in stoppers)
        s.stop()
        assert not s.running
        with socket.socket() as sk:  # the port is free again
            sk.bind(("127.0.0.1", port))


def test_publish_races_stop():
    cfg = edgeml.TrainerConfig(port_number=0, broadcast_port=0)
    for _ in range(10):
        srv = edgeml.TrainerServer(cfg, train_step=lambda p: p)
        srv.start(threaded=True)
        done = threading.Event()
        errors = []

        def publish():
            while not done.is_set():
                try:
                    srv.publish_network({"w": np.ones(1000, np.float32)})
                except edgeml.ClosedError:
                    return
                except Exception as e:  # pragma: no cover
                    errors.append(e)
                    return

        t = threading.Thread(target=publish)
        t.start()
        time.sleep(0.01)
        srv.stop()
        done.set()
        t.join(scaled(10))
        assert not t.is_alive() and not errors, errors


# ---------------------------------------------------------------- 3. fork()

def _child_calls(client, q):
    try:
        got = [client.call("echo", {"who": "child", "i": i}) for i in range(20)]
        q.put(("ok", [(g["who"], g["i"]) for g in got]))
    except BaseException as e:  # pragma: no cover - reported by the parent
        q.put(("error", repr(e)))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_with_calls_in_flight_child_gets_its_own_connection(make_server):
    """A client used by threads and inherited by a multiprocessing child
    (fork) while calls are in flight: the child gets a fresh connection and
    only its own replies; the parent's calls are undisturbed."""
    def slowecho(p):
        time.sleep(0.2)
        return p

    s = make_server({"echo": lambda p: p, "slowecho": slowecho})
    c = edgeml.InferenceClient("127.0.0.1", s.port, timeout=scaled(20))
    assert c.call("echo", 0) == 0
    parent = []

    def parent_calls(k):
        for i in range(5):
            r = c.call("slowecho" if i % 2 == 0 else "echo", {"who": "parent", "k": k, "i": i})
            parent.append((r["who"], r["k"], r["i"]) == ("parent", k, i))

    threads = [threading.Thread(target=parent_calls, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.05)  # calls are in flight now
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child_calls, args=(c, q))
    p.start()
    status, got = q.get(timeout=scaled(30))
    p.join(scaled(10))
    assert status == "ok", got
    assert got == [("child", i) for i in range(20)]
    for t in threads:
        t.join(scaled(30))
    assert parent == [True] * 15
    assert c.call("echo", "after") == "after"
    assert p.exitcode == 0
    c.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_exiting_does_not_break_the_parents_connection(make_server):
    """The child's copy of the client is freed at its exit without shutting
    the shared socket down under the parent."""
    s = make_server({"echo": lambda p: p})
    c = edgeml.InferenceClient("127.0.0.1", s.port, timeout=scaled(10))
    assert c.call("echo", 1) == 1
    pid = os.fork()
    if pid == 0:  # the child: close the inherited client, then exit
        try:
            c.close()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    opened = s.stats()["connections_total"]
    assert c.call("echo", 2) == 2
    assert s.stats()["connections_total"] == opened  # the same connection, not a re-dial


# ------------------------------------------------- 4. decode amplification

def test_decode_amplification_is_refused_before_building():
    """20 million empty maps in a 20 MB frame would take ~2 GB to decode:
    refused with a DecodeError at once, without building them. Measured in
    a fresh process, whose peak memory is not some earlier test's."""
    code = textwrap.dedent("""
        import resource, time, edgeml
        from test_memory_safety import request_frame_of_empty_maps
        frame = request_frame_of_empty_maps(20_000_000)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.monotonic()
        try:
            edgeml.decode_frame(frame)
            print("decoded")
        except edgeml.DecodeError as e:
            grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
            print("refused", "too many objects" in str(e), grown, time.monotonic() - t0)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    assert r.returncode == 0, r.stderr
    verdict, named, grown, took = r.stdout.split()
    assert verdict == "refused" and named == "True"
    assert float(grown) < 200, f"peak memory grew {grown} MB"
    assert float(took) < scaled(5)


def test_a_large_but_reasonable_body_still_decodes():
    items = list(range(1000, 201_000))  # 200k ints in the body: fine
    out = edgeml.decode_frame(edgeml.encode_frame({"x": items, "names": [f"k{i}" for i in range(50_000)]}))
    assert out["payload"]["x"] == items
    empty = edgeml.decode_frame(request_frame_of_empty_maps(100_000))["payload"]
    assert empty == ["echo", [{}] * 100_000]  # under the 64 MiB floor


def peak_mb(pid: int) -> float:
    return proc_mb(pid, "VmHWM")


def test_server_closes_an_amplifying_request_and_serves_the_rest(server_process):
    """The server (its own process, so its peak memory is its own) closes
    the connection that sent it, counts a protocol error, grows by far less
    than the 1.8 GB decoding would take, and serves the others."""
    sp = server_process()
    good = edgeml.InferenceClient("127.0.0.1", sp.port, timeout=scaled(10))
    assert good.call("echo", 1) == 1
    before = peak_mb(sp.proc.pid)
    with socket.create_connection(("127.0.0.1", sp.port)) as sk:
        hello(sk)
        sk.sendall(request_frame_of_empty_maps(20_000_000))
        sk.settimeout(scaled(10))
        assert sk.recv(65536) == b""  # closed, no reply
    grown = peak_mb(sp.proc.pid) - before
    assert grown < 200, f"server peak memory grew {grown:.0f} MB"
    assert good.call("echo", 3) == 3
    good.close()


# ----------------------------------------------- 5. the server-wide budget

def test_peers_holding_unfinished_frames_stay_within_the_budget(make_server):
    """Eight peers each send most of a 24 MB request and stall: with a
    64 MiB budget the server holds at most 64 MiB plus one frame, pauses
    the others, keeps serving small calls, and takes the big ones again
    once memory frees."""
    budget = 64 << 20
    s = make_server({"echo": lambda p: p, "size": lambda p: int(p["x"].nbytes)}, max_pending_bytes=budget)
    good = edgeml.InferenceClient("127.0.0.1", s.port, timeout=scaled(20))
    big = np.ones(24 << 20, np.uint8)
    frame = edgeml.encode_frame(["size", {"x": big}], _core.MSG_REQUEST)
    assert len(frame) > 24 << 20
    socks = []
    try:
        for _ in range(8):
            sk = socket.create_connection(("127.0.0.1", s.port))
            hello(sk)
            sk.setblocking(False)
            socks.append(sk)
        part = frame[:len(frame) - 1000]
        sent = [0] * len(socks)
        deadline = time.monotonic() + scaled(20)
        while time.monotonic() < deadline:  # push what the server will take
            progress = False
            for i, sk in enumerate(socks):
                if sent[i] < len(part):
                    try:
                        n = sk.send(part[sent[i]:sent[i] + (1 << 20)])
                        sent[i] += n
                        progress = True
                    except BlockingIOError:
                        pass
            if all(x == len(part) for x in sent):
                break
            if not progress:
                time.sleep(0.01)
            st = s.stats()
            if st["reads_paused"] >= 5 and st["pending_bytes"] >= 2 * len(frame):
                break
        st = s.stats()
        assert st["max_pending_bytes"] == budget
        assert st["pending_bytes"] <= budget + len(frame)
        assert st["reads_paused"] >= 1
        assert st["connections_open"] >= 9
        for i in range(5):
            assert good.call("echo", i) == i  # small frames are never held back
    finally:
        for sk in socks:
            sk.close()
    assert wait_until(lambda: s.stats()["pending_bytes"] == 0)
    assert good.call("size", {"x": big}) == big.nbytes  # memory freed: big frames go through again
    good.close()


def test_one_frame_larger_than_the_budget_still_gets_through(make_server):
    s = make_server({"size": lambda p: int(p["x"].nbytes)}, max_pending_bytes=1 << 20)
    with edgeml.InferenceClient("127.0.0.1", s.port, timeout=scaled(20)) as c:
        assert c.call("size", {"x": np.zeros(8 << 20, np.uint8)}) == 8 << 20


def test_max_pending_bytes_is_checked():
    with pytest.raises(ValueError, match="max_pending_bytes"):
        edgeml.InferenceServer(0, max_pending_bytes=0)
    with pytest.raises(ValueError, match="max_pending_bytes"):
        edgeml.InferenceServer(0, max_pending_bytes=-5)


# ----------------------------------------------------------- 6. timeouts

def test_infinite_timeout_means_no_limit(make_server):
    s = make_server({"echo": lambda p: p, "slow": lambda p: time.sleep(0.2) or p})
    with edgeml.InferenceClient("127.0.0.1", s.port, timeout=math.inf) as c:
        assert c.call("echo", 1) == 1
        assert c.call("slow", 2) == 2
        assert c.call("echo", 3, timeout=1e30) == 3
        assert c.call("echo", 4, timeout=math.inf) == 4
    with edgeml.InferenceClient("127.0.0.1", s.port, connect_timeout=math.inf) as c:
        assert c.call("echo", 5) == 5


def test_nan_and_negative_timeouts_are_refused(make_server):
    s = make_server({"echo": lambda p: p})
    with pytest.raises(ValueError, match="timeout"):
        edgeml.InferenceClient("127.0.0.1", s.port, timeout=float("nan"))
    with pytest.raises(ValueError, match="timeout"):
        edgeml.InferenceClient("127.0.0.1", s.port, timeout=-1)
    with pytest.raises(ValueError, match="connect_timeout"):
        edgeml.InferenceClient("127.0.0.1", s.port, connect_timeout=float("nan"))
    with edgeml.InferenceClient("127.0.0.1", s.port) as c:
        with pytest.raises(ValueError, match="timeout"):
            c.call("echo", 1, timeout=float("nan"))
        with pytest.raises(ValueError, match="timeout"):
            c.call("echo", 1, timeout=-0.5)
        with pytest.raises(TypeError, match="timeout"):
            c.call("echo", 1, timeout="soon")
        assert c.call("echo", 2) == 2


def test_server_stop_with_infinite_timeout():
    s = edgeml.InferenceServer(0, host="127.0.0.1")
    s.start(threaded=True)
    s.stop(timeout=math.inf)
    assert not s.running


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_fork_child_does_not_hold_the_parents_port_or_connections():
    """A child forked while a server runs drops its copies of the server's
    sockets: once the parent stops, the port is free and the parent's
    clients see their connection close, while the child still lives."""
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    s = edgeml.InferenceServer(port, host="127.0.0.1")
    s.register_interface("echo", lambda p: p)
    s.start(threaded=True)
    c = edgeml.InferenceClient("127.0.0.1", port, timeout=scaled(5), connect_timeout=0, clock_refresh=None)
    assert c.call("echo", 1) == 1
    r, w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child (its at-fork hooks have run): say so, wait until told, then leave
        try:
            os.write(ready_w, b"r")
            os.read(r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"r"
        s.stop()
        with socket.socket() as sk:  # free although the child still runs
            sk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind (TIME_WAIT is fine)
            sk.bind(("127.0.0.1", port))
            sk.listen(1)
        with pytest.raises(edgeml.EdgeMLConnectionError):
            c.call("echo", 2)  # the connection closed (not kept open by the child's copy)
    finally:
        os.write(w, b"x")
        os.waitpid(pid, 0)
        c.close()


def test_slow_reader_resumed_gets_every_reply(make_server):
    """80 pipelined requests for 1 MiB replies, read only after all are
    sent: the server pauses at its 64 MiB reply queue and, once it drains,
    answers the requests it had already buffered (every one of them)."""
    s = make_server({"give": lambda n: np.ones(n, np.uint8)})
    with socket.create_connection(("127.0.0.1", s.port)) as sk:
        hello(sk)
        req = b"".join(edgeml.encode_frame(["give", 1 << 20], _core.MSG_REQUEST, i + 1) for i in range(80))
        sk.sendall(req)
        sk.settimeout(scaled(20))
        got = 0
        buf = b""
        while got < 80:
            chunk = sk.recv(1 << 20)
            assert chunk, f"closed after {got} replies"
            buf += chunk
            while len(buf) >= 64 and len(buf) >= struct.unpack_from("<Q", buf, 24)[0]:
                n = struct.unpack_from("<Q", buf, 24)[0]
                buf = buf[n:]
                got += 1
        assert got == 80


def test_a_stalled_peer_that_never_reads_gives_its_budget_back(make_server):
    """A peer pipelines requests without reading the replies, then stalls
    in the middle of a large frame: the progress timeout closes it and its
    share of the budget comes back at once (not when its replies drain,
    which they never will), so others' large frames go through."""
    s = make_server({"echo": lambda p: p, "size": lambda p: int(p["x"].nbytes)},
                    max_pending_bytes=4 << 20, progress_timeout=0.5)
    with socket.create_connection(("127.0.0.1", s.port)) as a:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hello(a)
        a.setblocking(False)
        small = edgeml.encode_frame(["echo", {"x": np.zeros(1 << 20, np.uint8)}], _core.MSG_REQUEST, 1)
        big = edgeml.encode_frame(["echo", {"x": np.zeros(3 << 20, np.uint8)}], _core.MSG_REQUEST, 2)
        data = small * 24 + big[:256 << 10]
        sent, deadline = 0, time.monotonic() + scaled(10)
        while sent < len(data) and time.monotonic() < deadline:
            try:
                sent += a.send(data[sent:sent + (1 << 20)])
            except BlockingIOError:
                time.sleep(0.01)
        assert wait_until(lambda: s.stats()["stalled_closed"] >= 1, timeout=10)
        assert wait_until(lambda: s.stats()["pending_bytes"] == 0, timeout=5)
        with edgeml.InferenceClient("127.0.0.1", s.port, timeout=scaled(10)) as b:
            assert b.call("size", {"x": np.zeros(2 << 20, np.uint8)}) == 2 << 20
