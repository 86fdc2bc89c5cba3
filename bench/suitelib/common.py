"""Process management, CPU placement, statistics and the machine description
for bench/suite. Used by the driver only (the children run roles.py)."""
from __future__ import annotations

import collections
import json
import math
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(BENCH)
OUT_DIR = os.path.join(BENCH, "out")
C_SRC = os.path.join(BENCH, "c_pingpong.c")
C_BIN = os.path.join(OUT_DIR, "c_pingpong")
ROLES = os.path.join(BENCH, "suitelib", "roles.py")


# ------------------------------------------------------------------ statistics

def pct(sorted_vals, p):
    """Nearest-rank percentile: sorted[ceil(p/100 * n) - 1]."""
    n = len(sorted_vals)
    k = min(n, max(1, math.ceil(p / 100.0 * n)))
    return sorted_vals[k - 1]


def stats_us(ns):
    """p50/p99/mean/min/max of nanosecond samples, in µs (nearest rank)."""
    s = sorted(ns)
    n = len(s)
    return {"n": n, "p50_us": pct(s, 50) / 1e3, "p99_us": pct(s, 99) / 1e3, "mean_us": sum(s) / n / 1e3,
            "min_us": s[0] / 1e3, "max_us": s[-1] / 1e3}


def median(vals):
    """Nearest-rank median (an observed value, like every percentile here)."""
    return pct(sorted(vals), 50)


# ------------------------------------------------------------------ CPU placement

# Where the processes of a one-client/one-server workload run. On this kind
# of VM a wakeup on another vCPU costs tens of µs (an IPI to an idle vCPU,
# i.e. a hypervisor exit) and varies a lot, while a wakeup on the same CPU
# costs a few µs; unpinned runs swing between the two. See docs/performance.md.
PLACEMENTS = {
    "same": "client and server both pinned to CPU {c}",
    "split": "client pinned to CPU {c}, server to CPU {s}",
    "free": "no pinning (the scheduler decides)",
}


def placement_cpus(name):
    """(client_cpus, server_cpus) for a placement; None where not possible."""
    avail = sorted(os.sched_getaffinity(0))
    if name == "free":
        return None, None
    if name == "same":
        return {avail[0]}, {avail[0]}
    if name == "split":
        if len(avail) < 2:
            return None
        return {avail[0]}, {avail[1]}
    raise ValueError(f"unknown placement {name!r}")


def describe_placement(name):
    cpus = placement_cpus(name)
    if cpus is None:
        return None
    c, s = cpus
    return PLACEMENTS[name].format(c=min(c) if c else "-", s=min(s) if s else "-")


# ------------------------------------------------------------------ child processes

def _preexec(cpus):
    """Every child: killed when the driver dies (PR_SET_PDEATHSIG), pinned
    to `cpus` (all its threads inherit the mask), own process group so a
    Ctrl-C in the terminal reaches only the driver, which stops the rest."""
    def fn():
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
        except Exception:
            pass
        os.setpgrp()
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
    return fn


class ChildError(RuntimeError):
    pass


