"""Trainer roles for RL actor/learner loops: a GPU learner
(``TrainerServer``) answers ``train_step`` calls, receives the actors' data
stores, and broadcasts fresh weights; actors (``TrainerClient``) call it,
stream their transitions with ``update()``, and receive the weights.

Data sync: every client has a session id, the server keeps a cursor (the
last item id it stored) per session and store, and a batch sent again after
a lost reply is stored once. What a server acknowledged survives a restart
of the learner when its store does (``PersistentDataStore`` keeps items and
cursors in one transaction); when it does not (an in-memory store), the
restarted server tells each actor so and the actor sends again everything
its local store still holds. docs/data-sync.md states the guarantees.
Weights broadcasts keep the latest value only.
"""
from __future__ import annotations

import collections
import inspect
import logging
import threading
import time
import types
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Collection, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import _compat, _core, errors
from ._base import DEFAULT_TIMEOUT, ClientBase, ServerBase, _check_port, _Subscription, wrap_future
from .data.data_store import DataStoreBase
from .edge import _check_keys, _key_list

log = logging.getLogger("edgeml")

_MAX_SESSIONS = 65536          # cursors kept by a server (least recently used dropped)
_CHUNK_BYTES = 32 << 20        # update() splits its data into messages of about this size
_CHUNK_ITEMS = 4096


@dataclass
class TrainerConfig:
    """What a trainer serves. ``port_number``: requests (train_step, data,
    custom requests); ``broadcast_port``: weights stream; ``payload_keys``:
    keys a train_step payload may hold (None: any); ``request_types``: the
    custom request types of ``request()``; ``rate_limit``: most calls per
    second of ``request()`` and ``update()`` per client (None: no limit);
    ``version``: your compatibility tag. Client and server should use equal
    configs (ports may differ); other keys or types raise HandshakeError.

    ``experimental_pipeline_port`` (agentlace) is accepted and checked, and
    opens nothing: agentlace sent data there unacknowledged (a ZeroMQ
    PUSH/PULL pipeline) to avoid a round trip per update; edgeml's
    ``update()`` already pipelines its messages on the request connection
    and has every item acknowledged, so no second port is needed. It is not
    compared between client and server.

    The fields are in agentlace's order (so ``TrainerConfig(5555, 5556,
    ["stats"])`` means what it meant there); ``payload_keys``, from the
    original edgeml, comes last: pass it by keyword."""

    port_number: int = 5555
    broadcast_port: Optional[int] = 5556
    request_types: Sequence[str] = ()
    rate_limit: Optional[float] = None
    version: str = "0.0.1"
    experimental_pipeline_port: Optional[int] = None
    payload_keys: Optional[Collection[str]] = None

    def __post_init__(self) -> None:
        _check_port(self.port_number, "port_number")
        if self.broadcast_port is not None:
            _check_port(self.broadcast_port, "broadcast_port")
        p = self.experimental_pipeline_port
        if p is not None:
            try:
                ok = not isinstance(p, bool) and 0 <= int(p) <= 65535 and float(p) == int(p)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"experimental_pipeline_port must be a port number or None, got {p!r}")
        if self.payload_keys is not None:
            _key_list(self.payload_keys, "payload_keys")
        _key_list(self.request_types, "request_types")
        if self.rate_limit is not None:
            r = self.rate_limit
            if isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0:
                raise ValueError(f"rate_limit must be a positive number of calls per second or None, got {r!r}")

    def _compat(self) -> dict:
        return {"payload_keys": None if self.payload_keys is None else sorted(self.payload_keys),
                "request_types": sorted(self.request_types), "version": str(self.version)}

    def _gate(self, has_train_step: bool = True, has_request: bool = True) -> Any:
        return _core.Gate("trainer", None if self.payload_keys is None else list(self.payload_keys),
                          list(self.request_types), str(self.version), has_train_step, has_request)


def _takes_two_args(fn: Callable) -> bool:
    """True for f(a, b): a data_callback, never a train_step(payload)."""
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):
        return False
    return len(params) == 2


