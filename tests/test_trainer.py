"""TrainerServer / TrainerClient: train_step, custom requests, rate limits,
data sync without loss or duplicates (lost replies, restarted actors, two
actors on one store), weights broadcast (latest value, 20 MB to 4
subscribers), many clients, stop from another thread."""
import dataclasses
import threading
import time

import numpy as np
import pytest

import edgeml
from conftest import port_is_free, scaled, wait_until

pytestmark = pytest.mark.timeout(90)


def weights_like(seed=0, mb=1):
    rng = np.random.default_rng(seed)
    n = mb * (1 << 20) // 4
    return {"policy": {"w": rng.standard_normal(n, dtype=np.float32)}, "step": seed}


@pytest.fixture
def trainer(cleanup):
    """A TrainerServer on ports 0; returns (server, client config with the
    bound ports, server store, calls log)."""
    def make(train_step=None, data_callback=None, request_callback=None, store=True, **cfg_kw):
        calls = []
        cfg_kw.setdefault("request_types", ["checkpoint", "stats"])
        cfg = edgeml.TrainerConfig(port_number=0, broadcast_port=0, **cfg_kw)
        if train_step is None:
            def train_step(payload):
                calls.append(payload)
                return {"w": np.full(4, len(calls), dtype=np.float32)}
        if request_callback is None:
            def request_callback(rtype, payload):
                return {"type": rtype, "payload": payload}
        srv = cleanup(edgeml.TrainerServer(cfg, train_step, data_callback, request_callback, host="127.0.0.1"))
        server_store = None
        if store:
            server_store = edgeml.QueuedDataStore(100000)
            srv.register_data_store("replay", server_store)
        srv.start(threaded=True)
        ccfg = dataclasses.replace(cfg, port_number=srv.port, broadcast_port=srv.broadcast_port)
        return srv, ccfg, server_store, calls
    return make


def client(cleanup, cfg, **kw):
    kw.setdefault("timeout", scaled(20))
    return cleanup(edgeml.TrainerClient("127.0.0.1", cfg, **kw))


def test_train_step_and_requests(trainer, cleanup):
    srv, cfg, _, calls = trainer(payload_keys=["observation", "reward"])
    c = client(cleanup, cfg)
    w = c.train_step({"observation": np.ones(4), "reward": 1.0})
    np.testing.assert_array_equal(w["w"], np.ones(4, np.float32))
    assert c.train_step({"observation": np.zeros(4)})["w"][0] == 2
    assert c.request("checkpoint", {"path": "/tmp/x"}) == {"type": "checkpoint", "payload": {"path": "/tmp/x"}}
    assert c.request("stats") == {"type": "stats", "payload": None}
    with pytest.raises(edgeml.InvalidKeyError, match="'action' is not one of the config's payload_keys"):
        c.train_step({"observation": 1, "action": 2})
    with pytest.raises(edgeml.InvalidKeyError, match="payload_keys"):  # the server checks too
        c._request("train_step", {"action": 2})
    assert len(calls) == 2


def test_unknown_request_type_is_an_error_not_none(trainer, cleanup):
    srv, cfg, _, _ = trainer()
    c = client(cleanup, cfg)
    with pytest.raises(edgeml.UnknownRequestTypeError) as ei:
        c.request("reboot", {})
    assert ei.value.request_types == ["checkpoint", "stats"]
    with pytest.raises(LookupError):  # the server refuses it too, with the list
        c._request("request", ["reboot", {}])
    with pytest.raises(edgeml.UnknownRequestTypeError) as ei:
        c._request("request", ["reboot", {}])
    assert ei.value.request_types == ["checkpoint", "stats"]


def test_missing_callbacks_give_clear_errors(cleanup):
    cfg = edgeml.TrainerConfig(port_number=0, broadcast_port=None, request_types=["x"])
    srv = cleanup(edgeml.TrainerServer(cfg, host="127.0.0.1"))
    srv.start(threaded=True)
    c = client(cleanup, dataclasses.replace(cfg, port_number=srv.port))
    with pytest.raises(edgeml.InvalidArgumentError, match="no train_step"):
        c.train_step({})
    with pytest.raises(edgeml.InvalidArgumentError, match="no request_callback"):
        c.request("x")
    with pytest.raises(edgeml.InvalidArgumentError, match="no broadcast port"):
        c.recv_network_callback(print)
    with pytest.raises(edgeml.InvalidArgumentError, match="broadcast"):
        srv.publish_network({})


