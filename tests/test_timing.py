"""Timing in the wire (docs/timing.md): per-call stages, running statistics,
the clock-offset estimate under a known skew, and links with known delay
and bandwidth."""
import math
import os
import subprocess
import threading
import time

import numpy as np
import pytest

import edgeml
from edgeml import _core
from edgeml.timing import BASIS_ESTIMATED, BASIS_SYNCHRONIZED

from conftest import scaled, wait_until
from linktools import DelayProxy, ShapedNetns

pytestmark = pytest.mark.timeout(120)


def nearest_rank(values, q):
    v = sorted(values)
    return v[max(1, math.ceil(q * len(v))) - 1]


def test_stages_add_up_and_bytes_are_the_frames(make_server, make_client):
    s = make_server({"work": lambda p: (time.sleep(0.01), p)[1]})
    c = make_client(s.port)
    payload = {"img": np.arange(3000, dtype=np.uint8), "k": 3}
    value, t = c.call_timed("work", payload)
    assert np.array_equal(value["img"], payload["img"])
    parts = t.upload_ms + t.queue_ms + t.handler_ms + t.reply_ms + t.download_ms
    assert parts == pytest.approx(t.rtt_ms, abs=1e-6)
    assert t.handler_ms >= 10.0
    assert t.rtt_ms >= t.handler_ms
    assert t.encode_ms > 0 and t.decode_ms > 0
    assert t.bytes_up == len(edgeml.encode_frame(["work", payload], _core.MSG_REQUEST))
    assert t.bytes_down == len(edgeml.encode_frame(value, _core.MSG_REPLY))
    assert t.one_way_basis == BASIS_ESTIMATED and not t.synchronized
    t0, t1, t2, t3, t4, t5 = t.t_ns
    assert t1 <= t2 <= t3 <= t4 and t0 < t5
    assert abs(time.time_ns() - t5) < 10e9  # wall-clock ns since the epoch
    d = t.as_dict()
    assert d["handler_ms"] == t.handler_ms and d["one_way_basis"] == BASIS_ESTIMATED


def test_running_stats_match_the_calls(make_server, make_client):
    delays = [0.0005 * (i % 7) for i in range(150)]
    it = iter(delays)
    s = make_server({"sleep": lambda p: time.sleep(next(it))})
    c = make_client(s.port, clock_refresh=None)
    handler, rtt = [], []
    for _ in delays:
        _, t = c.call_timed("sleep", None)
        handler.append(t.handler_ms)
        rtt.append(t.rtt_ms)
    st = c.stats()
    assert st["calls"] == len(delays)
    for name, vals in (("handler_ms", handler), ("rtt_ms", rtt)):
        got = st["stages"][name]
        assert got["count"] == len(vals)
        assert got["max"] == pytest.approx(max(vals), rel=1e-9)
        assert got["min"] == pytest.approx(min(vals), rel=1e-9)
        assert got["mean"] == pytest.approx(sum(vals) / len(vals), rel=1e-9)
        for q in (50, 90, 99):
            assert got[f"p{q}"] == pytest.approx(nearest_rank(vals, q / 100), rel=0.016, abs=1e-6), (name, q)
    assert st["stages"]["bytes_up"]["count"] == len(delays)
    # a failing call is timed too; a ping is not a call
    c.ping()
    with pytest.raises(edgeml.UnknownInterfaceError):
        c.call("nope")
    assert c.stats()["calls"] == len(delays) + 1
    c.reset_stats()
    st = c.stats()
    assert st["calls"] == 0 and st["stages"]["rtt_ms"]["count"] == 0
    assert st["clock"]["samples"] >= 1  # the clock estimate survives a reset


