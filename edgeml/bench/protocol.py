"""The benchmark protocol on edgeml's wire (docs/bench.md, "Protocol").

The Edge AI tester's messages (``seeds/002``), each an interface of an
``InferenceServer`` named ``bench.<TYPE>``; every reply is a map whose
``"status"`` is ``"OK"`` or ``"ERROR"`` (with ``"error"``, the reason):

======== ============================================== ==========================================
message  request                                        OK reply
======== ============================================== ==========================================
HELLO    ``{}``                                         ``{"protocol", "runtimes", "target"}``
MODEL    ``{"session", "offset", "total", "chunk",      first chunk: ``{"session"}``; the last:
         "format", "name", "sha256"}``                  ``{"inputs", "outputs", "runtime",
                                                        "load_s"}`` (the model is loaded)
DATA     ``{"session", "inputs": {name: ndarray}}``     ``{}`` (checked against the model, kept)
PROCESS  ``{"session"}``                                ``{"target_s", "timestamp_ns"}``
OUTPUT   ``{"session"}``                                ``{"outputs": {name: ndarray}}``
STATS    ``{"session", "since": i}``                    ``{"samples": {...}, "next": j, "gpu": str,
                                                        "hz", "inferences", "sampling_error"}``
END      ``{"session", "since": i}``                    like STATS, plus ``"target_inference_step"``
                                                        (every PROCESS's time); the session is gone
======== ============================================== ==========================================

The seed's PROCESS answers twice (OK when inference starts, OK when it
ends) so that the host can time it; here the target times the inference
itself (``target_s``) and the host times the round trip of the PROCESS call,
so one reply carries both.

A model of any size travels as MODEL chunks (``offset`` increasing, each at
most ``CHUNK_BYTES``) into a file on the target; the last chunk's
``sha256`` is that of the whole model.
"""
from __future__ import annotations

PROTOCOL_VERSION = 1
PREFIX = "bench."
HELLO = PREFIX + "HELLO"
MODEL = PREFIX + "MODEL"
DATA = PREFIX + "DATA"
PROCESS = PREFIX + "PROCESS"
OUTPUT = PREFIX + "OUTPUT"
STATS = PREFIX + "STATS"
END = PREFIX + "END"
MESSAGES = (HELLO, MODEL, DATA, PROCESS, OUTPUT, STATS, END)

OK = "OK"
ERROR = "ERROR"

CHUNK_BYTES = 4 << 20  # one MODEL message's share of the model
SAMPLE_HZ = 10.0  # target statistics while a session is open

# The measurement names Kenning uses for the same quantities (its JSON).
K_TARGET_STEP = "target_inference_step"  # s, timed on the target
K_PROTOCOL_STEP = "protocol_inference_step"  # s, PROCESS round trip timed on the host
K_CPUS = "session_utilization_cpus_percent"  # per sample, a list of per-core %
K_MEM = "session_utilization_mem_percent"
K_GPU = "session_utilization_gpu_utilization"
K_GPU_MEM = "session_utilization_gpu_mem_utilization"
K_UTIL_TS = "session_utilization_timestamp"  # ns, target clock


def ok(**fields) -> dict:
    fields["status"] = OK
    return fields


def error(reason: str) -> dict:
    return {"status": ERROR, "error": reason}
