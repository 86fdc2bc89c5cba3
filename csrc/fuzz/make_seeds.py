#!/usr/bin/env python3
"""Write the seed corpora of the fuzz targets from real frames.

    python csrc/fuzz/make_seeds.py          (needs edgeml importable: pip install -e .)

Every frame comes from ``edgeml.encode_frame`` (the encoder peers use) or is
one of the hex test vectors of docs/protocol.md. Writes

* ``corpus_frame/seed-*``: two control bytes (see fuzz_frame.c: chunking,
  pool, max_frame, resume, keep) followed by one or more frames;
* ``corpus_payload/seed-*``: the fuzz_payload.c input for the same frames:
  a control byte (blob count, fix-up, type), the blob lengths as u16, then
  the body.

Files named ``seed-*`` that this script no longer writes are removed; other
files (inputs merged in from fuzzing runs, named by their SHA-1) are kept.
Deterministic: running it twice gives the same files.
"""
from __future__ import annotations

import os
import re
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

import edgeml  # noqa: E402

MSG = {"HELLO": 1, "ERROR": 3, "PING": 9, "PONG": 10, "PUBLISH": 11, "REQUEST": 12, "REPLY": 13, "SUBSCRIBE": 14}


def doc_vectors() -> list[tuple[str, bytes]]:
    """The ```hex vector-N blocks of docs/protocol.md."""
    text = open(os.path.join(ROOT, "docs", "protocol.md")).read()
    out = []
    for name, body in re.findall(r"```hex (vector-\d+)\n(.*?)```", text, re.S):
        out.append((name, bytes.fromhex("".join(body.split()))))
    assert len(out) >= 3, "docs/protocol.md lost its test vectors"
    return out


