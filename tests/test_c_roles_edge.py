"""The Edge and Inference roles in C (csrc/include/edgeml_roles.h) against
the Python classes: examples/c/robot_server.c (a C EdgeServer) and
examples/c/infer_server.c (a C InferenceServer) served to Python's
EdgeClient and InferenceClient, and examples/c/edge_client.c (a C
EdgeClient) against a Python EdgeServer. Each program is built the way a
user builds one (make install + pkg-config, tests/c_build.py), plain and
under ASan+UBSan, and must exit 0 without a sanitizer report."""
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

ROBOT_OBS = ["image", "joints"]
ROBOT_ACT = ["move", "reset", "fault", "broken"]


@pytest.fixture(scope="session")
def c_roles_root(tmp_path_factory):
    return tmp_path_factory.mktemp("c-roles")


@pytest.fixture(scope="session")
def programs(c_roles_root):
    """san -> {name: executable}, built once per session and sanitizer."""
    built = {}

    def get(san):
        if san not in built:
            prefix = c_build.installed_prefix(c_roles_root, san)
            exes = {}
            for name in ("robot_server", "infer_server", "edge_client"):
                src = f"examples/c/{name}.c"
                exes[name] = c_build.build_program(prefix, src, san)  # in prefix/bin
            built[san] = (exes, c_build.run_env(prefix, san))
        return built[san]

    return get


