"""Every failure gives a typed error with a clear message; none hangs and
none returns None; the server keeps serving."""
import socket
import struct
import threading
import time

import numpy as np
import pytest

import edgeml
from edgeml import _core

from conftest import scaled


def test_error_hierarchy_matches_builtins():
    assert issubclass(edgeml.EdgeMLTimeoutError, TimeoutError)
    assert issubclass(edgeml.EdgeMLConnectionError, ConnectionError)
    assert issubclass(edgeml.EncodeError, TypeError)
    for cls in (edgeml.EdgeMLTimeoutError, edgeml.EdgeMLConnectionError, edgeml.EncodeError,
                edgeml.RemoteError, edgeml.UnknownInterfaceError, edgeml.AddressInUseError):
        assert issubclass(cls, edgeml.EdgeMLError)


def test_every_core_error_code_has_a_class():
    from edgeml.errors import CODE_TO_ERROR
    names = {name for name, _c, _m in _core.error_table()} - {"OK"}
    assert names == set(CODE_TO_ERROR)


def test_unknown_interface_names_the_existing_ones(make_server, make_client):
    s = make_server({"predict": lambda p: p, "embed": lambda p: p})
    c = make_client(s.port)
    with pytest.raises(edgeml.UnknownInterfaceError) as ei:
        c.call("predikt", {})
    assert "predikt" in str(ei.value) and "'embed'" in str(ei.value) and "'predict'" in str(ei.value)
    assert ei.value.interfaces == ["embed", "predict"]
    assert isinstance(ei.value, LookupError)
    assert c.interfaces() == ["embed", "predict"]


def test_handler_exception_becomes_remote_error_and_server_lives(make_server, make_client):
    def bad(p):
        raise ValueError(f"cannot handle {p['x']}")

    s = make_server({"bad": bad, "echo": lambda p: p})
    c = make_client(s.port)
    for i in range(3):
        with pytest.raises(edgeml.RemoteError) as ei:
            c.call("bad", {"x": i})
        e = ei.value
        assert e.remote_type == "ValueError"
        assert e.remote_message == f"cannot handle {i}"
        assert "Traceback" in e.remote_traceback and "in bad" in e.remote_traceback
    assert c.call("echo", {"ok": 1}) == {"ok": 1}
    assert s.stats()["errors_sent"] == 3


def test_handler_returning_unencodable_reply_is_a_remote_error(make_server, make_client):
    s = make_server({"obj": lambda p: {"result": object()}, "echo": lambda p: p})
    c = make_client(s.port)
    with pytest.raises(edgeml.RemoteError) as ei:
        c.call("obj", {})
    assert "EncodeError" in ei.value.remote_type and "reply['result']" in ei.value.remote_message
    assert c.call("echo", 1) == 1


def test_timeout_raises_and_connection_stays_usable(make_server, make_client):
    release = threading.Event()

    def slow(p):
        release.wait(scaled(5))
        return "late"

    s = make_server({"slow": slow, "echo": lambda p: p})
    c = make_client(s.port)
    t0 = time.monotonic()
    with pytest.raises(edgeml.EdgeMLTimeoutError, match=r"no reply from 127\.0\.0\.1:\d+ to 'slow' within 0\.2"):
        c.call("slow", {}, timeout=0.2)
    assert time.monotonic() - t0 < scaled(2)
    release.set()
    assert c.call("echo", "after") == "after"  # the late reply is dropped, not mistaken for ours


def test_server_down_is_a_connection_error_naming_host_port():
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(edgeml.EdgeMLConnectionError, match=rf"127\.0\.0\.1:{port}"):
        edgeml.InferenceClient("127.0.0.1", port, connect_timeout=0)
    assert time.monotonic() - t0 < scaled(2)


def test_connect_waits_for_a_server_that_starts_late(make_client):
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    s = edgeml.InferenceServer(port, host="127.0.0.1")
    s.register_interface("echo", lambda p: p)
    timer = threading.Timer(0.3, s.start, kwargs={"threaded": True})
    timer.start()
    try:
        c = make_client(port, connect_timeout=scaled(10))
        assert c.call("echo", 5) == 5
    finally:
        timer.join()
        s.stop()


def test_server_killed_mid_call_fails_at_once(server_process, make_client):
    proc = server_process("""
        def die(p):
            os._exit(3)
        s.register_interface('die', die)
        s.register_interface('echo', lambda p: p)
    """)
    c = make_client(proc.port, timeout=scaled(30), connect_timeout=0.3)
    assert c.call("echo", 1) == 1
    t0 = time.monotonic()
    with pytest.raises(edgeml.EdgeMLConnectionError, match=str(proc.port)):
        c.call("die", {})
    assert time.monotonic() - t0 < scaled(5)  # not the 30 s timeout
    # the next call re-dials with backoff for connect_timeout, then says why
    with pytest.raises(edgeml.EdgeMLConnectionError, match="refused|closed"):
        c.call("echo", 1)


