"""``edgeml profile``: where every millisecond between a sensor and a
prediction goes, measured in edgeml's own wire (docs/profile.md).

A *sensor* is anything with ``sample()``; a *model* is anything with
``infer(x)`` and optionally ``preprocess(x)`` and ``postprocess(y)``. Both
can be given as ``module::object`` (or ``path/to/file.py::object``); a class
is instantiated without arguments. Built in: sensors ``random_image:HxWxC``
and ``random_bytes:N``, models ``echo`` and ``sleep:MS``.

>>> server = serve("mypkg.models::Detector", port=6379, threaded=True)  # GPU side
>>> result = run("gpu-host", 6379, "random_image:224x224x3", iterations=200)  # device side
>>> result.write("profile-out")   # profile.json, samples.csv, stages.png, timeline.png
>>> print(result.table())

Inside a model, ``@stage("backbone")`` (or ``with stage("backbone"):``)
times a part of ``infer``; those stages are reported per call next to the
wire's stages.
"""
from __future__ import annotations

import base64
import contextlib
import csv
import functools
import html
import importlib
import importlib.util
import io
import json
import math
import os
import platform
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional

import numpy as np

from . import errors
from .inference import InferenceClient, InferenceServer
from .timing import BASIS_ESTIMATED, BASIS_SYNCHRONIZED

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INTERFACE = "profile.infer"
INFO = "profile.info"

# Stages of one sample, in the order they happen (model stages go between
# queue and reply, inside "handler").
WIRE_STAGES = ("sense", "encode", "upload", "queue", "handler", "reply", "download", "decode")


# ------------------------------------------------------------------ stages

_rec = threading.local()


@contextlib.contextmanager
def record() -> Iterator[Dict[str, float]]:
    """Collect the ``stage`` timings made on this thread inside the block
    into the yielded dict (name -> ms; repeated names add up)."""
    prev = getattr(_rec, "stages", None)
    stages: Dict[str, float] = {}
    _rec.stages = stages
    try:
        yield stages
    finally:
        _rec.stages = prev


class stage:
    """Time a part of a model, as a decorator (``@stage("backbone")``) or a
    context manager (``with stage("nms"):``). Outside ``record()`` (and so
    outside a profile run) it only costs two clock reads."""

    def __init__(self, name: str):
        if not isinstance(name, str) or not name:
            raise ValueError(f"stage name must be a non-empty str, got {name!r}")
        self.name = name

    def __enter__(self) -> "stage":
        stages = getattr(_rec, "stages", None)
        if stages is not None:
            stages.setdefault(self.name, 0.0)  # report stages in the order they start
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        stages = getattr(_rec, "stages", None)
        if stages is not None:
            ms = (time.perf_counter() - self._t0) * 1e3
            stages[self.name] = stages.get(self.name, 0.0) + ms

    def __call__(self, fn: Callable) -> Callable:
        name = self.name

        @functools.wraps(fn)
        def timed(*args, **kw):
            with stage(name):
                return fn(*args, **kw)

        return timed


# ----------------------------------------------------------------- plugins

class RandomImage:
    """A camera stand-in: a fresh random uint8 image per sample."""

    def __init__(self, shape=(224, 224, 3)):
        self.shape = tuple(int(x) for x in shape)
        if not self.shape or any(x <= 0 for x in self.shape):
            raise ValueError(f"image shape must be positive, got {shape!r}")
        self._rng = np.random.default_rng(0)

    def sample(self) -> np.ndarray:
        return self._rng.integers(0, 256, self.shape, dtype=np.uint8)

    def __repr__(self) -> str:
        return f"random_image:{'x'.join(map(str, self.shape))}"


class RandomBytes:
    """``n`` random bytes per sample."""

    def __init__(self, n: int = 1024):
        self.n = int(n)
        if self.n < 0:
            raise ValueError(f"byte count must be >= 0, got {n!r}")

    def sample(self) -> bytes:
        return os.urandom(self.n)

    def __repr__(self) -> str:
        return f"random_bytes:{self.n}"


class Echo:
    """A model that returns its input."""

    def infer(self, x):
        return x

    def __repr__(self) -> str:
        return "echo"


class Sleep:
    """A model that takes ``ms`` milliseconds and returns nothing."""

    def __init__(self, ms: float = 5.0):
        self.ms = float(ms)

    def infer(self, x):
        time.sleep(self.ms / 1e3)
        return None

    def __repr__(self) -> str:
        return f"sleep:{self.ms:g}"