class Proc:
    """A C example program that prints "ports ..." once it serves."""

    def __init__(self, exe, args, env):
        self.p = subprocess.Popen([exe, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env)
        line = self.p.stdout.readline().split()
        if not line or line[0] != "ports":
            self.p.kill()
            out, err = self.p.communicate()
            raise AssertionError(f"no ports line: {line!r} {out!r} {err!r}")
        self.ports = [int(x) for x in line[1:]]

    def finish(self, sig=signal.SIGTERM, timeout=20.0):
        """Stop it (sig; None: wait for it to exit by itself) and check a
        clean exit: status 0 and no sanitizer report."""
        if sig is not None and self.p.poll() is None:
            self.p.send_signal(sig)
        try:
            out, err = self.p.communicate(timeout=scaled(timeout))
        except subprocess.TimeoutExpired:
            self.p.kill()
            out, err = self.p.communicate()
            raise AssertionError(f"did not exit: {err[-3000:]}")
        assert "AddressSanitizer" not in err and "runtime error" not in err and "LeakSanitizer" not in err, err
        assert self.p.returncode == 0, (self.p.returncode, err[-3000:])
        return out, err

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.communicate()


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        p.kill()


def robot(programs, san, procs, bport=0, extra=()):
    exes, env = programs(san)
    p = Proc(exes["robot_server"], [0, bport, 120, *extra], env)
    procs.append(p)
    return p


def robot_config(port, bport=None, **kw):
    args = dict(port_number=port, action_keys=list(ROBOT_ACT), observation_keys=list(ROBOT_OBS),
                broadcast_port=bport, version="robot/1")
    args.update(kw)
    return edgeml.EdgeConfig(**args)


def expected_image():
    y, x, c = np.meshgrid(np.arange(480), np.arange(640), np.arange(3), indexing="ij")
    return ((y + 2 * x + 3 * c) % 256).astype(np.uint8)


# ------------------------------------------------------------------ edge


@pytest.mark.timeout(300)
@pytest.mark.parametrize("san", SANS, ids=SAN_IDS)
def test_c_edge_server_observations_and_actions(programs, procs, san):
    p = robot(programs, san, procs)
    port, bport = p.ports
    assert port > 0 and bport > 0 and port != bport
    with edgeml.EdgeClient("127.0.0.1", port, config=robot_config(port, bport), timeout=scaled(10)) as c:
        obs = c.get_observation()
        assert list(obs) == ROBOT_OBS  # every key, in the config's order
        img = obs["image"]
        assert img.dtype == np.uint8 and img.shape == (480, 640, 3)
        np.testing.assert_array_equal(img, expected_image())
        assert obs["joints"].dtype == np.float64 and obs["joints"].shape == (7,)
        np.testing.assert_allclose(obs["joints"], 0.1 * np.arange(7))
        only = c.get_observation(["joints"])
        assert list(only) == ["joints"]
        np.testing.assert_allclose(only["joints"], 0.1 * np.arange(7))

        r = c.send_action(np.ones(7), "move")
        assert r["ok"] is True and r["moves"] == 1
        np.testing.assert_allclose(r["joints"], 0.1 * np.arange(7) + 1)
        r = c.send_action([0.5] * 7, "move")  # a list of numbers works too
        assert r["moves"] == 2
        np.testing.assert_allclose(r["joints"], 0.1 * np.arange(7) + 1.5)
        np.testing.assert_allclose(c.get_observation(["joints"])["joints"], 0.1 * np.arange(7) + 1.5)
        assert c.act("reset") == {"ok": True, "moves": 0}
        np.testing.assert_allclose(c.get_observation()["joints"], 0.1 * np.arange(7))

        # several threads at once on one connection
        def worker(out):
            for _ in range(20):
                out.append(c.get_observation(["joints"])["joints"].sum())
        outs = [[] for _ in range(4)]
        ts = [threading.Thread(target=worker, args=(o,)) for o in outs]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert all(len(o) == 20 and all(abs(v - 2.1) < 1e-9 for v in o) for o in outs)
    p.finish()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("san", SANS, ids=SAN_IDS)
def test_c_edge_server_errors(programs, procs, san):
    p = robot(programs, san, procs)
    port, _ = p.ports
    with edgeml.EdgeClient("127.0.0.1", port, timeout=scaled(10)) as c:  # no config: keys from the HELLO
        assert c.observation_keys == sorted(ROBOT_OBS)
        assert sorted(c.action_keys) == sorted(ROBOT_ACT)
        # a handler's own error reply: the named type and message, its traceback
        with pytest.raises(errors.RemoteError) as e:
            c.send_action({}, "fault")
        assert e.value.remote_type == "ValueError"
        assert e.value.remote_message == "arm fault: joint 3 over its limit"
        assert "robot_server.c" in e.value.remote_traceback
        # a callback returning neither REPLY nor ERROR: an error reply, the connection goes on
        with pytest.raises(errors.RemoteError) as e:
            c.send_action({}, "broken")
        assert e.value.remote_type == "RuntimeError" and "action callback" in e.value.remote_message
        with pytest.raises(errors.RemoteError) as e:
            c.send_action("not an array", "move")
        assert e.value.remote_type == "ValueError"
        # keys outside the config, sent raw past the client's own checks
        with pytest.raises(errors.InvalidKeyError) as e:
            c._request("obs", ["joints", "nope"])
        assert str(e.value) == "'nope' is not one of the config's observation_keys: 'image', 'joints'"
        with pytest.raises(errors.InvalidKeyError) as e:
            c._request("act", ["fly", {}])
        assert str(e.value) == "'fly' is not one of the config's action_keys: 'broken', 'fault', 'move', 'reset'"
        with pytest.raises(errors.InvalidKeyError, match="^5 is not one"):
            c._request("obs", [5])
        for bad in (5, ["move"], ["move", 1, 2], None):
            with pytest.raises(errors.InvalidArgumentError, match="malformed action request"):
                c._request("act", bad)
        with pytest.raises(errors.InvalidArgumentError, match="malformed observation request"):
            c._request("obs", {"image": 1})
        with pytest.raises(errors.UnknownInterfaceError) as e:
            c._request("step", None)
        assert e.value.interfaces == ["act", "obs"] and "'step'" in str(e.value)
        # still serving after all of it
        assert c.get_observation(["joints"])["joints"].shape == (7,)
    p.finish(signal.SIGINT)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("san", SANS, ids=SAN_IDS)
def test_c_edge_server_missing_callback_and_no_stream(programs, procs, san):
    p = robot(programs, san, procs, bport=-1, extra=["noact"])
    port, bport = p.ports
    assert bport == 0
    with edgeml.EdgeClient("127.0.0.1", port, config=robot_config(port), timeout=scaled(10)) as c:
        assert c._server_info() == {"role": "edge", "broadcast_port": None, "compat": {
            "action_keys": sorted(ROBOT_ACT), "observation_keys": sorted(ROBOT_OBS), "version": "robot/1"}}
        with pytest.raises(errors.InvalidArgumentError, match="no action_callback"):
            c.send_action(np.ones(7), "move")
        assert c.get_observation(["joints"])["joints"].shape == (7,)
        with pytest.raises(errors.InvalidArgumentError, match="no broadcast port"):
            c.register_observation_callback(lambda o: None)
    p.finish()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("san", SANS, ids=SAN_IDS)
def test_c_edge_server_config_check(programs, procs, san):
    p = robot(programs, san, procs)
    port, bport = p.ports
    with pytest.raises(errors.HandshakeError) as e:
        edgeml.EdgeClient("127.0.0.1", port, config=robot_config(port, version="robot/2"))
    assert "version: client 'robot/2', server 'robot/1'" in str(e.value)
    assert "action_keys" not in str(e.value)
    with pytest.raises(errors.HandshakeError) as e:
        edgeml.EdgeClient("127.0.0.1", port, config=robot_config(port, action_keys=["move"],
                                                                 observation_keys=["image", "joints", "depth"]))
    msg = str(e.value)
    assert "action_keys: client ['move'], server ['broken', 'fault', 'move', 'reset']" in msg
    assert "observation_keys: client ['depth', 'image', 'joints'], server ['image', 'joints']" in msg
    assert "version" not in msg
    # another role's client is refused in the handshake
    with pytest.raises(errors.HandshakeError):
        edgeml.InferenceClient("127.0.0.1", port, connect_timeout=2)
    # ports are not compared (port forwarding)
    with edgeml.EdgeClient("127.0.0.1", port, config=robot_config(port + 1 if port < 65535 else 1)) as c:
        assert c.get_observation(["joints"])["joints"].shape == (7,)
    p.finish()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("san", SANS, ids=SAN_IDS)
def test_c_edge_server_observation_stream(programs, procs, san):
    p = robot(programs, san, procs)
    port, bport = p.ports
    with edgeml.EdgeClient("127.0.0.1", port, config=robot_config(port), timeout=scaled(10)) as c:
        seqs = []
        got = threading.Event()

        def cb(obs):
            seqs.append(obs["seq"])
            if len(seqs) >= 5:
                got.set()
        c.register_observation_callback(cb)  # the port from the server's HELLO
        assert got.wait(scaled(20)), seqs
        assert seqs == sorted(set(seqs)) and seqs[0] >= 1
        latest = c.latest_observation(timeout=scaled(10))
        np.testing.assert_array_equal(latest["image"], expected_image())
        np.testing.assert_allclose(latest["joints"], 0.1 * np.arange(7))
        c.send_action(np.full(7, 2.0), "move")  # the stream follows the robot's state
        deadline = time.monotonic() + scaled(10)
        while time.monotonic() < deadline:
            ob = c.latest_observation(timeout=scaled(10))
            if abs(ob["joints"][0] - 2.0) < 1e-9:
                break
            time.sleep(0.02)
        np.testing.assert_allclose(ob["joints"], 0.1 * np.arange(7) + 2.0)
        # the broadcast port is no request port (service "edge.broadcast")
        with pytest.raises(errors.HandshakeError):
            edgeml.EdgeClient("127.0.0.1", bport, connect_timeout=2)
    p.finish()


@pytest.mark.timeout(120)
def test_c_edge_server_exits_after_its_time(programs, procs):
    exes, env = programs(None)
    p = Proc(exes["robot_server"], [0, 0, 0.5], env)
    procs.append(p)
    p.finish(sig=None)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("san", SANS, ids=SAN_IDS)
def test_c_edge_client_against_python_server(programs, san):
    exes, env = programs(san)
    cfg = edgeml.EdgeConfig(port_number=0, action_keys=["go"], observation_keys=["cam", "state"], broadcast_port=0,
                            version="py/1")
    seen = []

    def obs(keys):
        full = {"cam": np.arange(12, dtype=np.uint8).reshape(3, 4), "state": {"t": 1.5, "name": "py"}}
        seen.append(list(keys))
        return {k: full[k] for k in keys}

    def act(key, action):
        return {"got": action, "key": key}

    s = edgeml.EdgeServer(cfg, obs, act, host="127.0.0.1")
    s.start(threaded=True)
    stop = threading.Event()

    def publisher():
        n = 0
        while not stop.is_set():
            n += 1
            s.publish_observation({"seq": n})
            time.sleep(0.02)
    t = threading.Thread(target=publisher, daemon=True)
    t.start()
    try:
        r = subprocess.run([exes["edge_client"], "127.0.0.1", str(s.port)], capture_output=True, text=True, env=env,
                           timeout=scaled(60))
        assert r.returncode == 0, r.stderr
        assert "AddressSanitizer" not in r.stderr and "runtime error" not in r.stderr, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == f"keys obs=cam,state act=go bport={s.broadcast_port}"
        assert lines[1:5] == ["obs cam dtype=|u1 shape=3x4 sum=66", "obs state t=1.5 name=py",
                              "act key=go speed=2.5 vsum=6", "badkey rc=EINVAL"]
        stream = [int(x.split("=")[1]) for x in lines[5:8]]
        assert all(x.startswith("stream seq=") for x in lines[5:8]) and stream == sorted(set(stream))
        assert lines[8:] == ["done"]
        assert seen == [["cam", "state"], ["state"]]  # nil = every key in order; the bad key never sent
        r = subprocess.run([exes["edge_client"], "127.0.0.1", str(s.port), "py/2"], capture_output=True, text=True,
                           env=env, timeout=scaled(60))
        assert r.returncode == 3, r.stderr
        assert (f"the EdgeServer at 127.0.0.1:{s.port} has another config: version: client 'py/2', server 'py/1'"
                in r.stderr)
    finally:
        stop.set()
        t.join()
        s.stop()


# ------------------------------------------------------------- inference


@pytest.mark.timeout(300)
@pytest.mark.parametrize("san", SANS, ids=SAN_IDS)
def test_c_inference_server(programs, procs, san):
    exes, env = programs(san)
    p = Proc(exes["infer_server"], [0, 120], env)
    procs.append(p)
    (port,) = p.ports
    with edgeml.InferenceClient("127.0.0.1", port, timeout=scaled(10)) as c:
        assert c.interfaces() == ["echo", "fail", "scale", "stop", "sum"]
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        assert c.call("sum", x) == {"sum": 66.0, "n": 12, "shape": [3, 4], "dtype": "<f4"}
        big = np.random.default_rng(0).random(1 << 20, dtype=np.float32)
        r = c.call("sum", big)
        assert r["n"] == 1 << 20 and abs(r["sum"] - float(big.astype(np.float64).sum())) < 1e-3 * r["n"]
        v = {"a": np.arange(5, dtype=np.int16), "t": (1, "x"), "s": {1, 2}, "n": None, "f": 1.5, "b": b"\0\1",
             "big": 2 ** 63 + 5, "neg": -7, "l": [True, False], "img": np.zeros((4, 5, 3), np.uint8),
             "sc": np.float32(2.5), "nested": {"k": [{"deep": "y"}]}}
        back = c.call("echo", v)
        assert set(back) == set(v)
        for k in v:
            if isinstance(v[k], np.ndarray):
                assert back[k].dtype == v[k].dtype
                np.testing.assert_array_equal(back[k], v[k])
            else:
                assert back[k] == v[k] and type(back[k]) is type(v[k]), k
        assert c.call("echo") is None
        np.testing.assert_allclose(c.call("scale", {"x": np.ones(4, np.float32), "k": 2.5}), np.full(4, 2.5))

        with pytest.raises(errors.RemoteError) as e:
            c.call("fail")
        assert e.value.remote_type == "ValueError" and e.value.remote_message == "this interface always fails"
        assert "iface_fail" in e.value.remote_traceback
        with pytest.raises(errors.RemoteError) as e:
            c.call("sum", "text")
        assert e.value.remote_type == "TypeError" and "got str" in e.value.remote_message
        with pytest.raises(errors.RemoteError, match="scale takes"):
            c.call("scale", {"x": 1})
        with pytest.raises(errors.UnknownInterfaceError) as e:
            c.call("nope", 1)
        assert e.value.interfaces == ["echo", "fail", "scale", "stop", "sum"]
        assert str(e.value) == "no interface 'nope' on this server; it has: 'echo', 'fail', 'scale', 'stop', 'sum'"

        # calls from several threads and clients at once
        def worker(errs):
            try:
                with edgeml.InferenceClient("127.0.0.1", port, timeout=scaled(10)) as c2:
                    for i in range(30):
                        assert c2.call("sum", np.full(i + 1, 2, np.float32))["sum"] == 2.0 * (i + 1)
            except Exception as ex:  # pragma: no cover - reported below
                errs.append(ex)
        errs = []
        ts = [threading.Thread(target=worker, args=(errs,)) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errs, errs
        # another role's client is refused in the handshake
        with pytest.raises(errors.HandshakeError):
            edgeml.EdgeClient("127.0.0.1", port, connect_timeout=2)
        assert c.call("stop") == {"stopping": True}  # an interface stops the server
    p.finish(sig=None)
