"""The link between a device and its server, measured by edgeml's own
per-call timing (docs/offload.md, "Measuring the link").

No synchronised clocks: each probe call's *transfer* time is ``rtt - queue
- handler - reply`` (``docs/timing.md``: that is ``upload + download``, and
each term is read from one clock). Probes that send ``s`` bytes up and a
few bytes down have a transfer time ``a + s / up_bps``; probes that send a
few bytes and get ``s`` back, ``a + s / down_bps``. The slope of a
least-squares line through each set is the size-dependent part of that
one-way delay: it does not depend on the clocks' offset (the one-way
``upload_ms`` would give the same slope, offset and all, as the offset is
the same constant in every point). ``rtt`` is a small call's round trip;
``a`` less a small call's transfer time is the direction's offset (about
0; negative behind a token bucket, whose burst passes at line rate).
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .plan import Link

SINK = "offload.sink"  # payload {"b": bytes} -> None
SOURCE = "offload.source"  # payload {"n": int} -> {"b": n bytes}
MAX_SOURCE_BYTES = 64 << 20


def serve_probes(server: Any) -> None:
    """Register the probe interfaces on an InferenceServer."""
    blobs: Dict[int, bytes] = {}

    def source(p):
        n = p.get("n") if isinstance(p, dict) else None
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_SOURCE_BYTES:
            raise ValueError(f"{SOURCE}: n must be an int in 0..{MAX_SOURCE_BYTES}, got {n!r}")
        b = blobs.get(n)
        if b is None:
            if len(blobs) > 16:
                blobs.clear()
            b = blobs[n] = bytes(n)
        return {"b": b}

    server.register_interface(SINK, lambda p: None)
    server.register_interface(SOURCE, source)


def _idle(gap_s: float) -> None:
    from .runtime import idle
    idle(gap_s)


def _transfer_s(t) -> float:
    """upload + download of one call, from one clock each."""
    return (t.rtt_ms - t.queue_ms - t.handler_ms - t.reply_ms) / 1e3


def _fit(points: List[Tuple[int, float]]) -> Tuple[float, float]:
    """Least-squares (intercept s, slope s/byte) of transfer time against bytes."""
    x = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    if np.ptp(x) == 0:
        raise ValueError("probes of one size cannot give a bandwidth")
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


def _series(client: Any, direction: str, sizes: List[int], repeats: int,
            timeout: Optional[float], gap_s: float = 0.0) -> List[Tuple[int, float]]:
    """(frame bytes in that direction, median transfer s) per size."""
    out = []
    for s in sizes:
        vals, nbytes = [], 0
        for _ in range(repeats):
            _idle(gap_s)
            if direction == "up":
                _, t = client.call_timed(SINK, {"b": bytes(s)}, timeout=timeout)
                nbytes = t.bytes_up
            else:
                _, t = client.call_timed(SOURCE, {"n": s}, timeout=timeout)
                nbytes = t.bytes_down
            vals.append(_transfer_s(t))
        out.append((nbytes, float(np.median(vals))))
    return out


def _sizes(client: Any, direction: str, budget_s: float, timeout: Optional[float], gap_s: float) -> List[int]:
    """Probe sizes from 16 KiB up to the size one transfer of which takes
    about ``budget_s`` on this link (a first guess from a 64 KiB probe and
    a 256 KiB one), 16 KiB .. 16 MiB, four sizes spread geometrically."""
    (b1, t1), (b2, t2) = _series(client, direction, [64 << 10, 256 << 10], 1, timeout, gap_s)
    rate = (b2 - b1) / (t2 - t1) if t2 > t1 else (b2 / t2 if t2 > 0 else 1e9)
    top = int(min(16 << 20, max(256 << 10, rate * budget_s)))
    return sorted({int(v) for v in np.geomspace(16 << 10, top, 4)})


def measure(client: Any, repeats: int = 3, budget_s: float = 0.15, rtt_calls: int = 15,
            timeout: Optional[float] = 30.0, gap_s: float = 0.0) -> Link:
    """Measure the link to ``client``'s server (which serves the probes,
    ``serve_probes``): rtt, then up and down bandwidth by probes whose
    sizes fit the link (the largest takes about ``budget_s``), each size
    ``repeats`` times (their median). ``gap_s``: idle before each probe, the
    time between the inferences the plan is for (a link that lets a burst
    through after idle, as a token bucket does, is measured as those
    inferences will find it)."""
    client.call(SINK, {"b": b""}, timeout=timeout)  # connected, warm
    rtts, small = [], []
    for _ in range(rtt_calls):
        _idle(min(gap_s, 0.01))
        _, t = client.call_timed(SINK, {"b": b""}, timeout=timeout)
        rtts.append(t.rtt_ms / 1e3)
        small.append(_transfer_s(t))
    rtt, w0 = float(np.median(rtts)), float(np.median(small))
    t0 = time.perf_counter()
    detail: Dict[str, Any] = {"rtt_samples_s": rtts, "small_transfer_s": w0}
    bps, offset = {}, {}
    for direction in ("up", "down"):
        sizes = _sizes(client, direction, budget_s, timeout, gap_s)
        pts = _series(client, direction, sizes, repeats, timeout, gap_s)
        intercept, slope = _fit(pts)
        if slope <= 0:  # faster than the probes can tell: bound it by the largest probe
            nb, ts = max(pts)
            slope, intercept = max(ts, 1e-6) / nb, w0
        bps[direction] = 1.0 / slope
        offset[direction] = min(0.0, intercept - w0)  # a burst at line rate; never more than a small call's time
        detail[direction] = {"points": [[b, s] for b, s in pts], "intercept_s": intercept, "slope_s_per_byte": slope}
    detail["probe_s"] = time.perf_counter() - t0
    return Link(rtt, bps["up"], bps["down"], detail, offset["up"], offset["down"])
