"""agentlace's trainer (and the original edgeml's) as their tests, READMEs
and SERL-style actor/learner loops use it, with only the import changed to
edgeml: TrainerServer/TrainerClient, update_datastore and
get_server_last_update_id, the data_store(s) attributes, log_level,
experimental_pipeline_port, weights as mappings, and TrainerSMInterface."""
import collections.abc
import logging
import subprocess
import sys
import threading

import numpy as np
import pytest

import edgeml
from compathelpers import bound_config, edgeml_logger  # noqa: F401  (fixture)
from conftest import scaled, wait_until

pytestmark = pytest.mark.timeout(60)

CLIENT_CAPACITY = 3
SERVER_CAPACITY = 6


def new_data_callback(table_name, payload) -> dict:
    assert table_name in {"table1", "table2"}, "Invalid table name"
    return {}


def request_callback(type: str, payload) -> dict:
    assert type == "get-stats", "Invalid request type"
    return {"trainer-status": "it's working"}


def test_agentlace_test_queued_data_store():
    """agentlace's test_queued_data_store, as written there."""
    from edgeml.data.data_store import QueuedDataStore

    ds = QueuedDataStore(6)
    assert len(ds) == 0
    ds.insert(1)
    ds.insert(2)
    assert len(ds) == 2
    data_id_2 = ds.latest_data_id()
    assert len(ds.get_latest_data(data_id_2)) == 0
    ds.insert(3)
    assert len(ds) == 3
    assert len(ds.get_latest_data(data_id_2)) == 1
    ds.batch_insert([4, 5, 6])
    assert len(ds) == 6
    data_id_6 = ds.latest_data_id()
    ds.batch_insert([7, 8, 9])
    assert len(ds) == 6
    assert ds.get_latest_data(data_id_2) == [4, 5, 6, 7, 8, 9]
    assert ds.get_latest_data(data_id_6) == [7, 8, 9]
    data_id_9 = ds.latest_data_id()
    ds.batch_insert([10, 11, 12, 13, 14, 15, 16, 17])
    assert ds._data_queue[-1] == 17
    assert ds.latest_data_id() - data_id_9 == 8 and ds.latest_seq_id == ds.latest_data_id()


@pytest.fixture
def agentlace_trainer(cleanup):
    """agentlace's test_trainer set-up: a server with two stores, a client
    with two local stores, the network callback registered."""
    from edgeml.data.data_store import QueuedDataStore
    from edgeml.trainer import TrainerClient, TrainerConfig, TrainerServer

    trainer_config = TrainerConfig(port_number=0, broadcast_port=0, request_types=["get-stats"])
    server = cleanup(TrainerServer(trainer_config, new_data_callback, request_callback))
    ds_trainer1, ds_trainer2 = QueuedDataStore(SERVER_CAPACITY), QueuedDataStore(SERVER_CAPACITY)
    server.register_data_store("table1", ds_trainer1)
    server.register_data_store("table2", ds_trainer2)
    server.start(threaded=True)
    ds_actor1, ds_actor2 = QueuedDataStore(CLIENT_CAPACITY), QueuedDataStore(CLIENT_CAPACITY)
    client = cleanup(TrainerClient("table1", "127.0.0.1", bound_config(trainer_config, server),
                                   data_stores={"table1": ds_actor1, "table2": ds_actor2}))
    return server, client, (ds_trainer1, ds_trainer2), (ds_actor1, ds_actor2)


