"""Helpers for the compatibility tests (code written for agentlace and the
original edgeml, run with the import changed): free loopback ports, client
configs with a server's bound ports, the edgeml logger put back as it was."""
import dataclasses
import logging
import socket

import pytest


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago (for the tests that
    need a port number before a server exists)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bound_config(config, server):
    """``config`` with the ports a server started on port 0 really bound, as
    the client must be given them (agentlace's clients take their port from
    the config)."""
    kw = {"port_number": server.port}
    if getattr(config, "broadcast_port", None) is not None:
        kw["broadcast_port"] = server.broadcast_port
    return dataclasses.replace(config, **kw)


@pytest.fixture
def edgeml_logger():
    """The ``edgeml`` logger; its level and handlers are restored after the
    test (``log_level=`` changes them process-wide)."""
    lg = logging.getLogger("edgeml")
    level, handlers = lg.level, list(lg.handlers)
    yield lg
    lg.setLevel(level)
    for h in list(lg.handlers):
        if h not in handlers:
            lg.removeHandler(h)
