"""Data stores with sequence ids, the unit ``TrainerClient.update()`` syncs.

Every item inserted into a store gets the next integer id (0, 1, 2, ...).
A client remembers the last id the server acknowledged and sends what came
after it; the server keeps its own cursor per client session and store, so
a batch sent twice (a reply lost after the server stored it) is stored once.

Subclass ``DataStoreBase`` for your own storage (a replay buffer, a file):
implement ``insert``, ``latest_data_id``, ``get_latest_data`` and
``__len__``; override ``batch_insert`` when a batch can be stored faster
than item by item. The agentlace API (same method names) is accepted as is.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, Iterable, List, Optional, Tuple


class DataStoreBase(ABC):
    """A store of items with increasing integer ids; thread-safe in the
    implementations edgeml ships."""

    def __init__(self, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity

    @abstractmethod
    def insert(self, data: Any) -> None:
        """Add one item; it gets id ``latest_data_id() + 1``."""

    def batch_insert(self, batch_data: Iterable[Any]) -> None:
        """Add items in order (override for a faster bulk insert)."""
        for d in batch_data:
            self.insert(d)

    @abstractmethod
    def latest_data_id(self) -> int:
        """The id of the newest item; -1 when nothing was ever inserted."""

    @abstractmethod
    def get_latest_data(self, from_id: int) -> List[Any]:
        """The items with ids greater than ``from_id`` that the store still
        holds, oldest first (all of them when ``from_id`` is older than the
        oldest held)."""

    @abstractmethod
    def __len__(self) -> int:
        """How many items the store holds now."""

    def get_data_since(self, from_id: int) -> Tuple[List[Any], int]:
        """``(items, last_id)``: the items after ``from_id`` and the id of the
        last of them, taken consistently (no insert in between). The default
        retries until ``latest_data_id`` is the same before and after."""
        for _ in range(100):
            before = self.latest_data_id()
            items = self.get_latest_data(from_id)
            if self.latest_data_id() == before:
                return list(items), before
        raise RuntimeError(f"{type(self).__name__}: inserts too frequent to take a consistent snapshot")


class QueuedDataStore(DataStoreBase):
    """The newest ``capacity`` items, in insertion order (a bounded FIFO).
    When full, inserting drops the oldest item; ``dropped`` counts them.

    >>> store = QueuedDataStore(capacity=1000)
    >>> store.insert({"obs": obs, "action": 1, "reward": 1.0})
    """

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._items: deque = deque(maxlen=capacity)
        self._latest = -1
        self._lock = threading.Lock()
        self.dropped = 0

    def insert(self, data: Any) -> None:
        with self._lock:
            if len(self._items) == self.capacity:
                self.dropped += 1
            self._items.append(data)
            self._latest += 1

    def batch_insert(self, batch_data: Iterable[Any]) -> None:
        batch = list(batch_data)
        with self._lock:
            self.dropped += max(0, len(self._items) + len(batch) - self.capacity)
            self._items.extend(batch)
            self._latest += len(batch)

    def latest_data_id(self) -> int:
        with self._lock:
            return self._latest

    def _since(self, from_id: int) -> List[Any]:
        n_new = self._latest - from_id
        if n_new <= 0:
            return []
        if n_new >= len(self._items):
            return list(self._items)
        # deque slicing: the last n_new items
        return [self._items[i] for i in range(len(self._items) - n_new, len(self._items))]

    def get_latest_data(self, from_id: int) -> List[Any]:
        with self._lock:
            return self._since(from_id)

    def get_data_since(self, from_id: int) -> Tuple[List[Any], int]:
        with self._lock:
            return self._since(from_id), self._latest

    def oldest_data_id(self) -> Optional[int]:
        """The id of the oldest item held, or None when empty."""
        with self._lock:
            return self._latest - len(self._items) + 1 if self._items else None

    def sample(self, batch_size: int, rng: Any = None) -> List[Any]:
        """``batch_size`` items drawn uniformly with replacement (for a
        learner that trains on what it received)."""
        import random
        r = rng if rng is not None else random
        with self._lock:
            if not self._items:
                raise IndexError("sample from an empty QueuedDataStore")
            n = len(self._items)
            return [self._items[r.randrange(n)] for _ in range(batch_size)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    # agentlace's attribute names (its tests read them): read-only here
    @property
    def latest_seq_id(self) -> int:
        return self.latest_data_id()

    @property
    def _data_queue(self) -> Tuple[Any, ...]:
        """A snapshot of the items held, oldest first."""
        with self._lock:
            return tuple(self._items)

    def __repr__(self) -> str:
        return f"<QueuedDataStore {len(self)}/{self.capacity} latest_id={self.latest_data_id()}>"
