"""What ``edgeml bench`` reports: quality, latency and target statistics
of one run (``BenchResult``), its files, and runs side by side
(``compare``). docs/bench.md, "Report", says what every figure is.

Statistics of a series (``describe``): ``first`` (the first value: the
first inference, with its warm-up), ``mean``, ``std`` (population, ddof 0),
``median``, ``p90``, ``p99`` (numpy's default linear interpolation), ``min``,
``max``, ``count``, all over every value including the first.
"""
from __future__ import annotations

import base64
import html
import json
import os
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import numpy as np

from . import protocol as P

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FORMAT = "edgeml-bench/1"
JSON_NAME = "measurements.json"
STAT_KEYS = ("first", "mean", "std", "median", "p90", "p99", "min", "max")


def describe(values: List[float]) -> Dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"count": 0}
    return {"count": int(v.size), "first": float(v[0]), "mean": float(v.mean()), "std": float(v.std()),
            "median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99)),
            "min": float(v.min()), "max": float(v.max())}


def confusion(labels: List[int], predictions: List[int], n: int) -> np.ndarray:
    """Rows are the true classes, columns the predicted ones."""
    m = np.zeros((n, n), dtype=np.int64)
    for t, p in zip(labels, predictions):
        if 0 <= t < n and 0 <= p < n:
            m[t, p] += 1
    return m


def quality(labels: List[int], predictions: List[int], top5: List[bool], classes: List[str]) -> Dict[str, Any]:
    """Accuracy, top-5 accuracy, the confusion matrix and per-class precision
    and recall of the samples that have a label and a prediction."""
    n = max([len(classes)] + [v + 1 for v in labels + predictions if v >= 0])
    names = list(classes) + [str(i) for i in range(len(classes), n)]  # a class the names do not cover: its index
    total = len(labels)
    if not total:
        return {"total": 0}
    cm = confusion(labels, predictions, n)
    correct = int(sum(int(t == p) for t, p in zip(labels, predictions)))
    per_class = {}
    for i, name in enumerate(names):
        tp = int(cm[i, i])
        predicted, actual = int(cm[:, i].sum()), int(cm[i, :].sum())
        per_class[name] = {"precision": tp / predicted if predicted else None,
                           "recall": tp / actual if actual else None, "support": actual}
    precisions = [c["precision"] for c in per_class.values() if c["precision"] is not None]
    recalls = [c["recall"] for c in per_class.values() if c["recall"] is not None]
    out = {"total": total, "correct": correct, "accuracy": correct / total,
           "eval_confusion_matrix": cm.tolist(), "class_names": names, "per_class": per_class,
           "mean_precision": float(np.mean(precisions)) if precisions else None,
           "mean_recall": float(np.mean(recalls)) if recalls else None}
    if top5:
        out["top_5_count"] = int(sum(top5))
        out["top_5_accuracy"] = sum(top5) / len(top5)
    return out


