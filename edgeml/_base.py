"""What every edgeml server and client shares: lifecycle (start/stop,
threads, context manager, repr) and calls with timeouts and typed errors.
The role classes (InferenceServer, ...) add their own API on top."""
from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import threading
import traceback
import weakref
from typing import Any, Callable, Optional

from . import _codec  # noqa: F401  (installs the codec hooks)
from . import _core, errors, timing

log = logging.getLogger("edgeml")

_LEVELS = {10: logging.DEBUG, 20: logging.INFO, 30: logging.WARNING, 40: logging.ERROR}

DEFAULT_TIMEOUT = 30.0


def _format_error(exc: BaseException) -> dict:
    """The ERROR reply's map for an exception raised by a handler."""
    info = {
        "type": errors.wire_name(exc),
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }
    if isinstance(exc, errors.UnknownInterfaceError):
        info["interfaces"] = list(exc.interfaces)
    if isinstance(exc, errors.UnknownRequestTypeError):
        info["request_types"] = list(exc.request_types)
    return info


def resolve_token(token: Optional[str]) -> Optional[str]:
    """The token to use: ``token``, else $EDGEML_TOKEN; "" means none."""
    if token is None:
        token = os.environ.get("EDGEML_TOKEN")
    if token is None or token == "":
        return None
    if not isinstance(token, str):
        raise TypeError(f"token must be a str, got {type(token).__name__}")
    if "\0" in token:
        raise ValueError("token must not contain NUL characters")
    return token


def _log_from_core(level: int, msg: str) -> None:
    log.log(_LEVELS.get(level, logging.INFO), msg)


_running_servers: "weakref.WeakSet[ServerBase]" = weakref.WeakSet()


def servers() -> list:
    """The servers running in this process (also those no variable refers to
    any more, e.g. after a notebook cell that starts one was run again),
    oldest port first."""
    return sorted((s for s in list(_running_servers) if s.running), key=lambda s: (s.port, id(s)))


def stop_servers(port: Optional[int] = None) -> list:
    """Stop this process's running servers, or only the one serving
    ``port`` (its main or broadcast port); returns those stopped."""
    stopped = []
    for s in servers():
        if port is None or port in s._bound_ports():
            s.stop()
            stopped.append(s)
    return stopped


_live_subscriptions: "weakref.WeakSet[_Subscription]" = weakref.WeakSet()


@atexit.register
def _stop_running_servers() -> None:
    """Servers still running on daemon threads are stopped cleanly at exit,
    so their clients see a closed connection, not a hung one; subscription
    threads are stopped before the interpreter goes away under them."""
    for sub in list(_live_subscriptions):
        try:
            sub.close(timeout=1.0)
        except Exception:  # pragma: no cover - best effort at exit
            pass
    for s in list(_running_servers):
        try:
            s.stop(timeout=2.0)
        except Exception:  # pragma: no cover - best effort at exit
            pass


def _after_fork_in_child() -> None:
    """In a child process (fork, multiprocessing): the servers' loop threads
    and the subscription threads are the parent's and do not exist here.
    Drop this process's copies of their sockets (so the parent's ports and
    connections are not held open by the child) and mark them stopped;
    clients open a connection of their own at their next call."""
    for s in list(_running_servers):
        for core in (s._core, s._bcast):
            if core is not None:
                try:
                    core.forget_after_fork()
                except Exception:  # pragma: no cover - best effort
                    pass
        s._core = s._bcast = None
        s._thread = s._bcast_thread = None
        s._lock = threading.Lock()
        s._bcast_lock = threading.Lock()
        s._state = "stopped"
    _running_servers.clear()
    for sub in list(_live_subscriptions):
        sub._forked()
    timing.keeper.after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_NOTHING = object()


def _check_timeout(t: Any, what: str = "timeout") -> float:
    """Seconds as the core takes them: None (and math.inf) mean no limit
    (-1.0 and inf); NaN and negatives are refused."""
    if t is None:
        return -1.0
    try:
        v = float(t)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number of seconds or None, got {t!r}") from None
    if v != v or v < 0:
        raise ValueError(f"{what} must be >= 0 seconds (or None / math.inf for no limit), got {t!r}")
    return v


def _join_timeout(t: Optional[float]) -> Optional[float]:
    """A timeout for threading's waits, which take None but not inf."""
    return None if t is None or _check_timeout(t) == float("inf") else float(t)


