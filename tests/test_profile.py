"""edgeml.profile and `edgeml profile`: plugins, model stages, the report
files, the CLI end to end, and its errors."""
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import edgeml
from edgeml import profile

from conftest import scaled

pytestmark = pytest.mark.timeout(120)

MODEL = textwrap.dedent("""
    import time
    from edgeml.profile import stage

    class Model:
        def preprocess(self, x):
            return len(x)

        @stage("backbone")
        def backbone(self, n):
            time.sleep(0.003)
            return n

        def infer(self, n):
            with stage("head"):
                time.sleep(0.001)
            return {"n": self.backbone(n)}

        def postprocess(self, y):
            return y["n"] * 2

    class Broken:
        def infer(self, x):
            raise RuntimeError("model exploded")

    class Sensor:
        def sample(self):
            return b"z" * 5000
""")


@pytest.fixture
def plugin(tmp_path):
    path = tmp_path / "myplugin.py"
    path.write_text(MODEL)
    return str(path)


def is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000


def test_api_run_with_plugins_and_model_stages(plugin, tmp_path, cleanup):
    server = cleanup(profile.serve(f"{plugin}::Model", port=0, host="127.0.0.1", threaded=True))
    result = profile.run("127.0.0.1", server.port, f"{plugin}::Sensor", iterations=25, warmup=2, progress=False)
    assert len(result.samples) == 25 and not any("error" in s for s in result.samples)
    for s in result.samples:
        st = s["model_stages"]
        assert set(st) == {"preprocess", "infer", "postprocess", "backbone", "head"}
        assert st["backbone"] >= 3.0 and st["head"] >= 1.0
        assert st["infer"] >= st["backbone"] + st["head"]
        assert s["handler_ms"] >= st["preprocess"] + st["infer"] + st["postprocess"]
        assert s["bytes_up"] > 5000
        assert s["total_ms"] >= s["rtt_ms"] >= s["handler_ms"]
    # model stages in the order they start, nested ones after their parent
    assert result.stages == ["sense", "encode", "upload", "queue", "handler", "preprocess", "infer", "head",
                             "backbone", "postprocess", "reply", "download", "decode", "rtt", "total"]
    summary = result.summary()
    assert summary["stages_ms"]["backbone"]["count"] == 25
    assert summary["stages_ms"]["backbone"]["p50"] >= 3.0
    assert summary["errors"] == 0
    paths = result.write(str(tmp_path / "out"))
    data = json.load(open(paths["json"]))
    assert len(data["samples"]) == 25 and data["meta"]["sensor"].startswith("<")
    assert data["meta"]["server"]["model"].startswith("<")
    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == 25 and float(rows[0]["backbone_ms"]) >= 3.0
    assert is_png(paths["stages_png"]) and is_png(paths["timeline_png"])
    assert "backbone" in result.table()


def test_builtin_plugins_and_rate(cleanup):
    server = cleanup(profile.serve("echo", port=0, host="127.0.0.1", threaded=True))
    t0 = time.monotonic()
    result = profile.run("127.0.0.1", server.port, "random_image:16x8x3", iterations=20, warmup=0, rate=50,
                         progress=False)
    assert time.monotonic() - t0 >= 19 / 50  # paced: 20 calls at 50/s take at least 0.38 s
    assert result.meta["achieved_rate_hz"] <= 50 * 1.05
    assert all(s["bytes_up"] > 16 * 8 * 3 for s in result.samples)
    with pytest.raises(ValueError, match="unknown sensor"):
        profile.load_object("camera", "sensor")
    with pytest.raises(ValueError, match="224x224x3"):
        profile.load_object("random_image:axb", "sensor")
    with pytest.raises(ValueError, match="no attribute"):
        profile.load_object("edgeml.profile::Nope", "model")
    with pytest.raises(ValueError, match="iterations"):
        profile.run("127.0.0.1", server.port, iterations=0)
    assert repr(profile.load_object("sleep:2.5", "model")) == "sleep:2.5"


def test_stage_outside_a_run_is_transparent():
    @profile.stage("x")
    def f(a, b=1):
        return a + b

    assert f(1, b=2) == 3
    with profile.record() as rec:
        f(1)
        f(1)
        with profile.stage("y"):
            pass
    assert set(rec) == {"x", "y"} and rec["x"] >= 0
    with pytest.raises(ValueError):
        profile.stage("")


def test_failing_model_is_reported_per_call(plugin, cleanup):
    server = cleanup(profile.serve(f"{plugin}::Broken", port=0, host="127.0.0.1", threaded=True))
    result = profile.run("127.0.0.1", server.port, "random_bytes:10", iterations=3, warmup=0, progress=False)
    assert [("model exploded" in s.get("error", "")) for s in result.samples] == [True] * 3
    assert result.summary()["errors"] == 3


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "edgeml", *args], capture_output=True, text=True,
                          timeout=scaled(timeout))


