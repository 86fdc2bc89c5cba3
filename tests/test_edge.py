"""EdgeServer / EdgeClient and their agentlace aliases: every method, key
checks on both sides, callbacks that raise, observation broadcast (latest
value), stop from another thread freeing both ports."""
import copy
import dataclasses
import threading

import numpy as np
import pytest

import edgeml
from conftest import port_is_free, scaled, wait_until

pytestmark = pytest.mark.timeout(60)

OBS_KEYS = ["image", "state"]
ACT_KEYS = ["move"]


def make_obs(keys):
    rng = np.random.default_rng(0)
    full = {"image": rng.integers(0, 255, (128, 128, 3), dtype=np.uint8), "state": np.arange(7, dtype=np.float32)}
    return {k: full[k] for k in keys}


@pytest.fixture
def edge(cleanup):
    """An EdgeServer on ports 0 with a broadcast port; returns (server,
    client config with the bound ports, action log)."""
    def make(obs_cb=make_obs, act_cb=None, action_keys=ACT_KEYS, broadcast=True):
        actions = []
        cfg = edgeml.EdgeConfig(port_number=0, action_keys=list(action_keys), observation_keys=list(OBS_KEYS),
                                broadcast_port=0 if broadcast else None)
        act_cb = act_cb or (lambda key, a: actions.append((key, a)) or {"status": "received", "n": len(actions)})
        srv = cleanup(edgeml.EdgeServer(cfg, obs_cb, act_cb, host="127.0.0.1"))
        srv.start(threaded=True)
        ccfg = dataclasses.replace(cfg, port_number=srv.port, broadcast_port=srv.broadcast_port)
        return srv, ccfg, actions
    return make


def test_aliases_are_the_same_classes():
    assert edgeml.ActionConfig is edgeml.EdgeConfig
    assert edgeml.ActionServer is edgeml.EdgeServer
    assert issubclass(edgeml.ActionClient, edgeml.EdgeClient)
    assert edgeml.EdgeServer.publish_obs is edgeml.EdgeServer.publish_observation
    assert edgeml.EdgeClient.obs is edgeml.EdgeClient.get_observation
    assert edgeml.EdgeClient.register_obs_callback is edgeml.EdgeClient.register_observation_callback


def test_observations_and_actions(edge, cleanup):
    srv, cfg, actions = edge()
    c = cleanup(edgeml.EdgeClient("127.0.0.1", srv.port, task_id="mnist", config=cfg, timeout=scaled(10)))
    obs = c.get_observation()
    assert set(obs) == set(OBS_KEYS)
    assert obs["image"].shape == (128, 128, 3) and obs["image"].dtype == np.uint8
    np.testing.assert_array_equal(obs["image"], make_obs(["image"])["image"])
    assert set(c.get_observation(["state"])) == {"state"}
    assert set(c.obs(["state", "image"])) == set(OBS_KEYS)
    assert set(c.get_observation("state")) == {"state"}  # one key as a str
    assert c.send_action(np.array([0.5, -0.5])) == {"status": "received", "n": 1}
    assert c.act("move", {"dx": 1})["n"] == 2
    assert c.send_action([1, 2], key="move")["n"] == 3
    assert actions[0][0] == "move"
    np.testing.assert_array_equal(actions[0][1], [0.5, -0.5])
    assert actions[1] == ("move", {"dx": 1})
    assert "mnist" in repr(c) and "observation_keys" in repr(srv)


def test_client_forms_and_port_from_config(edge, cleanup):
    srv, cfg, _ = edge()
    a = cleanup(edgeml.ActionClient("127.0.0.1", cfg))
    b = cleanup(edgeml.EdgeClient("127.0.0.1", config=cfg))
    c = cleanup(edgeml.EdgeClient("127.0.0.1", cfg))  # (host, config)
    d = cleanup(edgeml.EdgeClient("127.0.0.1", srv.port))  # no config: keys from the handshake
    for cl in (a, b, c, d):
        assert set(cl.get_observation(["state"])) == {"state"}
    assert d.observation_keys == sorted(OBS_KEYS) and d.action_keys == ACT_KEYS
    with pytest.raises(ValueError):
        edgeml.EdgeClient("127.0.0.1")