class Child:
    """A child process speaking lines: commands on its stdin, one JSON object
    (or a READY line) per line on its stdout. A reader thread queues the
    lines so the driver can wait on several children with timeouts. Closing
    stdin asks the child to exit; close() escalates to SIGTERM, SIGKILL."""

    def __init__(self, argv, name, cpus=None, env=None):
        self.name = name
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        self._back: "collections.deque[str | None]" = collections.deque()  # lines read ahead
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
                                     preexec_fn=_preexec(cpus), cwd=REPO, env=env, bufsize=0)
        self._t = threading.Thread(target=self._read, daemon=True, name=f"read-{name}")
        self._t.start()

    def _read(self):
        f = self.proc.stdout
        try:
            for raw in iter(f.readline, b""):
                self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        except Exception:
            pass
        self.lines.put(None)  # EOF

    def line(self, timeout):
        """The next stdout line; ChildError on EOF or timeout."""
        if self._back:
            ln = self._back.popleft()
            if ln is not None:
                return ln
            self.lines.put(None)
        try:
            ln = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise ChildError(f"{self.name}: no output within {timeout:.0f} s") from None
        if ln is None:
            self.lines.put(None)
            rc = self.proc.poll()
            raise ChildError(f"{self.name}: exited (code {rc}) before answering")
        return ln

    def json(self, timeout):
        """The next stdout line that is a JSON object (other lines are
        printed to stderr: warnings from libraries)."""
        deadline = time.monotonic() + timeout
        while True:
            ln = self.line(max(0.01, deadline - time.monotonic()))
            if ln.startswith("{"):
                d = json.loads(ln)
                if "error" in d and len(d) == 1:
                    raise ChildError(f"{self.name}: {d['error']}")
                return d
            print(f"  [{self.name}] {ln}", file=sys.stderr)

    def try_json(self, timeout=0.0):
        """The next JSON line if a line arrives within timeout, else None."""
        if not self._back:
            try:
                ln = self.lines.get(timeout=timeout) if timeout > 0 else self.lines.get_nowait()
            except queue.Empty:
                return None
            self._back.append(ln)
        return self.json(1.0)

    def ready(self, timeout=60.0):
        """Wait for "READY [json]"; returns the json (or {})."""
        deadline = time.monotonic() + timeout
        while True:
            ln = self.line(max(0.01, deadline - time.monotonic()))
            if ln.startswith("READY"):
                rest = ln[5:].strip()
                if rest.startswith("{"):
                    return json.loads(rest)
                return {"port": int(rest)} if rest else {}
            if ln.startswith("{") and '"error"' in ln:
                raise ChildError(f"{self.name}: {json.loads(ln).get('error')}")
            print(f"  [{self.name}] {ln}", file=sys.stderr)

    def send(self, line):
        try:
            self.proc.stdin.write((line + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise ChildError(f"{self.name}: cannot send {line!r}: {e}") from None

    def close(self, wait=3.0):
        p = self.proc
        if p is None:
            return
        self.proc = None
        try:
            p.stdin.close()
        except Exception:
            pass
        try:
            p.wait(wait)
        except subprocess.TimeoutExpired:
            p.terminate()
            try:
                p.wait(2.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        try:
            p.stdout.close()
        except Exception:
            pass


class Children:
    """A set of children closed together (with block)."""

    def __init__(self):
        self.all = []

    def start(self, argv, name, cpus=None):
        c = Child(argv, name, cpus)
        self.all.append(c)
        return c

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # The first child is the server (or publisher): the clients go first,
        # so none of them sees (and logs) a lost connection. Closing stdin of
        # all of them before reaping lets them exit in parallel.
        first, rest = self.all[:1], self.all[1:]
        for group in (rest, first):
            for c in group:
                try:
                    if c.proc is not None:
                        c.proc.stdin.close()
                except Exception:
                    pass
            for c in reversed(group):
                c.close()


def role_argv(role, **kw):
    """argv of a child running suitelib/roles.py ROLE with keyword arguments."""
    return [sys.executable, ROLES, role, json.dumps(kw)]


# ------------------------------------------------------------------ set-up

def ensure_deps():
    missing = []
    for mod, pkg in (("zmq", "pyzmq>=25"), ("msgpack", "msgpack>=1"), ("lz4", "lz4")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(pkg)
    if missing:
        print(f"installing {' '.join(missing)} ...", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *missing])


def build_c():
    if os.path.exists(C_BIN) and os.path.getmtime(C_BIN) >= os.path.getmtime(C_SRC):
        return
    os.makedirs(OUT_DIR, exist_ok=True)
    cmd = [os.environ.get("CC", "cc"), "-O2", "-o", C_BIN, C_SRC, "-lm"]
    print("building: " + " ".join(cmd), file=sys.stderr)
    subprocess.check_call(cmd)


def proc_cpu_s(pid):
    """CPU time (user+sys, all threads) a process has used so far, from
    /proc/PID/stat (clock-tick resolution); None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def loadavg():
    try:
        with open("/proc/loadavg") as f:
            return f.read().strip()
    except OSError:
        return None


def machine_info():
    info = {"nproc": os.cpu_count(), "nproc_affinity": len(os.sched_getaffinity(0))}
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    info["cpu_model"] = ln.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total"] = f.readline().split(":", 1)[1].strip()
    except OSError:
        pass
    u = platform.uname()
    info.update(kernel=f"{u.system} {u.release} {u.version}", machine=u.machine,
                python=f"{platform.python_implementation()} {platform.python_version()}")
    for mod, attr in (("numpy", "__version__"), ("zmq", "__version__"), ("msgpack", "version"),
                      ("lz4", "__version__"), ("edgeml", "__version__")):
        try:
            m = __import__(mod)
            v = getattr(m, attr)
            info[{"zmq": "pyzmq"}.get(mod, mod)] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as e:
            info[mod] = f"unavailable: {e!r}"
    try:
        import zmq
        info["libzmq"] = zmq.zmq_version()
    except Exception:
        pass
    try:
        import edgeml._core as core
        info["edgeml_core"] = core.VERSION
    except Exception:
        pass
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout
        info["git"] = head + ("-dirty" if dirty.strip() else "")
        if dirty.strip():  # which tracked files differ from HEAD (others may be editing the tree)
            info["git_modified"] = [ln[3:] for ln in dirty.splitlines() if ln.strip()]
    except Exception:
        pass
    return info