def payloads() -> list[tuple[str, object, int, int]]:
    """(name, value, message type, request id)."""
    ints = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1,
            -1, -32, -33, -128, -129, -32768, -32769, -2**31, -2**31 - 1, -2**63]
    floats = [0.0, -0.0, 1.5, float("inf"), float("-inf"), float("nan"), 1e308, 5e-324]
    nested: object = 1
    for i in range(30):
        nested = [nested] if i % 2 else {"k": nested}
    f = np.arange(12, dtype=np.float64).reshape(3, 4)
    if np.finfo(np.longdouble).nmant == 63 and np.dtype(np.longdouble).itemsize == 16:
        # x87 80-bit in 16 bytes: 6 bytes of padding numpy leaves uninitialised; spell out 1.25
        longdouble = np.frombuffer(bytes.fromhex("00000000000000a0ff3f") + bytes(6), np.longdouble)
    else:
        longdouble = np.array([1.25], np.longdouble)
    v = [
        ("dict-small", {"x": 1}, MSG["REPLY"], 7),
        ("dict-mixed", {"a": [1, 2, {"b": None}], "c": "str", "d": b"bytes", "e": 2.5, "f": True}, MSG["REPLY"], 1),
        ("dict-keys", {1: "int", 2.5: "float", None: "nil", b"k": "bin", (1, "t"): "tuple", False: 0}, MSG["REPLY"], 2),
        ("ints", ints, MSG["REPLY"], 3),
        ("int-max", 2**64 - 1, MSG["REPLY"], 4),
        ("int-min", -2**63, MSG["REPLY"], 5),
        ("floats", floats, MSG["REPLY"], 6),
        ("none", None, MSG["REPLY"], 8),
        ("bools", [True, False], MSG["REPLY"], 9),
        ("strings", ["", "a", "x" * 31, "y" * 32, "z" * 256, "h\u00e9llo \u2713 \U0001f600"], MSG["REPLY"], 10),
        ("str-65536", "s" * 65536, MSG["REPLY"], 11),
        ("bytes", [b"", b"\x00\xff", bytes(range(256)) + b"\x01" * 44], MSG["REPLY"], 12),
        ("tuples", [(), (1,), ((1, 2), (3,)), (None, "a", b"b")], MSG["REPLY"], 13),
        ("sets", [set(), {1, 2, 3}, frozenset({"a"}), {(1, 2)}], MSG["REPLY"], 14),
        ("nested-30", nested, MSG["REPLY"], 15),
        ("list-long", list(range(300)), MSG["REPLY"], 16),
        ("map-long", {str(i): i for i in range(40)}, MSG["REPLY"], 17),
        ("hello-client", {"proto": 1, "role": "client", "service": "inference"}, MSG["HELLO"], 0),
        ("hello-server", {"proto": 1, "epoch": 2**63 + 5, "max_message_bytes": 1 << 30, "service": "inference",
                          "info": {"role": "edge", "compat": {"keys": ["obs"]}, "broadcast_port": 5556}},
         MSG["HELLO"], 0),
        ("error", {"type": "ValueError", "message": "bad", "traceback": "Traceback...\n"}, MSG["ERROR"], 21),
        ("error-unknown", {"type": "edgeml.UnknownInterfaceError", "message": "no", "traceback": "",
                           "interfaces": ["echo", "infer"]}, MSG["ERROR"], 22),
        ("request", ["infer", {"obs": np.arange(6, dtype=np.float32).reshape(2, 3), "t": 0.5}], MSG["REQUEST"], 23),
        ("request-nil", ["ping", None], MSG["REQUEST"], 24),
        ("ping", None, MSG["PING"], 25),
        ("pong", None, MSG["PONG"], 25),
        ("subscribe", None, MSG["SUBSCRIBE"], 3),
        ("publish", {"weights": np.ones(4, np.float16), "step": 100}, MSG["PUBLISH"], 4),
        # numpy: dtypes
        ("arr-u1", np.arange(3, dtype=np.uint8), MSG["REPLY"], 30),
        ("arr-i1", np.array([-1, 0, 1], np.int8), MSG["REPLY"], 31),
        ("arr-u2-i2", [np.array([1, 2], np.uint16), np.array([-2], np.int16)], MSG["REPLY"], 32),
        ("arr-u4-i4", [np.array([1], np.uint32), np.array([-2, 3], np.int32)], MSG["REPLY"], 33),
        ("arr-u8-i8", [np.array([2**64 - 1], np.uint64), np.array([-2**63], np.int64)], MSG["REPLY"], 34),
        ("arr-f2-f4-f8", [np.array([1.5], np.float16), np.array([np.nan], np.float32), f], MSG["REPLY"], 35),
        ("arr-c8-c16", [np.array([1 + 2j], np.complex64), np.array([3 - 4j], np.complex128)], MSG["REPLY"], 36),
        ("arr-bool", np.array([True, False, True]), MSG["REPLY"], 37),
        ("arr-big-endian", [np.array([1, 2], ">i4"), np.array([1.5], ">f8")], MSG["REPLY"], 38),
        ("arr-S-U-V", [np.array([b"ab", b"cde"], "S5"), np.array(["x", "yz"], "U3"), np.zeros(2, "V4")],
         MSG["REPLY"], 39),
        ("arr-datetime", [np.array(["2020-01-01T00:00:00"], "M8[ns]"), np.array([5], "m8[s]"),
                          np.array(["2021-02-03"], "M8[D]")], MSG["REPLY"], 40),
        ("arr-longdouble", longdouble, MSG["REPLY"], 41),
        # numpy: shapes
        ("arr-0d", np.array(3, np.int64), MSG["REPLY"], 50),
        ("arr-empty", np.zeros(0, np.float32), MSG["REPLY"], 51),
        ("arr-2x0", np.zeros((2, 0), np.int64), MSG["REPLY"], 52),
        ("arr-0x5", np.zeros((0, 5), np.float32), MSG["REPLY"], 53),
        ("arr-2x3", np.arange(6, dtype=np.int32).reshape(2, 3), MSG["REPLY"], 54),
        ("arr-1x1x1x1", np.ones((1, 1, 1, 1), np.uint8), MSG["REPLY"], 55),
        ("arr-5d", np.arange(32, dtype=np.uint8).reshape(2, 2, 2, 2, 2), MSG["REPLY"], 56),
        ("arr-strided", np.arange(10, dtype=np.int16)[::2], MSG["REPLY"], 57),
        ("arr-fortran", np.asfortranarray(f), MSG["REPLY"], 58),
        ("arr-empty-S0", np.zeros(3, "S0") if np.dtype("S0").itemsize == 0 else np.zeros(0, "S1"), MSG["REPLY"], 59),
        # numpy scalars
        ("scalars", [np.float32(1.5), np.int64(-3), np.bool_(True), np.complex64(1j), np.uint8(7),
                     np.datetime64("2020-01-01")], MSG["REPLY"], 60),
        # several arrays, arrays as values of nested containers
        ("arr-many", {f"a{i}": np.full(i + 1, i, np.int32) for i in range(12)}, MSG["REPLY"], 70),
        ("arr-nested", {"obs": {"img": np.zeros((4, 4, 3), np.uint8), "state": (np.ones(2), 3)},
                        "done": False}, MSG["REPLY"], 71),
        ("arr-same-twice", [np.arange(4, dtype=np.uint8)] * 2, MSG["REPLY"], 72),
        ("arr-large", np.arange(5000, dtype=np.float32), MSG["REPLY"], 73),  # 20 KB: the "big frame" path
    ]
    return v


