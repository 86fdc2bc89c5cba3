"""The Trainer role in C (csrc/include/edgeml_trainer.h) against the Python
peers: examples/c/actor.c (a C TrainerClient) streams into a Python
TrainerServer, and Python TrainerClients talk to examples/c/learner.c (a C
TrainerServer). Both programs are built the way a user builds them (make
install + pkg-config, tests/c_build.py), plain and with ASan+UBSan.

Checked: items arrive in the server's store in order, none lost or
duplicated, and as the values inserted; weights reach the callbacks;
train_step and request replies; the errors and their types
(UnknownRequestTypeError with request_types, UnknownInterfaceError,
UnknownDataStoreError, InvalidKeyError); the config check both ways (a
different TrainerConfig is a handshake error naming each field); the data
message is byte for byte what the Python client sends; the cursor /
`restarted` protocol across a learner restarted on the same port (the
actor sends everything it holds again, nothing lost, nothing twice); a full
local store drops its oldest items and says so; clean exits without
sanitizer reports."""
import json
import os
import queue
import socket
import struct
import subprocess
import threading
import time

import numpy as np
import pytest

import edgeml
from edgeml.trainer import TrainerClient, TrainerConfig, TrainerServer

from c_build import build_program, installed_prefix, run_env
from conftest import scaled

SANS = [None, "asan"]
BUILD_TIMEOUT = 900  # the first test of each build also builds libedgeml


@pytest.fixture(scope="session")
def c_root(tmp_path_factory):
    return tmp_path_factory.mktemp("c_trainer")


_built = {}


def programs(c_root, san):
    """(actor, learner, env) built against the installed library (once per san)."""
    if san not in _built:
        try:
            prefix = installed_prefix(c_root, san)
        except RuntimeError as e:
            if "are needed" in str(e):
                pytest.skip(str(e))
            raise
        actor = build_program(prefix, "examples/c/actor.c", san)
        learner = build_program(prefix, "examples/c/learner.c", san)
        _built[san] = (actor, learner, run_env(prefix, san))
    return _built[san]


def check_clean(stderr, san):
    if san:
        for marker in ("AddressSanitizer", "LeakSanitizer", "runtime error:", "UndefinedBehaviorSanitizer"):
            assert marker not in stderr, stderr[-6000:]


def parse(lines):
    """[(tag, value)] from the programs' "tag {json}" lines."""
    out = []
    for line in lines:
        tag, _, rest = line.partition(" ")
        out.append((tag, json.loads(rest) if rest else None))
    return out


def tagged(events, tag):
    return [v for t, v in events if t == tag]


