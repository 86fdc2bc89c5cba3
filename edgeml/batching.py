"""Dynamic batching and inference workers for ``InferenceServer``
(docs/batching.md).

The C server's loop thread decodes each request of a batched interface and
hands it here with its *pending* reply (``_core.Pending``: the request's
place on its connection; ``reply``/``error`` send the answer from any
thread). Worker threads take the requests of one interface in arrival
order, stack those whose payloads have the same form (``signature``) along
a new leading axis, run the interface's function once, split its result
and answer each caller. Triton's dynamic batcher is the model: a batch
runs as soon as ``max_batch_size`` requests are queued or the oldest has
waited ``max_delay_ms``; and also as soon as as many are queued as the
previous batch held, so that a lone client never waits for company.

Payload forms that batch:
  - an array: stacked to shape ``(B, *shape)``;
  - a dict: each array value stacked (same keys, dtypes and shapes in every
    request of the batch), each other value collected into a list of B.
Any other payload is refused with a clear error (the interface is batched).

Results that split (B = the batch's size):
  - an array (or anything with ``shape`` and indexing: torch tensors) whose
    leading axis is B: caller i gets row i;
  - a list or tuple of B values: caller i gets value i;
  - a dict: each value split as above when it is an array with leading
    axis B or a list/tuple of B values, otherwise sent to every caller.
An exception raised by the function reaches every caller of the batch.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import numpy as np

from . import errors

log = logging.getLogger("edgeml")


def signature(payload: Any) -> Optional[tuple]:
    """The form of a payload that decides which requests batch together,
    or None when the payload cannot be batched."""
    if isinstance(payload, np.ndarray):
        return ("array", payload.dtype.str, payload.shape)
    if isinstance(payload, dict):
        parts = []
        for k, v in payload.items():
            if isinstance(v, np.ndarray):
                parts.append((repr(k), "array", v.dtype.str, v.shape))
            else:
                parts.append((repr(k), "value"))
        parts.sort()
        return ("dict", tuple(parts))
    return None


def stack(payloads: List[Any], out: Optional[Callable[[tuple, np.dtype], np.ndarray]] = None) -> Any:
    """Stack payloads of one signature. ``out(shape, dtype)`` may supply the
    memory of each stacked array (a pinned buffer for a GPU worker)."""
    first = payloads[0]
    if isinstance(first, np.ndarray):
        return _stack_arrays(payloads, out)
    batched = {}
    for k, v in first.items():
        if isinstance(v, np.ndarray):
            batched[k] = _stack_arrays([p[k] for p in payloads], out)
        else:
            batched[k] = [p[k] for p in payloads]
    return batched


def _stack_arrays(arrays: List[np.ndarray], out) -> np.ndarray:
    shape = (len(arrays),) + arrays[0].shape
    if out is None:
        return np.stack(arrays)
    dst = out(shape, arrays[0].dtype)
    for i, a in enumerate(arrays):
        dst[i] = a
    return dst


def _rows(value: Any, n: int) -> Optional[list]:
    """value split into n results, or None when it is not splittable."""
    if isinstance(value, (list, tuple)):
        return list(value) if len(value) == n else None
    shape = getattr(value, "shape", None)
    if shape is not None and len(shape) >= 1 and shape[0] == n and not isinstance(value, (str, bytes)):
        return [value[i] for i in range(n)]
    return None


def split(result: Any, n: int, name: str) -> list:
    """The n callers' results of one batch."""
    rows = _rows(result, n)
    if rows is not None:
        return rows
    if isinstance(result, dict):
        per_key = {}
        for k, v in result.items():
            r = _rows(v, n)
            per_key[k] = r if r is not None else None
        return [{k: (per_key[k][i] if per_key[k] is not None else v) for k, v in result.items()}
                for i in range(n)]
    shape = getattr(result, "shape", None)
    got = f"{type(result).__name__}" + (f" of shape {tuple(shape)}" if shape is not None else "")
    raise ValueError(f"batched interface {name!r} returned {got} for a batch of {n}: return an array whose "
                     f"leading axis is {n}, a list of {n} results, or a dict of those")


@dataclass
class _Item:
    pending: Any
    payload: Any
    sig: Optional[tuple]
    t: float


@dataclass
class _Stats:
    batches: int = 0
    requests: int = 0
    max_batch: int = 0
    errors: int = 0
    queue_s: float = 0.0  # total time requests waited before their batch ran
    run_s: float = 0.0    # total time the function ran


class Batcher:
    """One batched interface's queue."""

    def __init__(self, name: str, fn: Callable[[Any], Any], max_batch_size: int, max_delay_s: float):
        self.name = name
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.queue: Deque[_Item] = collections.deque()
        self.stats = _Stats()
        self.last_batch = 1  # size of the previous batch

    def ready_at(self) -> float:
        """When the head of the queue may run: now if a full batch waits,
        or as many requests as the previous batch held (the load of the
        moment: a lone client never waits for others that do not come),
        else once the oldest has waited max_delay."""
        if len(self.queue) >= min(self.max_batch_size, self.last_batch):
            return 0.0
        return self.queue[0].t + self.max_delay_s

    def take(self) -> List[_Item]:
        """The next batch: the oldest request and the queued ones of its
        signature, in order, up to max_batch_size."""
        batch = self._take()
        self.last_batch = len(batch)
        return batch

    def _take(self) -> List[_Item]:
        head = self.queue.popleft()
        batch = [head]
        if head.sig is None or self.max_batch_size == 1:
            return batch
        keep: Deque[_Item] = collections.deque()
        while self.queue and len(batch) < self.max_batch_size:
            it = self.queue.popleft()
            (batch if it.sig == head.sig else keep).append(it)
        keep.extend(self.queue)
        self.queue = keep
        return batch


