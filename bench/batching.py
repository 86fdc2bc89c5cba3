#!/usr/bin/env python3
"""bench/batching.py: dynamic batching against unbatched serving, same run.

A numpy MLP (512 -> 2048 -> 2048 -> 16, float32, relu) is served twice by
an InferenceServer in a process of its own: plainly (one call at a time on
the serving thread) and batched (max_batch_size=B, max_delay_ms=D).
1, 4 and 16 client processes each call it in a closed loop with
{"obs": float32[512]} for a fixed time; the table gives calls/s and the
latency percentiles of both, and the ratios issue 13 judges:

  16 clients: batched calls/s >= 3x unbatched, at a p99 no worse;
  1 and 4 clients: batched p50 <= unbatched p50 + max_delay_ms.

The model's cost grows less than linearly with the batch (one matrix
product per layer instead of B matrix-vector products). BLAS runs on one
thread (OMP_NUM_THREADS=1) so that the comparison is of the serving, not
of how many cores BLAS finds.

  bench/batching.py [--seconds S] [--clients 1,4,16] [--batch B (16)] [--delay-ms D (2)] [--json PATH]
"""
import argparse
import json
import multiprocessing as mp
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402


def make_model():
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((512, 2048), dtype=np.float32) / 32
    w2 = rng.standard_normal((2048, 2048), dtype=np.float32) / 45
    w3 = rng.standard_normal((2048, 16), dtype=np.float32) / 45

    def mlp(x):
        h = np.maximum(x @ w1, 0)
        h = np.maximum(h @ w2, 0)
        return h @ w3

    return mlp


def serve(mode, batch, delay_ms, port_q, stop_ev):
    import edgeml
    mlp = make_model()
    s = edgeml.InferenceServer(0, host="127.0.0.1")
    if mode == "batched":
        s.register_interface("mlp", lambda p: {"q": mlp(p["obs"])}, max_batch_size=batch, max_delay_ms=delay_ms)
    else:
        s.register_interface("mlp", lambda p: {"q": mlp(p["obs"])})
    s.start(threaded=True)
    port_q.put(s.port)
    stop_ev.wait()
    st = s.stats().get("batching", {}).get("mlp", {})
    s.stop()
    port_q.put(st)


def client(port, seconds, start_at, out_q):
    import edgeml
    c = edgeml.InferenceClient("127.0.0.1", port, timeout=30)
    obs = {"obs": np.random.default_rng(os.getpid()).standard_normal(512, dtype=np.float32)}
    for _ in range(20):
        c.call("mlp", obs)
    while time.time() < start_at:
        time.sleep(0.001)
    lat = []
    end = start_at + seconds
    while True:
        t0 = time.perf_counter()
        if time.time() >= end:
            break
        c.call("mlp", obs)
        lat.append(time.perf_counter() - t0)
    c.close()
    out_q.put(lat)


def run(mode, nclients, seconds, batch, delay_ms):
    ctx = mp.get_context("spawn")
    port_q, out_q, stop_ev = ctx.Queue(), ctx.Queue(), ctx.Event()
    srv = ctx.Process(target=serve, args=(mode, batch, delay_ms, port_q, stop_ev))
    srv.start()
    port = port_q.get(timeout=60)
    start_at = time.time() + 2.0 + 0.1 * nclients
    cs = [ctx.Process(target=client, args=(port, seconds, start_at, out_q)) for _ in range(nclients)]
    for p in cs:
        p.start()
    lats = []
    for _ in cs:
        lats.extend(out_q.get(timeout=seconds + 120))
    for p in cs:
        p.join(30)
    stop_ev.set()
    st = port_q.get(timeout=60)
    srv.join(30)
    a = np.array(lats) * 1e3
    return {"mode": mode, "clients": nclients, "calls_per_s": len(a) / seconds,
            "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_batch": st.get("mean_batch")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--delay-ms", type=float, default=2.0)
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args()
    rows = []
    for n in [int(x) for x in a.clients.split(",")]:
        for mode in ("plain", "batched"):
            r = run(mode, n, a.seconds, a.batch, a.delay_ms)
            rows.append(r)
            print(f"{mode:8s} clients={n:3d}  {r['calls_per_s']:9.0f} calls/s  p50 {r['p50_ms']:7.2f} ms  "
                  f"p99 {r['p99_ms']:7.2f} ms  mean batch {r['mean_batch']}", flush=True)
    print("\n| clients | plain calls/s | batched calls/s | ratio | plain p50 / p99 ms | batched p50 / p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    verdicts = []
    for n in sorted({r["clients"] for r in rows}):
        p = next(r for r in rows if r["clients"] == n and r["mode"] == "plain")
        b = next(r for r in rows if r["clients"] == n and r["mode"] == "batched")
        ratio = b["calls_per_s"] / p["calls_per_s"]
        print(f"| {n} | {p['calls_per_s']:.0f} | {b['calls_per_s']:.0f} | {ratio:.2f}x | "
              f"{p['p50_ms']:.2f} / {p['p99_ms']:.2f} | {b['p50_ms']:.2f} / {b['p99_ms']:.2f} |")
        if n >= 16:
            verdicts.append((f"{n} clients: batched >= 3x calls/s at a p99 no worse",
                             ratio >= 3 and b["p99_ms"] <= p["p99_ms"]))
        else:
            verdicts.append((f"{n} clients: batched p50 <= plain p50 + max_delay_ms",
                             b["p50_ms"] <= p["p50_ms"] + a.delay_ms + 0.05 * p["p50_ms"]))
    print()
    for what, ok in verdicts:
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "args": vars(a)}, f, indent=2)


if __name__ == "__main__":
    main()
