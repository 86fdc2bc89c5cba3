"""Models cut into layers at single-tensor boundaries (docs/offload.md,
"Layers and cuts").

A split model has ``n`` layers and ``n + 1`` cuts: cut 0 is the model's
input(s), cut ``i`` (0 < i < n) the one tensor that flows from layer
``i - 1`` into layer ``i``, cut ``n`` the model's outputs. ``run(x, start,
stop)`` runs layers ``[start, stop)`` on the activation at cut ``start``
and returns the activation at cut ``stop``.

- ``OnnxSplitModel``: an ONNX graph, cut wherever exactly one tensor that
  depends on the input is live (produced before the boundary and used after
  it); every layer is a sub-graph extracted with ``onnx.utils.Extractor``
  and run in its own onnxruntime session.
- ``TorchSplitModel``: a ``torch.nn.Sequential``, a layer per child, where
  torch is installed.

An activation is an ndarray (a cut of one tensor) or a map of name to
ndarray (cut 0 of a model with several inputs, cut n of one with several
outputs).
"""
from __future__ import annotations

import hashlib
import io
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

Activation = Any  # np.ndarray, or {name: np.ndarray}


class SplitModel:
    """What the planner and the runtimes need of a model cut into layers."""

    n: int  # layers
    layer_names: List[str]
    sha256: str
    kind: str

    def run(self, x: Activation, start: int = 0, stop: Optional[int] = None) -> Activation:
        raise NotImplementedError

    def check_cut(self, p: int, x: Activation) -> Optional[str]:
        """Why ``x`` cannot be the activation at cut ``p``; None when it can."""
        return None

    def _range(self, start: int, stop: Optional[int]) -> tuple:
        stop = self.n if stop is None else stop
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= self.n):
            raise ValueError(f"layers [{start}, {stop}) are not a range of this model's {self.n} layers")
        return start, stop

    def timed_run(self, x: Activation) -> tuple:
        """Run every layer; return the outputs, the activation at every cut
        and ``perf_counter`` seconds since the start at every cut (0 at cut
        0)."""
        acts, marks = [x], [0.0]
        t0 = time.perf_counter()
        for i in range(self.n):
            x = self.run(x, i, i + 1)
            marks.append(time.perf_counter() - t0)
            acts.append(x)
        return x, acts, marks


# ------------------------------------------------------------------ ONNX

def _onnx():
    try:
        import onnx
        import onnx.shape_inference
        import onnx.utils
    except ImportError as e:
        raise RuntimeError("ONNX models need the onnx package: pip install onnx onnxruntime") from e
    return onnx


_ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 9: "bool",
                10: "float16", 11: "float64", 12: "uint32", 13: "uint64"}


def find_cuts(graph) -> List[tuple]:
    """The single-tensor boundaries of an ONNX graph, as (position, tensor):
    after node ``position`` (in the graph's topological order) only
    ``tensor`` of the tensors that depend on the inputs is still needed."""
    consts = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in consts]
    outputs = {o.name for o in graph.output}
    nodes = list(graph.node)
    dynamic = set(inputs)
    for node in nodes:  # tensors that depend on an input (Constant nodes' outputs do not)
        if any(i in dynamic for i in node.input if i):
            dynamic.update(o for o in node.output if o)
    last_use: Dict[str, int] = {}
    for k, node in enumerate(nodes):
        for i in node.input:
            if i in dynamic:
                last_use[i] = k
    for o in outputs:
        last_use[o] = len(nodes)  # outputs are needed to the end
    live = set(inputs)
    cuts: List[tuple] = []
    for k, node in enumerate(nodes):
        live.update(o for o in node.output if o in dynamic)
        live = {t for t in live if last_use.get(t, -1) > k}
        if k < len(nodes) - 1 and len(live) == 1:
            (t,) = live
            if t in outputs or t in inputs:
                continue
            if cuts and cuts[-1][1] == t:
                cuts[-1] = (k, t)  # nodes that only made constants: the same cut
            else:
                cuts.append((k, t))
    return cuts


