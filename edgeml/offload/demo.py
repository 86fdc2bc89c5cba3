"""A small image CNN as an ONNX graph, random weights (no download, no
torch): the model of ``edgeml offload``'s examples, tests and benchmark.

Its shape is the one split computing is for: cheap early layers that
shrink the activation (a stride-2 conv, pools), then expensive layers on a
small activation, then a small result. ``width`` scales the expensive
layers' channels (their compute grows as its square).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np


def cnn(size: int = 224, width: int = 128, classes: int = 1000, seed: int = 0, heavy: int = 3):
    """The ModelProto: input ``image`` [1, 3, size, size] float32, output
    ``probs`` [1, classes]."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError as e:
        raise RuntimeError("the demo model needs onnx: pip install onnx onnxruntime") from e
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x, cin, cout, k, stride, name):
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k))).astype(np.float32)
        b = np.zeros(cout, np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}.w"), numpy_helper.from_array(b, f"{name}.b")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}.conv"], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4, name=f"{name}.conv"))
        nodes.append(helper.make_node("Relu", [f"{name}.conv"], [f"{name}.out"], name=f"{name}.relu"))
        return f"{name}.out"

    def pool(x, name):
        nodes.append(helper.make_node("MaxPool", [x], [name], kernel_shape=[2, 2], strides=[2, 2], name=name))
        return name

    x = conv("image", 3, 16, 3, 2, "stem")              # 16 x size/2
    x = pool(x, "pool1")                                 # 16 x size/4
    x = conv(x, 16, 32, 3, 1, "block1")
    x = pool(x, "pool2")                                 # 32 x size/8
    x = conv(x, 32, width, 3, 1, "block2")
    x = pool(x, "pool3")                                 # width x size/16
    for i in range(heavy):
        x = conv(x, width, width, 3, 1, f"heavy{i}")
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["features"], axis=1, name="flatten"))
    w = (rng.standard_normal((width, classes)) / np.sqrt(width)).astype(np.float32)
    inits.extend([numpy_helper.from_array(w, "fc.w"), numpy_helper.from_array(np.zeros(classes, np.float32), "fc.b")])
    nodes.append(helper.make_node("Gemm", ["features", "fc.w", "fc.b"], ["logits"], name="fc"))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1, name="softmax"))
    graph = helper.make_graph(nodes, "edgeml-offload-demo",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, size, size])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgeml")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def save_cnn(path: str, **kw) -> str:
    with open(path, "wb") as f:
        f.write(cnn(**kw).SerializeToString())
    return path


def sample_input(size: int = 224, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 3, size, size), dtype=np.float32)


def input_shape(size: int = 224) -> Tuple[int, ...]:
    return (1, 3, size, size)
