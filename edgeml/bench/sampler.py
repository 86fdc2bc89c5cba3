"""Target statistics: CPU per core, memory, GPU utilisation and memory,
sampled on a thread at about ``SAMPLE_HZ`` while a benchmark session is open.

CPU and memory come from ``/proc`` on Linux (no dependency) and from
psutil elsewhere where it is installed; GPU figures from NVML (the
``nvidia-ml-py`` package, ``import pynvml``) where a driver answers. What is
missing is said, not guessed: ``gpu_reason`` tells why there are no GPU
figures.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Dict, List, Optional, Tuple

from .protocol import SAMPLE_HZ


def _read_proc_stat(path: str = "/proc/stat") -> Dict[int, Tuple[int, int]]:
    """(busy, total) jiffies of each online core, by core number (an
    offline core has no line)."""
    cores = {}
    with open(path) as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            parts = line.split()
            try:
                num = int(parts[0][3:])
            except ValueError:
                continue
            vals = [int(v) for v in parts[1:]]
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
            total = sum(vals[:8])  # guest time is already in user/nice
            cores[num] = (total - idle, total)
    return cores


def _read_meminfo(path: str = "/proc/meminfo") -> float:
    """Memory in use, % of total (MemTotal - MemAvailable)."""
    info: Dict[str, int] = {}
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0])
    total = info["MemTotal"]
    avail = info.get("MemAvailable", info.get("MemFree", 0) + info.get("Cached", 0))
    return 100.0 * (total - avail) / total


class _ProcCpu:
    """Per-core busy % since the last sample, one value per core of the
    machine (``os.cpu_count()``): None for a core that is offline now or
    was at the last sample (as on boards that park cores)."""

    def __init__(self, path: str = "/proc/stat") -> None:
        self.path = path
        self._prev = _read_proc_stat(path)
        self.cores = max([os.cpu_count() or 0] + [c + 1 for c in self._prev])

    def sample(self) -> List[Optional[float]]:
        cur = _read_proc_stat(self.path)
        out: List[Optional[float]] = []
        for c in range(self.cores):
            a, b = self._prev.get(c), cur.get(c)
            if a is None or b is None or b[1] - a[1] <= 0:
                out.append(None if a is None or b is None else 0.0)
            else:
                out.append(100.0 * (b[0] - a[0]) / (b[1] - a[1]))
        self._prev = cur
        return out


class _Nvml:
    """GPU utilisation and memory of every device NVML sees (their mean)."""

    def __init__(self) -> None:
        import pynvml  # nvidia-ml-py
        pynvml.nvmlInit()
        self._nv = pynvml
        n = pynvml.nvmlDeviceGetCount()
        if n < 1:
            raise RuntimeError("NVML sees no GPU")
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
        self.names = []
        for h in self._handles:
            name = pynvml.nvmlDeviceGetName(h)
            self.names.append(name.decode() if isinstance(name, bytes) else str(name))

    def sample(self) -> Tuple[float, float]:
        util, mem = [], []
        for h in self._handles:
            util.append(float(self._nv.nvmlDeviceGetUtilizationRates(h).gpu))
            m = self._nv.nvmlDeviceGetMemoryInfo(h)
            mem.append(100.0 * m.used / m.total if m.total else 0.0)
        return sum(util) / len(util), sum(mem) / len(mem)

    def close(self) -> None:
        try:
            self._nv.nvmlShutdown()
        except Exception:
            pass


def open_gpu() -> Tuple[Optional[_Nvml], str]:
    """NVML, or None and the reason there are no GPU figures."""
    try:
        return _Nvml(), ""
    except ImportError:
        return None, "no NVML: pip install nvidia-ml-py for GPU figures"
    except Exception as e:  # no driver, no device: NVMLError_LibraryNotFound and friends
        return None, f"NVML not usable: {type(e).__name__}: {e}"


class Sampler:
    """Samples the machine every ``1/hz`` s on a thread from ``start()`` to
    ``stop()``; ``since(i)`` gives the samples from index ``i`` on, with
    Kenning's series (``timestamp`` ns, ``cpus_percent``, ``mem_percent``,
    ``gpu_utilization``, ``gpu_mem_utilization``) plus the target
    process's resident memory (``rss_bytes``)."""

    def __init__(self, hz: float = SAMPLE_HZ):
        if not hz > 0:
            raise ValueError(f"hz must be > 0, got {hz}")
        self.period = 1.0 / hz
        self._lock = threading.Lock()
        self._series: Dict[str, list] = {k: [] for k in ("timestamp", "cpus_percent", "mem_percent", "rss_bytes")}
        self._stop = threading.Event()
        self._base = 0  # samples forgotten (since(..., forget_before=True))
        self._thread: Optional[threading.Thread] = None
        self._cpu = self._psutil = None
        if os.path.exists("/proc/stat"):
            self._cpu = _ProcCpu()
        else:  # pragma: no cover - not Linux
            import psutil
            self._psutil = psutil
            psutil.cpu_percent(percpu=True)
        self._gpu, self.gpu_reason = open_gpu()
        if self._gpu is not None:
            self._series["gpu_utilization"] = []
            self._series["gpu_mem_utilization"] = []
        self.error = ""  # the reason sampling stopped early, if it did

    @property
    def gpu_names(self) -> List[str]:
        return list(self._gpu.names) if self._gpu is not None else []

    def _one(self) -> None:
        ts = time.time_ns()
        if self._cpu is not None:
            cpus = self._cpu.sample()
            mem = _read_meminfo()
        else:  # pragma: no cover - not Linux
            cpus = list(self._psutil.cpu_percent(percpu=True))
            mem = float(self._psutil.virtual_memory().percent)
        rss = _rss_bytes()
        gpu = self._gpu.sample() if self._gpu is not None else None
        with self._lock:
            s = self._series
            s["timestamp"].append(ts)
            s["cpus_percent"].append(cpus)
            s["mem_percent"].append(mem)
            s["rss_bytes"].append(rss)
            if gpu is not None:
                s["gpu_utilization"].append(gpu[0])
                s["gpu_mem_utilization"].append(gpu[1])

    def _run(self) -> None:
        next_t = time.monotonic() + self.period
        while not self._stop.wait(max(0.0, next_t - time.monotonic())):
            try:
                self._one()
            except Exception as e:  # a /proc or NVML failure ends sampling, said in STATS
                self.error = f"sampling stopped: {type(e).__name__}: {e}"
                return
            next_t += self.period

    def start(self) -> "Sampler":
        if self._thread is None:
            if self._cpu is not None:
                self._cpu = _ProcCpu()  # CPU % of the first sample: over its period, from now
            self._thread = threading.Thread(target=self._run, name="edgeml-bench-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling, with a last sample of the time since the one
        before (so a session shorter than a period has one)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            if not self.error:
                try:
                    self._one()
                except Exception as e:
                    self.error = f"sampling stopped: {type(e).__name__}: {e}"
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None

    def __len__(self) -> int:
        """Samples taken so far (those forgotten included)."""
        with self._lock:
            return self._base + len(self._series["timestamp"])

    def since(self, i: int = 0, forget_before: bool = False) -> Tuple[Dict[str, list], int]:
        """The samples from index ``i`` on (indices count every sample
        taken), and the index to ask from next; with ``forget_before``,
        those before ``i`` are dropped (whoever asks has them)."""
        with self._lock:
            n = self._base + len(self._series["timestamp"])
            i = max(self._base, min(int(i), n))
            k = i - self._base
            out = {key: v[k:] for key, v in self._series.items()}
            if forget_before and k:
                for v in self._series.values():
                    del v[:k]
                self._base = i
            return out, n


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return 0
