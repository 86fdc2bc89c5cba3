"""Where a call's time goes, from the timestamps edgeml's wire carries.

Every request carries its send time and every reply the server's receive,
handler-start, handler-end and send times, so each call yields the four NTP
timestamps (docs/timing.md). From them a client reports, per call
(``InferenceClient.call_timed``) and as running statistics
(``client.stats()``):

========== ===============================================================
stage      meaning
========== ===============================================================
encode     client: payload to wire format (before the request is sent)
upload     request one-way: client starts writing → server has it all
queue      server: request read → handler starts
handler    server: the handler (decode, your function, encode)
reply      server: handler done → reply starts going out
download   reply one-way: server starts writing → client has it all
decode     client: wire format to Python objects
rtt        round trip: client starts writing → client has the reply
========== ===============================================================

``upload`` and ``download`` compare two clocks. Unless the clocks are
declared synchronised (``clocks_synchronized=True``: PTP, or both ends on
one host), they rest on the client's estimate of the server's clock offset,
which assumes the path takes as long each way: an asymmetric path (5 ms up,
20 ms down) shows up as the average of the two (12.5 ms each way). The round
trip and the server's own stages need no such assumption.
"""
from __future__ import annotations

import html
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

STAGES = ("rtt", "upload", "queue", "handler", "reply", "download", "encode", "decode")
BYTE_STAGES = ("bytes_up", "bytes_down")
_CORE_ORDER = ("rtt", "upload", "queue", "handler", "reply", "download", "encode", "decode", "bytes_up",
               "bytes_down")  # csrc/include/edgeml.h EM_STAGE_*

BASIS_ESTIMATED = "estimated clock offset (assumes a symmetric path)"
BASIS_SYNCHRONIZED = "clocks declared synchronized"


@dataclass(frozen=True)
class CallTiming:
    """One call's stages in milliseconds, its bytes on the wire, and the raw
    timestamps (ns since the Unix epoch, t0/t5 on the client's clock,
    t1..t4 on the server's)."""

    rtt_ms: float
    upload_ms: float
    queue_ms: float
    handler_ms: float
    reply_ms: float
    download_ms: float
    encode_ms: float
    decode_ms: float
    bytes_up: int
    bytes_down: int
    offset_ms: float
    offset_error_ms: float
    synchronized: bool
    t_ns: Tuple[int, int, int, int, int, int] = field(repr=False)

    @property
    def one_way_basis(self) -> str:
        """What the upload/download figures rest on."""
        return BASIS_SYNCHRONIZED if self.synchronized else BASIS_ESTIMATED

    @property
    def server_ms(self) -> float:
        """Time the request spent in the server (queue + handler + reply)."""
        return self.queue_ms + self.handler_ms + self.reply_ms

    def as_dict(self) -> dict:
        d = {f"{s}_ms": getattr(self, f"{s}_ms") for s in STAGES}
        d.update(bytes_up=self.bytes_up, bytes_down=self.bytes_down, offset_ms=self.offset_ms,
                 offset_error_ms=self.offset_error_ms, one_way_basis=self.one_way_basis,
                 t_ns=list(self.t_ns))
        return d

    @classmethod
    def _from_core(cls, t) -> "CallTiming":
        ts, offset, err, sync, st = t
        ms = {name: v / 1e6 for name, v in zip(_CORE_ORDER, st)}
        return cls(rtt_ms=ms["rtt"], upload_ms=ms["upload"], queue_ms=ms["queue"], handler_ms=ms["handler"],
                   reply_ms=ms["reply"], download_ms=ms["download"], encode_ms=ms["encode"],
                   decode_ms=ms["decode"], bytes_up=st[8], bytes_down=st[9], offset_ms=offset / 1e6,
                   offset_error_ms=err / 1e6, synchronized=bool(sync), t_ns=tuple(ts))


