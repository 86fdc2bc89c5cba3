"""``edgeml.offload``: split computing between a device and a server
(docs/offload.md). The device runs a model's first layers, sends the
activation, the server finishes; the split is the one that is fastest on
the link as it is measured, and changes when the link does.

Server::

    edgeml offload serve --model cnn.onnx --port 6380     # or offload.serve("cnn.onnx", 6380)

Device::

    from edgeml import offload
    dev = offload.OffloadClient("server:6380", "cnn.onnx")
    plan = dev.make_plan(x)          # profiles both sides, measures the link
    print(plan.table())              # every split's predicted latency, the chosen one
    y = dev.infer(x)                 # layers [0, p) here, [p, n) there
"""
from .link import measure as measure_link
from .model import OnnxSplitModel, SplitModel, TorchSplitModel, find_cuts, load
from .plan import Candidate, Link, Plan, Profile
from .runtime import OffloadClient, OffloadServer, check, cut_bytes, profile, run_splits, serve

__all__ = ["Candidate", "Link", "OffloadClient", "OffloadServer", "OnnxSplitModel", "Plan", "Profile",
           "SplitModel", "TorchSplitModel", "check", "cut_bytes", "find_cuts", "load", "measure_link", "profile",
           "run_splits", "serve"]
