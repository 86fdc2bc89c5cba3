"""The pyzmq reference stacks' codecs: object <-> list of zmq frames.

Each is the best reasonable way to use that serializer with pyzmq, so the
comparison is with pyzmq at its best, not at its default:

  pickle      pickle protocol 5 with out-of-band buffers: arrays of 64 KiB
              or more travel as their own zmq frames, sent without a copy
              (send_multipart(copy=False)) and unpickled as views of the
              received frames (recv_multipart(copy=False)); smaller ones
              stay in the pickle. A payload without large arrays is one frame.
  msgpack     msgpack with the same out-of-band scheme: a large array is a
              {"__nd__": frame index, dtype, shape} map in the msgpack body
              and its bytes are a frame of their own (np.frombuffer on
              receipt); small arrays are in-band {"__nd__": -1, ..., data}.
              numpy scalars are sent as Python scalars.
  pyobj       pickle with its default protocol, in band, one frame, sent and
              received with copies: socket.send_pyobj / recv_pyobj. Not a
              reference the targets are judged against (it is pyzmq below its
              best); bench/suite shows it for the round trips, for context.
  lz4pickle   what the predecessor (agentlace, edgeml on ZeroMQ) ships:
              one frame, lz4.frame.compress(pickle.dumps(obj)) with pickle's
              default protocol; lz4.frame.decompress + pickle.loads.

Transport (see send/recv): small messages (the 64 B and 100 KB payloads) are
one frame, everything in band (encode(obj, oob=False)), sent and received
with copies, plainly (sock.send(b) / sock.recv(): measured faster than
zero-copy at 100 KB, and than checking RCVMORE after each recv); large
messages (4 MB and up) are multipart with out-of-band arrays, copy=False
both ways.
"""
from __future__ import annotations

import pickle

import numpy as np

OOB_MIN = 64 * 1024  # arrays at least this large travel out of band
HELLO = b"HELLO"     # a broadcast publisher's sync message (never a codec frame)


def _pickle_encode(obj, oob=True):
    if not oob:
        return [pickle.dumps(obj, protocol=5)]
    bufs = []

    def cb(pb):
        if pb.raw().nbytes < OOB_MIN:
            return True  # in band
        bufs.append(pb)
        return False

    head = pickle.dumps(obj, protocol=5, buffer_callback=cb)
    return [head, *bufs]


def _pickle_decode(frames):
    return pickle.loads(frames[0], buffers=frames[1:])


def _mp_encode(obj, oob=True):
    import msgpack
    bufs = []

    def default(o):
        if isinstance(o, np.ndarray):
            a = np.ascontiguousarray(o)
            if oob and a.nbytes >= OOB_MIN:
                bufs.append(a)
                return {"__nd__": len(bufs), "dtype": a.dtype.str, "shape": list(a.shape)}
            return {"__nd__": -1, "dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}
        if isinstance(o, np.generic):
            return o.item()
        raise TypeError(f"cannot msgpack {type(o).__name__}")

    head = msgpack.packb(obj, default=default, use_bin_type=True)
    return [head, *bufs]


def _mp_decode(frames):
    import msgpack

    def hook(d):
        i = d.get("__nd__")
        if i is None:
            return d
        buf = d["data"] if i == -1 else frames[i]
        return np.frombuffer(buf, dtype=np.dtype(d["dtype"])).reshape(d["shape"])

    return msgpack.unpackb(frames[0], object_hook=hook, raw=False, strict_map_key=False)


def _pyobj_encode(obj, oob=False):
    return [pickle.dumps(obj, pickle.DEFAULT_PROTOCOL)]


def _pyobj_decode(frames):
    return pickle.loads(frames[0])


def _lz4_encode(obj, oob=False):
    import lz4.frame
    return [lz4.frame.compress(pickle.dumps(obj))]


def _lz4_decode(frames):
    import lz4.frame
    return pickle.loads(lz4.frame.decompress(frames[0]))


CODECS = {"pickle": (_pickle_encode, _pickle_decode),
          "msgpack": (_mp_encode, _mp_decode),
          "pyobj": (_pyobj_encode, _pyobj_decode),
          "lz4pickle": (_lz4_encode, _lz4_decode)}


def codec(name):
    return CODECS[name]


def send(sock, frames, zero_copy):
    """Send a message. zero_copy (large messages): its frames, copy=False.
    Else (small messages) the one frame an encoder makes with oob=False,
    plainly: sock.send(bytes)."""
    if zero_copy:
        sock.send_multipart(frames, copy=False)
    else:
        sock.send(frames[0])


def recv(sock, zero_copy):
    """Receive one message as a list of buffers: memoryviews of its zmq
    frames (zero_copy), else [bytes] of its one frame (sock.recv())."""
    if zero_copy:
        return [f.buffer for f in sock.recv_multipart(copy=False)]
    return [sock.recv()]
