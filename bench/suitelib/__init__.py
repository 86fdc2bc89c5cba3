"""Helpers for bench/suite: process management and statistics (common),
the pyzmq codecs (codecs), payloads (payloads) and the code each child
process runs (roles). Nothing here is part of the edgeml package."""
