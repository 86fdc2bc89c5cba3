"""docs/protocol.md's test vectors, checked both ways against the codec."""
import os
import re

import numpy as np
import pytest

import edgeml

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "protocol.md")

VALUES = {
    "vector-1": {"x": 1},
    "vector-2": {"a": np.arange(3, dtype=np.uint8), "t": (1, "b")},
    "vector-3": [np.array([1.5], np.float32), np.zeros((2, 0), np.int64), {1, 2}],
}


def vectors():
    text = open(DOC).read()
    return {name: bytes.fromhex("".join(body.split()))
            for name, body in re.findall(r"```hex (vector-\d+)\n(.*?)```", text, re.S)}


def test_doc_has_all_vectors():
    assert set(vectors()) == set(VALUES)


@pytest.mark.parametrize("name", sorted(VALUES))
def test_vector_encodes_to_documented_bytes(name):
    assert edgeml.encode_frame(VALUES[name], 13, 7) == vectors()[name]


@pytest.mark.parametrize("name", sorted(VALUES))
def test_vector_decodes_to_value(name):
    out = edgeml.decode_frame(vectors()[name])
    assert out["type"] == 13 and out["req_id"] == 7 and out["frame_bytes"] == len(vectors()[name])
    exp = VALUES[name]
    got = out["payload"]
    if name == "vector-1":
        assert got == exp
    elif name == "vector-2":
        assert got["t"] == (1, "b") and got["a"].dtype == np.uint8 and list(got["a"]) == [0, 1, 2]
    else:
        assert got[0].dtype == np.float32 and got[0].tolist() == [1.5]
        assert got[1].shape == (2, 0) and got[1].dtype == np.int64
        assert got[2] == {1, 2}


def test_header_fields_at_documented_offsets():
    f = vectors()["vector-2"]
    assert f[:4] == b"EDGM" and f[4] == 1 and f[5] == 13
    assert int.from_bytes(f[8:16], "little") == 7
    body_len = int.from_bytes(f[16:20], "little")
    assert int.from_bytes(f[20:24], "little") == 1
    assert int.from_bytes(f[24:32], "little") == len(f)
    table = (64 + body_len + 7) // 8 * 8
    assert int.from_bytes(f[table:table + 8], "little") == 3  # blob length
    assert f[128:131] == b"\x00\x01\x02"  # blob at a 64-byte boundary


def test_decoder_rejects_corrupted_vectors():
    f = bytearray(vectors()["vector-2"])
    bad_magic = b"X" + bytes(f[1:])
    with pytest.raises(edgeml.ProtocolError):
        edgeml.decode_frame(bad_magic)
    with pytest.raises(edgeml.MessageTooLargeError):
        edgeml.decode_frame(bytes(f), 100)
    g = bytearray(f)
    g[24:32] = (len(f) + 64).to_bytes(8, "little")  # frame length lies
    with pytest.raises(edgeml.EdgeMLError):
        edgeml.decode_frame(bytes(g) + bytes(64))
    with pytest.raises(edgeml.EdgeMLError):
        edgeml.decode_frame(bytes(f[:100]))  # truncated