class OnnxSplitModel(SplitModel):
    """An ONNX model (a path, bytes or a ModelProto) cut at every
    single-tensor boundary (or at those of them named in ``cuts``).
    ``threads`` is onnxruntime's intra-op thread count per layer session (1
    by default: timings that do not depend on what else the machine runs)."""

    kind = "onnx"

    def __init__(self, model: Any, threads: int = 1, providers: Optional[List[str]] = None,
                 cuts: Optional[Sequence[str]] = None):
        onnx = _onnx()
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise RuntimeError("ONNX models need onnxruntime: pip install onnxruntime") from e
        if isinstance(model, str):
            with open(model, "rb") as f:
                data = f.read()
            self.source = model
        elif isinstance(model, bytes):
            data, self.source = model, "<bytes>"
        else:
            data, self.source = model.SerializeToString(), "<ModelProto>"
        self.sha256 = hashlib.sha256(data).hexdigest()
        try:
            proto = onnx.load_from_string(data)
        except Exception as e:
            raise ValueError(f"{self.source} is not an ONNX model: {e}") from None
        try:
            proto = onnx.shape_inference.infer_shapes(proto)
        except Exception as e:
            raise ValueError(f"{self.source}: ONNX shape inference failed, so the graph cannot be cut: {e}") from None
        self.proto = proto
        g = proto.graph
        consts = {i.name for i in g.initializer}
        self.input_names = [i.name for i in g.input if i.name not in consts]
        self.output_names = [o.name for o in g.output]
        found = find_cuts(g)
        if cuts is not None:  # the tensors to cut at, a subset of the single-tensor boundaries
            names = [t for _, t in found]
            bad = [c for c in cuts if c not in names]
            if bad:
                raise ValueError(f"{bad} are not single-tensor boundaries of this graph; it has {names}")
            found = [(k, t) for k, t in found if t in set(cuts)]
        self.cut_tensors: List[Any] = [list(self.input_names)] + [t for _, t in found] + [list(self.output_names)]
        self.n = len(self.cut_tensors) - 1
        infos = {v.name: v for v in list(g.value_info) + list(g.input) + list(g.output)}
        self.cut_specs = [self._spec(infos, c) for c in self.cut_tensors]
        ex = onnx.utils.Extractor(proto)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        provs = providers or ["CPUExecutionProvider"]
        self.layers, self.layer_names, self._sessions, self.layer_ops = [], [], [], []
        positions = [-1] + [k for k, _ in found] + [len(g.node) - 1]
        for i in range(self.n):
            ins = self._names(self.cut_tensors[i])
            outs = self._names(self.cut_tensors[i + 1])
            sub = ex.extract_model(ins, outs)
            ops = [n.op_type for n in g.node[positions[i] + 1: positions[i + 1] + 1]]
            self.layer_ops.append(ops)
            self.layer_names.append(_layer_name(ops))
            self.layers.append(sub)
            self._sessions.append(ort.InferenceSession(sub.SerializeToString(), sess_options=opts, providers=provs))
        self._full = None
        self._full_opts = opts

    @staticmethod
    def _names(cut) -> List[str]:
        return list(cut) if isinstance(cut, list) else [cut]

    @staticmethod
    def _spec(infos, cut) -> List[dict]:
        out = []
        for name in (cut if isinstance(cut, list) else [cut]):
            v = infos.get(name)
            if v is None or not v.type.HasField("tensor_type"):
                raise ValueError(f"tensor {name!r} has no type after shape inference: the graph cannot be cut there")
            tt = v.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
            out.append({"name": name, "dtype": _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type)), "shape": dims})
        return out

    def _feeds(self, i: int, x: Activation) -> Dict[str, np.ndarray]:
        names = self._names(self.cut_tensors[i])
        if isinstance(x, dict):
            return x
        if len(names) != 1:
            raise ValueError(f"cut {i} is {len(names)} tensors {names}: give a map of name to array")
        return {names[0]: x}

    def _unpack(self, i: int, values: list) -> Activation:
        names = self._names(self.cut_tensors[i])
        return values[0] if len(names) == 1 else dict(zip(names, values))

    def run(self, x: Activation, start: int = 0, stop: Optional[int] = None) -> Activation:
        start, stop = self._range(start, stop)
        for i in range(start, stop):
            s = self._sessions[i]
            outs = s.run(None, self._feeds(i, x))
            x = self._unpack(i + 1, outs)
        return x

    def run_full(self, x: Activation) -> Activation:
        """The whole model in one session (the reference for the split's
        outputs)."""
        if self._full is None:
            import onnxruntime as ort
            self._full = ort.InferenceSession(self.proto.SerializeToString(), sess_options=self._full_opts,
                                              providers=["CPUExecutionProvider"])
        return self._unpack(self.n, self._full.run(None, self._feeds(0, x)))

    def check_cut(self, p: int, x: Activation) -> Optional[str]:
        if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p < self.n:
            return f"split {p!r} is not a cut the server can start from (0 to {self.n - 1})"
        specs = self.cut_specs[p]
        feeds = x if isinstance(x, dict) else ({specs[0]["name"]: x} if len(specs) == 1 else None)
        if feeds is None:
            return f"cut {p} is {len(specs)} tensors: send a map of name to array"
        from ..bench.runtimes import check_feeds
        why = check_feeds(specs, feeds)
        return f"the activation at cut {p}: {why}" if why else None

    def describe(self) -> List[dict]:
        return [{"index": i, "name": self.layer_names[i], "ops": self.layer_ops[i],
                 "input": self.cut_specs[i], "output": self.cut_specs[i + 1]} for i in range(self.n)]


