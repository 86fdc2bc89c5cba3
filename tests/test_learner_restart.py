"""A learner killed (SIGKILL) and restarted mid-update, five times, while an
actor streams transitions with update(): every item ends up stored exactly
once, with a PersistentDataStore (items and cursors survive in SQLite) and
with an in-memory store (the restarted learner asks the actor to send
again what it still holds). docs/data-sync.md."""
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import edgeml

from conftest import scaled, wait_until

pytestmark = pytest.mark.timeout(180)

LEARNER = textwrap.dedent("""
    import sys, threading
    import edgeml
    port, kind, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    cfg = edgeml.TrainerConfig(port_number=port, broadcast_port=None, request_types=["dump"])
    store = edgeml.PersistentDataStore(path, durable=False) if kind == "disk" else edgeml.QueuedDataStore(1 << 20)
    srv = edgeml.TrainerServer(cfg, request_callback=lambda t, p: [x["i"] for x in store.get_latest_data(-1)],
                               host="127.0.0.1")
    srv.register_data_store("replay", store)
    srv.start(threaded=True)
    print("ready", flush=True)
    threading.Event().wait()
""")


def free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def start_learner(port: int, kind: str, path: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", LEARNER, str(port), kind, path], stdout=subprocess.PIPE, text=True)
    if p.stdout.readline().strip() != "ready":
        p.kill()
        raise RuntimeError("learner did not start")
    return p


@pytest.mark.parametrize("kind", ["disk", "memory"])
def test_learner_killed_mid_update_five_times_every_item_stored_once(kind, tmp_path):
    port = free_port()
    path = str(tmp_path / "replay.db")
    learner = start_learner(port, kind, path)
    cfg = edgeml.TrainerConfig(port_number=port, broadcast_port=None, request_types=["dump"])
    local = edgeml.QueuedDataStore(1 << 20)
    actor = edgeml.TrainerClient("127.0.0.1", cfg, data_stores={"replay": local}, timeout=scaled(5),
                                 connect_timeout=scaled(10), clock_refresh=None)
    stop = threading.Event()
    updates = {"ok": 0, "failed": 0}

    def sync_loop():
        while not stop.is_set():
            try:
                actor.update()
                updates["ok"] += 1
            except edgeml.EdgeMLError:
                updates["failed"] += 1  # the learner is down: the next update sends it again
                time.sleep(0.01)

    n = 0

    def produce(count):
        nonlocal n
        for _ in range(count):
            # ~4 KiB each, so an update is several chunks and a kill lands mid-update
            local.insert({"i": n, "obs": np.full(1024, n, np.float32)})
            n += 1

    t = threading.Thread(target=sync_loop, daemon=True)
    t.start()
    try:
        for _ in range(5):
            produce(3000)
            time.sleep(0.05)  # an update is running now
            learner.send_signal(signal.SIGKILL)
            learner.wait(timeout=10)
            produce(500)  # while the learner is down
            learner = start_learner(port, kind, path)
        produce(1000)
        # let the actor catch up, then check with one more update of our own
        assert wait_until(lambda: actor._acked["replay"] == n - 1, timeout=60), (actor._acked, n)
        stop.set()
        t.join(scaled(20))
        assert actor.update() is True
        stored = actor.request("dump", None, timeout=scaled(30))
    finally:
        stop.set()
        actor.close()
        learner.kill()
        learner.wait(timeout=10)
    assert len(stored) == n, (len(stored), n)
    assert stored == list(range(n))  # each item exactly once, in order
    # (updates may or may not have failed during the kills: one that finds
    # the connection closed before writing re-dials and waits for the
    # learner to come back, within connect_timeout)
    assert updates["ok"] > 0
    if kind == "memory":
        assert 1 <= actor.resends_after_restart <= 5  # once per run that had acknowledged something
    else:
        assert actor.resends_after_restart == 0  # the disk kept what it had acknowledged
        with edgeml.PersistentDataStore(path) as db:  # and the file alone has it all
            assert [x["i"] for x in db.get_latest_data(-1)] == list(range(n))
            np.testing.assert_array_equal(db[17]["obs"], np.full(1024, 17, np.float32))


def test_persistent_store_round_trip_capacity_and_reopen(tmp_path):
    path = tmp_path / "s.db"
    with edgeml.PersistentDataStore(path, capacity=5) as s:
        assert s.latest_data_id() == -1 and len(s) == 0
        s.insert({"a": np.arange(3, dtype=np.int16), "t": (1, "x"), "b": b"\x00\x01"})
        s.batch_insert(range(1, 8))
        assert len(s) == 5 and s.latest_data_id() == 7 and s.oldest_data_id() == 3 and s.dropped == 3
        assert s.get_latest_data(4) == [5, 6, 7]
        s.batch_insert_synced([8], "replay", "sess", 8)
        assert s.load_cursors("replay") == {"sess": 8}
    with edgeml.PersistentDataStore(path, capacity=5) as s:  # reopened: ids go on, cursors are back
        assert s.latest_data_id() == 8 and len(s) == 5
        assert s.cursor_of("replay", "sess") == 8 and s.cursor_of("replay", "other") is None
        s.insert("next")
        assert s[9] == "next"
        with pytest.raises(KeyError):
            s[0]
    with edgeml.PersistentDataStore(tmp_path / "t.db") as s:
        s.insert({"a": np.arange(3, dtype=np.int16), "t": (1, "x")})
        got = s[0]
        assert got["t"] == (1, "x") and got["a"].dtype == np.int16 and got["a"].tolist() == [0, 1, 2]


def test_persistent_store_refuses_what_it_cannot_encode(tmp_path):
    with edgeml.PersistentDataStore(tmp_path / "u.db") as s:
        with pytest.raises(edgeml.EncodeError):
            s.batch_insert([1, object()])
        assert len(s) == 0 and s.latest_data_id() == -1  # the batch is all or nothing
        s.insert(2)
        assert s.get_latest_data(-1) == [2]


def test_restarted_trainer_in_process_with_persistent_store_keeps_cursors(tmp_path):
    """A TrainerServer restarted on the same PersistentDataStore file knows
    each actor's cursor: a batch resent after a lost acknowledgement is a
    duplicate, not a second copy."""
    path = tmp_path / "r.db"
    cfg = edgeml.TrainerConfig(port_number=0, broadcast_port=None)
    s1 = edgeml.TrainerServer(cfg, host="127.0.0.1")
    st1 = edgeml.PersistentDataStore(path)
    s1.register_data_store("replay", st1)
    s1.start(threaded=True)
    port = s1.port
    ccfg = edgeml.TrainerConfig(port_number=port, broadcast_port=None)
    local = edgeml.QueuedDataStore(100)
    c = edgeml.TrainerClient("127.0.0.1", ccfg, data_stores={"replay": local}, timeout=scaled(5),
                             clock_refresh=None)
    try:
        local.batch_insert(range(10))
        assert c.update() is True
        s1.stop()
        st1.close()
        c._acked["replay"] = 4  # as if the acknowledgement of items 5..9 had been lost
        s2 = edgeml.TrainerServer(edgeml.TrainerConfig(port_number=port, broadcast_port=None), host="127.0.0.1")
        st2 = edgeml.PersistentDataStore(path)
        s2.register_data_store("replay", st2)
        s2.start(threaded=True)
        local.batch_insert(range(10, 12))
        assert c.update() is True
        assert st2.get_latest_data(-1) == list(range(12))
        assert s2.duplicates_dropped == 5 and c.resends_after_restart == 0
        s2.stop()
        st2.close()
    finally:
        c.close()
