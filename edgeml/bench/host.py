"""The host side of ``edgeml bench``: upload a model to a target, stream a
dataset through it, collect outputs and the target's statistics
(docs/bench.md).

>>> result = run("board:6379", "model.onnx", "digits", out="bench-out")
>>> print(result.table())
"""
from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import errors
from ..inference import InferenceClient
from . import datasets
from . import protocol as P
from . import runtimes
from .report import BenchResult

STATS_EVERY_S = 1.0  # how often the host fetches the target's new samples during a run
_FORMATS = {".onnx": "onnx", ".ort": "onnx", ".tflite": "tflite"}


class BenchError(RuntimeError):
    """The benchmark cannot start (the target refused the model, the inputs
    do not fit it); ``result``, where there is one, holds what was measured."""

    def __init__(self, msg: str, result: Optional[BenchResult] = None):
        super().__init__(msg)
        self.result = result


def parse_target(target: Any) -> Tuple[str, int]:
    if isinstance(target, tuple) and len(target) == 2:
        return str(target[0]), int(target[1])
    if not isinstance(target, str) or ":" not in target:
        raise ValueError(f"target must be host:port, got {target!r}")
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    try:
        p = int(port)
    except ValueError:
        p = -1
    if not host or not 0 < p < 65536:
        raise ValueError(f"target must be host:port with a port in 1..65535, got {target!r}")
    return host, p


def _call(client: InferenceClient, name: str, payload: dict, timeout: Optional[float] = None) -> dict:
    reply = client.call(name, payload, timeout=timeout)
    if not isinstance(reply, dict) or reply.get("status") not in (P.OK, P.ERROR):
        raise errors.EdgeMLError(f"{name}: the target's reply is not the bench protocol's ({reply!r:.200}): "
                                 f"is it edgeml serve?")
    if reply["status"] == P.ERROR:
        raise _TargetError(str(reply.get("error", "no reason given")))
    return reply


class _TargetError(Exception):
    """An ERROR reply: the target refused this request and serves on."""


class _NoPrediction(Exception):
    """No output of the model holds a prediction: the run stops."""


class _DatasetError(Exception):
    """The dataset raised while giving a sample: the run stops."""


def _feeds(x: Any, specs: List[dict], input_name: Optional[str]) -> Tuple[Dict[str, np.ndarray], str]:
    """The model's feeds for one dataset sample, and a note on how they
    were made (a batch axis added)."""
    if isinstance(x, dict):
        return {k: np.ascontiguousarray(v) for k, v in x.items()}, "the dataset's map of inputs"
    x = np.ascontiguousarray(x)
    if input_name is None:
        if len(specs) != 1:
            raise ValueError(f"the model takes {len(specs)} inputs ({[s['name'] for s in specs]}); a dataset for it "
                             f"must yield a map of input name to array")
        spec = specs[0]
    else:
        match = [s for s in specs if s["name"] == input_name]
        if not match:
            raise ValueError(f"the model has no input {input_name!r}; it takes {[s['name'] for s in specs]}")
        spec = match[0]
    note = f"{spec['name']} {list(x.shape)} {x.dtype}"
    if x.ndim == len(spec["shape"]) - 1 and runtimes.fit(spec, (1,) + x.shape, x.dtype.name) is None:
        x = x[None]
        note += f" as a batch of one {list(x.shape)}"
    return {spec["name"]: x}, note


