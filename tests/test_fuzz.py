"""Fuzzing in CI.

* The libFuzzer targets of csrc/fuzz (frame parser, body decoder) are built
  with clang (ASan + UBSan) and run for a short time each from their seed
  corpus (a copy: CI adds nothing to the checkout), then every input saved
  under csrc/fuzz/regressions/<target>/ is run once. Skipped, saying why,
  where clang with libFuzzer is not installed (scripts/setup.sh installs it
  when run as root).
* Hypothesis feeds edgeml.decode_frame random bytes, random bodies in valid
  frames and mutated real frames: it must return or raise one of the
  EdgeMLError subclasses the C decoder maps its codes to, nothing else.

Open C findings (reported, not fixed yet) are listed in KNOWN_OPEN with
their reproductions as xfail(strict=True) tests: when a fix lands they XPASS
and fail, so the entry gets removed. Fixed decoder findings are kept as
tests in DECODE_FIXED. csrc/fuzz/README.md has the details.

EDGEML_FUZZ_SECONDS sets the time per target (default 15).
"""
import importlib.util
import os
import shutil
import struct
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import edgeml
from edgeml import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
FUZZ = os.path.join(CSRC, "fuzz")
BUILD = os.path.join(CSRC, "build-fuzz")
TARGETS = ("fuzz_frame", "fuzz_payload", "fuzz_value")
# seed corpus of each target (fuzz_value takes fuzz_payload's input layout)
CORPUS = {"fuzz_frame": "corpus_frame", "fuzz_payload": "corpus_payload", "fuzz_value": "corpus_payload"}
FUZZ_SECONDS = int(os.environ.get("EDGEML_FUZZ_SECONDS", "15"))
ARTIFACT_PREFIXES = ("crash-", "leak-", "timeout-", "oom-", "slow-unit-")

# Regression inputs of findings not fixed yet, "<target>/<file>": reason
# (xfail, strict). Empty: every C finding so far is fixed (4759b06); their
# inputs under csrc/fuzz/regressions/ now run as plain regressions.
KNOWN_OPEN: dict = {}


# ------------------------------------------------------------- libFuzzer


@pytest.fixture(scope="module")
def fuzz_build():
    script = os.path.join(FUZZ, "build.sh")
    r = subprocess.run(["bash", script, "--check"], capture_output=True, text=True, timeout=120)
    if r.returncode == 77:
        pytest.skip(f"clang with libFuzzer is not available: {r.stdout.strip()}")
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["bash", script, BUILD], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    ours = [ln for ln in r.stderr.splitlines() if "warning:" in ln and "/fuzz/" in ln]
    assert not ours, "\n".join(ours)
    return BUILD


def _env() -> dict:
    return {**os.environ, "UBSAN_OPTIONS": os.environ.get("UBSAN_OPTIONS", "print_stacktrace=1")}


def _artifacts(d) -> list:
    return sorted(f for f in os.listdir(d) if f.startswith(ARTIFACT_PREFIXES))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_short(fuzz_build, target, tmp_path):
    """A short fuzzing run from the seed corpus: no crash, leak, timeout."""
    corpus = tmp_path / "corpus"
    shutil.copytree(os.path.join(FUZZ, CORPUS[target]), corpus)
    art = tmp_path / "artifacts"
    art.mkdir()
    cmd = [os.path.join(fuzz_build, target), f"-max_total_time={FUZZ_SECONDS}", "-rss_limit_mb=2048",
           "-timeout=10", "-print_final_stats=1", f"-artifact_prefix={art}/", str(corpus)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=FUZZ_SECONDS + 180, env=_env(), cwd=tmp_path)
    found = _artifacts(art)
    detail = f"{' '.join(cmd)}\nartifacts: {found}\n{r.stderr[-6000:]}"
    assert r.returncode == 0, detail
    assert not found, detail
    assert "Done" in r.stderr and "stat::number_of_executed_units" in r.stderr, detail


def _regressions():
    out = []
    for target in TARGETS:
        d = os.path.join(FUZZ, "regressions", target)
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else ():
            if name.startswith(".") or name.endswith((".md", ".txt")):
                continue
            key = f"{target}/{name}"
            marks = [pytest.mark.xfail(strict=True, reason=KNOWN_OPEN[key])] if key in KNOWN_OPEN else []
            out.append(pytest.param(target, name, id=key, marks=marks))
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("target,name", _regressions())
def test_fuzz_regression(fuzz_build, target, name, tmp_path):
    """Each saved input once (libFuzzer runs file arguments as single inputs)."""
    path = os.path.join(FUZZ, "regressions", target, name)
    cmd = [os.path.join(fuzz_build, target), "-rss_limit_mb=2048", "-timeout=10", f"-artifact_prefix={tmp_path}/",
           path]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=100, env=_env(), cwd=tmp_path)
    assert r.returncode == 0 and not _artifacts(tmp_path), r.stderr[-6000:]