@pytest.mark.parametrize("skew_s", [2.5, -0.75])
def test_known_clock_skew_is_estimated(server_process, make_client, skew_s):
    """The server's wire clock runs skew_s ahead (test hook); the client's
    estimate finds it, and the one-way figures stay those of loopback."""
    sp = server_process(env={"EDGEML_TEST_CLOCK_SKEW_NS": str(int(skew_s * 1e9))})
    c = make_client(sp.port, clock_refresh=None)
    timings = [c.call_timed("echo", b"x" * 1000)[1] for _ in range(100)]
    clock = c.stats()["clock"]
    # on loopback the minimum delay is tens of µs: the estimate is that good
    assert clock["offset_ms"] == pytest.approx(skew_s * 1e3, abs=1.0)
    assert clock["error_ms"] < 1.0
    assert clock["basis"] == BASIS_ESTIMATED
    t = timings[-1]
    assert (t.t_ns[1] - t.t_ns[0]) / 1e6 == pytest.approx(skew_s * 1e3, abs=5.0)  # raw stamps carry the skew
    ups = [x.upload_ms for x in timings]
    downs = [x.download_ms for x in timings]
    assert -1.0 < np.median(ups) < 2.0 and -1.0 < np.median(downs) < 2.0
    # declaring the clocks synchronised (wrongly, here) puts the skew into
    # the one-way figures, and the timing says what they rest on
    c.clocks_synchronized = True
    _, t = c.call_timed("echo", b"x")
    assert t.synchronized and t.one_way_basis == BASIS_SYNCHRONIZED and t.offset_ms == 0
    assert t.upload_ms == pytest.approx(skew_s * 1e3, abs=5.0)
    assert t.download_ms == pytest.approx(-skew_s * 1e3, abs=5.0)
    assert c.stats()["clock"]["basis"] == BASIS_SYNCHRONIZED


def test_idle_client_keeps_its_clock_by_pinging(make_server, make_client):
    s = make_server()
    c = make_client(s.port, clock_refresh=0.1)
    assert wait_until(lambda: c.stats()["clock"]["samples"] >= 1, timeout=5)
    st = c.stats()
    assert st["calls"] == 0  # pings feed the clock, not the call statistics
    assert s.stats()["requests"] == 0
    assert abs(st["clock"]["offset_ms"]) < 5  # one host
    c.close()  # the keeper lets go of closed clients
    with pytest.raises(edgeml.ClosedError):
        c.stats()


def test_clock_refresh_validation():
    with pytest.raises(ValueError, match="clock_refresh"):
        edgeml.InferenceClient("127.0.0.1", 1, clock_refresh=0)


def test_asymmetric_delay_one_way_figures(make_server, make_client, cleanup):
    """5 ms up and 20 ms down through a delaying proxy. With clocks declared
    synchronised (true here: one host) the one-way figures are those
    delays; with the estimated offset they are the symmetric split, 12.5 ms
    each way, and the timing says that rests on the symmetric-path
    assumption."""
    s = make_server()
    proxy = cleanup(DelayProxy(s.port, up_s=0.005, down_s=0.020))
    sync = make_client(proxy.port, clocks_synchronized=True, clock_refresh=None)
    est = make_client(proxy.port, clock_refresh=None)
    for client in (sync, est):
        for _ in range(5):
            client.call("echo", b"warm")
    ts_sync = [sync.call_timed("echo", b"x" * 100)[1] for _ in range(30)]
    ts_est = [est.call_timed("echo", b"x" * 100)[1] for _ in range(30)]
    tol = 2.0  # ms: the proxy's own scheduling
    assert np.median([t.upload_ms for t in ts_sync]) == pytest.approx(5.0, abs=tol)
    assert np.median([t.download_ms for t in ts_sync]) == pytest.approx(20.0, abs=tol)
    assert np.median([t.rtt_ms for t in ts_sync]) == pytest.approx(25.0, abs=2 * tol)
    assert all(t.one_way_basis == BASIS_SYNCHRONIZED for t in ts_sync)
    assert np.median([t.upload_ms for t in ts_est]) == pytest.approx(12.5, abs=tol)
    assert np.median([t.download_ms for t in ts_est]) == pytest.approx(12.5, abs=tol)
    assert np.median([t.rtt_ms for t in ts_est]) == pytest.approx(25.0, abs=2 * tol)
    clock = est.stats()["clock"]
    assert clock["offset_ms"] == pytest.approx(-7.5, abs=tol)  # half the asymmetry
    assert clock["basis"] == BASIS_ESTIMATED and "symmetric" in clock["basis"]


def _setup_failed(e: subprocess.CalledProcessError) -> str:
    cmd = " ".join(map(str, e.cmd))
    return (f"cannot set up a shaped veth pair into a network namespace: `{cmd}` failed (exit {e.returncode}): "
            f"{(e.stderr or '').strip() or 'no stderr'}")


def netns_check():
    """Whether a network namespace joined by a tbf-shaped veth pair can be
    made here (root, iproute2, and a kernel and container that allow netns,
    veth and tbf), and if not, why: the failing command and its stderr."""
    ok, why = ShapedNetns.available()
    if not ok:
        return ok, why
    try:
        ShapedNetns(rate_mbit=40.0, tag=f"probe{os.getpid()}").close()
    except subprocess.CalledProcessError as e:
        return False, _setup_failed(e)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"cannot set up a shaped veth pair into a network namespace: {e}"
    return True, ""


