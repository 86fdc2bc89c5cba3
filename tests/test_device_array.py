"""edgeml._core.DeviceArray (csrc/python/device.c): the arrays a GPU worker
hands a handler, exported without a copy through DLPack and the CUDA Array
Interface, and _core._device_view, the reader of a handler's device outputs
(em_py_device_view). Everything here runs on the CPU: host DeviceArrays are
built over numpy arrays with DeviceArray._wrap and consumed by
numpy.from_dlpack; CUDA-labelled ones (host memory, never dereferenced) are
checked field by field, through ctypes for the DLPack structs. torch and cupy
consumers run only where they are installed with a GPU."""
import ctypes
import gc
import sys
import threading
import weakref

import numpy as np
import pytest

from edgeml import _core

pytestmark = pytest.mark.skipif(
    not hasattr(_core, "DeviceArray"),
    reason="edgeml._core.DeviceArray is not registered (PyInit__core must call em_py_device_register)")

DeviceArray = getattr(_core, "DeviceArray", None)

kDLCPU, kDLCUDA, kDLCUDAManaged = 1, 2, 13

DTYPES = ["|b1", "|i1", "<i2", "<i4", "<i8", "|u1", "<u2", "<u4", "<u8", "<f2", "<f4", "<f8", "<c8", "<c16"]
DL_CODES = {"b": 6, "i": 0, "u": 1, "f": 2, "c": 5}
SHAPES = [(), (0,), (7,), (2, 3), (3, 0, 2), (2, 1, 3, 2), (1,) * 8]


def sample(dtype, shape):
    n = int(np.prod(shape, dtype=np.int64))
    dt = np.dtype(dtype)
    if dt.kind == "b":
        flat = np.arange(n) % 3 == 0
    elif dt.kind == "c":
        flat = np.arange(n) - 1j * np.arange(n)
    else:
        flat = np.arange(n) % 100 + (1 if dt.kind != "f" else 0.5)
    return flat.astype(dt).reshape(shape)


def wrap(a, **kw):
    return DeviceArray._wrap(a, a.dtype.str, a.shape, **kw)


# ------------------------------------------------------------ DLPack structs (ctypes)

class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32), ("dtype", DLDataType),
                ("shape", ctypes.POINTER(ctypes.c_int64)), ("strides", ctypes.POINTER(ctypes.c_int64)),
                ("byte_offset", ctypes.c_uint64)]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [("version", DLPackVersion), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p),
                ("flags", ctypes.c_uint64), ("dl_tensor", DLTensor)]


_capi = ctypes.pythonapi
_capi.PyCapsule_GetPointer.restype = ctypes.c_void_p
_capi.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capi.PyCapsule_IsValid.restype = ctypes.c_int
_capi.PyCapsule_IsValid.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capi.PyCapsule_SetName.restype = ctypes.c_int
_capi.PyCapsule_SetName.argtypes = [ctypes.py_object, ctypes.c_char_p]
_capi.PyCapsule_New.restype = ctypes.py_object
_capi.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
# capsule names must outlive the capsules that point at them
_USED = ctypes.c_char_p(b"used_dltensor")
_USED_V = ctypes.c_char_p(b"used_dltensor_versioned")
_DLTENSOR = ctypes.c_char_p(b"dltensor")
_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)  # called without the GIL (a ctypes foreign call)


def consume(cap, versioned=False):
    """What a C consumer does: take the managed tensor and rename the capsule."""
    name = b"dltensor_versioned" if versioned else b"dltensor"
    assert _capi.PyCapsule_IsValid(cap, name)
    p = _capi.PyCapsule_GetPointer(cap, name)
    assert _capi.PyCapsule_SetName(cap, _USED_V if versioned else _USED) == 0
    return p, (DLManagedTensorVersioned if versioned else DLManagedTensor).from_address(p)


def tensor_fields(t):
    shape = tuple(t.shape[i] for i in range(t.ndim))
    strides = tuple(t.strides[i] for i in range(t.ndim)) if t.strides else None
    return dict(data=t.data or 0, device=(t.device.device_type, t.device.device_id), ndim=t.ndim,
                dtype=(t.dtype.code, t.dtype.bits, t.dtype.lanes), shape=shape, strides=strides,
                byte_offset=t.byte_offset)


