"""Remote gymnasium environments (agentlace's ``gym_env``): wrap the
environment on the robot, ``GymEnvServerWrapper(env, port).start()``, and
use it from anywhere as a real ``gymnasium.Env``, ``GymEnvClient(host,
port)``.

The spaces travel without pickle: ``encode_space`` turns a gymnasium space
into plain tagged dicts of ints, strings and arrays (docs/protocol.md,
"Gymnasium spaces"), ``decode_space`` builds the space again, so the
client's ``observation_space`` and ``action_space`` are real spaces with
the server's dtype, shape and bounds (not its seed). Observations, actions
and infos are ordinary edgeml payloads (arrays, dicts, tuples, numbers,
str).

Needs gymnasium (``pip install gymnasium``; from the edgeml checkout
``pip install -e '.[gym]'``).
"""
from __future__ import annotations

import inspect
import logging
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

try:
    import gymnasium as gym
    from gymnasium import spaces as _spaces
except ImportError as _e:  # pragma: no cover - exercised only without gymnasium
    raise ImportError("edgeml.gym_env needs gymnasium: pip install gymnasium "
                      "(from the edgeml checkout: pip install -e '.[gym]')") from _e

from . import _compat, errors
from ._base import DEFAULT_TIMEOUT
from .edge import EdgeClient, EdgeConfig, EdgeServer

log = logging.getLogger("edgeml")

__all__ = ["GymEnvServerWrapper", "GymEnvClient", "encode_space", "decode_space", "SPACE_TAG", "ENV_CONFIG"]

SPACE_TAG = "__space__"
_VERSION = "edgeml.gym_env/1"
_ACTION_KEYS = ["reset", "step", "render", "close"]
_OBS_KEYS = ["observation_space", "action_space", "env_info"]
_NUMBER_KINDS = "biuf"  # the dtype kinds a Box, MultiDiscrete or Discrete may have


def _config(port: int) -> EdgeConfig:
    return EdgeConfig(port_number=port, action_keys=list(_ACTION_KEYS), observation_keys=list(_OBS_KEYS),
                      broadcast_port=None, version=_VERSION)


ENV_CONFIG = _config(5546)  # the keys both sides use (agentlace's DefaultActionConfig, plus "env_info")

_ENCODABLE = "Box, Discrete, MultiDiscrete, MultiBinary, Dict, Tuple, Text"


# ---------------------------------------------------------------- spaces

def _dtype_str(dt: Any, what: str) -> str:
    dt = np.dtype(dt)
    if dt.kind not in _NUMBER_KINDS:
        raise errors.EncodeError(f"{what}: dtype {dt} cannot be sent (a space's dtype must be bool, int or float)")
    return dt.str


def encode_space(space: Any, _path: str = "space") -> Dict[str, Any]:
    """A gymnasium space as a tagged dict of plain values (no pickle):
    ``{"__space__": "Box", "low": array, "high": array, "dtype": "<f4"}``
    and so on for Discrete, MultiDiscrete, MultiBinary, Dict, Tuple and Text.
    Any other space raises EncodeError naming its type and where it is."""
    t = type(space)
    # exact types: a subclass may add state or behaviour the receiver cannot rebuild
    if t is _spaces.Box:
        return {SPACE_TAG: "Box", "low": np.ascontiguousarray(space.low), "high": np.ascontiguousarray(space.high),
                "dtype": _dtype_str(space.dtype, _path)}
    if t is _spaces.Discrete:
        d = {SPACE_TAG: "Discrete", "n": int(space.n), "start": int(space.start)}
        if getattr(space, "dtype", None) is not None:
            d["dtype"] = _dtype_str(space.dtype, _path)
        return d
    if t is _spaces.MultiDiscrete:
        return {SPACE_TAG: "MultiDiscrete", "nvec": np.ascontiguousarray(space.nvec),
                "start": np.ascontiguousarray(getattr(space, "start", np.zeros_like(space.nvec))),
                "dtype": _dtype_str(space.dtype, _path)}
    if t is _spaces.MultiBinary:
        n = space.n
        return {SPACE_TAG: "MultiBinary", "n": int(n) if np.ndim(n) == 0 else [int(x) for x in np.ravel(n)]}
    if t is _spaces.Dict:
        items = []
        for k, sub in space.spaces.items():
            if not isinstance(k, str):
                raise errors.EncodeError(f"{_path}: Dict space keys must be str, got {k!r}")
            items.append([k, encode_space(sub, f"{_path}[{k!r}]")])
        return {SPACE_TAG: "Dict", "spaces": items}
    if t is _spaces.Tuple:
        return {SPACE_TAG: "Tuple",
                "spaces": [encode_space(sub, f"{_path}[{i}]") for i, sub in enumerate(space.spaces)]}
    if t is _spaces.Text:
        chars = getattr(space, "character_list", None)
        chars = "".join(chars) if chars is not None else "".join(sorted(space.character_set))
        return {SPACE_TAG: "Text", "max_length": int(space.max_length), "min_length": int(space.min_length),
                "charset": chars}
    raise errors.EncodeError(
        f"{_path}: a gymnasium space of type {t.__module__}.{t.__qualname__} cannot be sent; "
        f"edgeml encodes {_ENCODABLE} (compose those, or send your own description)")


