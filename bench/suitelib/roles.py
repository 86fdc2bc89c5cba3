"""What each child process of bench/suite runs:

    python bench/suitelib/roles.py ROLE '{"json": "arguments"}'

Roles (STACK is zmq-pickle, zmq-msgpack, zmq-lz4pickle, edgeml, or py-socket for rtt):

  echo_server    STACK zc         REP / InferenceServer("echo"): decode each
                                  request, return it, encode the reply
  rtt_client     STACK port payload iters warmup zc
                                  timed round trips -> stats, every sample,
                                  client CPU per call
  rate_client    STACK port       READY, then for each "GO <start_ns> <dur_ns>"
                                  line on stdin: calls back to back, counting
                                  those that complete inside the window
  data_server    STACK zc         pyzmq REP taking agentlace-style datastore
                                  messages into a QueuedDataStore
  trainer_server                  edgeml TrainerServer: store "replay" and
                                  the weights broadcast (publisher commands)
  update_client  STACK port bport iters warmup zc
                                  30 transitions inserted (untimed), then
                                  the timed update -> stats
  publisher      STACK            pyzmq PUB (or, for edgeml, trainer_server):
                                  "hello" / "pub SEQ" commands on stdin,
                                  answers {"t0": ns, "t1": ns} around publish
  subscriber     STACK port bport slow
                                  prints {"seq": SEQ, "t": ns} when a value
                                  is decoded (time.monotonic_ns, i.e.
                                  CLOCK_MONOTONIC, comparable across
                                  processes); slow: then sleeps 1 s

Every role prints "READY [json]" when it can be used, JSON lines after that,
and exits when its stdin closes. Errors are reported as {"error": "..."}.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import sys
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from suitelib import payloads  # noqa: E402
from suitelib.common import stats_us  # noqa: E402

HOST = "127.0.0.1"
_out_lock = threading.Lock()


def emit(obj=None, raw=None):
    """One line on stdout, atomically (several threads may print)."""
    line = raw if raw is not None else json.dumps(obj)
    data = (line + "\n").encode()
    with _out_lock:
        os.write(1, data)


def ready(info=None):
    emit(raw="READY" + ("" if info is None else " " + json.dumps(info)))


def exit_on_stdin_eof(cleanup=None):
    """Block until the driver closes our stdin (or dies), then exit."""
    try:
        while sys.stdin.buffer.read(65536):
            pass
    except Exception:
        pass
    if cleanup is not None:
        try:
            cleanup()
        except Exception:
            pass
    os._exit(0)


def watch_stdin():
    threading.Thread(target=exit_on_stdin_eof, daemon=True).start()


def cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def zmq_parts(stack):
    """(encode, decode) of a pyzmq stack name."""
    from suitelib import codecs
    return codecs.codec(stack.split("-", 1)[1])


# ------------------------------------------------------------------ echo (round trips)

def _recv_msg(recv_into, buf, view):
    """One message (8-byte little-endian length + that many bytes) into
    buf from its start; -> its total length, 0 when the peer closed. A
    small message takes one recv_into and a length check: as little Python
    per message as a correct loop can have."""
    got = recv_into(view)
    if not got:
        return 0
    while got < 8 or got < (want := 8 + int.from_bytes(buf[:8], "little")):
        if got >= 8 and want > len(buf):
            raise RuntimeError("py-socket: message larger than the buffer")
        n = recv_into(view[got:])
        if not n:
            return 0
        got += n
    return got


def _py_socket_echo_server():
    """The C floor's server in plain Python (a blocking socket, 8-byte
    little-endian length + payload, echoed back from one buffer): what any
    Python-to-Python stack pays at least, with no framing or codec."""
    import socket
    ls = socket.socket()
    ls.bind((HOST, 0))
    ls.listen(1)
    watch_stdin()
    ready({"port": ls.getsockname()[1]})
    conn, _ = ls.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(8 + 40 * 2**20)
    view = memoryview(buf)
    recv_into, sendall = conn.recv_into, conn.sendall
    while True:
        n = _recv_msg(recv_into, buf, view)
        if not n:
            return
        sendall(view[:n])


def echo_server(stack, zc=False):
    if stack == "py-socket":
        return _py_socket_echo_server()
    if stack == "edgeml":
        import edgeml
        server = edgeml.InferenceServer(0, host=HOST)
        server.register_interface("echo", lambda p: p)
        server.start(threaded=True)
        ready({"port": server.port})
        exit_on_stdin_eof(server.stop)
    import zmq

    from suitelib import codecs
    encode, decode = zmq_parts(stack)
    handler = lambda p: p  # noqa: E731  (the handler edgeml runs)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://{HOST}:*")
    port = int(sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
    watch_stdin()
    ready({"port": port})
    send, recv = codecs.send, codecs.recv
    while True:
        send(sock, encode(handler(decode(recv(sock, zc))), zc), zc)


def _caller(stack, port, zc):
    """(call(payload) -> reply, close) for one client connection."""
    if stack == "py-socket":  # the payload's raw bytes, framed as the C floor frames them
        import socket
        sock = socket.create_connection((HOST, port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msgs, buf = {}, bytearray(8 + 40 * 2**20)
        view = memoryview(buf)
        recv_into, sendall = sock.recv_into, sock.sendall

        def call(p):
            m = msgs.get(id(p))  # the suite sends one payload object again and again
            if m is None or m[0] is not p:
                n = payloads.raw_bytes(p)
                m = msgs[id(p)] = (p, n.to_bytes(8, "little") + bytes(n), 8 + n)
            sendall(m[1])
            if _recv_msg(recv_into, buf, view) != m[2]:
                raise RuntimeError("py-socket: the echo differs from what was sent")
            return p

        return call, sock.close
    if stack == "edgeml":
        import edgeml
        client = edgeml.InferenceClient(HOST, port)
        call = client.call
        return (lambda p: call("echo", p)), client.close
    import zmq

    from suitelib import codecs
    encode, decode = zmq_parts(stack)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 60000)
    sock.connect(f"tcp://{HOST}:{port}")
    send, recv = codecs.send, codecs.recv

    def call(p):
        send(sock, encode(p, zc), zc)
        return decode(recv(sock, zc))

    def close():
        sock.close()
        ctx.term()

    return call, close


def rtt_client(stack, port, payload, iters, warmup, zc=False):
    p = payloads.make(payload)
    call, close = _caller(stack, port, zc)
    try:
        got = call(p)
        if not payloads.same(p, got):
            raise RuntimeError(f"{stack}: the echo differs from what was sent")
        del got
        for _ in range(warmup):
            call(p)
        ns = [0] * iters
        clock = time.perf_counter_ns
        gc.disable()
        c0 = cpu_s()
        for i in range(iters):
            t0 = clock()
            call(p)
            ns[i] = clock() - t0
        c1 = cpu_s()
        gc.enable()
        res = stats_us(ns)
        res["cpu_us_per_call"] = (c1 - c0) * 1e6 / iters
        res["wire_bytes"] = payloads.raw_bytes(p)
        res["samples_ns"] = ns
        emit(res)
    finally:
        close()


def rate_client(stack, port, payload="small"):
    p = payloads.make(payload)
    call, close = _caller(stack, port, False)
    try:
        for _ in range(200):
            call(p)
        ready()
        clock = time.monotonic_ns
        for line in iter(sys.stdin.readline, ""):  # one window per GO line, until stdin closes
            cmd = line.split()
            if len(cmd) != 3 or cmd[0] != "GO":
                raise RuntimeError(f"expected 'GO <start_ns> <dur_ns>', got {line!r}")
            start, end = int(cmd[1]), int(cmd[1]) + int(cmd[2])
            calls, c0 = 0, None
            gc.disable()
            while True:
                now = clock()
                if c0 is None and now >= start:
                    c0 = cpu_s()
                if now >= end:
                    break
                call(p)
                t = clock()
                if start <= t <= end:
                    calls += 1
            c1 = cpu_s()
            gc.enable()
            emit({"calls": calls, "cpu_s": c1 - (c0 if c0 is not None else c1)})
    finally:
        close()


# ------------------------------------------------------------------ trainer

def _trainer_server_edgeml(store_capacity=300):
    """TrainerServer with store "replay"; publisher commands on stdin."""
    import edgeml
    config = edgeml.TrainerConfig(port_number=0, broadcast_port=0)
    server = edgeml.TrainerServer(config, host=HOST)
    server.register_data_store("replay", edgeml.QueuedDataStore(store_capacity))
    server.start(threaded=True)
    _publisher_loop({"port": server.port, "bport": server.broadcast_port}, server.publish_network,
                    cleanup=server.stop)


def trainer_server():
    _trainer_server_edgeml()


def data_server(stack, zc=True, store_capacity=300):
    """The predecessor's learner side of update(): a REP socket taking
    {"type": "datastore", "store_name", "payload": {"data", "last_id"}}."""
    import zmq

    import edgeml
    from suitelib import codecs
    encode, decode = zmq_parts(stack)
    stores = {"replay": edgeml.QueuedDataStore(store_capacity)}
    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://{HOST}:*")
    port = int(sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
    watch_stdin()
    ready({"port": port})
    send, recv = codecs.send, codecs.recv
    while True:
        msg = decode(recv(sock, zc))
        if msg.get("type") == "datastore" and msg.get("store_name") in stores:
            stores[msg["store_name"]].batch_insert(msg["payload"]["data"])
            reply = {"success": True}
        else:
            reply = {"success": False, "message": "bad request"}
        send(sock, encode(reply, False), False)


def update_client(stack, port, bport=None, iters=50, warmup=5, zc=True):
    import edgeml
    trs = payloads.transitions()
    local = edgeml.QueuedDataStore(100_000)
    clock = time.perf_counter_ns
    if stack == "edgeml":
        import dataclasses
        config = dataclasses.replace(edgeml.TrainerConfig(port_number=0, broadcast_port=0), port_number=port,
                                     broadcast_port=bport)
        client = edgeml.TrainerClient(HOST, config, data_stores={"replay": local})

        def update():
            if client.update() is not True:
                raise RuntimeError("update() did not complete")

        close = client.stop
    else:
        import zmq

        from suitelib import codecs
        encode, decode = zmq_parts(stack)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 60000)
        sock.connect(f"tcp://{HOST}:{port}")
        send, recv = codecs.send, codecs.recv
        synced = {"replay": -1}

        def update():
            # agentlace's TrainerClient.update(): the items after the last
            # synced id, one request per store
            for name, store in (("replay", local),):
                batch, last_id = store.get_data_since(synced[name])
                if not batch:
                    continue
                send(sock, encode({"type": "datastore", "store_name": name,
                                   "payload": {"data": batch, "last_id": last_id}}, zc), zc)
                rep = decode(recv(sock, False))
                if not rep.get("success"):
                    raise RuntimeError(f"server refused: {rep}")
                synced[name] = last_id

        def close():
            sock.close()
            ctx.term()

    try:
        ns = []
        gc.disable()
        for i in range(warmup + iters):
            for t in trs:  # the actor's inserts: not timed
                local.insert(t)
            t0 = clock()
            update()
            t1 = clock()
            if i >= warmup:
                ns.append(t1 - t0)
        gc.enable()
        res = stats_us(ns)
        res["wire_bytes"] = payloads.raw_bytes(trs)
        res["samples_ns"] = ns
        emit(res)
    finally:
        close()


# ------------------------------------------------------------------ broadcast

def _publisher_loop(info, publish, cleanup=None, hello=None):
    """READY info; then per stdin line: "hello" (pyzmq sync message) or
    "pub SEQ" (publish the weights with "step": SEQ) -> {"t0", "t1"}."""
    weights = payloads.make("weights")
    ready(info)
    gc.disable()
    clock = time.monotonic_ns
    for line in iter(sys.stdin.readline, ""):
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "hello":
            if hello is not None:
                hello()
            emit({})
        elif cmd[0] == "pub":
            w = dict(weights)
            w["step"] = int(cmd[1])
            gc.collect()  # before the round: never while subscribers receive (it takes ms of CPU)
            t0 = clock()
            publish(w)
            t1 = clock()
            emit({"t0": t0, "t1": t1})
            del w
        else:
            emit({"error": f"unknown command {line!r}"})
    if cleanup is not None:
        cleanup()
    os._exit(0)


def publisher(stack):
    if stack == "edgeml":
        return _trainer_server_edgeml()
    import zmq

    from suitelib import codecs
    encode, _ = zmq_parts(stack)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://{HOST}:*")
    port = int(sock.getsockopt(zmq.LAST_ENDPOINT).decode().rsplit(":", 1)[1])
    send = codecs.send
    _publisher_loop({"port": port}, lambda w: send(sock, encode(w, True), True),
                    hello=lambda: sock.send(codecs.HELLO))


def _weights_checker():
    """check(w): raises unless w looks like payloads.make("weights") (keys,
    dtypes, shapes, and a few values of each array: cheap)."""
    import numpy as np
    ref = payloads.make("weights")
    tails = {k: (v.dtype, v.shape, v.ravel()[-4:].copy()) for k, v in ref.items() if k != "step"}
    keys = ref.keys()
    del ref

    def check(w):
        if not isinstance(w, dict) or w.keys() != keys:
            raise RuntimeError("received weights with other keys")
        for k, (dt, shape, tail) in tails.items():
            a = w[k]
            if not isinstance(a, np.ndarray) or a.dtype != dt or a.shape != shape or \
                    not np.array_equal(a.ravel()[-4:], tail):
                raise RuntimeError(f"received weights differ at {k!r}")

    return check


def subscriber(stack, port, bport=None, slow=False):
    clock = time.monotonic_ns
    check = _weights_checker()

    def on_value(w):
        t = clock()
        emit({"seq": int(w["step"]), "t": t})
        try:
            check(w)
        except Exception as e:
            emit({"error": f"subscriber: {e}"})
            os._exit(1)
        if slow:
            time.sleep(1.0)

    if stack == "edgeml":
        import dataclasses

        import edgeml
        config = dataclasses.replace(edgeml.TrainerConfig(port_number=0, broadcast_port=0), port_number=port,
                                     broadcast_port=bport)
        client = edgeml.TrainerClient(HOST, config)
        client.recv_network_callback(on_value)
        ready()
        exit_on_stdin_eof(client.stop)
    import zmq

    from suitelib import codecs
    _, decode = zmq_parts(stack)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(f"tcp://{HOST}:{port}")
    watch_stdin()
    ready()
    hello_seen = False
    recv = codecs.recv
    while True:
        frames = recv(sock, True)
        if len(frames) == 1 and frames[0].nbytes == len(codecs.HELLO) and bytes(frames[0]) == codecs.HELLO:
            if not hello_seen:
                emit({"hello": True})
                hello_seen = True
            continue
        on_value(decode(frames))
        del frames


ROLES = {f.__name__: f for f in (echo_server, rtt_client, rate_client, trainer_server, data_server,
                                 update_client, publisher, subscriber)}

if __name__ == "__main__":
    role, kw = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    try:
        ROLES[role](**kw)
    except KeyboardInterrupt:
        os._exit(130)
    except BaseException as e:  # report, then exit: the driver shows it
        traceback.print_exc()
        emit({"error": f"{role}: {type(e).__name__}: {e}"})
        sys.stdout.flush()
        os._exit(1)
    os._exit(0)
