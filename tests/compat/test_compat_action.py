"""agentlace's action server/client and the original edgeml's edge
server/client, used as their tests and READMEs use them, with only the
import changed to edgeml (ports 0 on loopback instead of fixed ones)."""
import dataclasses
import logging
import threading

import numpy as np
import pytest

import edgeml
from compathelpers import bound_config, edgeml_logger, free_port  # noqa: F401  (fixture)
from conftest import scaled

pytestmark = pytest.mark.timeout(60)

IMG = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)


def obs_callback(keys) -> dict:
    if "test_image" in keys:
        return {"status": "success", "test_image": IMG}
    return {"status": "error", "message": "Invalid key requested"}


def act_callback(key: str, payload: dict) -> dict:
    if key == "send_image":
        return {"status": "success", "message": "Image received", "payload": payload}
    return {"status": "error", "message": "Invalid action"}


def test_agentlace_test_action(cleanup):
    """agentlace/tests/test_action.py, with a broadcast that is waited for
    instead of slept on."""
    from edgeml.action import ActionClient, ActionConfig, ActionServer

    config = ActionConfig(port_number=0, action_keys=["send_image"], observation_keys=["test_image"],
                          broadcast_port=0)
    server = cleanup(ActionServer(config, obs_callback, act_callback))
    server.start(threaded=True)
    config = bound_config(config, server)
    client = cleanup(ActionClient("127.0.0.1", config))

    received = []
    got_one = threading.Event()

    def client_callback(data):
        received.append(data)
        got_one.set()

    client.register_obs_callback(client_callback)
    observation = client.obs()
    img = observation["test_image"]
    assert img.shape == (256, 256, 3), "incorrect image shape"
    np.testing.assert_array_equal(img, IMG)
    assert client.act("send_image", {"n": 1})["message"] == "Image received"

    server.publish_obs({"test-broadcast": 1})
    assert got_one.wait(scaled(10)), "Client did not receive broadcasted data"
    assert "test-broadcast" in received[-1]
    server.stop()
    client.stop()


def test_agentlace_keyword_names_and_log_level(cleanup, edgeml_logger):
    """ActionServer(config, obs_callback=..., act_callback=..., log_level=...)
    as agentlace's gym_env calls it, and log_level in fourth place."""
    from edgeml.action import ActionClient, ActionConfig, ActionServer

    config = ActionConfig(port_number=0, action_keys=["send_image"], observation_keys=["test_image"])
    s1 = cleanup(ActionServer(config, obs_callback=obs_callback, act_callback=act_callback,
                              log_level=logging.ERROR))
    assert edgeml_logger.level == logging.ERROR
    s2 = cleanup(ActionServer(config, obs_callback, act_callback, logging.DEBUG))  # positional, as agentlace
    assert edgeml_logger.level == logging.DEBUG
    for s in (s1, s2):
        s.start(threaded=True)
        c = cleanup(ActionClient("127.0.0.1", bound_config(config, s), timeout_ms=scaled(5000)))
        assert c.timeout == pytest.approx(scaled(5.0))
        assert c.obs()["test_image"].shape == (256, 256, 3)
        # agentlace's act(key) sends {} when no payload is given
        assert c.act("send_image")["payload"] == {}
    with pytest.raises(TypeError, match="obs_callback"):
        edgeml.ActionServer(config, obs_callback, obs_callback=act_callback)


def test_agentlace_errors_are_raised_not_returned(cleanup):
    """Where agentlace returned None or a {"success": False} reply, edgeml
    raises (docs/migrating.md)."""
    from edgeml.action import ActionClient, ActionConfig, ActionServer

    config = ActionConfig(port_number=0, action_keys=["send_image"], observation_keys=["test_image"])
    server = cleanup(ActionServer(config, None, act_callback))  # no obs_callback
    server.start(threaded=True)
    cfg = bound_config(config, server)
    client = cleanup(ActionClient("127.0.0.1", cfg))
    with pytest.raises(edgeml.InvalidArgumentError, match="observation_callback"):
        client.obs()  # agentlace: {"success": False, "message": "Invalid payload"}
    with pytest.raises(edgeml.InvalidKeyError):
        client.obs(["not_a_key"])  # agentlace: AssertionError
    with pytest.raises(edgeml.InvalidKeyError):
        client.act("not_a_key", {})  # agentlace: Exception
    with pytest.raises(edgeml.InvalidArgumentError, match="broadcast"):
        client.register_obs_callback(print)  # agentlace: Exception("Broadcast server not initialized")
    with pytest.raises(edgeml.InvalidArgumentError, match="broadcast"):
        server.publish_obs({"x": 1})  # agentlace: False and a warning
    other = dataclasses.replace(cfg, observation_keys=["other"])
    with pytest.raises(edgeml.HandshakeError, match="observation_keys"):
        ActionClient("127.0.0.1", other)  # agentlace: Exception("Incompatible config ...")
    server.stop()
    with pytest.raises(edgeml.EdgeMLConnectionError):
        ActionClient("127.0.0.1", cfg, connect_timeout=0.2)  # agentlace: Exception("Failed to connect ...")