class WorkerPool:
    """``workers`` threads serving every batched (and, with more than one
    worker, every plain) interface of one server."""

    def __init__(self, workers: int, label: str, stage: Optional[Callable] = None):
        self.workers = workers
        self.label = label
        self.stage = stage  # device hook: (batcher, items) -> payload for fn and a finisher, or None
        self.batchers: Dict[str, Batcher] = {}
        self._cv = threading.Condition()
        self._threads: List[threading.Thread] = []
        self._state = "created"
        self._busy = 0

    # -- the loop thread
    def submit(self, batcher: Batcher, pending: Any, payload: Any) -> None:
        """Queue a request (called on the server's loop thread)."""
        sig = signature(payload) if batcher.max_batch_size > 1 else ("one",)
        if sig is None:
            pending.error(errors.InvalidArgumentError(
                f"interface {batcher.name!r} is batched (max_batch_size={batcher.max_batch_size}): its payload "
                f"must be an array or a dict (of arrays and values), not {type(payload).__name__}"))
            return
        with self._cv:
            if self._state != "running":
                pending.error(errors.ClosedError(f"the server is stopping; interface {batcher.name!r} "
                                                 f"takes no more requests"))
                return
            batcher.queue.append(_Item(pending, payload, sig, time.monotonic()))
            self._cv.notify()

    # -- lifecycle
    def start(self) -> None:
        with self._cv:
            if self._state == "running":
                return
            self._state = "running"
        self._threads = [threading.Thread(target=self._run, daemon=True, name=f"edgeml-worker-{self.label}-{i}")
                         for i in range(self.workers)]
        for t in self._threads:
            t.start()

    def stop(self, timeout: Optional[float] = None) -> None:
        """Answer what is queued (the batches still run), then end the
        workers. New requests are refused with ClosedError meanwhile."""
        with self._cv:
            if self._state != "running":
                return
            self._state = "draining"
            self._cv.notify_all()
        me = threading.current_thread()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            if t is not me:
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        with self._cv:
            self._state = "stopped"
            left = [it for b in self.batchers.values() for it in b.queue]
            for b in self.batchers.values():
                b.queue.clear()
        for it in left:  # only when the join timed out
            it.pending.error(errors.ClosedError("the server stopped before this request ran"))

    def remove(self, name: str) -> None:
        """Forget a batched interface; its queued requests are refused."""
        with self._cv:
            b = self.batchers.pop(name, None)
            left = list(b.queue) if b is not None else []
            if b is not None:
                b.queue.clear()
        for it in left:
            it.pending.error(errors.UnknownInterfaceError(
                f"interface {name!r} was unregistered while this request waited for a batch", []))

    @property
    def queued(self) -> int:
        with self._cv:
            return sum(len(b.queue) for b in self.batchers.values())

    # -- the workers
    def _next(self) -> Optional[Tuple[Batcher, List[_Item]]]:
        with self._cv:
            while True:
                now = time.monotonic()
                best, best_at = None, None
                for b in self.batchers.values():
                    if b.queue:
                        at = b.ready_at() if self._state == "running" else 0.0
                        if best_at is None or at < best_at:
                            best, best_at = b, at
                if best is not None and best_at <= now:
                    self._busy += 1
                    return best, best.take()
                if best is None and self._state != "running":
                    return None
                self._cv.wait(None if best_at is None else best_at - now)

    def _run(self) -> None:
        while True:
            got = self._next()
            if got is None:
                return
            try:
                self._run_batch(*got)
            except BaseException:  # never lose a worker: _run_batch answers every caller itself
                log.exception("edgeml: batch of interface %r failed", got[0].name)
            finally:
                with self._cv:
                    self._busy -= 1

    def _run_batch(self, b: Batcher, items: List[_Item]) -> None:
        t0 = time.monotonic()
        live = [it for it in items if it.pending.alive]  # callers gone: skip their work
        n = len(live)
        st = b.stats
        st.queue_s += sum(t0 - it.t for it in live)
        if n == 0:
            for it in items:
                it.pending.drop()
            return
        for it in items:
            if it not in live:
                it.pending.drop()
        try:
            if b.max_batch_size == 1:  # a plain interface on the workers: one request, as it came
                results = [b.fn(live[0].payload)]
            else:
                finish = None
                if self.stage is not None:
                    payload, finish = self.stage(b, [it.payload for it in live])
                else:
                    payload = stack([it.payload for it in live])
                result = b.fn(payload)
                if finish is not None:
                    result = finish(result)
                results = split(result, n, b.name)
        except BaseException as e:  # the function's error reaches every caller of the batch
            st.errors += 1
            for it in live:
                it.pending.error(e)
            if not isinstance(e, Exception):
                raise
            return
        finally:
            t1 = time.monotonic()
            st.run_s += t1 - t0
            st.batches += 1
            st.requests += n
            st.max_batch = max(st.max_batch, n)
        for it, r in zip(live, results):
            it.pending.reply(r)

    def stats(self) -> dict:
        with self._cv:
            out = {}
            for name, b in self.batchers.items():
                s = b.stats
                out[name] = {"max_batch_size": b.max_batch_size, "max_delay_ms": b.max_delay_s * 1e3,
                             "batches": s.batches, "requests": s.requests, "errors": s.errors,
                             "mean_batch": (s.requests / s.batches) if s.batches else 0.0,
                             "max_batch": s.max_batch, "queued": len(b.queue),
                             "mean_queue_ms": (s.queue_s / s.requests * 1e3) if s.requests else 0.0,
                             "mean_run_ms": (s.run_s / s.batches * 1e3) if s.batches else 0.0}
            return out
