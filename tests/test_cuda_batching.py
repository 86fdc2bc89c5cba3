"""InferenceServer(device="cuda") with batching, end to end, on the fake
CUDA runtime (tests/fake_cudart: device memory is tracked host memory,
copies run at stream sync): the handler gets DeviceArrays, returns device
arrays, and every caller gets its own rows; one pinned pool made once, one
host-to-device copy per array per batch, from pinned memory only, one
device-to-host copy back per output. Real GPUs: the same with torch behind
the `gpu` marker (skipped here: no device)."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("fake_cudart_build", os.path.join(ROOT, "tests", "fake_cudart", "build.py"))
fake_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake_build)

pytestmark = pytest.mark.timeout(120)

SCRIPT = textwrap.dedent(r'''
    import ctypes, json, os, threading, time
    import numpy as np
    import edgeml
    from edgeml import _core

    lib = ctypes.CDLL(os.environ["EDGEML_CUDART"])
    lib.fake_cuda_stat.restype = ctypes.c_longlong
    lib.fake_cuda_stat.argtypes = [ctypes.c_char_p]
    lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
    lib.cudaFree.argtypes = [ctypes.c_void_p]
    stat = lambda name: lib.fake_cuda_stat(name.encode())

    class DeviceMemory:  # owner of a cudaMalloc'd block, freed with the last view
        def __init__(self, n):
            self.ptr = ctypes.c_void_p()
            assert lib.cudaMalloc(ctypes.byref(self.ptr), n) == 0
        def __del__(self):
            lib.cudaFree(self.ptr)

    seen = []
    def model(batch):
        if not seen:  # the first request runs alone (a lone request never waits): hold it until the rest queue
            deadline = time.monotonic() + 30
            while s.stats()["requests"] < 8 and time.monotonic() < deadline:
                time.sleep(0.005)
        x = batch["x"]
        cai = x.__cuda_array_interface__
        seen.append([type(x).__name__, list(cai["shape"]), cai["typestr"], list(x.device), batch["bias"]])
        n = int(np.prod(cai["shape"]))
        # the fake runtime's device memory is host memory: the "kernel" reads it directly
        xs = np.ctypeslib.as_array((ctypes.c_float * n).from_address(cai["data"][0])).reshape(cai["shape"])
        y = (xs * 2 + np.array(batch["bias"], np.float32)[:, None]).astype(np.float32)
        mem = DeviceMemory(y.nbytes)
        ctypes.memmove(mem.ptr.value, y.ctypes.data, y.nbytes)
        return {"y": _core.DeviceArray._from_ptr(mem.ptr.value, "<f4", y.shape, 2, 0, mem), "rows": batch["bias"]}

    s = edgeml.InferenceServer(0, host="127.0.0.1", device="cuda", workers=2)
    s.register_interface("m", model, max_batch_size=8, max_delay_ms=100)
    s.start(threaded=True)
    h2d0, pinned0 = stat("h2d_copies"), stat("pinned_allocs")
    out, errs = {}, []
    clients = [edgeml.InferenceClient("127.0.0.1", s.port, timeout=30) for _ in range(8)]
    go = threading.Barrier(8)
    def call(i):
        try:
            go.wait()
            out[i] = clients[i].call("m", {"x": np.full(4, i, np.float32), "bias": i})
            clients[i].close()
        except BaseException as e:
            errs.append(repr(e))
    ts = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    [t.start() for t in ts]
    [t.join(60) for t in ts]
    st = s.stats()
    pool = s._device._cuda.pool_stats()
    s.stop()
    res = {"errors": errs, "seen": seen, "device": st["device"], "batching": st["batching"]["m"],
           "ok": all(out[i]["y"].tolist() == [3.0 * i] * 4 and out[i]["rows"] == i for i in out) and len(out) == 8,
           "h2d_copies": stat("h2d_copies") - h2d0, "d2h_copies": stat("d2h_copies"),
           "pageable_copies": stat("pageable_copies"), "pinned_allocs": stat("pinned_allocs"),
           "pinned_allocs_after_start": stat("pinned_allocs") - pinned0, "bad_pointers": stat("bad_pointers"),
           "live_device_allocs": stat("live_device_allocs"), "pool": pool}
    print("RESULT " + json.dumps(res))
''')


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return fake_build.build(str(tmp_path_factory.mktemp("fake_cudart")))


def run(fake, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEML_CUDART", "FAKE_CUDA"))}
    e.update({"EDGEML_CUDART": fake, "EDGEML_CUDART_ONLY": "1", **env})
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=100, env=e, cwd=ROOT)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert r.returncode == 0 and line, r.stdout + r.stderr
    return json.loads(line[len("RESULT "):])


def test_batches_run_on_the_device_with_one_copy_each_way(fake):
    res = run(fake)
    assert res["errors"] == [] and res["ok"], res
    assert res["device"].startswith("cuda:0 (CUDA runtime 12.2, driver 12.8")
    b = res["batching"]
    assert b["requests"] == 8 and b["batches"] == len(res["seen"]) and b["max_batch"] > 1
    for kind, shape, typestr, device, bias in res["seen"]:
        assert kind == "DeviceArray" and shape[1:] == [4] and typestr == "<f4" and device == [2, 0]
        assert len(bias) == shape[0]
    assert res["h2d_copies"] == b["batches"]  # the batch's one stacked array, copied once
    assert res["d2h_copies"] == b["batches"]  # its one device output, copied back once
    assert res["pageable_copies"] == 0  # every copy from or to pinned memory
    assert res["pinned_allocs"] == 1 and res["pinned_allocs_after_start"] == 0  # the pool, made once
    assert res["bad_pointers"] == 0 and res["live_device_allocs"] == 0  # everything freed
    # the requests were received into the pinned pool, and the batches assembled in it
    pool = res["pool"]
    assert pool["pinned_allocs"] >= 8 + b["batches"] and pool["fallback_allocs"] == 0, pool


def test_cuda_without_a_device_is_a_clear_error(fake):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("EDGEML_CUDART", "FAKE_CUDA"))}
    e.update({"EDGEML_CUDART": fake, "EDGEML_CUDART_ONLY": "1", "FAKE_CUDA_DEVICES": "0"})
    code = ("import edgeml\n"
            "try:\n    edgeml.InferenceServer(0, device='cuda')\n"
            "except edgeml.DeviceError as x:\n    print('ERR', x)\n"
            "s = edgeml.InferenceServer(0, device='auto'); print('AUTO', s.device, s._device.describe())\n"
            "try:\n    edgeml.InferenceServer(0, device='cuda:3')\n"
            "except edgeml.DeviceError as x:\n    print('ERR3', x)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=e, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "ERR cannot use CUDA device 0: no CUDA device" in r.stdout
    assert "AUTO cpu cpu (auto: cannot use CUDA device 0: no CUDA device" in r.stdout
    e["FAKE_CUDA_DEVICES"] = "2"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=e, cwd=ROOT)
    assert "ERR3 cannot use CUDA device 3: device 3 does not exist (2 devices)" in r.stdout, r.stdout + r.stderr
    e.update({"FAKE_CUDA_DEVICES": "1", "FAKE_CUDA_DRIVER": "11040"})
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=e, cwd=ROOT)
    assert "the driver (CUDA 11.4) is older than the runtime (CUDA 12.2)" in r.stdout, r.stdout + r.stderr


@pytest.mark.gpu
def test_a_torch_model_on_a_real_gpu():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine (run on the device tool's GPU)")
    import numpy as np

    import edgeml
    lin = torch.nn.Linear(16, 4).cuda()
    s = edgeml.InferenceServer(0, host="127.0.0.1", device="cuda")
    s.register_interface("m", lambda b: {"y": lin(torch.from_dlpack(b["x"]))}, max_batch_size=8)
    s.start(threaded=True)
    try:
        c = edgeml.InferenceClient("127.0.0.1", s.port, timeout=30)
        x = np.random.default_rng(0).standard_normal(16).astype(np.float32)
        y = c.call("m", {"x": x})["y"]
        want = lin(torch.from_numpy(x).cuda()).detach().cpu().numpy()
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
        c.close()
    finally:
        s.stop()
