"""Data stores: where an actor keeps what it will send to a trainer, and
where a trainer keeps what it received (``TrainerClient.update()`` moves the
difference)."""
from .data_store import DataStoreBase, QueuedDataStore
from .persistent import PersistentDataStore

__all__ = ["DataStoreBase", "QueuedDataStore", "PersistentDataStore"]