def test_agentlace_test_trainer(agentlace_trainer):
    """agentlace's tests/test_trainer.py::test_trainer step by step; waits
    replace its sleeps, and an unknown request type raises (agentlace
    returned None)."""
    server, client, (ds_trainer1, ds_trainer2), (ds_actor1, ds_actor2) = agentlace_trainer
    received = []
    client.recv_network_callback(received.append)

    assert len(ds_trainer1) == 0 and "table1" in server.store_names()
    ds_actor1.insert(np.array([1, 2, 3]))
    assert len(ds_actor1) == 1
    ds_actor1.insert(np.array([4, 5, 6]))
    assert client.update(), "Client update failed"
    assert len(ds_actor1) == 2
    assert len(ds_trainer1) == 2  # update() returns once the server has stored it: no sleep needed

    ds_actor1.insert(np.array([7, 8, 9]))
    ds_actor2.insert(np.array([30, 31, 32]))
    ds_actor2.insert(np.array([30, 31, 32]))
    assert len(ds_trainer1) == 2 and len(ds_trainer2) == 0
    assert client.update()
    assert len(ds_trainer1) == 3 and len(ds_trainer2) == 2

    ds_actor1.insert(np.array([10, 11, 12]))
    assert len(ds_actor1) == CLIENT_CAPACITY
    assert client.update() is not None
    assert len(ds_trainer1) == 4 and len(ds_trainer2) == 2
    np.testing.assert_array_equal(ds_trainer1.get_latest_data(-1)[-1], [10, 11, 12])

    response = client.request("get-stats", {})
    assert response["trainer-status"] == "it's working"
    with pytest.raises(edgeml.UnknownRequestTypeError):
        client.request("invalid", {})

    client.start_async_update(interval=0.05)
    ds_actor1.insert(np.array([13, 14, 15]))
    latest_data_id = ds_actor1.latest_data_id()
    assert wait_until(lambda: ds_trainer1.latest_data_id() == latest_data_id), "Async update failed"

    network = np.array([100, 200, 300, 400])
    server.publish_network(network)
    got = client.latest_network(timeout=scaled(10))
    assert np.array_equal(got, network)
    assert wait_until(lambda: received and np.array_equal(received[-1], network))
    client.stop()
    server.stop()


def test_update_datastore_and_server_last_update_id(agentlace_trainer):
    """agentlace's explicit sync: ask the server where it is, send from there."""
    server, client, (ds_trainer1, _), (ds_actor1, _) = agentlace_trainer
    assert client.get_server_last_update_id("table1") == -1
    assert client.update_datastore("table1", -1) is True  # nothing yet: True, as in agentlace
    for i in range(3):
        ds_actor1.insert(np.array([i]))
    from_id = client.get_server_last_update_id("table1")
    assert client.update_datastore("table1", from_id) is True
    assert len(ds_trainer1) == 3 and client.get_server_last_update_id("table1") == 2
    # sending from an older id again stores nothing twice
    assert client.update_datastore("table1", -1, confirm_update=True) is True
    assert len(ds_trainer1) == 3 and server.duplicates_dropped == 3
    ds_actor1.insert(np.array([3]))
    assert client.update_datastore("table1", client.get_server_last_update_id("table1"), confirm_update=True)
    assert [int(x[0]) for x in ds_trainer1.get_latest_data(-1)] == [0, 1, 2, 3]
    assert client.update() is True and len(ds_trainer1) == 4  # update() knows what was sent
    # where agentlace logged and returned False or None, edgeml raises
    with pytest.raises(edgeml.UnknownDataStoreError, match="table1"):
        client.update_datastore("no-such-local-store", -1)


def test_server_last_update_id_of_an_unknown_store_raises(cleanup):
    cfg = edgeml.TrainerConfig(port_number=0, broadcast_port=None)
    server = cleanup(edgeml.TrainerServer(cfg, host="127.0.0.1"))
    server.register_data_store("table1", edgeml.QueuedDataStore(10))
    server.start(threaded=True)
    client = cleanup(edgeml.TrainerClient("127.0.0.1", bound_config(cfg, server)))
    with pytest.raises(edgeml.UnknownDataStoreError, match="table1"):
        client.get_server_last_update_id("nope")  # agentlace: None and a warning


def test_data_store_attributes(cleanup):
    from edgeml.data.data_store import QueuedDataStore
    from edgeml.trainer import TrainerClient, TrainerConfig, TrainerServer

    cfg = TrainerConfig(port_number=0, broadcast_port=0)
    server = cleanup(TrainerServer(cfg, new_data_callback))
    sstore = QueuedDataStore(10)
    server.register_data_store("table1", sstore)
    server.start(threaded=True)
    assert dict(server.data_stores) == {"table1": sstore}
    with pytest.raises(TypeError):
        server.data_stores["x"] = sstore  # read-only: register_data_store adds stores
    cfg = bound_config(cfg, server)
    local = QueuedDataStore(10)
    c1 = cleanup(TrainerClient("table1", "127.0.0.1", cfg, data_store=local))
    assert c1.data_store is local and dict(c1.data_stores) == {"table1": local}
    assert c1.data_stores_map == c1.data_stores and c1.client_name == "table1"
    c2 = cleanup(TrainerClient("table1", "127.0.0.1", cfg, data_stores={"table1": local}))
    assert c2.data_store is None and c2.data_stores["table1"] is local


