"""docs/protocol.md, "Role test vectors": the documented frames of each
role's messages are what the Python encoder writes, decode to the
documented values, and, sent byte for byte to the Python servers, get the
documented replies."""
import re
from pathlib import Path

import pytest

import edgeml
from edgeml import _core

from test_roles_wire import RawPeer

pytestmark = pytest.mark.timeout(60)

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
R, P, E = _core.MSG_REQUEST, _core.MSG_REPLY, _core.MSG_ERROR
VALUES = {
    "role-1": (R, ["obs", None]),
    "role-2": (R, ["obs", ["joints"]]),
    "role-3": (R, ["act", ["move", {"dx": 0.5}]]),
    "role-4": (R, ["train_step", {"loss": 0.25}]),
    "role-5": (R, ["request", ["stats", {}]]),
    "role-6": (R, ["data", {"session": "s1", "store": "replay", "first": 0, "items": [{"r": 1}], "instance": None}]),
    "role-7": (P, {"cursor": 0, "stored": 1, "missed": 0, "instance": "i1"}),
    "role-8": (R, ["cursor", {"session": "s1", "store": "replay"}]),
    "role-9": (E, {"type": "edgeml.InvalidKeyError",
                   "message": "'x' is not one of the config's observation_keys: 'joints'", "traceback": ""}),
    "role-10": (P, {"role": "edge", "compat": {"action_keys": ["move"], "observation_keys": ["joints"],
                                               "version": "0.0.1"}, "broadcast_port": None}),
}


def vectors():
    text = DOC.read_text()
    return {name: bytes.fromhex(body.replace("\n", ""))
            for name, body in re.findall(r"```hex (role-\d+)\n(.*?)```", text, re.S)}


def test_doc_has_every_role_vector():
    assert set(vectors()) == set(VALUES)


@pytest.mark.parametrize("name", sorted(VALUES))
def test_role_vector_bytes_and_value(name):
    t, value = VALUES[name]
    frame = vectors()[name]
    assert edgeml.encode_frame(value, t, 1) == frame
    out = edgeml.decode_frame(frame)
    assert (out["type"], out["req_id"], out["payload"]) == (t, 1, value)


def _send(peer: RawPeer, name: str):
    peer.sock.sendall(vectors()[name])
    f = peer.read()
    assert f["req_id"] == 1
    return f["type"], f["payload"]


def test_edge_server_answers_the_vectors(cleanup):
    cfg = edgeml.EdgeConfig(port_number=0, action_keys=["move"], observation_keys=["joints"])
    srv = cleanup(edgeml.EdgeServer(cfg, lambda keys: {k: [0.1, 0.2] for k in keys},
                                    lambda key, a: {"did": key, "dx": a["dx"]}, host="127.0.0.1"))
    srv.start(threaded=True)
    p = RawPeer(srv.port, "edge")
    try:
        assert p.hello["info"] == VALUES["role-10"][1]
        assert _send(p, "role-1") == (P, {"joints": [0.1, 0.2]})
        assert _send(p, "role-2") == (P, {"joints": [0.1, 0.2]})
        assert _send(p, "role-3") == (P, {"did": "move", "dx": 0.5})
        # the request behind role-9: an observation key outside the config
        p.sock.sendall(edgeml.encode_frame(["obs", ["x"]], R, 1))
        f = p.read()
        # refused by the C role gate (csrc/proto/gate.c) before Python sees
        # it, so the reply is the documented frame's body exactly (no Python
        # traceback): the same error a C EdgeServer sends
        assert f["type"] == E and f["payload"] == VALUES["role-9"][1]
    finally:
        p.close()


def test_trainer_server_answers_the_vectors(cleanup):
    cfg = edgeml.TrainerConfig(port_number=0, broadcast_port=None, request_types=["stats"])
    srv = cleanup(edgeml.TrainerServer(cfg, train_step=lambda p: {"w": p["loss"] * 2},
                                       request_callback=lambda t, p: {"type": t, "p": p}, host="127.0.0.1"))
    store = edgeml.QueuedDataStore(10)
    srv.register_data_store("replay", store)
    srv.start(threaded=True)
    p = RawPeer(srv.port, "trainer")
    try:
        inst = p.hello["info"]["instance"]
        assert _send(p, "role-4") == (P, {"w": 0.5})
        assert _send(p, "role-5") == (P, {"type": "stats", "p": {}})
        assert _send(p, "role-8") == (P, -1)
        t, rep = _send(p, "role-6")
        assert t == P and rep == {**VALUES["role-7"][1], "instance": inst}
        assert _send(p, "role-8") == (P, 0)
        assert len(store) == 1
    finally:
        p.close()


def test_gate_compat_diff_names_each_field():
    mine = edgeml.EdgeConfig(port_number=1, action_keys=["move"], observation_keys=["joints"])
    frame = edgeml.encode_frame({"info": VALUES["role-10"][1]})
    hello = frame[64:64 + int.from_bytes(frame[16:20], "little")]  # the body: a HELLO map as a server sends it
    assert mine._gate().compat_diff(hello) is None
    other = edgeml.EdgeConfig(port_number=1, action_keys=["move", "grip"], observation_keys=["joints"], version="2")
    assert other._gate().compat_diff(hello) == ("action_keys: client ['grip', 'move'], server ['move']; "
                                                "version: client '2', server '0.0.1'")