def c_strides(shape):
    st, out = 1, []
    for d in reversed(shape):
        out.append(st)
        st *= d if d else 1
    return tuple(reversed(out))


class Legacy:
    """A pre-1.0 producer front: __dlpack__ without max_version (numpy then
    gets a "dltensor" capsule)."""

    def __init__(self, d):
        self.d = d

    def __dlpack__(self, stream=None, **kw):
        return self.d.__dlpack__(stream=stream)

    def __dlpack_device__(self):
        return self.d.__dlpack_device__()


# ------------------------------------------------------------ host arrays through numpy

@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("form", ["versioned", "legacy"])
def test_numpy_round_trip_no_copy(dtype, shape, form):
    a = sample(dtype, shape)
    d = wrap(a)
    assert d.shape == shape and d.dtype == dtype and d.ndim == len(shape) and d.nbytes == a.nbytes
    assert d.device == (kDLCPU, 0) and d.__dlpack_device__() == (kDLCPU, 0)
    assert d.ptr == a.__array_interface__["data"][0] and d.stream == 0 and d.readonly is False
    b = np.from_dlpack(d if form == "versioned" else Legacy(d))
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(b, a)
    if a.size:
        assert np.shares_memory(a, b)
        assert b.__array_interface__["data"][0] == a.__array_interface__["data"][0]
        new = np.logical_not(a) if a.dtype.kind == "b" else a * 2 + 1
        a[...] = new  # the same memory
        np.testing.assert_array_equal(b, new)
        if form == "versioned":  # numpy takes legacy capsules read-only
            assert b.flags.writeable
            b[...] = a + a
            np.testing.assert_array_equal(a, b)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("form", ["versioned", "legacy"])
def test_dlpack_struct_fields(form):
    a = sample("<f4", (2, 3, 4))
    d = DeviceArray._wrap(a, "<f4", (2, 3, 4), device_type=kDLCUDA, device_id=3)
    cap = d.__dlpack__(max_version=(1, 0)) if form == "versioned" else d.__dlpack__()
    assert f'"{"dltensor_versioned" if form == "versioned" else "dltensor"}"' in repr(cap)
    p, m = consume(cap, form == "versioned")
    f = tensor_fields(m.dl_tensor)
    assert f == dict(data=a.ctypes.data, device=(kDLCUDA, 3), ndim=3, dtype=(2, 32, 1), shape=(2, 3, 4),
                     strides=c_strides((2, 3, 4)), byte_offset=0)
    if form == "versioned":
        assert (m.version.major, m.version.minor) == (1, 0) and m.flags == 0
    before = sys.getrefcount(d)
    _DELETER(m.deleter)(p)  # the consumer is done (called without the GIL)
    assert sys.getrefcount(d) == before - 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dlpack_dtype_codes(dtype):
    d = wrap(sample(dtype, (2,)))
    p, m = consume(d.__dlpack__())
    dt = np.dtype(dtype)
    assert (m.dl_tensor.dtype.code, m.dl_tensor.dtype.bits, m.dl_tensor.dtype.lanes) == \
        (DL_CODES[dt.kind], 8 * dt.itemsize, 1)
    _DELETER(m.deleter)(p)


@pytest.mark.timeout(60)
def test_readonly_owner():
    a = sample("<f8", (4,))
    a.flags.writeable = False
    d = wrap(a)
    assert d.readonly is True
    b = np.from_dlpack(d)  # versioned: the read-only flag travels
    assert not b.flags.writeable and np.shares_memory(a, b)
    p, m = consume(d.__dlpack__(max_version=(1, 0)), versioned=True)
    assert m.flags & 1
    _DELETER(m.deleter)(p)


