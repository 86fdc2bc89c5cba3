"""Inference roles: a GPU (or any) machine serves named functions,
``InferenceServer``; weak devices call them, ``InferenceClient``."""
from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Dict, List, Optional

from . import _compat, _core, errors
from ._base import DEFAULT_TIMEOUT, ClientBase, ServerBase, wrap_future
from .timing import CallTiming

_LIST = "__interfaces__"


class InferenceServer(ServerBase):
    """Serves functions registered with ``register_interface(name, fn)``;
    ``fn(payload) -> dict`` runs on the serving thread, one call at a time.

    >>> server = InferenceServer(6379)
    >>> server.register_interface("predict", lambda p: {"y": p["x"] * 2})
    >>> server.start(threaded=True)
    """

    _service = "inference"

    def __init__(self, port_num: int = 6379, host: str = "0.0.0.0", *,
                 max_message_bytes: Optional[int] = None, token: Optional[str] = None,
                 handshake_timeout: float = 10.0, log_level: Any = None,
                 max_pending_bytes: Optional[int] = None, progress_timeout: float = 30.0):
        _compat.apply_log_level(log_level)
        super().__init__(port_num, host, max_message_bytes=max_message_bytes, token=token,
                         handshake_timeout=handshake_timeout, max_pending_bytes=max_pending_bytes,
                         progress_timeout=progress_timeout)
        self._interfaces: Dict[str, Callable[[Any], Any]] = {}

    def register_interface(self, name: str, fn: Callable[[Any], Any]) -> None:
        """Serve ``fn`` under ``name`` (also while running; replaces an
        existing one of that name)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"interface name must be a non-empty str, got {name!r}")
        if name.startswith("__"):
            raise ValueError(f"interface names starting with '__' are reserved: {name!r}")
        if not callable(fn):
            raise TypeError(f"interface {name!r}: {fn!r} is not callable")
        self._interfaces[name] = fn  # in place: the C server looks names up in this dict

    def unregister_interface(self, name: str) -> None:
        self._interfaces.pop(name, None)

    def _routes(self) -> Optional[dict]:
        return self._interfaces

    @property
    def interfaces(self) -> List[str]:
        return sorted(self._interfaces)

    def _dispatch(self, method: str, payload: Any) -> Any:
        fn = self._interfaces.get(method)
        if fn is not None:
            return fn(payload)
        if method == _LIST:
            return sorted(self._interfaces)
        names = sorted(self._interfaces)
        raise errors.UnknownInterfaceError(
            f"no interface {method!r} on this server; it has: {', '.join(map(repr, names)) or 'none'}", names)

    def _repr_extra(self) -> str:
        return f" interfaces={self.interfaces}"


class InferenceClient(ClientBase):
    """Calls an ``InferenceServer``.

    ``timeout`` (seconds, None = wait forever) bounds every call; a server
    that is down raises ``EdgeMLConnectionError`` naming host:port, a handler
    that raises gives ``RemoteError``. One client may be shared by threads.

    agentlace spellings: ``InferenceClient(server_ip=..., port_num=...)``,
    ``timeout_ms=`` (ms), ``wait_for_server=True`` (wait as long as it takes
    for the server to come up), ``log_level=``.
    """

    _service = "inference"

    def __init__(self, host: Optional[str] = None, port: Optional[int] = None, *,
                 timeout: Optional[float] = DEFAULT_TIMEOUT, connect_timeout: float = 5.0,
                 max_message_bytes: Optional[int] = None, clocks_synchronized: bool = False,
                 clock_refresh: Optional[float] = 5.0, token: Optional[str] = None,
                 server_ip: Optional[str] = None, port_num: Optional[int] = None,
                 timeout_ms: Optional[float] = None, wait_for_server: bool = False, log_level: Any = None):
        host = _compat.pick("host", host, "server_ip", server_ip, "localhost")
        port = _compat.pick("port", port, "port_num", port_num, 6379)
        timeout = _compat.timeout_from_ms(timeout, timeout_ms, DEFAULT_TIMEOUT)
        _compat.apply_log_level(log_level)
        if wait_for_server:
            connect_timeout = _compat.WAIT_FOREVER_S
        super().__init__(host, port, timeout=timeout, connect_timeout=connect_timeout,
                         max_message_bytes=max_message_bytes, clocks_synchronized=clocks_synchronized,
                         clock_refresh=clock_refresh, token=token)

    def call(self, name: str, payload: Any = None, timeout: Optional[float] = None) -> Any:
        """Call interface ``name`` with ``payload``; returns the handler's reply."""
        if type(name) is not str and not isinstance(name, str):
            raise TypeError(f"interface name must be a str, got {type(name).__name__}")
        core = self._core  # the hot path: _request inlined
        if core is None:
            raise errors.ClosedError(f"client for {self.host}:{self.port} is closed")
        ok, value = core.call(name, payload, self._timeout(timeout) if timeout is not None else self._timeout_s)
        if ok:
            return value
        raise errors.from_error_reply(value)

    def call_timed(self, name: str, payload: Any = None,
                   timeout: Optional[float] = None) -> "tuple[Any, CallTiming]":
        """Like ``call``, also returning where the call's time went: a
        ``CallTiming`` (stages in ms, bytes each way, see ``edgeml.timing``)."""
        if not isinstance(name, str):
            raise TypeError(f"interface name must be a str, got {type(name).__name__}")
        core = self._core
        if core is None:
            raise errors.ClosedError(f"client for {self.host}:{self.port} is closed")
        ok, value, t = core.call(name, payload, self._timeout(timeout), _core.MSG_REQUEST, True)
        if ok:
            return value, CallTiming._from_core(t)
        raise errors.from_error_reply(value)

    def call_async(self, name: str, payload: Any = None,
                   timeout: Optional[float] = None) -> concurrent.futures.Future:
        """Like ``call``, returning a ``concurrent.futures.Future`` at once."""
        return self._submit(self.call, name, payload, timeout)

    async def acall(self, name: str, payload: Any = None, timeout: Optional[float] = None) -> Any:
        """``await client.acall(name, payload)`` from asyncio code."""
        return await wrap_future(self.call_async(name, payload, timeout))

    def interfaces(self, timeout: Optional[float] = None) -> List[str]:
        """Names of the interfaces the server serves."""
        return self._request(_LIST, None, timeout)
