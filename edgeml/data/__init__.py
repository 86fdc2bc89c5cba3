"""Data stores: where an actor keeps what it will send to a trainer, and
where a trainer keeps what it received (``TrainerClient.update()`` moves the
difference)."""
from .data_store import DataStoreBase, QueuedDataStore

__all__ = ["DataStoreBase", "QueuedDataStore"]
