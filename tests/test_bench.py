"""edgeml serve / edgeml bench (docs/bench.md): a model trained here and
exported to ONNX, benchmarked end to end on loopback; quality equal to a
local onnxruntime run, statistics equal to those recomputed from the raw
samples, report files that open; bad models, inputs that do not fit, a
target that dies mid-run; the protocol's refusals; the sampler and its GPU
path (a fake NVML); datasets; the CLI."""
import html.parser
import json
import os
import signal
import statistics
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("skl2onnx")
pytest.importorskip("sklearn")

import edgeml  # noqa: E402
from edgeml import bench  # noqa: E402
from edgeml.bench import protocol as P  # noqa: E402
from edgeml.bench import report as R  # noqa: E402
from edgeml.bench import sampler as S  # noqa: E402

from conftest import scaled  # noqa: E402

pytestmark = pytest.mark.timeout(180)


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An MLP trained on half of digits (inputs scaled to [0, 1]), exported
    with skl2onnx (outputs: label int64 [N], probabilities float [N, 10]),
    and an onnxruntime int8 dynamic-quantised copy."""
    from onnxruntime.quantization import quantize_dynamic
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier
    d = tmp_path_factory.mktemp("models")
    digits = load_digits()
    x = digits.data.astype(np.float32) / 16
    clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=200, random_state=0)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings: any fit will do
        clf.fit(x[::2], digits.target[::2])
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    fp32 = d / "digits.onnx"
    fp32.write_bytes(onx.SerializeToString())
    int8 = d / "digits_int8.onnx"
    quantize_dynamic(str(fp32), str(int8))
    return {"fp32": str(fp32), "int8": str(int8), "x": x, "y": digits.target}


@pytest.fixture
def target(cleanup):
    return cleanup(bench.Target(0, host="127.0.0.1").start())


def addr(t):
    return f"127.0.0.1:{t.port}"


def local_predictions(path, x):
    """argmax and top-5 of a local onnxruntime run, one sample at a time
    (as the target runs them)."""
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    preds, top5 = [], []
    for row in x:
        probs = sess.run(["probabilities"], {"X": row[None]})[0][0]
        order = np.argsort(-probs, kind="stable")
        preds.append(int(order[0]))
        top5.append([int(i) for i in order[:5]])
    return preds, top5


def is_png(path):
    from PIL import Image
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
        return im.size[0] > 200 and im.size[1] > 200


class _Html(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.imgs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


# ------------------------------------------------------------------ end to end

def test_digits_end_to_end_quality_equals_local_onnxruntime(models, target, tmp_path):
    out = tmp_path / "run"
    result = bench.run(addr(target), models["fp32"], "digits:scale=0.0625", out=str(out), progress=False)
    assert result.complete and not result.error
    x, y = models["x"], models["y"]
    assert len(result.samples) == len(x) == 1797
    preds, top5 = local_predictions(models["fp32"], x)
    assert [s["prediction"] for s in result.samples] == preds
    assert [s["label"] for s in result.samples] == [int(v) for v in y]
    q = result.summary()["quality"]
    want_acc = float(np.mean(np.asarray(preds) == y))
    assert q["accuracy"] == want_acc and q["correct"] == int(np.sum(np.asarray(preds) == y))
    assert q["top_5_count"] == sum(int(t in k) for t, k in zip(y, top5))
    from sklearn.metrics import confusion_matrix, precision_score, recall_score
    assert q["eval_confusion_matrix"] == confusion_matrix(y, preds, labels=list(range(10))).tolist()
    prec = precision_score(y, preds, average=None, labels=list(range(10)), zero_division=0)
    rec = recall_score(y, preds, average=None, labels=list(range(10)), zero_division=0)
    for i in range(10):
        assert q["per_class"][str(i)]["precision"] == pytest.approx(prec[i], abs=1e-12)
        assert q["per_class"][str(i)]["recall"] == pytest.approx(rec[i], abs=1e-12)
    assert result.meta["prediction_output"] == "probabilities" and result.meta["prediction_kind"] == "scores"
    assert result.meta["input_note"] == "X [64] float32 as a batch of one [1, 64]"
    assert result.meta["target_inference_steps_on_target"] == 1797
    assert target.sessions == 0  # END closed it


def test_statistics_equal_those_recomputed_from_the_samples(models, target, tmp_path):
    out = tmp_path / "run"
    bench.run(addr(target), models["fp32"], "digits:scale=0.0625", out=str(out), progress=False, limit=300)
    with open(out / "measurements.json") as f:
        m = json.load(f)
    assert m["format"] == R.FORMAT and m["total"] == 300 and m["class_names"] == [str(i) for i in range(10)]
    for key in (P.K_TARGET_STEP, P.K_PROTOCOL_STEP):
        raw = m[key]
        assert len(raw) == 300 and all(v > 0 for v in raw)
        st = m["summary"]["latency_s"][key]
        assert st["count"] == 300 and st["first"] == raw[0]
        assert st["mean"] == pytest.approx(statistics.fmean(raw), rel=1e-12)
        assert st["std"] == pytest.approx(statistics.pstdev(raw), rel=1e-9)
        assert st["median"] == pytest.approx(statistics.median(raw), rel=1e-12)
        assert st["min"] == min(raw) and st["max"] == max(raw)
        srt = sorted(raw)
        for q, name in ((90, "p90"), (99, "p99")):  # numpy's linear interpolation, by hand
            pos = (len(srt) - 1) * q / 100
            lo = int(pos)
            want = srt[lo] + (srt[min(lo + 1, len(srt) - 1)] - srt[lo]) * (pos - lo)
            assert st[name] == pytest.approx(want, rel=1e-12)
    # the round trip holds the target's inference time
    assert all(p >= t for p, t in zip(m[P.K_PROTOCOL_STEP], m[P.K_TARGET_STEP]))
    # the target timestamps its inferences in order
    ts = m[P.K_TARGET_STEP + "_timestamp"]
    assert ts == sorted(ts)
    # target statistics: a sample per period, each a CPU % per core, plus memory
    cpus, mem, uts = m[P.K_CPUS], m[P.K_MEM], m[P.K_UTIL_TS]
    assert len(cpus) == len(mem) == len(uts) >= 1
    assert uts == sorted(uts)
    ncores = len(cpus[0])
    assert ncores == len(S._read_proc_stat()) and all(len(c) == ncores for c in cpus)
    assert all(0 <= v <= 100 for c in cpus for v in c) and all(0 < v < 100 for v in mem)
    u = m["summary"]["utilization"]
    assert u["samples"] == len(uts)
    assert u["cpu_percent_mean"] == pytest.approx(statistics.fmean(v for c in cpus for v in c), rel=1e-12)
    assert u["mem_percent_max"] == max(mem)
    assert u["cpu_percent_per_core_mean"] == pytest.approx([statistics.fmean(c[i] for c in cpus)
                                                           for i in range(ncores)], rel=1e-12)
    # the result read back from its JSON summarises the same
    again = bench.BenchResult.load(str(out))
    assert again.summary() == m["summary"]


def test_report_files_exist_and_open(models, target, tmp_path):
    out = tmp_path / "run"
    result = bench.run(addr(target), models["fp32"], "digits:scale=0.0625", out=str(out), progress=False,
                       limit=200)
    names = sorted(os.listdir(out))
    assert names == ["confusion_matrix.png", "inference_time.png", "measurements.json", "report.html",
                     "report.md", "utilization.png"]
    for n in names:
        if n.endswith(".png"):
            assert is_png(out / n), n
    md = (out / "report.md").read_text()
    acc = result.summary()["quality"]["accuracy"]
    assert f"accuracy: **{acc:.4f}**" in md and "![confusion matrix](confusion_matrix.png)" in md
    assert "inference, timed on the target" in md and "PROCESS round trip" in md
    for img in ("confusion_matrix.png", "inference_time.png", "utilization.png"):
        assert f"({img})" in md
    p = _Html()
    p.feed((out / "report.html").read_text())
    p.close()
    assert p.tags.count("table") >= 3 and "h2" in p.tags
    assert len(p.imgs) == 3 and all(i["src"].startswith("data:image/png;base64,") for i in p.imgs)
    import base64
    import io
    from PIL import Image
    for i in p.imgs:
        Image.open(io.BytesIO(base64.b64decode(i["src"].split(",", 1)[1]))).verify()
    assert f"{acc:.4f}" in "".join(p.text)
    # a notebook shows a result as the same page
    assert "<table>" in result._repr_html_()


def test_model_travels_in_chunks_and_is_checked(models, target, monkeypatch):
    monkeypatch.setattr(P, "CHUNK_BYTES", 2048)  # both ends read it; the target refuses a larger chunk
    size = os.path.getsize(models["fp32"])
    assert size > 3 * 2048
    result = bench.run(addr(target), models["fp32"], "digits:scale=0.0625", progress=False, limit=20)
    assert result.complete and result.meta["model_bytes"] == size
    import hashlib
    with open(models["fp32"], "rb") as f:
        assert result.meta["model_sha256"] == hashlib.sha256(f.read()).hexdigest()


def test_compare_fp32_with_int8(models, target, tmp_path):
    a, b = tmp_path / "fp32", tmp_path / "int8"
    ra = bench.run(addr(target), models["fp32"], "digits:scale=0.0625", out=str(a), progress=False, limit=400)
    rb = bench.run(addr(target), models["int8"], "digits:scale=0.0625", out=str(b), progress=False, limit=400)
    assert rb.meta["model_bytes"] < ra.meta["model_bytes"]
    cmp = bench.compare(str(a / "measurements.json"), str(b))
    assert cmp.names == ["fp32", "int8"]
    rows = {label: vals for label, vals, _ in cmp.rows}
    assert rows["accuracy"] == [ra.summary()["quality"]["accuracy"], rb.summary()["quality"]["accuracy"]]
    assert rows["target median ms"] == pytest.approx([ra.summary()["latency_s"][P.K_TARGET_STEP]["median"] * 1e3,
                                                      rb.summary()["latency_s"][P.K_TARGET_STEP]["median"] * 1e3])
    # int8 predictions come from the int8 model, run locally the same way
    preds, _ = local_predictions(models["int8"], models["x"][:400])
    assert [s["prediction"] for s in rb.samples] == preds
    paths = cmp.write(str(tmp_path / "cmp"))
    assert is_png(paths["compare_png"])
    md = open(paths["markdown"]).read()
    assert "| model bytes |" in md and "int8 / fp32" in md
    r = cli("bench", "compare", str(a), str(b), "--out", str(tmp_path / "cmp2"))
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout and os.path.exists(tmp_path / "cmp2" / "compare.html")


# ------------------------------------------------------------------ bad input

def test_corrupt_model_gets_the_runtimes_reason_and_the_target_serves_on(models, target, tmp_path):
    bad = tmp_path / "corrupt.onnx"
    data = bytearray(open(models["fp32"], "rb").read())
    bad.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(bench.BenchError) as ei:
        bench.run(addr(target), str(bad), "digits", progress=False)
    msg = str(ei.value)
    assert "refused the model" in msg and "corrupt.onnx" in msg
    assert "onnx runtime cannot load" in msg and ("protobuf" in msg.lower() or "INVALID" in msg), msg
    assert target.sessions == 0
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(os.urandom(5000))
    with pytest.raises(bench.BenchError, match="cannot load"):
        bench.run(addr(target), str(garbage), "digits", progress=False)
    # the same target, a good model
    ok = bench.run(addr(target), models["fp32"], "digits:scale=0.0625", progress=False, limit=30)
    assert ok.complete and len(ok.ok_samples) == 30
    assert target.sessions == 0


def test_inputs_that_do_not_fit_are_refused_before_streaming(models, target):
    with pytest.raises(bench.BenchError) as ei:
        bench.run(addr(target), models["fp32"], "digits:shape=8x8", progress=False)
    msg = str(ei.value)
    assert "nothing was streamed" in msg and "[?, 64]" in msg and "[8, 8]" in msg, msg
    f64 = bench.ArrayDataset(models["x"].astype(np.float64), models["y"], [str(i) for i in range(10)])
    with pytest.raises(bench.BenchError, match="dtype float64, the model wants float32"):
        bench.run(addr(target), models["fp32"], f64, progress=False)
    named = bench.ArrayDataset(models["x"], models["y"])
    with pytest.raises(bench.BenchError, match="no input 'pixels'"):
        bench.run(addr(target), models["fp32"], named, progress=False, input_name="pixels")
    assert target.sessions == 0  # each refused run closed its session


def test_a_bad_sample_mid_run_is_an_error_of_that_sample_and_the_run_goes_on(models, target):
    class Mixed:
        classes = [str(i) for i in range(10)]

        def __len__(self):
            return 10

        def __iter__(self):
            for i in range(10):
                x = models["x"][i]
                yield (x[:32] if i == 4 else x), int(models["y"][i])  # sample 4 has 32 values, not 64

    result = bench.run(addr(target), models["fp32"], Mixed(), progress=False)
    assert result.complete
    errs = [s for s in result.samples if "error" in s]
    assert [s["index"] for s in errs] == [4]
    assert errs[0]["error"] == "DATA: input 'X': shape [32], the model wants rank 2 [?, 64]"
    assert len(result.ok_samples) == 9 and result.summary()["errors"] == 1


def test_a_target_that_dies_mid_run_leaves_a_partial_report_naming_the_error(models, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "edgeml", "serve", "--port", "0", "--host", "127.0.0.1",
                             "--quiet"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        port = int(line.split(" on 127.0.0.1:")[1].split(",")[0])

        class Killer:
            """digits, killing the target (SIGKILL) before sample 50."""
            classes = [str(i) for i in range(10)]

            def __len__(self):
                return 200

            def __iter__(self):
                for i in range(200):
                    if i == 50:
                        proc.send_signal(signal.SIGKILL)
                        proc.wait(timeout=10)
                    yield models["x"][i], int(models["y"][i])

        out = tmp_path / "partial"
        result = bench.run(f"127.0.0.1:{port}", models["fp32"], Killer(), out=str(out), progress=False,
                           timeout=scaled(10))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    assert not result.complete
    assert result.error.startswith("lost the target after 50 samples"), result.error
    assert len(result.ok_samples) == 50
    m = json.load(open(out / "measurements.json"))
    assert m["meta"]["complete"] is False and "lost the target" in m["meta"]["error"]
    assert len(m[P.K_TARGET_STEP]) == 50 and m["summary"]["quality"]["total"] == 50
    md = (out / "report.md").read_text()
    assert "**Incomplete run: lost the target after 50 samples" in md
    assert is_png(out / "inference_time.png")


# ------------------------------------------------------------------ the protocol

def test_protocol_refusals(models, target, make_client):
    c = make_client(target.port)
    hello = c.call(P.HELLO, {})
    assert hello["status"] == "OK" and hello["protocol"] == P.PROTOCOL_VERSION and "onnx" in hello["runtimes"]

    def err(name, payload):
        r = c.call(name, payload)
        assert r["status"] == "ERROR", r
        return r["error"]

    assert "no session 'nope'" in err(P.DATA, {"session": "nope", "inputs": {}})
    assert "must be a map" in err(P.PROCESS, [1, 2])
    assert "total must be" in err(P.MODEL, {"session": None, "offset": 0, "total": 0, "chunk": b""})
    assert "unknown format 'pt'" in err(P.MODEL, {"session": None, "offset": 0, "total": 3, "chunk": b"abc",
                                                  "format": "pt"})
    assert "chunk must be bytes" in err(P.MODEL, {"session": None, "offset": 0, "total": 3, "chunk": "abc"})
    data = open(models["fp32"], "rb").read()
    # chunks out of order close the session
    r = c.call(P.MODEL, {"session": None, "offset": 0, "total": len(data), "chunk": data[:100], "name": "m"})
    assert r["status"] == "OK" and target.sessions == 1
    sid = r["session"]
    assert "not loaded yet (100 of" in err(P.PROCESS, {"session": sid})
    assert "expected 100" in err(P.MODEL, {"session": sid, "offset": 200, "total": len(data), "chunk": data[200:300]})
    assert target.sessions == 0
    # a wrong sha256
    r = c.call(P.MODEL, {"session": None, "offset": 0, "total": len(data), "chunk": data, "sha256": "0" * 64})
    assert r["status"] == "ERROR" and "sha256" in r["error"] and target.sessions == 0
    # a good session: PROCESS before DATA, OUTPUT before PROCESS, wrong inputs
    r = c.call(P.MODEL, {"session": None, "offset": 0, "total": len(data), "chunk": data})
    assert r["status"] == "OK" and r["inputs"] == [{"name": "X", "shape": [None, 64], "dtype": "float32"}]
    sid = r["session"]
    assert "send DATA first" in err(P.PROCESS, {"session": sid})
    assert "send PROCESS first" in err(P.OUTPUT, {"session": sid})
    assert "missing ['X']" in err(P.DATA, {"session": sid, "inputs": {"Y": models["x"][:1]}})
    assert "must be a map" in err(P.DATA, {"session": sid, "inputs": [1]})
    assert c.call(P.DATA, {"session": sid, "inputs": {"X": models["x"][:3]}})["status"] == "OK"
    r = c.call(P.PROCESS, {"session": sid})
    assert r["status"] == "OK" and r["target_s"] > 0
    out = c.call(P.OUTPUT, {"session": sid})["outputs"]
    assert out["probabilities"].shape == (3, 10) and out["label"].shape == (3,)
    st = c.call(P.STATS, {"session": sid, "since": 0})
    assert st["status"] == "OK" and st["next"] == len(st["samples"]["timestamp"]) and st["inferences"] == 1
    assert "since must be" in err(P.STATS, {"session": sid, "since": -1})
    end = c.call(P.END, {"session": sid})
    assert end["status"] == "OK" and len(end[P.K_TARGET_STEP]) == 1 and len(end["samples"]["timestamp"]) >= 1
    assert target.sessions == 0
    assert "no session" in err(P.STATS, {"session": sid})


def test_sessions_left_behind_are_closed(models, cleanup, make_client, tmp_path):
    """A half-uploaded model ENDs; a session its host forgot is closed
    after session_idle_s; a dataset that raises mid-run stops the run with
    a partial report, and its session is closed."""
    t = cleanup(bench.Target(0, host="127.0.0.1", session_idle_s=0.3).start())
    c = make_client(t.port)
    data = open(models["fp32"], "rb").read()
    r = c.call(P.MODEL, {"session": None, "offset": 0, "total": len(data), "chunk": data[:100]})
    assert c.call(P.END, {"session": r["session"]})["status"] == "OK" and t.sessions == 0
    assert "empty chunk" in c.call(P.MODEL, {"session": c.call(P.MODEL, {"session": None, "offset": 0,
                                                                          "total": len(data),
                                                                          "chunk": data[:10]})["session"],
                                             "offset": 10, "total": len(data), "chunk": b""})["error"]
    r = c.call(P.MODEL, {"session": None, "offset": 0, "total": len(data), "chunk": data})
    assert r["status"] == "OK" and t.sessions == 1
    from conftest import wait_until
    assert wait_until(lambda: t.sessions == 0, timeout=10)  # forgotten: closed, its sampler stopped

    class Breaks:
        classes = [str(i) for i in range(10)]

        def __iter__(self):
            for i in range(100):
                if i == 7:
                    raise OSError("cannot identify image file 'broken.png'")
                yield models["x"][i], int(models["y"][i])

    result = bench.run(f"127.0.0.1:{t.port}", models["fp32"], Breaks(), out=str(tmp_path / "b"), progress=False)
    assert not result.complete and len(result.ok_samples) == 7
    assert result.error == "the dataset failed at sample 7: OSError: cannot identify image file 'broken.png'"
    assert t.sessions == 0 and os.path.exists(tmp_path / "b" / "report.md")

    class BadLabels:
        classes = []

        def __iter__(self):
            yield models["x"][0], "cat"
            yield models["x"][1], 1

    result = bench.run(f"127.0.0.1:{t.port}", models["fp32"], BadLabels(), progress=False)
    assert result.complete and "not an (input, label) pair with an int label" in result.samples[0]["error"]
    assert result.samples[1]["prediction"] is not None


def test_sampler_forgets_what_was_fetched():
    s = S.Sampler(hz=100)
    s.start()
    from conftest import wait_until
    assert wait_until(lambda: len(s) >= 4)
    s.stop()
    n = len(s)
    first, nxt = s.since(0, forget_before=True)
    assert nxt == n and len(first["timestamp"]) == n
    again, nxt2 = s.since(nxt, forget_before=True)
    assert again["timestamp"] == [] and nxt2 == n and len(s) == n
    assert s.since(0)[0]["timestamp"] == []  # forgotten: asking from 0 gives what is left


def test_a_busy_target_says_so(models, cleanup, make_client):
    t = cleanup(bench.Target(0, host="127.0.0.1", max_sessions=1).start())
    c = make_client(t.port)
    data = open(models["fp32"], "rb").read()
    r = c.call(P.MODEL, {"session": None, "offset": 0, "total": len(data), "chunk": data})
    assert r["status"] == "OK"
    with pytest.raises(bench.BenchError, match="the target is busy: 1 sessions are open"):
        bench.run(f"127.0.0.1:{t.port}", models["fp32"], "digits", progress=False)
    c.call(P.END, {"session": r["session"]})
    assert bench.run(f"127.0.0.1:{t.port}", models["fp32"], "digits:scale=0.0625", progress=False,
                     limit=5).complete


def test_not_a_bench_target(make_server, tmp_path):
    srv = make_server({"bench.HELLO": lambda p: {"hello": 1}})
    model = tmp_path / "m.onnx"
    model.write_bytes(b"x")
    with pytest.raises(edgeml.errors.EdgeMLError, match="is it edgeml serve"):
        bench.run(f"127.0.0.1:{srv.port}", str(model), "digits", progress=False)
    plain = make_server()
    with pytest.raises(bench.BenchError, match="serves edgeml but not the bench protocol: is it edgeml serve"):
        bench.run(f"127.0.0.1:{plain.port}", str(model), "digits", progress=False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="host:port"):
        bench.run("localhost", "m.onnx")
    with pytest.raises(ValueError, match="no model file"):
        bench.run("localhost:1", "/nonexistent/m.onnx")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        bench.load_dataset("mnist")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['size'\]"):
        bench.load_dataset("digits:size=3")
    with pytest.raises(ValueError, match="must hold 64 values"):
        bench.load_dataset("digits:shape=3x3")
    with pytest.raises(ValueError, match="max_sessions"):
        bench.Target(0, max_sessions=0)


# ------------------------------------------------------------------ sampler

def test_sampler_series_and_indices():
    s = S.Sampler(hz=50).start()
    try:
        from conftest import wait_until
        assert wait_until(lambda: len(s) >= 3)
    finally:
        s.stop()
    n = len(s)
    series, nxt = s.since(0)
    assert nxt == n and len(series["timestamp"]) == n
    assert set(series) >= {"timestamp", "cpus_percent", "mem_percent", "rss_bytes"}
    assert all(len(c) == len(S._read_proc_stat()) for c in series["cpus_percent"])
    assert series["timestamp"] == sorted(series["timestamp"]) and all(r > 0 for r in series["rss_bytes"])
    tail, nxt2 = s.since(n - 1)
    assert nxt2 == n and tail["timestamp"] == series["timestamp"][-1:]
    assert s.since(n + 10)[0]["timestamp"] == []
    with pytest.raises(ValueError):
        S.Sampler(hz=0)


def test_proc_parsing(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 0 10 80 0 0 0 0 0 0\n"
                    "cpu0 5 0 5 40 0 0 0 0 0 0\n"
                    "cpu1 1 1 1 90 7 0 0 0 0 0\n"
                    "intr 1 2 3\n")
    assert S._read_proc_stat(str(stat)) == {0: (10, 50), 1: (3, 100)}
    cpu = S._ProcCpu(str(stat))
    cpu.cores = 2
    stat.write_text("cpu  10 0 10 80 0 0 0 0 0 0\n"
                    "cpu0 15 0 5 80 0 0 0 0 0 0\n")  # cpu1 went offline (a board parking a core)
    assert cpu.sample() == [20.0, None]
    from edgeml.bench.report import BenchResult
    r = BenchResult([], {"timestamp": [1, 2], "cpus_percent": [[20.0, None], [40.0, 10.0]], "mem_percent": [5, 6]},
                    {"complete": True})
    u = r.summary()["utilization"]
    assert u["cpu_percent_mean"] == pytest.approx(70 / 3) and u["cpu_percent_per_core_mean"] == [30.0, 10.0]
    assert "per core: 30, 10" in r.markdown()
    mem = tmp_path / "meminfo"
    mem.write_text("MemTotal:       1000 kB\nMemFree:         100 kB\nMemAvailable:    250 kB\n")
    assert S._read_meminfo(str(mem)) == 75.0


FAKE_NVML = textwrap.dedent("""
    class NVMLError(Exception):
        pass

    class _U:
        gpu = 37

    class _M:
        used = 1 << 30
        total = 4 << 30

    calls = {"init": 0, "shutdown": 0}

    def nvmlInit():
        calls["init"] += 1

    def nvmlShutdown():
        calls["shutdown"] += 1

    def nvmlDeviceGetCount():
        return 2

    def nvmlDeviceGetHandleByIndex(i):
        return i

    def nvmlDeviceGetName(h):
        return b"Fake GPU %d" % h

    def nvmlDeviceGetUtilizationRates(h):
        return _U()

    def nvmlDeviceGetMemoryInfo(h):
        return _M()
