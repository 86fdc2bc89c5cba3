"""The CUDA layer of the C core (csrc/cuda, docs/cuda.md) without a GPU:
csrc/tests/test_cuda.c against the fake CUDA runtime (tests/fake_cudart),
plainly and under ASan, the error messages of em_cuda_open for each thing
that can be missing, and the real libcudart of this machine when it has
one (no GPU: ENODEV "no CUDA device")."""
import ctypes
import ctypes.util
import glob
import importlib.util
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
_spec = importlib.util.spec_from_file_location("fake_cudart_build", os.path.join(ROOT, "tests", "fake_cudart", "build.py"))
fake_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_build)

# environment knobs that must not leak in from the caller's shell
KNOBS = ("EDGEML_CUDART", "EDGEML_CUDART_ONLY", "FAKE_CUDA_DEVICES", "FAKE_CUDA_DRIVER", "FAKE_CUDA_RUNTIME",
         "FAKE_CUDA_FAIL_MALLOC", "FAKE_CUDA_FAIL_HOSTALLOC", "FAKE_CUDA_IMMEDIATE", "FAKE_CUDA_STATS")


def clean_env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    env.update(kw)
    return env


def make_test_cuda(build, san=None):
    if shutil.which("make") is None or shutil.which("cc") is None:
        pytest.fail("make and a C compiler are needed")
    cmd = ["make", "-C", CSRC, f"BUILD={build}", "-j2", f"{build}/tests/test_cuda"]
    if san:
        cmd.insert(3, f"SAN={san}")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "warning" not in r.stderr, r.stderr
    return os.path.join(build, "tests", "test_cuda")


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return fake_build.build(str(tmp_path_factory.mktemp("fake_cudart")))


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cuda-build"))


@pytest.fixture(scope="module")
def test_cuda(build_dir):
    return make_test_cuda(build_dir)


def probe(exe, *args, **env):
    r = subprocess.run([exe, "probe", *args], capture_output=True, text=True, timeout=60, env=clean_env(**env))
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"^rc=(\w+) why=(.*)$", r.stdout, re.M)
    c = re.search(r"^count=(-?\d+) count_why=(.*)$", r.stdout, re.M)
    assert m and c, r.stdout
    return m.group(1), m.group(2), int(c.group(1)), c.group(2), r.stdout