@pytest.mark.timeout(60)
def test_dtype_normalised():
    a = np.zeros(3, dtype=np.float32)
    assert DeviceArray._wrap(a, "=f4", (3,)).dtype == "<f4"
    assert DeviceArray._wrap(a, "f4", (3,)).dtype == "<f4"
    assert DeviceArray._wrap(a, "<u1", (12,)).dtype == "|u1"
    assert DeviceArray._wrap(a, "|b1", (12,)).dtype == "|b1"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("typestr", [">f4", ">i8", "|V4", "<U1", "|O", "<M8", "<m8", "<f16", "|b2", "<i3", "|f4",
                                     "<c32", "", "<", "<fx", "S4"])
def test_dtype_refused(typestr):
    a = np.zeros(64, dtype=np.uint8)
    with pytest.raises(TypeError):
        DeviceArray._wrap(a, typestr, (1,))


@pytest.mark.timeout(60)
def test_from_ptr():
    a = sample("<i4", (2, 2))
    base = sys.getrefcount(a)
    d = DeviceArray._from_ptr(a.ctypes.data, "<i4", (2, 2), device_type=kDLCPU, owner=a, stream=0)
    assert sys.getrefcount(a) == base + 1 and d.nbytes == 16 and d.device == (kDLCPU, 0)
    b = np.from_dlpack(d)
    assert np.shares_memory(a, b)
    del d, b
    gc.collect()
    assert sys.getrefcount(a) == base
    g = DeviceArray._from_ptr(0x7f0000003000, "<f2", (8,), device_id=1, stream=5)
    assert g.__cuda_array_interface__["data"] == (0x7f0000003000, False) and g.device == (kDLCUDA, 1)
    with pytest.raises(ValueError):
        DeviceArray._from_ptr(0, "<f2", (8,))
    assert DeviceArray._from_ptr(0, "<f2", (0, 8)).nbytes == 0


@pytest.mark.timeout(60)
def test_shape_and_buffer_checks():
    a = np.zeros(6, dtype=np.float32)
    with pytest.raises(ValueError):
        DeviceArray._wrap(a, "<f4", (7,))  # the buffer holds 24 bytes, not 28
    with pytest.raises(ValueError):
        DeviceArray._wrap(a, "<f4", (-1, -6))
    with pytest.raises(ValueError):
        DeviceArray._wrap(a, "<f4", (1,) * 33)
    with pytest.raises(ValueError):
        DeviceArray._wrap(a, "<f4", (6,), device_type=4)
    with pytest.raises(ValueError):
        DeviceArray._wrap(a, "<f4", (6,), device_id=-1)
    with pytest.raises((ValueError, BufferError)):
        DeviceArray._wrap(np.zeros((4, 4), np.float32)[:, ::2], "<f4", (4, 2))  # not C-contiguous
    with pytest.raises(TypeError):
        DeviceArray._wrap(object(), "<f4", ())
    with pytest.raises(TypeError):
        DeviceArray()  # built by the worker (and _wrap) only


@pytest.mark.timeout(60)
def test_dlpack_arguments():
    d = wrap(sample("<i4", (3,)))
    assert "dltensor" in repr(d.__dlpack__(stream=None, max_version=(0, 8), dl_device=(kDLCPU, 0), copy=False))
    assert "dltensor_versioned" in repr(d.__dlpack__(max_version=(1, 2)))
    assert "dltensor" in repr(d.__dlpack__(None))  # stream positionally, as the first DLPack spec had it
    d.__dlpack__(stream=-1)
    with pytest.raises(ValueError):
        d.__dlpack__(stream=1)  # host arrays have no stream
    with pytest.raises(BufferError):
        d.__dlpack__(dl_device=(kDLCUDA, 0))
    with pytest.raises(BufferError):
        d.__dlpack__(copy=True)
    with pytest.raises(TypeError):
        d.__dlpack__(max_version=1)
    with pytest.raises(TypeError):
        d.__dlpack__(stream="s")
    g = DeviceArray._wrap(np.zeros(2, np.float32), "<f4", (2,), device_type=kDLCUDA, device_id=1)
    for s in (None, -1, 1, 2, 0x7f0012345678, 2 ** 64 - 1):
        consume_and_delete(g.__dlpack__(stream=s))
    with pytest.raises(ValueError):
        g.__dlpack__(stream=0)  # ambiguous: 1 is the legacy default stream
    with pytest.raises(BufferError):
        g.__dlpack__(dl_device=(kDLCUDA, 0))
    consume_and_delete(g.__dlpack__(dl_device=(kDLCUDA, 1)))