def test_keys_outside_the_config_fail_at_the_caller(edge, cleanup):
    srv, cfg, actions = edge(action_keys=["move", "grip"])
    c = cleanup(edgeml.EdgeClient("127.0.0.1", srv.port, config=cfg))
    before = srv.stats()["requests"]
    with pytest.raises(edgeml.InvalidKeyError, match="'nope' is not one of the config's observation_keys"):
        c.get_observation(["state", "nope"])
    with pytest.raises(KeyError):  # also the built-in
        c.send_action(1, key="fly")
    with pytest.raises(edgeml.InvalidKeyError, match="needs a key"):
        c.send_action(1)  # two action keys: which one?
    assert srv.stats()["requests"] == before  # refused before sending
    # the server checks too (a client that skips the check, e.g. C)
    with pytest.raises(edgeml.InvalidKeyError, match="observation_keys"):
        c._request("obs", ["nope"])
    with pytest.raises(edgeml.InvalidKeyError, match="action_keys"):
        c._request("act", ["fly", 1])
    assert actions == []
    assert c.send_action(1, key="grip")["n"] == 1  # and the connection still works


def test_config_is_never_modified(edge, cleanup):
    cfg = edgeml.EdgeConfig(port_number=0, action_keys=["move"], observation_keys=["image", "state"],
                            broadcast_port=0)
    snapshot = copy.deepcopy(cfg)
    srv = cleanup(edgeml.EdgeServer(cfg, make_obs, lambda k, a: {}, host="127.0.0.1"))
    srv.start(threaded=True)
    ccfg = dataclasses.replace(cfg, port_number=srv.port, broadcast_port=srv.broadcast_port)
    csnap = copy.deepcopy(ccfg)
    c = cleanup(edgeml.EdgeClient("127.0.0.1", config=ccfg))
    c.get_observation()
    c.register_observation_callback(lambda o: None)
    assert cfg == snapshot and type(cfg.observation_keys) is list
    assert ccfg == csnap and type(ccfg.action_keys) is list


def test_config_mismatch_is_a_handshake_error(edge):
    srv, cfg, _ = edge()
    other = dataclasses.replace(cfg, observation_keys=["image"])
    with pytest.raises(edgeml.HandshakeError, match="observation_keys"):
        edgeml.EdgeClient("127.0.0.1", config=other)
    with pytest.raises(edgeml.HandshakeError):  # an InferenceServer is not an EdgeServer
        s = edgeml.InferenceServer(0, host="127.0.0.1")
        s.start(threaded=True)
        try:
            edgeml.EdgeClient("127.0.0.1", s.port)
        finally:
            s.stop()


def test_bad_configs():
    with pytest.raises(TypeError):
        edgeml.EdgeConfig(port_number=1, action_keys="move", observation_keys=["a"])
    with pytest.raises(TypeError):
        edgeml.EdgeConfig(port_number=1, action_keys=[1], observation_keys=["a"])
    with pytest.raises(ValueError):
        edgeml.EdgeConfig(port_number=70000, action_keys=[], observation_keys=[])
    with pytest.raises(ValueError):
        edgeml.EdgeConfig(port_number=1, action_keys=["a", "a"], observation_keys=[])
    with pytest.raises(TypeError):
        edgeml.EdgeServer({"port_number": 1}, None, None)


