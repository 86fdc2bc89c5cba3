"""Runtimes the target loads models into: ONNX through onnxruntime, TFLite
through ai-edge-litert (``tflite`` format) where it is installed.

A runtime is anything with ``inputs``/``outputs`` (lists of
``{"name", "shape", "dtype"}``, a dimension of None or a name when it is
free), ``run(feeds) -> {name: ndarray}`` and ``version``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import numpy as np

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int8)": "int8", "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(uint16)": "uint16",
    "tensor(int32)": "int32", "tensor(uint32)": "uint32", "tensor(int64)": "int64", "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def _dim(d: Any) -> Optional[int]:
    return int(d) if isinstance(d, (int, np.integer)) and d >= 0 else None


def available() -> Dict[str, str]:
    """Formats this machine can run, with the runtime's name and version."""
    out = {}
    try:
        import onnxruntime
        out["onnx"] = f"onnxruntime {onnxruntime.__version__}"
    except ImportError:
        pass
    try:
        import ai_edge_litert  # noqa: F401
        from ai_edge_litert import interpreter  # noqa: F401
        out["tflite"] = "ai-edge-litert"
    except ImportError:
        pass
    return out


class OnnxRuntime:
    format = "onnx"

    def __init__(self, path: str, providers: Optional[List[str]] = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeError("the target has no onnxruntime: pip install onnxruntime (or "
                               "onnxruntime-gpu) on the target") from e
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors travel to the host; keep the target's log quiet
        self.session = ort.InferenceSession(path, sess_options=opts,
                                            providers=providers or [p for p in ort.get_available_providers()
                                                                  if p != "AzureExecutionProvider"])
        self.version = f"onnxruntime {ort.__version__} ({', '.join(self.session.get_providers())})"
        self.inputs = [{"name": i.name, "shape": [_dim(d) for d in i.shape], "dtype": _ORT_TYPES.get(i.type, i.type)}
                       for i in self.session.get_inputs()]
        self.outputs = [{"name": o.name, "shape": [_dim(d) for d in (o.shape or [])],
                         "dtype": _ORT_TYPES.get(o.type, o.type)} for o in self.session.get_outputs()]

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, Any]:
        names = [o["name"] for o in self.outputs]
        return dict(zip(names, self.session.run(names, feeds)))


class TFLiteRuntime:
    format = "tflite"

    def __init__(self, path: str, threads: Optional[int] = None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as e:
            raise RuntimeError("the target has no TFLite runtime: pip install ai-edge-litert on the target") from e
        self.interp = Interpreter(model_path=path, num_threads=threads)
        self.interp.allocate_tensors()
        self.version = "ai-edge-litert"
        self._in = self.interp.get_input_details()
        self._out = self.interp.get_output_details()
        self.inputs = [{"name": d["name"], "shape": [int(v) for v in d["shape"]], "dtype": np.dtype(d["dtype"]).name}
                       for d in self._in]
        self.outputs = [{"name": d["name"], "shape": [int(v) for v in d["shape"]], "dtype": np.dtype(d["dtype"]).name}
                        for d in self._out]

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, Any]:
        for d in self._in:
            x = feeds[d["name"]]
            if tuple(x.shape) != tuple(d["shape"]):
                self.interp.resize_tensor_input(d["index"], x.shape)
                self.interp.allocate_tensors()
            self.interp.set_tensor(d["index"], x)
        self.interp.invoke()
        return {d["name"]: self.interp.get_tensor(d["index"]).copy() for d in self._out}


RUNTIMES = {"onnx": OnnxRuntime, "tflite": TFLiteRuntime}


def load(fmt: str, path: str):
    try:
        cls = RUNTIMES[fmt]
    except KeyError:
        raise ValueError(f"unknown model format {fmt!r}: the target runs {', '.join(sorted(RUNTIMES))}") from None
    return cls(path)


def check_feeds(specs: List[dict], feeds: Any) -> Optional[str]:
    """Why ``feeds`` do not fit a model with inputs ``specs``; None when
    they do (names, dtypes, ranks and the fixed dimensions)."""
    if not isinstance(feeds, dict):
        return f"inputs must be a map of input name to array, got {type(feeds).__name__}"
    want = {s["name"]: s for s in specs}
    missing = sorted(set(want) - set(feeds))
    extra = sorted(set(feeds) - set(want))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unknown {extra}")
        return f"inputs do not match the model ({'; '.join(parts)}; the model takes {sorted(want)})"
    for name, spec in want.items():
        x = feeds[name]
        if not isinstance(x, np.ndarray):
            return f"input {name!r} must be an array, got {type(x).__name__}"
        why = fit(spec, x.shape, x.dtype.name)
        if why:
            return f"input {name!r}: {why}"
    return None


def fit(spec: dict, shape, dtype: str) -> Optional[str]:
    """Why an array of ``shape`` and ``dtype`` does not fit input ``spec``."""
    if dtype != spec["dtype"]:
        return f"dtype {dtype}, the model wants {spec['dtype']}"
    want = spec["shape"]
    if len(shape) != len(want):
        return f"shape {list(shape)}, the model wants rank {len(want)} {_fmt(want)}"
    for got, w in zip(shape, want):
        if w is not None and got != w:
            return f"shape {list(shape)}, the model wants {_fmt(want)}"
    return None


def _fmt(shape: List[Optional[int]]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