def test_rate_limit_is_an_error_not_none(trainer, cleanup):
    srv, cfg, _, _ = trainer(rate_limit=2)
    c = client(cleanup, cfg)
    assert c.request("stats", 1)["payload"] == 1
    with pytest.raises(edgeml.RateLimitError) as ei:
        c.request("stats", 2)
    assert 0 < ei.value.retry_after <= 0.5
    time.sleep(ei.value.retry_after + 0.01)
    assert c.request("stats", 3)["payload"] == 3
    assert c.train_step({})  # train_step is not rate limited


def test_callback_that_raises_goes_to_its_caller(trainer, cleanup):
    def train_step(p):
        if p.get("boom"):
            raise ValueError("nan loss")
        return {"ok": True}

    srv, cfg, _, _ = trainer(train_step=train_step, request_callback=lambda t, p: [][1])
    c = client(cleanup, cfg)
    with pytest.raises(edgeml.RemoteError) as ei:
        c.train_step({"boom": 1})
    assert ei.value.remote_type == "ValueError" and "nan loss" in str(ei.value)
    with pytest.raises(edgeml.RemoteError, match="IndexError"):
        c.request("stats")
    assert c.train_step({}) == {"ok": True}


def test_update_sends_each_item_once(trainer, cleanup):
    srv, cfg, sstore, _ = trainer()
    local = edgeml.QueuedDataStore(1000)
    c = client(cleanup, cfg, data_stores={"replay": local})
    assert c.update() is True  # nothing to send
    img = np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)
    for i in range(200):
        local.insert({"obs": img if i % 50 == 0 else img[:1], "action": i, "reward": 1.0})
    assert c.update() is True
    assert len(sstore) == 200 and [d["action"] for d in sstore.get_latest_data(-1)] == list(range(200))
    np.testing.assert_array_equal(sstore.get_latest_data(-1)[50]["obs"], img)
    assert c.update() is True and len(sstore) == 200  # again: nothing new, nothing duplicated
    local.insert({"action": 200})
    assert c.update() is True and len(sstore) == 201
    assert c.items_sent == 201 and srv.items_received == 201


def test_lost_reply_does_not_duplicate(trainer, cleanup, monkeypatch):
    srv, cfg, sstore, _ = trainer()
    local = edgeml.QueuedDataStore(1000)
    c = client(cleanup, cfg, data_stores={"replay": local})
    local.batch_insert([{"i": i} for i in range(10)])
    real = c._request

    def reply_lost(method, payload, timeout=None):
        real(method, payload, timeout)  # the server stores the batch...
        raise edgeml.EdgeMLTimeoutError("reply lost")  # ...but the reply never arrives

    monkeypatch.setattr(c, "_request", reply_lost)
    with pytest.raises(edgeml.EdgeMLTimeoutError):
        c.update()
    monkeypatch.setattr(c, "_request", real)
    local.batch_insert([{"i": i} for i in range(10, 15)])
    assert c.update() is True
    assert [d["i"] for d in sstore.get_latest_data(-1)] == list(range(15))
    assert srv.duplicates_dropped == 10


def test_restarted_actor_and_two_actors_on_one_store(trainer, cleanup):
    srv, cfg, sstore, _ = trainer()
    a_store = edgeml.QueuedDataStore(100)
    a = client(cleanup, cfg, data_stores={"replay": a_store})
    a_store.batch_insert([("a", i) for i in range(5)])
    assert a.update()
    a.stop()
    # the actor restarts: a new process, a new store whose ids start at 0 again
    a2_store = edgeml.QueuedDataStore(100)
    a2 = client(cleanup, cfg, data_stores={"replay": a2_store})
    assert a2.session != a.session
    a2_store.batch_insert([("a2", i) for i in range(5)])
    # another actor writes to the same store name at the same time
    b_store = edgeml.QueuedDataStore(100)
    b = client(cleanup, cfg, data_stores={"replay": b_store})
    b_store.batch_insert([("b", i) for i in range(7)])
    assert a2.update() and b.update()
    got = sstore.get_latest_data(-1)
    assert len(got) == 17 and len(set(got)) == 17
    assert sorted(got) == sorted([("a", i) for i in range(5)] + [("a2", i) for i in range(5)] +
                                 [("b", i) for i in range(7)])