def test_original_edgeml_test_trainer(cleanup):
    """The original edgeml's test_trainer: one store given as data_store=,
    the server's data_callback sees each batch, client.data_store. Its
    update() returned a dict; edgeml's returns True (docs/migrating.md)."""
    from edgeml.data.data_store import QueuedDataStore
    from edgeml.trainer import TrainerClient, TrainerConfig, TrainerServer

    batches = []

    def dummy_training_callback(table_name, payload):
        assert table_name == "table1"
        batches.append(list(payload["data"]))
        return {"weights": payload["data"]}

    trainer_config = TrainerConfig(port_number=0, broadcast_port=0, request_types=["get-stats"])
    server = cleanup(TrainerServer(trainer_config, dummy_training_callback, request_callback))
    ds_server = QueuedDataStore(3)
    server.register_data_store("table1", ds_server)
    server.start(threaded=True)
    ds_client = QueuedDataStore(3)
    client = cleanup(TrainerClient("table1", "127.0.0.1", bound_config(trainer_config, server), data_store=ds_client))
    ds_client.insert(np.array([1, 2, 3]))
    assert len(client.data_store) == 1
    ds_client.insert(np.array([4, 5, 6]))
    assert client.update() is True
    assert len(ds_server) == 2 and len(batches) == 1 and len(batches[0]) == 2
    ds_client.insert(np.array([7, 8, 9]))
    client.update()
    assert len(ds_server) == 3
    assert client.request("get-stats", {})["trainer-status"] == "it's working"


def test_original_edgeml_readme_train_step(cleanup):
    """The original edgeml README: TrainerClient(host, config).train_step."""
    def train_step(payload):
        observation = payload["observation"]
        return {"w": np.asarray(observation) * 2}

    config = edgeml.TrainerConfig(port_number=0, broadcast_port=0, payload_keys={"observation"})
    trainer_server = cleanup(edgeml.TrainerServer(config, train_step))
    trainer_server.start(threaded=True)
    trainer = cleanup(edgeml.TrainerClient("localhost", bound_config(config, trainer_server)))
    new_weights = trainer.train_step({"observation": np.arange(4.0)})
    np.testing.assert_array_equal(new_weights["w"], [0, 2, 4, 6])
    with pytest.raises(edgeml.InvalidKeyError):
        trainer.train_step({"other": 1})


def test_agentlace_positional_forms_and_log_level(cleanup, edgeml_logger, caplog):
    """TrainerServer(config, data_callback, request_callback, log_level) and
    TrainerClient(name, ip, config, data_store, data_stores, log_level,
    wait_for_server, timeout_ms), positionally; log_level reaches the
    edgeml logger (a warning edgeml logs is dropped below its level)."""
    cfg = edgeml.TrainerConfig(5555, 5556, ["get-stats"])  # agentlace's field order
    assert cfg.request_types == ["get-stats"] and cfg.payload_keys is None
    cfg = edgeml.TrainerConfig(0, 0, ["get-stats"])
    server = cleanup(edgeml.TrainerServer(cfg, new_data_callback, request_callback, logging.ERROR))
    assert edgeml_logger.level == logging.ERROR
    sstore = edgeml.QueuedDataStore(100)
    server.register_data_store("table1", sstore)
    server.start(threaded=True)
    local = edgeml.QueuedDataStore(2)
    client = cleanup(edgeml.TrainerClient("table1", "127.0.0.1", bound_config(cfg, server), local, None,
                                          logging.ERROR, False, scaled(4000)))
    assert client.timeout == pytest.approx(scaled(4.0))
    assert client.request("get-stats", None) == {"trainer-status": "it's working"}
    for i in range(5):
        local.insert(i)  # overflows the local store: edgeml warns about it
    with caplog.at_level(logging.NOTSET):
        assert client.update()
    assert not [r for r in caplog.records if r.name == "edgeml" and r.levelno == logging.WARNING]
    edgeml.TrainerClient("table1", "127.0.0.1", bound_config(cfg, server), local, log_level="WARNING").close()
    assert edgeml_logger.level == logging.WARNING
    for i in range(5):
        local.insert(i)
    caplog.clear()
    assert client.update()
    assert [r for r in caplog.records if r.name == "edgeml" and "dropped" in r.getMessage()]
    with pytest.raises(ValueError, match="log_level"):
        edgeml.InferenceServer(0, log_level="LOUD")