class Proc:
    """A program whose stdout lines are collected by a thread."""

    def __init__(self, argv, env, stdin=None):
        self.p = subprocess.Popen(argv, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        self.lines = []
        self.cv = threading.Condition()
        self.err = []
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()
        self.te = threading.Thread(target=lambda: self.err.append(self.p.stderr.read()), daemon=True)
        self.te.start()

    def _read(self):
        for line in self.p.stdout:
            with self.cv:
                self.lines.append(line.rstrip("\n"))
                self.cv.notify_all()
        with self.cv:
            self.lines.append(None)
            self.cv.notify_all()

    def wait_for(self, pred, timeout):
        """The first (tag, value) for which pred holds, waiting up to timeout."""
        end = time.monotonic() + timeout
        seen = 0
        with self.cv:
            while True:
                while seen < len(self.lines):
                    line = self.lines[seen]
                    seen += 1
                    if line is None:
                        raise AssertionError(f"program exited: {self.stderr_now()}")
                    ev = parse([line])[0]
                    if pred(ev):
                        return ev
                left = end - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out; output so far: {self.lines[-20:]}")
                self.cv.wait(left)

    def stderr_now(self):
        return "".join(self.err)

    def finish(self, timeout):
        rc = self.p.wait(timeout=timeout)
        self.t.join(timeout)
        self.te.join(timeout)
        return rc, parse([x for x in self.lines if x is not None]), self.stderr_now()

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def transition(i):
    return {"obs": np.array([i, i + 0.25, i + 0.5, i + 0.75], np.float32), "action": i % 3, "reward": i / 2.0,
            "done": i % 10 == 9}


def check_transitions(items, ids):
    assert len(items) == len(ids)
    for item, i in zip(items, ids):
        want = transition(i)
        assert set(item) == set(want)
        assert item["obs"].dtype == np.float32 and item["obs"].shape == (4,)
        np.testing.assert_array_equal(item["obs"], want["obs"])
        assert item["action"] == want["action"] and type(item["action"]) is int
        assert item["reward"] == want["reward"] and type(item["reward"]) is float
        assert item["done"] is want["done"]


class PyLearner:
    """A Python TrainerServer as a learner: a queued store, train_step that
    publishes new weights, a request callback."""

    def __init__(self, port=0, bport=0, **cfg):
        cfg.setdefault("request_types", ["stats"])
        self.config = TrainerConfig(port_number=port, broadcast_port=bport, **cfg)
        self.store = edgeml.QueuedDataStore(100000)
        self.steps = []
        self.requests = []
        self.server = TrainerServer(self.config, self._train_step, request_callback=self._request, host="127.0.0.1")
        self.server.register_data_store("transitions", self.store)
        self.server.publish_network({"w": np.zeros(3, np.float32), "step": 0})
        self.server.start(threaded=True)

    def _train_step(self, payload):
        self.steps.append(payload)
        w = {"w": np.full(3, len(self.steps), np.float32), "step": len(self.steps)}
        self.server.publish_network(w)
        return w

    def _request(self, rtype, payload):
        self.requests.append((rtype, payload))
        return {"type": rtype, "items": len(self.store), "payload": payload}

    @property
    def port(self):
        return self.server.port

    @property
    def bport(self):
        return self.server.broadcast_port

    def stop(self):
        self.server.stop()


@pytest.fixture
def learners():
    made = []

    def make(**kw):
        s = PyLearner(**kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()


# --------------------------------------------------------- C actor, Python learner

@pytest.mark.timeout(BUILD_TIMEOUT)
@pytest.mark.parametrize("san", SANS)
def test_actor_streams_to_python_trainer(c_root, san, learners):
    actor, _, env = programs(c_root, san)
    srv = learners()
    r = subprocess.run([actor, "127.0.0.1", str(srv.port), "--items", "53", "--every", "10"], env=env,
                       capture_output=True, text=True, timeout=scaled(60))
    check_clean(r.stderr, san)
    assert r.returncode == 0, r.stdout + r.stderr
    ev = parse(r.stdout.splitlines())
    # every item once, in order, as inserted
    check_transitions(list(srv.store._data_queue), range(53))
    assert [u["items"] for u in tagged(ev, "update")] == [10, 20, 30, 40, 50, 53]
    assert [u["acked"] for u in tagged(ev, "update")] == [9, 19, 29, 39, 49, 52]
    assert srv.server.items_received == 53 and srv.server.duplicates_dropped == 0
    # train_step: the server saw the payload, the actor got the weights back
    assert len(srv.steps) == 1
    np.testing.assert_array_equal(srv.steps[0]["obs"], np.array([1, 2, 3, 4], np.float32))
    (ts,) = tagged(ev, "train_step")
    assert ts["value"] == {"w": {"dtype": "<f4", "shape": [3], "data": [1, 1, 1]}, "step": 1}
    # the custom request
    assert srv.requests == [("stats", {"items": 53})]
    (rq,) = tagged(ev, "request")
    assert rq["value"] == {"type": "stats", "items": 53, "payload": {"items": 53}}
    # a type outside request_types: refused by the server, with the types it has
    (bad,) = tagged(ev, "bad_request")
    assert bad["code"] == "EREMOTE"
    assert bad["value"]["type"] == "edgeml.UnknownRequestTypeError"
    assert bad["value"]["request_types"] == ["stats"]
    assert "'no_such_type'" in bad["value"]["message"]
    # weights through the broadcast port, to the C callback: the current
    # value at once, then (maybe) the one train_step published
    ws = tagged(ev, "weights")
    assert ws and ws[0]["version"] == 1
    assert ws[0]["value"]["w"] in ({"dtype": "<f4", "shape": [3], "data": [0, 0, 0]},
                                   {"dtype": "<f4", "shape": [3], "data": [1, 1, 1]})
    assert [w["version"] for w in ws] == list(range(1, len(ws) + 1))
    (st,) = tagged(ev, "stats")
    assert st == {"items_inserted": 53, "items_sent": 53, "items_dropped_locally": 0, "resends_after_restart": 0,
                  "weights_received": len(ws)}


@pytest.mark.timeout(BUILD_TIMEOUT)
@pytest.mark.parametrize("san", SANS)
@pytest.mark.parametrize("server_cfg, fields", [
    ({"version": "2.0"}, ["version"]),
    ({"request_types": ["stats", "eval"]}, ["request_types"]),
    ({"payload_keys": ["obs"], "version": "x"}, ["payload_keys", "version"]),
])
def test_actor_refused_by_another_config(c_root, san, learners, server_cfg, fields):
    actor, _, env = programs(c_root, san)
    srv = learners(**server_cfg)
    r = subprocess.run([actor, "127.0.0.1", str(srv.port)], env=env, capture_output=True, text=True,
                       timeout=scaled(60))
    check_clean(r.stderr, san)
    assert r.returncode == 3, r.stdout + r.stderr
    (failed,) = tagged(parse(r.stdout.splitlines()), "open_failed")
    assert failed["error"] == "EHANDSHAKE"
    why = failed["why"]
    assert "has another config" in why
    for f in ["payload_keys", "request_types", "version"]:
        assert (f + ":" in why) == (f in fields), why
    if "version" in fields:
        assert f"version: client '0.0.1', server {server_cfg['version']!r}" in why
    assert len(srv.store) == 0


@pytest.mark.timeout(BUILD_TIMEOUT)
@pytest.mark.parametrize("san", SANS)
def test_actor_config_with_payload_keys_matches(c_root, san, learners):
    """The same config spelled in C (payload_keys in another order) is
    accepted, and train_step's keys are checked by the server."""
    actor, _, env = programs(c_root, san)
    srv = learners(payload_keys=["obs", "action"], request_types=["eval", "stats"])
    r = subprocess.run([actor, "127.0.0.1", str(srv.port), "--items", "3", "--keys", "action,obs",
                        "--types", "stats,eval"], env=env, capture_output=True, text=True, timeout=scaled(60))
    check_clean(r.stderr, san)
    assert r.returncode == 0, r.stdout + r.stderr
    check_transitions(list(srv.store._data_queue), range(3))
    assert srv.requests == [("stats", {"items": 3})]


@pytest.mark.timeout(BUILD_TIMEOUT)
@pytest.mark.parametrize("san", SANS)
def test_actor_full_store_drops_oldest(c_root, san, learners):
    """A local store of capacity 5 holding 20 unsent items: the oldest 15
    are dropped, counted, and the server is told of the gap."""
    actor, _, env = programs(c_root, san)
    srv = learners()
    r = subprocess.run([actor, "127.0.0.1", str(srv.port), "--items", "20", "--every", "20", "--capacity", "5",
                        "--no-weights"], env=env, capture_output=True, text=True, timeout=scaled(60))
    check_clean(r.stderr, san)
    assert r.returncode == 0, r.stdout + r.stderr
    ev = parse(r.stdout.splitlines())
    check_transitions(list(srv.store._data_queue), range(15, 20))
    (st,) = tagged(ev, "stats")
    assert st["items_dropped_locally"] == 15 and st["items_sent"] == 5 and st["weights_received"] == 0
    assert "dropped 15 items" in r.stderr


class FrameTap:
    """A TCP proxy in front of a server that records every frame the client
    sends (client to server direction)."""

    def __init__(self, upstream_port):
        self.upstream = upstream_port
        self.frames = []
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.port = self.ls.getsockname()[1]
        self.threads = []
        self.socks = []
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()

    def _accept(self):
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.upstream))
            self.socks += [c, u]
            for src, dst, rec in ((c, u, True), (u, c, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, rec), daemon=True)
                t.start()

    def _pump(self, src, dst, record):
        buf = b""
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            dst.sendall(data)
            if record:
                buf += data
                while len(buf) >= 64:
                    n = struct.unpack_from("<Q", buf, 24)[0]
                    if len(buf) < n:
                        break
                    self.frames.append(buf[:n])
                    buf = buf[n:]

    def close(self):
        self.ls.close()
        for s in self.socks:
            s.close()


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_actor_data_message_is_byte_for_byte_pythons(c_root, learners):
    """The C client's "data" request is the frame the Python client would
    send for the same items (body, blob table and blobs; the header's
    request id and timestamps aside)."""
    actor, _, env = programs(c_root, None)
    srv = learners()
    tap = FrameTap(srv.port)
    try:
        r = subprocess.run([actor, "127.0.0.1", str(tap.port), "--items", "12", "--every", "7", "--no-weights"],
                           env=env, capture_output=True, text=True, timeout=scaled(60))
    finally:
        tap.close()
    assert r.returncode == 0, r.stdout + r.stderr
    session = tagged(parse(r.stdout.splitlines()), "open")[0]["session"]
    data = [f for f in tap.frames if f[5] == 12 and edgeml.decode_frame(f)["payload"][0] == "data"]
    assert len(data) == 2
    instance = srv.server._instance
    want = [["data", {"session": session, "store": "transitions", "first": 0,
                      "items": [transition(i) for i in range(7)], "instance": None}],
            ["data", {"session": session, "store": "transitions", "first": 7,
                      "items": [transition(i) for i in range(7, 12)], "instance": instance}]]
    for got, value in zip(data, want):
        ref = edgeml.encode_frame(value, 12, 0)
        assert got[16:32] == ref[16:32]  # body length, blob count, frame length
        assert got[64:] == ref[64:]
    check_transitions(list(srv.store._data_queue), range(12))


