"""Where an InferenceServer's batches run: the CPU, or a CUDA device found
at run time (docs/batching.md, docs/cuda.md)."""
from __future__ import annotations

import re
from typing import Any, Callable, Optional, Tuple

from . import errors


class CPU:
    name = "cpu"
    stage: Optional[Callable] = None  # batches are stacked with numpy

    def __init__(self, note: str = ""):
        self.note = note  # why "auto" chose the CPU

    def describe(self) -> str:
        return f"cpu ({self.note})" if self.note else "cpu"


def _parse(device: Any) -> Tuple[str, int]:
    if not isinstance(device, str):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    m = re.fullmatch(r"(cpu|auto|cuda)(?::(\d+))?", device.strip().lower())
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    return m.group(1), int(m.group(2) or 0)


def resolve(device: Any):
    """The device object for ``device``; DeviceError when CUDA is asked
    for and cannot be used (the message says what is missing)."""
    kind, index = _parse(device)
    if kind == "cpu":
        return CPU()
    from . import _cuda  # the CUDA worker side (needs the C core's CUDA layer)
    if kind == "auto":
        try:
            return _cuda.CudaDevice(0)
        except errors.DeviceError as e:
            return CPU(f"auto: {e}")
    return _cuda.CudaDevice(index)