def test_config_is_not_modified(cleanup):
    """agentlace's ActionClient turned the config's key lists into sets; the
    caller's config stays as given here."""
    config = edgeml.ActionConfig(port_number=0, action_keys=["a"], observation_keys=["o"])
    server = cleanup(edgeml.ActionServer(config, lambda keys: {"o": 1}, None))
    server.start(threaded=True)
    cfg = bound_config(config, server)
    before = dataclasses.asdict(cfg)
    cleanup(edgeml.ActionClient("127.0.0.1", cfg)).obs()
    assert dataclasses.asdict(cfg) == before and isinstance(cfg.observation_keys, list)


def test_wait_for_server(cleanup):
    """ActionClient(..., wait_for_server=True) waits for a server that comes
    up later, past the connect timeout that fails without it."""
    port = free_port()
    config = edgeml.ActionConfig(port_number=port, action_keys=["a"], observation_keys=["o"])
    with pytest.raises(edgeml.EdgeMLConnectionError):
        edgeml.ActionClient("127.0.0.1", config, connect_timeout=0.2)
    made = []
    t = threading.Thread(target=lambda: made.append(
        edgeml.ActionClient("127.0.0.1", config, wait_for_server=True, connect_timeout=0.2)), daemon=True)
    t.start()
    t.join(scaled(1.0))
    assert t.is_alive() and not made  # still waiting, past its 0.2 s connect timeout
    server = cleanup(edgeml.ActionServer(config, lambda keys: {"o": 7}, None, host="127.0.0.1"))
    server.start(threaded=True)
    t.join(scaled(20))
    assert made, "the waiting client did not connect"
    cleanup(made[0])
    assert made[0].obs() == {"o": 7}


def test_original_edgeml_readme(cleanup):
    """The original edgeml README: the edge device as server, the model's
    machine as client (get_observation / send_action)."""
    actions = []

    def action_callback(key, action):
        actions.append((key, action))
        return {"status": "received"}

    def observation_callback(keys):
        return {"observation": "some_value"}

    config = edgeml.EdgeConfig(port_number=0, action_keys=["action"], observation_keys=["observation"])
    agent_server = cleanup(edgeml.EdgeServer(config, observation_callback, action_callback))
    agent_server.start(threaded=True)
    agent_config = bound_config(config, agent_server)

    agent = cleanup(edgeml.EdgeClient("localhost", agent_server.port, task_id="mnist", config=agent_config))
    for i in range(100):
        observation = agent.get_observation()
        assert observation == {"observation": "some_value"}
        assert agent.send_action(np.full(2, i)) == {"status": "received"}
    assert len(actions) == 100 and actions[-1][0] == "action"
    np.testing.assert_array_equal(actions[-1][1], [99, 99])


def test_original_edgeml_test_edge(cleanup):
    """The original edgeml's tests/test_edge.py: edgeml.interfaces, an
    EdgeClient built from (host, config), obs() and the broadcast."""
    from edgeml.interfaces import EdgeClient, EdgeConfig, EdgeServer

    config = EdgeConfig(port_number=0, action_keys=["send_image"], observation_keys=["test_image"],
                        broadcast_port=0)
    server = cleanup(EdgeServer(config, obs_callback, act_callback))
    server.start(threaded=True)
    client = cleanup(EdgeClient("127.0.0.1", bound_config(config, server)))
    got = threading.Event()
    client.register_obs_callback(lambda data: "test-broadcast" in data and got.set())
    assert client.obs()["test_image"].shape == (256, 256, 3)
    server.publish_obs({"test-broadcast": 1})
    assert got.wait(scaled(10))


def test_client_keyword_spellings(cleanup):
    """server_ip= and port_num= for EdgeClient, as for the other clients."""
    config = edgeml.EdgeConfig(port_number=0, action_keys=["a"], observation_keys=["o"])
    server = cleanup(edgeml.EdgeServer(config, lambda keys: {"o": 1}, None, host="127.0.0.1"))
    server.start(threaded=True)
    c = cleanup(edgeml.EdgeClient(server_ip="127.0.0.1", port_num=server.port))
    assert c.get_observation() == {"o": 1}
    with pytest.raises(TypeError, match="server_ip"):
        edgeml.EdgeClient("127.0.0.1", server.port, server_ip="10.0.0.1")
