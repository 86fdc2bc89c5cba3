"""edgeml: fast, reliable data streams between edge devices and GPU compute.

Every public class is importable from here; see README.md."""
from . import _codec  # noqa: F401  (installs the codec hooks first)
from ._codec import decode_frame, encode_frame
from .errors import (AddressInUseError, ClosedError, DecodeError, EdgeMLConnectionError, EdgeMLError,
                     EdgeMLTimeoutError, EncodeError, HandshakeError, InvalidArgumentError,
                     MessageTooLargeError, ProtocolError, RemoteError, UnknownInterfaceError)
from .inference import InferenceClient, InferenceServer

__version__ = "0.1.0"

__all__ = [
    "InferenceServer", "InferenceClient",
    "EdgeMLError", "EdgeMLTimeoutError", "EdgeMLConnectionError", "HandshakeError", "ProtocolError",
    "ClosedError", "MessageTooLargeError", "AddressInUseError", "InvalidArgumentError", "EncodeError",
    "DecodeError", "RemoteError", "UnknownInterfaceError", "encode_frame", "decode_frame",
]
