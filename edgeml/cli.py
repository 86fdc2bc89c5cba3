"""The ``edgeml`` command (also ``python -m edgeml``).

    edgeml profile server [--port 6379] [--host 0.0.0.0] [--model echo|sleep:MS|module::object]
    edgeml profile client --host H [--port 6379] [--sensor random_image:224x224x3|random_bytes:N|module::object]
                          [--iterations 100] [--warmup 10] [--rate HZ] [--out DIR] [--clocks-synchronized]
                          [--no-plots] [--quiet]
    edgeml serve [--port 6379] [--host 0.0.0.0] [--model-dir DIR] [--max-sessions 4]
    edgeml bench --target HOST:PORT --model m.onnx [--dataset digits|images:DIR|module::object] [--out DIR]
                 [--limit N] [--output NAME] [--input NAME] [--timeout S] [--no-plots] [--quiet]
    edgeml bench compare A.json B.json [...] [--out DIR] [--names A,B]
    edgeml offload serve --model M [--port 6380] [--host 0.0.0.0] [--threads 1]
    edgeml offload plan --server HOST:PORT --model M [--input x.npy] [--runs 20] [--interval S] [--out plan.json]
    edgeml offload run --server HOST:PORT --model M [--input x.npy] [--split auto|all|P] [--iterations 10]
                       [--interval S] [--runs 20] [--out result.json]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Optional

from . import __version__, errors


def _serve_until_stopped(server) -> int:
    """Serve until Ctrl-C or SIGTERM, then stop ``server`` cleanly (its
    temporary files removed, its clients answered)."""
    import signal

    def term(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, term)
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
        server.stop()
    return 0


def _profile_server(a: argparse.Namespace) -> int:
    from . import profile
    server = profile.serve(a.model, port=a.port, host=a.host, threaded=True)
    print(f"edgeml profile server: model {a.model} on {a.host}:{server.port} (Ctrl-C stops)", flush=True)
    return _serve_until_stopped(server)


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
    return _serve_until_stopped(target)


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
        try:
            paths = cmp.write(a.out, plots=not a.no_plots)
        except RuntimeError as e:  # no matplotlib: the tables all the same
            paths = cmp.write(a.out, plots=False)
            print(f"edgeml bench compare: no plot: {e}", file=sys.stderr)
        print("wrote " + ", ".join(paths[k] for k in sorted(paths)))
    return 0


def _offload_input(a: argparse.Namespace, model):
    import numpy as np
    if a.input:
        if not os.path.exists(a.input):
            raise ValueError(f"no input file {a.input}")
        x = np.load(a.input, allow_pickle=False)
        if isinstance(x, np.lib.npyio.NpzFile):
            x = {k: x[k] for k in x.files}
            if len(x) == 1:
                x = next(iter(x.values()))
        return x
    specs = getattr(model, "cut_specs", [None])[0]
    if not specs:
        raise ValueError("give the model's input with --input x.npy (a torch model does not say its input shape)")
    rng = np.random.default_rng(0)
    arrays = {s["name"]: rng.random([d or 1 for d in s["shape"]]).astype(s["dtype"]) for s in specs}
    return next(iter(arrays.values())) if len(arrays) == 1 else arrays


def _offload_serve(a: argparse.Namespace) -> int:
    from . import offload
    server = offload.OffloadServer(a.model, a.port, a.host, threads=a.threads, token=a.token).start()
    m = server.model
    print(f"edgeml offload serve: {m.source} ({m.n} layers, sha256 {m.sha256[:16]}…) on {a.host}:{server.port} "
          f"(Ctrl-C stops)", flush=True)
    return _serve_until_stopped(server)


def _offload_client(a: argparse.Namespace):
    from . import offload
    log = None if a.quiet else (lambda m: print(f"edgeml offload: {m}", file=sys.stderr, flush=True))
    return offload.OffloadClient(a.server, a.model, runs=a.runs, interval_s=a.interval, threads=a.threads,
                                 token=a.token, timeout=a.timeout, log=log)


def _write_json(path: Optional[str], obj) -> None:
    if path:
        import json
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)
        print(f"wrote {path}")


def _offload_plan(a: argparse.Namespace) -> int:
    if a.runs < 1:
        raise ValueError(f"--runs must be >= 1, got {a.runs}")
    with _offload_client(a) as dev:
        x = _offload_input(a, dev.model)
        plan = dev.make_plan(x)
        print(plan.layers_table())
        print()
        print(plan.table())
        _write_json(a.out, plan.to_json())
    return 0


def _same_outputs(y, ref) -> bool:
    import numpy as np
    if isinstance(ref, dict):
        return isinstance(y, dict) and set(y) == set(ref) and all(_same_outputs(y[k], ref[k]) for k in ref)
    y, ref = np.asarray(y), np.asarray(ref)
    return y.shape == ref.shape and bool(np.allclose(y, ref, rtol=1e-4, atol=1e-5))


def _offload_run(a: argparse.Namespace) -> int:
    from . import offload
    if a.iterations < 1 or a.runs < 1:
        raise ValueError(f"--iterations and --runs must be >= 1, got {a.iterations} and {a.runs}")
    if a.split not in ("auto", "all") and not a.split.isdigit():
        raise ValueError(f"--split is auto, all, or a split index, got {a.split!r}")
    with _offload_client(a) as dev:
        if a.split.isdigit() and int(a.split) > dev.model.n:
            raise ValueError(f"--split {a.split}: this model has splits 0..{dev.model.n}")
        x = _offload_input(a, dev.model)
        plan = dev.make_plan(x)
        print(plan.table())
        if a.split == "all":
            def prog(k, total, medians):
                if not a.quiet:
                    print(f"edgeml offload: round {k}/{total} of every split done", file=sys.stderr, flush=True)
            results = offload.run_splits(dev, x, a.iterations, a.interval, progress=prog)
            verdict = offload.check(results, plan)
            print(f"{'p':>3} {'scenario':<12} {'predicted ms':>13} {'measured ms':>12} {'error':>8}")
            for r in results:
                mark = (" <- chosen" if r["p"] == plan.split else "") + \
                       (" <- best measured" if r["p"] == verdict["best_measured"] else "")
                print(f"{r['p']:>3} {r['scenario']:<12} {r['predicted_s'] * 1e3:>13.2f} {r['measured_s'] * 1e3:>12.2f} "
                      f"{r['error'] * 100:>7.1f}%{mark}")
            print(f"worst prediction error {verdict['worst_prediction_error'] * 100:+.1f}% (p={verdict['worst_prediction_p']}); "
                  f"chosen p={verdict['chosen']} is {verdict.get('chosen_vs_best', 0) * 100:.1f}% slower than the best "
                  f"measured p={verdict['best_measured']}")
            _write_json(a.out, {"plan": plan.to_json(), "results": results, "check": verdict})
            return 0
        split = None if a.split == "auto" else int(a.split)
        ref = dev.model.run_full(x)
        lat = []
        for i in range(a.iterations):
            offload.runtime.idle(a.interval)
            y = dev.infer(x, split=split)
            lat.append(dev.last["total_s"])
            if i == 0 and not _same_outputs(y, ref):
                print("edgeml offload: the split's outputs differ from the whole model's", file=sys.stderr)
                return 1
        import numpy as np
        p = dev.last["p"]
        print(f"split p={p}: {len(lat)} inferences, median {np.median(lat) * 1e3:.2f} ms (predicted "
              f"{dev.plan.candidates[p].total_s * 1e3:.2f} ms); outputs equal the whole model's; "
              f"{len(dev.replans)} re-plans")
        _write_json(a.out, {"plan": dev.plan.to_json(), "latency_s": lat, "replans": dev.replans})
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeml", description="edgeml command-line tools")
    p.add_argument("--version", action="version", version=f"edgeml {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{profile,serve,bench,offload}")
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

    bc = sub.add_parser("bench-compare", prog="edgeml bench compare",
                        description="Put edgeml bench runs side by side, each figure with its ratio to the "
                        "first run.")
    bc.add_argument("runs", nargs="+", help="measurements.json files, or the folders holding them")
    bc.add_argument("--out", default=None, help="also write compare.md, compare.html, compare.png here")
    bc.add_argument("--names", default=None, help="comma-separated names of the runs (default: their folders)")
    bc.add_argument("--no-plots", action="store_true")
    bc.set_defaults(fn=_bench_compare)

    off = sub.add_parser("offload", help="split computing: the first layers here, the rest on a server",
                         description="Profile a model on this device and a server, measure the link, and run "
                         "it split at the fastest cut (see docs/offload.md).")
    osub = off.add_subparsers(dest="side", required=True)
    os_ = osub.add_parser("serve", help="serve the server's part of split inference")
    os_.add_argument("--model", required=True, help="an .onnx file, or module::object giving an nn.Sequential")
    os_.add_argument("--port", type=int, default=6380)
    os_.add_argument("--host", default="0.0.0.0")
    os_.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads per layer")
    os_.add_argument("--token", default=os.environ.get("EDGEML_TOKEN"))
    os_.set_defaults(fn=_offload_serve)
    for name, fn, hlp in (("plan", _offload_plan, "profile both sides, measure the link, print every split"),
                          ("run", _offload_run, "run split inference (the plan's split, one given, or all)")):
        q = osub.add_parser(name, help=hlp)
        q.add_argument("--server", required=True, help="host:port of edgeml offload serve")
        q.add_argument("--model", required=True, help="the same model the server holds")
        q.add_argument("--input", default=None, help="an input as .npy (.npz for several inputs); default: "
                       "random, of the model's input shape")
        q.add_argument("--runs", type=int, default=20, help="profile runs per side (their median)")
        q.add_argument("--interval", type=float, default=0.0, help="idle seconds before each profiled and "
                       "measured inference (the time between your frames)")
        q.add_argument("--threads", type=int, default=1)
        q.add_argument("--timeout", type=float, default=60.0)
        q.add_argument("--token", default=os.environ.get("EDGEML_TOKEN"))
        q.add_argument("--out", default=None, help="write the plan (and results) as JSON here")
        q.add_argument("--quiet", action="store_true")
        if name == "run":
            q.add_argument("--split", default="auto", help="auto (the plan's, re-planned as the link changes), "
                           "all (every split, measured against its prediction), or a split index")
            q.add_argument("--iterations", type=int, default=10, help="inferences (per split with --split all)")
        q.set_defaults(fn=fn)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "compare"]:  # a subcommand of bench, beside bench's own options
        argv = ["bench-compare"] + argv[2:]
    args = build_parser().parse_args(argv)
    name = {"bench-compare": "bench compare"}.get(args.command, args.command)
    try:
        return args.fn(args)
    except BrokenPipeError:  # the output went to `head` or a closed pipe: nothing to say, and no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (ValueError, TypeError, RuntimeError, OSError, errors.EdgeMLError) as e:
        print(f"edgeml {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
