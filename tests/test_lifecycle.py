"""Servers and clients under concurrency, start/stop/re-bind, context
managers, async calls, Ctrl-C."""
import asyncio
import concurrent.futures
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import edgeml

from conftest import scaled


def test_seed_api_shape():
    """The original edgeml's usage, verbatim apart from the port."""
    def predict(payload):
        return {"prediction": "some_value", "got": payload["audio"]}

    inference_server = edgeml.InferenceServer(port_num=0)
    inference_server.register_interface("voice_reg", predict)
    inference_server.start(threaded=True)
    try:
        client = edgeml.InferenceClient("localhost", inference_server.port)
        res = client.call("voice_reg", {"audio": "serialized_audio"})
        assert res == {"prediction": "some_value", "got": "serialized_audio"}
        client.close()
    finally:
        inference_server.stop()


def test_several_clients_at_once(server, make_client):
    clients = [make_client(server.port) for _ in range(8)]

    def work(i, c):
        for j in range(200):
            assert c.call("echo", {"i": i, "j": j, "a": np.full(10, j)})["j"] == j
        return i

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        assert sorted(ex.map(work, range(8), clients)) == list(range(8))
    assert server.stats()["connections_open"] == 8


def test_one_client_many_threads(server, client):
    errors = []

    def work(i):
        try:
            for j in range(300):
                v = {"i": i, "j": j}
                r = client.call("echo", v)
                if r != v:
                    errors.append((v, r))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(scaled(60))
    assert not errors
    assert server.stats()["connections_total"] == 1  # all multiplexed on one connection


def test_clients_in_other_processes(server):
    code = f"""
import edgeml, numpy as np
c = edgeml.InferenceClient("127.0.0.1", {server.port})
for j in range(100):
    assert c.call("echo", {{"a": np.arange(j)}})["a"].sum() == j * (j - 1) // 2
print("ok")
"""
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    for p in procs:
        out, _ = p.communicate(timeout=scaled(60))
        assert p.returncode == 0 and out.strip() == "ok"


def test_call_async_and_acall(make_server, make_client):
    gate = threading.Event()
    s = make_server({"echo": lambda p: p, "wait": lambda p: gate.wait(scaled(5)) and p})
    c = make_client(s.port)
    futs = [c.call_async("echo", {"k": i}) for i in range(20)]
    assert [f.result(scaled(10)) for f in futs] == [{"k": i} for i in range(20)]
    slow = c.call_async("wait", 1)
    assert not slow.done()
    gate.set()
    assert slow.result(scaled(10)) == 1
    bad = c.call_async("missing", {})
    with pytest.raises(edgeml.UnknownInterfaceError):
        bad.result(scaled(10))

    async def main():
        rs = await asyncio.gather(*(c.acall("echo", i) for i in range(10)))
        assert rs == list(range(10))

    asyncio.run(main())


def test_stop_frees_the_port_at_once_and_is_idempotent():
    s = edgeml.InferenceServer(0, host="127.0.0.1")
    s.register_interface("echo", lambda p: p)
    s.start(threaded=True)
    port = s.port
    c = edgeml.InferenceClient("127.0.0.1", port)
    assert c.call("echo", 1) == 1
    s.stop()
    s.stop()
    assert not s.running
    s2 = edgeml.InferenceServer(port, host="127.0.0.1")  # re-bind right away
    s2.register_interface("echo", lambda p: p + 1)
    s2.start(threaded=True)
    try:
        # the old connection was closed by stop(): the first call notices
        # that before writing and re-dials (issue 11)
        assert c.call("echo", 1) == 2
    finally:
        c.close()
        s2.stop()


def test_restart_same_object():
    s = edgeml.InferenceServer(0, host="127.0.0.1")
    s.register_interface("echo", lambda p: p)
    for _ in range(3):
        s.start(threaded=True)
        with edgeml.InferenceClient("127.0.0.1", s.port) as c:
            assert c.call("echo", "x") == "x"
        s.stop()


def test_blocking_start_stopped_from_another_thread():
    s = edgeml.InferenceServer(0, host="127.0.0.1")
    s.register_interface("echo", lambda p: p)
    done = threading.Event()

    def serve():
        s.start()  # blocks
        done.set()

    t = threading.Thread(target=serve)
    t.start()
    deadline = time.monotonic() + scaled(5)
    while not s.running and time.monotonic() < deadline:
        time.sleep(0.01)
    with edgeml.InferenceClient("127.0.0.1", s.port) as c:
        assert c.call("echo", 3) == 3
    s.stop()
    assert done.wait(scaled(5))
    t.join()


def test_stop_from_inside_a_handler_sends_the_reply():
    s = edgeml.InferenceServer(0, host="127.0.0.1")

    def shutdown(p):
        s.stop()
        return {"bye": True}

    s.register_interface("shutdown", shutdown)
    s.start(threaded=True)
    with edgeml.InferenceClient("127.0.0.1", s.port) as c:
        assert c.call("shutdown", {}) == {"bye": True}
    s._thread.join(scaled(5))
    assert not s.running


def test_context_managers_and_repr():
    with edgeml.InferenceServer(0, host="127.0.0.1") as s:
        s.register_interface("echo", lambda p: p)
        assert "running" in repr(s) and "interfaces=['echo']" in repr(s)
        with edgeml.InferenceClient("127.0.0.1", s.port) as c:
            assert c.call("echo", [1]) == [1]
            assert "open" in repr(c)
            assert c.ping() > 0
        assert "closed" in repr(c)
        assert "requests=1" in repr(s)
    assert "stopped" in repr(s)


def test_close_while_calls_in_flight_fails_them(make_server, make_client):
    gate = threading.Event()
    s = make_server({"wait": lambda p: gate.wait(scaled(5)) and p})
    c = make_client(s.port)
    fut = c.call_async("wait", 1)
    time.sleep(0.1)
    c._core.shutdown()
    with pytest.raises(edgeml.ClosedError):
        fut.result(scaled(5))
    gate.set()


def test_ctrl_c_stops_a_blocking_server_and_frees_the_port():
    code = """
import edgeml
s = edgeml.InferenceServer(0, host="127.0.0.1")
s.register_interface("echo", lambda p: p)
import threading
threading.Timer(0.2, lambda: print(s.port, flush=True)).start()
try:
    s.start()
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    port = int(p.stdout.readline())
    with edgeml.InferenceClient("127.0.0.1", port) as c:
        assert c.call("echo", 1) == 1
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=scaled(10))
    assert "interrupted" in out
    with socket.socket() as sk:  # the port is free
        sk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sk.bind(("127.0.0.1", port))


def test_ctrl_c_interrupts_a_waiting_client_call():
    code = """
import edgeml, threading, time, os, signal
s = edgeml.InferenceServer(0, host="127.0.0.1")
s.register_interface("slow", lambda p: time.sleep(3) or p)
s.start(threaded=True)
c = edgeml.InferenceClient("127.0.0.1", s.port, timeout=None)
threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
t0 = time.monotonic()
try:
    c.call("slow", 1)
except KeyboardInterrupt:
    print("interrupted after %.1f" % (time.monotonic() - t0), flush=True)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled(20)).stdout
    assert out.startswith("interrupted after")
    assert float(out.split()[-1]) < 2.5


def test_interpreter_exit_with_a_running_threaded_server():
    code = """
import edgeml
s = edgeml.InferenceServer(0, host="127.0.0.1")
s.register_interface("echo", lambda p: p)
s.start(threaded=True)
c = edgeml.InferenceClient("127.0.0.1", s.port)
assert c.call("echo", 1) == 1
print("exiting", flush=True)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled(20))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "exiting"