def consume_and_delete(cap):
    p, m = consume(cap)
    _DELETER(m.deleter)(p)


# ------------------------------------------------------------ lifetimes

@pytest.mark.timeout(60)
def test_owner_alive_while_exports_live():
    a = sample("<f8", (5,))
    ref = weakref.ref(a)
    before = sys.getrefcount(a)
    d = wrap(a)
    assert sys.getrefcount(a) > before
    b = np.from_dlpack(d)
    cap = d.__dlpack__()
    dref = weakref.ref(d)
    del a, d
    gc.collect()
    assert ref() is not None and dref() is not None
    np.testing.assert_array_equal(b, sample("<f8", (5,)))
    del b
    gc.collect()
    assert ref() is not None  # the unconsumed capsule still holds it
    del cap
    gc.collect()
    assert dref() is None and ref() is None


@pytest.mark.timeout(60)
def test_owner_refcount_returns():
    a = sample("<i8", (4, 4))
    base = sys.getrefcount(a)
    d = wrap(a)
    b = np.from_dlpack(d)
    c = np.from_dlpack(Legacy(d))
    del d
    assert sys.getrefcount(a) > base
    del b, c
    gc.collect()
    assert sys.getrefcount(a) == base


@pytest.mark.timeout(120)
def test_unconsumed_capsules_freed():
    a = sample("<f4", (16,))
    d = wrap(a)
    base_a, base_d = sys.getrefcount(a), sys.getrefcount(d)
    for i in range(20000):
        d.__dlpack__()
        d.__dlpack__(max_version=(1, 0))
        if i % 1000 == 0:
            assert sys.getrefcount(d) == base_d
    assert sys.getrefcount(d) == base_d
    del d
    gc.collect()
    assert sys.getrefcount(a) == base_a - 1  # the DeviceArray's buffer export is gone too


@pytest.mark.timeout(60)
def test_consumed_deleted_from_another_thread():
    a = sample("<f4", (3,))
    d = wrap(a)
    base = sys.getrefcount(d)
    held = [consume(d.__dlpack__()) for _ in range(50)]
    assert sys.getrefcount(d) == base + 50
    t = threading.Thread(target=lambda: [_DELETER(m.deleter)(p) for p, m in held])
    t.start()
    t.join()
    assert sys.getrefcount(d) == base


@pytest.mark.timeout(60)
def test_cycle_through_owner_collected():
    class Arr(np.ndarray):
        pass

    a = np.arange(4, dtype=np.int32).view(Arr)
    a.device_array = wrap(a)  # a -> DeviceArray -> (its buffer) a
    ref = weakref.ref(a)
    del a
    gc.collect()
    assert ref() is None


# ------------------------------------------------------------ __cuda_array_interface__

@pytest.mark.timeout(60)
def test_cuda_array_interface_fields():
    a = sample("<f4", (2, 3))
    d = DeviceArray._wrap(a, "<f4", (2, 3), device_type=kDLCUDA, device_id=1)
    cai = d.__cuda_array_interface__
    assert set(cai) == {"version", "shape", "typestr", "data", "strides", "stream"}
    assert cai["version"] == 3
    assert cai["shape"] == (2, 3) and type(cai["shape"]) is tuple
    assert cai["typestr"] == "<f4"
    assert cai["data"] == (a.ctypes.data, False)
    assert cai["strides"] is None
    assert cai["stream"] == 1  # the legacy default stream (0 is not allowed)
    assert d.device == (kDLCUDA, 1) and d.__dlpack_device__() == (kDLCUDA, 1)
    s = DeviceArray._wrap(a, "<f4", (6,), device_type=kDLCUDA, stream=0x7f00deadbeef)
    assert s.__cuda_array_interface__["stream"] == 0x7f00deadbeef == s.stream
    assert s.__cuda_array_interface__["shape"] == (6,)
    z = DeviceArray._wrap(np.zeros(1, np.uint8), "|u1", (), device_type=kDLCUDA)
    assert z.__cuda_array_interface__["shape"] == () and z.__cuda_array_interface__["typestr"] == "|u1"
    r = np.zeros(2)
    r.flags.writeable = False
    assert DeviceArray._wrap(r, "<f8", (2,), device_type=kDLCUDA).__cuda_array_interface__["data"][1] is True