def _layer_name(ops: List[str]) -> str:
    out: List[str] = []
    for op in ops:
        if op in ("Constant", "Identity"):
            continue
        if not out or out[-1] != op:
            out.append(op)
    return "+".join(out) or "+".join(ops) or "(empty)"


# ------------------------------------------------------------------ torch

class TorchSplitModel(SplitModel):
    """A ``torch.nn.Sequential``: a layer per child, run under
    ``torch.inference_mode()`` on the CPU, activations to and from numpy at
    the cuts. ``sha256`` is that of the state dict (the two sides must load
    the same weights)."""

    kind = "torch"

    def __init__(self, seq: Any, threads: Optional[int] = 1):
        try:
            import torch
        except ImportError as e:
            raise RuntimeError("torch models need torch: pip install torch") from e
        if not isinstance(seq, torch.nn.Sequential):
            raise TypeError(f"a torch model to split must be an nn.Sequential (a layer per child), got "
                            f"{type(seq).__name__}")
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.seq = seq.eval()
        self.children = list(seq.children())
        self.n = len(self.children)
        if self.n < 1:
            raise ValueError("an empty nn.Sequential has nothing to split")
        self.layer_names = [type(c).__name__ for c in self.children]
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in seq.state_dict().items()}, buf)
        h = hashlib.sha256(buf.getvalue())
        h.update(repr(seq).encode())
        self.sha256 = h.hexdigest()
        self.source = repr(seq)[:200]

    def _t(self, x):
        return self.torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x

    def run(self, x: Activation, start: int = 0, stop: Optional[int] = None) -> Activation:
        start, stop = self._range(start, stop)
        with self.torch.inference_mode():
            t = self._t(x)
            for i in range(start, stop):
                t = self.children[i](t)
        return t.numpy() if hasattr(t, "numpy") else t

    def run_full(self, x: Activation) -> Activation:
        with self.torch.inference_mode():
            return self.seq(self._t(x)).numpy()

    def check_cut(self, p: int, x: Activation) -> Optional[str]:
        if not isinstance(p, int) or isinstance(p, bool) or not 0 <= p < self.n:
            return f"split {p!r} is not a cut the server can start from (0 to {self.n - 1})"
        if not isinstance(x, np.ndarray):
            return f"the activation at cut {p} must be an array, got {type(x).__name__}"
        return None

    def describe(self) -> List[dict]:
        return [{"index": i, "name": n, "ops": [repr(self.children[i])[:120]]} for i, n in enumerate(self.layer_names)]


def _is_torch_module(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def load(model: Any, **kw) -> SplitModel:
    """A split model from a path (``.onnx``), ONNX bytes or proto, an
    ``nn.Sequential``, a ``SplitModel``, or ``module::object`` naming one of
    those (a function is called)."""
    if isinstance(model, SplitModel):
        return model
    if isinstance(model, str) and "::" in model:
        from ..profile import load_object
        obj = load_object(model, "model")
        if callable(obj) and not hasattr(obj, "graph") and not _is_torch_module(obj):
            obj = obj()  # a factory function
        return load(obj, **kw)
    if _is_torch_module(model):
        return TorchSplitModel(model, **{k: v for k, v in kw.items() if k == "threads"})
    if not isinstance(model, (str, bytes)) and not hasattr(model, "SerializeToString"):
        raise TypeError(f"cannot split a {type(model).__name__}: give a .onnx file, ONNX bytes or ModelProto, an "
                        f"nn.Sequential, or a SplitModel")
    if isinstance(model, str) and not model.endswith(".onnx"):
        raise ValueError(f"cannot tell what {model!r} is: give a .onnx file, an nn.Sequential, or module::object")
    return OnnxSplitModel(model, **kw)
