"""agentlace's ``agentlace.action`` module under edgeml: ``ActionConfig``,
``ActionServer`` and ``ActionClient`` (the edge-device roles of
``edgeml.edge`` under agentlace's names), with the callback protocols.

>>> from edgeml.action import ActionConfig, ActionServer, ActionClient
"""
from __future__ import annotations

from typing import Any, Dict, Set

try:
    from typing import Protocol
except ImportError:  # pragma: no cover - Python < 3.8
    from typing_extensions import Protocol  # type: ignore

from .edge import ActionClient, ActionConfig, ActionServer, EdgeClient, EdgeConfig, EdgeServer


class ObsCallback(Protocol):
    """``obs_callback(keys) -> dict``: the observation for ``keys`` (a list
    of observation keys; every key when the client asked for all)."""

    def __call__(self, keys: Set[str]) -> Dict[str, Any]:
        ...


class ActCallback(Protocol):
    """``act_callback(key, payload) -> dict``: take action ``key``."""

    def __call__(self, key: str, payload: Any) -> Dict[str, Any]:
        ...


__all__ = ["ActionConfig", "ActionServer", "ActionClient", "ObsCallback", "ActCallback",
           "EdgeConfig", "EdgeServer", "EdgeClient"]