@pytest.mark.timeout(60)
def test_host_array_has_no_cuda_array_interface():
    d = wrap(sample("<f4", (2,)))
    assert not hasattr(d, "__cuda_array_interface__")
    with pytest.raises(AttributeError):
        d.__cuda_array_interface__


# ------------------------------------------------------------ reading outputs (_device_view)

class CAI:
    def __init__(self, iface, dlpack_device=None):
        self.__cuda_array_interface__ = iface
        if dlpack_device is not None:
            self.__dlpack_device__ = lambda: dlpack_device


def iface(**kw):
    d = dict(version=3, shape=(2, 3), typestr="<f4", data=(0x7f0000001000, False), strides=None, stream=None)
    d.update(kw)
    return {k: v for k, v in d.items() if v is not ...}


@pytest.mark.timeout(60)
def test_view_host_objects():
    for o in (None, True, 1, 1.5, "s", b"b", bytearray(b"x"), [], {}, (), np.zeros(3), np.float32(1), object(),
              wrap(sample("<f4", (2,))), Legacy(wrap(sample("<f4", (2,))))):
        assert _core._device_view(o) is None, o


@pytest.mark.timeout(60)
def test_view_cuda_array_interface():
    o = CAI(iface())
    base = sys.getrefcount(o)
    assert _core._device_view(o) == (0x7f0000001000, "<f4", (2, 3), 24, -1, 0)
    assert sys.getrefcount(o) == base
    assert _core._device_view(CAI(iface(stream=7), (kDLCUDA, 2))) == (0x7f0000001000, "<f4", (2, 3), 24, 2, 7)
    assert _core._device_view(CAI(iface(stream=1, version=2, typestr="=i8", strides=(24, 8)))) == \
        (0x7f0000001000, "<i8", (2, 3), 48, -1, 1)
    # strides of length-1 dimensions do not matter; an empty array is contiguous
    assert _core._device_view(CAI(iface(shape=(2, 1, 3), strides=(12, 999, 4))))[3] == 24
    assert _core._device_view(CAI(iface(shape=(0, 3), strides=(4, 8), data=(0, False))))[:4] == (0, "<f4", (0, 3), 0)
    assert _core._device_view(CAI(iface(shape=(), typestr="|b1", strides=..., stream=...))) == \
        (0x7f0000001000, "|b1", (), 1, -1, 0)
    assert _core._device_view(CAI(iface(shape=(4,), mask=None)))[2] == (4,)


@pytest.mark.timeout(60)
def test_view_cuda_array_interface_refused():
    with pytest.raises(TypeError, match="device output must be C-contiguous"):
        _core._device_view(CAI(iface(strides=(4, 8))))  # Fortran order
    with pytest.raises(TypeError, match="device output must be C-contiguous"):
        _core._device_view(CAI(iface(strides=(24, 8))))  # every other element
    with pytest.raises(TypeError):
        _core._device_view(CAI(iface(typestr=">f4")))
    with pytest.raises(TypeError):
        _core._device_view(CAI(iface(typestr="|V16")))
    with pytest.raises(TypeError):
        _core._device_view(CAI(iface(mask=object())))
    for bad in (iface(shape=...), iface(data=...), iface(typestr=...), iface(shape=[2, 3]), iface(shape=(-1,)),
                iface(data=(0, False)), iface(stream=0), iface(strides=(4,)), "not a dict"):
        with pytest.raises(ValueError):
            _core._device_view(CAI(bad))

    class Raises:
        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("requires grad")

    with pytest.raises(RuntimeError, match="requires grad"):
        _core._device_view(Raises())

    class NoCuda:  # torch's CPU tensors raise AttributeError: a host object
        @property
        def __cuda_array_interface__(self):
            raise AttributeError("not a CUDA tensor")

    assert _core._device_view(NoCuda()) is None


