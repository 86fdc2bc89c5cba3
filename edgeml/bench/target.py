"""The target side of ``edgeml bench``: ``edgeml serve`` (docs/bench.md).

A ``Target`` is an ``InferenceServer`` serving the benchmark protocol
(``protocol.py``): a host opens a session by uploading a model (MODEL
chunks into a file under ``model_dir``), then for every sample sends DATA,
PROCESS and OUTPUT, and reads the target's statistics with STATS while the
session is open; END closes it. Every reply is ``{"status": "OK", ...}``
or ``{"status": "ERROR", "error": reason}``: a corrupt model, inputs that
do not fit, a runtime that raises are each an ERROR to that host, and the
target serves on.

Threads: the protocol's handlers run on the server's serving thread, one
call at a time (a benchmark wants the target to itself: inference is never
timed while another request is being handled); a session's sampler runs on
a thread of its own.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from typing import Any, Dict, Optional

import numpy as np

from .. import __version__
from ..inference import InferenceServer
from . import protocol as P
from . import runtimes
from .sampler import Sampler

MAX_MODEL_BYTES = 4 << 30  # a model larger than this is refused before any of it is written
SESSION_IDLE_S = 600.0  # a session no call has touched for this long is closed (its host went away)
REAP_EVERY_S = 5.0


class _Session:
    def __init__(self, sid: str, path: str, total: int, fmt: str, name: str):
        self.id = sid
        self.path = path
        self.total = total
        self.format = fmt
        self.name = name
        self.received = 0
        self.hash = hashlib.sha256()
        self.file: Optional[Any] = open(path, "wb")
        self.runtime: Any = None
        self.feeds: Optional[Dict[str, np.ndarray]] = None
        self.outputs: Optional[Dict[str, Any]] = None
        self.sampler: Optional[Sampler] = None
        self.target_s: list = []  # every PROCESS's inference time, s
        self.touched = time.monotonic()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.sampler is not None:
            self.sampler.stop()
        self.runtime = self.feeds = self.outputs = None
        try:
            os.unlink(self.path)
        except OSError:
            pass


class Target:
    """Serves the benchmark protocol on ``host:port`` (0 picks a free port;
    ``.port`` says which). Models are written under ``model_dir`` (a
    temporary folder, removed at ``stop()``, when None); at most
    ``max_sessions`` sessions are open at once (a session idle for
    ``SESSION_IDLE_S`` makes room for a new one).

    >>> target = Target(port=0).start()
    >>> target.port
    >>> target.stop()
    """

    def __init__(self, port: int = 6379, host: str = "0.0.0.0", *, model_dir: Optional[str] = None,
                 max_sessions: int = 4, max_model_bytes: int = MAX_MODEL_BYTES, sample_hz: float = P.SAMPLE_HZ,
                 session_idle_s: float = SESSION_IDLE_S, log=None, **server_kw):
        if isinstance(max_sessions, bool) or not isinstance(max_sessions, int) or max_sessions < 1:
            raise ValueError(f"max_sessions must be an int >= 1, got {max_sessions!r}")
        if not sample_hz > 0:
            raise ValueError(f"sample_hz must be > 0, got {sample_hz!r}")
        self._own_dir = model_dir is None
        if model_dir is None:
            model_dir = tempfile.mkdtemp(prefix="edgeml-serve-")
        else:
            os.makedirs(model_dir, exist_ok=True)
        self.model_dir = model_dir
        self.max_sessions = max_sessions
        self.max_model_bytes = int(max_model_bytes)
        self.sample_hz = float(sample_hz)
        self._log = log
        self._lock = threading.Lock()
        self._sessions: Dict[str, _Session] = {}
        self._stopped = False
        self.session_idle_s = float(session_idle_s)
        self._reap_stop = threading.Event()
        self.server = InferenceServer(port, host=host, **server_kw)
        handlers = {P.HELLO: self._hello, P.MODEL: self._model, P.DATA: self._data, P.PROCESS: self._process,
                    P.OUTPUT: self._output, P.STATS: self._stats, P.END: self._end}
        for name, fn in handlers.items():
            self.server.register_interface(name, self._guard(name, fn))

    # -------------------------------------------------------------- life

    def start(self, threaded: bool = True) -> "Target":
        """Serve; with ``threaded=False`` this call serves until ``stop()``."""
        self._reaper = threading.Thread(target=self._reap_loop, name="edgeml-bench-reaper", daemon=True)
        self._reaper.start()
        try:
            self.server.start(threaded=threaded)
        except BaseException:
            self.stop()  # the port was taken: nothing left behind (the temporary model folder)
            raise
        return self

    def _reap_loop(self) -> None:
        while not self._reap_stop.wait(min(REAP_EVERY_S, self.session_idle_s / 2)):
            self._reap()

    def _reap(self) -> None:
        """Close the sessions no call has touched for ``session_idle_s``
        (their host went away without END)."""
        now = time.monotonic()
        with self._lock:
            stale = [s for s in self._sessions.values() if now - s.touched > self.session_idle_s]
            for s in stale:
                del self._sessions[s.id]
        for s in stale:
            self._say(f"session {s.id}: closed after {self.session_idle_s:g} s without a call")
            s.close()

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self) -> None:
        """Stop serving, close every session, remove the models."""
        if self._stopped:
            return
        self._stopped = True
        self._reap_stop.set()
        try:
            self.server.stop()
        except Exception:  # never started (its port was taken): nothing to stop
            pass
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            s.close()
        if self._own_dir:
            shutil.rmtree(self.model_dir, ignore_errors=True)

    def __enter__(self) -> "Target":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _say(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)

    # -------------------------------------------------------------- helpers

    def _guard(self, name: str, fn):
        """A handler whose failures are ERROR replies, never a dead server."""
        def handler(payload):
            if payload is None:
                payload = {}
            if not isinstance(payload, dict):
                return P.error(f"{name}: the request must be a map, got {type(payload).__name__}")
            try:
                return fn(payload)
            except _Refused as e:
                return P.error(str(e))
            except Exception as e:  # a runtime or the machine failed: the host hears why
                return P.error(f"{name}: {type(e).__name__}: {e}")
        return handler

    def _session(self, payload: dict, loaded: bool = True) -> _Session:
        sid = payload.get("session")
        with self._lock:
            s = self._sessions.get(sid) if isinstance(sid, str) else None
        if s is None:
            raise _Refused(f"no session {sid!r} on this target (it ended, expired, or was never opened: "
                           f"send MODEL first)")
        if loaded and s.runtime is None:
            raise _Refused(f"session {sid}: the model is not loaded yet ({s.received} of {s.total} bytes received)")
        s.touched = time.monotonic()
        return s

    def _drop(self, s: _Session) -> None:
        with self._lock:
            self._sessions.pop(s.id, None)
        s.close()

    # -------------------------------------------------------------- messages

    def _hello(self, payload: dict) -> dict:
        return P.ok(protocol=P.PROTOCOL_VERSION, runtimes=runtimes.available(),
                    target={"host": socket.gethostname(), "platform": platform.platform(),
                            "machine": platform.machine(), "python": sys.version.split()[0],
                            "edgeml": __version__, "cpus": os.cpu_count() or 0})

    def _open(self, payload: dict) -> _Session:
        total, fmt, name = payload.get("total"), payload.get("format", "onnx"), payload.get("name", "model")
        if isinstance(total, bool) or not isinstance(total, int) or total < 1:
            raise _Refused(f"MODEL: total must be the model's size in bytes (an int >= 1), got {total!r}")
        if total > self.max_model_bytes:
            raise _Refused(f"MODEL: {total} bytes is over this target's limit of {self.max_model_bytes} bytes")
        if fmt not in runtimes.RUNTIMES:
            raise _Refused(f"MODEL: unknown format {fmt!r}: this target runs {sorted(runtimes.RUNTIMES)}")
        self._reap()
        with self._lock:
            full = len(self._sessions) >= self.max_sessions
        if full:
            raise _Refused(f"MODEL: the target is busy: {self.max_sessions} sessions are open (END yours, "
                           f"or start edgeml serve with a larger --max-sessions)")
        free = shutil.disk_usage(self.model_dir).free
        if total > free:
            raise _Refused(f"MODEL: {total} bytes do not fit in {self.model_dir} ({free} bytes free)")
        sid = uuid.uuid4().hex[:12]
        stem = os.path.splitext(os.path.basename(str(name)))[0]
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:64] or "model"
        s = _Session(sid, os.path.join(self.model_dir, f"{sid}-{safe}.{fmt}"), total, fmt, str(name))
        with self._lock:
            self._sessions[sid] = s
        self._say(f"session {sid}: receiving {name} ({total} bytes, {fmt})")
        return s

    def _model(self, payload: dict) -> dict:
        offset, chunk = payload.get("offset"), payload.get("chunk")
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise _Refused(f"MODEL: chunk must be bytes, got {type(chunk).__name__}")
        if offset == 0 and payload.get("session") is None:
            s = self._open(payload)
        else:
            s = self._session(payload, loaded=False)
            if s.runtime is not None:
                raise _Refused(f"session {s.id}: the model is already loaded")
        if offset != s.received:
            self._drop(s)
            raise _Refused(f"MODEL: chunk at offset {offset!r}, expected {s.received}; session {s.id} closed")
        n = len(chunk)
        if n == 0:
            self._drop(s)
            raise _Refused(f"MODEL: an empty chunk at {offset} of {s.total} bytes; session {s.id} closed")
        if n > P.CHUNK_BYTES or s.received + n > s.total:
            self._drop(s)
            raise _Refused(f"MODEL: chunk of {n} bytes at {offset} overruns the model's {s.total} bytes "
                           f"(or the {P.CHUNK_BYTES}-byte chunk limit); session {s.id} closed")
        try:
            s.file.write(chunk)
        except OSError as e:
            self._drop(s)
            raise _Refused(f"MODEL: cannot write the model on the target: {e}; session {s.id} closed") from None
        s.hash.update(chunk)
        s.received += n
        if s.received < s.total:
            return P.ok(session=s.id, received=s.received)
        s.file.close()
        s.file = None
        want = payload.get("sha256")
        got = s.hash.hexdigest()
        if want is not None and want != got:
            self._drop(s)
            raise _Refused(f"MODEL: the model arrived with sha256 {got}, the host sent {want}; session closed")
        t0 = time.perf_counter()
        try:
            s.runtime = runtimes.load(s.format, s.path)
        except Exception as e:
            self._drop(s)
            reason = str(e).strip() or type(e).__name__
            self._say(f"session {s.id}: {s.name} does not load: {reason}")
            raise _Refused(f"MODEL: {s.format} runtime cannot load {s.name!r}: {reason}") from None
        load_s = time.perf_counter() - t0
        try:
            s.sampler = Sampler(self.sample_hz).start()
        except Exception as e:
            self._drop(s)
            raise _Refused(f"MODEL: the target cannot sample its statistics: {type(e).__name__}: {e}") from None
        self._say(f"session {s.id}: loaded {s.name} in {load_s * 1e3:.1f} ms ({s.runtime.version})")
        return P.ok(session=s.id, received=s.received, inputs=s.runtime.inputs, outputs=s.runtime.outputs,
                    runtime=s.runtime.version, load_s=load_s, hz=self.sample_hz, gpu=s.sampler.gpu_reason or "",
                    gpus=s.sampler.gpu_names)

    def _data(self, payload: dict) -> dict:
        s = self._session(payload)
        feeds = payload.get("inputs")
        why = runtimes.check_feeds(s.runtime.inputs, feeds)
        if why:
            raise _Refused(f"DATA: {why}")
        s.feeds, s.outputs = feeds, None
        return P.ok()

    def _process(self, payload: dict) -> dict:
        s = self._session(payload)
        if s.feeds is None:
            raise _Refused(f"PROCESS: session {s.id} has no data: send DATA first")
        ts = time.time_ns()
        t0 = time.perf_counter_ns()
        out = s.runtime.run(s.feeds)
        dt = (time.perf_counter_ns() - t0) / 1e9
        s.outputs = out
        s.target_s.append(dt)
        return P.ok(target_s=dt, timestamp_ns=ts)

    def _output(self, payload: dict) -> dict:
        s = self._session(payload)
        if s.outputs is None:
            raise _Refused(f"OUTPUT: session {s.id} has no outputs: send PROCESS first")
        out = {}
        for k, v in s.outputs.items():
            if isinstance(v, np.ndarray):
                out[k] = v
            elif isinstance(v, list):  # sequence outputs (sklearn's ZipMap): sent as a list of maps
                out[k] = [{str(a): float(b) for a, b in m.items()} if isinstance(m, dict) else m for m in v]
            else:
                out[k] = v
        return P.ok(outputs=out)

    def _stats_of(self, s: _Session, payload: dict) -> dict:
        since = payload.get("since", 0)
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            raise _Refused(f"STATS: since must be an int >= 0, got {since!r}")
        if s.sampler is None:  # a session whose model never loaded
            return P.ok(samples={}, next=0, gpu="", sampling_error="", hz=self.sample_hz, inferences=0)
        # the host has what came before `since`: the target forgets it (a long run stays small here)
        samples, nxt = s.sampler.since(since, forget_before=True)
        return P.ok(samples=samples, next=nxt, gpu=s.sampler.gpu_reason or "", sampling_error=s.sampler.error,
                    hz=self.sample_hz, inferences=len(s.target_s))

    def _stats(self, payload: dict) -> dict:
        return self._stats_of(self._session(payload), payload)

    def _end(self, payload: dict) -> dict:
        s = self._session(payload, loaded=False)  # a half-uploaded session ends too
        if s.sampler is not None:
            s.sampler.stop()
        reply = self._stats_of(s, payload)
        reply[P.K_TARGET_STEP] = list(s.target_s)
        self._drop(s)
        self._say(f"session {s.id}: ended after {len(s.target_s)} inferences")
        return reply


class _Refused(Exception):
    """A request the target answers with ERROR and this reason."""


def serve(port: int = 6379, host: str = "0.0.0.0", threaded: bool = False, **kw) -> Target:
    """Serve the benchmark protocol (``edgeml serve``); with
    ``threaded=True`` returns the running ``Target`` at once."""
    return Target(port, host, **kw).start(threaded=threaded)