@pytest.mark.timeout(600)
def test_c_unit_against_fake_runtime(test_cuda, fake, tmp_path):
    stats = tmp_path / "stats.txt"
    r = subprocess.run([test_cuda], capture_output=True, text=True, timeout=120,
                       env=clean_env(EDGEML_CUDART=fake, FAKE_CUDA_STATS=str(stats)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 0 failed" in r.stdout and "skipped" not in r.stdout
    assert re.search(r"^(\d+) checks passed", r.stdout, re.M).group(1) != "0"
    # the counters the fake wrote at exit: pinned blocks, copies, syncs
    counts = dict(kv.split("=") for kv in stats.read_text().split())
    assert int(counts["pinned_allocs"]) >= 3 and int(counts["stream_syncs"]) >= 800
    assert int(counts["h2d_bytes"]) > 0 and counts["h2d_bytes"] == counts["d2h_bytes"]
    assert counts["live_device_allocs"] == counts["live_pinned"] == counts["live_streams"] == "0"
    assert counts["destroyed_pending"] == "0"


@pytest.mark.timeout(60)
def test_c_unit_skips_without_runtime(test_cuda):
    r = subprocess.run([test_cuda], capture_output=True, text=True, timeout=30, env=clean_env())
    assert r.returncode == 0, r.stdout + r.stderr
    assert "skipped" in r.stdout and " 0 failed" in r.stdout


@pytest.mark.timeout(60)
def test_c_unit_skips_with_a_runtime_that_is_not_the_fake(test_cuda):
    r = subprocess.run([test_cuda], capture_output=True, text=True, timeout=30,
                       env=clean_env(EDGEML_CUDART="/nonexistent/libcudart.so"))
    assert r.returncode == 0 and "skipped" in r.stdout and " 0 failed" in r.stdout


@pytest.mark.timeout(60)
def test_error_no_library(test_cuda):
    # The real libcudart is installed here, so "no library" is a missing
    # $EDGEML_CUDART with the fallback names switched off.
    rc, why, n, count_why, _ = probe(test_cuda, EDGEML_CUDART="/nonexistent/libcudart.so",
                                     EDGEML_CUDART_ONLY="1", LD_LIBRARY_PATH="")
    assert rc == "ENODEV"
    assert why.startswith("no CUDA runtime library (tried $EDGEML_CUDART=/nonexistent/libcudart.so: ")
    assert "No such file" in why and why.endswith(")")
    assert n == 0 and count_why == why


@pytest.mark.timeout(60)
def test_error_library_lacks_symbols(test_cuda):
    rc, why, n, _, _ = probe(test_cuda, EDGEML_CUDART="libm.so.6", EDGEML_CUDART_ONLY="1")
    assert rc == "ENODEV" and why.startswith("CUDA runtime library libm.so.6 lacks cudaGetDeviceCount (")
    assert n == 0


@pytest.mark.timeout(60)
def test_error_no_device(test_cuda, fake):
    rc, why, n, count_why, _ = probe(test_cuda, EDGEML_CUDART=fake, FAKE_CUDA_DEVICES="0")
    assert rc == "ENODEV"
    assert why == ("no CUDA device (cudaGetDeviceCount: cudaErrorNoDevice: "
                   "no CUDA-capable device is detected)")
    assert n == 0 and count_why == why


@pytest.mark.timeout(60)
def test_error_no_driver(test_cuda, fake):
    rc, why, _, _, _ = probe(test_cuda, EDGEML_CUDART=fake, FAKE_CUDA_DRIVER="0")
    assert rc == "ENODEV" and why.startswith("no CUDA device (cudaGetDeviceCount: cudaErrorInsufficientDriver")
    assert why.endswith("; no CUDA driver is installed)")


@pytest.mark.timeout(60)
def test_error_device_out_of_range(test_cuda, fake):
    rc, why, n, count_why, _ = probe(test_cuda, "3", EDGEML_CUDART=fake, FAKE_CUDA_DEVICES="2")
    assert rc == "ENODEV" and why == "device 3 does not exist (2 devices)"
    assert n == 2 and count_why == ""
    rc, _, _, _, out = probe(test_cuda, "1", EDGEML_CUDART=fake, FAKE_CUDA_DEVICES="2")
    assert rc == "OK" and "device=1 devices=2" in out


@pytest.mark.timeout(60)
def test_error_driver_older_than_runtime(test_cuda, fake):
    rc, why, n, count_why, _ = probe(test_cuda, EDGEML_CUDART=fake, FAKE_CUDA_DRIVER="11040",
                                     FAKE_CUDA_RUNTIME="12020")
    assert rc == "ENODEV" and why == "the driver (CUDA 11.4) is older than the runtime (CUDA 12.2)"
    assert n == 0 and count_why == why


@pytest.mark.timeout(60)
def test_open_fake_reports_info(test_cuda, fake):
    rc, why, n, _, out = probe(test_cuda, EDGEML_CUDART=fake, FAKE_CUDA_RUNTIME="13000", FAKE_CUDA_DRIVER="13010")
    assert rc == "OK" and why == "" and n == 1
    assert "info rc=OK device=0 devices=1 runtime=13000 driver=13010 cc=9.0 sms=132" in out
    assert f"library={os.path.realpath(fake)}" in out or f"library={fake}" in out


def real_cudart():
    name = ctypes.util.find_library("cudart")
    paths = sorted(glob.glob("/usr/local/cuda*/lib64/libcudart.so*"))
    return name or (paths[0] if paths else None)


def has_gpu():
    return bool(glob.glob("/dev/nvidia[0-9]*"))


@pytest.mark.timeout(120)
def test_real_runtime_without_gpu_is_enodev(test_cuda):
    lib = real_cudart()
    if lib is None:
        pytest.skip("no real libcudart on this machine")
    for env in ({}, {"EDGEML_CUDART": lib}):  # found by the fallback names, and named
        rc, why, n, _, out = probe(test_cuda, **env)
        if has_gpu():
            assert rc == "OK" and n >= 1 and "info rc=OK" in out, out
        else:
            assert rc == "ENODEV", out
            assert why.startswith("no CUDA device (cudaGetDeviceCount: "), why
            assert n == 0


@pytest.mark.timeout(60)
def test_fake_stats_with_ctypes(fake):
    lib = ctypes.CDLL(fake)
    lib.fake_cuda_stats.restype = ctypes.c_char_p
    lib.fake_cuda_stat.restype = ctypes.c_longlong
    lib.fake_cuda_stat.argtypes = [ctypes.c_char_p]
    p = ctypes.c_void_p()
    assert lib.cudaMalloc(ctypes.byref(p), ctypes.c_size_t(100)) == 0
    assert lib.fake_cuda_stat(b"live_device_allocs") == 1
    assert lib.cudaFree(ctypes.c_void_p(p.value + 8)) == 1  # not the start: cudaErrorInvalidValue
    assert lib.fake_cuda_stat(b"bad_pointers") == 1
    assert lib.cudaFree(p) == 0
    text = lib.fake_cuda_stats().decode()
    assert "mallocs=1 " in text and "live_device_allocs=0" in text and "frees=1 " in text
    assert lib.fake_cuda_stat(b"no_such_counter") == -1


@pytest.mark.timeout(60)
def test_no_cuda_types_and_no_link_to_cudart(build_dir):
    header = open(os.path.join(CSRC, "include", "edgeml_cuda.h")).read()
    code = re.sub(r"/\*.*?\*/", "", header, flags=re.S)
    assert not re.search(r"#include\s*[<\"]cuda|\bcuda[A-Z]\w*|\bCU\w+_t\b", code)  # no CUDA types
    decls = re.findall(r"^(?!\s|#|typedef|}|EM_API|extern|$).*\(", code, re.M)
    assert decls == [], decls  # every function is EM_API
    assert code.count("EM_API") >= 20
    obj = os.path.join(build_dir, "cuda", "cuda.o")
    undef = subprocess.run(["nm", "-u", obj], capture_output=True, text=True).stdout
    assert not re.search(r"\bcuda[A-Z]", undef), undef  # only dlsym'ed, never linked


@pytest.mark.timeout(600)
def test_c_unit_under_asan(fake, tmp_path_factory):
    exe = make_test_cuda(str(tmp_path_factory.mktemp("cuda-asan")), san="asan")
    r = subprocess.run([exe], capture_output=True, text=True, timeout=300,
                       env=clean_env(EDGEML_CUDART=fake, ASAN_OPTIONS="detect_leaks=1"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert " 0 failed" in r.stdout and "skipped" not in r.stdout
