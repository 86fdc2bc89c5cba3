"""Remote gymnasium environments (agentlace's gym_env): CartPole and an env
whose observations are a Dict of an image and a vector, served by
GymEnvServerWrapper and used through GymEnvClient as a real gymnasium.Env;
spaces encoded without pickle (docs/protocol.md, "Gymnasium spaces")."""
import threading
import warnings

import numpy as np
import pytest

gym = pytest.importorskip("gymnasium")
from gymnasium import spaces  # noqa: E402

import edgeml  # noqa: E402
from compathelpers import free_port  # noqa: E402
from conftest import scaled  # noqa: E402
from edgeml.gym_env import GymEnvClient, GymEnvServerWrapper, decode_space, encode_space  # noqa: E402

pytestmark = pytest.mark.timeout(60)

H, W = 48, 64


class CameraEnv(gym.Env):
    """A robot-like env: observations {"image": uint8 HxWx3, "state": float32
    vector}, continuous actions; records what happened to it."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, render_mode="rgb_array"):
        self.render_mode = render_mode
        self.observation_space = spaces.Dict({
            "image": spaces.Box(0, 255, (H, W, 3), np.uint8),
            "state": spaces.Box(-10.0, 10.0, (7,), np.float32),
        })
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.steps = 0
        self.closed = False
        self.actions = []
        self.block = None  # an Event a step waits on (to make one slow)
        self._state = np.zeros(7, np.float32)

    def _obs(self):
        img = np.full((H, W, 3), self.steps % 256, np.uint8)
        img[0, 0] = [1, 2, 3]
        return {"image": img, "state": self._state.copy()}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.steps = 0
        self._state = self.np_random.uniform(-1, 1, 7).astype(np.float32)
        return self._obs(), {"seed": seed, "options": options or {}}

    def step(self, action):
        if self.block is not None:
            self.block.wait(scaled(30))
        if not self.action_space.contains(np.asarray(action, np.float32)):
            raise ValueError(f"action {action!r} outside the action space")
        self.actions.append(np.array(action))
        self.steps += 1
        self._state[:2] += np.asarray(action, np.float32)
        return self._obs(), float(self.steps), self.steps >= 5, False, {"steps": self.steps}

    def render(self):
        return self._obs()["image"]

    def close(self):
        self.closed = True


@pytest.fixture
def serve(cleanup):
    """serve(env) -> (wrapper, client): the env behind a GymEnvServerWrapper
    on loopback port 0 and a GymEnvClient to it."""
    def make(env, **client_kw):
        wrapper = cleanup(GymEnvServerWrapper(env, port=0, host="127.0.0.1"))
        wrapper.start(threaded=True)
        client_kw.setdefault("timeout", scaled(10))
        client = cleanup(GymEnvClient("127.0.0.1", wrapper.port, **client_kw))
        return wrapper, client
    return make


def test_cartpole_matches_the_local_env(serve):
    """The agentlace gym_cartpole_env example: the same episode, remote and
    local, step for step."""
    _, env = serve(gym.make("CartPole-v1"))
    local = gym.make("CartPole-v1")
    assert isinstance(env, gym.Env)
    assert env.observation_space == local.observation_space and env.action_space == local.action_space
    assert env.observation_space.dtype == np.float32 and isinstance(env.action_space, spaces.Discrete)
    assert env.metadata["render_fps"] == local.metadata["render_fps"] and env.remote_spec_id == "CartPole-v1"
    obs, info = env.reset(seed=42)
    lobs, _ = local.reset(seed=42)
    np.testing.assert_array_equal(obs, lobs)
    assert obs.dtype == np.float32 and info == {} and obs in env.observation_space
    rng = np.random.default_rng(0)
    done, n = False, 0
    while not done:
        action = int(rng.integers(2))
        observation, reward, terminated, truncated, info = env.step(action)
        lo, lr, lte, ltr, _ = local.step(action)
        np.testing.assert_array_equal(observation, lo)
        assert (reward, terminated, truncated) == (lr, lte, ltr)
        done = terminated or truncated
        n += 1
    assert n > 5
    action = env.action_space.sample()  # a real space: sampling works here
    assert env.action_space.contains(action)
    env.close()
    env.close()  # idempotent


def test_cartpole_passes_gymnasiums_env_checker(serve):
    from gymnasium.utils.env_checker import check_env
    _, env = serve(gym.make("CartPole-v1"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CartPole's own infinite bounds are warned about
        check_env(env, skip_render_check=True)


def test_dict_of_image_and_vector(serve):
    real = CameraEnv()
    wrapper, env = serve(real)
    assert env.observation_space == real.observation_space
    assert list(env.observation_space.spaces) == ["image", "state"]
    img_space = env.observation_space["image"]
    assert img_space.dtype == np.uint8 and img_space.shape == (H, W, 3)
    assert img_space.low.max() == 0 and img_space.high.min() == 255
    assert env.action_space == real.action_space and env.action_space.dtype == np.float32
    assert env.render_mode == "rgb_array" and env.metadata["render_fps"] == 10

    obs, info = env.reset(seed=3, options={"difficulty": 2})
    assert info == {"seed": 3, "options": {"difficulty": 2}}
    assert set(obs) == {"image", "state"} and obs in env.observation_space
    assert obs["image"].dtype == np.uint8 and obs["image"].shape == (H, W, 3)
    assert obs["image"][0, 0].tolist() == [1, 2, 3]
    np.testing.assert_array_equal(obs["state"], real._state)

    terminated, steps = False, 0
    while not terminated:
        action = np.array([0.5, -0.25], np.float32)
        obs, reward, terminated, truncated, info = env.step(action)
        steps += 1
        assert reward == float(steps) and info == {"steps": steps} and truncated is False
        assert obs in env.observation_space and obs["image"][5, 5, 0] == steps
    assert steps == 5 and len(real.actions) == 5
    np.testing.assert_array_equal(real.actions[0], [0.5, -0.25])
    frame = env.render()
    assert frame.shape == (H, W, 3) and frame.dtype == np.uint8
    env.close()
    assert real.closed  # as in agentlace: close() closes the remote env


def test_errors_reach_the_client_and_the_server_goes_on(serve):
    real = CameraEnv()
    _, env = serve(real)
    env.reset()
    with pytest.raises(edgeml.RemoteError, match="outside the action space") as e:
        env.step(np.array([5.0, 5.0], np.float32))
    assert e.value.remote_type == "ValueError"
    env.step(np.zeros(2, np.float32))
    assert real.steps == 1


def test_a_step_that_times_out_is_not_sent_again(serve):
    """agentlace re-sent a request that got no reply (a step taken twice);
    edgeml raises and never re-sends."""
    real = CameraEnv()
    _, env = serve(real, timeout_ms=200, timeout=None)
    assert env.client.timeout == pytest.approx(0.2)
    env.reset()
    real.block = threading.Event()
    try:
        with pytest.raises(edgeml.EdgeMLTimeoutError):
            env.step(np.zeros(2, np.float32))
    finally:
        real.block.set()
    real.block = None
    env.client.timeout = scaled(10)
    env.step(np.zeros(2, np.float32))  # the server finished the first step meanwhile
    assert real.steps == 2 and len(real.actions) == 2


def test_close_remote_false_leaves_the_env_open(serve, cleanup):
    real = CameraEnv()
    wrapper, env = serve(real, close_remote=False)
    other = cleanup(GymEnvClient("127.0.0.1", wrapper.port, timeout=scaled(10)))
    env.close()
    assert not real.closed
    other.reset()
    with pytest.raises(edgeml.ClosedError):
        env.step(np.zeros(2, np.float32))


def test_wrapper_is_a_gymnasium_wrapper_and_blocking_start_stops(cleanup):
    real = CameraEnv()
    port = free_port()  # a number known before the server binds it
    wrapper = GymEnvServerWrapper(real, port=port, host="127.0.0.1")
    assert isinstance(wrapper, gym.Wrapper) and wrapper.unwrapped is real
    assert wrapper.observation_space == real.observation_space
    t = threading.Thread(target=wrapper.start, daemon=True)  # start() blocks, as agentlace's did
    try:
        t.start()
        # the client's connect retries (with backoff) until the server is up
        client = cleanup(GymEnvClient("127.0.0.1", port, timeout=scaled(10), connect_timeout=scaled(10)))
        client.reset()
        assert t.is_alive()
    finally:
        wrapper.stop()
        t.join(scaled(10))
    assert not t.is_alive()


# ------------------------------------------------ the space encoding

SPACES = [
    spaces.Box(-1.0, 1.0, (3,), np.float32),
    spaces.Box(0, 255, (4, 5, 3), np.uint8),
    spaces.Box(low=np.array([-np.inf, 0.0]), high=np.array([np.inf, 1.0]), dtype=np.float64),
    spaces.Box(-5, 5, (2, 2), np.int16),
    spaces.Discrete(7),
    spaces.Discrete(3, start=-1),
    spaces.MultiDiscrete([3, 4, 5]),
    spaces.MultiDiscrete(np.array([[2, 3], [4, 5]]), start=np.array([[1, 1], [0, -2]])),
    spaces.MultiBinary(6),
    spaces.MultiBinary([2, 3]),
    spaces.Text(8),
    spaces.Text(5, min_length=2, charset="abc"),
    spaces.Tuple([spaces.Discrete(2), spaces.Box(0, 1, (2,))]),
    spaces.Dict({"b": spaces.Discrete(2), "a": spaces.Dict({"img": spaces.Box(0, 255, (2, 2, 3), np.uint8),
                                                          "t": spaces.Tuple([spaces.MultiBinary(2)])})}),
]


def _walk_plain(obj):
    """Only plain data in an encoding: dicts, lists, str, int, arrays."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str)
            _walk_plain(v)
    elif isinstance(obj, list):
        for v in obj:
            _walk_plain(v)
    else:
        assert isinstance(obj, (str, int, np.ndarray)), type(obj)


