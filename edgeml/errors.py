"""edgeml's exceptions: one base, ``EdgeMLError``; each subclass also inherits
the built-in exception that fits, so ``except TimeoutError`` works too.

The C core reports errors as codes from one table (``EM_ERRORS`` in
``csrc/include/edgeml.h``); ``CODE_TO_ERROR`` maps every code to a class.
"""
from __future__ import annotations

import builtins


class EdgeMLError(Exception):
    """Base of every error edgeml raises. Errors the C core reports carry
    its code and the code's name (``e.code == -3``, ``e.name ==
    "ETIMEDOUT"``, from the table in ``csrc/include/edgeml.h``); others have
    ``None`` there."""

    code = None
    name = None


class EdgeMLTimeoutError(EdgeMLError, builtins.TimeoutError):
    """No reply within the timeout."""


class EdgeMLConnectionError(EdgeMLError, builtins.ConnectionError):
    """The server cannot be reached, or the connection broke mid-call."""


class HandshakeError(EdgeMLConnectionError):
    """The server refused the connection (another protocol version, another
    kind of server)."""


class ProtocolError(EdgeMLConnectionError):
    """The peer sent bytes that are not edgeml frames."""


class ClosedError(EdgeMLConnectionError):
    """The client or server was closed."""


class MessageTooLargeError(EdgeMLError, builtins.ValueError):
    """A message exceeds ``max_message_bytes``."""


class AddressInUseError(EdgeMLError, builtins.OSError):
    """The server's port is taken."""


class InvalidArgumentError(EdgeMLError, builtins.ValueError):
    """An argument the core rejected."""


class EncodeError(EdgeMLError, builtins.TypeError):
    """A payload holds something edgeml cannot send; the message names the key
    path and the type."""


class DecodeError(EdgeMLError, builtins.ValueError):
    """A message body could not be decoded."""


class RemoteError(EdgeMLError, builtins.RuntimeError):
    """The server-side handler raised. ``remote_type``, ``remote_message`` and
    ``remote_traceback`` carry what happened there."""

    def __init__(self, remote_type: str, remote_message: str, remote_traceback: str = ""):
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        super().__init__(f"{remote_type}: {remote_message}")

    def __str__(self) -> str:
        s = f"{self.remote_type}: {self.remote_message}"
        if self.remote_traceback:
            s += "\n\nRemote traceback:\n" + self.remote_traceback.rstrip()
        return s

    def __reduce__(self):
        return (type(self), (self.remote_type, self.remote_message, self.remote_traceback))


class UnknownInterfaceError(EdgeMLError, builtins.LookupError):
    """The server has no interface of that name; ``interfaces`` lists those it has."""

    def __init__(self, message: str, interfaces=()):
        super().__init__(message)
        self.interfaces = list(interfaces)

    def __reduce__(self):
        return (type(self), (self.args[0], self.interfaces))


class InvalidKeyError(EdgeMLError, builtins.KeyError):
    """A key that the config does not declare (an observation or action key,
    a payload key); the message names the key and the declared ones."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class UnknownRequestTypeError(EdgeMLError, builtins.LookupError):
    """``TrainerClient.request`` with a type the config's ``request_types``
    does not list; ``request_types`` holds those it does."""

    def __init__(self, message: str, request_types=()):
        super().__init__(message)
        self.request_types = list(request_types)

    def __reduce__(self):
        return (type(self), (self.args[0], self.request_types))


class UnknownDataStoreError(EdgeMLError, builtins.LookupError):
    """Data sent for a store name the trainer has not registered."""


class DeviceError(EdgeMLError, builtins.RuntimeError):
    """The device asked for cannot be used: no CUDA runtime library, no
    such device, a driver too old for the runtime, or a CUDA call failed.
    The message says which."""


class RateLimitError(EdgeMLError, builtins.RuntimeError):
    """A call came sooner than the config's ``rate_limit`` allows;
    ``retry_after`` is how many seconds to wait."""

    def __init__(self, message: str, retry_after: float = 0.0):
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self):
        return (type(self), (self.args[0], self.retry_after))


class InterruptedError_(EdgeMLError, builtins.InterruptedError):
    """A wait was interrupted."""


CODE_TO_ERROR = {
    "EINVAL": InvalidArgumentError,
    "ENOMEM": MemoryError,
    "ETIMEDOUT": EdgeMLTimeoutError,
    "ECONNREFUSED": EdgeMLConnectionError,
    "ECONNCLOSED": EdgeMLConnectionError,
    "EPROTO": ProtocolError,
    "ETOOBIG": MessageTooLargeError,
    "EADDRINUSE": AddressInUseError,
    "ECLOSED": ClosedError,
    "ERESOLVE": EdgeMLConnectionError,
    "EIO": EdgeMLConnectionError,
    "EVERSION": HandshakeError,
    "EHANDSHAKE": HandshakeError,
    "EREMOTE": RemoteError,
    "EENCODE": EncodeError,
    "EDECODE": DecodeError,
    "EINTR": InterruptedError_,
    "EFORKED": ClosedError,
    "ENODEV": DeviceError,
    "ECUDA": DeviceError,
}

# Errors raised inside a server that travel back to the caller as themselves
# (by their wire name) rather than as RemoteError. HandshakeError is not
# among them: only the handshake itself (in C) can refuse a connection, so a
# call's ERROR reply naming it arrives as a RemoteError.
_WIRE_ERRORS = {
    "edgeml.UnknownInterfaceError": UnknownInterfaceError,
    "edgeml.DecodeError": DecodeError,
    "edgeml.InvalidKeyError": InvalidKeyError,
    "edgeml.UnknownRequestTypeError": UnknownRequestTypeError,
    "edgeml.UnknownDataStoreError": UnknownDataStoreError,
    "edgeml.InvalidArgumentError": InvalidArgumentError,
    "edgeml.ProtocolError": ProtocolError,
}


def wire_name(exc: BaseException) -> str:
    t = type(exc)
    if isinstance(exc, EdgeMLError) and t.__module__.startswith("edgeml"):
        return f"edgeml.{t.__qualname__}"
    if t.__module__ == "builtins":
        return t.__qualname__
    return f"{t.__module__}.{t.__qualname__}"


def from_error_reply(info: dict) -> Exception:
    """The exception to raise at the caller for an ERROR reply's map."""
    rtype = str(info.get("type", "RemoteError"))
    message = str(info.get("message", ""))
    cls = _WIRE_ERRORS.get(rtype)
    if cls is UnknownInterfaceError:
        return UnknownInterfaceError(message, info.get("interfaces") or ())
    if cls is UnknownRequestTypeError:
        return UnknownRequestTypeError(message, info.get("request_types") or ())
    if cls is not None:
        return cls(message)
    return RemoteError(rtype, message, str(info.get("traceback", "")))


__all__ = [
    "EdgeMLError", "EdgeMLTimeoutError", "EdgeMLConnectionError", "HandshakeError", "ProtocolError",
    "ClosedError", "MessageTooLargeError", "AddressInUseError", "InvalidArgumentError", "EncodeError",
    "DecodeError", "RemoteError", "UnknownInterfaceError", "InvalidKeyError", "UnknownRequestTypeError",
    "UnknownDataStoreError", "RateLimitError", "DeviceError",
]