def test_callback_that_raises_goes_to_its_caller(edge, cleanup):
    calls = []

    def obs_cb(keys):
        calls.append(keys)
        if len(calls) == 1:
            raise RuntimeError("camera unplugged")
        return make_obs(keys)

    srv, cfg, _ = edge(obs_cb=obs_cb, act_cb=lambda k, a: 1 / 0)
    c = cleanup(edgeml.EdgeClient("127.0.0.1", config=cfg))
    with pytest.raises(edgeml.RemoteError) as ei:
        c.get_observation()
    assert ei.value.remote_type == "RuntimeError" and "camera unplugged" in ei.value.remote_message
    with pytest.raises(edgeml.RemoteError, match="ZeroDivisionError"):
        c.send_action(1)
    assert set(c.get_observation()) == set(OBS_KEYS)  # the server lives on


def test_missing_callbacks_and_broadcast_port(cleanup):
    cfg = edgeml.EdgeConfig(port_number=0, action_keys=["a"], observation_keys=["o"])
    srv = cleanup(edgeml.EdgeServer(cfg, None, None, host="127.0.0.1"))
    srv.start(threaded=True)
    c = cleanup(edgeml.EdgeClient("127.0.0.1", srv.port))
    with pytest.raises(edgeml.InvalidArgumentError, match="no observation_callback"):
        c.get_observation()
    with pytest.raises(edgeml.InvalidArgumentError, match="no action_callback"):
        c.send_action(1)
    with pytest.raises(edgeml.InvalidArgumentError, match="broadcast"):
        srv.publish_observation({"o": 1})
    with pytest.raises(edgeml.InvalidArgumentError, match="no broadcast port"):
        c.register_observation_callback(print)
    assert srv.broadcast_port is None


def test_observation_stream_latest_value(edge, cleanup):
    srv, cfg, _ = edge()
    srv.publish_observation({"state": np.zeros(7), "i": 0})
    c = cleanup(edgeml.EdgeClient("127.0.0.1", config=cfg))
    got, gate = [], threading.Event()

    def slow(obs):
        got.append(obs["i"])
        gate.wait(scaled(10))  # a consumer far slower than the stream

    c.register_observation_callback(slow)
    assert wait_until(lambda: got == [0])  # subscribed late: the current value at once
    for i in range(1, 201):
        srv.publish_obs({"state": np.full(7, i), "i": i})
    gate.set()
    assert wait_until(lambda: got and got[-1] == 200)
    assert len(got) <= 3, got  # the newest, not a backlog of 200
    assert c.latest_observation(timeout=scaled(5))["i"] == 200
    bs = srv.stats()["broadcast"]
    assert bs["subscribers"] == 1 and bs["publishes"] == 201 and bs["sends"] <= 3


def test_publish_before_start_and_many_subscribers(cleanup):
    cfg = edgeml.EdgeConfig(port_number=0, action_keys=["a"], observation_keys=["o"], broadcast_port=0)
    srv = cleanup(edgeml.EdgeServer(cfg, lambda k: {}, lambda k, a: {}, host="127.0.0.1"))
    assert srv.publish_observation({"o": "first"}) == 0  # kept until start
    srv.start(threaded=True)
    clients = [cleanup(edgeml.EdgeClient("127.0.0.1", srv.port)) for _ in range(5)]
    seen = [[] for _ in clients]
    for c, s in zip(clients, seen):
        c.register_observation_callback(lambda o, s=s: s.append(o["o"]))
    assert wait_until(lambda: all(s == ["first"] for s in seen))
    img = np.random.default_rng(1).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    srv.publish_observation({"o": img})
    assert wait_until(lambda: all(len(s) == 2 for s in seen))
    for s in seen:
        np.testing.assert_array_equal(s[1], img)


def test_callback_exception_in_subscriber_is_logged_and_stream_goes_on(edge, cleanup, caplog):
    srv, cfg, _ = edge()
    c = cleanup(edgeml.EdgeClient("127.0.0.1", config=cfg))
    got = []

    def cb(o):
        got.append(o)
        if len(got) == 1:
            raise ValueError("bad frame")

    c.register_observation_callback(cb)
    srv.publish_observation(1)
    assert wait_until(lambda: len(got) == 1)
    srv.publish_observation(2)
    assert wait_until(lambda: got == [1, 2])
    assert "bad frame" in caplog.text


