"""The C side: unit tests (csrc/tests) and the C example calling a Python
InferenceServer through the public header."""
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
BUILD = os.path.join(CSRC, "build-test")


@pytest.fixture(scope="module")
def built():  # noqa: D401 - builds once per module
    if shutil.which("make") is None or shutil.which("cc") is None:
        pytest.fail("make and a C compiler are needed to build libedgeml")
    r = subprocess.run(["make", "-C", CSRC, f"BUILD={BUILD}", "-j2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "warning" not in r.stderr, r.stderr
    return BUILD


@pytest.mark.parametrize("name", ["test_wire", "test_rpc", "test_timing", "test_value", "test_roles", "test_defer", "test_cuda", "test_batch"])
def test_c_unit(built, name):
    r = subprocess.run([os.path.join(built, "tests", name)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 0 failed" in r.stdout


def test_library_artifacts(built):
    for f in ("libedgeml.so", "libedgeml.a", "edgeml.pc"):
        assert os.path.exists(os.path.join(built, f)), f
    pc = open(os.path.join(built, "edgeml.pc")).read()
    assert "Libs: -L${libdir} -ledgeml" in pc and "Requires.private: libuv" in pc


def test_c_example_calls_python_server(built, make_server):
    s = make_server({"echo": lambda p: {**p, "sum": float(p["x"].sum()), "shape": p["x"].shape}})
    exe = os.path.join(built, "edgeml_call")
    r = subprocess.run([exe, "127.0.0.1", str(s.port)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "array dtype=<f4 shape=(2,3) values=0,1,2,3,4,5" in r.stdout
    assert '"note": "from C"' in r.stdout and '"sum": 15' in r.stdout
    r = subprocess.run([exe, "127.0.0.1", str(s.port), "missing"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "UnknownInterfaceError" in r.stdout


@pytest.mark.timeout(600)
@pytest.mark.parametrize("san", ["asan", "tsan"])
def test_c_unit_under_sanitizers(san):
    """ASan+UBSan and TSan builds of the C tests (the queue between threads
    is where races hide)."""
    build = os.path.join(CSRC, f"build-{san}")
    r = subprocess.run(["make", "-C", CSRC, f"BUILD={build}", f"SAN={san}", "-j2", "test"],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1", "ASAN_OPTIONS": "detect_leaks=1"})
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert r.stdout.count(" 0 failed") == 8
