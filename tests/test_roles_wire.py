"""docs/protocol.md, "Roles": each role's messages spoken over a raw socket
to the Python servers, as a peer in another language would, and every
documented reply and error checked."""
import socket
import struct

import numpy as np
import pytest

import edgeml
from edgeml import _core

from conftest import scaled

pytestmark = pytest.mark.timeout(60)


class RawPeer:
    """A client that speaks frames by hand: HELLO, then REQUESTs."""

    def __init__(self, port: int, service: str):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(scaled(10))
        self.sock.sendall(edgeml.encode_frame({"proto": 1, "role": "client", "nonce": b"\x07" * 16,
                                               "service": service}, _core.MSG_HELLO))
        f = self.read()
        assert f["type"] == _core.MSG_HELLO, f
        self.hello = f["payload"]
        self.next_id = 1

    def read(self) -> dict:
        hdr = self._exactly(64)
        rest = self._exactly(struct.unpack_from("<Q", hdr, 24)[0] - 64)
        return edgeml.decode_frame(hdr + rest)

    def _exactly(self, n: int) -> bytes:
        b = b""
        while len(b) < n:
            chunk = self.sock.recv(n - len(b))
            if not chunk:
                raise ConnectionError("closed")
            b += chunk
        return b

    def call(self, method: str, payload):
        rid = self.next_id
        self.next_id += 1
        self.sock.sendall(edgeml.encode_frame([method, payload], _core.MSG_REQUEST, rid))
        f = self.read()
        assert f["req_id"] == rid
        return f["type"], f["payload"]

    def ok(self, method, payload):
        t, v = self.call(method, payload)
        assert t == _core.MSG_REPLY, v
        return v

    def error(self, method, payload) -> dict:
        t, v = self.call(method, payload)
        assert t == _core.MSG_ERROR, v
        assert set(v) >= {"type", "message", "traceback"}
        return v

    def close(self):
        self.sock.close()


@pytest.fixture
def peers():
    made = []

    def make(port, service):
        p = RawPeer(port, service)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def test_inference_role(make_server, peers):
    s = make_server({"double": lambda p: {"y": p["x"] * 2}, "echo": lambda p: p})
    p = peers(s.port, "inference")
    assert p.hello["service"] == "inference" and p.hello["proto"] == 1 and "epoch" in p.hello
    y = p.ok("double", {"x": np.arange(4, dtype=np.int32)})["y"]
    assert y.dtype == np.int32 and y.tolist() == [0, 2, 4, 6]
    assert p.ok("__interfaces__", None) == ["double", "echo"]
    e = p.error("nope", 1)
    assert e["type"] == "edgeml.UnknownInterfaceError" and e["interfaces"] == ["double", "echo"]


def test_wrong_service_is_refused_in_the_handshake(make_server):
    s = make_server()
    sock = socket.create_connection(("127.0.0.1", s.port))
    sock.settimeout(scaled(10))
    sock.sendall(edgeml.encode_frame({"proto": 1, "role": "client", "nonce": b"\x01" * 16, "service": "trainer"},
                                     _core.MSG_HELLO))
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    err = edgeml.decode_frame(data)
    assert err["type"] == _core.MSG_ERROR and err["payload"]["type"] == "HandshakeError"
    assert "'trainer'" in err["payload"]["message"]


def test_edge_role(cleanup, peers):
    cfg = edgeml.EdgeConfig(port_number=0, action_keys=["move", "grip"], observation_keys=["image", "joints"],
                            broadcast_port=0)
    acts = []
    srv = cleanup(edgeml.EdgeServer(cfg, lambda keys: {k: k.upper() for k in keys},
                                    lambda key, a: acts.append((key, a)) or {"done": key}, host="127.0.0.1"))
    srv.start(threaded=True)
    p = peers(srv.port, "edge")
    info = p.hello["info"]
    assert info["role"] == "edge" and info["broadcast_port"] == srv.broadcast_port
    assert info["compat"] == {"action_keys": ["grip", "move"], "observation_keys": ["image", "joints"],
                              "version": str(cfg.version)}
    assert p.ok("obs", None) == {"image": "IMAGE", "joints": "JOINTS"}
    assert p.ok("obs", ["joints"]) == {"joints": "JOINTS"}
    assert p.ok("act", ["move", [1.0, 2.0]]) == {"done": "move"} and acts == [("move", [1.0, 2.0])]
    assert p.error("obs", ["nose"])["type"] == "edgeml.InvalidKeyError"
    assert p.error("act", ["fly", 1])["type"] == "edgeml.InvalidKeyError"
    assert p.error("act", "move")["type"] == "edgeml.InvalidArgumentError"
    assert p.error("dance", None)["type"] == "edgeml.UnknownInterfaceError"


def test_trainer_role(cleanup, peers):
    cfg = edgeml.TrainerConfig(port_number=0, broadcast_port=0, request_types=["stats"], payload_keys=["obs"])
    srv = cleanup(edgeml.TrainerServer(cfg, train_step=lambda p: {"w": p["obs"] + 1},
                                       request_callback=lambda t, p: {"type": t, "p": p}, host="127.0.0.1"))
    store = edgeml.QueuedDataStore(100)
    srv.register_data_store("replay", store)
    srv.start(threaded=True)
    p = peers(srv.port, "trainer")
    info = p.hello["info"]
    assert info["role"] == "trainer" and isinstance(info["instance"], str) and info["rate_limit"] is None
    assert info["compat"] == {"payload_keys": ["obs"], "request_types": ["stats"], "version": str(cfg.version)}
    assert p.ok("train_step", {"obs": 1}) == {"w": 2}
    assert p.error("train_step", {"other": 1})["type"] == "edgeml.InvalidKeyError"
    assert p.ok("request", ["stats", 5]) == {"type": "stats", "p": 5}
    e = p.error("request", ["nope", 5])
    assert e["type"] == "edgeml.UnknownRequestTypeError" and e["request_types"] == ["stats"]
    inst = info["instance"]
    assert p.ok("cursor", {"session": "s1", "store": "replay"}) == -1
    r = p.ok("data", {"session": "s1", "store": "replay", "first": 0, "items": [10, 11, 12], "instance": None})
    assert r == {"cursor": 2, "stored": 3, "missed": 0, "instance": inst}
    r = p.ok("data", {"session": "s1", "store": "replay", "first": 1, "items": [11, 12, 13], "instance": inst})
    assert r == {"cursor": 3, "stored": 1, "missed": 0, "instance": inst}  # 11, 12: duplicates
    r = p.ok("data", {"session": "s1", "store": "replay", "first": 6, "items": [16], "instance": inst})
    assert r == {"cursor": 6, "stored": 1, "missed": 2, "instance": inst}
    assert store.get_latest_data(-1) == [10, 11, 12, 13, 16]
    assert p.ok("cursor", {"session": "s1", "store": "replay"}) == 6
    # a session another run of the server acknowledged, unknown here: restarted
    r = p.ok("data", {"session": "s2", "store": "replay", "first": 5, "items": [1], "instance": "an-older-run"})
    assert r == {"restarted": True, "cursor": -1, "stored": 0, "missed": 0, "instance": inst}
    assert p.error("data", {"session": "s1", "store": "nope", "first": 0, "items": []})["type"] == \
        "edgeml.UnknownDataStoreError"
    assert p.error("data", {"session": "s1", "store": "replay", "first": -1, "items": []})["type"] == \
        "edgeml.InvalidArgumentError"
    assert p.error("fly", None)["type"] == "edgeml.UnknownInterfaceError"