def test_client_reconnects_after_server_restart(server_process, make_client):
    proc = server_process()
    port = proc.port
    c = make_client(port)
    assert c.call("echo", 1) == 1
    proc.kill()
    with pytest.raises(edgeml.EdgeMLConnectionError):
        c.call("echo", 2)
    proc2 = server_process(port=port)
    assert proc2.port == port
    assert c.call("echo", 3) == 3


def test_call_during_a_server_restart_waits_and_succeeds(server_process, make_client):
    """A call made while the server is down re-dials with backoff (up to
    connect_timeout) and succeeds once the server is back on its port."""
    import threading
    proc = server_process()
    port = proc.port
    c = make_client(port, connect_timeout=scaled(20))
    assert c.call("echo", 1) == 1
    proc.kill()
    # a call on the connection that died fails (it may have been sent: edgeml
    # never re-sends a request on its own); after it the client knows
    with pytest.raises((edgeml.EdgeMLConnectionError, edgeml.EdgeMLTimeoutError)):
        c.call("echo", 0, timeout=0.5)
    result = {}

    def call():
        try:
            result["v"] = c.call("echo", 2)
        except Exception as e:  # pragma: no cover - reported below
            result["e"] = e

    th = threading.Thread(target=call)
    th.start()
    time.sleep(0.3)  # the call is now retrying a refused connect
    assert th.is_alive()
    server_process(port=port)
    th.join(scaled(20))
    assert result == {"v": 2}


def test_encode_error_names_key_path_and_type(server, client):
    class Custom:
        pass

    cases = [
        ({"obs": {"img": [1, 2, Custom()]}}, r"payload\['obs'\]\['img'\]\[2\] \(type Custom\)"),
        ({"s": {1, object()}}, r"payload\['s'\]\[\d\] \(type object\)"),
        ({"x": 2**64}, r"payload\['x'\].*64-bit"),
        ({"x": -2**63 - 1}, r"payload\['x'\].*64-bit"),
        ({"a": np.array([object()], dtype=object)}, r"payload\['a'\].*Python objects"),
        ({"a": np.zeros(2, dtype=[("x", "f4"), ("y", "i4")])}, r"payload\['a'\].*structured"),
        ({object(): 1}, r"dict key"),
    ]
    for payload, pattern in cases:
        with pytest.raises(edgeml.EncodeError, match=pattern):
            client.call("echo", payload)
        with pytest.raises(TypeError):
            client.call("echo", payload)
    assert client.call("echo", {"still": "works"}) == {"still": "works"}


def test_port_in_use_is_a_clear_error(server):
    s2 = edgeml.InferenceServer(server.port, host="127.0.0.1")
    with pytest.raises(edgeml.AddressInUseError, match=f"{server.port}.*already in use"):
        s2.start(threaded=True)
    assert isinstance(edgeml.AddressInUseError("x"), OSError)


def test_message_too_large(make_server, make_client):
    s = make_server(max_message_bytes=1 << 20)
    c = make_client(s.port)
    with pytest.raises(edgeml.MessageTooLargeError, match="max_message_bytes"):
        c.call("echo", {"a": np.zeros(2 << 20, np.uint8)})
    assert c.call("echo", {"a": 1}) == {"a": 1}
    # replies larger than the client's own limit
    c2 = make_client(s.port, max_message_bytes=100_000)
    with pytest.raises(edgeml.MessageTooLargeError):
        c2.call("echo", {"a": np.zeros(500_000, np.uint8)})


def test_wrong_kind_of_server_is_a_handshake_error(server):
    with pytest.raises(edgeml.HandshakeError, match="'trainer' server"):
        _core.Client("127.0.0.1", server.port, "trainer", 0.0, 0)


def raw_connect(port):
    sk = socket.create_connection(("127.0.0.1", port), timeout=scaled(5))
    return sk


def recv_all_until_close(sk):
    data = b""
    while True:
        try:
            chunk = sk.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


@pytest.mark.parametrize("junk", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b" " * 64,                   # wrong magic
    b"EDGM" + bytes([99]) + b"\x01" + b"\x00" * 58,                     # wrong version
    b"EDGM\x01\x01\x00\x00" + b"\x00" * 16 + struct.pack("<Q", 4 << 30) + b"\x00" * 32,  # 4 GB
])
def test_malformed_frames_close_only_that_connection(server, client, junk):
    sk = raw_connect(server.port)
    sk.sendall(junk)
    sk.settimeout(scaled(5))
    recv_all_until_close(sk)  # the server closes it
    sk.close()
    assert client.call("echo", {"fine": True}) == {"fine": True}
    assert server.stats()["protocol_errors"] >= 1