def _check_port(port: Any, what: str = "port") -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"{what} must be an int in 0..65535, got {port!r}")
    return port


class ServerBase:
    """A server: bound by ``start()``, served on the calling thread or on a
    thread of its own (``threaded=True``), stopped by ``stop()`` from any
    thread. Handlers run one at a time on the serving thread.

    With a ``broadcast_port`` it also broadcasts (``_publish``): a second
    listener, served by its own thread that never takes the GIL to send, so
    a busy handler or a learner training in Python never delays a
    broadcast."""

    _service = "edgeml"

    def __init__(self, port: int, host: str = "0.0.0.0", *, max_message_bytes: Optional[int] = None,
                 broadcast_port: Optional[int] = None, token: Optional[str] = None,
                 handshake_timeout: float = 10.0, max_pending_bytes: Optional[int] = None,
                 progress_timeout: float = 30.0):
        _check_port(port)
        for name, v in (("handshake_timeout", handshake_timeout), ("progress_timeout", progress_timeout)):
            if not _check_timeout(v, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {v!r}")
        self._progress_timeout = float(progress_timeout)
        if max_pending_bytes is not None and (isinstance(max_pending_bytes, bool) or
                                              not isinstance(max_pending_bytes, int) or max_pending_bytes <= 0):
            raise ValueError(f"max_pending_bytes must be a positive int or None, got {max_pending_bytes!r}")
        self._max_pending_bytes = int(max_pending_bytes or 0)
        self._token = resolve_token(token)
        self._handshake_timeout = float(handshake_timeout)
        if broadcast_port is not None:
            _check_port(broadcast_port, "broadcast_port")
            if broadcast_port == port and port != 0:
                raise ValueError(f"broadcast_port must differ from the port ({port})")
        self._host = host
        self._requested_port = port
        self._requested_bport = broadcast_port
        self._max_message_bytes = int(max_message_bytes or 0)
        self._core: Optional[_core.Server] = None
        self._thread: Optional[threading.Thread] = None
        self._bcast: Optional[_core.Server] = None
        self._bcast_thread: Optional[threading.Thread] = None
        self._bcast_lock = threading.Lock()  # held while publishing and while closing the broadcaster
        self._pending_publish: Any = _NOTHING
        self._lock = threading.Lock()
        self._state = "created"
        self._error: Optional[BaseException] = None

    # -- subclasses provide these
    def _routes(self) -> Optional[dict]:
        """A dict method -> fn(payload) the C server looks up (live, so it
        must be changed in place) before calling ``_dispatch``; None for none."""
        return None

    def _deferred_routes(self) -> Optional[dict]:
        """A dict method -> fn(pending, payload) the C server looks up (live)
        before the routes: fn queues the request and its ``_core.Pending``
        is answered later, from any thread (batching workers). None: none."""
        return None

    def _recv_pool(self) -> Any:
        """A _core.Cuda whose pinned pool receives the requests, or None."""
        return None

    def _on_start(self) -> None:
        """Called once the server is bound, before it serves."""

    def _on_stop(self, timeout: Optional[float]) -> None:
        """Called when the server stops, before its loop ends (workers
        answer what they hold), and again after (idempotent)."""

    def _gate(self) -> Any:
        """The role's request rules in C (a _core.Gate: csrc/proto/gate.c),
        checked before a request is decoded, or None."""
        return None

    def _dispatch(self, method: str, payload: Any) -> Any:  # pragma: no cover
        raise NotImplementedError

    def _hello_info(self) -> Any:
        return None

    # -- lifecycle
    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0), once started."""
        c = self._core
        if c is not None and c.port is not None:
            return c.port
        return getattr(self, "_bound_port", self._requested_port)

    @property
    def host(self) -> str:
        return self._host

    @property
    def broadcast_port(self) -> Optional[int]:
        """The bound broadcast port (None without one)."""
        b = self._bcast
        if b is not None and b.port is not None:
            return b.port
        return getattr(self, "_bound_bport", self._requested_bport)

    @property
    def running(self) -> bool:
        return self._state == "running"

    def start(self, threaded: bool = False, replace: bool = False) -> None:
        """Bind the port and serve. ``threaded=False`` blocks until ``stop()``
        (from another thread or a handler) or Ctrl-C; ``threaded=True``
        returns at once, serving on a daemon thread. Binding errors (port in
        use) are raised here in both cases; when the port is held by another
        server of this process (a notebook cell run twice), the error names
        it. ``replace=True`` stops that server first and takes its port."""
        with self._lock:
            if self._state in ("running", "starting"):
                raise RuntimeError(f"{type(self).__name__} is already running on port {self.port}")
            ports = [p for p in (self._requested_port, self._requested_bport) if p]
            if replace:
                for other in servers():
                    if other is not self and ports and set(ports) & set(other._bound_ports()):
                        log.info("replacing %r", other)
                        other.stop()
            bcast = None
            if self._requested_bport is not None:
                bcast = self._bind(self._requested_bport, lambda: _core.Server(
                    self._host, self._requested_bport, self._service + ".broadcast", None, _format_error,
                    _log_from_core, b"", self._max_message_bytes, None, self._token, self._handshake_timeout))
                self._bound_bport = bcast.port
            try:
                info = self._hello_info()
                hello = b""
                if info is not None:
                    hello = _hello_bytes(info)
                self._core = self._bind(self._requested_port, lambda: _core.Server(
                    self._host, self._requested_port, self._service, self._dispatch, _format_error,
                    _log_from_core, hello, self._max_message_bytes, self._routes(), self._token,
                    self._handshake_timeout, self._max_pending_bytes, self._progress_timeout, self._gate(),
                    self._deferred_routes(), self._recv_pool()))
            except BaseException:
                if bcast is not None:
                    bcast.close()
                raise
            self._bound_port = self._core.port
            if bcast is not None:
                with self._bcast_lock:
                    self._bcast = bcast
                    pending, self._pending_publish = self._pending_publish, _NOTHING
                    if pending is not _NOTHING:
                        bcast.publish(pending)
                t = threading.Thread(target=bcast.run, args=(False,), daemon=True,
                                     name=f"edgeml-{type(self).__name__}-broadcast-{bcast.port}")
                self._bcast_thread = t
                t.start()
            self._state = "running"
            _running_servers.add(self)
            try:
                self._on_start()
            except BaseException:
                self._state = "running"  # stop() below frees the ports
                self.stop()
                raise
        if threaded:
            t = threading.Thread(target=self._serve, args=(False,), daemon=True,
                                 name=f"edgeml-{type(self).__name__}-{self.port}")
            self._thread = t
            t.start()
        else:
            self._serve(threading.current_thread() is threading.main_thread())

    def _bind(self, port: int, make: Callable[[], Any]) -> Any:
        """make() the core server; a port held by a server of this process
        is reported with that server's name and how to stop it."""
        try:
            return make()
        except errors.AddressInUseError as e:
            holder = next((o for o in servers() if o is not self and port in o._bound_ports()), None)
            if holder is None:
                raise
            raise errors.AddressInUseError(
                f"{e}: it is held by {holder!r} in this process. Stop it first "
                f"(edgeml.stop_servers(port={port}), or its .stop()), or start this one with "
                f"start(..., replace=True)") from None

    def _bound_ports(self) -> list:
        return [p for p in (getattr(self, "_bound_port", None), getattr(self, "_bound_bport", None)) if p]

    def _serve(self, check_signals: bool) -> None:
        core = self._core
        try:
            core.run(check_signals)
        except BaseException as e:  # Ctrl-C in a blocking start(): stop cleanly, then re-raise
            self._error = e
            raise
        finally:
            self._on_stop(None)
            self._stop_broadcaster(None)
            with self._lock:
                self._state = "stopped"
                _running_servers.discard(self)
                if self._core is core:
                    core.close()

    def _stop_broadcaster(self, timeout: Optional[float]) -> None:
        """Stop the broadcast listener and free its port (idempotent)."""
        with self._bcast_lock:
            b, self._bcast = self._bcast, None
            t, self._bcast_thread = self._bcast_thread, None
            if b is None:
                return
            finished = b.stop(_check_timeout(timeout))
            if t is not None and t is not threading.current_thread():
                t.join(_join_timeout(timeout))
            if finished and (t is None or not t.is_alive()):
                b.close()

    def _publish(self, value: Any) -> int:
        """Make ``value`` the broadcast value; returns its version (0 when
        kept until ``start()``)."""
        with self._bcast_lock:
            b = self._bcast
            if b is None:
                if self._requested_bport is None:
                    raise errors.InvalidArgumentError(
                        f"{type(self).__name__} has no broadcast port: set broadcast_port in its config")
                if self._state == "created":
                    self._pending_publish = value  # sent when start() binds the broadcast port
                    return 0
                raise errors.ClosedError(f"{type(self).__name__} is stopped; cannot publish")
            return b.publish(value)

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stop serving: no new connections, replies already computed are
        sent, the port is free when this returns. Safe from any thread
        (including a handler, where it returns at once and the server stops
        after the handler) and safe to call more than once."""
        core = self._core
        if core is None or self._state != "running":
            return
        self._on_stop(timeout)
        finished = core.stop(_check_timeout(timeout))
        if core.on_loop_thread():
            return  # from a handler: the serving thread stops the rest after it
        self._stop_broadcaster(timeout)
        t = self._thread
        if t is not None and t is not threading.current_thread() and finished:
            t.join(_join_timeout(timeout))

    def __enter__(self):
        if self._state != "running":
            self.start(threaded=True)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self) -> dict:
        """Counters: connections open and total, requests, errors sent; with
        a broadcast port also ``broadcast`` (subscribers, publishes, sends)."""
        c = self._core
        if c is None or self._state != "running":
            return {}
        st = c.stats()
        for k in ("subscribers", "publishes", "publish_sends"):
            st.pop(k, None)
        b = self._bcast
        if b is not None:
            try:
                bs = b.stats()
                st["broadcast"] = {"subscribers": bs["subscribers"], "publishes": bs["publishes"],
                                   "sends": bs["publish_sends"]}
            except Exception:  # closed meanwhile
                pass
        return st

    def _repr_extra(self) -> str:
        return ""

    def __repr__(self) -> str:
        s = f"<{type(self).__name__} {self._host}:{self.port} {self._state}"
        st = self.stats()
        if st:
            s += f" connections={st['connections_open']} requests={st['requests']} errors={st['errors_sent']}"
        return s + self._repr_extra() + ">"


def _hello_bytes(info: Any) -> bytes:
    """msgpack bytes of a value (the body of a frame, without arrays)."""
    frame = _core.encode_frame(info)
    body_len = int.from_bytes(frame[16:20], "little")
    return frame[64:64 + body_len]


def _decode_hello(body: bytes) -> Any:
    """The value of a msgpack body (a server's handshake), decoded and checked
    like any frame's."""
    padded = body + b"\0" * (-len(body) % 8)
    hdr = bytearray(64)
    hdr[0:4] = b"EDGM"
    hdr[4] = _core.PROTOCOL_VERSION
    hdr[5] = _core.MSG_REPLY
    hdr[16:20] = len(body).to_bytes(4, "little")
    hdr[24:32] = (64 + len(padded)).to_bytes(8, "little")
    return _core.decode_frame(bytes(hdr) + padded)["payload"]


class _Subscription:
    """Receives a server's broadcasts on a daemon thread and calls the
    callbacks with each value, newest first: a callback slower than the
    publisher skips to the newest value, it never works through a backlog.
    A lost connection is re-dialled with backoff (logged once per outage);
    an exception in a callback is logged and the subscription goes on."""

    def __init__(self, host: str, port: int, service: str, *, connect_timeout: float = 5.0,
                 max_message_bytes: Optional[int] = None, what: str = "broadcast", token: Optional[str] = None):
        self.host, self.port, self.what = host, port, what
        self._sub = _core.Subscriber(host, port, service, float(connect_timeout), int(max_message_bytes or 0),
                                     token)
        self._callbacks: list = []
        self._seen: list = []  # per callback: the last version it was given
        self._deliver = threading.Lock()  # callbacks get values in order, each once
        self._cv = threading.Condition()
        self._closed = False
        self.latest: Any = None
        self.version = 0          # values received so far (the latest's number)
        self.server_version = 0   # the server's number for it (restarts at 1 with the server)
        self.received = 0
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"edgeml-subscribe-{port}")
        self._thread.start()
        _live_subscriptions.add(self)

    def add_callback(self, cb: Callable[[Any], Any]) -> None:
        """Call ``cb`` with every value from now on; if a value has already
        arrived, ``cb`` gets the current one at once (on this thread)."""
        if not callable(cb):
            raise TypeError(f"{cb!r} is not callable")
        with self._deliver:
            self._callbacks = self._callbacks + [cb]
            self._seen = self._seen + [0]
            self._deliver_pending()

    def _deliver_pending(self) -> None:
        """Give each callback the latest value if it has not had it (held:
        self._deliver). A callback that joins late gets the current value,
        none gets a value twice or an older one after a newer."""
        with self._cv:
            value, version = self.latest, self.version
        if version == 0:
            return
        for i, cb in enumerate(self._callbacks):
            if self._seen[i] >= version:
                continue
            self._seen[i] = version
            try:
                cb(value)
            except Exception:
                log.exception("%s callback %r raised; the subscription goes on", self.what, cb)

    @property
    def connected(self) -> bool:
        return self._sub.connected

    def _run(self) -> None:
        sub, lost = self._sub, False
        while not self._closed:
            try:
                r = sub.next(1.0)
            except errors.ClosedError:
                break
            except errors.EdgeMLError as e:
                if self._closed:
                    break
                if not lost:
                    log.warning("%s from %s:%s: %s; reconnecting", self.what, self.host, self.port, e)
                    lost = True
                continue
            if r is None:
                continue
            if lost:
                log.info("%s from %s:%s: connected again", self.what, self.host, self.port)
                lost = False
            server_version, value, _ts = r
            with self._cv:
                self.latest, self.server_version = value, server_version
                self.received += 1
                self.version = self.received  # local and increasing, also across server restarts
                self._cv.notify_all()
            with self._deliver:
                self._deliver_pending()

    def wait(self, after_version: int = 0, timeout: Optional[float] = None) -> Any:
        """The newest value with a version above ``after_version``, waiting up
        to ``timeout`` seconds for one (EdgeMLTimeoutError if none)."""
        with self._cv:
            if not self._cv.wait_for(lambda: self.version > after_version or self._closed,
                                     _join_timeout(timeout)):
                raise errors.EdgeMLTimeoutError(
                    f"no {self.what} from {self.host}:{self.port} within {timeout} s")
            if self.version <= after_version:
                raise errors.ClosedError(f"{self.what} subscription to {self.host}:{self.port} is closed")
            return self.latest

    def _forked(self) -> None:
        """In a fork child: this subscription's thread is gone; close it
        (the core only closes this process's copy of the socket)."""
        self._cv = threading.Condition()
        self._deliver = threading.Lock()
        self._closed = True
        try:
            self._sub.close()
        except Exception:  # pragma: no cover
            pass

    def close(self, timeout: float = 5.0) -> None:
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        self._sub.shutdown()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._sub.close()