""")


def test_gpu_figures_through_nvml(tmp_path, monkeypatch, models, cleanup):
    (tmp_path / "pynvml.py").write_text(FAKE_NVML)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    s = S.Sampler(hz=50).start()
    s.stop()
    import pynvml
    assert pynvml.calls == {"init": 1, "shutdown": 1}
    assert s.gpu_names == [] and s.gpu_reason == ""
    series, _ = s.since(0)
    assert series["gpu_utilization"] and all(v == 37.0 for v in series["gpu_utilization"])
    assert all(v == 25.0 for v in series["gpu_mem_utilization"])
    # through a whole run: the report has the GPU's figures
    t = cleanup(bench.Target(0, host="127.0.0.1").start())
    result = bench.run(f"127.0.0.1:{t.port}", models["fp32"], "digits:scale=0.0625", out=str(tmp_path / "o"),
                       progress=False, limit=50)
    assert result.meta["gpus"] == ["Fake GPU 0", "Fake GPU 1"] and result.meta["gpu"] == ""
    u = result.summary()["utilization"]
    assert u["gpu_utilization_mean"] == 37.0 and u["gpu_mem_utilization_max"] == 25.0
    m = json.load(open(tmp_path / "o" / "measurements.json"))
    assert m[P.K_GPU] and set(m[P.K_GPU]) == {37.0} and set(m[P.K_GPU_MEM]) == {25.0}
    assert "- GPU: 37.0% mean" in (tmp_path / "o" / "report.md").read_text()


def test_no_nvml_is_said():
    gpu, reason = S.open_gpu()
    if gpu is not None:  # a machine with a GPU and its driver
        gpu.close()
        pytest.skip("NVML works here")
    assert reason.startswith("no NVML") or reason.startswith("NVML not usable")


# ------------------------------------------------------------------ datasets

def test_digits_dataset():
    ds = bench.load_dataset("digits")
    assert len(ds) == 1797 and ds.classes == [str(i) for i in range(10)]
    x, y = next(iter(ds))
    assert x.shape == (64,) and x.dtype == np.float32 and x.max() <= 16 and isinstance(y, int)
    x, _ = next(iter(bench.load_dataset("digits:shape=1x8x8,scale=0.0625")))
    assert x.shape == (1, 8, 8) and x.max() <= 1


def test_image_folder_dataset(tmp_path):
    from PIL import Image
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    ds = bench.load_dataset(f"images:{root}")
    assert len(ds) == 6 and ds.classes == ["cat", "dog"]
    items = list(ds)
    assert [y for _, y in items] == [0, 0, 0, 1, 1, 1]
    assert items[0][0].shape == (20, 30, 3) and items[0][0].dtype == np.float32
    with Image.open(root / "cat" / "0.png") as im:
        assert np.array_equal(items[0][0], np.asarray(im).astype(np.float32))
    ds = bench.load_dataset(f"images:{root},size=8x10,layout=nchw,scale=0.00392156862745098,mean=0.5/0.5/0.5,"
                            f"std=0.25/0.25/0.25")
    x, _ = next(iter(ds))
    assert x.shape == (1, 3, 8, 10) and x.dtype == np.float32 and x.min() >= -2.01 and x.max() <= 2.01
    x, _ = next(iter(bench.load_dataset(f"images:{root},gray,dtype=uint8,layout=chw")))
    assert x.shape == (1, 20, 30) and x.dtype == np.uint8
    with pytest.raises(ValueError, match="no folder"):
        bench.load_dataset(f"images:{tmp_path}/nope")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images in"):
        bench.load_dataset(f"images:{tmp_path}/empty")
    with pytest.raises(ValueError, match="layout= is"):
        bench.load_dataset(f"images:{root},layout=xyz")


PLUGIN = textwrap.dedent("""
    import numpy as np
    from sklearn.datasets import load_digits

    class FirstHundred:
        classes = [str(i) for i in range(10)]

        def __init__(self):
            d = load_digits()
            self.x = (d.data[:100] / 16).astype(np.float32)
            self.y = d.target[:100]

        def __len__(self):
            return 100

        def __iter__(self):
            for x, y in zip(self.x, self.y):
                yield {"X": x[None]}, int(y)

    def make():
        return FirstHundred()
