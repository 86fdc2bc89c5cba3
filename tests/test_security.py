"""Authentication (token challenge-response in the handshake) and the
handshake timeout: docs/security.md."""
import socket
import struct
import time

import numpy as np
import pytest

import edgeml
from edgeml import _core

from conftest import scaled, wait_until

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-token-0123456789abcdef"


def recv_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends before it closes the connection."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_token_round_trip_and_wrong_or_missing_token(make_server, make_client):
    calls = []
    s = make_server({"echo": lambda p: calls.append(p) or p}, token=TOKEN)
    c = make_client(s.port, token=TOKEN)
    assert c.call("echo", {"x": np.arange(3)})["x"].tolist() == [0, 1, 2]
    with pytest.raises(edgeml.HandshakeError, match="authentication failed"):
        edgeml.InferenceClient("127.0.0.1", s.port, token="wrong", connect_timeout=0)
    with pytest.raises(edgeml.HandshakeError, match="requires a token"):
        edgeml.InferenceClient("127.0.0.1", s.port, token="", connect_timeout=0)
    assert len(calls) == 1  # nothing reached the handler from the failed clients
    assert wait_until(lambda: s.stats()["auth_failures"] == 1)  # the wrong token (the missing one: client side)
    assert c.call("echo", 2) == 2  # and the good client was not disturbed


def test_client_with_token_refuses_server_without(make_server):
    s = make_server()
    with pytest.raises(edgeml.HandshakeError, match="asks for none"):
        edgeml.InferenceClient("127.0.0.1", s.port, token=TOKEN, connect_timeout=0)


def test_token_from_environment(make_server, monkeypatch):
    monkeypatch.setenv("EDGEML_TOKEN", TOKEN)
    s = make_server()  # takes the token from the environment too
    with edgeml.InferenceClient("127.0.0.1", s.port) as c:
        assert c.call("echo", 5) == 5
    with pytest.raises(edgeml.HandshakeError, match="requires a token"):
        edgeml.InferenceClient("127.0.0.1", s.port, token="", connect_timeout=0)


def test_token_is_never_on_the_wire(make_server):
    """A raw peer sees a nonce, never the token, and a made-up proof is
    refused with a reason."""
    s = make_server(token=TOKEN)
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=scaled(5))
    hello = edgeml.encode_frame({"proto": 1, "role": "client", "nonce": b"\x01" * 16}, _core.MSG_HELLO)
    sock.sendall(hello)
    data = b""
    while len(data) < 64 or len(data) < struct.unpack_from("<Q", data, 24)[0]:
        data += sock.recv(65536)
    assert TOKEN.encode() not in data
    reply = edgeml.decode_frame(data)
    auth = reply["payload"]["auth"]
    assert auth == {"scheme": "hmac-sha256", "nonce": auth["nonce"]} and len(auth["nonce"]) == 16
    # a made-up proof is refused with a reason, and the connection closed
    sock.sendall(edgeml.encode_frame({"proof": b"\x00" * 32}, _core.MSG_AUTH))
    data = recv_until_closed(sock)
    err = edgeml.decode_frame(data)
    assert err["type"] == _core.MSG_ERROR and "wrong token" in err["payload"]["message"]
    sock.close()
    assert wait_until(lambda: s.stats()["requests"] == 0 and s.stats()["connections_open"] == 0)


def test_request_before_auth_closes_the_connection(make_server):
    s = make_server(token=TOKEN)
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=scaled(5))
    sock.sendall(edgeml.encode_frame({"proto": 1, "role": "client", "nonce": b"\x02" * 16}, _core.MSG_HELLO))
    sock.sendall(edgeml.encode_frame(["echo", 1], _core.MSG_REQUEST))
    data = recv_until_closed(sock)
    hello_len = struct.unpack_from("<Q", data, 24)[0]
    err = edgeml.decode_frame(data[hello_len:])
    assert "without authenticating" in err["payload"]["message"]
    assert s.stats()["requests"] == 0


def test_roles_and_broadcasts_with_a_token(cleanup):
    cfg = edgeml.TrainerConfig(port_number=0, broadcast_port=0)
    server = cleanup(edgeml.TrainerServer(cfg, lambda p: {"ok": True}, token=TOKEN, host="127.0.0.1"))
    server.start(threaded=True)
    cfg2 = edgeml.TrainerConfig(port_number=server.port, broadcast_port=server.broadcast_port)
    client = cleanup(edgeml.TrainerClient("127.0.0.1", cfg2, token=TOKEN))
    got = []
    client.recv_network_callback(got.append)
    server.publish_network({"w": np.ones(4)})
    assert wait_until(lambda: len(got) == 1)
    assert client.train_step({"x": 1}) == {"ok": True}
    with pytest.raises(edgeml.HandshakeError):
        edgeml.TrainerClient("127.0.0.1", cfg2, token="nope", connect_timeout=0)


def test_silent_connections_are_closed_after_the_handshake_timeout(make_server, make_client):
    s = make_server(handshake_timeout=0.3)
    idle = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(5)]
    c = make_client(s.port)  # a real client handshakes at once and stays
    t0 = time.monotonic()
    for sock in idle:
        sock.settimeout(scaled(5))
        assert sock.recv(1) == b""  # closed by the server
    assert time.monotonic() - t0 >= 0.25
    time.sleep(0.5)
    assert c.call("echo", 1) == 1  # past the timeout: handshaken clients may idle
    for sock in idle:
        sock.close()
    with pytest.raises(ValueError, match="handshake_timeout"):
        edgeml.InferenceServer(0, handshake_timeout=0)


def test_big_frames_before_the_handshake_are_refused_unallocated(make_server, make_client):
    """Before a connection has handshaken (and authenticated) its frames may
    be at most 64 KiB: a peer cannot make the server reserve memory."""
    s = make_server(token=TOKEN)
    good = make_client(s.port, token=TOKEN)
    for declared in (1 << 20, 1 << 32):
        sock = socket.create_connection(("127.0.0.1", s.port), timeout=scaled(5))
        hdr = bytearray(edgeml.encode_frame({"proto": 1}, _core.MSG_HELLO)[:64])
        struct.pack_into("<Q", hdr, 24, declared)
        sock.sendall(bytes(hdr))
        assert sock.recv(1) == b""  # closed, nothing allocated or answered
        sock.close()
    assert s.stats()["protocol_errors"] >= 2
    assert good.call("echo", [1, 2]) == [1, 2]