def test_log_level_shows_messages_when_logging_is_not_configured():
    """agentlace called logging.basicConfig(level=log_level): a program that
    configured no logging still sees what it asked for."""
    code = ("import logging, edgeml\n"
            "edgeml.InferenceServer(0, log_level=logging.INFO)\n"
            "logging.getLogger('edgeml').info('visible at INFO')\n"
            "logging.getLogger('edgeml').debug('hidden at INFO')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "visible at INFO" in r.stderr and "hidden at INFO" not in r.stderr


def test_experimental_pipeline_port_is_accepted(cleanup):
    """agentlace's TrainerConfig(experimental_pipeline_port=...): accepted,
    opens nothing, data goes (acknowledged) on the request connection."""
    cfg = edgeml.TrainerConfig(port_number=0, broadcast_port=None, experimental_pipeline_port=5547)
    server = cleanup(edgeml.TrainerServer(cfg, host="127.0.0.1"))
    sstore = edgeml.QueuedDataStore(10)
    server.register_data_store("actor_env", sstore)
    server.start(threaded=True)
    local = edgeml.QueuedDataStore(10)
    # another pipeline port on the client is not a config mismatch
    client = cleanup(edgeml.TrainerClient("actor_env", "127.0.0.1",
                                          edgeml.TrainerConfig(port_number=server.port, broadcast_port=None,
                                                               experimental_pipeline_port="5600"),
                                          data_store=local))
    local.insert({"obs": np.zeros(3)})
    assert client.update() and len(sstore) == 1
    for bad in (-1, 70000, "abc", True, 1.5):
        with pytest.raises(ValueError, match="experimental_pipeline_port"):
            edgeml.TrainerConfig(experimental_pipeline_port=bad)


class FrozenMapping(collections.abc.Mapping):
    """Stands in for flax's FrozenDict: an immutable Mapping, not a dict."""

    def __init__(self, d):
        self._d = dict(d)

    def __getitem__(self, k):
        return self._d[k]

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)


def _params():
    return {"params": {"dense": {"kernel": np.ones((3, 2), np.float32), "bias": np.zeros(2, np.float32)}}}


@pytest.fixture
def weights_pair(cleanup):
    cfg = edgeml.TrainerConfig(port_number=0, broadcast_port=0)
    server = cleanup(edgeml.TrainerServer(cfg, host="127.0.0.1"))
    server.start(threaded=True)
    client = cleanup(edgeml.TrainerClient("127.0.0.1", bound_config(cfg, server)))
    client.recv_network_callback(lambda w: None)
    return server, client


def test_mapping_weights_arrive_as_dicts(weights_pair):
    server, client = weights_pair
    p = _params()
    frozen = FrozenMapping({"params": FrozenMapping({"dense": FrozenMapping(p["params"]["dense"])})})
    server.publish_network(frozen)
    got = client.latest_network(timeout=scaled(10))
    assert type(got) is dict and type(got["params"]) is dict and type(got["params"]["dense"]) is dict
    np.testing.assert_array_equal(got["params"]["dense"]["kernel"], p["params"]["dense"]["kernel"])


def test_flax_frozendict_round_trip(weights_pair):
    flax_core = pytest.importorskip("flax.core")
    server, client = weights_pair
    server.publish_network(flax_core.freeze(_params()))
    got = client.latest_network(timeout=scaled(10))
    assert type(got) is dict
    back = flax_core.freeze(got)  # docs/migrating.md: how to get the FrozenDict back
    assert isinstance(back, flax_core.FrozenDict)
    np.testing.assert_array_equal(back["params"]["dense"]["bias"], np.zeros(2))


# ------------------------------------------------ TrainerSMInterface