@pytest.mark.timeout(BUILD_TIMEOUT)
@pytest.mark.parametrize("san", SANS)
def test_actor_resends_to_a_restarted_learner(c_root, san, learners):
    """Stop the Python learner mid-stream and start a fresh one (an in-memory
    store) on the same ports: it answers `restarted`, the actor sends again
    everything its store holds, from its oldest item; the new learner ends
    with every item once, in order."""
    actor, _, env = programs(c_root, san)
    a = learners()
    port, bport = a.port, a.bport
    p = Proc([actor, "127.0.0.1", str(port), "--items", "60", "--every", "5", "--delay-ms", "40"], env)
    try:
        p.wait_for(lambda e: e[0] == "update" and e[1]["items"] >= 20, scaled(60))
        a.stop()
        time.sleep(0.3)
        b = learners(port=port, bport=bport)
        rc, ev, err = p.finish(scaled(120))
    finally:
        p.kill()
    check_clean(err, san)
    assert rc == 0, f"{ev}\n{err}"
    held_a = [int(x["obs"][0]) for x in a.store._data_queue]
    assert held_a == list(range(len(held_a))) and len(held_a) >= 20
    check_transitions(list(b.store._data_queue), range(60))
    assert b.server.duplicates_dropped == 0
    (st,) = tagged(ev, "stats")
    assert st["resends_after_restart"] == 1 and st["items_dropped_locally"] == 0
    assert tagged(ev, "update")[-1] == {"items": 60, "acked": 59}
    # train_step and request went to the new learner
    assert len(b.steps) == 1 and b.requests == [("stats", {"items": 60})]
    assert "restarted without the data it had acknowledged" in err


