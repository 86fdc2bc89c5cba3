"""Inference roles: a GPU (or any) machine serves named functions,
``InferenceServer``; weak devices call them, ``InferenceClient``."""
from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Dict, List, Optional

from . import _compat, _core, _device, errors
from ._base import DEFAULT_TIMEOUT, ClientBase, ServerBase, wrap_future
from .batching import Batcher, WorkerPool
from .timing import CallTiming

_LIST = "__interfaces__"


class InferenceServer(ServerBase):
    """Serves functions registered with ``register_interface(name, fn)``;
    ``fn(payload) -> dict`` runs on the serving thread, one call at a time,
    or, with ``workers=N`` (> 1), on N worker threads. Batched interfaces
    (``register_interface(name, fn, max_batch_size=B, max_delay_ms=D)``)
    run on the workers once per batch of requests; ``device`` ("cpu",
    "cuda", "cuda:N" or "auto": CUDA when there is a usable device, else
    CPU) is where batches run (docs/batching.md).

    >>> server = InferenceServer(6379)
    >>> server.register_interface("predict", lambda p: {"y": p["x"] * 2})
    >>> server.start(threaded=True)
    """

    _service = "inference"

    def __init__(self, port_num: int = 6379, host: str = "0.0.0.0", *,
                 max_message_bytes: Optional[int] = None, token: Optional[str] = None,
                 handshake_timeout: float = 10.0, log_level: Any = None,
                 max_pending_bytes: Optional[int] = None, progress_timeout: float = 30.0,
                 device: str = "cpu", workers: int = 1):
        _compat.apply_log_level(log_level)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        self._device = _device.resolve(device)  # DeviceError when a GPU asked for cannot be used
        super().__init__(port_num, host, max_message_bytes=max_message_bytes, token=token,
                         handshake_timeout=handshake_timeout, max_pending_bytes=max_pending_bytes,
                         progress_timeout=progress_timeout)
        self._interfaces: Dict[str, Callable[[Any], Any]] = {}  # every interface, for listing
        self._plain: Dict[str, Callable[[Any], Any]] = {}  # run on the loop thread (the C server's routes)
        self._deferred: Dict[str, Callable[[Any, Any], None]] = {}  # queued for the workers
        self._workers = workers
        self._pool = WorkerPool(workers, f"{port_num}", stage=self._device.stage)

    @property
    def device(self) -> str:
        """Where batches run: "cpu" or "cuda:N"."""
        return self._device.name

    @property
    def workers(self) -> int:
        return self._workers

    def register_interface(self, name: str, fn: Callable[[Any], Any], max_batch_size: Optional[int] = None,
                           max_delay_ms: Optional[float] = None) -> None:
        """Serve ``fn`` under ``name`` (also while running; replaces an
        existing one of that name).

        With ``max_batch_size=B`` (> 1) the interface is batched (docs/
        batching.md): requests from any number of clients are stacked along
        a new leading axis (an array payload, or each array of a dict
        payload; other dict values become lists), ``fn`` runs once per batch
        of up to B requests on a worker thread, and its result is split
        back, one row (or list element) per caller. A batch runs when B
        requests are queued or the oldest has waited ``max_delay_ms``
        (default 0: whatever is queued when a worker is free). Without it,
        ``fn`` runs on the serving thread one call at a time, or on the
        workers when the server has more than one."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"interface name must be a non-empty str, got {name!r}")
        if name.startswith("__"):
            raise ValueError(f"interface names starting with '__' are reserved: {name!r}")
        if not callable(fn):
            raise TypeError(f"interface {name!r}: {fn!r} is not callable")
        if max_batch_size is not None and (isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int)
                                           or max_batch_size < 1):
            raise ValueError(f"interface {name!r}: max_batch_size must be an int >= 1, got {max_batch_size!r}")
        if max_delay_ms is not None:
            if max_batch_size is None:
                raise ValueError(f"interface {name!r}: max_delay_ms needs max_batch_size (it bounds how long a "
                                 f"request waits for a batch to fill)")
            if isinstance(max_delay_ms, bool) or not isinstance(max_delay_ms, (int, float)) or \
                    not 0 <= max_delay_ms < float("inf"):
                raise ValueError(f"interface {name!r}: max_delay_ms must be a number >= 0, got {max_delay_ms!r}")
        batched = max_batch_size is not None and max_batch_size > 1
        self._drop(name)
        if batched or self._workers > 1:
            b = Batcher(name, fn, max_batch_size if batched else 1, float(max_delay_ms or 0) / 1e3)
            self._pool.batchers[name] = b
            submit = self._pool.submit
            self._deferred[name] = lambda pending, payload, _b=b: submit(_b, pending, payload)
            if self._state == "running":
                self._pool.start()
        else:
            self._plain[name] = fn  # in place: the C server looks names up in this dict
        self._interfaces[name] = fn

    def _drop(self, name: str) -> None:
        self._interfaces.pop(name, None)
        self._plain.pop(name, None)
        if self._deferred.pop(name, None) is not None:
            self._pool.remove(name)

    def unregister_interface(self, name: str) -> None:
        """Stop serving ``name``; requests of it still queued for a batch
        get UnknownInterfaceError."""
        self._drop(name)

    def _routes(self) -> Optional[dict]:
        return self._plain

    def _deferred_routes(self) -> Optional[dict]:
        return self._deferred

    def _recv_pool(self) -> Any:
        # a GPU server receives requests into its device's pinned pool
        return getattr(self._device, "_cuda", None)

    def _on_start(self) -> None:
        if self._deferred:
            self._pool.start()

    def _on_stop(self, timeout: Optional[float]) -> None:
        self._pool.stop(timeout)  # queued batches run and are answered first

    def stats(self) -> dict:
        """The server's counters, plus ``device``, ``workers`` and per
        batched interface ``batching`` (batches, requests, mean and largest
        batch, queued now, mean queue and run time)."""
        st = super().stats()
        if st:
            st["device"] = self._device.describe()
            st["workers"] = self._workers
            st["batching"] = self._pool.stats()
        return st

    @property
    def interfaces(self) -> List[str]:
        return sorted(self._interfaces)

    def _dispatch(self, method: str, payload: Any) -> Any:
        fn = self._plain.get(method)
        if fn is not None:
            return fn(payload)
        if method == _LIST:
            return sorted(self._interfaces)
        names = sorted(self._interfaces)
        raise errors.UnknownInterfaceError(
            f"no interface {method!r} on this server; it has: {', '.join(map(repr, names)) or 'none'}", names)

    def _repr_extra(self) -> str:
        return f" interfaces={self.interfaces} device={self._device.describe()!r} workers={self._workers}"


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
        # the hot path: _request inlined; core.call checks that name is a str
        core = self._core
        if core is None:
            raise errors.ClosedError(f"client for {self.host}:{self.port} is closed")
        ok, value = core.call(name, payload, self._timeout_s if timeout is None else self._timeout(timeout))
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
