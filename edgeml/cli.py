"""The ``edgeml`` command (also ``python -m edgeml``).

    edgeml profile server [--port 6379] [--host 0.0.0.0] [--model echo|sleep:MS|module::object]
    edgeml profile client --host H [--port 6379] [--sensor random_image:224x224x3|random_bytes:N|module::object]
                          [--iterations 100] [--warmup 10] [--rate HZ] [--out DIR] [--clocks-synchronized]
                          [--no-plots] [--quiet]
"""
from __future__ import annotations

import argparse
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
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, TypeError, RuntimeError, errors.EdgeMLError) as e:
        print(f"edgeml {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