# --------------------------------------------------------- Python actor, C learner

class CLearner:
    def __init__(self, learner, env, *args):
        self.proc = Proc([learner, *map(str, args)], env, stdin=subprocess.PIPE)
        _, self.ready = self.proc.wait_for(lambda e: e[0] == "ready", scaled(30))
        self.port, self.bport = self.ready["port"], self.ready["broadcast_port"]

    def stop(self):
        """Close stdin (the learner stops cleanly); (rc, events, stderr)."""
        self.proc.p.stdin.close()
        try:
            return self.proc.finish(scaled(30))
        finally:
            self.proc.kill()


def items_of(events, session=None):
    return [v for v in tagged(events, "item") if session is None or v["session"] == session]


@pytest.mark.timeout(BUILD_TIMEOUT)
@pytest.mark.parametrize("san", SANS)
def test_python_actor_with_c_learner(c_root, san):
    _, learner, env = programs(c_root, san)
    L = CLearner(learner, env, "--keys", "obs,action", "--types", "stats,eval")
    try:
        cfg = TrainerConfig(port_number=L.port, broadcast_port=None, payload_keys=["action", "obs"],
                            request_types=["eval", "stats"])
        store = edgeml.QueuedDataStore(1000)
        got = []
        with TrainerClient("127.0.0.1", cfg, data_stores={"transitions": store}, timeout=scaled(10)) as c:
            c.recv_network_callback(got.append)
            for i in range(25):
                store.insert(transition(i))
                if i % 10 == 9:
                    assert c.update() is True
            assert c.update() is True
            assert c.get_server_last_update_id("transitions") == 24
            assert c.update() is True  # nothing new: nothing sent
            w = c.train_step({"obs": np.ones(4, np.float32)})
            np.testing.assert_array_equal(w["w"], np.ones(3, np.float32))
            assert w["step"] == 1
            rep = c.request("eval", {"x": np.arange(3, dtype=np.int64)})
            assert rep["type"] == "eval" and rep["items"] == 25
            np.testing.assert_array_equal(rep["payload"]["x"], np.arange(3))
            # errors, by type, from the C server (sent raw: the Python client
            # would refuse these itself)
            with pytest.raises(edgeml.UnknownRequestTypeError) as e:
                c._request("request", ["nope", None])
            assert e.value.request_types == ["stats", "eval"] and "'nope'" in str(e.value)
            with pytest.raises(edgeml.InvalidArgumentError):
                c._request("request", "not a pair")
            with pytest.raises(edgeml.InvalidKeyError, match="'bad' is not one of the config's payload_keys"):
                c._request("train_step", {"obs": 1, "bad": 2})
            with pytest.raises(edgeml.UnknownInterfaceError) as e:
                c._request("zap", None)
            assert e.value.interfaces == ["cursor", "data", "request", "train_step"]
            with pytest.raises(edgeml.UnknownDataStoreError, match="'other'"):
                c._request("data", {"session": c.session, "store": "other", "first": 0, "items": []})
            with pytest.raises(edgeml.UnknownDataStoreError):
                c.get_server_last_update_id("other")
            with pytest.raises(edgeml.InvalidArgumentError):
                c._request("data", {"session": c.session, "store": "transitions", "first": -1, "items": []})
            # a batch sent again is dropped by the cursor
            rep = c._request("data", {"session": c.session, "store": "transitions", "first": 20,
                                      "items": [transition(i) for i in range(20, 27)],
                                      "instance": L.ready["instance"]})
            assert rep == {"cursor": 26, "stored": 2, "missed": 0, "instance": L.ready["instance"]}
            c.latest_network(timeout=scaled(10), after_version=0)
            deadline = time.monotonic() + scaled(10)
            while not any(x["step"] == 1 for x in got) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert got[0]["step"] in (0, 1) and got[-1]["step"] == 1
            np.testing.assert_array_equal(got[-1]["w"], np.ones(3, np.float32))
            session = c.session
    finally:
        rc, ev, err = L.stop()
    check_clean(err, san)
    assert rc == 0, err
    its = items_of(ev, session)
    assert [i["id"] for i in its] == list(range(27))
    for i in its[:25]:
        want = transition(i["id"])
        assert i["value"]["obs"] == {"dtype": "<f4", "shape": [4], "data": want["obs"].tolist()}
        assert (i["value"]["action"], i["value"]["reward"], i["value"]["done"]) == \
            (want["action"], want["reward"], want["done"])
    (stopped,) = tagged(ev, "stopped")
    assert stopped["items_received"] == 27 and stopped["duplicates_dropped"] == 5