def test_known_open_have_inputs():
    for key in KNOWN_OPEN:
        assert os.path.isfile(os.path.join(FUZZ, "regressions", key)), key


def test_seed_corpora_sizes():
    for sub in ("corpus_frame", "corpus_payload"):
        d = os.path.join(FUZZ, sub)
        files = os.listdir(d)
        assert 20 <= len(files) <= 100, (sub, len(files))
        assert sum(os.path.getsize(os.path.join(d, f)) for f in files) <= 1 << 20, sub


# ---------------------------------------------------- decode_frame property

# What decode_frame raises for bad input (csrc/python/core.c em__decode_frame:
# the reader's EPROTO / EVERSION / ETOOBIG through errors.CODE_TO_ERROR,
# then em_py_decode's DecodeError).
ALLOWED = (errors.DecodeError, errors.ProtocolError, errors.MessageTooLargeError, errors.HandshakeError)


def _frame(body: bytes, blobs=(), msg_type: int = 13, req_id: int = 7) -> bytes:
    """A frame laid out as docs/protocol.md says, around any body."""
    off = (64 + len(body) + 7) // 8 * 8
    table = b"".join(struct.pack("<Q", len(b)) for b in blobs)
    out = bytearray(body + bytes(off - 64 - len(body)) + table)
    for b in blobs:
        out += bytes(-(64 + len(out)) % 64) + b
    hdr = b"EDGM" + bytes([1, msg_type]) + struct.pack("<HQIIQ", 0, req_id, len(body), len(blobs), 64 + len(out))
    return hdr + bytes(32) + bytes(out)


def _array_body(dtype: bytes, shape, blob: int = 0, scalar: int = 0) -> bytes:
    ext = struct.pack("<IBBB", blob, scalar, len(shape), len(dtype)) + dtype
    ext += b"".join(struct.pack("<Q", s) for s in shape)
    return bytes([0xC7, len(ext), 1]) + ext


# Python-side findings of the decode fuzz, fixed: each raised something
# other than DecodeError before (what, in the comment). name -> (frame, text
# in the DecodeError's message).
DECODE_FIXED = {
    # UnicodeDecodeError: em__dec_fail kept the pending exception
    "invalid-utf8-str": (_frame(bytes.fromhex("a2ff00")), "not valid UTF-8"),
    # TypeError: PySet_New's error was not turned into DecodeError
    "set-of-unhashable": (_frame(bytes.fromhex("92d40300") + bytes.fromhex("9101")), "not hashable"),
    # ValueError from numpy.ndarray: em__array_parse let dimensions >= 2^63 through when the size was 0
    "array-dim-over-2e63": (_frame(_array_body(b"<f4", (0, 2**63)), [b""]), "shape out of range"),
    "array-too-big-zero-size": (_frame(_array_body(b"<f4", (0, 2**62, 2**62)), [b""]), "shape out of range"),
    # TypeError from numpy (found by the C targets' strict dtype checks, 4759b06)
    "dtype-S-itemsize-over-2e24": (_frame(_array_body(b"|S16777217", (3,)), [b""]), "unsupported dtype"),
    "dtype-S-no-digits": (_frame(_array_body(b"<Sab", ()), [b""]), "unsupported dtype"),
    "dtype-nul-kind": (_frame(_array_body(b"<\x008", ()), [bytes(8)]), "unsupported dtype"),
    "dtype-nul-order": (_frame(_array_body(b"\x00f8", ()), [bytes(8)]), "unsupported dtype"),
}


@pytest.mark.parametrize("name", sorted(DECODE_FIXED))
def test_decode_frame_fixed(name):
    frame, text = DECODE_FIXED[name]
    with pytest.raises(errors.DecodeError, match=text):
        edgeml.decode_frame(frame)


def test_decode_frame_takes_exactly_one_frame():
    one = edgeml.encode_frame({"x": 1})
    assert edgeml.decode_frame(one)["payload"] == {"x": 1}
    with pytest.raises(errors.ProtocolError, match="3 bytes after the frame"):
        edgeml.decode_frame(one + b"abc")


