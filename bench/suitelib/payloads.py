"""The payloads of bench/suite, built the same way in every process.

  small   {"x": 64 random bytes}
  numpy64 {"obs": 64-byte uint8 array} (a small observation as numpy code sends it)
  100KB   an observation: {"image": 128x128x3 uint8, "wrist_image":
          128x128x3 uint8, "step": int, "reward": float, "done": bool,
          "joints": 7 float32} -- one 128x128x3 uint8 image is 48 KiB, so
          two make the ~100 KB the workload is named after
  4MB     {"x": 1 Mi float32}  (4 MiB)
  32MB    {"x": 8 Mi float32}  (32 MiB)
  weights a 20 MiB weight set: 10 layers of {"w": 512x1024 float32,
          "b": 1024 float32} under "layerN/w", "layerN/b" (float32 normal
          noise, which, like trained weights, lz4 cannot shrink), plus
          "step": int (which publish this is)
  transition  {"obs": 128x128x3 uint8, "next_obs": 128x128x3 uint8,
          "action": 4 float32, "reward": float, "done": bool}; an actor
          update is 30 of them (~2.9 MB)

Images are uniform random bytes (camera noise; lz4 gains little on them
either way). All arrays are C-contiguous.
"""
from __future__ import annotations

import numpy as np

SMALL_BYTES = 64
WEIGHT_LAYERS = 10
TRANSITIONS_PER_UPDATE = 30


def make(kind: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind == "small":
        return {"x": rng.bytes(SMALL_BYTES)}
    if kind == "numpy64":
        return {"obs": rng.integers(0, 256, SMALL_BYTES, dtype=np.uint8)}
    if kind == "100KB":
        return {"image": rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
                "wrist_image": rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
                "step": 12345, "reward": 0.5, "done": False,
                "joints": rng.standard_normal(7).astype(np.float32)}
    if kind == "4MB":
        return {"x": rng.standard_normal(1 << 20, dtype=np.float32)}
    if kind == "32MB":
        return {"x": rng.standard_normal(8 << 20, dtype=np.float32)}
    if kind == "weights":
        w = {}
        for i in range(WEIGHT_LAYERS):
            w[f"layer{i}/w"] = rng.standard_normal((512, 1024), dtype=np.float32)
            w[f"layer{i}/b"] = rng.standard_normal(1024, dtype=np.float32)
        w["step"] = 0
        return w
    raise ValueError(f"unknown payload {kind!r}")


def transitions(n: int = TRANSITIONS_PER_UPDATE, seed: int = 1):
    """n distinct transitions (distinct arrays: no codec can dedupe them)."""
    rng = np.random.default_rng(seed)
    return [{"obs": rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
             "next_obs": rng.integers(0, 256, (128, 128, 3), dtype=np.uint8),
             "action": rng.standard_normal(4).astype(np.float32),
             "reward": float(rng.standard_normal()), "done": bool(i == n - 1)} for i in range(n)]


def raw_bytes(obj) -> int:
    """Bytes of data in obj: array bytes, bytes/str lengths, 8 per scalar
    (what the C floor sends for it)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (bytes, bytearray, str)):
        return len(obj)
    if isinstance(obj, dict):
        return sum(raw_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(raw_bytes(v) for v in obj)
    return 8


def same(a, b) -> bool:
    """Deep equality for payloads (arrays compared by dtype, shape, values)."""
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))  # noqa: B905
    return a == b and type(a) is type(b)
