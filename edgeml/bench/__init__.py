"""``edgeml serve`` / ``edgeml bench``: benchmark a model on a remote
target over edgeml's wire (docs/bench.md).

On the target::

    edgeml serve --port 6379            # or: edgeml.bench.serve(6379)

On the host::

    edgeml bench --target board:6379 --model m.onnx --dataset digits --out run-fp32
    edgeml bench compare run-fp32/measurements.json run-int8/measurements.json

or from Python::

    from edgeml import bench
    result = bench.run("board:6379", "m.onnx", "digits", out="run-fp32")
    print(result.table())
    print(bench.compare("run-fp32", "run-int8").table())
"""
from .datasets import ArrayDataset, ImageFolder
from .datasets import load as load_dataset
from .host import BenchError, parse_target, run
from .report import BenchResult, Comparison, compare, describe
from .sampler import Sampler
from .target import Target, serve

__all__ = ["ArrayDataset", "BenchError", "BenchResult", "Comparison", "ImageFolder", "Sampler", "Target",
           "compare", "describe", "load_dataset", "parse_target", "run", "serve"]