def _check_decode(data: bytes, max_bytes=None):
    try:
        out = edgeml.decode_frame(data) if max_bytes is None else edgeml.decode_frame(data, max_bytes)
    except ALLOWED:
        return
    except Exception as e:  # noqa: BLE001 - the point of the test
        raise AssertionError(f"decode_frame raised {type(e).__name__}: {e} for {data[:256].hex()}") from e
    assert set(out) == {"type", "req_id", "payload", "frame_bytes"}, out.keys()
    assert 64 <= out["frame_bytes"] == len(data)
    assert max_bytes is None or out["frame_bytes"] <= max_bytes


def _load_make_seeds():
    spec = importlib.util.spec_from_file_location("edgeml_fuzz_make_seeds", os.path.join(FUZZ, "make_seeds.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _real_frames() -> list:
    seeds = _load_make_seeds()
    frames = [fr for _, fr in seeds.doc_vectors()]
    for _name, value, msg_type, req_id in seeds.payloads():
        fr = edgeml.encode_frame(value, msg_type, req_id)
        if len(fr) <= 4096:  # small ones: mutations land on structure, not on bulk
            frames.append(fr)
    return frames


REAL_FRAMES = _real_frames()
INTERESTING = [0, 1, 7, 8, 63, 64, 65, 127, 128, 255, 256, 0x7FFF, 0xFFFF, 0x10000, 2**31 - 1, 2**31, 2**32 - 1,
               2**32, 2**63 - 1, 2**63, 2**64 - 1]
MAX_BYTES = st.sampled_from([None, 1 << 20, 4096, 64])


@st.composite
def mutated_frames(draw):
    data = bytearray(draw(st.sampled_from(REAL_FRAMES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "byte", "u16", "u32", "u64", "truncate", "insert", "delete", "append",
                                   "splice"]))
        if not data:
            data += draw(st.binary(min_size=1, max_size=8))
            continue
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            data[i] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xC0, 0xC1, 0xC7, 0xD4, 0xD9, 0xDC, 0xDD,
                                            0xDE, 0xDF, 0xFF, draw(st.integers(0, 255))]))
        elif op in ("u16", "u32", "u64"):
            n = {"u16": 2, "u32": 4, "u64": 8}[op]
            v = draw(st.sampled_from(INTERESTING)) % (1 << (8 * n))
            endian = draw(st.sampled_from("<>"))  # header fields are LE, msgpack lengths BE
            chunk = struct.pack(endian + {2: "H", 4: "I", 8: "Q"}[n], v)
            data[i:i + n] = chunk[:len(data) - i]
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        elif op == "append":
            data += draw(st.binary(min_size=1, max_size=16))
        else:  # splice a piece of another real frame in
            other = draw(st.sampled_from(REAL_FRAMES))
            j = draw(st.integers(0, len(other) - 1))
            data[i:i + draw(st.integers(1, 32))] = other[j:j + draw(st.integers(1, 32))]
    return bytes(data)


SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.timeout(180)
@settings(max_examples=3000, **SETTINGS)
@given(data=mutated_frames(), max_bytes=MAX_BYTES)
def test_decode_frame_mutated_real_frames(data, max_bytes):
    _check_decode(data, max_bytes)


@pytest.mark.timeout(120)
@settings(max_examples=1000, **SETTINGS)
@given(data=st.one_of(st.binary(max_size=256), st.binary(max_size=192).map(lambda b: b"EDGM\x01" + b)),
       max_bytes=MAX_BYTES)
def test_decode_frame_random_bytes(data, max_bytes):
    _check_decode(data, max_bytes)


@pytest.mark.timeout(120)
@settings(max_examples=1500, **SETTINGS)
@given(body=st.binary(min_size=1, max_size=128),
       blobs=st.lists(st.binary(max_size=48), max_size=3),
       msg_type=st.integers(1, 255))
def test_decode_frame_random_bodies_in_valid_frames(body, blobs, msg_type):
    """Framing right, body random: gets past the reader to the body decoder."""
    _check_decode(_frame(body, blobs, msg_type))


def test_decode_frame_real_frames_roundtrip():
    """The unmutated frames the property tests start from decode, and encode
    back to the same bytes."""
    for fr in REAL_FRAMES:
        out = edgeml.decode_frame(fr)
        assert out["frame_bytes"] == len(fr)
        assert edgeml.encode_frame(out["payload"], out["type"], out["req_id"]) == fr, fr.hex()