def payload_input(frame: bytes, i: int) -> bytes | None:
    """The fuzz_payload input of a frame: control byte, u16 blob lengths, body."""
    body_len, nblobs = struct.unpack_from("<II", frame, 16)
    msg_type = frame[5]
    if nblobs > 15:
        return None
    table = (64 + body_len + 7) // 8 * 8
    lens = struct.unpack_from(f"<{nblobs}Q", frame, table)
    fixup = any(n > 0xFFFF for n in lens) or i % 4 == 3
    cfg = nblobs | (0x10 if fixup else 0) | (((msg_type - 1) & 7) << 5)
    return (bytes([cfg]) + b"".join(struct.pack("<H", min(n, 0xFFFF)) for n in lens)
            + frame[64:64 + body_len])


def frame_cfg(i: int, max_mode: int = 0, resume: bool = False) -> bytes:
    """fuzz_frame's control bytes: chunking cycles through every mode."""
    cfg = (i % 8) | (8 if i % 3 == 0 else 0) | (max_mode << 4) | (0x40 if resume else 0) | (0x80 if i % 5 == 0 else 0)
    return bytes([cfg, (i * 97 + 13) & 0xFF])


def main() -> None:
    frames: list[tuple[str, bytes]] = list(doc_vectors())
    for name, value, msg_type, req_id in payloads():
        frames.append((name, edgeml.encode_frame(value, msg_type, req_id)))
    for name, fr in frames:  # every seed must decode (the corpus is of real frames)
        edgeml.decode_frame(fr)
    by_name = dict(frames)

    frame_seeds: dict[str, bytes] = {}
    payload_seeds: dict[str, bytes] = {}
    for i, (name, fr) in enumerate(frames):
        frame_seeds[name] = frame_cfg(i) + fr
        p = payload_input(fr, i)
        if p is not None:
            payload_seeds[name] = p
    # streams of several frames, as a connection carries them
    hs = by_name["hello-client"] + by_name["request"] + by_name["ping"] + by_name["request-nil"]
    frame_seeds["stream-client"] = frame_cfg(3) + hs
    frame_seeds["stream-client-bytewise"] = frame_cfg(1) + hs
    frame_seeds["stream-big-small-big"] = frame_cfg(7) + by_name["arr-large"] + by_name["ping"] + by_name["arr-large"]
    frame_seeds["stream-vectors"] = frame_cfg(5) + b"".join(fr for n, fr in frames if n.startswith("vector-"))
    # 950 72-byte frames read as one whole 64 KiB staging area: 65536 = 910 x 72
    # + 16 leaves a 16-byte partial header at its end, which em__reader_region
    # moves to the front (the stage compaction; no other seed reaches it)
    assert len(by_name["ping"]) == 72
    frame_seeds["stream-many-small-whole"] = bytes([0, 0]) + by_name["ping"] * 950
    # a small max_frame (4 KiB, 64 KiB) against frames larger than it
    frame_seeds["too-big-4k"] = frame_cfg(2, max_mode=2) + by_name["arr-large"]
    frame_seeds["too-big-64k"] = frame_cfg(6, max_mode=1) + by_name["str-65536"]
    # garbage between frames, with resume-after-error on
    frame_seeds["resume-after-junk"] = (frame_cfg(4, resume=True) + by_name["vector-1"] + b"JUNK" * 16
                                        + by_name["vector-2"])
    frame_seeds["resume-bad-version"] = (frame_cfg(0, resume=True) + by_name["vector-1"][:4] + b"\x02"
                                         + by_name["vector-1"][5:] + by_name["vector-3"])

    for sub, seeds in (("corpus_frame", frame_seeds), ("corpus_payload", payload_seeds)):
        d = os.path.join(HERE, sub)
        os.makedirs(d, exist_ok=True)
        wanted = {f"seed-{n}" for n in seeds}
        for f in os.listdir(d):
            if f.startswith("seed-") and f not in wanted:
                os.remove(os.path.join(d, f))
        for n, data in seeds.items():
            with open(os.path.join(d, f"seed-{n}"), "wb") as fh:
                fh.write(data)
        files = os.listdir(d)
        size = sum(os.path.getsize(os.path.join(d, f)) for f in files)
        print(f"{sub}: {len(seeds)} seeds, {len(files)} files, {size} bytes")
        assert len(files) <= 100 and size <= 1 << 20, f"{sub} exceeds 100 files / 1 MiB"


if __name__ == "__main__":
    main()
