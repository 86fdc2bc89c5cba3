"""The cost model and the plan (docs/offload.md, "The cost model").

Split ``p`` (0 <= p <= n) runs layers ``[0, p)`` on the device, sends the
activation at cut ``p`` (p = 0: the raw input), runs layers ``[p, n)`` on
the server and returns the result:

    T(p) = device[p] + up_bytes[p] / up_bw + server[p] + down_bytes / down_bw + rtt     (p < n)
    T(n) = device[n]                                                                  (nothing is sent)

``device[p]`` is the device's time for layers [0, p) and ``server[p]`` the
server's for [p, n), each the median over the profile's runs of that
prefix or suffix as the layers ran one after the other; ``up_bytes[p]`` and
``down_bytes`` are the frames edgeml sends (header and body, measured by
encoding them); the link's ``up_bw``/``down_bw`` are the size-dependent part
of each one-way delay and ``rtt`` the round trip of a small call, all
measured by ``link.measure``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

SCENARIOS = ("device-only", "server-only", "mixed")


class Profile:
    """One side's timings of a split model: ``prefix_s[p]`` (layers [0, p),
    p = 0..n; prefix_s[0] = 0), ``suffix_s[p]`` (layers [p, n); suffix_s[n]
    = 0), ``layer_s[i]`` (layer i alone: the median of its time within the
    runs), ``runs``, and the machine it ran on."""

    def __init__(self, prefix_s: List[float], suffix_s: List[float], layer_s: List[float], runs: int,
                 where: str = "", interval_s: float = 0.0):
        if not (len(prefix_s) == len(suffix_s) == len(layer_s) + 1):
            raise ValueError("a profile has n + 1 prefix and suffix times for n layers")
        self.prefix_s, self.suffix_s, self.layer_s = list(prefix_s), list(suffix_s), list(layer_s)
        self.runs, self.where, self.interval_s = runs, where, interval_s

    @property
    def n(self) -> int:
        return len(self.layer_s)

    def to_json(self) -> Dict[str, Any]:
        return {"prefix_s": self.prefix_s, "suffix_s": self.suffix_s, "layer_s": self.layer_s, "runs": self.runs,
                "where": self.where, "interval_s": self.interval_s}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Profile":
        return cls(d["prefix_s"], d["suffix_s"], d["layer_s"], d.get("runs", 0), d.get("where", ""),
                   d.get("interval_s", 0.0))


class Link:
    """The link as measured: ``rtt_s`` (a small call's round trip),
    ``up_bps``/``down_bps`` (bytes per second: the slope of each one-way
    delay against the frame's size) and ``up_offset_s``/``down_offset_s``
    (where that line meets zero bytes, less a small call's transfer time:
    about 0 on most links; negative where a token bucket lets its first
    bytes through at line rate). A frame of ``b`` bytes takes
    ``max(0, offset + b / bps)`` on top of the round trip."""

    def __init__(self, rtt_s: float, up_bps: float, down_bps: float, detail: Optional[dict] = None,
                 up_offset_s: float = 0.0, down_offset_s: float = 0.0):
        for name, v in (("rtt_s", rtt_s), ("up_bps", up_bps), ("down_bps", down_bps)):
            if not v > 0:
                raise ValueError(f"link {name} must be > 0, got {v!r}")
        self.rtt_s, self.up_bps, self.down_bps = float(rtt_s), float(up_bps), float(down_bps)
        self.up_offset_s, self.down_offset_s = float(up_offset_s), float(down_offset_s)
        self.detail = detail or {}
        # a small call's transfer time (rtt less the server's queue, handler and reply)
        self.small_s = float(self.detail.get("small_transfer_s", self.rtt_s))

    def up_s(self, nbytes: int) -> float:
        return max(0.0, self.up_offset_s + nbytes / self.up_bps)

    def down_s(self, nbytes: int) -> float:
        return max(0.0, self.down_offset_s + nbytes / self.down_bps)

    def changed(self, other: "Link", tolerance: float = 0.25) -> bool:
        """Whether ``other`` differs from this link by more than
        ``tolerance`` (relative) in bandwidth either way or in round trip."""
        def off(a: float, b: float) -> bool:
            return abs(a - b) > tolerance * max(a, b)
        return off(self.up_bps, other.up_bps) or off(self.down_bps, other.down_bps) or \
            (off(self.rtt_s, other.rtt_s) and abs(self.rtt_s - other.rtt_s) > 0.5e-3)

    def to_json(self) -> Dict[str, Any]:
        return {"rtt_s": self.rtt_s, "up_bps": self.up_bps, "down_bps": self.down_bps,
                "up_mbit_s": self.up_bps * 8 / 1e6, "down_mbit_s": self.down_bps * 8 / 1e6,
                "up_offset_s": self.up_offset_s, "down_offset_s": self.down_offset_s, "detail": self.detail}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Link":
        return cls(d["rtt_s"], d["up_bps"], d["down_bps"], d.get("detail"), d.get("up_offset_s", 0.0),
                   d.get("down_offset_s", 0.0))

    def __repr__(self) -> str:
        return (f"<Link rtt {self.rtt_s * 1e3:.2f} ms, up {self.up_bps * 8 / 1e6:.1f} Mbit/s, "
                f"down {self.down_bps * 8 / 1e6:.1f} Mbit/s>")


class Candidate:
    """One split's predicted latency and its parts (seconds)."""

    def __init__(self, p: int, n: int, device_s: float, up_s: float, server_s: float, down_s: float, rtt_s: float,
                 up_bytes: int, down_bytes: int, cut: str):
        self.p, self.n = p, n
        self.device_s, self.up_s, self.server_s, self.down_s, self.rtt_s = device_s, up_s, server_s, down_s, rtt_s
        self.up_bytes, self.down_bytes, self.cut = up_bytes, down_bytes, cut

    @property
    def total_s(self) -> float:
        return self.device_s + self.up_s + self.server_s + self.down_s + self.rtt_s

    @property
    def scenario(self) -> str:
        return "device-only" if self.p == self.n else "server-only" if self.p == 0 else "mixed"

    def to_json(self) -> Dict[str, Any]:
        return {"p": self.p, "scenario": self.scenario, "cut": self.cut, "total_s": self.total_s,
                "device_s": self.device_s, "up_s": self.up_s, "server_s": self.server_s, "down_s": self.down_s,
                "rtt_s": self.rtt_s, "up_bytes": self.up_bytes, "down_bytes": self.down_bytes}


class Plan:
    """Every split's predicted latency for a device profile, a server
    profile, the bytes of each cut and a link; ``best`` is the fastest,
    ``by_scenario`` the fastest of Device-only, Server-only and Mixed."""

    def __init__(self, device: Profile, server: Profile, up_bytes: List[int], down_bytes: int, link: Link,
                 cut_names: Optional[List[str]] = None, layer_names: Optional[List[str]] = None):
        n = device.n
        if server.n != n or len(up_bytes) != n:
            raise ValueError(f"the device profiled {device.n} layers, the server {server.n}, and there are "
                             f"{len(up_bytes)} cuts to send: they must be the same model")
        self.device, self.server, self.link = device, server, link
        self.up_bytes, self.down_bytes = list(up_bytes), int(down_bytes)
        self.cut_names = cut_names or [f"cut {p}" for p in range(n + 1)]
        self.layer_names = layer_names or [f"layer {i}" for i in range(n)]
        self.candidates: List[Candidate] = []
        for p in range(n + 1):
            if p == n:
                c = Candidate(p, n, device.prefix_s[n], 0.0, 0.0, 0.0, 0.0, 0, 0, self.cut_names[p])
            else:
                c = Candidate(p, n, device.prefix_s[p], link.up_s(self.up_bytes[p]), server.suffix_s[p],
                              link.down_s(self.down_bytes), link.rtt_s, self.up_bytes[p], self.down_bytes,
                              self.cut_names[p])
            self.candidates.append(c)
        self.best = min(self.candidates, key=lambda c: (c.total_s, c.p))
        self.by_scenario: Dict[str, Candidate] = {}
        for c in self.candidates:
            cur = self.by_scenario.get(c.scenario)
            if cur is None or c.total_s < cur.total_s:
                self.by_scenario[c.scenario] = c

    @property
    def n(self) -> int:
        return self.device.n

    @property
    def split(self) -> int:
        return self.best.p

    def with_link(self, link: Link) -> "Plan":
        """The same profiles on another link (a re-plan)."""
        return Plan(self.device, self.server, self.up_bytes, self.down_bytes, link, self.cut_names,
                    self.layer_names)

    def table(self) -> str:
        lines = [f"{'p':>3} {'scenario':<12} {'cut':<18} {'up bytes':>10} {'device':>9} {'up':>9} {'server':>9} "
                 f"{'down':>8} {'rtt':>7} {'total ms':>9}"]
        for c in self.candidates:
            mark = " <- best" if c is self.best else ""
            lines.append(f"{c.p:>3} {c.scenario:<12} {str(c.cut)[:18]:<18} {c.up_bytes:>10,} "
                         f"{c.device_s * 1e3:>9.2f} {c.up_s * 1e3:>9.2f} {c.server_s * 1e3:>9.2f} "
                         f"{c.down_s * 1e3:>8.2f} {c.rtt_s * 1e3:>7.2f} {c.total_s * 1e3:>9.2f}{mark}")
        l = self.link
        lines.append(f"link: rtt {l.rtt_s * 1e3:.2f} ms, up {l.up_bps * 8 / 1e6:.2f} Mbit/s, down "
                     f"{l.down_bps * 8 / 1e6:.2f} Mbit/s")
        parts = [f"{s} {self.by_scenario[s].total_s * 1e3:.2f} ms (p={self.by_scenario[s].p})"
                 for s in SCENARIOS if s in self.by_scenario]
        lines.append("best of each: " + ", ".join(parts))
        lines.append(f"chosen: p={self.best.p} ({self.best.scenario}), {self.best.total_s * 1e3:.2f} ms predicted")
        return "\n".join(lines)

    def layers_table(self) -> str:
        """Per layer: its time on each side (the median of the profile's
        runs) and the frame that a split after it sends."""
        lines = [f"{'layer':>5} {'name':<24} {'device ms':>10} {'server ms':>10} {'then sends':>12}"]
        for i in range(self.n):
            nxt = f"{self.up_bytes[i + 1]:,}" if i + 1 < self.n else "(result)"
            lines.append(f"{i:>5} {self.layer_names[i][:24]:<24} {self.device.layer_s[i] * 1e3:>10.3f} "
                         f"{self.server.layer_s[i] * 1e3:>10.3f} {nxt:>12}")
        lines.append(f"the input's frame: {self.up_bytes[0]:,} bytes; the result's: {self.down_bytes:,} bytes; "
                     f"profiles: {self.device.runs} runs on the device, {self.server.runs} on the server (medians)")
        return "\n".join(lines)

    def to_json(self) -> Dict[str, Any]:
        return {"split": self.best.p, "scenario": self.best.scenario, "predicted_s": self.best.total_s,
                "candidates": [c.to_json() for c in self.candidates],
                "scenarios": {k: v.to_json() for k, v in self.by_scenario.items()},
                "link": self.link.to_json(), "device": self.device.to_json(), "server": self.server.to_json(),
                "up_bytes": self.up_bytes, "down_bytes": self.down_bytes, "cut_names": self.cut_names,
                "layer_names": self.layer_names}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "Plan":
        return cls(Profile.from_json(d["device"]), Profile.from_json(d["server"]), d["up_bytes"], d["down_bytes"],
                   Link.from_json(d["link"]), d.get("cut_names"), d.get("layer_names"))

    def __repr__(self) -> str:
        return f"<Plan split p={self.best.p} ({self.best.scenario}) {self.best.total_s * 1e3:.2f} ms predicted>"
