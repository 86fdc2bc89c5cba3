"""agentlace's ``agentlace.internal.utils``: JPEG helpers for camera images
and ``compute_hash``.

``mat_to_jpeg`` / ``jpeg_to_mat`` use OpenCV (``cv2``) when it is installed
and Pillow otherwise; without either they raise ImportError naming what to
install. Images are in OpenCV's channel order (BGR), with either library,
so code written for agentlace sees the same arrays.

Not carried over: ``make_compression_method`` (it pickles and unpickles;
``pickle.loads`` of bytes from the network runs code, and edgeml sends
arrays as they are, without pickle).
"""
from __future__ import annotations

import hashlib
import io
import pickle
import sys
from typing import Any

import numpy as np

JPEG_QUALITY = 95  # OpenCV's default, used for Pillow too

_MISSING = ("{what} needs an image library and neither OpenCV nor Pillow is installed: "
            "pip install opencv-python-headless (or: pip install Pillow; from the edgeml checkout: "
            "pip install -e '.[image]')")


def _backend(what: str):
    """('cv2', module) or ('pil', PIL.Image); ImportError naming both."""
    try:
        import cv2  # type: ignore
        return "cv2", cv2
    except ImportError:
        pass
    try:
        from PIL import Image  # type: ignore
        return "pil", Image
    except ImportError:
        pass
    raise ImportError(_MISSING.format(what=what))


def _check_image(img: Any) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype != np.uint8:
        raise TypeError(f"a JPEG image must be uint8, got dtype {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)) or a.size == 0:
        raise ValueError(f"a JPEG image must be HxW (gray) or HxWx3 (BGR), got shape {a.shape}")
    return a


def mat_to_jpeg(img: Any) -> bytes:
    """Compress an image (uint8, HxW gray or HxWx3 in BGR order, as OpenCV
    holds it) into JPEG bytes."""
    a = _check_image(img)
    kind, lib = _backend("mat_to_jpeg")
    if kind == "cv2":
        ok, buf = lib.imencode(".jpg", a, [int(lib.IMWRITE_JPEG_QUALITY), JPEG_QUALITY])
        if not ok:
            raise ValueError("OpenCV could not encode the image as JPEG")
        return buf.tobytes()
    rgb = a if a.ndim == 2 else np.ascontiguousarray(a[:, :, ::-1])
    out = io.BytesIO()
    lib.fromarray(rgb).save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def jpeg_to_mat(buf: Any) -> np.ndarray:
    """Decompress JPEG bytes into an HxWx3 uint8 image in BGR order (gray
    JPEGs too, as OpenCV's ``IMREAD_COLOR`` gives them). Raises ValueError
    for bytes that are not an image (OpenCV alone returned None)."""
    data = np.frombuffer(buf, dtype=np.uint8) if not isinstance(buf, np.ndarray) else buf.reshape(-1).view(np.uint8)
    kind, lib = _backend("jpeg_to_mat")
    if kind == "cv2":
        img = lib.imdecode(data, lib.IMREAD_COLOR) if data.size else None
        if img is None:
            raise ValueError(f"not a JPEG image ({data.size} bytes)")
        return img
    try:
        with lib.open(io.BytesIO(data.tobytes())) as im:
            rgb = np.asarray(im.convert("RGB"))
    except Exception as e:  # PIL.UnidentifiedImageError, truncated data, ...
        raise ValueError(f"not a JPEG image ({data.size} bytes): {e}") from e
    return np.ascontiguousarray(rgb[:, :, ::-1])


def compute_hash(obj: Any) -> str:
    """MD5 hex digest of ``pickle.dumps(obj)``, as agentlace computed it (a
    local fingerprint; nothing is unpickled)."""
    return hashlib.md5(pickle.dumps(obj)).hexdigest()


def print_size(obj: Any) -> None:
    print(f"The size of the object is {sys.getsizeof(obj) / 1024 ** 2} MB")


def print_error(text: str) -> None:
    print(f"\033[91m{text}\033[00m")


def print_warning(text: str) -> None:
    print(f"\033[93m{text}\033[00m")


__all__ = ["mat_to_jpeg", "jpeg_to_mat", "compute_hash", "print_size", "print_error", "print_warning"]