class Stats(dict):
    """``client.stats()``: a plain dict (``stats["stages"]["rtt_ms"]["p50"]``)
    that a notebook shows as a table of the stages and the clock estimate."""

    def _repr_html_(self) -> str:
        esc = html.escape
        cols = ("count", "p50", "p90", "p99", "min", "max", "mean")
        head = "".join(f"<th>{c}</th>" for c in ("stage",) + cols)
        rows = []
        for name, st in self.get("stages", {}).items():
            if not st.get("count"):
                continue
            byte = name in BYTE_STAGES
            cells = "".join(f"<td>{st[c]:,.0f}</td>" if byte or c == "count" else f"<td>{st[c]:.3f}</td>"
                            for c in cols)
            label = name.replace("_", " ") if byte else f"{name[:-3]} (ms)"
            rows.append(f"<tr><td style='text-align:left'>{esc(label)}</td>{cells}</tr>")
        clock = self.get("clock", {})
        age = clock.get("age_s")
        note = (f"clock offset {clock.get('offset_ms', 0.0):.3f} ± {clock.get('error_ms', 0.0):.3f} ms "
                f"({clock.get('samples', 0)} samples" + (f", {age:.1f} s old" if age is not None else "") + "); "
                f"upload/download: {esc(str(clock.get('basis', '')))}")
        body = "".join(rows) or f"<tr><td colspan='{len(cols) + 1}'>no calls yet</td></tr>"
        return (f"<div><b>edgeml client stats: {self.get('calls', 0)} calls</b>"
                f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}</div>")


def stats_from_core(raw: dict) -> "Stats":
    """``client.stats()``: per stage count/mean/p50/p90/p99/min/max (ms, or
    bytes for bytes_up/bytes_down) and the clock estimate."""
    stages: Dict[str, dict] = {}
    for name, (count, mean, p50, p90, p99, lo, hi) in raw["stages"].items():
        scale = 1.0 if name in BYTE_STAGES else 1e-6
        key = name if name in BYTE_STAGES else f"{name}_ms"
        stages[key] = {"count": count, "mean": mean * scale, "p50": p50 * scale, "p90": p90 * scale,
                       "p99": p99 * scale, "min": lo * scale, "max": hi * scale}
    sync = raw["synchronized"]
    return Stats({
        "calls": raw["calls"],
        "stages": stages,
        "clock": {
            "offset_ms": raw["offset_ns"] / 1e6,
            "error_ms": raw["offset_err_ns"] / 1e6,
            "samples": raw["offset_samples"],
            "age_s": raw["offset_age_ns"] / 1e9 if raw["offset_samples"] else None,
            "basis": BASIS_SYNCHRONIZED if sync else BASIS_ESTIMATED,
        },
    })


class _ClockKeeper:
    """One daemon thread per process that has each client send a PING every
    ``clock_refresh`` seconds, so the clock-offset estimate always holds a
    small, symmetric sample, also when the client is idle or sends only large
    messages."""

    def __init__(self) -> None:
        self._clients: "weakref.WeakSet" = weakref.WeakSet()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def after_fork_in_child(self) -> None:
        """The keeper's thread is the parent's: start afresh (its lock may
        have been held by a thread that does not exist here). The inherited
        clients stay: their next call opens a connection of this process."""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None
        if len(self._clients):
            with self._lock:
                self._thread = threading.Thread(target=self._run, name="edgeml-clock", daemon=True)
                self._thread.start()

    def add(self, client) -> None:
        with self._lock:
            self._clients.add(client)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="edgeml-clock", daemon=True)
                self._thread.start()

    def discard(self, client) -> None:
        with self._lock:
            self._clients.discard(client)

    def _run(self) -> None:
        while True:
            with self._lock:
                clients = list(self._clients)
            if not clients:
                with self._lock:
                    if not self._clients:
                        self._thread = None
                        return
                continue
            period = min(c._clock_refresh or 1.0 for c in clients)
            now = time.monotonic()
            for c in clients:
                c._refresh_clock(now)
            del clients
            self._wake.wait(max(0.05, period / 4))


keeper = _ClockKeeper()