def actor_loop(client, store, steps, weights_seen):
    """An actor written once, for a TrainerClient or a TrainerSMInterface
    (agentlace's async_learner_actor.py actor)."""
    client.recv_network_callback(weights_seen.append)
    for step in range(steps):
        store.insert({"observations": np.full(2, step, np.float32), "rewards": 1.0})
        if step % 10 == 0:
            assert client.update()
        if step % 25 == 0:
            client.request("send-stats", {"step": step})
    assert client.update()


def test_sm_interface_swaps_for_client_and_server():
    """agentlace's single-process mode: a learner thread and the actor share
    a replay buffer and one TrainerSMInterface (its tunnel)."""
    from edgeml.data.data_store import QueuedDataStore
    from edgeml.trainer import TrainerSMInterface, TrainerTunnel

    assert TrainerTunnel is TrainerSMInterface
    replay_buffer = QueuedDataStore(1000)
    tunnel = TrainerSMInterface()
    stats = []
    tunnel.register_request_callback(lambda type, payload: stats.append((type, payload)) or {})
    filled = threading.Event()
    learner_done = threading.Event()
    errors_in_learner = []

    def learner():
        try:
            tunnel.start(threaded=True)  # nothing to start
            assert filled.wait(scaled(10))
            for version in range(1, 4):
                assert tunnel.publish_network({"version": version, "n": len(replay_buffer)}) == version
        except BaseException as e:  # reported by the main thread
            errors_in_learner.append(e)
        finally:
            learner_done.set()

    t = threading.Thread(target=learner)
    t.start()
    weights = []
    actor_loop(tunnel, replay_buffer, 50, weights)
    filled.set()
    t.join(scaled(10))
    assert not errors_in_learner and learner_done.is_set()
    assert len(replay_buffer) == 50 and [s[1]["step"] for s in stats] == [0, 25]
    assert [w["version"] for w in weights] == [1, 2, 3]
    assert tunnel.latest_network(timeout=0)["version"] == 3
    assert tunnel.get_server_last_update_id("any") == -1
    tunnel.register_data_store("actor_env", replay_buffer)
    assert tunnel.get_server_last_update_id("actor_env") == 49 and tunnel.data_store("actor_env") is replay_buffer
    late = []
    tunnel.recv_network_callback(late.append)  # a late subscriber gets the latest at once
    assert late == [{"version": 3, "n": 50}]
    tunnel.stop()
    tunnel.stop()
    with pytest.raises(edgeml.ClosedError):
        tunnel.publish_network({})


def test_same_actor_over_the_network(cleanup):
    """The actor_loop above, unchanged, against a real TrainerServer."""
    cfg = edgeml.TrainerConfig(port_number=0, broadcast_port=0, request_types=["send-stats"])
    stats = []
    server = cleanup(edgeml.TrainerServer(cfg, request_callback=lambda t, p: stats.append(p) or {},
                                          host="127.0.0.1"))
    replay = edgeml.QueuedDataStore(1000)
    server.register_data_store("actor_env", replay)
    server.start(threaded=True)
    local = edgeml.QueuedDataStore(100)
    client = cleanup(edgeml.TrainerClient("actor_env", "127.0.0.1", bound_config(cfg, server), local))
    server.publish_network({"version": 1})
    weights = []
    actor_loop(client, local, 50, weights)
    assert len(replay) == 50 and [s["step"] for s in stats] == [0, 25]
    assert wait_until(lambda: weights == [{"version": 1}])


def test_sm_interface_raises_where_agentlace_returned_none():
    cfg = edgeml.TrainerConfig(request_types=["send-stats"])
    tunnel = edgeml.TrainerSMInterface(cfg)
    with pytest.raises(edgeml.InvalidArgumentError, match="request_callback"):
        tunnel.request("send-stats", {})
    with pytest.raises(edgeml.UnknownRequestTypeError):
        tunnel.request("other", {})
    with pytest.raises(edgeml.InvalidArgumentError, match="train_step"):
        tunnel.train_step({})
    tunnel.register_train_step(lambda p: {"w": p["x"] + 1})
    assert tunnel.train_step({"x": 1}) == {"w": 2}
    with pytest.raises(edgeml.EdgeMLTimeoutError):
        tunnel.latest_network(timeout=0.01)
    with tunnel:
        pass
    with pytest.raises(edgeml.ClosedError):
        tunnel.latest_network(timeout=1)