@pytest.mark.timeout(BUILD_TIMEOUT)
@pytest.mark.parametrize("san", SANS)
def test_python_client_refuses_c_learner_with_another_config(c_root, san):
    _, learner, env = programs(c_root, san)
    L = CLearner(learner, env, "--version", "1.2", "--types", "stats")
    try:
        with pytest.raises(edgeml.HandshakeError) as e:
            TrainerClient("127.0.0.1", TrainerConfig(port_number=L.port, broadcast_port=None,
                                                     request_types=["stats", "x"], payload_keys=["obs"]))
        msg = str(e.value)
        assert "payload_keys: client ['obs'], server None" in msg
        assert "request_types: client ['stats', 'x'], server ['stats']" in msg
        assert "version: client '0.0.1', server '1.2'" in msg
        # the same config is accepted
        TrainerClient("127.0.0.1", TrainerConfig(port_number=L.port, broadcast_port=None, request_types=["stats"],
                                                 version="1.2")).close()
    finally:
        rc, ev, err = L.stop()
    check_clean(err, san)
    assert rc == 0, err


@pytest.mark.timeout(BUILD_TIMEOUT)
@pytest.mark.parametrize("san", SANS)
def test_python_actor_resends_to_restarted_c_learner(c_root, san):
    """The C learner's instance id and `restarted` reply: a Python actor's
    update after the learner was restarted on the same ports sends its
    whole store again; the new learner stores every item once."""
    _, learner, env = programs(c_root, san)
    L1 = CLearner(learner, env)
    port, bport = L1.port, L1.bport
    store = edgeml.QueuedDataStore(1000)
    cfg = TrainerConfig(port_number=port, broadcast_port=None, request_types=["stats"])
    L2 = None
    try:
        with TrainerClient("127.0.0.1", cfg, data_stores={"transitions": store}, timeout=scaled(10)) as c:
            for i in range(15):
                store.insert(transition(i))
            assert c.update() is True
            rc1, ev1, err1 = L1.stop()
            L2 = CLearner(learner, env, port, "--broadcast-port", bport)
            assert L2.ready["instance"] != L1.ready["instance"]
            for i in range(15, 22):
                store.insert(transition(i))
            deadline = time.monotonic() + scaled(20)
            while True:  # the first call may meet the closed connection
                try:
                    assert c.update() is True
                    break
                except edgeml.EdgeMLConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
            assert c.resends_after_restart == 1
            session = c.session
    finally:
        rc2, ev2, err2 = L2.stop() if L2 else (None, [], "")
    for rc, err in ((rc1, err1), (rc2, err2)):
        check_clean(err, san)
        assert rc == 0, err
    assert [i["id"] for i in items_of(ev1, session)] == list(range(15))
    assert [i["id"] for i in items_of(ev2, session)] == list(range(22))
    assert tagged(ev2, "stopped")[0]["restarted_replies"] == 1
    assert "acknowledged by a previous run" in err2