def test_request_with_lying_body_closes_connection(server, client):
    # a valid HELLO first, then a REQUEST whose body claims a huge array
    hello = edgeml.encode_frame({"proto": 1, "role": "client"}, 1, 0)
    sk = raw_connect(server.port)
    sk.sendall(hello)
    hdr = sk.recv(64)
    assert hdr[:4] == b"EDGM" and hdr[5] == 1
    body = b"\x92\xa4echo\xdd\xff\xff\xff\xff"  # [ "echo", array32(4G elements) ]
    frame_len = (64 + len(body) + 7) // 8 * 8
    header = (b"EDGM" + bytes([1, 12]) + b"\x00\x00" + struct.pack("<QIIQ", 1, len(body), 0, frame_len)
              + b"\x00" * 32)
    sk.sendall(header + body + b"\x00" * (frame_len - 64 - len(body)))
    sk.settimeout(scaled(5))
    recv_all_until_close(sk)  # returns only when the server closed it (else socket.timeout)
    sk.close()
    assert server.stats()["protocol_errors"] >= 1
    assert client.call("echo", 1) == 1


def test_closed_client_raises(server, make_client):
    c = make_client(server.port)
    c.close()
    c.close()  # idempotent
    with pytest.raises(edgeml.ClosedError):
        c.call("echo", 1)


def test_bad_arguments():
    with pytest.raises(ValueError):
        edgeml.InferenceServer(70000)
    with pytest.raises(ValueError):
        edgeml.InferenceServer(0).register_interface("__x", lambda p: p)
    with pytest.raises(TypeError):
        edgeml.InferenceServer(0).register_interface("x", 5)


def test_interfaces_registered_and_removed_while_serving(make_server, make_client):
    # The C server looks names up in the live interface table: a change made
    # while it runs takes effect on the next call, never a stale handler.
    s = make_server({"echo": lambda p: p})
    c = make_client(s.port)
    assert c.call("echo", 1) == 1
    s.register_interface("double", lambda p: p * 2)
    assert c.call("double", 21) == 42
    s.register_interface("echo", lambda p: ("replaced", p))
    assert c.call("echo", 1) == ("replaced", 1)
    s.unregister_interface("double")
    with pytest.raises(edgeml.UnknownInterfaceError) as e:
        c.call("double", 1)
    assert e.value.interfaces == ["echo"]
    assert c.interfaces() == ["echo"]


def test_core_errors_carry_code_and_name(make_server):
    s = make_server({"slow": lambda p: __import__("time").sleep(0.5) or p})
    with edgeml.InferenceClient("127.0.0.1", s.port) as c:
        with pytest.raises(edgeml.EdgeMLTimeoutError) as ei:
            c.call("slow", 1, timeout=0.05)
    assert ei.value.code == -3 and ei.value.name == "ETIMEDOUT"
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    with pytest.raises(edgeml.EdgeMLConnectionError) as ei:
        edgeml.InferenceClient("127.0.0.1", port, connect_timeout=0)
    assert ei.value.name == "ECONNREFUSED" and ei.value.code == -4
    assert edgeml.EdgeMLError("x").code is None and edgeml.EdgeMLError("x").name is None


def test_call_arguments_are_checked_and_the_connection_keeps_serving(make_server, make_client):
    """core.call parses its arguments by hand (the hot path): wrong types
    and counts raise TypeError, nothing is sent, and the client goes on."""
    s = make_server({"echo": lambda p: p})
    c = make_client(s.port)
    for bad in (123, b"echo", None):
        with pytest.raises(TypeError, match="interface name must be a str, got"):
            c.call(bad, 1)
    with pytest.raises(TypeError):
        c.call("echo", 1, timeout="soon")
    core = c._core
    with pytest.raises(TypeError, match="from 3 to 5 positional arguments"):
        core.call("echo", 1)
    with pytest.raises(TypeError, match="from 3 to 5 positional arguments"):
        core.call("echo", 1, 1.0, _core.MSG_REQUEST, False, "extra")
    with pytest.raises(TypeError):
        core.call("echo", 1, 1.0, 1.5)  # type must be an int
    with pytest.raises(OverflowError):
        core.call("echo", 1, 1.0, 2**40)
    with pytest.raises(UnicodeEncodeError):
        c.call("\ud800", 1)  # a lone surrogate has no UTF-8 form
    assert core.call("echo", {"x": 1}, 5) == (True, {"x": 1})  # an int timeout is a number of seconds
    ok, value, timing = core.call("echo", [1, 2], 5.0, _core.MSG_REQUEST, 1)
    assert ok is True and value == [1, 2] and len(timing) > 0
    assert c.call("echo", {"x": np.arange(3)})["x"].tolist() == [0, 1, 2]
    c.close()
    with pytest.raises(edgeml.ClosedError):
        c.call("echo", 1)