def test_stop_from_another_thread_frees_both_ports(edge, cleanup):
    srv, cfg, _ = edge()
    c = cleanup(edgeml.EdgeClient("127.0.0.1", config=cfg))
    c.register_observation_callback(lambda o: None)
    srv.publish_observation(1)
    assert wait_until(lambda: srv.stats()["broadcast"]["sends"] == 1)
    port, bport = srv.port, srv.broadcast_port
    t = threading.Thread(target=srv.stop)
    t.start()
    t.join(scaled(10))
    assert not t.is_alive()
    assert port_is_free(port) and port_is_free(bport)
    srv.stop()  # idempotent
    with pytest.raises(edgeml.ClosedError):
        srv.publish_observation(2)
    with pytest.raises(edgeml.EdgeMLConnectionError):
        c.get_observation(timeout=scaled(2))
    # the same ports serve again, and the subscriber follows the new server
    cfg2 = edgeml.EdgeConfig(port_number=port, action_keys=ACT_KEYS, observation_keys=OBS_KEYS, broadcast_port=bport)
    srv2 = cleanup(edgeml.EdgeServer(cfg2, make_obs, lambda k, a: {}, host="127.0.0.1"))
    srv2.start(threaded=True)
    srv2.publish_observation("again")
    assert c.latest_observation(timeout=scaled(10), after_version=1) == "again"
    assert set(c.get_observation(["state"])) == {"state"}


def test_stop_from_a_callback(edge, cleanup):
    holder = {}

    def obs_cb(keys):
        holder["srv"].stop()
        return {"bye": True}

    srv, cfg, _ = edge(obs_cb=obs_cb)
    holder["srv"] = srv
    c = cleanup(edgeml.EdgeClient("127.0.0.1", config=cfg))
    assert c.get_observation() == {"bye": True}  # the computed reply is not lost
    assert wait_until(lambda: not srv.running)
    assert wait_until(lambda: port_is_free(cfg.port_number) and port_is_free(cfg.broadcast_port))


def test_context_managers(cleanup):
    cfg = edgeml.EdgeConfig(port_number=0, action_keys=["a"], observation_keys=["o"], broadcast_port=0)
    with edgeml.EdgeServer(cfg, lambda k: {"o": 1}, lambda k, a: a, host="127.0.0.1") as srv:
        with edgeml.EdgeClient("127.0.0.1", srv.port) as c:
            assert c.get_observation() == {"o": 1}
            assert c.send_action("x") == "x"
    assert not srv.running


def test_blocking_start_stopped_from_another_thread():
    cfg = edgeml.EdgeConfig(port_number=0, action_keys=["a"], observation_keys=["o"], broadcast_port=0)
    srv = edgeml.EdgeServer(cfg, lambda k: {"o": 1}, None, host="127.0.0.1")
    threading.Timer(0.3, srv.stop).start()
    srv.start()  # blocks until stop()
    assert not srv.running
    assert port_is_free(srv.port) and port_is_free(srv.broadcast_port)


async def _async_calls(c):
    return await c.aget_observation(["o"]), await c.asend_action(5)


def test_async_variants(cleanup):
    import asyncio
    cfg = edgeml.EdgeConfig(port_number=0, action_keys=["a"], observation_keys=["o"])
    srv = cleanup(edgeml.EdgeServer(cfg, lambda k: {"o": 1}, lambda k, a: a * 2, host="127.0.0.1"))
    srv.start(threaded=True)
    c = cleanup(edgeml.EdgeClient("127.0.0.1", srv.port))
    assert c.get_observation_async().result(scaled(10)) == {"o": 1}
    assert asyncio.run(_async_calls(c)) == ({"o": 1}, 10)
