"""The keyword spellings agentlace and the original edgeml used, mapped onto
edgeml's own (``server_ip`` for ``host``, ``port_num`` for ``port``,
``timeout_ms`` for ``timeout``), and ``log_level`` wired to the ``edgeml``
logger. See docs/migrating.md."""
from __future__ import annotations

import logging
from typing import Any, Optional

log = logging.getLogger("edgeml")

_HANDLER_MARK = "_edgeml_log_level_handler"


def _level_number(level: Any) -> int:
    if isinstance(level, bool):
        raise TypeError(f"log_level must be a logging level (an int or a name like 'INFO'), got {level!r}")
    if isinstance(level, int):
        return level
    if isinstance(level, str):
        n = logging.getLevelName(level.upper())
        if isinstance(n, int):
            return n
        raise ValueError(f"log_level {level!r} is not a logging level name (DEBUG, INFO, WARNING, ERROR, CRITICAL)")
    raise TypeError(f"log_level must be a logging level (an int or a name like 'INFO'), got {level!r}")


def apply_log_level(level: Any) -> None:
    """``log_level=`` of any server or client: set the level of the
    ``edgeml`` logger (process-wide, like agentlace's
    ``logging.basicConfig(level=...)``, but only edgeml's own logger). None
    leaves it as it is. When the program has configured no logging at all
    (no handler on the root or the ``edgeml`` logger), one stderr handler is
    added to the ``edgeml`` logger, so the messages asked for are shown."""
    if level is None:
        return
    n = _level_number(level)
    log.setLevel(n)
    if not logging.getLogger().handlers and not log.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        setattr(h, _HANDLER_MARK, True)
        log.addHandler(h)


def pick(ours_name: str, ours: Any, theirs_name: str, theirs: Any, default: Any = None) -> Any:
    """One value from two spellings of an argument; both given and different
    is a TypeError."""
    if ours is not None and theirs is not None and ours != theirs:
        raise TypeError(f"{ours_name}={ours!r} and {theirs_name}={theirs!r} are the same argument; give one")
    if ours is not None:
        return ours
    if theirs is not None:
        return theirs
    return default


def timeout_from_ms(timeout: Optional[float], timeout_ms: Optional[float], default: Optional[float]) -> Optional[float]:
    """Seconds from ``timeout=`` (s) or agentlace's ``timeout_ms=`` (ms)."""
    if timeout_ms is not None:
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, (int, float)) or timeout_ms < 0:
            raise ValueError(f"timeout_ms must be a number of milliseconds >= 0, got {timeout_ms!r}")
        ms = float(timeout_ms) / 1000.0
        if timeout is not None and timeout is not default and timeout != ms:
            raise TypeError(f"timeout={timeout!r} and timeout_ms={timeout_ms!r} are the same argument; give one")
        return ms
    return timeout


WAIT_FOREVER_S = 365 * 86400.0  # wait_for_server=True: the connect timeout