def test_agentlace_forms(cleanup):
    received = []
    cfg = edgeml.TrainerConfig(port_number=0, broadcast_port=0, request_types=["ping"])
    # agentlace: TrainerServer(config, data_callback, request_callback)
    srv = cleanup(edgeml.TrainerServer(cfg, lambda name, payload: received.append((name, payload["data"])),
                                       lambda t, p: "pong", host="127.0.0.1"))
    store = edgeml.QueuedDataStore(50)
    srv.register_data_store("actor1", store)
    srv.start(threaded=True)
    ccfg = dataclasses.replace(cfg, port_number=srv.port, broadcast_port=srv.broadcast_port)
    local = edgeml.QueuedDataStore(50)
    # agentlace: TrainerClient(name, server_ip, config, data_store=...)
    c = cleanup(edgeml.TrainerClient("actor1", "127.0.0.1", ccfg, data_store=local, timeout_ms=10000))
    assert c.request("ping", None) == "pong"
    local.batch_insert([1, 2, 3])
    assert c.update() is True
    assert store.get_latest_data(-1) == [1, 2, 3]
    assert received == [("actor1", [1, 2, 3])]
    c2 = cleanup(edgeml.TrainerClient("actor1", "127.0.0.1", ccfg, local))  # data_store positional
    assert c2.update() is True and len(store) == 6  # a new session: its data is new data


def test_data_callback_raising_reports_and_loses_nothing(trainer, cleanup):
    seen = []

    def data_callback(name, payload):
        seen.append(list(payload["data"]))
        if len(seen) == 1:
            raise RuntimeError("callback broke")

    srv, cfg, sstore, _ = trainer(data_callback=data_callback)
    local = edgeml.QueuedDataStore(100)
    c = client(cleanup, cfg, data_stores={"replay": local})
    local.batch_insert([0, 1, 2])
    with pytest.raises(edgeml.RemoteError, match="callback broke"):
        c.update()
    assert sstore.get_latest_data(-1) == [0, 1, 2]  # stored before the callback
    local.insert(3)
    assert c.update() is True
    assert sstore.get_latest_data(-1) == [0, 1, 2, 3] and seen == [[0, 1, 2], [3]]


def test_unknown_store_name(trainer, cleanup):
    srv, cfg, _, _ = trainer()
    local = edgeml.QueuedDataStore(10)
    c = client(cleanup, cfg, data_stores={"nope": local})
    local.insert(1)
    with pytest.raises(edgeml.UnknownDataStoreError, match="no data store named 'nope'.*'replay'"):
        c.update()


def test_local_overflow_is_reported(trainer, cleanup, caplog):
    srv, cfg, sstore, _ = trainer()
    local = edgeml.QueuedDataStore(4)
    c = client(cleanup, cfg, data_stores={"replay": local})
    local.batch_insert(range(3))
    assert c.update()
    local.batch_insert(range(3, 13))  # 10 new, only 4 kept
    assert c.update()
    assert c.items_dropped_locally == 6 and "dropped 6 items" in caplog.text
    assert sstore.get_latest_data(-1) == [0, 1, 2, 9, 10, 11, 12]


def test_async_update_and_stop_flushes(trainer, cleanup):
    srv, cfg, sstore, _ = trainer()
    local = edgeml.QueuedDataStore(1000)
    c = client(cleanup, cfg, data_stores={"replay": local})
    c.start_async_update(interval=0.05)
    local.batch_insert(range(10))
    assert wait_until(lambda: len(sstore) == 10)
    local.batch_insert(range(10, 20))
    c.stop()  # sends what is left
    assert sstore.get_latest_data(-1) == list(range(20))
    c.stop()  # idempotent
    with pytest.raises(edgeml.ClosedError):
        c.train_step({})


def test_async_update_survives_a_server_restart(cleanup):
    cfg = edgeml.TrainerConfig(port_number=0, broadcast_port=None)
    s1 = edgeml.TrainerServer(cfg, host="127.0.0.1")
    st1 = edgeml.QueuedDataStore(1000)
    s1.register_data_store("replay", st1)
    s1.start(threaded=True)
    port = s1.port
    ccfg = dataclasses.replace(cfg, port_number=port)
    local = edgeml.QueuedDataStore(1000)
    c = client(cleanup, ccfg, data_stores={"replay": local}, timeout=scaled(2))
    c.start_async_update(interval=0.05)
    local.batch_insert(range(5))
    assert wait_until(lambda: len(st1) == 5)
    s1.stop()
    local.batch_insert(range(5, 8))  # written while the learner is down
    s2 = cleanup(edgeml.TrainerServer(dataclasses.replace(cfg, port_number=port), host="127.0.0.1"))
    st2 = edgeml.QueuedDataStore(1000)
    s2.register_data_store("replay", st2)
    s2.start(threaded=True)
    # the new run lost what the first acknowledged (an in-memory store): the
    # client sends everything it still holds again, each item once
    assert wait_until(lambda: len(st2) == 8, timeout=10)
    assert st2.get_latest_data(-1) == list(range(8))
    assert c.resends_after_restart == 1