@pytest.mark.timeout(60)
def test_view_device_array():
    a = sample("<u2", (4, 2))
    d = DeviceArray._wrap(a, "<u2", (4, 2), device_type=kDLCUDA, device_id=5)
    assert _core._device_view(d) == (a.ctypes.data, "<u2", (4, 2), 16, 5, 1)
    s = DeviceArray._wrap(a, "<u2", (8,), device_type=kDLCUDA, stream=99)
    assert _core._device_view(s)[5] == 99


class DLProducer:
    """A CUDA DLPack producer without __cuda_array_interface__ (as a jax or
    a torch tensor seen through DLPack only): records the stream asked."""

    def __init__(self, d, device=None):
        self.d, self.device, self.streams = d, device or d.__dlpack_device__(), []

    def __dlpack__(self, stream=None):
        self.streams.append(stream)
        return self.d.__dlpack__(stream=stream)

    def __dlpack_device__(self):
        return self.device


@pytest.mark.timeout(60)
def test_view_dlpack():
    a = sample("<f8", (3, 2))
    d = DeviceArray._wrap(a, "<f8", (3, 2), device_type=kDLCUDA, device_id=2)
    p = DLProducer(d)
    base = sys.getrefcount(d)
    assert _core._device_view(p) == (a.ctypes.data, "<f8", (3, 2), 48, 2, 0)
    assert _core._device_view(p, stream=0x1234)[:5] == (a.ctypes.data, "<f8", (3, 2), 48, 2)
    assert p.streams == [None, 0x1234]
    assert sys.getrefcount(d) == base  # the consumed exports were deleted on release
    # managed memory is read too; host (CPU, pinned) producers are not device outputs
    assert _core._device_view(DLProducer(d, (kDLCUDAManaged, 0)))[4] == 2
    for dev in ((kDLCPU, 0), (3, 0)):
        q = DLProducer(d, dev)
        assert _core._device_view(q) is None and q.streams == []
    del q
    assert sys.getrefcount(d) == base


_keep = []


def fake_capsule(shape, strides, code=2, bits=32, lanes=1, byte_offset=0, data=0x7f0000002000):
    """A DLPack export made by hand (a producer the DeviceArray cannot act)."""
    n = len(shape)
    sh = (ctypes.c_int64 * max(n, 1))(*shape)
    st = (ctypes.c_int64 * max(n, 1))(*strides) if strides is not None else None
    m = DLManagedTensor()
    m.dl_tensor.data = data
    m.dl_tensor.device = DLDevice(kDLCUDA, 0)
    m.dl_tensor.ndim = n
    m.dl_tensor.dtype = DLDataType(code, bits, lanes)
    m.dl_tensor.shape = ctypes.cast(sh, ctypes.POINTER(ctypes.c_int64))
    m.dl_tensor.strides = ctypes.cast(st, ctypes.POINTER(ctypes.c_int64)) if st is not None else None
    m.dl_tensor.byte_offset = byte_offset
    deleted = []
    cb = _DELETER(lambda p: deleted.append(p))
    m.deleter = ctypes.cast(cb, ctypes.c_void_p).value
    _keep.append((sh, st, m, cb))
    return _capi.PyCapsule_New(ctypes.addressof(m), _DLTENSOR, None), deleted, ctypes.addressof(m)


class CapsuleProducer:
    def __init__(self, cap):
        self.cap = cap

    def __dlpack__(self, stream=None):
        return self.cap

    def __dlpack_device__(self):
        return (kDLCUDA, 0)