@pytest.mark.timeout(BUILD_TIMEOUT)
@pytest.mark.parametrize("san", SANS)
def test_c_actor_with_c_learner(c_root, san):
    actor, learner, env = programs(c_root, san)
    L = CLearner(learner, env)
    try:
        r = subprocess.run([actor, "127.0.0.1", str(L.port), "--items", "30", "--every", "8"], env=env,
                           capture_output=True, text=True, timeout=scaled(60))
    finally:
        rc, ev, err = L.stop()
    check_clean(r.stderr, san)
    check_clean(err, san)
    assert r.returncode == 0, r.stdout + r.stderr
    assert rc == 0, err
    a = parse(r.stdout.splitlines())
    session = tagged(a, "open")[0]["session"]
    assert [i["id"] for i in items_of(ev, session)] == list(range(30))
    assert tagged(a, "train_step")[0]["value"]["step"] == 1
    assert tagged(a, "request")[0]["value"] == {"type": "stats", "items": 30, "payload": {"items": 30}}
    assert tagged(a, "bad_request")[0]["value"]["type"] == "edgeml.UnknownRequestTypeError"
    assert tagged(a, "weights")


THREADED_ACTOR = r"""
/* Two threads insert into one store while the main thread updates. */
#include <edgeml.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

static em_trainer_client *c;
#define PER_THREAD 1500

static void *inserter(void *arg) {
  int t = (int)(long)arg;
  em_payload *p = em_payload_new();
  for (int i = 0; i < PER_THREAD; i++) {
    double x[2] = {t, i};
    uint64_t shape[1] = {2};
    em_payload_reset(p);
    em_put_map(p, 2);
    em_put_cstr(p, "t");
    em_put_int(p, t);
    em_put_cstr(p, "x");
    em_put_ndarray(p, "<f8", 1, shape, x, sizeof x);
    if (em_trainer_insert(c, "transitions", p, NULL)) abort();
  }
  em_payload_free(p);
  return NULL;
}

int main(int argc, char **argv) {
  if (argc < 2) return 1;
  em_trainer_client_opts o;
  em_trainer_client_opts_init(&o);
  const char *types[] = {"stats"};
  o.config.request_types = types;
  o.config.n_request_types = 1;
  if (em_trainer_client_open(&c, "127.0.0.1", (uint16_t)atoi(argv[1]), &o)) return 1;
  if (em_trainer_add_store(c, "transitions", 10 * PER_THREAD)) return 1;
  pthread_t th[2];
  for (long t = 0; t < 2; t++) pthread_create(&th[t], NULL, inserter, (void *)t);
  int updates = 0;
  for (;;) {
    em_trainer_client_stats st;
    em_trainer_client_get_stats(c, &st);
    int rc = em_trainer_update(c, 10000000000ull);
    if (rc) { fprintf(stderr, "update: %s\n", em_strerror(rc)); return 1; }
    updates++;
    if (st.items_inserted == 2 * PER_THREAD) break; /* the update after the last insert */
  }
  for (int t = 0; t < 2; t++) pthread_join(th[t], NULL);
  em_trainer_client_stats st;
  em_trainer_client_get_stats(c, &st);
  printf("done {\"updates\": %d, \"sent\": %llu}\n", updates, (unsigned long long)st.items_sent);
  em_trainer_client_close(c);
  return 0;
}
"""


@pytest.mark.timeout(BUILD_TIMEOUT)
@pytest.mark.parametrize("san", SANS)
def test_insert_from_threads_during_update(c_root, san, learners):
    """em_trainer_insert from two threads while another updates: every item
    arrives once, each thread's in its order."""
    programs(c_root, san)  # the installed library
    src = c_root / "threaded_actor.c"
    src.write_text(THREADED_ACTOR)
    prefix = installed_prefix(c_root, san)
    exe = build_program(prefix, str(src), san)
    srv = learners()
    r = subprocess.run([exe, str(srv.port)], env=run_env(prefix, san), capture_output=True, text=True,
                       timeout=scaled(120))
    check_clean(r.stderr, san)
    assert r.returncode == 0, r.stdout + r.stderr
    (done,) = tagged(parse(r.stdout.splitlines()), "done")
    assert done["sent"] == 3000
    items = list(srv.store._data_queue)
    assert len(items) == 3000
    for t in (0, 1):
        xs = [it["x"] for it in items if it["t"] == t]
        assert [int(x[1]) for x in xs] == list(range(1500)) and all(x[0] == t for x in xs)
