"""Split inference between a device and a server (docs/offload.md).

The server (``OffloadServer``, ``edgeml offload serve``) holds the model
and serves:

========================= ============================================ ======================================
interface                 request                                      reply
========================= ============================================ ======================================
``offload.info``          ``None``                                     ``{"sha256", "kind", "n", "layers",
                                                                       "cuts"}``
``offload.profile``       ``{"x": input, "runs", "warmup",             the server's ``Profile`` (JSON)
                          "interval_s"}``
``offload.run``           ``{"p": split, "x": activation at cut p}``   ``{"y": the model's outputs}``
``offload.sink``          ``{"b": bytes}``                             ``None`` (link probes)
``offload.source``        ``{"n": int}``                               ``{"b": n bytes}`` (link probes)
========================= ============================================ ======================================

The device (``OffloadClient``) holds the same model (the sha256 must
match), profiles its side and the server's, measures the link, plans, and
runs ``infer(x)``: layers [0, p) here, [p, n) there. It re-measures the
link every ``replan_s`` seconds, and sooner when calls take longer or
shorter on the wire than the plan says, and re-plans when the link changed.
"""
from __future__ import annotations

import random
import threading
import time
from typing import Any, Dict, List, Optional

import numpy as np

from .. import _core, errors
from ..inference import InferenceClient, InferenceServer
from . import link as L
from .model import SplitModel, load
from .plan import Link, Plan, Profile

INFO = "offload.info"
PROFILE = "offload.profile"
RUN = "offload.run"


def idle(interval_s: float) -> None:
    """Sleep about ``interval_s``: a random 0.5x to 1.5x of it, so that a
    steady cadence cannot lock onto a period of the machine's (a CPU
    quota's, a timer tick's) and see only one phase of it."""
    if interval_s > 0:
        time.sleep(interval_s * random.uniform(0.5, 1.5))