_netns_ok, _netns_why = netns_check()


def test_netns_check_says_why_with_the_commands_stderr(tmp_path, monkeypatch):
    """Where veth pairs are not allowed (a container without the right
    capabilities), the shaped-link test is skipped with the command that
    failed and what it printed."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "ip").write_text('#!/bin/bash\nif [ "$1" = link ] && [ "$2" = add ]; then\n'
                             '  echo "RTNETLINK answers: Operation not permitted" >&2; exit 2\nfi\nexit 0\n')
    (fake / "tc").write_text("#!/bin/bash\nexit 0\n")
    for f in ("ip", "tc"):
        (fake / f).chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    ok, why = netns_check()
    assert not ok
    if os.geteuid() != 0:
        assert "needs root" in why
    else:
        assert "`ip link add" in why and "type veth" in why and "Operation not permitted" in why


@pytest.mark.skipif(not _netns_ok, reason=_netns_why)
def test_bandwidth_limit_on_a_veth_pair(server_process, make_client, cleanup):
    """A server in a network namespace behind a 40 Mbit/s tbf each way: a
    1 MB upload and a 1 MB download each take about 200 ms one way, and the
    round trip and throughput come out as configured."""
    rate = 40.0
    try:
        ns = cleanup(ShapedNetns(rate_mbit=rate))
    except subprocess.CalledProcessError as e:
        pytest.fail(_setup_failed(e))
    sp = server_process(
        "s.register_interface('echo', lambda p: p)\n"
        "s.register_interface('give', lambda n: np.ones(n, np.uint8))\n",
        host=ns.inner, prefix=ns.prefix)
    c = cleanup(edgeml.InferenceClient(ns.inner, sp.port, timeout=scaled(30), clocks_synchronized=True,
                                       clock_refresh=None))
    blob = np.ones(1_000_000, np.uint8)
    c.call("echo", b"warm")
    ups, downs = [], []
    for _ in range(3):
        _, t = c.call_timed("echo", blob)
        ups.append(t)
        _, t = c.call_timed("give", 1_000_000)
        downs.append(t)
    # the fastest of three runs: loopback scheduling only ever adds time
    up = min(ups, key=lambda t: t.rtt_ms)
    up_mbit = up.bytes_up * 8 / (up.upload_ms / 1e3) / 1e6
    down = min(downs, key=lambda t: t.rtt_ms)
    down_mbit = down.bytes_down * 8 / (down.download_ms / 1e3) / 1e6
    assert up_mbit == pytest.approx(rate, rel=0.1)  # tbf counts headers too: ~97% is payload
    assert down_mbit == pytest.approx(rate, rel=0.1)
    expect_rtt = 2 * 1_000_000 * 8 / (rate * 1e6) * 1e3  # echo: 1 MB each way
    assert up.rtt_ms == pytest.approx(expect_rtt, rel=0.1)
    # the estimated offset agrees (one host, and the ping path is symmetric)
    est = cleanup(edgeml.InferenceClient(ns.inner, sp.port, timeout=scaled(30), clock_refresh=None))
    est.sync_clock(8)
    _, t = est.call_timed("give", 1_000_000)
    assert abs(est.stats()["clock"]["offset_ms"]) < 2.0
    assert t.bytes_down * 8 / (t.download_ms / 1e3) / 1e6 == pytest.approx(rate, rel=0.2)


def test_timing_is_thread_safe(make_server, make_client):
    s = make_server()
    c = make_client(s.port, clock_refresh=0.05)
    errors = []

    def work():
        try:
            for _ in range(200):
                _, t = c.call_timed("echo", b"y")
                assert t.rtt_ms > 0
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ths = [threading.Thread(target=work) for _ in range(4)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(scaled(60))
    assert not errors
    assert c.stats()["calls"] == 800


def test_stats_show_as_a_table_in_a_notebook(make_server, make_client):
    import json
    s = make_server()
    c = make_client(s.port, clock_refresh=None)
    empty = c.stats()
    assert "no calls yet" in empty._repr_html_()
    for _ in range(5):
        c.call("echo", b"x" * 100)
    st = c.stats()
    assert isinstance(st, dict) and json.loads(json.dumps(st)) == st  # still a plain dict to code
    page = st._repr_html_()
    assert page.count("<table") == 1 and "<th>p99</th>" in page and "5 calls" in page
    for row in ("rtt (ms)", "upload (ms)", "handler (ms)", "download (ms)", "bytes up", "bytes down"):
        assert f">{row}<" in page, row
    assert "symmetric" in page  # says what the one-way figures rest on
