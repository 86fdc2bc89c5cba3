"""The original edgeml's ``edgeml.interfaces`` module (every role in one
module): the same classes as ``edgeml.edge``, ``edgeml.action`` and
``edgeml.inference``."""
from .edge import ActionClient, ActionConfig, ActionServer, EdgeClient, EdgeConfig, EdgeServer
from .inference import InferenceClient, InferenceServer

__all__ = ["EdgeConfig", "EdgeServer", "EdgeClient", "ActionConfig", "ActionServer", "ActionClient",
           "InferenceServer", "InferenceClient"]