def _field(d: dict, key: str, types: tuple, what: str) -> Any:
    if key not in d:
        raise errors.DecodeError(f"{what}: missing {key!r}")
    v = d[key]
    if not isinstance(v, types) or isinstance(v, bool) and bool not in types:
        raise errors.DecodeError(f"{what}: {key!r} has type {type(v).__name__}")
    return v


def _decode_dtype(s: Any, what: str) -> np.dtype:
    if not isinstance(s, str):
        raise errors.DecodeError(f"{what}: dtype must be a str, got {type(s).__name__}")
    try:
        dt = np.dtype(s)
    except TypeError as e:
        raise errors.DecodeError(f"{what}: unknown dtype {s!r}") from e
    if dt.kind not in _NUMBER_KINDS or dt.str != s:
        raise errors.DecodeError(f"{what}: dtype {s!r} is not a bool, int or float dtype")
    return dt


def _accepts(cls: type, param: str) -> bool:
    try:
        return param in inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def decode_space(obj: Any, _path: str = "space", _depth: int = 0) -> Any:
    """The gymnasium space an ``encode_space`` dict describes. Anything else
    (an unknown tag, a missing or mistyped field, bounds the space refuses)
    raises DecodeError."""
    if _depth > 16:
        raise errors.DecodeError(f"{_path}: spaces nested deeper than 16")
    if not isinstance(obj, dict) or not isinstance(obj.get(SPACE_TAG), str):
        raise errors.DecodeError(f"{_path}: not an encoded space (a dict with {SPACE_TAG!r})")
    kind = obj[SPACE_TAG]
    what = f"{_path} ({kind})"
    try:
        if kind == "Box":
            low = _field(obj, "low", (np.ndarray, np.generic), what)
            high = _field(obj, "high", (np.ndarray, np.generic), what)
            dt = _decode_dtype(obj.get("dtype"), what)
            if np.shape(low) != np.shape(high):
                raise errors.DecodeError(f"{what}: low {np.shape(low)} and high {np.shape(high)} differ in shape")
            return _spaces.Box(low=np.array(low), high=np.array(high), shape=np.shape(low), dtype=dt)
        if kind == "Discrete":
            n = _field(obj, "n", (int,), what)
            start = _field(obj, "start", (int,), what)
            kw = {}
            if "dtype" in obj:
                dt = _decode_dtype(obj["dtype"], what)
                if _accepts(_spaces.Discrete, "dtype"):
                    kw["dtype"] = dt
                elif dt != np.int64:
                    raise errors.DecodeError(f"{what}: this gymnasium has no Discrete(dtype=...) for {dt}")
            return _spaces.Discrete(n, start=start, **kw)
        if kind == "MultiDiscrete":
            nvec = _field(obj, "nvec", (np.ndarray,), what)
            start = _field(obj, "start", (np.ndarray,), what)
            dt = _decode_dtype(obj.get("dtype"), what)
            if _accepts(_spaces.MultiDiscrete, "start"):
                return _spaces.MultiDiscrete(np.array(nvec), dtype=dt, start=np.array(start))
            if np.any(start != 0):
                raise errors.DecodeError(f"{what}: this gymnasium has no MultiDiscrete(start=...)")
            return _spaces.MultiDiscrete(np.array(nvec), dtype=dt)
        if kind == "MultiBinary":
            n = _field(obj, "n", (int, list), what)
            if isinstance(n, list) and not all(isinstance(x, int) and not isinstance(x, bool) for x in n):
                raise errors.DecodeError(f"{what}: 'n' must be an int or a list of ints")
            return _spaces.MultiBinary(n)
        if kind == "Dict":
            items = _field(obj, "spaces", (list,), what)
            pairs = []
            for it in items:
                if not (isinstance(it, list) and len(it) == 2 and isinstance(it[0], str)):
                    raise errors.DecodeError(f"{what}: 'spaces' must be a list of [str key, space] pairs")
                pairs.append((it[0], decode_space(it[1], f"{_path}[{it[0]!r}]", _depth + 1)))
            return _spaces.Dict(pairs)  # a sequence of pairs keeps the sender's key order
        if kind == "Tuple":
            subs = _field(obj, "spaces", (list,), what)
            return _spaces.Tuple([decode_space(s, f"{_path}[{i}]", _depth + 1) for i, s in enumerate(subs)])
        if kind == "Text":
            return _spaces.Text(_field(obj, "max_length", (int,), what),
                                min_length=_field(obj, "min_length", (int,), what),
                                charset=_field(obj, "charset", (str,), what))
    except errors.DecodeError:
        raise
    except (TypeError, ValueError, AssertionError) as e:  # gymnasium refused the values
        raise errors.DecodeError(f"{what}: {e}") from e
    raise errors.DecodeError(f"{_path}: unknown space type {kind!r} (known: {_ENCODABLE})")


