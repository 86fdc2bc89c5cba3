"""Dynamic batching from C (csrc/include/edgeml_batch.h, docs/batching.md
"From C"): examples/c/batched_server.c, a C InferenceServer whose "mlp"
interface is batched by em_batcher, called by 12 concurrent Python
InferenceClients. Built the way a user builds it (make install +
pkg-config, tests/c_build.py), plain and under ASan+UBSan; it must exit 0
without a sanitizer report. Checks: each caller gets its own rows (array
and dict payloads), batches larger than one formed, a batch's error
reaches every caller of it, payloads that do not batch get the documented
InvalidArgumentError, and stop answers what is queued."""
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import edgeml
from edgeml import errors

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import c_build  # noqa: E402
from conftest import scaled  # noqa: E402

SANS = [None, "asan"]
SAN_IDS = ["plain", "asan"]
CLIENTS = 12

IN, HID, OUT = 4, 16, 2
_h, _i = np.meshgrid(np.arange(HID), np.arange(IN), indexing="ij")
W1 = (np.sin(_h * IN + _i) / 2).astype(np.float32)
B1 = (np.cos(np.arange(HID)) / 4).astype(np.float32)
_o, _h2 = np.meshgrid(np.arange(OUT), np.arange(HID), indexing="ij")
W2 = (np.cos(_o * HID + _h2) / 4).astype(np.float32)
B2 = (0.1 * (np.arange(OUT) + 1)).astype(np.float32)


def mlp(x):
    return W2 @ np.tanh(W1 @ x + B1) + B2


@pytest.fixture(scope="session")
def batched_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("c-batch")
    built = {}

    def get(san):
        if san not in built:
            prefix = c_build.installed_prefix(root, san)
            built[san] = (c_build.build_program(prefix, "examples/c/batched_server.c", san),
                          c_build.run_env(prefix, san))
        return built[san]

    return get


