"""Helpers agentlace and the original edgeml kept in ``internal``:
``edgeml.internal.utils`` (JPEG helpers, ``compute_hash``)."""
from . import utils  # noqa: F401