def _dims(text: str, spec: str) -> List[int]:
    try:
        return [int(p) for p in text.lower().split("x")]
    except ValueError:
        raise ValueError(f"{spec!r}: expected sizes like 224x224x3") from None


def load_object(spec: Any, kind: str = "object") -> Any:
    """The object a spec names: ``module::attr``, ``path/file.py::attr``,
    or (for sensors and models) a built-in name. A class is instantiated;
    anything else is returned as it is."""
    if not isinstance(spec, str):
        return spec
    name, _, arg = spec.partition(":")
    if "::" not in spec:
        if kind == "sensor" and name == "random_image":
            return RandomImage(_dims(arg, spec) if arg else (224, 224, 3))
        if kind == "sensor" and name == "random_bytes":
            return RandomBytes(int(arg) if arg else 1024)
        if kind == "model" and name == "echo" and not arg:
            return Echo()
        if kind == "model" and name == "sleep":
            return Sleep(float(arg) if arg else 5.0)
        builtins = {"sensor": "random_image:HxWxC, random_bytes:N", "model": "echo, sleep:MS"}.get(kind, "none")
        raise ValueError(f"unknown {kind} {spec!r}: give module::object or path/file.py::object "
                         f"(built in: {builtins})")
    mod_name, _, attr = spec.rpartition("::")
    if not mod_name or not attr:
        raise ValueError(f"{kind} {spec!r}: expected module::object")
    if mod_name.endswith(".py") or os.sep in mod_name:
        path = os.path.abspath(mod_name)
        if not os.path.exists(path):
            raise ValueError(f"{kind} {spec!r}: no file {path}")
        mspec = importlib.util.spec_from_file_location(f"edgeml_plugin_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_name)
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{kind} {spec!r}: {mod_name} has no attribute {attr!r}") from None
    return obj() if isinstance(obj, type) else obj


def _check(obj: Any, kind: str, method: str) -> None:
    if not callable(getattr(obj, method, None)):
        raise TypeError(f"{kind} {obj!r} has no {method}() method")


# ------------------------------------------------------------------ server

def serve(model: Any = "echo", port: int = 6379, host: str = "0.0.0.0", threaded: bool = False,
          **server_kw) -> InferenceServer:
    """Serve ``model`` for ``run``: ``preprocess`` → ``infer`` →
    ``postprocess``, each timed, plus the model's own ``stage`` timings."""
    model = load_object(model, "model")
    _check(model, "model", "infer")
    pre = getattr(model, "preprocess", None)
    post = getattr(model, "postprocess", None)

    def infer(payload):
        x = payload["x"] if isinstance(payload, dict) else payload
        with record() as stages:
            if pre is not None:
                with stage("preprocess"):
                    x = pre(x)
            with stage("infer"):
                y = model.infer(x)
            if post is not None:
                with stage("postprocess"):
                    y = post(y)
        return {"y": y, "stages": stages}

    info = {"model": repr(model), "python": sys.version.split()[0], "host": socket.gethostname(),
            "platform": platform.platform()}
    server = InferenceServer(port, host=host, **server_kw)
    server.register_interface(INTERFACE, infer)
    server.register_interface(INFO, lambda _: info)
    server.start(threaded=threaded)
    return server


# ------------------------------------------------------------------ client

def _summary(values: List[float]) -> Dict[str, float]:
    v = sorted(values)
    n = len(v)
    if not n:
        return {"count": 0}

    def rank(q: float) -> float:
        return v[max(1, math.ceil(q * n)) - 1]

    return {"count": n, "mean": sum(v) / n, "p50": rank(0.5), "p90": rank(0.9), "p99": rank(0.99),
            "min": v[0], "max": v[-1]}


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (its stderr is no terminal, but
    a progress bar is wanted there)."""
    ipython = sys.modules.get("IPython")
    try:
        shell = ipython.get_ipython() if ipython is not None else None
    except Exception:  # pragma: no cover - a broken IPython
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _importable(name: str) -> bool:
    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


class Progress:
    """Progress of a run: a tqdm bar on a terminal and in a notebook
    (``tqdm.auto``'s widget there where ipywidgets is installed, tqdm's text
    bar where not), a line per 10% otherwise (logs, CI) and where tqdm is
    not installed."""

    def __init__(self, total: int, label: str, stream=None, enabled: bool = True):
        self.total, self.label = max(1, total), label
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self._last_decile = -1
        self._done = 0
        self.bar = None
        notebook = enabled and stream is None and _in_notebook()
        tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        if notebook or tty:
            widget = notebook and _importable("ipywidgets")
            try:
                if widget:
                    from tqdm.auto import tqdm
                else:  # a terminal, or a notebook without ipywidgets: tqdm's text bar
                    from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                kw = {} if widget else {"file": self.stream}
                self.bar = tqdm(total=self.total, desc=label, unit="call", mininterval=0.1, dynamic_ncols=True,
                                **kw)

    def update(self, done: int, note: str = "") -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(done - self._done)
            self._done = done
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            return
        frac = min(1.0, done / self.total)
        decile = int(frac * 10)
        if decile == self._last_decile:
            return
        self._last_decile = decile
        self.stream.write(f"{self.label}: {done}/{self.total} ({frac:.0%}) {note}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class ProfileResult:
    """Every sample of a run (dicts of ms and bytes) and their summary."""

    def __init__(self, samples: List[dict], meta: dict):
        self.samples = samples
        self.meta = meta

    @property
    def ok_samples(self) -> List[dict]:
        return [s for s in self.samples if "error" not in s]

    @property
    def stages(self) -> List[str]:
        """Stage names in the order of a call, model stages inside."""
        model: List[str] = []
        for s in self.ok_samples:
            for k in s.get("model_stages", {}):
                if k not in model:
                    model.append(k)
        i = WIRE_STAGES.index("handler") + 1
        return list(WIRE_STAGES[:i]) + model + list(WIRE_STAGES[i:]) + ["rtt", "total"]

    def values(self, name: str) -> List[float]:
        out = []
        for s in self.ok_samples:
            v = s.get(f"{name}_ms", s.get("model_stages", {}).get(name))
            if v is not None:
                out.append(v)
        return out

    def summary(self) -> dict:
        ok = self.ok_samples
        stages = {name: _summary(self.values(name)) for name in self.stages}
        up = [s["bytes_up"] for s in ok]
        down = [s["bytes_down"] for s in ok]
        return {
            "samples": len(self.samples),
            "errors": len(self.samples) - len(ok),
            "stages_ms": stages,
            "bytes_up": _summary(up),
            "bytes_down": _summary(down),
            "throughput_mbit_s": {
                "upload": _summary([s["bytes_up"] * 8 / (s["upload_ms"] * 1e3) for s in ok if s["upload_ms"] > 0]),
                "download": _summary([s["bytes_down"] * 8 / (s["download_ms"] * 1e3)
                                      for s in ok if s["download_ms"] > 0]),
            },
            "one_way_basis": self.meta.get("one_way_basis"),
            "achieved_rate_hz": self.meta.get("achieved_rate_hz"),
        }

    def table(self) -> str:
        s = self.summary()
        lines = [f"{'stage':<14}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}{'max ms':>10}{'mean ms':>10}"]
        for name, st in s["stages_ms"].items():
            if not st.get("count"):
                continue
            lines.append(f"{name:<14}" + "".join(f"{st[k]:>10.3f}" for k in ("p50", "p90", "p99", "max", "mean")))
        up, down = s["bytes_up"], s["bytes_down"]
        if up.get("count"):
            lines.append(f"bytes up p50 {up['p50']:,.0f}, down p50 {down['p50']:,.0f} (frames on the wire)")
        lines.append(f"upload/download: {s['one_way_basis']}")
        lines.append(f"{s['samples']} samples, {s['errors']} errors")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"meta": self.meta, "summary": self.summary(), "samples": self.samples}

    def write(self, out_dir: str, plots: bool = True) -> Dict[str, str]:
        """Write profile.json, samples.csv and (with matplotlib) stages.png
        and timeline.png into out_dir; returns name -> path."""
        os.makedirs(out_dir, exist_ok=True)
        paths = {"json": os.path.join(out_dir, "profile.json"), "csv": os.path.join(out_dir, "samples.csv")}
        with open(paths["json"], "w") as f:
            json.dump(self.to_json(), f, indent=1)
        cols = ["i", "wall_ns", "error"] + [f"{n}_ms" for n in self.stages] + ["bytes_up", "bytes_down",
                                                                              "offset_ms", "offset_error_ms"]
        with open(paths["csv"], "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for s in self.samples:
                row = []
                for c in cols:
                    name = c[:-3] if c.endswith("_ms") else None
                    v = s.get(c)
                    if v is None and name is not None:
                        v = s.get("model_stages", {}).get(name)
                    row.append("" if v is None else v)
                w.writerow(row)
        if plots:
            paths.update(self._plots(out_dir))
        return paths

    def _plots(self, out_dir: str) -> Dict[str, str]:
        paths = {}
        for name, fig in self.figures().items():
            paths[f"{name}_png"] = os.path.join(out_dir, f"{name}.png")
            fig.savefig(paths[f"{name}_png"], dpi=110)
        return paths

    def figures(self) -> Dict[str, "Figure"]:
        """The two plots as matplotlib figures: ``"stages"`` (a CDF per
        stage) and ``"timeline"`` (each call's time, stage by stage). They
        are drawn without pyplot, so the backend you chose is left alone,
        and each shows inline when it is a notebook cell's value."""
        return {"stages": self.stages_figure(), "timeline": self.timeline_figure()}

    def stages_figure(self) -> "Figure":
        """The CDF of every stage's time, log scale."""
        fig = _figure(figsize=(9, 5.5))
        ax = fig.add_subplot()
        for name in self.stages:
            v = np.sort(np.asarray(self.values(name), dtype=float))
            v = v[v > 0]
            if len(v) == 0:
                continue
            ax.step(v, np.arange(1, len(v) + 1) / len(v), where="post", label=name,
                    linewidth=2.2 if name in ("rtt", "total") else 1.2)
        ax.set_xscale("log")
        ax.set_xlabel("ms (log scale)")
        ax.set_ylabel("fraction of calls ≤ x")
        ax.set_title(f"edgeml profile: stage CDFs ({len(self.ok_samples)} calls)\n"
                     f"upload/download: {self.meta.get('one_way_basis')}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        return fig

    def timeline_figure(self) -> "Figure":
        """Each call's time as a stacked bar, stage by stage."""
        ok = self.ok_samples
        fig = _figure(figsize=(10, 5))
        ax = fig.add_subplot()
        x = np.array([s["i"] for s in ok])
        bottom = np.zeros(len(ok))
        seq = [n for n in self.stages if n not in ("rtt", "total", "handler")]
        model = [n for n in seq if n not in WIRE_STAGES]
        for name in seq:
            if name in model:
                y = np.array([s.get("model_stages", {}).get(name, 0.0) for s in ok])
            else:
                y = np.array([max(0.0, s.get(f"{name}_ms", 0.0)) for s in ok])
            ax.bar(x, y, bottom=bottom, width=1.0, label=name, linewidth=0)
            bottom += y
        other = np.array([max(0.0, s["handler_ms"] - sum(s.get("model_stages", {}).values())) for s in ok])
        ax.bar(x, other, bottom=bottom, width=1.0, label="handler (other)", linewidth=0, color="lightgray")
        ax.set_xlabel("call")
        ax.set_ylabel("ms")
        ax.set_title("edgeml profile: where each call's time went", fontsize=10)
        ax.legend(fontsize=8, ncol=2, loc="upper right")
        fig.tight_layout()
        return fig

    def _repr_html_(self) -> str:
        """A notebook shows a run as its stage table and the stage CDFs."""
        s = self.summary()
        esc = html.escape
        head = "".join(f"<th>{h}</th>" for h in ("stage", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms",
                                                 "count"))
        rows = []
        for name, st in s["stages_ms"].items():
            if not st.get("count"):
                continue
            bold = name in ("rtt", "total")
            cells = "".join(f"<td>{st[k]:.3f}</td>" for k in ("p50", "p90", "p99", "max", "mean"))
            label = f"<b>{esc(name)}</b>" if bold else esc(name)
            rows.append(f"<tr><td style='text-align:left'>{label}</td>{cells}<td>{st['count']}</td></tr>")
        notes = []
        up, down = s["bytes_up"], s["bytes_down"]
        if up.get("count"):
            notes.append(f"bytes up p50 {up['p50']:,.0f}, down p50 {down['p50']:,.0f} (frames on the wire)")
        notes.append(f"upload/download: {esc(str(s['one_way_basis']))}")
        rate = s.get("achieved_rate_hz")
        notes.append(f"{s['samples']} samples, {s['errors']} errors"
                     + (f", {rate:.1f} calls/s" if rate else ""))
        title = esc(f"edgeml profile: {self.meta.get('sensor', '?')} → {self.meta.get('host', '?')}:"
                    f"{self.meta.get('port', '?')}")
        out = [f"<div><b>{title}</b>", f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}"
               "</tbody></table>", "<br>".join(notes)]
        if self.ok_samples:
            try:
                png = _png(self.stages_figure(), dpi=80)
            except RuntimeError:  # no matplotlib: the table alone
                png = None
            if png is not None:
                out.append(f"<br><img src='data:image/png;base64,{base64.b64encode(png).decode()}' "
                           "alt='stage CDFs'>")
        out.append("</div>")
        return "\n".join(out)

    def __repr__(self) -> str:
        return (f"<ProfileResult {len(self.samples)} samples, {self.summary()['errors']} errors; "
                f".table(), .figures(), .write(dir)>")


def _figure(**kw) -> "Figure":
    """A matplotlib figure on its own Agg canvas: never through pyplot, so
    the user's backend and pyplot's figure list stay as they were."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise RuntimeError("plots need matplotlib: pip install matplotlib (or, from the edgeml checkout, "
                           "pip install -e \".[profile]\"), or pass plots=False / --no-plots") from e

    global _InlineFigure
    if _InlineFigure is None:
        class InlineFigure(Figure):
            """A Figure that a notebook shows inline as a PNG."""

            def _repr_png_(self) -> bytes:
                return _png(self)

        _InlineFigure = InlineFigure
    fig = _InlineFigure(**kw)
    FigureCanvasAgg(fig)
    return fig


_InlineFigure: Any = None


def _png(fig, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def run(host: str, port: int, sensor: Any = "random_image:224x224x3", iterations: int = 100, warmup: int = 10,
        rate: Optional[float] = None, clocks_synchronized: bool = False, timeout: float = 30.0,
        progress: bool = True, client: Optional[InferenceClient] = None) -> ProfileResult:
    """Sample ``sensor``, send it to a ``serve``d model, and time every
    stage of ``iterations`` calls (after ``warmup`` untimed ones), at most
    ``rate`` calls per second if given."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if rate is not None and not rate > 0:
        raise ValueError(f"rate must be > 0 calls/s, got {rate}")
    sensor = load_object(sensor, "sensor")
    _check(sensor, "sensor", "sample")
    own = client is None
    if own:
        client = InferenceClient(host, port, timeout=timeout, clocks_synchronized=clocks_synchronized)
    bar = None
    try:
        try:
            server_info = client.call(INFO, None)
        except errors.UnknownInterfaceError:
            raise errors.EdgeMLError(f"{host}:{port} is an edgeml server but not a profile server "
                                     f"(start one with `edgeml profile server`)") from None
        for _ in range(warmup):
            client.call(INTERFACE, {"x": sensor.sample()})
        client.sync_clock(8)
        bar = Progress(iterations, "profile", enabled=progress)
        samples: List[dict] = []
        period = 1.0 / rate if rate else 0.0
        start = time.monotonic()
        late = 0
        rtts: List[float] = []
        first_start = last_start = start
        for i in range(iterations):
            if period:
                due = start + i * period
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                elif wait < -period:
                    late += 1
            wall = time.time_ns()
            last_start = time.monotonic()
            if i == 0:
                first_start = last_start
            t_sense = time.perf_counter()
            x = sensor.sample()
            sense_ms = (time.perf_counter() - t_sense) * 1e3
            try:
                reply, t = client.call_timed(INTERFACE, {"x": x})
            except errors.EdgeMLError as e:
                samples.append({"i": i, "wall_ns": wall, "error": f"{type(e).__name__}: {e}"})
                bar.update(i + 1, "error")
                continue
            s = {"i": i, "wall_ns": wall, "sense_ms": sense_ms}
            s.update({k: v for k, v in t.as_dict().items() if k.endswith("_ms") or k.startswith("bytes")})
            s["total_ms"] = sense_ms + t.encode_ms + t.rtt_ms + t.decode_ms
            s["model_stages"] = dict(reply.get("stages") or {}) if isinstance(reply, dict) else {}
            samples.append(s)
            rtts.append(t.rtt_ms)
            bar.update(i + 1, f"rtt p50 {sorted(rtts)[len(rtts) // 2]:.2f} ms")
        span = last_start - first_start  # call starts: the rate the run kept
        clock = client.stats()["clock"]
        meta = {
            "host": host, "port": port, "sensor": repr(sensor), "server": server_info,
            "iterations": iterations, "warmup": warmup, "rate_hz": rate,
            "achieved_rate_hz": (iterations - 1) / span if span > 0 else None, "late_calls": late,
            "one_way_basis": BASIS_SYNCHRONIZED if clocks_synchronized else BASIS_ESTIMATED,
            "clock": clock, "started_ns": samples[0]["wall_ns"] if samples else None,
            "client_host": socket.gethostname(), "python": sys.version.split()[0],
        }
        return ProfileResult(samples, meta)
    finally:
        if bar is not None:
            bar.close()
        if own:
            client.close()
