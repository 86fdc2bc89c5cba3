"""Round trips of every payload type: through the codec alone and through a
real server. Values and types must come back equal (a tuple stays a tuple,
bytes stay bytes, an array keeps dtype, shape and values)."""
import math
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import edgeml


def same(a, b):
    """Deep equality that also checks types (and array dtype/shape)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
                and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
    if isinstance(a, np.generic):
        return type(a) is type(b) and (a == b or (a != a and b != b))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def codec_roundtrip(obj):
    return edgeml.decode_frame(edgeml.encode_frame(obj))["payload"]


DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "complex64", "complex128", ">i4", ">f8", "<U5", "S3",
          "datetime64[ns]", "timedelta64[s]"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4), (2, 0, 3), (2, 3, 4, 5)])
def test_array_dtypes_and_shapes(dtype, shape):
    rng = np.random.default_rng(0)
    n = int(np.prod(shape))
    if np.dtype(dtype).kind in "US":
        a = np.array(["ab", "cde", "", "x"] * (n // 4 + 1), dtype=dtype)[:n].reshape(shape)
    elif np.dtype(dtype).kind in "mM":
        a = np.arange(n).astype(dtype).reshape(shape)
    else:
        a = (rng.standard_normal(n) * 100).astype(dtype).reshape(shape)
    out = codec_roundtrip({"a": a})["a"]
    assert same(a, out)


def test_non_contiguous_and_fortran_arrays():
    base = np.arange(60, dtype=np.float32).reshape(6, 10)
    for a in (base[::2, ::3], base.T, np.asfortranarray(base), base[:, 5], base[::-1]):
        out = codec_roundtrip([a])[0]
        assert same(np.ascontiguousarray(a), out)
        assert out.flags.c_contiguous


def test_scalars_and_numpy_scalars():
    vals = {"i": 7, "neg": -7, "big": 2**63 - 1, "small": -2**63, "umax": 2**64 - 1, "f": 1.5,
            "nan": float("nan"), "inf": float("-inf"), "t": True, "fa": False, "n": None, "s": "héllo ✓",
            "empty": "", "b": b"\x00\xff", "eb": b"", "np_f32": np.float32(2.5), "np_i8": np.int8(-3),
            "np_bool": np.bool_(True), "np_c": np.complex64(1 + 2j), "np_dt": np.datetime64("2024-01-02")}
    assert same(vals, codec_roundtrip(vals))


def test_container_types_survive():
    obj = {"t": (1, (2, 3), []), "l": [1, [2, (3,)]], "s": {1, 2, 3}, "fs": frozenset({"a"}),
           "et": (), "el": [], "ed": {}, "nested": {"a": {"b": {"c": [{"d": (b"x",)}]}}},
           "int_keys": {1: "one", -2: "minus two"}, "tuple_key": {(1, 2): 3}}
    out = codec_roundtrip(obj)
    assert out["fs"] == {"a"} and type(out["fs"]) is set  # sets come back as set
    obj["fs"] = {"a"}
    assert same(obj, out)


def test_mappings_and_array_likes_are_sent_as_dicts_and_arrays():
    import types
    out = codec_roundtrip({"m": types.MappingProxyType({"a": 1}), "ba": bytearray(b"ab"),
                           "mv": memoryview(b"cd"), "buf": memoryview(np.arange(3, dtype=np.int16))})
    assert out["m"] == {"a": 1}
    assert out["ba"] == b"ab" and out["mv"] == b"cd"
    assert out["buf"] == b"\x00\x00\x01\x00\x02\x00"  # a memoryview travels as its bytes


def test_received_arrays_are_aligned_views_of_the_frame(server, client):
    a = np.arange(1000, dtype=np.float64)
    out = client.call("echo", {"a": a, "b": np.ones(3, np.uint8), "c": np.zeros((5, 5), np.float32)})
    for k in ("a", "b", "c"):
        arr = out[k]
        assert arr.ctypes.data % 64 == 0, k
        base = arr
        while getattr(base, "base", None) is not None:
            base = base.base
        assert type(base).__name__ == "FrameBuffer", type(base)  # a view of the frame, not a copy
    # the views are writable numpy arrays
    out["a"][0] = 5.0
    assert out["a"][0] == 5.0


def test_large_arrays_through_a_server(server, client):
    a = np.random.default_rng(1).standard_normal((1024, 1024)).astype(np.float32)  # 4 MB
    out = client.call("echo", {"w": a, "meta": {"step": 3}})
    assert same(a, out["w"]) and out["meta"] == {"step": 3}
    b = np.arange(8 << 20, dtype=np.uint8)  # 8 MB, not a power of two away from pool sizes
    assert same(b, client.call("echo", [b])[0])


def test_many_arrays_in_one_message(server, client):
    arrays = [np.full((i % 5, 3), i, dtype=np.int32) for i in range(600)]
    out = client.call("echo", arrays)
    assert all(same(x, y) for x, y in zip(arrays, out))


def test_reply_arrays_outlive_the_client(server, make_client):
    c = make_client(server.port)
    out = c.call("echo", {"a": np.arange(10)})
    c.close()
    del c
    assert out["a"].sum() == 45


# -------------------------------------------------------- property-based

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
    st.text(max_size=20), st.binary(max_size=20),
)
arrays = hnp.arrays(
    dtype=st.sampled_from([np.dtype(d) for d in ("bool", "i1", "u2", "i4", "i8", "f2", "f4", "f8", "c8", ">f4")]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)
keys = st.one_of(st.text(max_size=8), st.integers(-5, 5))
values = st.recursive(
    st.one_of(scalars, arrays),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.tuples(inner, inner),
                            st.dictionaries(keys, inner, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.text(max_size=8), values, max_size=5))
def test_property_codec_roundtrip(payload):
    assert same(payload, codec_roundtrip(payload))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(payload=st.dictionaries(st.text(max_size=8), values, max_size=4))
def test_property_server_roundtrip(server, client, payload):
    assert same(payload, client.call("echo", payload))


def test_nesting_limit_is_a_clear_error():
    deep = 1
    for _ in range(29):
        deep = [deep]
    assert same(deep, codec_roundtrip(deep))
    for _ in range(5):
        deep = [deep]
    with pytest.raises(edgeml.EncodeError, match="nested deeper"):
        edgeml.encode_frame(deep)
    sys.getrecursionlimit()