def test_cli_end_to_end(plugin, tmp_path):
    srv = subprocess.Popen([sys.executable, "-m", "edgeml", "profile", "server", "--port", "0", "--host",
                            "127.0.0.1", "--model", f"{plugin}::Model"], stdout=subprocess.PIPE, text=True)
    try:
        line = srv.stdout.readline()
        assert "edgeml profile server" in line, line
        port = int(line.split("127.0.0.1:")[1].split()[0])
        out = tmp_path / "report"
        r = run_cli("profile", "client", "--host", "127.0.0.1", "--port", str(port), "--sensor",
                    "random_image:32x32x3", "--iterations", "30", "--warmup", "3", "--rate", "500",
                    "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert "backbone" in r.stdout and "p50 ms" in r.stdout and "symmetric" in r.stdout
        assert "profile: 30/30 (100%)" in r.stderr  # progress, one line per 10% when not a terminal
        data = json.load(open(out / "profile.json"))
        assert data["summary"]["stages_ms"]["rtt"]["count"] == 30
        assert data["meta"]["one_way_basis"].startswith("estimated")
        assert len(list(csv.DictReader(open(out / "samples.csv")))) == 30
        assert is_png(out / "stages.png") and is_png(out / "timeline.png")
        # synchronised clocks declared, no plots
        r = run_cli("profile", "client", "--host", "127.0.0.1", "--port", str(port), "--iterations", "5",
                    "--warmup", "0", "--out", str(tmp_path / "r2"), "--no-plots", "--clocks-synchronized",
                    "--quiet", "--sensor", "random_bytes:100")
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""
        assert json.load(open(tmp_path / "r2" / "profile.json"))["meta"]["one_way_basis"].startswith("clocks")
        assert not (tmp_path / "r2" / "stages.png").exists()
    finally:
        srv.send_signal(signal.SIGINT)
        assert srv.wait(timeout=scaled(10)) == 0  # Ctrl-C stops it cleanly


def test_cli_errors(make_server, tmp_path):
    r = run_cli("profile", "client", "--host", "127.0.0.1", "--port", "1", "--out", str(tmp_path))
    assert r.returncode == 2 and "cannot connect" in r.stderr
    s = make_server()  # an edgeml server, but not a profile one
    r = run_cli("profile", "client", "--host", "127.0.0.1", "--port", str(s.port), "--out", str(tmp_path))
    assert r.returncode == 2 and "not a profile server" in r.stderr
    r = run_cli("profile", "client", "--host", "127.0.0.1", "--port", str(s.port), "--sensor", "webcam")
    assert r.returncode == 2 and "unknown sensor 'webcam'" in r.stderr
    r = run_cli("profile", "server", "--model", "nosuchmodule::M", "--port", "0")
    assert r.returncode != 0 and "nosuchmodule" in r.stderr
    r = run_cli("--version")
    assert r.returncode == 0 and edgeml.__version__ in r.stdout


# ------------------------------------------------------------- notebooks

BACKEND_SCRIPT = textwrap.dedent("""
    import sys
    import matplotlib
    matplotlib.use("svg")          # the user's choice, before edgeml draws anything
    {pyplot}
    from edgeml import profile
    server = profile.serve("echo", port=0, host="127.0.0.1", threaded=True)
    try:
        r = profile.run("127.0.0.1", server.port, "random_bytes:100", iterations=8, warmup=0, progress=False)
    finally:
        server.stop()
    paths = r.write(sys.argv[1])
    figs = r.figures()
    page = r._repr_html_()
    import json
    print(json.dumps({{"backend": matplotlib.get_backend(), "pyplot": "matplotlib.pyplot" in sys.modules,
                      "fignums": __import__("matplotlib.pyplot").pyplot.get_fignums() if {with_pyplot} else [],
                      "png": figs["stages"]._repr_png_()[:8].hex(), "img": "<img" in page,
                      "files": sorted(paths)}}))
""")


@pytest.mark.parametrize("with_pyplot", [True, False])
def test_plots_leave_the_users_matplotlib_backend_alone(tmp_path, with_pyplot):
    """Drawing the plots never switches the backend (so a later plt.show()
    still shows) and never adds figures to pyplot's list."""
    code = BACKEND_SCRIPT.format(pyplot="import matplotlib.pyplot as plt" if with_pyplot else "",
                                 with_pyplot=with_pyplot)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                       timeout=scaled(60))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["backend"] == "svg"
    assert out["pyplot"] == with_pyplot  # edgeml does not import pyplot
    assert out["fignums"] == []
    assert out["png"] == "89504e470d0a1a0a" and out["img"]
    assert out["files"] == ["csv", "json", "stages_png", "timeline_png"]
    assert is_png(tmp_path / "stages.png") and is_png(tmp_path / "timeline.png")


