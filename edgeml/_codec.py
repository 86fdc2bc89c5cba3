"""Hooks the C codec calls for numpy work, and the glue that installs them.

The C extension does not use numpy's C API (so one build works with every
numpy); it calls these few functions instead, and caches what it can.
"""
from __future__ import annotations

import numpy as np

from . import _core, errors

_dtype_cache: dict = {}      # numpy dtype -> wire string (read by the C side)
_dtype_from_wire: dict = {}  # wire string -> numpy dtype


def _dtype_wire(dt: np.dtype) -> str:
    if dt.hasobject:
        raise TypeError(f"arrays of dtype {dt} hold Python objects; send numbers, strings or bytes")
    if dt.fields is not None or dt.subdtype is not None:
        raise TypeError(f"structured dtype {dt} is not supported; send its fields as separate arrays")
    s = dt.str
    if np.dtype(s) != dt or len(s) > 15:
        raise TypeError(f"dtype {dt} cannot be described on the wire")
    if len(_dtype_cache) > 1024:
        _dtype_cache.clear()
    _dtype_cache[dt] = s
    return s


def _as_array(obj):
    """An ndarray for array-likes (torch, jax, cupy-on-host, buffers), else None."""
    if hasattr(obj, "detach") and hasattr(obj, "cpu"):  # torch.Tensor
        obj = obj.detach().cpu()
    if hasattr(obj, "__array__") or hasattr(obj, "__array_interface__"):
        return np.asarray(obj)
    if hasattr(obj, "__dlpack__"):
        return np.from_dlpack(obj)
    try:
        memoryview(obj)
    except TypeError:
        return None
    return np.asarray(memoryview(obj))


def _contiguous(a) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _make_array(buf, offset: int, wire: str, shape: tuple, scalar: int):
    dt = _dtype_from_wire.get(wire)
    if dt is None:
        try:
            dt = np.dtype(wire)
        except TypeError as e:
            raise errors.DecodeError(f"array with unknown dtype {wire!r}") from e
        if len(_dtype_from_wire) < 1024:
            _dtype_from_wire[wire] = dt
    a = np.ndarray(shape, dtype=dt, buffer=buf, offset=offset)
    return a[()] if scalar else a


def _install() -> None:
    exc_for_code = {}
    for name, _code, _msg in _core.error_table():
        if name != "OK":
            exc_for_code[name] = errors.CODE_TO_ERROR[name]
    _core.configure(
        ndarray=np.ndarray,
        generic=np.generic,
        dtype_wire=_dtype_wire,
        as_array=_as_array,
        contiguous=_contiguous,
        make_array=_make_array,
        dtype_cache=_dtype_cache,
        exc_for_code=exc_for_code,
        encode_error=errors.EncodeError,
        decode_error=errors.DecodeError,
    )


_install()


def encode_frame(obj, msg_type: int = _core.MSG_REPLY, req_id: int = 0) -> bytes:
    """The whole frame edgeml would send for ``obj`` (for tests and tools)."""
    return _core.encode_frame(obj, msg_type, req_id)


def decode_frame(data: bytes, max_message_bytes: int = _core.DEFAULT_MAX_MESSAGE_BYTES) -> dict:
    """Decode one frame: ``{"type", "req_id", "payload", "frame_bytes"}``."""
    return _core.decode_frame(data, max_message_bytes)