class Server:
    def __init__(self, exe, env, *args):
        self.p = subprocess.Popen([exe, "0", "300", *map(str, args)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
        line = self.p.stdout.readline().split()
        if not line or line[0] != "ports":
            self.p.kill()
            raise AssertionError(f"no ports line: {line!r} {self.p.communicate()!r}")
        self.port = int(line[1])

    def client(self):
        return edgeml.InferenceClient("127.0.0.1", self.port, timeout=scaled(30))

    def finish(self):
        """SIGTERM, then check a clean exit; returns its stdout."""
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            out, err = self.p.communicate(timeout=scaled(30))
        except subprocess.TimeoutExpired:
            self.p.kill()
            out, err = self.p.communicate()
            raise AssertionError(f"did not exit: {err[-3000:]}")
        assert "AddressSanitizer" not in err and "runtime error" not in err and "LeakSanitizer" not in err, err
        assert self.p.returncode == 0, (self.p.returncode, err[-3000:])
        return out

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.communicate()


@pytest.fixture
def servers():
    started = []
    yield started
    for s in started:
        s.kill()


def in_threads(n, fn):
    """Run fn(i) on n threads started together; returns their results (an
    exception raised by fn is the result)."""
    out = [None] * n
    go = threading.Barrier(n)

    def run(i):
        go.wait()
        try:
            out[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - checked by the caller
            out[i] = e

    th = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in th:
        t.start()
    for t in th:
        t.join(scaled(120))
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("san", SANS, ids=SAN_IDS)
def test_c_batched_rows_errors_and_refusals(batched_server, servers, san):
    exe, env = batched_server(san)
    s = Server(exe, env, 16, 5, 2)  # max_batch 16, 5 ms, 2 workers
    servers.append(s)
    calls = 20

    def arrays(i):
        with s.client() as c:
            for k in range(calls):
                x = np.array([i, k, i - k, 0.5 * i], np.float32) / 10
                y = c.call("mlp", x)
                assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == (OUT,), y
                np.testing.assert_allclose(y, mlp(x), rtol=1e-5, atol=1e-5)
        return "ok"

    assert in_threads(CLIENTS, arrays) == ["ok"] * CLIENTS

    def dicts(i):
        with s.client() as c:
            for k in range(calls):
                x = np.array([k, i, 1, -k], np.float32) / 7
                # key order and extra keys per caller; they batch together
                payload = {"obs": x, "id": i * 1000 + k, "who": f"client-{i}"} if i % 2 else \
                    {"who": f"client-{i}", "id": i * 1000 + k, "obs": x}
                r = c.call("mlp", payload)
                assert r["version"] == "mlp-1"
                assert r["echo"] == {"id": i * 1000 + k, "who": f"client-{i}"}
                np.testing.assert_allclose(r["action"], mlp(x), rtol=1e-5, atol=1e-5)
        return "ok"

    assert in_threads(CLIENTS, dicts) == ["ok"] * CLIENTS

    with s.client() as c:
        st = c.call("stats")["mlp"]
        assert st["requests"] == 2 * CLIENTS * calls and st["errors"] == 0, st
        assert st["max_batch"] > 1 and st["batches"] < st["requests"], st  # batches formed

        # payloads that do not batch: the documented error, at once
        for bad, name in (("a str", "str"), ([1, 2], "list"), (np.float32(1), "float32"), (None, "NoneType")):
            with pytest.raises(errors.InvalidArgumentError) as ei:
                c.call("mlp", bad)
            assert str(ei.value) == ("interface 'mlp' is batched (max_batch_size=16): its payload must be an array "
                                     f"or a dict (of arrays and values), not {name}")
        with pytest.raises(errors.InvalidArgumentError, match="dict keys must be str, not int"):
            c.call("mlp", {1: np.zeros(4, np.float32)})
        # the function's own error (a wrong shape)
        with pytest.raises(errors.RemoteError) as ei:
            c.call("mlp", np.zeros(3, np.float32))
        assert ei.value.remote_type == "ValueError" and "shape (4,)" in ei.value.remote_message
        with pytest.raises(errors.UnknownInterfaceError):
            c.call("nope", 1)
        assert c.call("__interfaces__") == ["fail", "mlp", "stats"]
        assert c.call("stats")["mlp"]["refused"] == 5

    # "fail": every caller of every batch gets the batch's error
    def fail(i):
        with s.client() as c:
            with pytest.raises(errors.RemoteError) as ei:
                c.call("fail", np.full(4, i, np.float32))
            assert ei.value.remote_type == "ValueError"
            return int(ei.value.remote_message.rsplit(" ", 1)[1])  # "fail: batch of n"

    sizes = in_threads(CLIENTS, fail)
    assert all(isinstance(n, int) and 1 <= n <= CLIENTS for n in sizes), sizes
    with s.client() as c:
        st = c.call("stats")["fail"]
    assert st["requests"] == CLIENTS and st["errors"] == st["batches"], st
    # callers in a batch of n: each such batch answered all n of them
    for n in set(sizes):
        assert sizes.count(n) % n == 0, sizes

    # one poisoned request: exactly the callers of its batch get the error
    def poison(i):
        x = np.full(4, -999.0 if i == 0 else 0.25 * i, np.float32)
        with s.client() as c:
            try:
                y = c.call("mlp", x)
            except errors.RemoteError as e:
                assert e.remote_type == "ValueError" and "poisoned input in a batch of" in e.remote_message
                return int(e.remote_message.rsplit(" ", 1)[1])
            np.testing.assert_allclose(y, mlp(x), rtol=1e-5, atol=1e-5)
            return "ok"

    got = in_threads(8, poison)
    assert isinstance(got[0], int), got
    assert sum(1 for g in got if isinstance(g, int)) == got[0], got  # the batch of n: n errors
    assert all(g == got[0] for g in got if isinstance(g, int)), got

    out = s.finish()
    line = [ln for ln in out.splitlines() if ln.startswith("stats mlp ")]
    assert line, out
    batches, requests, max_batch, errs = map(int, line[0].split()[2:])
    assert max_batch > 1 and errs >= 2 and requests >= 2 * CLIENTS * calls


@pytest.mark.timeout(300)
@pytest.mark.parametrize("san", SANS, ids=SAN_IDS)
def test_c_batched_stop_answers_the_queue(batched_server, servers, san):
    exe, env = batched_server(san)
    s = Server(exe, env, 64, 60000, 1)  # a batch waits a minute: only the stop runs it
    servers.append(s)
    n = 6

    def one(i):
        x = np.full(4, 0.1 * i, np.float32)
        with s.client() as c:
            return np.allclose(c.call("mlp", x), mlp(x), rtol=1e-5, atol=1e-5)

    results = [None] * n
    th = [threading.Thread(target=lambda i=i: results.__setitem__(i, one(i))) for i in range(n)]
    for t in th:
        t.start()
    with s.client() as c:
        deadline = time.monotonic() + scaled(30)
        while c.call("stats")["mlp"]["queued"] < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.call("stats")["mlp"]["queued"] == n
    out = s.finish()
    for t in th:
        t.join(scaled(30))
    assert results == [True] * n
    assert f"stats mlp 1 {n} {n} 0" in out, out