class BenchResult:
    """One ``edgeml bench`` run: ``samples`` (one dict per sample: index,
    label, prediction, top5, target_s, protocol_s, data_s, output_s,
    timestamp_ns, or error), the target's ``utilization`` series, and
    ``meta`` (target, model, runtime, dataset, complete, error)."""

    def __init__(self, samples: List[dict], utilization: Dict[str, list], meta: Dict[str, Any],
                 classes: Optional[List[str]] = None):
        self.samples = samples
        self.utilization = utilization
        self.meta = meta
        self.classes = list(classes or [])

    # -------------------------------------------------------------- figures

    @property
    def ok_samples(self) -> List[dict]:
        return [s for s in self.samples if "error" not in s]

    @property
    def complete(self) -> bool:
        return bool(self.meta.get("complete"))

    @property
    def error(self) -> str:
        return self.meta.get("error") or ""

    def series(self, key: str) -> List[float]:
        return [s[key] for s in self.ok_samples if s.get(key) is not None]

    def summary(self) -> Dict[str, Any]:
        ok = self.ok_samples
        labelled = [s for s in ok if s.get("label") is not None and s.get("prediction") is not None]
        q = quality([s["label"] for s in labelled], [s["prediction"] for s in labelled],
                    [s["top5"] for s in labelled if s.get("top5") is not None], self.classes)
        u = self.utilization
        cpus = u.get("cpus_percent") or []
        util: Dict[str, Any] = {"samples": len(u.get("timestamp") or [])}
        per_core = _cores(cpus)
        if per_core.size and not np.isnan(per_core).all():
            util["cpu_percent_mean"] = float(np.nanmean(per_core))  # over the cores online at each sample
            util["cpu_percent_per_core_mean"] = [None if np.isnan(c).all() else float(np.nanmean(c))
                                                 for c in per_core.T]
            util["cpu_percent_busiest_core_max"] = float(np.nanmax(per_core))
        for key in ("mem_percent", "gpu_utilization", "gpu_mem_utilization"):
            vals = u.get(key) or []
            if vals:
                util[f"{key}_mean"] = float(np.mean(vals))
                util[f"{key}_max"] = float(np.max(vals))
        rss = u.get("rss_bytes") or []
        if rss:
            util["target_rss_bytes_max"] = int(max(rss))
        return {
            "samples": len(self.samples), "errors": len(self.samples) - len(ok),
            "complete": self.complete, "error": self.error,
            "quality": q,
            "latency_s": {P.K_TARGET_STEP: describe(self.series("target_s")),
                          P.K_PROTOCOL_STEP: describe(self.series("protocol_s")),
                          "protocol_data_step": describe(self.series("data_s")),
                          "protocol_output_step": describe(self.series("output_s"))},
            "utilization": util,
        }

    def to_json(self) -> Dict[str, Any]:
        """The measurements: Kenning's names for its quantities (the raw
        series, ``eval_confusion_matrix``, ``top_5_count``, ``total``,
        ``class_names``) plus ``summary`` (every statistic), ``meta``,
        ``samples`` (per sample, everything measured)."""
        s = self.summary()
        q = s["quality"]
        u = self.utilization
        out: Dict[str, Any] = {"format": FORMAT, "meta": self.meta, "summary": s}
        for key in ("eval_confusion_matrix", "top_5_count", "total", "class_names"):
            if key in q:
                out[key] = q[key]
        ok = self.ok_samples
        out[P.K_TARGET_STEP] = [x["target_s"] for x in ok]
        out[P.K_TARGET_STEP + "_timestamp"] = [x["timestamp_ns"] for x in ok]
        out[P.K_PROTOCOL_STEP] = [x["protocol_s"] for x in ok]
        out[P.K_UTIL_TS] = list(u.get("timestamp") or [])
        for key, name in ((P.K_CPUS, "cpus_percent"), (P.K_MEM, "mem_percent"), (P.K_GPU, "gpu_utilization"),
                          (P.K_GPU_MEM, "gpu_mem_utilization")):
            if name in u:
                out[key] = list(u[name])
        out["session_utilization_rss_bytes"] = list(u.get("rss_bytes") or [])
        out["samples"] = self.samples
        return out

    @classmethod
    def load(cls, path: str) -> "BenchResult":
        """A run back from its measurements JSON (or the folder holding it)."""
        if os.path.isdir(path):
            path = os.path.join(path, JSON_NAME)
        with open(path) as f:
            d = json.load(f)
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{path} is not an edgeml bench measurements file (format {FORMAT!r})")
        u = {"timestamp": d.get(P.K_UTIL_TS, []), "rss_bytes": d.get("session_utilization_rss_bytes", [])}
        for key, name in ((P.K_CPUS, "cpus_percent"), (P.K_MEM, "mem_percent"), (P.K_GPU, "gpu_utilization"),
                          (P.K_GPU_MEM, "gpu_mem_utilization")):
            if key in d:
                u[name] = d[key]
        return cls(d.get("samples", []), u, d.get("meta", {}), d.get("class_names", []))

    # -------------------------------------------------------------- text

    def table(self) -> str:
        s = self.summary()
        lines = []
        q = s["quality"]
        if q.get("total"):
            t5 = f", top-5 {q['top_5_accuracy']:.4f}" if "top_5_accuracy" in q else ""
            lines.append(f"accuracy {q['accuracy']:.4f} ({q['correct']}/{q['total']}){t5}")
        lines.append(f"{'latency ms':<26}" + "".join(f"{k:>9}" for k in STAT_KEYS))
        for key, label in ((P.K_TARGET_STEP, "target (inference)"), (P.K_PROTOCOL_STEP, "round trip (PROCESS)")):
            st = s["latency_s"][key]
            if st.get("count"):
                lines.append(f"{label:<26}" + "".join(f"{st[k] * 1e3:>9.3f}" for k in STAT_KEYS))
        u = s["utilization"]
        if "cpu_percent_mean" in u:
            lines.append(f"target CPU {u['cpu_percent_mean']:.1f}% mean over cores, memory "
                         f"{u.get('mem_percent_mean', 0):.1f}% mean ({u['samples']} samples)")
        if "gpu_utilization_mean" in u:
            lines.append(f"target GPU {u['gpu_utilization_mean']:.1f}% mean, GPU memory "
                         f"{u.get('gpu_mem_utilization_mean', 0):.1f}% mean")
        elif self.meta.get("gpu"):
            lines.append(f"no GPU figures: {self.meta['gpu']}")
        lines.append(f"{s['samples']} samples, {s['errors']} errors"
                     + ("" if s["complete"] else f"; INCOMPLETE: {s['error']}"))
        return "\n".join(lines)

    def markdown(self, images: Optional[Dict[str, str]] = None) -> str:
        """The report in Markdown; ``images`` maps plot names to file names."""
        s, m = self.summary(), self.meta
        q = s["quality"]
        out = [f"# edgeml bench: {m.get('model_name', '?')} on {m.get('target', '?')}", ""]
        if not s["complete"]:
            out += [f"**Incomplete run: {s['error']}** ({len(self.ok_samples)} samples measured before it "
                    f"stopped; everything below is of those).", ""]
        out += ["| | |", "|---|---|"]
        for k, v in (("model", f"{m.get('model_name')} ({m.get('model_bytes', 0):,} bytes, sha256 "
                               f"{str(m.get('model_sha256', ''))[:16]}…)"),
                     ("runtime", m.get("runtime")), ("target", _target_line(m)),
                     ("dataset", f"{m.get('dataset')} ({s['samples']} samples, {s['errors']} errors)"),
                     ("model input", m.get("input_note", "")), ("started", m.get("started")),
                     ("model load on the target", f"{m.get('load_s', 0) * 1e3:.1f} ms"),
                     ("GPU", m.get("gpu") or ", ".join(m.get("gpus", [])) or "")):
            out.append(f"| {k} | {_md(v)} |")
        if q.get("total"):
            out += ["", "## Quality", "", f"- accuracy: **{q['accuracy']:.4f}** ({q['correct']} of {q['total']})"]
            if "top_5_accuracy" in q:
                out.append(f"- top-5 accuracy: **{q['top_5_accuracy']:.4f}** ({q['top_5_count']} of {q['total']})")
            if q.get("mean_precision") is not None:
                out.append(f"- mean precision {q['mean_precision']:.4f}, mean recall {q['mean_recall']:.4f}")
            out += ["", "| class | precision | recall | support |", "|---|---:|---:|---:|"]
            for name, c in q["per_class"].items():
                out.append(f"| {_md(name)} | {_num(c['precision'])} | {_num(c['recall'])} | {c['support']} |")
            if images and "confusion_matrix" in images:
                out += ["", f"![confusion matrix]({images['confusion_matrix']})"]
        out += ["", "## Latency (ms)", "", "| | " + " | ".join(STAT_KEYS) + " | count |",
                "|---|" + "---:|" * (len(STAT_KEYS) + 1)]
        for key, label in ((P.K_TARGET_STEP, "inference, timed on the target"),
                           (P.K_PROTOCOL_STEP, "PROCESS round trip, timed on the host"),
                           ("protocol_data_step", "DATA round trip (input upload)"),
                           ("protocol_output_step", "OUTPUT round trip (output download)")):
            st = s["latency_s"][key]
            if st.get("count"):
                out.append(f"| {label} | " + " | ".join(f"{st[k] * 1e3:.3f}" for k in STAT_KEYS)
                           + f" | {st['count']} |")
        if images and "inference_time" in images:
            out += ["", f"![inference time]({images['inference_time']})"]
        u = s["utilization"]
        out += ["", "## Target", ""]
        if "cpu_percent_mean" in u:
            cores = ", ".join("offline" if v is None else f"{v:.0f}" for v in u["cpu_percent_per_core_mean"])
            out.append(f"- CPU: {u['cpu_percent_mean']:.1f}% mean over all cores (per core: {cores}); busiest "
                       f"core peak {u['cpu_percent_busiest_core_max']:.0f}%")
        if "mem_percent_mean" in u:
            out.append(f"- memory: {u['mem_percent_mean']:.1f}% mean, {u['mem_percent_max']:.1f}% peak; target "
                       f"process peak {u.get('target_rss_bytes_max', 0) / 2**20:.1f} MiB")
        if "gpu_utilization_mean" in u:
            out.append(f"- GPU: {u['gpu_utilization_mean']:.1f}% mean, {u['gpu_utilization_max']:.0f}% peak; "
                       f"GPU memory {u['gpu_mem_utilization_mean']:.1f}% mean")
        else:
            out.append(f"- GPU: no figures ({_md(m.get('gpu') or 'none')})")
        out.append(f"- {u['samples']} samples at {m.get('sample_hz', P.SAMPLE_HZ):g} Hz"
                   + (f"; {m['sampling_error']}" if m.get("sampling_error") else ""))
        if images and "utilization" in images:
            out += ["", f"![target utilization]({images['utilization']})"]
        errs = [x for x in self.samples if "error" in x]
        if errs:
            out += ["", "## Errors", ""] + [f"- sample {x['index']}: {_md(x['error'])}" for x in errs[:20]]
            if len(errs) > 20:
                out.append(f"- … and {len(errs) - 20} more (measurements.json has them all)")
        return "\n".join(out) + "\n"

    def html(self, pngs: Optional[Dict[str, bytes]] = None) -> str:
        """The report as one self-contained HTML page (plots inline)."""
        return _md_to_html(self.markdown({k: f"__png_{k}__" for k in (pngs or {})}), pngs or {},
                           f"edgeml bench: {self.meta.get('model_name', '')}")

    # -------------------------------------------------------------- plots

    def figures(self) -> Dict[str, "Figure"]:
        """``inference_time`` (time series and histogram), ``utilization``
        (CPU per core and memory over time) and, for a classifier,
        ``confusion_matrix``; drawn without pyplot."""
        figs = {"inference_time": self.inference_figure(), "utilization": self.utilization_figure()}
        if self.summary()["quality"].get("total"):
            figs["confusion_matrix"] = self.confusion_figure()
        return figs

    def inference_figure(self) -> "Figure":
        from ..profile import _figure
        fig = _figure(figsize=(11, 4.2))
        ax, hx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        for key, label in (("protocol_s", "round trip (PROCESS)"), ("target_s", "on the target")):
            v = np.asarray(self.series(key)) * 1e3
            if v.size:
                ax.plot(np.arange(v.size), v, linewidth=0.8, label=label)
                hx.hist(v, bins=min(60, max(10, v.size // 10)), alpha=0.6, label=label)
        ax.set_xlabel("sample")
        ax.set_ylabel("ms")
        ax.set_title("inference time per sample", fontsize=10)
        ax.grid(alpha=0.3)
        hx.set_xlabel("ms")
        hx.set_ylabel("samples")
        hx.set_title("inference time histogram", fontsize=10)
        for a in (ax, hx):
            if self.ok_samples:
                a.legend(fontsize=8)
            else:
                a.text(0.5, 0.5, "no sample was measured", ha="center", va="center", transform=a.transAxes)
        fig.tight_layout()
        return fig

    def utilization_figure(self) -> "Figure":
        from ..profile import _figure
        u = self.utilization
        ts = np.asarray(u.get("timestamp") or [], dtype=np.float64)
        t = (ts - ts[0]) / 1e9 if ts.size else ts
        gpu = bool(u.get("gpu_utilization"))
        fig = _figure(figsize=(11, 4.2))
        ax, mx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        cpus = _cores(u.get("cpus_percent") or [])
        if cpus.size and not np.isnan(cpus).all():
            for c in range(cpus.shape[1]):
                ax.plot(t, cpus[:, c], linewidth=0.6, alpha=0.5, label=f"core {c}" if cpus.shape[1] <= 8 else None)
            with np.errstate(all="ignore"):
                import warnings
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # a sample with every core offline
                    ax.plot(t, np.nanmean(cpus, axis=1), linewidth=1.8, color="black", label="mean")
        if gpu:
            ax.plot(t, u["gpu_utilization"], linewidth=1.5, color="tab:green", label="GPU")
        if u.get("mem_percent"):
            mx.plot(t, u["mem_percent"], label="machine memory %")
        if gpu:
            mx.plot(t, u["gpu_mem_utilization"], label="GPU memory %")
        for a, title in ((ax, "target CPU per core" + (" and GPU" if gpu else "")), (mx, "target memory")):
            a.set_ylim(0, 105)
            a.set_xlabel("s since the model loaded")
            a.set_ylabel("%")
            a.set_title(title, fontsize=10)
            a.grid(alpha=0.3)
            if ts.size:
                a.legend(fontsize=7, ncol=2)
            else:
                a.text(0.5, 0.5, "no target samples reached the host", ha="center", va="center",
                       transform=a.transAxes)
        fig.tight_layout()
        return fig

    def confusion_figure(self) -> "Figure":
        from ..profile import _figure
        q = self.summary()["quality"]
        cm = np.asarray(q["eval_confusion_matrix"])
        names = q["class_names"]
        n = len(names)
        fig = _figure(figsize=(max(5, 0.45 * n + 3), max(4.5, 0.45 * n + 2.5)))
        ax = fig.add_subplot()
        im = ax.imshow(cm, cmap="Blues")
        fig.colorbar(im, ax=ax)
        if n <= 30:
            ax.set_xticks(range(n), names, rotation=90 if n > 10 else 0, fontsize=8)
            ax.set_yticks(range(n), names, fontsize=8)
            hi = cm.max() / 2 if cm.size else 0
            for i in range(n):
                for j in range(n):
                    if cm[i, j]:
                        ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                                color="white" if cm[i, j] > hi else "black")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"confusion matrix (accuracy {q['accuracy']:.4f})", fontsize=10)
        fig.tight_layout()
        return fig

    # -------------------------------------------------------------- files

    def write(self, out_dir: str, plots: bool = True) -> Dict[str, str]:
        """Write measurements.json, report.md, report.html and (with
        matplotlib) the PNGs into ``out_dir``; returns name -> path."""
        from ..profile import _png
        os.makedirs(out_dir, exist_ok=True)
        paths = {"json": os.path.join(out_dir, JSON_NAME)}
        with open(paths["json"], "w") as f:
            json.dump(self.to_json(), f, indent=1)
        pngs: Dict[str, bytes] = {}
        if plots:
            for name, fig in self.figures().items():
                pngs[name] = _png(fig, dpi=100)
                paths[f"{name}_png"] = os.path.join(out_dir, f"{name}.png")
                with open(paths[f"{name}_png"], "wb") as f:
                    f.write(pngs[name])
        paths["markdown"] = os.path.join(out_dir, "report.md")
        with open(paths["markdown"], "w") as f:
            f.write(self.markdown({k: f"{k}.png" for k in pngs}))
        paths["html"] = os.path.join(out_dir, "report.html")
        with open(paths["html"], "w") as f:
            f.write(self.html(pngs))
        return paths

    def _repr_html_(self) -> str:
        try:
            pngs = {k: __import__("edgeml.profile", fromlist=["_png"])._png(f, dpi=80)
                    for k, f in self.figures().items()}
        except RuntimeError:  # no matplotlib: the tables alone
            pngs = {}
        return self.html(pngs)

    def __repr__(self) -> str:
        return (f"<BenchResult {len(self.samples)} samples, {len(self.samples) - len(self.ok_samples)} errors"
                f"{'' if self.complete else ', incomplete'}; .table(), .figures(), .write(dir)>")


def _cores(cpus: List[list]) -> np.ndarray:
    """Samples x cores, NaN where a core was offline (None) or missing."""
    if not cpus:
        return np.zeros((0, 0))
    width = max(len(c) for c in cpus)
    out = np.full((len(cpus), width), np.nan)
    for i, row in enumerate(cpus):
        out[i, :len(row)] = [np.nan if v is None else v for v in row]
    return out


def _target_line(m: dict) -> str:
    t = m.get("target_info") or {}
    return (f"{m.get('target')} ({t.get('host', '?')}, {t.get('platform', '?')}, {t.get('cpus', '?')} CPUs, "
            f"Python {t.get('python', '?')}, edgeml {t.get('edgeml', '?')})")


def _num(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.4f}"


def _md(v: Any) -> str:
    return str("" if v is None else v).replace("|", "\\|").replace("\n", " ")


def _md_to_html(md: str, pngs: Dict[str, bytes], title: str) -> str:
    """The small Markdown our reports use (headings, tables, lists, bold,
    images) as HTML; images named ``__png_NAME__`` are inlined."""
    import re
    esc = html.escape

    def inline(text: str) -> str:
        text = esc(text).replace("\\|", "|")
        text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
        return text

    out = ["<!DOCTYPE html>", "<html><head><meta charset='utf-8'>", f"<title>{esc(title)}</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
           "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px}"
           "td.r{text-align:right}img{max-width:100%}</style></head><body>"]
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            cells = [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows]
            body = [r for r in cells[2:]] if len(cells) > 1 else []
            head = "".join(f"<th>{inline(c)}</th>" for c in cells[0])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>")
            for r in body:
                out.append("<tr>" + "".join(f"<td{' class=r' if j else ''}>{inline(c)}</td>"
                                            for j, c in enumerate(r)) + "</tr>")
            out.append("</tbody></table>")
            continue
        m = re.match(r"!\[(.*?)\]\((.*?)\)", line)
        if m:
            alt, src = m.group(1), m.group(2)
            name = src[6:-2] if src.startswith("__png_") else None
            if name is not None and name in pngs:
                src = "data:image/png;base64," + base64.b64encode(pngs[name]).decode()
            out.append(f"<p><img alt='{esc(alt)}' src='{src if name else esc(src)}'></p>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.startswith("- "):
            out.append("<ul>")
            while i < len(lines) and lines[i].startswith("- "):
                out.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            out.append("</ul>")
            continue
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ compare

_COMPARE_ROWS = (
    ("accuracy", ("quality", "accuracy"), 1, "{:.4f}"),
    ("top-5 accuracy", ("quality", "top_5_accuracy"), 1, "{:.4f}"),
    ("mean precision", ("quality", "mean_precision"), 1, "{:.4f}"),
    ("mean recall", ("quality", "mean_recall"), 1, "{:.4f}"),
) + tuple(
    (f"{label} {stat} ms", ("latency_s", key, stat), 1e3, "{:.3f}")
    for key, label in ((P.K_TARGET_STEP, "target"), (P.K_PROTOCOL_STEP, "round trip"))
    for stat in ("first", "mean", "median", "p90", "p99", "std", "min", "max")
) + (
    ("target CPU mean %", ("utilization", "cpu_percent_mean"), 1, "{:.1f}"),
    ("target memory peak %", ("utilization", "mem_percent_max"), 1, "{:.1f}"),
    ("target process peak MiB", ("utilization", "target_rss_bytes_max"), 1 / 2**20, "{:.1f}"),
    ("GPU mean %", ("utilization", "gpu_utilization_mean"), 1, "{:.1f}"),
    ("samples", ("samples",), 1, "{:.0f}"),
    ("errors", ("errors",), 1, "{:.0f}"),
)


def _get(d: Any, path: tuple) -> Optional[float]:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d if isinstance(d, (int, float)) and not isinstance(d, bool) else None


class Comparison:
    """Runs side by side: ``rows`` of (figure, [value per run]), the last
    columns the ratio of each run to the first."""

    def __init__(self, results: List[BenchResult], names: List[str]):
        if len(results) < 2:
            raise ValueError("compare needs two runs or more")
        self.results, self.names = results, names
        sums = [r.summary() for r in results]
        self.rows = []
        for label, path, scale, fmt in _COMPARE_ROWS:
            vals = [_get(s, path) for s in sums]
            if all(v is None for v in vals):
                continue
            self.rows.append((label, [None if v is None else v * scale for v in vals], fmt))
        self.model_bytes = [r.meta.get("model_bytes") for r in results]

    def markdown(self, image: Optional[str] = None) -> str:
        head = ["figure"] + self.names + [f"{n} / {self.names[0]}" for n in self.names[1:]]
        out = ["# edgeml bench compare", ""]
        for n, r in zip(self.names, self.results):
            m = r.meta
            out.append(f"- **{_md(n)}**: {_md(m.get('model_name'))} ({m.get('model_bytes', 0):,} bytes, "
                       f"{_md(m.get('runtime'))}) on {_md(m.get('target'))}, {_md(m.get('dataset'))}"
                       + ("" if r.complete else f"; INCOMPLETE: {_md(r.error)}"))
        out += ["", "| " + " | ".join(map(_md, head)) + " |", "|---|" + "---:|" * (len(head) - 1)]
        mb = self.model_bytes
        if all(isinstance(b, int) for b in mb):
            out.append("| model bytes | " + " | ".join(f"{b:,}" for b in mb) + " | "
                       + " | ".join(f"{b / mb[0]:.3f}" if mb[0] else "–" for b in mb[1:]) + " |")
        for label, vals, fmt in self.rows:
            cells = ["–" if v is None else fmt.format(v) for v in vals]
            base = vals[0]
            ratios = ["–" if v is None or not base else f"{v / base:.3f}" for v in vals[1:]]
            out.append(f"| {label} | " + " | ".join(cells + ratios) + " |")
        if image:
            out += ["", f"![inference time]({image})"]
        return "\n".join(out) + "\n"

    def table(self) -> str:
        """Every figure of each run, then each run's ratio to the first."""
        ratios = [f"{n}/{self.names[0]}" for n in self.names[1:]]
        w = max(12, max(len(n) for n in self.names + ratios) + 2)
        lines = [f"{'':<26}" + "".join(f"{n:>{w}}" for n in self.names + ratios)]
        rows = list(self.rows)
        if all(isinstance(b, int) for b in self.model_bytes):
            rows.insert(0, ("model bytes", [float(b) for b in self.model_bytes], "{:,.0f}"))
        for label, vals, fmt in rows:
            cells = ["–" if v is None else fmt.format(v) for v in vals]
            cells += ["–" if v is None or not vals[0] else f"{v / vals[0]:.3f}" for v in vals[1:]]
            lines.append(f"{label:<26}" + "".join(f"{c:>{w}}" for c in cells))
        return "\n".join(lines)

    def figure(self) -> "Figure":
        """Target inference time of each run: histograms on one axis."""
        from ..profile import _figure
        fig = _figure(figsize=(9, 4.5))
        ax = fig.add_subplot()
        for n, r in zip(self.names, self.results):
            v = np.asarray(r.series("target_s")) * 1e3
            if v.size:
                ax.hist(v, bins=min(60, max(10, v.size // 10)), alpha=0.55, label=f"{n} (median {np.median(v):.3f})")
        ax.set_xlabel("inference time on the target, ms")
        ax.set_ylabel("samples")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return fig

    def write(self, out_dir: str, plots: bool = True) -> Dict[str, str]:
        from ..profile import _png
        os.makedirs(out_dir, exist_ok=True)
        paths, pngs = {}, {}
        if plots:
            pngs["compare"] = _png(self.figure())
            paths["compare_png"] = os.path.join(out_dir, "compare.png")
            with open(paths["compare_png"], "wb") as f:
                f.write(pngs["compare"])
        paths["markdown"] = os.path.join(out_dir, "compare.md")
        with open(paths["markdown"], "w") as f:
            f.write(self.markdown("compare.png" if plots else None))
        paths["html"] = os.path.join(out_dir, "compare.html")
        with open(paths["html"], "w") as f:
            f.write(_md_to_html(self.markdown("__png_compare__" if plots else None), pngs, "edgeml bench compare"))
        return paths


def compare(*runs: Any, names: Optional[List[str]] = None) -> Comparison:
    """Runs side by side: each a ``BenchResult`` or the path of its
    measurements JSON (or its folder)."""
    results = [r if isinstance(r, BenchResult) else BenchResult.load(r) for r in runs]
    if names is None:
        names = []
        for i, (r, src) in enumerate(zip(results, runs)):
            n = str(r.meta.get("model_name") or f"run {i + 1}")
            if isinstance(src, str):
                n = os.path.basename(os.path.dirname(os.path.abspath(src))) if src.endswith(".json") else \
                    os.path.basename(os.path.abspath(src))
            names.append(n if n not in names else f"{n} ({i + 1})")
    return Comparison(results, names)