""")


def test_plugin_dataset_end_to_end(models, target, tmp_path):
    path = tmp_path / "mydata.py"
    path.write_text(PLUGIN)
    for spec in (f"{path}::FirstHundred", f"{path}::make"):
        result = bench.run(addr(target), models["fp32"], spec, progress=False)
        assert result.complete and len(result.samples) == 100
        preds, _ = local_predictions(models["fp32"], models["x"][:100])
        assert [s["prediction"] for s in result.samples] == preds
        assert result.meta["input_note"] == "the dataset's map of inputs"


# ------------------------------------------------------------------ CLI

def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "edgeml", *args], capture_output=True, text=True,
                          timeout=scaled(timeout))


def test_cli_serve_and_bench(models, tmp_path):
    srv = subprocess.Popen([sys.executable, "-m", "edgeml", "serve", "--port", "0", "--host", "127.0.0.1"],
                           stdout=subprocess.PIPE, text=True)
    try:
        line = srv.stdout.readline()
        assert "benchmark target on 127.0.0.1:" in line and "onnxruntime" in line, line
        port = int(line.split(" on 127.0.0.1:")[1].split(",")[0])
        out = tmp_path / "cli"
        r = cli("bench", "--target", f"127.0.0.1:{port}", "--model", models["fp32"], "--dataset",
                "digits:scale=0.0625", "--out", str(out), "--limit", "150")
        assert r.returncode == 0, r.stderr
        assert "accuracy" in r.stdout and "round trip (PROCESS)" in r.stdout and "150 samples, 0 errors" in r.stdout
        assert "edgeml bench: 150/150 (100%)" in r.stderr  # progress, a line per 10% off a terminal
        assert json.load(open(out / "measurements.json"))["total"] == 150
        r = cli("bench", "--target", f"127.0.0.1:{port}", "--model", models["fp32"], "--dataset",
                "digits:shape=8x8", "--out", str(tmp_path / "x"), "--quiet")
        assert r.returncode == 1 and "nothing was streamed" in r.stderr
        r = cli("bench", "--target", f"127.0.0.1:{port}", "--model", str(tmp_path / "none.onnx"))
        assert r.returncode == 2 and "no model file" in r.stderr
        r = cli("bench", "compare", str(tmp_path / "nothing"))
        assert r.returncode == 2 and "no run" in r.stderr
    finally:
        srv.send_signal(signal.SIGTERM)  # stops cleanly, as Ctrl-C does
        try:
            srv.wait(timeout=scaled(15))
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()
    assert srv.returncode == 0
    r = cli("bench", "--target", f"127.0.0.1:{port}", "--model", models["fp32"], "--timeout", "2", "--quiet",
            "--out", str(tmp_path / "down"))
    assert r.returncode != 0 and "127.0.0.1" in r.stderr


def test_a_target_with_a_token(models, cleanup):
    t = cleanup(bench.Target(0, host="127.0.0.1", token="s3cret").start())
    with pytest.raises(edgeml.errors.EdgeMLError, match="(?i)token"):
        bench.run(f"127.0.0.1:{t.port}", models["fp32"], "digits", progress=False, timeout=scaled(5))
    assert bench.run(f"127.0.0.1:{t.port}", models["fp32"], "digits:scale=0.0625", progress=False, limit=5,
                     token="s3cret").complete


def test_a_model_of_several_chunks_as_they_are(target, tmp_path):
    """A 10 MiB ONNX model (a 64 x 40960 float32 initializer) goes as
    4 MiB chunks; the outputs are the model's."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 40960)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"]), helper.make_node("ReduceMax", ["Y"], ["Z"], axes=[1],
                                                                         keepdims=0)],
        "big", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("Z", TensorProto.FLOAT, [None])], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    path = tmp_path / "big.onnx"
    onnx.save(model, str(path))
    size = os.path.getsize(path)
    assert size > 2 * P.CHUNK_BYTES
    x = rng.standard_normal((5, 64)).astype(np.float32)
    result = bench.run(addr(target), str(path), bench.ArrayDataset(x), progress=False, output="Z")
    assert result.complete and result.meta["model_bytes"] == size and result.meta["prediction_kind"] == "label"
    assert len(result.ok_samples) == 5 and result.summary()["quality"] == {"total": 0}