def _scores(outputs: Dict[str, Any], specs: List[dict], n_classes: int, name: Optional[str]) -> Tuple[str, str]:
    """The output that holds the prediction, and its kind: "scores" (a
    score per class: the prediction is the argmax, top-5 the 5 largest) or
    "label" (the class index itself)."""
    if name is not None:
        if name not in outputs:
            raise ValueError(f"the model has no output {name!r}; it gives {sorted(outputs)}")
        v = np.asarray(outputs[name])
        return name, "scores" if v.dtype.kind == "f" and v.size > 1 else "label"
    arrays = {k: np.asarray(v) for k, v in outputs.items() if isinstance(v, np.ndarray)}
    floats = [k for k, v in arrays.items() if v.dtype.kind == "f" and v.size > 1]
    if n_classes:
        exact = [k for k in floats if arrays[k].shape[-1] == n_classes]
        if exact:
            return exact[0], "scores"
    if floats:
        return floats[0], "scores"
    ints = [k for k, v in arrays.items() if v.dtype.kind in "iu" and v.size == 1]
    if ints:
        return ints[0], "label"
    raise ValueError(f"no output holds a class score or label (outputs: "
                     f"{ {k: (list(np.shape(v)), type(v).__name__) for k, v in outputs.items()} }); "
                     f"name one with output=")


def _predict(v: Any, kind: str) -> Tuple[int, Optional[List[int]]]:
    a = np.asarray(v)
    if kind == "label":
        return int(a.reshape(-1)[0]), None
    a = a.reshape(-1) if a.ndim <= 1 or a.shape[0] != 1 else a.reshape(a.shape[0], -1)[0]
    order = np.argsort(-a, kind="stable")
    return int(order[0]), [int(i) for i in order[:5]]


def run(target: Any, model: str, dataset: Any = "digits", out: Optional[str] = None, *,
        limit: Optional[int] = None, output: Optional[str] = None, input_name: Optional[str] = None,
        model_format: Optional[str] = None, progress: bool = True, timeout: float = 60.0,
        plots: bool = True, stats_every: float = STATS_EVERY_S, token: Optional[str] = None) -> BenchResult:
    """Benchmark ``model`` (a file) on ``target`` ("host:port" of ``edgeml
    serve``) over ``dataset`` (a spec or a dataset object; docs/bench.md).

    Uploads the model; checks that the dataset's first sample fits the
    model's inputs (a missing batch axis of one is added) before any
    streaming; then per sample DATA, PROCESS (timed on the target and as a
    round trip here) and OUTPUT; fetches the target's statistics as it goes.
    ``output`` names the output holding the prediction (by default the
    float output with a score per class). With ``out`` the report is
    written there. ``token`` is the target's (``edgeml serve --token``,
    docs/security.md). A target that dies mid-run gives a partial result
    (``complete`` False, ``error`` why), written all the same.

    Raises BenchError when the run cannot start: the model does not load,
    the inputs do not fit."""
    host, port = parse_target(target)
    if not os.path.isfile(model):
        raise ValueError(f"no model file {os.path.abspath(model)}")
    fmt = model_format or _FORMATS.get(os.path.splitext(model)[1].lower())
    if fmt is None:
        raise ValueError(f"cannot tell the format of {model} from its name: give model_format= (onnx, tflite)")
    ds = datasets.load(dataset)
    classes = datasets.classes(ds)
    total = datasets.size(ds)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        total = limit if total is None else min(total, limit)
    size = os.path.getsize(model)
    meta: Dict[str, Any] = {"target": f"{host}:{port}", "model": os.path.abspath(model),
                            "model_name": os.path.basename(model), "model_bytes": size, "format": fmt,
                            "dataset": dataset if isinstance(dataset, str) else repr(dataset),
                            "classes": len(classes), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                            "complete": False, "error": ""}
    client = InferenceClient(host, port, timeout=timeout, token=token)
    try:
        return _run(client, model, fmt, ds, classes, total, meta, out, output, input_name, progress, plots,
                    stats_every)
    finally:
        client.close()


def _upload(client: InferenceClient, model: str, fmt: str, meta: dict, bar: Any) -> dict:
    sid_box: List[Optional[str]] = [None]
    try:
        return _chunks(client, model, fmt, meta, bar, sid_box)
    except BaseException:
        if sid_box[0] is not None:  # a half-uploaded model: its session goes
            _end_quietly(client, sid_box[0])
        raise