@pytest.mark.parametrize("space", SPACES, ids=lambda s: repr(s)[:60])
def test_space_round_trip_over_the_wire(space):
    enc = encode_space(space)
    _walk_plain(enc)
    frame = edgeml.encode_frame(enc)
    assert b"pickle" not in frame and b"\x80\x04\x95" not in frame  # no pickle protocol header
    back = decode_space(edgeml.decode_frame(frame)["payload"])
    assert type(back) is type(space) and back == space
    assert back.dtype == space.dtype and back.shape == space.shape
    if isinstance(space, spaces.Dict):
        assert list(back.spaces) == list(space.spaces)  # key order kept
    for _ in range(3):
        assert back.contains(space.sample()) and space.contains(back.sample())


def test_encoding_of_discrete_as_documented():
    """The example in docs/protocol.md, "Gymnasium spaces"."""
    assert encode_space(spaces.Discrete(2)) == {"__space__": "Discrete", "n": 2, "start": 0, "dtype": "<i8"}
    box = encode_space(spaces.Box(0, 255, (2, 2, 3), np.uint8))
    assert box["__space__"] == "Box" and box["dtype"] == "|u1" and box["low"].shape == (2, 2, 3)


class MyBox(spaces.Box):
    pass


@pytest.mark.parametrize("space, name", [
    (spaces.Sequence(spaces.Discrete(2)), "gymnasium.spaces.sequence.Sequence"),
    (spaces.Graph(node_space=spaces.Discrete(2), edge_space=None), "gymnasium.spaces.graph.Graph"),
    (spaces.OneOf([spaces.Discrete(2), spaces.Discrete(3)]) if hasattr(spaces, "OneOf") else None, "OneOf"),
    (MyBox(0, 1, (2,)), "MyBox"),
    (spaces.Dict({"ok": spaces.Discrete(2), "bad": spaces.Sequence(spaces.Discrete(2))}), "Sequence"),
])
def test_unknown_spaces_raise_encode_error(space, name):
    if space is None:
        pytest.skip("this gymnasium has no OneOf")
    with pytest.raises(edgeml.EncodeError, match=name) as e:
        encode_space(space)
    assert isinstance(e.value, TypeError) and "Box, Discrete" in str(e.value)


