"""Data stores: ids, capacity, consistent snapshots, thread safety."""
import threading

import pytest

import edgeml
from edgeml.data import DataStoreBase, QueuedDataStore


def test_importable_from_root_and_data():
    assert edgeml.QueuedDataStore is QueuedDataStore
    assert edgeml.DataStoreBase is DataStoreBase


def test_ids_and_latest_data():
    s = QueuedDataStore(5)
    assert s.latest_data_id() == -1 and len(s) == 0
    assert s.get_latest_data(-1) == []
    for i in range(3):
        s.insert(i)
    assert s.latest_data_id() == 2
    assert s.get_latest_data(-1) == [0, 1, 2]
    assert s.get_latest_data(0) == [1, 2]
    assert s.get_latest_data(2) == []
    assert s.get_latest_data(7) == []
    assert s.get_data_since(1) == ([2], 2)


def test_capacity_drops_oldest_and_counts():
    s = QueuedDataStore(3)
    s.batch_insert(range(5))
    assert len(s) == 3 and s.latest_data_id() == 4 and s.dropped == 2
    assert s.get_latest_data(-1) == [2, 3, 4]  # older than held: everything held
    assert s.get_latest_data(3) == [4]
    assert s.oldest_data_id() == 2
    s.insert(5)
    assert s.dropped == 3 and s.get_latest_data(-1) == [3, 4, 5]


def test_batch_insert_same_as_inserts():
    a, b = QueuedDataStore(4), QueuedDataStore(4)
    a.batch_insert([1, 2, 3, 4, 5, 6])
    for i in [1, 2, 3, 4, 5, 6]:
        b.insert(i)
    assert a.get_latest_data(-1) == b.get_latest_data(-1) and a.dropped == b.dropped == 2


def test_sample():
    s = QueuedDataStore(10)
    with pytest.raises(IndexError):
        s.sample(1)
    s.batch_insert(range(10))
    out = s.sample(100)
    assert len(out) == 100 and set(out) <= set(range(10))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "3"])
def test_bad_capacity(bad):
    with pytest.raises(ValueError):
        QueuedDataStore(bad)


def test_base_is_abstract_and_subclassable():
    with pytest.raises(TypeError):
        DataStoreBase(3)

    class ListStore(DataStoreBase):
        def __init__(self):
            super().__init__(100)
            self.items = []

        def insert(self, d):
            self.items.append(d)

        def latest_data_id(self):
            return len(self.items) - 1

        def get_latest_data(self, from_id):
            return self.items[from_id + 1:]

        def __len__(self):
            return len(self.items)

    s = ListStore()
    s.batch_insert("abc")
    assert s.get_data_since(0) == (["b", "c"], 2)


def test_threads_insert_without_losing_ids():
    s = QueuedDataStore(100000)

    def writer(k):
        for i in range(2000):
            s.insert((k, i))

    ts = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    seen = 0
    while any(t.is_alive() for t in ts):
        items, last = s.get_data_since(seen - 1)
        assert last - len(items) + 1 == seen if items else True
        seen = last + 1
    for t in ts:
        t.join()
    assert s.latest_data_id() == 7999 and len(s) == 8000
    assert len(set(s.get_latest_data(-1))) == 8000