# ---------------------------------------------------------------- server

def _plain_info(env: Any) -> Dict[str, Any]:
    """What a client needs besides the spaces: render_mode and the metadata
    values that are plain data."""
    meta = {}
    for k, v in (getattr(env, "metadata", None) or {}).items():
        if isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str))
                                   or (isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v))):
            meta[k] = list(v) if isinstance(v, tuple) else v
    spec = getattr(env, "spec", None)
    return {"render_mode": getattr(env, "render_mode", None), "metadata": meta,
            "spec_id": getattr(spec, "id", None) if spec is not None else None}


class GymEnvServerWrapper(gym.Wrapper):
    """Serves ``env`` to ``GymEnvClient``\\ s: reset, step, render and close
    run here, one request at a time, on the serving thread.

    ``GymEnvServerWrapper(env, port=5546, host="0.0.0.0")``; ``start()``
    blocks until ``stop()`` (``start(threaded=True)`` returns at once);
    ``port`` is the bound port (useful with port 0). The spaces are encoded
    once, here, so an unsupported space raises EncodeError at once on the
    robot instead of at the client. ``token=`` as on every server.
    """

    def __init__(self, env: gym.Env, port: int = 5546, host: str = "0.0.0.0", *, token: Optional[str] = None,
                 max_message_bytes: Optional[int] = None, log_level: Any = None):
        super().__init__(env)
        self._spaces_payload = {"observation_space": encode_space(env.observation_space, "observation_space"),
                                "action_space": encode_space(env.action_space, "action_space")}
        self._edgeml_server = EdgeServer(_config(port), self._observe, self._act, log_level, host=host,
                                         token=token, max_message_bytes=max_message_bytes)

    @property
    def port(self) -> int:
        return self._edgeml_server.port

    @property
    def server(self) -> EdgeServer:
        """The EdgeServer underneath (stats(), repr)."""
        return self._edgeml_server

    def start(self, threaded: bool = False) -> None:
        self._edgeml_server.start(threaded)

    def stop(self, timeout: Optional[float] = None) -> None:
        self._edgeml_server.stop(timeout)

    def __enter__(self) -> "GymEnvServerWrapper":
        if not self._edgeml_server.running:
            self._edgeml_server.start(threaded=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _observe(self, keys: List[str]) -> Dict[str, Any]:
        out = {}
        for k in keys:
            out[k] = _plain_info(self.env) if k == "env_info" else self._spaces_payload[k]
        return out

    def _act(self, key: str, payload: Any) -> Any:
        if key == "reset":
            kw = payload if isinstance(payload, dict) else {}
            obs, info = self.env.reset(seed=kw.get("seed"), options=kw.get("options"))
            return (obs, info)
        if key == "step":
            obs, reward, terminated, truncated, info = self.env.step(payload)
            return (obs, reward, bool(terminated), bool(truncated), info)
        if key == "render":
            return self.env.render()
        if key == "close":
            self.env.close()
            return None
        raise ValueError(f"unknown env action {key!r}")  # pragma: no cover - keys are checked first

    def __repr__(self) -> str:
        return f"<GymEnvServerWrapper {self.env!r} on {self._edgeml_server!r}>"


# ---------------------------------------------------------------- client

class GymEnvClient(gym.Env):
    """A ``gymnasium.Env`` whose reset, step, render and close run on a
    ``GymEnvServerWrapper`` at ``host:port``.

    ``observation_space`` and ``action_space`` are the server's spaces
    (decoded, not unpickled); ``render_mode`` and ``metadata`` come from the
    server's env. ``reset(seed=, options=)`` and ``step(action)`` return
    gymnasium's tuples. ``close()`` closes the remote env (as agentlace did;
    ``close_remote=False`` leaves it open for other clients) and the
    connection.

    Each call has ``timeout`` seconds (``timeout_ms=`` in ms, agentlace's
    spelling); a call that times out or loses its connection raises
    (EdgeMLTimeoutError, EdgeMLConnectionError) and is never re-sent, so a
    step is never taken twice (agentlace retried with ``retry_interval``;
    that argument is accepted and unused). ``wait_for_server=True`` waits
    as long as it takes for the server to come up.
    """

    def __init__(self, host: str = "localhost", port: int = 5546, retry_interval: float = 0.5,
                 timeout_ms: Optional[float] = None, *, timeout: Optional[float] = DEFAULT_TIMEOUT,
                 connect_timeout: float = 5.0, wait_for_server: bool = False, close_remote: bool = True,
                 token: Optional[str] = None, max_message_bytes: Optional[int] = None, log_level: Any = None):
        self.retry_interval = retry_interval
        self._close_remote = close_remote
        self._client: Optional[EdgeClient] = None
        self._client = EdgeClient(host, port, config=_config(port),
                                  timeout=_compat.timeout_from_ms(timeout, timeout_ms, DEFAULT_TIMEOUT),
                                  connect_timeout=connect_timeout, wait_for_server=wait_for_server, token=token,
                                  max_message_bytes=max_message_bytes, log_level=log_level)
        try:
            got = self._client.get_observation()
            self.observation_space = decode_space(got["observation_space"], "observation_space")
            self.action_space = decode_space(got["action_space"], "action_space")
            info = got.get("env_info") or {}
        except BaseException:
            self._client.close()
            raise
        self.render_mode = info.get("render_mode")
        self.metadata = {**gym.Env.metadata, **(info.get("metadata") or {})}
        self.remote_spec_id = info.get("spec_id")

    @property
    def client(self) -> EdgeClient:
        """The EdgeClient underneath (stats(), call timings)."""
        if self._client is None:
            raise errors.ClosedError("GymEnvClient is closed")
        return self._client

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None) -> Tuple[Any, dict]:
        super().reset(seed=seed)  # seeds this object's np_random, as gymnasium expects
        payload: Dict[str, Any] = {}
        if seed is not None:
            payload["seed"] = int(seed)
        if options is not None:
            payload["options"] = options
        obs, info = self.client.act("reset", payload)
        return obs, info

    def step(self, action: Any) -> Tuple[Any, Any, bool, bool, dict]:
        obs, reward, terminated, truncated, info = self.client.act("step", action)
        return obs, reward, terminated, truncated, info

    def render(self) -> Any:
        return self.client.act("render", {})

    def close(self) -> None:
        """Close the remote env (unless ``close_remote=False``) and the
        connection. Idempotent; a server already gone is not an error here."""
        c, self._client = self._client, None
        if c is None:
            return
        try:
            if self._close_remote:
                try:
                    c.act("close", {})
                except (errors.EdgeMLConnectionError, errors.EdgeMLTimeoutError) as e:
                    log.warning("GymEnvClient.close: could not close the remote env at %s:%s: %s",
                                c.host, c.port, e)
        finally:
            c.close()

    def __del__(self) -> None:
        c = getattr(self, "_client", None)
        if c is not None:
            try:
                c.close()  # the connection only; the remote env stays as it is
            except Exception:
                pass

    def __repr__(self) -> str:
        where = "closed" if self._client is None else f"{self._client.host}:{self._client.port}"
        return f"<GymEnvClient {where} {self.remote_spec_id or ''}>".replace(" >", ">")
