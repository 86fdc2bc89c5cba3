"""Benchmark a model on a target, fp32 against int8 (docs/bench.md).

Trains a small MLP on scikit-learn's digits, exports it to ONNX with
skl2onnx, makes an int8 copy with onnxruntime's dynamic quantisation, then
benchmarks both on a target and puts them side by side.

    pip install -e ".[modelbench]"
    python3 examples/bench_digits.py                        # a target on loopback, in this process
    python3 examples/bench_digits.py --target board:6379    # a target started there with `edgeml serve`

Writes bench-digits/{fp32,int8,compare}/ (reports, plots, measurements.json).
"""
import argparse
import os
import sys
import warnings

import numpy as np


def make_models(out_dir: str):
    try:
        from onnxruntime.quantization import quantize_dynamic
        from skl2onnx import to_onnx
        from sklearn.datasets import load_digits
        from sklearn.neural_network import MLPClassifier
    except ImportError as e:
        sys.exit(f"this example needs onnxruntime, scikit-learn and skl2onnx: pip install -e \".[modelbench]\" "
                 f"({e})")
    digits = load_digits()
    x = digits.data.astype(np.float32) / 16  # the dataset spec digits:scale=0.0625 feeds the same
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.fit(x[::2], digits.target[::2])  # trained on half: the benchmark sees the other half too
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    os.makedirs(out_dir, exist_ok=True)
    fp32 = os.path.join(out_dir, "digits.onnx")
    with open(fp32, "wb") as f:
        f.write(onx.SerializeToString())
    int8 = os.path.join(out_dir, "digits_int8.onnx")
    import logging
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's advice on pre-processing
    quantize_dynamic(fp32, int8)
    return fp32, int8


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=None, help="host:port of `edgeml serve` (default: one on loopback here)")
    ap.add_argument("--out", default="bench-digits")
    ap.add_argument("--limit", type=int, default=None, help="at most this many samples")
    a = ap.parse_args()

    from edgeml import bench
    fp32, int8 = make_models(os.path.join(a.out, "models"))
    target = None
    if a.target is None:
        target = bench.Target(0, host="127.0.0.1").start()
        a.target = f"127.0.0.1:{target.port}"
    try:
        runs = {}
        for name, model in (("fp32", fp32), ("int8", int8)):
            print(f"== {name}: {os.path.basename(model)} ({os.path.getsize(model):,} bytes) on {a.target}")
            result = bench.run(a.target, model, "digits:scale=0.0625", out=os.path.join(a.out, name),
                               limit=a.limit)
            print(result.table())
            if not result.complete:
                print(f"incomplete: {result.error}", file=sys.stderr)
                return 1
            runs[name] = os.path.join(a.out, name)
    finally:
        if target is not None:
            target.stop()
    cmp = bench.compare(runs["fp32"], runs["int8"])
    print("== fp32 against int8")
    print(cmp.table())
    paths = cmp.write(os.path.join(a.out, "compare"))
    print(f"reports: {a.out}/fp32/report.html, {a.out}/int8/report.html, {paths['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
