#!/usr/bin/env python3
"""The check of issue 15 (docs/offload.md, "Checked on shaped links"): split
inference of the demo CNN on tbf-limited veth links at two rates, the
device side slowed by a CPU quota to act as a weak board.

For each rate: the server runs in a network namespace behind a veth pair
shaped with tbf both ways; the device runs here in a cgroup whose CPU quota
(cgroup v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us``) is ``--quota`` of one
core; ``edgeml offload run --split all`` profiles both sides, measures the
link, plans, then runs every split for real. Verdicts: every split's
predicted latency within 20% of its measured latency, and the chosen
split's measured latency within 10% of the best measured one.

    sudo python3 bench/offload_check.py                 # 5 and 200 Mbit/s, quota 0.25
    python3 bench/offload_check.py --rates 5,200 --quota 0.25 --iterations 15 --out bench-offload

Needs root (namespaces, cgroups), iproute2 (ip, tc), onnx and onnxruntime.
Exit code 0 when every verdict holds, 1 when one does not, 2 when the
check cannot run here (and why).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # linktools: the shaped veth pair of the timing tests


class CpuQuota:
    """A cgroup whose processes get ``fraction`` of one CPU: cgroup v2
    ``cpu.max`` where the unified hierarchy has the cpu controller, else
    v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``."""

    def __init__(self, fraction: float, period_us: int = 4000, name: str = f"edgeml-weak-{os.getpid()}"):
        self.fraction, self.period_us = fraction, period_us
        quota = max(1000, int(fraction * period_us))
        v2_root = "/sys/fs/cgroup"
        if os.path.exists(os.path.join(v2_root, "cgroup.controllers")) and \
                "cpu" in open(os.path.join(v2_root, "cgroup.controllers")).read().split():
            self.path = os.path.join(v2_root, name)
            os.makedirs(self.path, exist_ok=True)
            with open(os.path.join(v2_root, "cgroup.subtree_control"), "w") as f:
                f.write("+cpu")
            with open(os.path.join(self.path, "cpu.max"), "w") as f:
                f.write(f"{quota} {period_us}")
            self.kind = f"cgroup v2 cpu.max = {quota} {period_us}"
        elif os.path.exists("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
            self.path = os.path.join("/sys/fs/cgroup/cpu", name)
            os.makedirs(self.path, exist_ok=True)
            with open(os.path.join(self.path, "cpu.cfs_period_us"), "w") as f:
                f.write(str(period_us))
            with open(os.path.join(self.path, "cpu.cfs_quota_us"), "w") as f:
                f.write(str(quota))
            self.kind = f"cgroup v1 cpu.cfs_quota_us = {quota}, cpu.cfs_period_us = {period_us}"
        else:
            raise RuntimeError("no cgroup cpu controller (neither v2 cpu.max nor v1 cpu.cfs_quota_us)")

    def prefix(self) -> list:
        """A command prefix that runs the command inside this cgroup."""
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$0" "$@"']

    def close(self) -> None:
        try:
            os.rmdir(self.path)
        except OSError:
            pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="5,200", help="link rates, Mbit/s, comma-separated")
    ap.add_argument("--size", type=int, default=224, help="the demo CNN's input size")
    ap.add_argument("--quota", type=float, default=0.25, help="the device's share of one CPU")
    ap.add_argument("--period-us", type=int, default=4000, help="the quota's period (short: the device's "
                    "time is quantised by it; 1 ms of quota is the kernel's least)")
    ap.add_argument("--iterations", type=int, default=15, help="measured inferences per split")
    ap.add_argument("--runs", type=int, default=30, help="profile runs per side")
    ap.add_argument("--interval", type=float, default=0.05, help="idle seconds before each inference")
    ap.add_argument("--width", type=int, default=384, help="the demo CNN's width (its heavy layers' channels)")
    ap.add_argument("--heavy", type=int, default=6, help="the demo CNN's heavy layers")
    ap.add_argument("--queue-ms", type=float, default=1000.0, help="tbf's queue, in ms at the link's rate (a "
                    "short one drops the bursts of a large activation, and a TCP retransmission timeout is "
                    "no bandwidth a plan can foresee)")
    ap.add_argument("--out", default=None, help="write each rate's JSON and a summary here")
    a = ap.parse_args()

    try:
        from linktools import ShapedNetns
        from edgeml.offload import demo
    except ImportError as e:
        print(f"offload_check: cannot run: {e}", file=sys.stderr)
        return 2
    ok, why = ShapedNetns.available()
    if not ok:
        print(f"offload_check: cannot run here: {why}", file=sys.stderr)
        return 2
    work = tempfile.mkdtemp(prefix="edgeml-offload-")
    model = demo.save_cnn(os.path.join(work, "cnn.onnx"), size=a.size, width=a.width, heavy=a.heavy)
    out_dir = a.out or work
    os.makedirs(out_dir, exist_ok=True)
    try:
        quota = CpuQuota(a.quota, a.period_us)
    except (OSError, RuntimeError) as e:
        print(f"offload_check: cannot make a CPU quota here: {e}", file=sys.stderr)
        return 2
    summary = {"quota": quota.kind, "model": {"width": a.width, "heavy": a.heavy, "bytes": os.path.getsize(model)},
               "queue_ms": a.queue_ms, "interval_s": a.interval, "iterations": a.iterations, "runs": a.runs,
               "links": {}}
    all_ok = True
    try:
        for rate in [float(r) for r in a.rates.split(",")]:
            ns = ShapedNetns(rate_mbit=rate, tag=f"off{int(rate)}", latency_ms=a.queue_ms)
            srv = None
            try:
                port = 6390
                srv = subprocess.Popen([*ns.prefix, sys.executable, "-m", "edgeml", "offload", "serve", "--model",
                                        model, "--port", str(port), "--host", ns.inner], stdout=subprocess.PIPE,
                                       text=True, env={**os.environ, "PYTHONPATH": ROOT})
                line = srv.stdout.readline()
                if "offload serve" not in line:
                    raise RuntimeError(f"the server did not start: {line!r}")
                out = os.path.join(out_dir, f"offload-{int(rate)}mbit.json")
                t0 = time.time()
                cmd = [*quota.prefix(), sys.executable, "-m", "edgeml", "offload", "run", "--server",
                       f"{ns.inner}:{port}", "--model", model, "--split", "all", "--iterations", str(a.iterations),
                       "--runs", str(a.runs), "--interval", str(a.interval), "--out", out, "--timeout", "120"]
                r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
                print(f"== {rate:g} Mbit/s each way, device at {a.quota:g} CPU ({quota.kind}), "
                      f"{time.time() - t0:.0f} s")
                print(r.stdout)
                if r.returncode != 0:
                    print(r.stderr, file=sys.stderr)
                    all_ok = False
                    continue
                res = json.load(open(out))
                v = res["check"]
                link = res["plan"]["link"]
                summary["links"][f"{rate:g}"] = {"check": v, "link_measured_mbit_s": [link["up_mbit_s"],
                                                                                     link["down_mbit_s"]],
                                                 "rtt_ms": link["rtt_s"] * 1e3, "file": out}
                line = (f"verdict {rate:g} Mbit/s: predictions within 20%: {'PASS' if v['predictions_ok'] else 'FAIL'} "
                        f"(worst {v['worst_prediction_error'] * 100:+.1f}% at p={v['worst_prediction_p']}); chosen "
                        f"p={v['chosen']} within 10% of the best measured p={v['best_measured']}: "
                        f"{'PASS' if v.get('choice_ok') else 'FAIL'} ({v.get('chosen_vs_best', 0) * 100:+.1f}%); "
                        f"link measured {link['up_mbit_s']:.1f} up / {link['down_mbit_s']:.1f} down Mbit/s")
                print(line)
                all_ok = all_ok and v["predictions_ok"] and bool(v.get("choice_ok"))
            finally:
                if srv is not None:
                    srv.terminate()
                    try:
                        srv.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        srv.kill()
                ns.close()
    finally:
        quota.close()
    with open(os.path.join(out_dir, "offload-summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"results in {out_dir}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
