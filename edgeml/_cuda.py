"""The GPU side of InferenceServer's workers (docs/cuda.md): a CUDA device
found at run time through the C core (no CUDA at build time), a pinned
pool made once, one stream per worker thread. A batch is stacked straight
into pinned buffers, copied to the device once per array on the worker's
stream, and handed to the interface as DeviceArrays (``__dlpack__``,
``__cuda_array_interface__``: ``torch.from_dlpack`` and ``cupy.asarray``
take them without a copy). Device arrays in the result are copied back
through pinned memory before the result is split and sent."""
from __future__ import annotations

import threading
from typing import Any, Callable, List, Tuple

import numpy as np

from . import _core
from .batching import stack

DEFAULT_PINNED_BYTES = 64 << 20


class CudaDevice:
    def __init__(self, index: int, pinned_bytes: int = DEFAULT_PINNED_BYTES):
        self.index = index
        self.name = f"cuda:{index}"
        self._cuda = _core.Cuda(index, pinned_bytes)  # DeviceError saying what is missing
        self._local = threading.local()

    def describe(self) -> str:
        i = self._cuda.info()
        rt, dr = i["runtime_version"], i["driver_version"]
        return (f"{self.name} (CUDA runtime {rt // 1000}.{rt % 1000 // 10}, driver {dr // 1000}.{dr % 1000 // 10}, "
                f"{i['library']})")

    def info(self) -> dict:
        return {**self._cuda.info(), "pinned_pool": self._cuda.pool_stats()}

    def _stream(self):
        s = getattr(self._local, "stream", None)
        if s is None:
            s = self._local.stream = self._cuda.stream()
        return s

    def _pinned_array(self, shape: tuple, dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        buf = self._cuda.pinned(n)
        return np.frombuffer(buf, dtype=dtype, count=n // dtype.itemsize if dtype.itemsize else 0).reshape(shape)

    def stage(self, batcher: Any, payloads: List[Any]) -> Tuple[Any, Callable[[Any], Any]]:
        """The batch on the device, and the function that brings the
        result's device arrays back."""
        stream = self._stream()
        host = stack(payloads, self._pinned_array)  # one pinned buffer per stacked array
        if isinstance(host, np.ndarray):
            dev: Any = stream.to_device(host)
        else:
            dev = {k: stream.to_device(v) if isinstance(v, np.ndarray) else v for k, v in host.items()}

        def finish(result: Any) -> Any:
            return _to_host(stream, result)

        return dev, finish


def _to_host(stream: Any, value: Any) -> Any:
    """value with every device array copied back into a numpy array."""
    if isinstance(value, dict):
        return {k: _to_host(stream, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        out = [_to_host(stream, v) for v in value]
        return out if isinstance(value, list) else tuple(out)
    if isinstance(value, (np.ndarray, str, bytes, int, float, bool)) or value is None:
        return value
    got = stream.to_host(value)
    if got is None:
        return value
    buf, dtype, shape = got
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(buf, dtype=dt, count=count).reshape(shape)
