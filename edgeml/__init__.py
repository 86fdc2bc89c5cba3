"""edgeml: fast, reliable data streams between edge devices and GPU compute.

Every public class is importable from here; see README.md. agentlace names
(ActionConfig, ActionServer, ActionClient) are aliases of the Edge classes,
and agentlace's module paths work (edgeml.action, edgeml.trainer,
edgeml.inference, edgeml.data.data_store, edgeml.gym_env,
edgeml.internal.utils); docs/migrating.md lists every difference.
"""
from . import _codec  # noqa: F401  (installs the codec hooks first)
from ._codec import decode_frame, encode_frame
from .data import DataStoreBase, PersistentDataStore, QueuedDataStore
from .edge import ActionClient, ActionConfig, ActionServer, EdgeClient, EdgeConfig, EdgeServer
from .errors import (AddressInUseError, ClosedError, DecodeError, EdgeMLConnectionError, EdgeMLError,
                     EdgeMLTimeoutError, EncodeError, HandshakeError, InvalidArgumentError, InvalidKeyError,
                     MessageTooLargeError, ProtocolError, RateLimitError, DeviceError, RemoteError, UnknownDataStoreError,
                     UnknownInterfaceError, UnknownRequestTypeError)
from ._base import servers, stop_servers
from .inference import InferenceClient, InferenceServer
from .trainer import TrainerClient, TrainerConfig, TrainerServer, TrainerSMInterface
from . import action, data, internal  # noqa: F401,E402  (agentlace's module paths; edgeml.gym_env needs gymnasium)

__version__ = "0.1.0"

__all__ = [
    "servers", "stop_servers",
    "EdgeConfig", "EdgeServer", "EdgeClient", "ActionConfig", "ActionServer", "ActionClient",
    "TrainerConfig", "TrainerServer", "TrainerClient", "TrainerSMInterface",
    "InferenceServer", "InferenceClient",
    "DataStoreBase", "QueuedDataStore", "PersistentDataStore",
    "EdgeMLError", "EdgeMLTimeoutError", "EdgeMLConnectionError", "HandshakeError", "ProtocolError",
    "ClosedError", "MessageTooLargeError", "AddressInUseError", "InvalidArgumentError", "EncodeError",
    "DecodeError", "RemoteError", "UnknownInterfaceError", "InvalidKeyError", "UnknownRequestTypeError",
    "UnknownDataStoreError", "RateLimitError", "DeviceError", "encode_frame", "decode_frame",
]
