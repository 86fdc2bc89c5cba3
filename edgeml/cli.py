"""The ``edgeml`` command (also ``python -m edgeml``).

    edgeml profile server [--port 6379] [--host 0.0.0.0] [--model echo|sleep:MS|module::object]
    edgeml profile client --host H [--port 6379] [--sensor random_image:224x224x3|random_bytes:N|module::object]
                          [--iterations 100] [--warmup 10] [--rate HZ] [--out DIR] [--clocks-synchronized]
                          [--no-plots] [--quiet]
    edgeml serve [--port 6379] [--host 0.0.0.0] [--model-dir DIR] [--max-sessions 4]
    edgeml bench --target HOST:PORT --model m.onnx [--dataset digits|images:DIR|module::object] [--out DIR]
                 [--limit N] [--output NAME] [--input NAME] [--timeout S] [--no-plots] [--quiet]
    edgeml bench compare A.json B.json [...] [--out DIR] [--names A,B]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from . import __version__, errors


def _profile_server(a: argparse.Namespace) -> int:
    from . import profile
    server = profile.serve(a.model, port=a.port, host=a.host, threaded=True)
    print(f"edgeml profile server: model {a.model} on {a.host}:{server.port} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _profile_client(a: argparse.Namespace) -> int:
    from . import profile
    result = profile.run(a.host, a.port, a.sensor, iterations=a.iterations, warmup=a.warmup, rate=a.rate,
                         clocks_synchronized=a.clocks_synchronized, timeout=a.timeout, progress=not a.quiet)
    try:
        paths = result.write(a.out, plots=not a.no_plots)
    except RuntimeError as e:  # no matplotlib: the numbers all the same, and how to get the plots
        paths = result.write(a.out, plots=False)
        print(f"edgeml profile: no plots: {e}", file=sys.stderr)
    print(result.table())
    print("wrote " + ", ".join(paths[k] for k in sorted(paths)))
    errs = result.summary()["errors"]
    if errs:
        first = next(s["error"] for s in result.samples if "error" in s)
        print(f"edgeml profile: {errs} of {len(result.samples)} calls failed; first: {first}", file=sys.stderr)
        return 1
    return 0


def _serve(a: argparse.Namespace) -> int:
    from . import bench
    from .bench import runtimes
    have = runtimes.available()
    target = bench.Target(a.port, a.host, model_dir=a.model_dir, max_sessions=a.max_sessions, token=a.token,
                          log=None if a.quiet else (lambda m: print(f"edgeml serve: {m}", flush=True)))
    target.start(threaded=True)
    print(f"edgeml serve: benchmark target on {a.host}:{target.port}, runtimes: "
          f"{', '.join(have.values()) or 'none (pip install onnxruntime)'} (Ctrl-C stops)", flush=True)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        target.stop()
    return 0


def _bench(a: argparse.Namespace) -> int:
    from . import bench
    try:
        result = bench.run(a.target, a.model, a.dataset, out=a.out, limit=a.limit, output=a.output,
                           input_name=a.input, progress=not a.quiet, timeout=a.timeout, plots=not a.no_plots,
                           token=a.token)
    except bench.BenchError as e:
        print(f"edgeml bench: {e}", file=sys.stderr)
        return 1
    print(result.table())
    files = result.meta.get("files", {})
    if files:
        print("wrote " + ", ".join(files[k] for k in sorted(files)))
    if result.meta.get("plots_error"):
        print(f"edgeml bench: no plots: {result.meta['plots_error']}", file=sys.stderr)
    if result.meta.get("interrupted"):
        return 130
    if not result.complete:
        print(f"edgeml bench: incomplete run: {result.error} (the report holds what was measured)",
              file=sys.stderr)
        return 1
    errs = [s for s in result.samples if "error" in s]
    if errs:
        print(f"edgeml bench: {len(errs)} of {len(result.samples)} samples failed; first: {errs[0]['error']}",
              file=sys.stderr)
        return 1
    return 0


def _bench_compare(a: argparse.Namespace) -> int:
    from . import bench
    names = a.names.split(",") if a.names else None
    if names is not None and len(names) != len(a.runs):
        raise ValueError(f"--names gives {len(names)} names for {len(a.runs)} runs")
    for r in a.runs:
        if not os.path.exists(r):
            raise ValueError(f"no run {r}: give measurements.json files (or the folders holding them)")
    cmp = bench.compare(*a.runs, names=names)
    print(cmp.table())
    if a.out:
        paths = cmp.write(a.out, plots=not a.no_plots)
        print("wrote " + ", ".join(paths[k] for k in sorted(paths)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeml", description="edgeml command-line tools")
    p.add_argument("--version", action="version", version=f"edgeml {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    prof = sub.add_parser("profile", help="time every stage between a sensor and a prediction",
                          description="Serve a model, or profile calls to one (see docs/profile.md).")
    psub = prof.add_subparsers(dest="side", required=True)
    s = psub.add_parser("server", help="serve a model for profiling")
    s.add_argument("--port", type=int, default=6379)
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--model", default="echo", help="echo, sleep:MS, or module::object with infer(x) "
                   "(optional preprocess/postprocess)")
    s.set_defaults(fn=_profile_server)
    c = psub.add_parser("client", help="sample a sensor, call the model, time every stage")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, default=6379)
    c.add_argument("--sensor", default="random_image:224x224x3",
                   help="random_image:HxWxC, random_bytes:N, or module::object with sample()")
    c.add_argument("--iterations", type=int, default=100)
    c.add_argument("--warmup", type=int, default=10)
    c.add_argument("--rate", type=float, default=None, help="calls per second (default: back to back)")
    c.add_argument("--out", default="edgeml-profile", help="directory for profile.json, samples.csv, *.png")
    c.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    c.add_argument("--clocks-synchronized", action="store_true",
                   help="the two hosts' clocks are synchronised (PTP, one host): one-way figures use offset 0 "
                   "instead of the estimated offset, which assumes a symmetric path")
    c.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(fn=_profile_client)

    sv = sub.add_parser("serve", help="serve as a benchmark target for edgeml bench",
                        description="Load models the host uploads, run the data it streams, sample this "
                        "machine's CPU, memory and GPU (see docs/bench.md).")
    sv.add_argument("--port", type=int, default=6379)
    sv.add_argument("--host", default="0.0.0.0")
    sv.add_argument("--model-dir", default=None, help="where uploaded models are written (default: a temporary "
                    "folder, removed at exit)")
    sv.add_argument("--max-sessions", type=int, default=4, help="benchmark sessions open at once")
    sv.add_argument("--token", default=os.environ.get("EDGEML_TOKEN"), help="hosts must present this token "
                    "(default: $EDGEML_TOKEN; docs/security.md)")
    sv.add_argument("--quiet", action="store_true", help="no line per session")
    sv.set_defaults(fn=_serve)

    b = sub.add_parser("bench", help="benchmark a model on an edgeml serve target",
                       description="Upload a model to a target, stream a dataset, report quality, latency and "
                       "the target's utilisation (see docs/bench.md). 'edgeml bench compare A.json B.json' "
                       "puts runs side by side.")
    b.add_argument("--target", required=True, help="host:port of edgeml serve")
    b.add_argument("--model", required=True, help="the model file (.onnx, or .tflite where the target has "
                   "ai-edge-litert)")
    b.add_argument("--dataset", default="digits", help="digits[:scale=F,shape=HxW], images:DIR[,size=HxW,"
                   "layout=nchw,dtype=float32,scale=F,mean=a/b/c,std=a/b/c,gray], or module::object")
    b.add_argument("--out", default="edgeml-bench", help="directory for measurements.json, report.md, "
                   "report.html, *.png")
    b.add_argument("--limit", type=int, default=None, help="at most this many samples")
    b.add_argument("--output", default=None, help="the output holding the prediction (default: the float "
                   "output with a score per class)")
    b.add_argument("--input", default=None, help="the input the dataset's samples feed (a model with several)")
    b.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    b.add_argument("--token", default=os.environ.get("EDGEML_TOKEN"), help="the target's token (default: "
                   "$EDGEML_TOKEN)")
    b.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(fn=_bench)

    bc = sub.add_parser("bench-compare", prog="edgeml bench compare", help="runs of edgeml bench side by side",
                        description="Put edgeml bench runs side by side, each figure with its ratio to the "
                        "first run.")
    bc.add_argument("runs", nargs="+", help="measurements.json files, or the folders holding them")
    bc.add_argument("--out", default=None, help="also write compare.md, compare.html, compare.png here")
    bc.add_argument("--names", default=None, help="comma-separated names of the runs (default: their folders)")
    bc.add_argument("--no-plots", action="store_true")
    bc.set_defaults(fn=_bench_compare)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "compare"]:  # a subcommand of bench, beside bench's own options
        argv = ["bench-compare"] + argv[2:]
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, TypeError, RuntimeError, OSError, errors.EdgeMLError) as e:
        print(f"edgeml {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