def test_tflite_through_ai_edge_litert(target, models, tmp_path):
    """A TFLite model (a logistic regression's weights as one
    FULLY_CONNECTED layer, written without TensorFlow) runs on the target
    through ai-edge-litert; its predictions are a local interpreter's."""
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("tflite")
    from ai_edge_litert.interpreter import Interpreter
    from sklearn.linear_model import LogisticRegression

    import tflite_model
    x, y = models["x"], models["y"]
    clf = LogisticRegression(max_iter=1000).fit(x[::2], y[::2])
    path = tmp_path / "digits.tflite"
    path.write_bytes(tflite_model.fully_connected(clf.coef_, clf.intercept_))
    result = bench.run(addr(target), str(path), "digits:scale=0.0625", progress=False, limit=300)
    assert result.complete, result.error
    assert result.meta["runtime"] == "ai-edge-litert" and result.meta["inputs"] == [
        {"name": "x", "shape": [1, 64], "dtype": "float32"}]
    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    din, dout = it.get_input_details()[0], it.get_output_details()[0]
    want = []
    for row in x[:300]:
        it.set_tensor(din["index"], row[None])
        it.invoke()
        want.append(int(np.argmax(it.get_tensor(dout["index"])[0])))
    assert [s["prediction"] for s in result.samples] == want
    assert result.summary()["quality"]["accuracy"] > 0.9
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer" * 10)
    with pytest.raises(bench.BenchError, match="tflite runtime cannot load 'bad.tflite'"):
        bench.run(addr(target), str(bad), "digits", progress=False)