class TrainerServer(ServerBase):
    """The learner's side.

    ``train_step(payload) -> weights`` answers each client's ``train_step``;
    ``data_callback(store_name, payload)`` sees each batch of new items
    (``payload = {"data": [items], "last_id": int, "session": str}``) after
    they were inserted into the store registered under that name;
    ``request_callback(type, payload) -> dict`` answers ``request()``.
    Callbacks run one at a time on the serving thread; an exception goes back
    to that caller and the server goes on. ``publish_network(weights)``
    broadcasts to every subscribed client.

    agentlace's order ``TrainerServer(config, data_callback, request_callback,
    log_level)`` works too: a two-argument function in second place is taken
    as the data_callback (a train_step takes one argument), and a logging
    level in fourth place as ``log_level`` (the level of the ``edgeml``
    logger). ``data_stores`` is a read-only view of the registered stores.
    """

    _service = "trainer"

    def __init__(self, config: TrainerConfig, train_step: Optional[Callable[[Any], Any]] = None,
                 data_callback: Optional[Callable[[str, Any], Any]] = None,
                 request_callback: Optional[Callable[[str, Any], Any]] = None, log_level: Any = None, *,
                 host: str = "0.0.0.0", max_message_bytes: Optional[int] = None, token: Optional[str] = None,
                 handshake_timeout: float = 10.0, max_pending_bytes: Optional[int] = None,
                 progress_timeout: float = 30.0):
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"config must be a TrainerConfig, got {type(config).__name__}")
        if log_level is None and isinstance(request_callback, (int, str)) and not isinstance(request_callback, bool):
            # agentlace: TrainerServer(config, data_callback, request_callback, log_level)
            log_level, request_callback = request_callback, None
        _compat.apply_log_level(log_level)
        if train_step is not None and _takes_two_args(train_step):
            if data_callback is not None and request_callback is None:  # agentlace: (config, data_cb, request_cb)
                request_callback = data_callback
                data_callback = None
            if data_callback is None:
                train_step, data_callback = None, train_step
        for name, cb in (("train_step", train_step), ("data_callback", data_callback),
                         ("request_callback", request_callback)):
            if cb is not None and not callable(cb):
                raise TypeError(f"{name} must be callable or None, got {cb!r}")
        super().__init__(config.port_number, host, max_message_bytes=max_message_bytes,
                         broadcast_port=config.broadcast_port, token=token, handshake_timeout=handshake_timeout,
                         max_pending_bytes=max_pending_bytes, progress_timeout=progress_timeout)
        self.config = config
        self._train_step = train_step
        self._data_callback = data_callback
        self._request_callback = request_callback
        self._stores: Dict[str, DataStoreBase] = {}
        self._cursors: "collections.OrderedDict[Tuple[str, str], int]" = collections.OrderedDict()
        self.items_received = 0
        self.duplicates_dropped = 0
        self._instance: Optional[str] = None  # set by each start() (_hello_info)

    # -- data stores
    def register_data_store(self, name: str, store: DataStoreBase) -> None:
        """Insert the data clients send under ``name`` into ``store``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"store name must be a non-empty str, got {name!r}")
        for m in ("insert", "batch_insert"):
            if not callable(getattr(store, m, None)):
                raise TypeError(f"store must be a DataStoreBase (it has no {m}()), got {type(store).__name__}")
        self._stores = {**self._stores, name: store}
        if callable(getattr(store, "load_cursors", None)):  # a store that keeps our cursors (PersistentDataStore)
            for session, cursor in store.load_cursors(name).items():
                self._cursors[(session, name)] = int(cursor)

    def data_store(self, name: str) -> Optional[DataStoreBase]:
        """The store registered under ``name``, or None."""
        return self._stores.get(name)

    @property
    def data_stores(self) -> Mapping[str, DataStoreBase]:
        """The registered stores by name (read-only: ``register_data_store``
        adds one)."""
        return types.MappingProxyType(self._stores)

    def store_names(self) -> set:
        return set(self._stores)

    def publish_network(self, weights: Any) -> int:
        """Broadcast ``weights`` (a dict of arrays, a torch state_dict, a JAX
        pytree) to every client that called ``recv_network_callback``.
        Latest value only: a slow client gets the newest weights, never a
        backlog; one that subscribes later gets these at once. The value is
        copied, so training may go on changing it. Returns its version.

        Mappings arrive as plain dicts: a flax ``FrozenDict`` (or any
        ``Mapping``) is received as a ``dict`` of the same keys and arrays;
        ``flax.core.freeze(weights)`` gives the FrozenDict back (jax arrays
        arrive as numpy arrays; ``jax.device_put`` moves them back)."""
        return self._publish(weights)

    def _hello_info(self) -> Any:
        # called by start(): every run of a server is a new instance, so an
        # actor can tell that the cursors it was acknowledged came from a
        # process that may have lost them
        self._instance = uuid.uuid4().hex
        return {"role": "trainer", "compat": self.config._compat(), "broadcast_port": self.broadcast_port,
                "rate_limit": self.config.rate_limit, "instance": self._instance}

    # -- requests
    def _gate(self) -> Any:
        # the Trainer rules for train_step and request live in the C role
        # layer (csrc/proto/gate.c), shared with C TrainerServers; data and
        # cursor need this server's stores and are checked below
        return self.config._gate(self._train_step is not None, self._request_callback is not None)

    def _dispatch(self, method: str, payload: Any) -> Any:
        # only requests the gate let through get here
        if method == "train_step":
            return self._train_step(payload)
        if method == "data":
            return self._on_data(payload)
        if method == "cursor":
            return self._on_cursor(payload)
        rtype, body = payload  # "request", checked by the gate
        return self._request_callback(rtype, body)

    def _on_cursor(self, p: Any) -> int:
        """The id of the newest item of store ``p["store"]`` this server holds
        from session ``p["session"]`` (-1: none yet)."""
        if not isinstance(p, dict) or not isinstance(p.get("session"), str) or not isinstance(p.get("store"), str):
            raise errors.InvalidArgumentError("malformed cursor request")
        name = p["store"]
        if name not in self._stores and self._data_callback is None:
            raise errors.UnknownDataStoreError(
                f"no data store named {name!r} on this trainer; it has: "
                f"{', '.join(map(repr, sorted(self._stores))) or 'none'} (register_data_store)")
        return self._cursors.get((p["session"], name), -1)

    def _on_data(self, p: Any) -> dict:
        if not isinstance(p, dict):
            raise errors.InvalidArgumentError("malformed data message")
        session, name, first, items = p.get("session"), p.get("store"), p.get("first"), p.get("items")
        if (not isinstance(session, str) or not isinstance(name, str) or isinstance(first, bool)
                or not isinstance(first, int) or first < 0 or not isinstance(items, list)):
            raise errors.InvalidArgumentError("malformed data message")
        store = self._stores.get(name)
        if store is None and self._data_callback is None:
            raise errors.UnknownDataStoreError(
                f"no data store named {name!r} on this trainer; it has: "
                f"{', '.join(map(repr, sorted(self._stores))) or 'none'} (register_data_store)")
        key = (session, name)
        cursor = self._cursors.get(key)
        if cursor is None and store is not None and callable(getattr(store, "cursor_of", None)):
            cursor = store.cursor_of(name, session)  # evicted from memory, kept by the store
        acked_by = p.get("instance")
        if cursor is None and isinstance(acked_by, str) and acked_by != self._instance:
            # This session was acknowledged by an earlier run of the server
            # whose store did not keep our cursor (it restarted with an
            # in-memory store): what it acknowledged is gone. Ask for all of
            # it again rather than store from the middle.
            log.warning("data store %r: session %s was acknowledged by a previous run of this trainer; "
                        "asking it to send again what it still holds", name, session[:8])
            return {"restarted": True, "cursor": -1, "stored": 0, "missed": 0, "instance": self._instance}
        last = first + len(items) - 1
        skip = 0 if cursor is None else max(0, min(len(items), cursor + 1 - first))
        missed = 0 if cursor is None else max(0, first - cursor - 1)
        new = items[skip:]
        self.duplicates_dropped += skip
        if missed:
            log.warning("data store %r: session %s skipped %d items (its local store dropped them before "
                        "they were sent; increase its capacity or update more often)", name, session[:8], missed)
        synced = store is not None and callable(getattr(store, "batch_insert_synced", None))
        if synced and (new or cursor is None):
            store.batch_insert_synced(new, name, session, max(last, -1 if cursor is None else cursor))
        elif new and store is not None:
            store.batch_insert(new)
        if new or cursor is None:
            # stored: from here on a resend of these items is a duplicate
            self._cursors[key] = max(last, -1 if cursor is None else cursor)
            self.items_received += len(new)
        self._cursors.move_to_end(key)
        while len(self._cursors) > _MAX_SESSIONS:
            self._cursors.popitem(last=False)
        if new and self._data_callback is not None:
            self._data_callback(name, {"data": new, "last_id": last, "session": session})
        return {"cursor": self._cursors[key], "stored": len(new), "missed": missed, "instance": self._instance}

    def _repr_extra(self) -> str:
        b = f" broadcast_port={self.broadcast_port}" if self.broadcast_port is not None else ""
        return f"{b} stores={sorted(self._stores)} items_received={self.items_received}"


def _approx_nbytes(obj: Any, depth: int = 0) -> int:
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, (bytes, bytearray, memoryview, str)):
        return len(obj)
    if depth > 4:
        return 64
    if isinstance(obj, dict):
        return 16 + sum(_approx_nbytes(v, depth + 1) + 16 for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return 16 + sum(_approx_nbytes(v, depth + 1) for v in obj)
    nb = getattr(obj, "nbytes", None)
    return int(nb) if isinstance(nb, int) else 16


class TrainerClient(ClientBase):
    """The actor's side.

    Two spellings: ``TrainerClient(host, config, ...)`` (edgeml) and
    ``TrainerClient(name, server_ip, config, data_store=None,
    data_stores=None, ...)`` (agentlace; ``name`` is then the name of
    ``data_store`` on the server).

    ``train_step(payload)`` returns the server's weights;
    ``recv_network_callback(cb)`` calls ``cb(weights)`` for each broadcast;
    ``request(type, payload)`` runs a custom request; ``update()`` sends what
    the local data stores hold that the server has not stored, and returns
    True once the server has all of it; ``start_async_update(interval)``
    does that on a thread; ``stop()`` stops everything (after a last
    update). Every call raises a typed error on failure, never returns None.

    agentlace's ``update_datastore(name, from_id, confirm_update=False)``
    and ``get_server_last_update_id(name)`` are there, and the attributes
    ``data_store`` (the store given as ``data_store=``, else None),
    ``data_stores`` (every local store by name; also ``data_stores_map``)
    and ``client_name``. ``log_level=`` sets the level of the ``edgeml``
    logger; ``timeout_ms=`` is the call timeout in ms.
    """

    _service = "trainer"

    def __init__(self, *args: Any, config: Optional[TrainerConfig] = None, host: Optional[str] = None,
                 server_ip: Optional[str] = None, name: Optional[str] = None,
                 data_store: Optional[DataStoreBase] = None,
                 data_stores: Optional[Dict[str, DataStoreBase]] = None,
                 timeout: Optional[float] = DEFAULT_TIMEOUT, connect_timeout: float = 5.0,
                 wait_for_server: bool = False, timeout_ms: Optional[float] = None,
                 max_message_bytes: Optional[int] = None, port: Optional[int] = None,
                 log_level: Any = None, token: Optional[str] = None, port_num: Optional[int] = None,
                 clocks_synchronized: bool = False, clock_refresh: Optional[float] = 5.0):
        args = list(args)
        if len(args) >= 2 and isinstance(args[1], TrainerConfig):      # (host, config, ...)
            host, config = args[0], args[1]
            rest = args[2:]
            if rest:
                raise TypeError("TrainerClient(host, config, ...) takes the other arguments by keyword")
        elif len(args) >= 3 and isinstance(args[2], TrainerConfig):    # agentlace (name, server_ip, config, ...)
            name, host, config = args[0], args[1], args[2]
            rest = args[3:]
            opt = ["data_store", "data_stores", "log_level", "wait_for_server", "timeout_ms"]
            if len(rest) > len(opt):
                raise TypeError("too many positional arguments for TrainerClient")
            vals = dict(zip(opt, rest))
            data_store = vals.get("data_store", data_store)
            data_stores = vals.get("data_stores", data_stores)
            log_level = vals.get("log_level", log_level)
            wait_for_server = vals.get("wait_for_server", wait_for_server)
            timeout_ms = vals.get("timeout_ms", timeout_ms)
        elif args:
            if len(args) == 1 and config is not None:
                host = args[0]
            else:
                raise TypeError("TrainerClient(host, config) or TrainerClient(name, server_ip, config, ...)")
        host = host if host is not None else server_ip
        if host is None or config is None:
            raise TypeError("TrainerClient needs a host and a TrainerConfig")
        if not isinstance(config, TrainerConfig):
            raise TypeError(f"config must be a TrainerConfig, got {type(config).__name__}")
        timeout = _compat.timeout_from_ms(timeout, timeout_ms, DEFAULT_TIMEOUT)
        port = _compat.pick("port", port, "port_num", port_num)
        _compat.apply_log_level(log_level)
        stores: Dict[str, DataStoreBase] = {}
        if data_store is not None:
            stores[name or "default"] = data_store
        for k, v in (data_stores or {}).items():
            if not isinstance(k, str) or not k:
                raise ValueError(f"data store names must be non-empty str, got {k!r}")
            stores[k] = v
        for k, v in stores.items():
            if not callable(getattr(v, "get_latest_data", None)) or not callable(getattr(v, "latest_data_id", None)):
                raise TypeError(f"data store {k!r} must be a DataStoreBase, got {type(v).__name__}")
        super().__init__(host, config.port_number if port is None else port, timeout=timeout,
                         connect_timeout=(_compat.WAIT_FOREVER_S if wait_for_server else connect_timeout),
                         max_message_bytes=max_message_bytes, token=token,
                         clocks_synchronized=clocks_synchronized, clock_refresh=clock_refresh)
        self.config = config
        self.name = name
        self.data_store = data_store
        self.session = uuid.uuid4().hex
        self._connect_timeout = connect_timeout
        self._stores = stores
        self._acked: Dict[str, int] = {k: -1 for k in stores}
        # the server instance that acknowledged _acked[name] (None: none yet)
        self._acked_by: Dict[str, Optional[str]] = {k: None for k in stores}
        self.resends_after_restart = 0
        self._sync_lock = threading.Lock()
        self._rate_lock = threading.Lock()
        self._last_limited_call = 0.0
        self._subscription: Optional[_Subscription] = None
        self._update_thread: Optional[threading.Thread] = None
        self._update_stop = threading.Event()
        self._payload_keys = None if config.payload_keys is None else frozenset(config.payload_keys)
        self.items_sent = 0
        self.items_dropped_locally = 0
        info = self._server_info()
        theirs = info.get("compat") or {}
        if theirs:
            diff = config._gate().compat_diff(self._core.hello())  # the C role layer's check
            if diff:
                self.close()
                raise errors.HandshakeError(f"the TrainerServer at {host}:{self.port} has another config: {diff}")
        self._server_bport = info.get("broadcast_port")

    # -- calls
    def train_step(self, payload: Any, timeout: Optional[float] = None) -> Any:
        """Send ``payload`` to the server's ``train_step``; returns its reply
        (the new weights)."""
        if self._payload_keys is not None and isinstance(payload, dict):
            _check_keys(payload, self._payload_keys, "payload_keys")
        return self._request("train_step", payload, timeout)

    def train_step_async(self, payload: Any, timeout: Optional[float] = None) -> "Any":
        return self._submit(self.train_step, payload, timeout)

    async def atrain_step(self, payload: Any, timeout: Optional[float] = None) -> Any:
        return await wrap_future(self.train_step_async(payload, timeout))

    def _rate_check(self, wait: bool) -> None:
        limit = self.config.rate_limit
        if not limit:
            return
        with self._rate_lock:
            gap = 1.0 / limit - (time.monotonic() - self._last_limited_call)
            if gap > 0:
                if not wait:
                    raise errors.RateLimitError(
                        f"rate_limit is {limit} calls per second: wait {gap:.3f} s", gap)
                time.sleep(gap)
            self._last_limited_call = time.monotonic()

    def request(self, type: str, payload: Any = None, timeout: Optional[float] = None) -> Any:
        """Run custom request ``type`` (one of ``config.request_types``) on the
        server's ``request_callback``; returns its reply."""
        if type not in self.config.request_types:
            raise errors.UnknownRequestTypeError(
                f"{type!r} is not one of the config's request_types: "
                f"{', '.join(map(repr, self.config.request_types)) or 'none'}", self.config.request_types)
        self._rate_check(wait=False)
        return self._request("request", [type, payload], timeout)

    # -- data
    def update(self, timeout: Optional[float] = None) -> bool:
        """Send what the local data stores hold that the server has not
        stored yet. Returns True when the server has stored everything up to
        the newest item (also when there was nothing to send); raises on
        failure (nothing is lost: the next update sends it again, and the
        server drops what it already has)."""
        self._rate_check(wait=False)
        return self._update(timeout)

    def _update(self, timeout: Optional[float]) -> bool:
        complete = True
        with self._sync_lock:
            for name, store in self._stores.items():
                last_id = self._send_store(name, store, self._acked[name], timeout)
                complete = complete and self._acked[name] >= last_id
        return complete

    def _send_store(self, name: str, store: Any, from_id: int, timeout: Optional[float]) -> int:
        """Send the items of ``store`` after ``from_id`` as store ``name``, in
        acknowledged chunks; returns the id of the newest item taken (the
        caller holds ``_sync_lock``)."""
        if hasattr(store, "get_data_since"):
            items, last_id = store.get_data_since(from_id)
        else:  # a foreign store with the agentlace methods only
            items, last_id = DataStoreBase.get_data_since(store, from_id)
        if not items:
            return last_id
        first = last_id - len(items) + 1
        if first > from_id + 1:
            self.items_dropped_locally += first - from_id - 1
            log.warning("data store %r dropped %d items before they could be sent (it holds %d); "
                        "increase its capacity or update more often", name, first - from_id - 1,
                        getattr(store, "capacity", len(items)))
        # chunks of about _CHUNK_BYTES, sized from the first item (walking
        # every item costs more than a round trip for small batches)
        per_chunk = max(1, min(_CHUNK_ITEMS, _CHUNK_BYTES // max(1, _approx_nbytes(items[0]))))
        i = 0
        while i < len(items):
            n = min(per_chunk, len(items) - i)
            chunk = items[i:i + n]
            rep = self._request("data", {"session": self.session, "store": name, "first": first + i,
                                         "items": chunk, "instance": self._acked_by.get(name)}, timeout)
            if isinstance(rep, dict) and rep.get("restarted"):
                # the learner restarted and lost what it had acknowledged:
                # send everything this store still holds to the new run
                log.warning("trainer %s:%s restarted without the data it had acknowledged for store %r; "
                            "sending again the %d items this client still holds", self.host, self.port, name,
                            len(store))
                self.resends_after_restart += 1
                self._acked[name] = -1
                self._acked_by[name] = rep.get("instance")
                return self._send_store(name, store, -1, timeout)
            cursor = rep.get("cursor", -1) if isinstance(rep, dict) else -1
            if cursor < first + i + n - 1:
                raise errors.ProtocolError(f"the trainer did not acknowledge data for store {name!r}")
            self._acked[name] = max(self._acked.get(name, -1), cursor)
            self._acked_by[name] = rep.get("instance")
            self.items_sent += int(rep.get("stored", 0))
            i += n
        return last_id

    def update_datastore(self, name: str, from_id: int, confirm_update: bool = False,
                         timeout: Optional[float] = None) -> bool:
        """agentlace's explicit update: send the items of local store ``name``
        with ids after ``from_id`` (usually ``get_server_last_update_id(name)``).
        Returns True once the server acknowledged them (also when there was
        nothing to send); with ``confirm_update`` it asks the server's cursor
        afterwards and returns whether it reached the store's newest id.
        Items the server already holds are dropped there, never stored twice.
        Raises (UnknownDataStoreError for a name this client has no store
        for, RateLimitError, connection errors) where agentlace returned False."""
        if isinstance(from_id, bool) or not isinstance(from_id, (int, np.integer)):
            raise TypeError(f"from_id must be an int, got {from_id!r}")
        store = self._stores.get(name)
        if store is None:
            raise errors.UnknownDataStoreError(
                f"this TrainerClient has no data store named {name!r}; it has: "
                f"{', '.join(map(repr, sorted(self._stores))) or 'none'}")
        self._rate_check(wait=False)
        with self._sync_lock:
            last_id = self._send_store(name, store, int(from_id), timeout)
        if confirm_update:
            return self.get_server_last_update_id(name, timeout) >= last_id
        return True

    def get_server_last_update_id(self, name: str, timeout: Optional[float] = None) -> int:
        """The id of the newest item of this client's store ``name`` that the
        server holds (-1: none yet). Per client session: another actor's
        data under the same name does not count. Raises
        UnknownDataStoreError when the server has no such store (agentlace
        returned None)."""
        if not isinstance(name, str):
            raise TypeError(f"store name must be a str, got {name!r}")
        return int(self._request("cursor", {"session": self.session, "store": name}, timeout))

    @property
    def data_stores(self) -> Mapping[str, DataStoreBase]:
        """The local data stores by name (read-only)."""
        return types.MappingProxyType(self._stores)

    data_stores_map = data_stores  # agentlace's attribute name

    @property
    def client_name(self) -> Optional[str]:
        """agentlace's name for ``name``."""
        return self.name

    def start_async_update(self, interval: float = 10.0) -> None:
        """Call ``update()`` every ``interval`` seconds on a daemon thread
        (respecting ``rate_limit``); failures are logged and retried at the
        next interval, losing nothing."""
        if interval <= 0:
            raise ValueError(f"interval must be > 0, got {interval}")
        if self._update_thread is not None and self._update_thread.is_alive():
            return
        self._update_stop.clear()

        def loop() -> None:
            failing = False
            while not self._update_stop.wait(interval):
                try:
                    self._rate_check(wait=True)
                    self._update(None)
                    if failing:
                        log.info("trainer data sync to %s:%s works again", self.host, self.port)
                    failing = False
                except errors.ClosedError:
                    return
                except Exception as e:
                    if not failing:
                        log.warning("trainer data sync to %s:%s failed (retrying every %s s): %s",
                                    self.host, self.port, interval, e)
                    failing = True

        self._update_thread = threading.Thread(target=loop, daemon=True, name=f"edgeml-update-{self.port}")
        self._update_thread.start()

    def stop_async_update(self) -> None:
        t = self._update_thread
        self._update_stop.set()
        if t is not None and t is not threading.current_thread():
            t.join()
        self._update_thread = None

    # -- weights
    def recv_network_callback(self, callback: Callable[[Any], Any]) -> None:
        """Call ``callback(weights)`` with each network the server publishes,
        on a thread of the client's. Latest value only; a client registering
        after a publish gets the current weights at once. The first
        registration connects to the broadcast port (the config's, else the
        one the server announced)."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {callback!r}")
        if self._subscription is None:
            bport = self.config.broadcast_port or self._server_bport
            if not bport:
                raise errors.InvalidArgumentError(
                    f"the TrainerServer at {self.host}:{self.port} has no broadcast port")
            self._subscription = _Subscription(self.host, bport, "trainer.broadcast",
                                               connect_timeout=self._connect_timeout, what="weights",
                                               token=self._token or "")
        self._subscription.add_callback(callback)

    def latest_network(self, timeout: Optional[float] = None, after_version: int = 0) -> Any:
        """The newest weights received (after ``recv_network_callback``),
        waiting up to ``timeout`` seconds for some newer than
        ``after_version`` (a ``network_version`` seen before)."""
        if self._subscription is None:
            raise errors.InvalidArgumentError("call recv_network_callback first")
        return self._subscription.wait(after_version, timeout)

    @property
    def network_version(self) -> int:
        """How many weights broadcasts this client has received (the newest's
        number; 0: none yet). Increases across server restarts."""
        return self._subscription.version if self._subscription is not None else 0

    # -- lifecycle
    def stop(self, flush: bool = True) -> None:
        """Stop the async update (sending what is left first when
        ``flush``), the weights subscription, and close. Idempotent."""
        was_updating = self._update_thread is not None
        self.stop_async_update()
        if flush and was_updating and self._core is not None:
            try:
                self._update(None)
            except Exception as e:
                log.warning("last data sync to %s:%s failed: %s", self.host, self.port, e)
        sub, self._subscription = self._subscription, None
        if sub is not None:
            sub.close()
        super().close()

    def close(self) -> None:
        if getattr(self, "_update_stop", None) is None:  # failed in __init__
            super().close()
            return
        self.stop()

    def __repr__(self) -> str:
        stores = f" stores={sorted(self._stores)}" if getattr(self, "_stores", None) else ""
        return super().__repr__()[:-1] + stores + ">"


class TrainerSMInterface:
    """The in-process stand-in for a TrainerServer and its TrainerClient
    (agentlace's ``TrainerSMInterface``, once ``TrainerTunnel``): actor and
    learner in one process, as threads sharing one data store, keep the code
    written for the two sides and pass this object to both.

    It has the method names of both sides: the learner's
    ``publish_network``, ``register_request_callback``,
    ``register_data_store``, ``data_store``, ``store_names``, ``start``; the
    actor's ``recv_network_callback``, ``latest_network``, ``request``,
    ``train_step``, ``update``, ``update_datastore``,
    ``get_server_last_update_id``, ``start_async_update``; and ``stop``.

    Nothing is copied or sent: ``publish_network(params)`` calls every
    registered callback with ``params`` itself, on the publishing thread, and
    a callback registered later is called with the latest params at once
    (as a real subscription would be). ``update()`` has nothing to do (the
    store is shared) and returns True. ``request`` and ``train_step`` call
    the learner's callbacks on the caller's thread and raise like the real
    client does: UnknownRequestTypeError for a type outside
    ``config.request_types`` (when a config is given) and
    InvalidArgumentError when no callback is registered, where agentlace
    returned None.
    """

    def __init__(self, config: Optional[TrainerConfig] = None, train_step: Optional[Callable[[Any], Any]] = None,
                 request_callback: Optional[Callable[[str, Any], Any]] = None):
        if config is not None and not isinstance(config, TrainerConfig):
            raise TypeError(f"config must be a TrainerConfig or None, got {type(config).__name__}")
        for what, cb in (("train_step", train_step), ("request_callback", request_callback)):
            if cb is not None and not callable(cb):
                raise TypeError(f"{what} must be callable or None, got {cb!r}")
        self.config = config
        self._train_step = train_step
        self._request_callback = request_callback
        self._callbacks: list = []
        self._stores: Dict[str, DataStoreBase] = {}
        self._cv = threading.Condition()
        self._latest: Any = None
        self._version = 0
        self._stopped = False

    # -- the learner's side
    def publish_network(self, params: Any) -> int:
        """Hand ``params`` to every network callback; returns its version."""
        with self._cv:
            if self._stopped:
                raise errors.ClosedError("TrainerSMInterface is stopped; cannot publish")
            self._version += 1
            self._latest = params
            version = self._version
            callbacks = list(self._callbacks)
            self._cv.notify_all()
        for cb in callbacks:
            cb(params)
        return version

    def register_request_callback(self, callback: Callable[[str, Any], Any]) -> None:
        """The learner's ``request_callback(type, payload)``."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {callback!r}")
        self._request_callback = callback

    def register_train_step(self, callback: Callable[[Any], Any]) -> None:
        """The learner's ``train_step(payload)``."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {callback!r}")
        self._train_step = callback

    def register_data_store(self, name: str, store: DataStoreBase) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"store name must be a non-empty str, got {name!r}")
        self._stores = {**self._stores, name: store}

    def data_store(self, name: str) -> Optional[DataStoreBase]:
        return self._stores.get(name)

    @property
    def data_stores(self) -> Mapping[str, DataStoreBase]:
        return types.MappingProxyType(self._stores)

    def store_names(self) -> set:
        return set(self._stores)

    def start(self, threaded: bool = False) -> None:
        """Nothing to start (agentlace: a no-op); returns at once."""

    # -- the actor's side
    def recv_network_callback(self, callback: Callable[[Any], Any]) -> None:
        """Call ``callback(params)`` on each ``publish_network``; at once
        with the latest params when some were published already."""
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {callback!r}")
        with self._cv:
            self._callbacks.append(callback)
            have, latest = self._version > 0, self._latest
        if have:
            callback(latest)

    def latest_network(self, timeout: Optional[float] = None, after_version: int = 0) -> Any:
        """The latest params published after ``after_version``, waiting up to
        ``timeout`` seconds (EdgeMLTimeoutError if none)."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._version > after_version or self._stopped, timeout):
                raise errors.EdgeMLTimeoutError(f"no network published within {timeout} s")
            if self._version <= after_version:
                raise errors.ClosedError("TrainerSMInterface is stopped")
            return self._latest

    @property
    def network_version(self) -> int:
        return self._version

    def request(self, type: str, payload: Any = None, timeout: Optional[float] = None) -> Any:
        """The learner's ``request_callback(type, payload)``, called here."""
        if self.config is not None and type not in self.config.request_types:
            raise errors.UnknownRequestTypeError(
                f"{type!r} is not one of the config's request_types: "
                f"{', '.join(map(repr, self.config.request_types)) or 'none'}", self.config.request_types)
        if self._request_callback is None:
            raise errors.InvalidArgumentError(
                "this TrainerSMInterface has no request_callback (register_request_callback)")
        return self._request_callback(type, payload)

    def train_step(self, payload: Any, timeout: Optional[float] = None) -> Any:
        if self._train_step is None:
            raise errors.InvalidArgumentError("this TrainerSMInterface has no train_step (register_train_step)")
        return self._train_step(payload)

    def update(self, timeout: Optional[float] = None) -> bool:
        """Nothing to send: actor and learner share the store. True."""
        return True

    def update_datastore(self, name: str, from_id: int, confirm_update: bool = False,
                         timeout: Optional[float] = None) -> bool:
        return True

    def get_server_last_update_id(self, name: str, timeout: Optional[float] = None) -> int:
        """The newest id of the shared store ``name`` (-1 when empty or when
        no store of that name was registered here)."""
        store = self._stores.get(name)
        return -1 if store is None else int(store.latest_data_id())

    def start_async_update(self, interval: float = 10.0) -> None:
        """Nothing to do (shared store)."""

    def stop_async_update(self) -> None:
        """Nothing to do (shared store)."""

    def stop(self, *args: Any, **kwargs: Any) -> None:
        """No more publishes are delivered; ``latest_network`` waiters wake
        with ClosedError. Idempotent."""
        with self._cv:
            self._stopped = True
            self._callbacks = []
            self._cv.notify_all()

    close = stop

    def __enter__(self) -> "TrainerSMInterface":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (f"<TrainerSMInterface version={self._version} callbacks={len(self._callbacks)} "
                f"stores={sorted(self._stores)}{' stopped' if self._stopped else ''}>")


TrainerTunnel = TrainerSMInterface  # its name in edgeml before agentlace