def profile(model: SplitModel, x: Any, runs: int = 20, warmup: int = 3, interval_s: float = 0.0,
            where: str = "", raw: bool = False) -> Any:
    """Run every layer of ``model`` on ``x``, one after the other, ``warmup
    + runs`` times (about ``interval_s`` idle before each, as between a
    camera's frames: ``idle``); the medians over the runs of every prefix, suffix and layer
    (with ``raw``, the runs' times at every cut instead)."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    marks = []
    for r in range(warmup + runs):
        idle(interval_s)
        _, _, m = model.timed_run(x)
        if r >= warmup:
            marks.append(m)
    m = np.asarray(marks)  # runs x (n + 1), seconds since the run's start at each cut
    return m if raw else _from_marks(m, where, interval_s)


def _from_marks(m: np.ndarray, where: str, interval_s: float) -> Profile:
    runs = len(m)
    total = m[:, -1:]
    prefix = np.median(m, axis=0)
    suffix = np.median(total - m, axis=0)
    layer = np.median(np.diff(m, axis=1), axis=0)
    prefix[0], suffix[-1] = 0.0, 0.0
    return Profile(prefix.tolist(), suffix.tolist(), layer.tolist(), runs, where, interval_s)


def cut_bytes(model: SplitModel, x: Any) -> tuple:
    """The frames edgeml sends for each cut: ``up[p]`` the request of
    split p (the activation at cut p, with its envelope), ``down`` the
    reply (the outputs); measured by encoding them."""
    _, acts, _ = model.timed_run(x)
    up = [len(_core.encode_frame([RUN, {"p": p, "x": acts[p]}], _core.MSG_REQUEST)) for p in range(model.n)]
    down = len(_core.encode_frame({"y": acts[model.n]}, _core.MSG_REPLY))
    return up, down, acts


def _cut_names(model: SplitModel) -> List[str]:
    names = getattr(model, "cut_tensors", None)
    if names is None:
        return ["input"] + [f"after {n}" for n in model.layer_names]
    return [",".join(c) if isinstance(c, list) else str(c) for c in names]


class OffloadServer:
    """Serves the server's part of split inference for ``model`` (a path,
    an ``nn.Sequential``, a ``SplitModel``, ``module::object``).

    >>> server = OffloadServer("cnn.onnx", port=6380).start()
    """

    def __init__(self, model: Any, port: int = 6380, host: str = "0.0.0.0", threads: int = 1, **server_kw):
        self.model = load(model, threads=threads)
        self.server = InferenceServer(port, host=host, **server_kw)
        m = self.model
        info = {"sha256": m.sha256, "kind": m.kind, "n": m.n, "layers": list(m.layer_names), "cuts": _cut_names(m)}
        self.server.register_interface(INFO, lambda _: info)
        self.server.register_interface(PROFILE, self._profile)
        self.server.register_interface(RUN, self._run)
        L.serve_probes(self.server)
        self.calls = 0

    def _profile(self, p: Any) -> dict:
        if not isinstance(p, dict) or "x" not in p:
            raise ValueError(f"{PROFILE}: send {{'x': the model's input, 'runs': N}}")
        runs, warmup, interval = p.get("runs", 20), p.get("warmup", 3), p.get("interval_s", 0.0)
        if isinstance(runs, bool) or not isinstance(runs, int) or not 1 <= runs <= 1000:
            raise ValueError(f"{PROFILE}: runs must be an int in 1..1000, got {runs!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or not 0 <= warmup <= 100:
            raise ValueError(f"{PROFILE}: warmup must be an int in 0..100, got {warmup!r}")
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0 <= interval <= 1.0:
            raise ValueError(f"{PROFILE}: interval_s must be a number of seconds in 0..1, got {interval!r}")
        why = self.model.check_cut(0, p["x"])
        if why:
            raise ValueError(f"{PROFILE}: {why}")
        return profile(self.model, p["x"], runs, int(warmup), float(interval), where="server").to_json()

    def _run(self, p: Any) -> dict:
        if not isinstance(p, dict) or "p" not in p or "x" not in p:
            raise ValueError(f"{RUN}: send {{'p': split, 'x': the activation at cut p}}")
        why = self.model.check_cut(p["p"], p["x"])
        if why:
            raise ValueError(f"{RUN}: {why}")
        self.calls += 1
        return {"y": self.model.run(p["x"], p["p"])}

    def start(self, threaded: bool = True) -> "OffloadServer":
        self.server.start(threaded=threaded)
        return self

    @property
    def port(self) -> int:
        return self.server.port

    def stop(self) -> None:
        self.server.stop()

    def __enter__(self) -> "OffloadServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(model: Any, port: int = 6380, host: str = "0.0.0.0", threaded: bool = False, **kw) -> OffloadServer:
    return OffloadServer(model, port, host, **kw).start(threaded=threaded)


class OffloadClient:
    """The device's side: ``OffloadClient("server:6380", "cnn.onnx")``,
    ``plan(x)``, then ``infer(x)`` as often as needed.

    ``runs``/``interval_s`` are the profile's (``interval_s``: the idle
    time before each run; use the time between your inferences, so that a
    CPU quota or a clock that drops when idle is profiled as it will run).
    ``replan_s``: the link is measured again this often (None: only when
    calls stray from the plan); ``watch``: re-measure when the last calls'
    time on the wire strays more than ``tolerance`` from the plan's."""

    def __init__(self, server: Any, model: Any, *, runs: int = 20, warmup: int = 3, interval_s: float = 0.0,
                 replan_s: Optional[float] = 30.0, watch: bool = True, tolerance: float = 0.3,
                 timeout: Optional[float] = 60.0, threads: int = 1, token: Optional[str] = None, log=None):
        from ..bench.host import parse_target
        self.host, self.port = parse_target(server)
        self.model = load(model, threads=threads)
        self.runs, self.warmup, self.interval_s = runs, warmup, interval_s
        self.replan_s, self.watch, self.tolerance = replan_s, watch, tolerance
        self.timeout = timeout
        self._log = log
        self.client = InferenceClient(self.host, self.port, timeout=timeout, token=token)
        try:
            info = self.client.call(INFO, None)
        except errors.UnknownInterfaceError:
            self.client.close()
            raise ValueError(f"{self.host}:{self.port} serves edgeml but not split inference: is it "
                             f"edgeml offload serve?") from None
        except BaseException:
            self.client.close()
            raise
        if info["sha256"] != self.model.sha256:
            self.client.close()
            raise ValueError(f"the server at {self.host}:{self.port} holds another model (sha256 "
                             f"{info['sha256'][:16]}…, this one {self.model.sha256[:16]}…): both sides must load "
                             f"the same model")
        if info["n"] != self.model.n:
            self.client.close()
            raise ValueError(f"the server cut the model into {info['n']} layers, this device into {self.model.n}")
        self.server_info = info
        self.plan: Optional[Plan] = None
        self.replans: List[dict] = []  # every re-plan: when, why, the old and new split, the link
        self._last_probe = 0.0
        self._wire: List[float] = []  # measured / predicted time on the wire of the last calls
        self._backoff, self._quiet = 5, 0  # calls to skip watching after a re-measure that changed nothing
        self._lock = threading.Lock()
        self.last: Dict[str, Any] = {}

    def _say(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)

    # -------------------------------------------------------------- planning

    def measure_link(self) -> Link:
        self._last_probe = time.monotonic()
        return L.measure(self.client, timeout=self.timeout, gap_s=self.interval_s)

    def make_plan(self, x: Any) -> Plan:
        """Profile both sides on ``x``, measure the link, plan."""
        if isinstance(self.runs, bool) or not isinstance(self.runs, int) or self.runs < 1:
            raise ValueError(f"runs must be an int >= 1, got {self.runs!r}")
        why = self.model.check_cut(0, x)
        if why:
            raise ValueError(f"the input does not fit the model: {why}")
        # the device's runs in two halves, before and after the rest: a slow spell of this machine's is
        # half the runs at most, and the medians see past it
        first = (self.runs + 1) // 2
        self._say(f"profiling this device ({self.runs} runs of {self.model.n} layers, in two halves)")
        dev_a = profile(self.model, x, first, self.warmup, self.interval_s, where="device", raw=True)
        self._say("profiling the server")
        srv = Profile.from_json(self.client.call(PROFILE, {"x": x, "runs": self.runs, "warmup": self.warmup,
                                                           "interval_s": self.interval_s},
                                                 timeout=None if self.timeout is None else self.timeout * 10))
        up, down, _ = cut_bytes(self.model, x)
        self._say("measuring the link")
        link = self.measure_link()
        dev_b = profile(self.model, x, max(1, self.runs - first), 1, self.interval_s, where="device", raw=True)
        dev = _from_marks(np.concatenate([dev_a, dev_b]), "device", self.interval_s)
        self.plan = Plan(dev, srv, up, down, link, _cut_names(self.model), list(self.model.layer_names))
        self._say(f"plan: split p={self.plan.split} ({self.plan.best.scenario}), "
                  f"{self.plan.best.total_s * 1e3:.2f} ms predicted")
        return self.plan

    def replan(self, reason: str = "asked") -> Plan:
        """Measure the link again; a new plan when it changed (else the
        same one)."""
        if self.plan is None:
            raise RuntimeError("no plan yet: call make_plan(x) first")
        link = self.measure_link()
        old = self.plan
        changed = old.link.changed(link, self.tolerance)
        if changed:
            self.plan = old.with_link(link)
        self.replans.append({"time": time.time(), "reason": reason, "changed": changed, "old_split": old.split,
                             "new_split": self.plan.split, "link": link.to_json()})
        self._wire.clear()
        if changed:
            self._say(f"re-plan ({reason}): {link!r}: split p={old.split} -> p={self.plan.split}")
        return self.plan

    # -------------------------------------------------------------- inference

    def infer(self, x: Any, split: Optional[int] = None) -> Any:
        """The model's outputs for ``x``: layers [0, p) here, [p, n) on the
        server (``split`` p, or the plan's). ``last`` says where the time
        went (device_s, call_s, handler_s, wire_s, total_s)."""
        if split is None:
            if self.plan is None:
                self.make_plan(x)
            self._maybe_replan()
            p = self.plan.split
        else:
            p = split
            if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= self.model.n:
                raise ValueError(f"split must be an int in 0..{self.model.n}, got {p!r}")
        t0 = time.perf_counter()
        act = self.model.run(x, 0, p)
        t1 = time.perf_counter()
        if p == self.model.n:
            self.last = {"p": p, "device_s": t1 - t0, "call_s": 0.0, "handler_s": 0.0, "wire_s": 0.0,
                         "total_s": t1 - t0, "up_bytes": 0, "down_bytes": 0}
            return act
        reply, t = self.client.call_timed(RUN, {"p": p, "x": act})
        t2 = time.perf_counter()
        wire = L._transfer_s(t)  # upload + download, as the link's probes measure it
        self.last = {"p": p, "device_s": t1 - t0, "call_s": t2 - t1, "handler_s": t.handler_ms / 1e3,
                     "wire_s": wire, "total_s": t2 - t0, "up_bytes": t.bytes_up, "down_bytes": t.bytes_down}
        if self.plan is not None and split is None and self.watch:
            c = self.plan.candidates[p]
            predicted = c.up_s + c.down_s + self.plan.link.small_s
            self._wire.append(wire / predicted if predicted > 0 else 1.0)
            del self._wire[:-5]
        return reply["y"]

    def _maybe_replan(self) -> None:
        if self.replan_s is not None and time.monotonic() - self._last_probe >= self.replan_s:
            self.replan("periodic")
            return
        if self.watch and len(self._wire) >= 5:
            if self._quiet > 0:  # a re-measure found the link as planned: look again later
                self._quiet -= 1
                return
            r = float(np.median(self._wire))
            slack = 0.5e-3 / max(1e-9, self.plan.candidates[self.plan.split].up_s + self.plan.link.small_s)
            if not (1 / (1 + self.tolerance + slack)) <= r <= 1 + self.tolerance + slack:
                self.replan(f"calls took {r:.2f}x the plan's time on the wire")
                if not self.replans[-1]["changed"]:
                    self._backoff = min(1000, self._backoff * 2)
                    self._quiet = self._backoff
                else:
                    self._backoff = 5

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "OffloadClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_splits(client: OffloadClient, x: Any, iterations: int = 10, interval_s: Optional[float] = None,
               splits: Optional[List[int]] = None, progress=None) -> List[dict]:
    """Run every split (or ``splits``) ``iterations`` times for real; per
    split the median measured latency beside the plan's prediction.

    The splits take turns: each round runs every split once, in a new
    random order, so that a slow spell of the machine or the link is
    spread over all of them instead of landing on the few measured then."""
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    if client.plan is None:
        client.make_plan(x)
    plan = client.plan
    gap = client.interval_s if interval_s is None else interval_s
    todo = list(range(plan.n + 1)) if splits is None else list(splits)
    samples: Dict[int, Dict[str, list]] = {p: {"total": [], "device": [], "call": []} for p in todo}
    for p in todo:
        client.infer(x, split=p)  # warm: the connection, the sessions' caches
    rng = random.Random(0)
    for k in range(iterations):
        order = list(todo)
        rng.shuffle(order)
        for p in order:
            idle(gap)
            client.infer(x, split=p)
            s = samples[p]
            s["total"].append(client.last["total_s"])
            s["device"].append(client.last["device_s"])
            s["call"].append(client.last["call_s"])
        if progress is not None:
            progress(k + 1, iterations, {p: float(np.median(samples[p]["total"])) for p in todo})
    out = []
    for p in todo:
        c, s = plan.candidates[p], samples[p]
        med = float(np.median(s["total"]))
        out.append({"p": p, "scenario": c.scenario, "predicted_s": c.total_s, "measured_s": med,
                    "error": (c.total_s - med) / med if med > 0 else 0.0,
                    "measured_device_s": float(np.median(s["device"])), "measured_call_s": float(np.median(s["call"])),
                    "samples_s": s["total"]})
    return out


def check(results: List[dict], plan: Plan, prediction_tolerance: float = 0.2,
          choice_tolerance: float = 0.1) -> Dict[str, Any]:
    """The verdicts of a run of every split: each prediction within
    ``prediction_tolerance`` of its measurement, the chosen split's
    measured latency within ``choice_tolerance`` of the best measured."""
    best = min(results, key=lambda r: r["measured_s"])
    chosen = next((r for r in results if r["p"] == plan.split), None)
    worst = max(results, key=lambda r: abs(r["error"]))
    out = {"chosen": plan.split, "best_measured": best["p"],
           "worst_prediction_error": worst["error"], "worst_prediction_p": worst["p"],
           "predictions_ok": all(abs(r["error"]) <= prediction_tolerance for r in results)}
    if chosen is not None:
        out["chosen_vs_best"] = chosen["measured_s"] / best["measured_s"] - 1
        out["choice_ok"] = out["chosen_vs_best"] <= choice_tolerance
    return out