def test_result_shows_as_a_table_in_a_notebook(plugin, cleanup):
    server = cleanup(profile.serve(f"{plugin}::Model", port=0, host="127.0.0.1", threaded=True))
    result = profile.run("127.0.0.1", server.port, f"{plugin}::Sensor", iterations=10, warmup=0, progress=False)
    page = result._repr_html_()
    assert page.count("<table") == 1 and "<th>p50 ms</th>" in page and "<th>p99 ms</th>" in page
    for name in ("upload", "handler", "backbone", "head", "download", "rtt", "total"):
        assert f">{name}<" in page, name
    assert "10 samples, 0 errors" in page and "symmetric" in page
    assert "<img src='data:image/png;base64," in page  # the stage CDFs inline
    figs = result.figures()
    assert set(figs) == {"stages", "timeline"}
    assert all(f._repr_png_().startswith(b"\x89PNG") for f in figs.values())
    assert "10 samples" in repr(result)


def test_result_html_without_matplotlib(plugin, cleanup, monkeypatch):
    server = cleanup(profile.serve("echo", port=0, host="127.0.0.1", threaded=True))
    result = profile.run("127.0.0.1", server.port, "random_bytes:10", iterations=3, warmup=0, progress=False)
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.setattr(profile, "_InlineFigure", None)
    page = result._repr_html_()
    assert "<table" in page and "<img" not in page
    with pytest.raises(RuntimeError, match="plots need matplotlib"):
        result.figures()


class _TTY:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_on_a_terminal_is_a_tqdm_bar():
    pytest.importorskip("tqdm")
    tty = _TTY()
    bar = profile.Progress(30, "profile", stream=tty)
    assert bar.bar is not None
    for i in range(30):
        bar.update(i + 1, "rtt p50 0.10 ms")
    bar.close()
    assert "30/30" in tty.text and "100%" in tty.text and "call" in tty.text and "|" in tty.text


def test_progress_without_tqdm_writes_lines(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    tty = _TTY()
    bar = profile.Progress(20, "profile", stream=tty)
    assert bar.bar is None
    for i in range(20):
        bar.update(i + 1)
    bar.close()
    assert tty.text.splitlines()[-1].startswith("profile: 20/20 (100%)")
    assert len(tty.text.splitlines()) == 11  # 0%, 10%, ..., 100%


def test_progress_in_a_notebook_uses_tqdm_auto(monkeypatch):
    """In a Jupyter kernel (stderr is no terminal there) the bar comes from
    tqdm.auto, which draws a widget."""
    import types
    made = []

    class FakeTqdm:
        def __init__(self, **kw):
            made.append(kw)
            self.n = 0

        def update(self, k):
            self.n += k

        def set_postfix_str(self, s, refresh=True):
            pass

        def close(self):
            made.append(("closed", self.n))

    shell = types.SimpleNamespace(config={"IPKernelApp": {}})
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    auto = types.ModuleType("tqdm.auto")
    auto.tqdm = FakeTqdm
    monkeypatch.setitem(sys.modules, "tqdm.auto", auto)
    monkeypatch.setitem(sys.modules, "ipywidgets", types.ModuleType("ipywidgets"))
    bar = profile.Progress(5, "profile")
    for i in range(5):
        bar.update(i + 1)
    bar.close()
    assert made[0]["total"] == 5 and "file" not in made[0] and made[-1] == ("closed", 5)
    # without ipywidgets: tqdm's text bar on stderr, not tqdm.auto's warning
    pytest.importorskip("tqdm")
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    made.clear()
    bar = profile.Progress(5, "profile")
    assert not made and bar.bar is not None and type(bar.bar).__name__ == "tqdm"
    bar.close()


def test_cli_without_matplotlib_writes_the_numbers_and_says_how_to_get_plots(tmp_path, cleanup):
    server = cleanup(profile.serve("echo", port=0, host="127.0.0.1", threaded=True))
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from edgeml.cli import main\n"
            f"sys.exit(main(['profile', 'client', '--host', '127.0.0.1', '--port', '{server.port}', '--iterations',"
            f" '5', '--warmup', '0', '--quiet', '--sensor', 'random_bytes:10', '--out', {str(tmp_path)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled(60))
    assert r.returncode == 0, r.stderr
    assert "no plots" in r.stderr and 'pip install -e ".[profile]"' in r.stderr
    assert "p50 ms" in r.stdout
    assert (tmp_path / "profile.json").exists() and not (tmp_path / "stages.png").exists()