def test_wrapper_refuses_an_env_with_an_unknown_space_at_once():
    class SeqEnv(CameraEnv):
        def __init__(self):
            super().__init__()
            self.observation_space = spaces.Sequence(spaces.Discrete(3))

    with pytest.raises(edgeml.EncodeError, match="observation_space.*Sequence"):
        GymEnvServerWrapper(SeqEnv(), port=0, host="127.0.0.1")


@pytest.mark.parametrize("bad, match", [
    ({"n": 2}, "not an encoded space"),
    ({"__space__": "Nope"}, "unknown space type 'Nope'"),
    ({"__space__": "Discrete", "start": 0}, "missing 'n'"),
    ({"__space__": "Discrete", "n": "2", "start": 0}, "'n' has type str"),
    ({"__space__": "Discrete", "n": True, "start": 0}, "'n' has type bool"),
    ({"__space__": "Box", "low": np.zeros(2), "high": np.ones(3), "dtype": "<f8"}, "differ in shape"),
    ({"__space__": "Box", "low": np.zeros(2), "high": np.ones(2), "dtype": "|O"}, "dtype"),
    ({"__space__": "Box", "low": np.zeros(2), "high": np.ones(2), "dtype": "<U3"}, "bool, int or float"),
    ({"__space__": "MultiDiscrete", "nvec": np.array([0, 2]), "start": np.zeros(2, np.int64),
      "dtype": "<i8"}, "MultiDiscrete"),
    ({"__space__": "Dict", "spaces": [["a"]]}, "pairs"),
    ({"__space__": "Tuple", "spaces": [{"__space__": "Discrete"}]}, r"space\[0\]"),
    ({"__space__": "Text", "max_length": 3, "min_length": 1, "charset": 5}, "charset"),
])
def test_malformed_encodings_raise_decode_error(bad, match):
    with pytest.raises(edgeml.DecodeError, match=match):
        decode_space(bad)
