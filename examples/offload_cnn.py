"""Split computing: a CNN's first layers on this device, the rest on a
server, at the split that is fastest on the link (docs/offload.md).

    pip install -e ".[offload]"
    python3 examples/offload_cnn.py                         # a server on loopback, in this process
    python3 examples/offload_cnn.py --server gpu-box:6380   # one started there with
                                                            #   edgeml offload serve --model cnn.onnx

The model is edgeml.offload.demo's CNN (random weights, written to
--model if that file does not exist: give the server the same file).
"""
import argparse
import os
import sys

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default=None, help="host:port of `edgeml offload serve` (default: one here)")
    ap.add_argument("--model", default="offload-cnn.onnx")
    ap.add_argument("--size", type=int, default=128, help="the CNN's input size")
    ap.add_argument("--inferences", type=int, default=20)
    a = ap.parse_args()

    from edgeml import offload
    from edgeml.offload import demo
    if not os.path.exists(a.model):
        demo.save_cnn(a.model, size=a.size)
        print(f"wrote the demo CNN to {a.model}")
    server = None
    if a.server is None:
        server = offload.OffloadServer(a.model, port=0, host="127.0.0.1").start()
        a.server = f"127.0.0.1:{server.port}"
    try:
        with offload.OffloadClient(a.server, a.model, runs=10) as dev:
            x = demo.sample_input(size=dev.model.cut_specs[0][0]["shape"][-1])
            plan = dev.make_plan(x)
            print(plan.layers_table())
            print()
            print(plan.table())
            full = dev.model.run_full(x)
            lat = []
            for _ in range(a.inferences):
                y = dev.infer(x)
                lat.append(dev.last["total_s"])
                if not np.allclose(y, full, rtol=1e-5, atol=1e-6):
                    print("the split's outputs differ from the whole model's", file=sys.stderr)
                    return 1
            print(f"{a.inferences} inferences split at p={dev.last['p']}: median {np.median(lat) * 1e3:.2f} ms "
                  f"(predicted {plan.best.total_s * 1e3:.2f} ms); outputs equal the whole model's")
    finally:
        if server is not None:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