class ClientBase:
    """A connection to one server; thread-safe (calls are multiplexed on one
    connection). Broken connections are re-dialled at the next call."""

    _service: Optional[str] = None

    def __init__(self, host: str, port: int, *, timeout: Optional[float] = DEFAULT_TIMEOUT,
                 connect_timeout: float = 5.0, max_message_bytes: Optional[int] = None,
                 clocks_synchronized: bool = False, clock_refresh: Optional[float] = 5.0,
                 token: Optional[str] = None):
        self._core = None
        self._executor = None
        if not isinstance(port, int) or not 0 < port <= 65535:
            raise ValueError(f"port must be an int in 1..65535, got {port!r}")
        if clock_refresh is not None and not float(clock_refresh) > 0:
            raise ValueError(f"clock_refresh must be > 0 seconds or None, got {clock_refresh!r}")
        self.host = host
        self.port = port
        self.timeout = timeout
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._exec_lock = threading.Lock()
        self._clock_refresh = None if clock_refresh is None else float(clock_refresh)
        self._next_clock_ping = 0.0
        self._token = resolve_token(token)
        self._core = _core.Client(host, port, self._service, float(connect_timeout), int(max_message_bytes or 0),
                                  self._token)
        self._core.set_synchronized(bool(clocks_synchronized))
        if self._clock_refresh is not None:
            timing.keeper.add(self)

    # ---- timing (docs/timing.md)

    @property
    def clocks_synchronized(self) -> bool:
        """True when one-way figures use offset 0 (clocks declared in sync)
        instead of the estimated offset."""
        core = self._core
        return bool(core is not None and core.stats()["synchronized"])

    @clocks_synchronized.setter
    def clocks_synchronized(self, value: bool) -> None:
        core = self._core
        if core is None:
            raise errors.ClosedError(f"client for {self.host}:{self.port} is closed")
        core.set_synchronized(bool(value))

    def stats(self) -> dict:
        """Running statistics of this client's calls since it opened (or
        ``reset_stats()``): for each stage (``rtt_ms``, ``upload_ms``,
        ``queue_ms``, ``handler_ms``, ``reply_ms``, ``download_ms``,
        ``encode_ms``, ``decode_ms``, ``bytes_up``, ``bytes_down``) its count,
        mean, p50, p90, p99, min and max, and the clock-offset estimate
        (``clock``: offset_ms, error_ms, samples, age_s, basis). Percentiles
        come from log-linear histograms, within 1.6% of the exact value."""
        core = self._core
        if core is None:
            raise errors.ClosedError(f"client for {self.host}:{self.port} is closed")
        return timing.stats_from_core(core.stats())

    def reset_stats(self) -> None:
        """Start the statistics afresh (the clock estimate is kept)."""
        core = self._core
        if core is not None:
            core.reset_stats()

    def sync_clock(self, pings: int = 8, timeout: Optional[float] = None) -> dict:
        """Send ``pings`` PINGs to refine the clock-offset estimate now;
        returns ``stats()["clock"]``."""
        if pings < 1:
            raise ValueError(f"pings must be >= 1, got {pings}")
        for _ in range(pings):
            self.ping(timeout)
        return self.stats()["clock"]

    def _refresh_clock(self, now: float) -> None:
        """Called by the clock keeper thread: one PING every clock_refresh
        seconds, so the estimate always has a small, symmetric sample."""
        core = self._core
        if core is None or self._clock_refresh is None or now < self._next_clock_ping:
            return
        self._next_clock_ping = now + self._clock_refresh
        try:
            core.call("", None, min(1.0, self._clock_refresh), _core.MSG_PING)
        except Exception:
            pass  # the next real call reports what is wrong

    @property
    def timeout(self) -> Optional[float]:
        """Default timeout of every call, in seconds (None: wait forever)."""
        return self._timeout_default

    @timeout.setter
    def timeout(self, value: Optional[float]) -> None:
        self._timeout_s = _check_timeout(value)  # as core.call takes it
        self._timeout_default = value

    def _timeout(self, timeout: Optional[float]) -> float:
        return _check_timeout(self.timeout if timeout is None else timeout)

    def _request(self, method: str, payload: Any, timeout: Optional[float] = None) -> Any:
        core = self._core
        if core is None:
            raise errors.ClosedError(f"client for {self.host}:{self.port} is closed")
        ok, value = core.call(method, payload, self._timeout(timeout) if timeout is not None else self._timeout_s)
        if ok:
            return value
        raise errors.from_error_reply(value)

    def _submit(self, fn: Callable, *args) -> concurrent.futures.Future:
        with self._exec_lock:
            if self._core is None:
                raise errors.ClosedError(f"client for {self.host}:{self.port} is closed")
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=8, thread_name_prefix=f"edgeml-{type(self).__name__}")
            return self._executor.submit(fn, *args)

    def _server_info(self) -> dict:
        """What the server said in its handshake about itself (its role's
        ``hello_info``), or {}."""
        core = self._core
        if core is None:
            raise errors.ClosedError(f"client for {self.host}:{self.port} is closed")
        try:
            hello = _decode_hello(core.hello())
        except errors.EdgeMLError:
            return {}
        info = hello.get("info") if isinstance(hello, dict) else None
        return info if isinstance(info, dict) else {}

    def ping(self, timeout: Optional[float] = None) -> float:
        """Round trip of an empty PING, in seconds."""
        import time
        core = self._core
        if core is None:
            raise errors.ClosedError(f"client for {self.host}:{self.port} is closed")
        t0 = time.perf_counter()
        core.call("", None, self._timeout(timeout), _core.MSG_PING)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Close the connection; calls still in flight fail with ClosedError.
        Idempotent."""
        with self._exec_lock:
            core, self._core = self._core, None
            ex, self._executor = self._executor, None
        timing.keeper.discard(self)
        if core is not None:
            core.shutdown()
        if ex is not None:
            ex.shutdown(wait=True)
        if core is not None:
            core.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            ex = self._executor
            if ex is not None:
                ex.shutdown(wait=False)
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._core is None else "open"
        return f"<{type(self).__name__} {self.host}:{self.port} {state}>"


def wrap_future(fut: concurrent.futures.Future) -> "asyncio.Future":
    return asyncio.wrap_future(fut)