@pytest.mark.timeout(60)
def test_view_dlpack_by_hand():
    cap, deleted, addr = fake_capsule((2, 3), (3, 1), byte_offset=16)
    assert _core._device_view(CapsuleProducer(cap)) == (0x7f0000002010, "<f4", (2, 3), 24, 0, 0)
    assert deleted == [addr] and "used_dltensor" in repr(cap)
    with pytest.raises(TypeError):  # consumed already
        _core._device_view(CapsuleProducer(cap))
    cap, deleted, addr = fake_capsule((2, 3), (1, 2))
    with pytest.raises(TypeError, match="device output must be C-contiguous"):
        _core._device_view(CapsuleProducer(cap))
    assert deleted == [addr]  # deleted on the error path too
    cap, deleted, addr = fake_capsule((4,), None, code=4, bits=16)  # bfloat16
    with pytest.raises(TypeError):
        _core._device_view(CapsuleProducer(cap))
    assert deleted == [addr]
    cap, deleted, addr = fake_capsule((4,), None, lanes=4)
    with pytest.raises(TypeError):
        _core._device_view(CapsuleProducer(cap))
    assert deleted == [addr]
    cap, deleted, addr = fake_capsule((2, 1, 0), (0, 0, 0), code=5, bits=128)
    assert _core._device_view(CapsuleProducer(cap))[1:4] == ("<c16", (2, 1, 0), 0)
    assert deleted == [addr]
    with pytest.raises(TypeError):
        _core._device_view(CapsuleProducer(object()))


# ------------------------------------------------------------ real consumers (GPU machines)

def _cuda_module(name):
    mod = pytest.importorskip(name, reason=f"{name} is not installed")
    try:
        ok = mod.cuda.is_available() if name == "torch" else mod.cuda.runtime.getDeviceCount() > 0
    except Exception as e:  # noqa: BLE001 - no driver
        pytest.skip(f"{name} has no CUDA device: {e}")
    if not ok:
        pytest.skip(f"{name} has no CUDA device")
    return mod


@pytest.mark.timeout(120)
def test_torch_consumes_and_is_read():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    a = sample("<f4", (2, 3))
    t = torch.from_dlpack(wrap(a))  # host arrays need no GPU
    assert t.data_ptr() == a.ctypes.data and t.tolist() == a.tolist()
    assert _core._device_view(t) is None  # a CPU tensor is a host object
    torch = _cuda_module("torch")
    g = torch.arange(6, dtype=torch.float32, device="cuda").reshape(2, 3)
    ptr, dtype, shape, nbytes, dev, _ = _core._device_view(g)
    assert (ptr, dtype, shape, nbytes, dev) == (g.data_ptr(), "<f4", (2, 3), 24, g.device.index)
    with pytest.raises(TypeError, match="C-contiguous"):
        _core._device_view(g.t())
    # torch takes a DeviceArray over device memory without a copy, both ways
    d = DeviceArray._from_ptr(g.data_ptr(), "<f4", (2, 3), device_id=g.device.index, owner=g)
    for t in (torch.from_dlpack(d), torch.as_tensor(d, device="cuda")):
        assert t.is_cuda and t.data_ptr() == g.data_ptr() and t.shape == (2, 3) and torch.equal(t, g)
    t = torch.from_dlpack(d)
    del d, g
    gc.collect()
    torch.cuda.synchronize()
    assert t.tolist() == [[0, 1, 2], [3, 4, 5]]  # the owner (g) lives while the export does
    assert _core._device_view(t)[0] == t.data_ptr()


@pytest.mark.timeout(120)
def test_cupy_reads():
    cp = _cuda_module("cupy")
    x = cp.arange(12, dtype=cp.int32).reshape(3, 4)
    ptr, dtype, shape, nbytes, dev, _ = _core._device_view(x)
    assert (ptr, dtype, shape, nbytes) == (x.data.ptr, "<i4", (3, 4), 48) and dev == x.device.id
    with pytest.raises(TypeError, match="C-contiguous"):
        _core._device_view(x[:, ::2])
    d = DeviceArray._from_ptr(x.data.ptr, "<i4", (3, 4), device_id=x.device.id, owner=x)
    for y in (cp.asarray(d), cp.from_dlpack(d)):
        assert y.data.ptr == x.data.ptr and y.shape == (3, 4) and bool((y == x).all())
