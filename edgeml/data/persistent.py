"""A data store that survives a restart of the process that holds it: the
learner side of ``TrainerClient.update()`` when what it acknowledged must
not die with it.

Items live in an SQLite database (one file plus its write-ahead log; any
``sqlite3`` tool can read it). Each item is stored as one edgeml frame
(``edgeml.encode_frame``, the documented wire format of docs/protocol.md:
msgpack with numpy arrays out of band, no pickle), so what comes back is
what was inserted, arrays with their dtypes and shapes.

The trainer's per-session cursors (the last item id it stored from each
actor session) are written in the same transaction as the items, so after a
crash or kill the database holds each batch with its cursor or neither:
an actor that resends a batch whose acknowledgement it never got has it
dropped as a duplicate, and nothing acknowledged is lost.

Schema (version 1)::

    items(id INTEGER PRIMARY KEY, frame BLOB NOT NULL)      -- ids 0, 1, 2, ...
    cursors(store TEXT, session TEXT, cursor INTEGER NOT NULL,
            PRIMARY KEY (store, session))
    meta(key TEXT PRIMARY KEY, value)                       -- schema_version, next_id
"""
from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any, Dict, Iterable, List, Optional, Tuple

from .._codec import decode_frame, encode_frame
from .data_store import DataStoreBase

_SCHEMA_VERSION = 1


class PersistentDataStore(DataStoreBase):
    """The newest ``capacity`` items (None: all of them) in an SQLite file
    at ``path``, kept across restarts. Opening an existing file continues
    it: ids go on from where it stopped and the trainer's cursors are back.

    ``durable=True`` (the default) makes every insert reach the disk before
    it returns (``synchronous=FULL``): an acknowledgement then survives a
    power cut too. ``durable=False`` survives a killed or crashed process,
    not a power cut, and is faster.

    Thread-safe; one process at a time may have the file open for writing
    (SQLite's lock: a second one waits up to ``timeout`` seconds, then gets
    ``sqlite3.OperationalError``).

    >>> store = PersistentDataStore("replay.db", capacity=1_000_000)
    >>> server.register_data_store("transitions", store)
    """

    def __init__(self, path: "str | os.PathLike", capacity: Optional[int] = None, *, durable: bool = True,
                 timeout: float = 5.0):
        super().__init__(capacity if capacity is not None else (1 << 62))
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value)")
            self._db.execute("CREATE TABLE IF NOT EXISTS items(id INTEGER PRIMARY KEY, frame BLOB NOT NULL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS cursors(store TEXT NOT NULL, session TEXT NOT NULL, "
                             "cursor INTEGER NOT NULL, PRIMARY KEY (store, session))")
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (_SCHEMA_VERSION,))
            elif int(row[0]) != _SCHEMA_VERSION:
                raise ValueError(f"{self.path}: data store schema version {row[0]}, this edgeml reads "
                                 f"{_SCHEMA_VERSION}")
            row = self._db.execute("SELECT value FROM meta WHERE key='next_id'").fetchone()
            self._next = int(row[0]) if row is not None else 0
            self._count = self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            self._db.execute("COMMIT")
        except BaseException:
            self._db.close()
            raise
        self.dropped = 0

    # -- writing
    def _insert_locked(self, batch: List[Any]) -> None:
        frames = [(self._next + i, encode_frame(item)) for i, item in enumerate(batch)]
        self._db.executemany("INSERT INTO items(id, frame) VALUES (?, ?)", frames)
        self._next += len(batch)
        self._count += len(batch)
        over = self._count - self.capacity
        if over > 0:
            self._db.execute("DELETE FROM items WHERE id < ?", (self._next - self.capacity,))
            self._count -= over
            self.dropped += over
        self._db.execute("INSERT OR REPLACE INTO meta VALUES ('next_id', ?)", (self._next,))

    def batch_insert(self, batch_data: Iterable[Any]) -> None:
        batch = list(batch_data)
        if not batch:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._insert_locked(batch)
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def insert(self, data: Any) -> None:
        self.batch_insert([data])

    def _rollback(self) -> None:
        self._db.execute("ROLLBACK")
        # what is in memory follows the database again
        row = self._db.execute("SELECT value FROM meta WHERE key='next_id'").fetchone()
        self._next = int(row[0]) if row is not None else 0
        self._count = self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    # -- the trainer's cursors (TrainerServer calls these)
    def batch_insert_synced(self, batch: List[Any], store: str, session: str, cursor: int) -> None:
        """Insert ``batch`` and set the trainer's cursor for (store, session)
        in one transaction: after a crash both are there or neither."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if batch:
                    self._insert_locked(list(batch))
                self._db.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?, ?)", (store, session, int(cursor)))
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise

    def load_cursors(self, store: str) -> Dict[str, int]:
        """The cursors kept for store name ``store``: session -> last id."""
        with self._lock:
            return dict(self._db.execute("SELECT session, cursor FROM cursors WHERE store=?", (store,)))

    def cursor_of(self, store: str, session: str) -> Optional[int]:
        with self._lock:
            row = self._db.execute("SELECT cursor FROM cursors WHERE store=? AND session=?",
                                   (store, session)).fetchone()
            return None if row is None else int(row[0])

    # -- reading
    def latest_data_id(self) -> int:
        with self._lock:
            return self._next - 1

    def oldest_data_id(self) -> Optional[int]:
        with self._lock:
            return self._next - self._count if self._count else None

    def get_latest_data(self, from_id: int) -> List[Any]:
        return self.get_data_since(from_id)[0]

    def get_data_since(self, from_id: int) -> Tuple[List[Any], int]:
        with self._lock:
            rows = self._db.execute("SELECT frame FROM items WHERE id > ? ORDER BY id", (int(from_id),)).fetchall()
            last = self._next - 1
        return [decode_frame(r[0])["payload"] for r in rows], last

    def __getitem__(self, i: int) -> Any:
        """The item with id ``i`` (KeyError if the store does not hold it)."""
        with self._lock:
            row = self._db.execute("SELECT frame FROM items WHERE id=?", (int(i),)).fetchone()
        if row is None:
            raise KeyError(i)
        return decode_frame(row[0])["payload"]

    def __len__(self) -> int:
        with self._lock:
            return self._count

    def close(self) -> None:
        """Close the database (later calls raise sqlite3.ProgrammingError)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> "PersistentDataStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<PersistentDataStore {self.path!r} items={len(self)} latest_id={self.latest_data_id()}>"