def _chunks(client: InferenceClient, model: str, fmt: str, meta: dict, bar: Any, sid_box: list) -> dict:
    digest = hashlib.sha256()
    size = meta["model_bytes"]
    sid, offset = None, 0
    with open(model, "rb") as f:
        while True:
            chunk = f.read(P.CHUNK_BYTES)
            if not chunk:
                raise BenchError(f"{model} ended at {offset} bytes, {size} were expected: was it changed "
                                 f"while being sent?")
            digest.update(chunk)
            last = offset + len(chunk) >= size
            payload = {"session": sid, "offset": offset, "total": size, "chunk": chunk, "format": fmt,
                       "name": meta["model_name"]}
            if last:
                payload["sha256"] = digest.hexdigest()
                meta["model_sha256"] = payload["sha256"]
            reply = _call(client, P.MODEL, payload)
            sid = sid_box[0] = reply["session"]
            offset += len(chunk)
            if bar is not None and size > P.CHUNK_BYTES:
                bar.update(offset, f"upload {offset / 2**20:.0f}/{size / 2**20:.0f} MiB")
            if last:
                return reply


def _run(client, model, fmt, ds, classes, total, meta, out, output, input_name, progress, plots,
         stats_every) -> BenchResult:
    from ..profile import Progress
    samples: List[dict] = []
    util: Dict[str, list] = {}
    state = {"since": 0}

    def take_stats(reply: dict) -> None:
        for k, v in reply.get("samples", {}).items():
            util.setdefault(k, []).extend(v)
        state["since"] = reply.get("next", state["since"])
        if reply.get("sampling_error"):
            meta["sampling_error"] = reply["sampling_error"]

    def finish() -> BenchResult:
        result = BenchResult(samples, util, meta, classes)
        if out is not None:
            try:
                meta["files"] = result.write(out, plots=plots)
            except RuntimeError as e:  # no matplotlib: the numbers and the report all the same
                meta["plots_error"] = str(e)
                meta["files"] = result.write(out, plots=False)
        return result

    try:
        hello = _call(client, P.HELLO, {})
    except errors.UnknownInterfaceError:
        raise BenchError(f"{meta['target']} serves edgeml but not the bench protocol: is it edgeml serve?") from None
    if hello.get("protocol") != P.PROTOCOL_VERSION:
        raise BenchError(f"the target speaks bench protocol {hello.get('protocol')!r}, this host "
                         f"{P.PROTOCOL_VERSION}: run the same edgeml version on both")
    meta["target_info"] = hello.get("target", {})
    if fmt not in hello.get("runtimes", {}):
        raise BenchError(f"the target cannot run {fmt} models (it has {sorted(hello.get('runtimes', {})) or 'none'}):"
                         f" install {'onnxruntime' if fmt == 'onnx' else 'ai-edge-litert'} on the target")
    try:
        loaded = _upload(client, model, fmt, meta, None)
    except _TargetError as e:
        raise BenchError(f"the target refused the model: {e}") from None
    sid = loaded["session"]
    meta.update(session=sid, runtime=loaded.get("runtime"), load_s=loaded.get("load_s"),
                inputs=loaded.get("inputs"), outputs=loaded.get("outputs"), gpu=loaded.get("gpu", ""),
                gpus=loaded.get("gpus", []), sample_hz=loaded.get("hz", P.SAMPLE_HZ))
    specs = loaded["inputs"]
    it = iter(ds)
    try:
        first = next(it)
    except StopIteration:
        _end_quietly(client, sid)
        raise BenchError("the dataset is empty") from None
    try:
        x0, _ = first
        feeds, note = _feeds(x0, specs, input_name)
    except (TypeError, ValueError) as e:
        _end_quietly(client, sid)
        raise BenchError(f"the dataset's samples do not fit the model: {e}") from None
    why = runtimes.check_feeds(specs, feeds)
    if why:
        _end_quietly(client, sid)
        raise BenchError(f"the dataset's samples do not fit the model, nothing was streamed: {why} "
                         f"(first sample: {note})")
    meta["input_note"] = note
    bar = Progress(total or 0, "edgeml bench", enabled=progress) if total else None
    pick = None
    last_stats = time.monotonic()
    i = -1

    def items():
        yield first
        yield from it

    src = items()
    ended = False
    try:
        while total is None or i + 1 < total:
            i += 1
            try:
                item = next(src)
            except StopIteration:
                break
            except Exception as e:  # the dataset's own failure (a corrupt image file): the run stops, reported
                raise _DatasetError(f"the dataset failed at sample {i}: {type(e).__name__}: {e}") from None
            rec: Dict[str, Any] = {"index": i, "label": None}
            try:
                try:
                    x, label = item
                    rec["label"] = None if label is None else int(label)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"the dataset's sample {i} is not an (input, label) pair with an int label "
                                     f"or None: {e}") from None
                feeds, _ = _feeds(x, specs, input_name)
                t0 = time.perf_counter()
                _call(client, P.DATA, {"session": sid, "inputs": feeds})
                t1 = time.perf_counter()
                proc = _call(client, P.PROCESS, {"session": sid})
                t2 = time.perf_counter()
                outs = _call(client, P.OUTPUT, {"session": sid})["outputs"]
                t3 = time.perf_counter()
                if pick is None:
                    try:
                        pick = _scores(outs, meta["outputs"], len(classes), output)
                    except ValueError as e:
                        raise _NoPrediction(str(e)) from None
                    meta["prediction_output"], meta["prediction_kind"] = pick
                pred, top = _predict(outs[pick[0]], pick[1])
                rec.update(target_s=proc["target_s"], timestamp_ns=proc["timestamp_ns"], protocol_s=t2 - t1,
                           data_s=t1 - t0, output_s=t3 - t2, prediction=pred)
                if top is not None and rec["label"] is not None:
                    rec["top5"] = rec["label"] in top
            except (_TargetError, ValueError, TypeError) as e:  # this sample failed; the run goes on
                rec["error"] = str(e)
            samples.append(rec)
            if bar is not None:
                bar.update(i + 1, _note(samples))
            if time.monotonic() - last_stats >= stats_every:
                take_stats(_call(client, P.STATS, {"session": sid, "since": state["since"]}))
                last_stats = time.monotonic()
        end = _call(client, P.END, {"session": sid, "since": state["since"]})
        ended = True
        take_stats(end)
        meta["target_inference_steps_on_target"] = len(end.get(P.K_TARGET_STEP, []))
        meta["hz"] = end.get("hz", P.SAMPLE_HZ)
        meta["complete"] = True
    except _NoPrediction as e:
        meta["error"] = f"cannot read a prediction from the model's outputs: {e}"
    except _DatasetError as e:
        meta["error"] = str(e)
    except (errors.EdgeMLError, _TargetError) as e:
        what = "lost the target" if isinstance(e, (errors.EdgeMLConnectionError, errors.EdgeMLTimeoutError)) \
            else "the target failed"
        meta["error"] = f"{what} after {len(samples)} samples: {type(e).__name__}: {e}"
    except KeyboardInterrupt:
        meta["error"] = f"interrupted (Ctrl-C) after {len(samples)} samples"
        meta["interrupted"] = True
    finally:
        if bar is not None:
            bar.close()
        if not ended:  # close the session on the target, if it is still there to hear it
            _end_quietly(client, sid)
    errs = [s for s in samples if "error" in s]
    if errs and not meta["error"] and len(errs) == len(samples):
        meta["error"] = f"every sample failed; the first: {errs[0]['error']}"
    return finish()


def _note(samples: List[dict]) -> str:
    ok = [s for s in samples if "error" not in s]
    if not ok:
        return f"{len(samples)} errors"
    lab = [s for s in ok if s.get("label") is not None]
    acc = f"acc {sum(s['label'] == s['prediction'] for s in lab) / len(lab):.3f} " if lab else ""
    return f"{acc}{ok[-1]['target_s'] * 1e3:.2f} ms"


def _end_quietly(client: InferenceClient, sid: str) -> None:
    try:
        client.call(P.END, {"session": sid}, timeout=5.0)
    except Exception:  # the target is gone or the session with it: nothing to close
        pass