def test_weights_broadcast_latest_value(trainer, cleanup):
    srv, cfg, _, _ = trainer()
    srv.publish_network({"v": 0})
    c = client(cleanup, cfg)
    got, gate = [], threading.Event()

    def slow(w):
        got.append(w["v"])
        gate.wait(scaled(10))

    c.recv_network_callback(slow)
    assert wait_until(lambda: got == [0])  # late subscriber: current weights at once
    for v in range(1, 101):
        srv.publish_network({"v": v, "w": np.full(1000, v, np.float32)})
    gate.set()
    assert wait_until(lambda: got[-1] == 100)
    assert len(got) <= 3, got
    assert c.latest_network(timeout=scaled(5))["v"] == 100
    assert c.network_version == len(got)


def test_20mb_weights_to_4_subscribers(trainer, cleanup):
    srv, cfg, _, _ = trainer()
    clients = [client(cleanup, cfg) for _ in range(4)]
    for c in clients:
        c.recv_network_callback(lambda w: None)
    assert wait_until(lambda: srv.stats()["broadcast"]["subscribers"] == 4)
    for step in range(3):
        w = weights_like(step, mb=20)
        srv.publish_network(w)
        w["policy"]["w"][:] = -1  # the publisher may reuse its arrays at once
        expect = weights_like(step, mb=20)
        for c in clients:
            got = c.latest_network(timeout=scaled(30), after_version=step)
            assert got["step"] == step
            np.testing.assert_array_equal(got["policy"]["w"], expect["policy"]["w"])
    assert all(c.network_version == 3 for c in clients)


def test_many_clients_one_server(trainer, cleanup):
    srv, cfg, sstore, calls = trainer()
    n_clients, n_calls = 12, 30
    errors = []

    def actor(k):
        try:
            local = edgeml.QueuedDataStore(1000)
            c = client(cleanup, cfg, data_stores={"replay": local})
            for i in range(n_calls):
                w = c.train_step({"actor": k, "i": i, "obs": np.full((16, 16, 3), k, np.uint8)})
                assert w["w"].shape == (4,)
                local.insert((k, i))
            assert c.update()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=actor, args=(k,)) for k in range(n_clients)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(scaled(60))
    assert not errors, errors
    assert len(calls) == n_clients * n_calls
    assert sorted(sstore.get_latest_data(-1)) == sorted((k, i) for k in range(n_clients) for i in range(n_calls))


def test_stop_from_another_thread_frees_both_ports(trainer, cleanup):
    srv, cfg, _, _ = trainer()
    c = client(cleanup, cfg)
    c.recv_network_callback(lambda w: None)
    srv.publish_network(weights_like(0, mb=4))
    assert wait_until(lambda: c.network_version == 1)
    t = threading.Thread(target=srv.stop)
    t.start()
    t.join(scaled(10))
    assert not t.is_alive()
    assert port_is_free(cfg.port_number) and port_is_free(cfg.broadcast_port)
    with pytest.raises(edgeml.EdgeMLConnectionError):
        c.train_step({}, timeout=scaled(2))


def test_config_checks(trainer, cleanup):
    srv, cfg, _, _ = trainer()
    with pytest.raises(edgeml.HandshakeError, match="request_types"):
        edgeml.TrainerClient("127.0.0.1", dataclasses.replace(cfg, request_types=["other"]))
    with pytest.raises(ValueError):
        edgeml.TrainerConfig(rate_limit=0)
    with pytest.raises(TypeError):
        edgeml.TrainerConfig(request_types="abc")
    with pytest.raises(TypeError):
        edgeml.TrainerClient("127.0.0.1")
    with pytest.raises(TypeError):
        edgeml.TrainerClient("127.0.0.1", cfg, data_stores={"x": object()})
    cfg_before = dataclasses.replace(cfg)
    c = client(cleanup, cfg)
    c.train_step({})
    assert cfg == cfg_before


def test_update_splits_large_backlogs(trainer, cleanup, monkeypatch):
    import edgeml.trainer as tr
    monkeypatch.setattr(tr, "_CHUNK_BYTES", 200_000)  # about 4 images per message
    srv, cfg, sstore, _ = trainer()
    local = edgeml.QueuedDataStore(100)
    c = client(cleanup, cfg, data_stores={"replay": local})
    img = np.zeros((128, 128, 3), np.uint8)
    local.batch_insert([{"obs": img + i, "i": i} for i in range(21)])
    before = srv.stats()["requests"]
    assert c.update() is True
    assert srv.stats()["requests"] - before == 6  # ceil(21 / 4)
    got = sstore.get_latest_data(-1)
    assert [d["i"] for d in got] == list(range(21)) and int(got[20]["obs"][0, 0, 0]) == 20
