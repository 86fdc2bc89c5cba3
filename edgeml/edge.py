"""Edge device as server: a robot or camera board serves observations and
takes actions (``EdgeServer``); a remote machine reads the observations and
sends actions (``EdgeClient``). With a ``broadcast_port`` the device also
streams observations to every subscriber, latest value only.

agentlace names are accepted too: ``ActionConfig``, ``ActionServer``,
``ActionClient`` (with ``obs``, ``act``, ``publish_obs``,
``register_obs_callback``).
"""
from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import Any, Callable, Collection, FrozenSet, Iterable, List, Optional

from . import _compat, _core, errors
from ._base import DEFAULT_TIMEOUT, ClientBase, ServerBase, _check_port, _Subscription, wrap_future


def _key_list(value: Any, what: str) -> List[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise TypeError(f"{what} must be a list of str, got {value!r}")
    keys = list(value)
    for k in keys:
        if not isinstance(k, str):
            raise TypeError(f"{what} must hold str keys, got {k!r}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{what} has duplicates: {keys!r}")
    return keys


@dataclass
class EdgeConfig:
    """What an edge server serves. Client and server should use equal
    configs (ports may differ, e.g. behind port forwarding); a client whose
    keys differ from the server's is refused with a HandshakeError.

    ``port_number``: requests (observations, actions); ``broadcast_port``:
    observation stream (None: no stream); ``version``: your own
    compatibility tag, compared like the keys."""

    port_number: int
    action_keys: Collection[str]
    observation_keys: Collection[str]
    broadcast_port: Optional[int] = None
    version: str = "0.0.1"

    def __post_init__(self) -> None:
        _check_port(self.port_number, "port_number")
        if self.broadcast_port is not None:
            _check_port(self.broadcast_port, "broadcast_port")
        # validated, never rewritten: the caller's object stays as given
        _key_list(self.action_keys, "action_keys")
        _key_list(self.observation_keys, "observation_keys")

    def _compat(self) -> dict:
        return {"action_keys": sorted(self.action_keys), "observation_keys": sorted(self.observation_keys),
                "version": str(self.version)}

    def _gate(self) -> Any:
        return _core.Gate("edge", list(self.action_keys), list(self.observation_keys), str(self.version))


ActionConfig = EdgeConfig

_NO_PAYLOAD = object()


def _check_keys(keys: Iterable[str], allowed: FrozenSet[str], what: str) -> List[str]:
    out = []
    for k in keys:
        if k not in allowed:
            raise errors.InvalidKeyError(
                f"{k!r} is not one of the config's {what}: {', '.join(map(repr, sorted(allowed))) or 'none'}")
        out.append(k)
    return out


class EdgeServer(ServerBase):
    """Serves an edge device's observations and takes its actions.

    ``observation_callback(keys) -> dict`` answers ``get_observation`` (keys:
    the requested observation keys, a list); ``action_callback(key, action)
    -> dict`` answers ``send_action``. Either may be None (requests for it
    then fail with a clear error at the caller). Callbacks run one at a time
    on the serving thread; an exception is sent to that caller and the
    server goes on. ``publish_observation(obs)`` streams to subscribers when
    the config has a ``broadcast_port``.
    """

    _service = "edge"

    def __init__(self, config: EdgeConfig, observation_callback: Optional[Callable[[List[str]], Any]] = None,
                 action_callback: Optional[Callable[[str, Any], Any]] = None, log_level: Any = None, *,
                 host: str = "0.0.0.0", max_message_bytes: Optional[int] = None, token: Optional[str] = None,
                 obs_callback: Optional[Callable[[List[str]], Any]] = None,
                 act_callback: Optional[Callable[[str, Any], Any]] = None,
                 handshake_timeout: float = 10.0, max_pending_bytes: Optional[int] = None,
                 progress_timeout: float = 30.0):
        if not isinstance(config, EdgeConfig):
            raise TypeError(f"config must be an EdgeConfig, got {type(config).__name__}")
        # agentlace's keyword names
        observation_callback = _compat.pick("observation_callback", observation_callback, "obs_callback",
                                            obs_callback)
        action_callback = _compat.pick("action_callback", action_callback, "act_callback", act_callback)
        _compat.apply_log_level(log_level)
        for name, cb in (("observation_callback", observation_callback), ("action_callback", action_callback)):
            if cb is not None and not callable(cb):
                raise TypeError(f"{name} must be callable or None, got {cb!r}")
        super().__init__(config.port_number, host, max_message_bytes=max_message_bytes,
                         broadcast_port=config.broadcast_port, token=token, handshake_timeout=handshake_timeout,
                         max_pending_bytes=max_pending_bytes, progress_timeout=progress_timeout)
        self.config = config
        self._obs_list = list(config.observation_keys)
        self._observation_callback = observation_callback
        self._action_callback = action_callback

    def _hello_info(self) -> Any:
        return {"role": "edge", "compat": self.config._compat(), "broadcast_port": self.broadcast_port}

    def _gate(self) -> Any:
        # the Edge rules live in the C role layer (csrc/proto/gate.c), shared
        # with C EdgeServers: callbacks present, keys within the config,
        # payload shapes, methods; a refused request never reaches Python
        return _core.Gate("edge", list(self.config.action_keys), list(self.config.observation_keys),
                          str(self.config.version), self._observation_callback is not None,
                          self._action_callback is not None)

    def _dispatch(self, method: str, payload: Any) -> Any:
        # only requests the gate let through get here
        if method == "obs":
            return self._observation_callback(self._obs_list if payload is None else list(payload))
        key, action = payload
        return self._action_callback(key, action)

    def publish_observation(self, observation: Any) -> int:
        """Send ``observation`` to every subscriber (``EdgeClient.
        register_observation_callback``). Latest value only: a subscriber
        slower than the stream gets the newest observation, never a backlog,
        and one that subscribes later gets the current one at once. The
        value is copied, so it may be changed after this returns. Returns the
        observation's version (1, 2, ...; 0 if kept until ``start()``).
        Raises InvalidArgumentError without a ``broadcast_port``."""
        return self._publish(observation)

    publish_obs = publish_observation

    def _repr_extra(self) -> str:
        b = f" broadcast_port={self.broadcast_port}" if self.broadcast_port is not None else ""
        return f" observation_keys={self._obs_list}{b}"


ActionServer = EdgeServer


class EdgeClient(ClientBase):
    """Reads observations from and sends actions to an ``EdgeServer``.

    ``EdgeClient(host, port, task_id=None, config=None)``; the port may come
    from ``config.port_number`` instead. Without a config the client learns
    the keys from the server's handshake; with one, keys that differ from
    the server's raise HandshakeError. Calls raise typed errors (timeouts,
    connection, the server callback's exception as RemoteError), never
    return None for a lost message.

    agentlace spellings: ``server_ip=`` (host), ``port_num=`` (port),
    ``timeout_ms=`` (the call timeout in ms), ``wait_for_server=True`` (wait
    as long as it takes for the server to come up), ``log_level=``.
    """

    _service = "edge"

    def __init__(self, host: Optional[str] = None, port: Optional[int] = None, task_id: Optional[str] = None,
                 config: Optional[EdgeConfig] = None, *, timeout: Optional[float] = DEFAULT_TIMEOUT,
                 connect_timeout: float = 5.0, max_message_bytes: Optional[int] = None,
                 wait_for_server: bool = False, token: Optional[str] = None, server_ip: Optional[str] = None,
                 port_num: Optional[int] = None, timeout_ms: Optional[float] = None, log_level: Any = None,
                 clocks_synchronized: bool = False, clock_refresh: Optional[float] = 5.0):
        host = _compat.pick("host", host, "server_ip", server_ip, "localhost")
        port = _compat.pick("port", port, "port_num", port_num)
        timeout = _compat.timeout_from_ms(timeout, timeout_ms, DEFAULT_TIMEOUT)
        _compat.apply_log_level(log_level)
        if isinstance(port, EdgeConfig) and config is None:  # EdgeClient(host, config)
            port, config = None, port
        if config is not None and not isinstance(config, EdgeConfig):
            raise TypeError(f"config must be an EdgeConfig, got {type(config).__name__}")
        if port is None:
            if config is None:
                raise ValueError("EdgeClient needs a port or a config with port_number")
            port = config.port_number
        super().__init__(host, port, timeout=timeout,
                         connect_timeout=(_compat.WAIT_FOREVER_S if wait_for_server else connect_timeout),
                         max_message_bytes=max_message_bytes, token=token,
                         clocks_synchronized=clocks_synchronized, clock_refresh=clock_refresh)
        self.task_id = task_id
        self.config = config
        self._connect_timeout = connect_timeout
        self._subscription: Optional[_Subscription] = None
        info = self._server_info()
        theirs = info.get("compat") or {}
        if config is not None and theirs:
            diff = config._gate().compat_diff(self._core.hello())  # the C role layer's check
            if diff:
                self.close()
                raise errors.HandshakeError(f"the EdgeServer at {host}:{port} has another config: {diff}")
        src = config._compat() if config is not None else theirs
        self._obs_keys = frozenset(src.get("observation_keys") or ())
        self._act_keys_list = list(config.action_keys) if config is not None else list(src.get("action_keys") or ())
        self._act_keys = frozenset(self._act_keys_list)
        self._server_bport = info.get("broadcast_port")

    @property
    def observation_keys(self) -> List[str]:
        return sorted(self._obs_keys)

    @property
    def action_keys(self) -> List[str]:
        return list(self._act_keys_list)

    def get_observation(self, keys: Optional[Iterable[str]] = None, timeout: Optional[float] = None) -> Any:
        """The observation for ``keys`` (None: every observation key), as
        returned by the server's ``observation_callback``."""
        if keys is not None:
            if isinstance(keys, str):
                keys = [keys]
            keys = _check_keys(keys, self._obs_keys, "observation_keys")
        return self._request("obs", keys, timeout)

    obs = get_observation

    def get_observation_async(self, keys: Optional[Iterable[str]] = None,
                              timeout: Optional[float] = None) -> concurrent.futures.Future:
        return self._submit(self.get_observation, keys, timeout)

    def send_action(self, action: Any, key: Optional[str] = None, timeout: Optional[float] = None) -> Any:
        """Send ``action`` under ``key`` (None: the config's only action key)
        and return the server's ``action_callback`` reply."""
        if key is None:
            if len(self._act_keys_list) != 1:
                raise errors.InvalidKeyError(
                    f"send_action needs a key: the config has {len(self._act_keys_list)} action keys "
                    f"({', '.join(map(repr, self._act_keys_list)) or 'none'})")
            key = self._act_keys_list[0]
        _check_keys([key], self._act_keys, "action_keys")
        return self._request("act", [key, action], timeout)

    def act(self, key: str, payload: Any = _NO_PAYLOAD, timeout: Optional[float] = None) -> Any:
        """agentlace spelling of ``send_action(payload, key)``; without a
        payload it sends ``{}``, as agentlace did."""
        return self.send_action({} if payload is _NO_PAYLOAD else payload, key, timeout)

    async def asend_action(self, action: Any, key: Optional[str] = None, timeout: Optional[float] = None) -> Any:
        return await wrap_future(self._submit(self.send_action, action, key, timeout))

    async def aget_observation(self, keys: Optional[Iterable[str]] = None, timeout: Optional[float] = None) -> Any:
        return await wrap_future(self.get_observation_async(keys, timeout))

    def register_observation_callback(self, callback: Callable[[Any], Any]) -> None:
        """Call ``callback(observation)`` with each observation the server
        publishes, on a thread of the client's. A callback slower than the
        stream skips to the newest observation. The first registration
        connects to the broadcast port (the config's, else the one the
        server announced); an exception in the callback is logged."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {callback!r}")
        if self._subscription is None:
            bport = self.config.broadcast_port if self.config is not None and self.config.broadcast_port else None
            bport = bport or self._server_bport
            if not bport:
                raise errors.InvalidArgumentError(
                    f"the EdgeServer at {self.host}:{self.port} has no broadcast port "
                    "(set broadcast_port in its config)")
            self._subscription = _Subscription(self.host, bport, "edge.broadcast",
                                               connect_timeout=self._connect_timeout, what="observations",
                                               token=self._token or "")
        self._subscription.add_callback(callback)

    register_obs_callback = register_observation_callback

    def latest_observation(self, timeout: Optional[float] = None, after_version: int = 0) -> Any:
        """The newest streamed observation (after ``register_observation_
        callback``), waiting up to ``timeout`` for one."""
        if self._subscription is None:
            raise errors.InvalidArgumentError("register_observation_callback first")
        return self._subscription.wait(after_version, timeout)

    def close(self) -> None:
        sub, self._subscription = getattr(self, "_subscription", None), None
        if sub is not None:
            sub.close()
        super().close()

    stop = close

    def __repr__(self) -> str:
        t = f" task_id={self.task_id!r}" if self.task_id else ""
        return super().__repr__()[:-1] + t + ">"


class ActionClient(EdgeClient):
    """agentlace's ``ActionClient(server_ip, config, wait_for_server=False)``:
    an ``EdgeClient`` whose port is ``config.port_number`` (``timeout_ms=``
    and the other EdgeClient keywords work too)."""

    def __init__(self, server_ip: str, config: EdgeConfig, wait_for_server: bool = False, **kw: Any):
        super().__init__(server_ip, None, config=config, wait_for_server=wait_for_server, **kw)
