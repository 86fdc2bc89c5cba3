"""Datasets ``edgeml bench`` streams to a target (docs/bench.md, "Datasets").

A dataset is anything with ``__len__``, ``__iter__`` yielding
``(input, label)`` pairs (``input`` an ndarray, or a map of input name to
ndarray; ``label`` an int class index, or None when there is none), and a
``classes`` list of class names (empty when it is not a classification
set). Specs:

- ``digits``: scikit-learn's 8x8 digits (1797 images, 10 classes), each
  sample 64 float32 values in [0, 16]. Options: ``digits:shape=8x8`` (or
  ``1x8x8``) to reshape, ``digits:scale=0.0625`` to scale.
- ``images:DIR``: a folder with a subfolder per class (``DIR/cat/1.png``),
  classes in sorted order; options ``size=HxW`` (resize), ``layout=nchw``
  or ``nhwc`` (default ``hwc``, no batch axis), ``dtype=float32|uint8``,
  ``scale=F``, ``mean=a/b/c``, ``std=a/b/c``, ``gray``. Needs Pillow.
- ``module::object`` or ``path/file.py::object``: a plugin; a class is
  instantiated, a function is called, the result is used as a dataset.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np

_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def _options(spec: str, text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        key, eq, val = part.partition("=")
        out[key.strip()] = val.strip() if eq else True
    return out


def _floats(spec: str, key: str, text: Any) -> List[float]:
    try:
        return [float(v) for v in str(text).split("/")]
    except ValueError:
        raise ValueError(f"dataset {spec!r}: {key}= takes numbers separated by '/', got {text!r}") from None


def _shape(spec: str, key: str, text: Any) -> Tuple[int, ...]:
    try:
        dims = tuple(int(v) for v in str(text).lower().split("x"))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise ValueError(f"dataset {spec!r}: {key}= takes sizes like 8x8, got {text!r}")
    return dims


def _unknown(spec: str, opts: dict, known: Tuple[str, ...]) -> None:
    bad = sorted(set(opts) - set(known))
    if bad:
        raise ValueError(f"dataset {spec!r}: unknown option(s) {bad}; it takes {list(known)}")


class ArrayDataset:
    """Samples and labels in memory: ``ArrayDataset(x, y, classes)``."""

    def __init__(self, x: np.ndarray, y: Optional[np.ndarray] = None, classes: Optional[List[str]] = None,
                 name: str = "arrays"):
        self.x = x
        self.y = None if y is None else np.asarray(y)
        if self.y is not None and len(self.y) != len(self.x):
            raise ValueError(f"{len(self.x)} samples but {len(self.y)} labels")
        self.classes = list(classes or [])
        self.name = name

    def __len__(self) -> int:
        return len(self.x)

    def __iter__(self) -> Iterator[Tuple[np.ndarray, Optional[int]]]:
        for i in range(len(self.x)):
            yield self.x[i], (int(self.y[i]) if self.y is not None else None)

    def __repr__(self) -> str:
        return f"<{self.name}: {len(self)} samples of {self.x.shape[1:]} {self.x.dtype}, {len(self.classes)} classes>"


def digits(spec: str = "digits", **opts) -> ArrayDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise RuntimeError("the digits dataset needs scikit-learn: pip install scikit-learn "
                           "(or, in the edgeml checkout, pip install -e \".[modelbench]\")") from e
    _unknown(spec, opts, ("shape", "scale"))
    d = load_digits()
    x = d.data.astype(np.float32)
    if "scale" in opts:
        x = x * np.float32(_floats(spec, "scale", opts["scale"])[0])
    if "shape" in opts:
        shape = _shape(spec, "shape", opts["shape"])
        if int(np.prod(shape)) != 64:
            raise ValueError(f"dataset {spec!r}: shape= must hold 64 values (8x8), got {opts['shape']}")
        x = x.reshape((len(x),) + shape)
    return ArrayDataset(np.ascontiguousarray(x), d.target.astype(np.int64), [str(c) for c in d.target_names],
                        name="digits")


class ImageFolder:
    """Images in ``root/<class>/<file>``, classes in sorted order."""

    def __init__(self, root: str, spec: str = "", size: Optional[Tuple[int, int]] = None, layout: str = "hwc",
                 dtype: str = "float32", scale: Optional[float] = None, mean: Optional[List[float]] = None,
                 std: Optional[List[float]] = None, gray: bool = False):
        spec = spec or f"images:{root}"
        if not os.path.isdir(root):
            raise ValueError(f"dataset {spec!r}: no folder {os.path.abspath(root)}")
        try:
            from PIL import Image  # noqa: F401
        except ImportError as e:
            raise RuntimeError("image folders need Pillow: pip install pillow") from e
        if layout not in ("hwc", "chw", "nhwc", "nchw"):
            raise ValueError(f"dataset {spec!r}: layout= is hwc, chw, nhwc or nchw, got {layout!r}")
        if dtype not in ("float32", "uint8", "float16", "int8"):
            raise ValueError(f"dataset {spec!r}: dtype= is float32, float16, uint8 or int8, got {dtype!r}")
        self.root, self.size, self.layout, self.dtype = root, size, layout, dtype
        self.scale, self.mean, self.std, self.gray = scale, mean, std, gray
        self.classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.files: List[Tuple[str, int]] = []
        for ci, c in enumerate(self.classes):
            for f in sorted(os.listdir(os.path.join(root, c))):
                if f.lower().endswith(_IMAGE_EXT):
                    self.files.append((os.path.join(root, c, f), ci))
        if not self.files:
            raise ValueError(f"dataset {spec!r}: no images in {root} (expected {root}/<class>/<image>, "
                             f"files ending {', '.join(_IMAGE_EXT)})")
        self.name = f"images:{root}"

    def load(self, path: str) -> np.ndarray:
        from PIL import Image
        with Image.open(path) as im:
            im = im.convert("L" if self.gray else "RGB")
            if self.size is not None:
                im = im.resize((self.size[1], self.size[0]), Image.BILINEAR)
            a = np.asarray(im)
        if a.ndim == 2:
            a = a[:, :, None]
        if self.dtype.startswith("float"):
            a = a.astype(np.float32)
            if self.scale is not None:
                a = a * np.float32(self.scale)
            if self.mean is not None:
                a = a - np.asarray(self.mean, np.float32)
            if self.std is not None:
                a = a / np.asarray(self.std, np.float32)
            a = a.astype(self.dtype)
        else:
            a = a.astype(self.dtype)
        if self.layout in ("chw", "nchw"):
            a = a.transpose(2, 0, 1)
        if self.layout.startswith("n"):
            a = a[None]
        return np.ascontiguousarray(a)

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[Tuple[np.ndarray, int]]:
        for path, label in self.files:
            yield self.load(path), label

    def __repr__(self) -> str:
        return f"<images {self.root}: {len(self)} images, {len(self.classes)} classes>"


def images(spec: str, root: str, **opts) -> ImageFolder:
    _unknown(spec, opts, ("size", "layout", "dtype", "scale", "mean", "std", "gray"))
    size = _shape(spec, "size", opts["size"]) if "size" in opts else None
    if size is not None and len(size) != 2:
        raise ValueError(f"dataset {spec!r}: size= is HxW, got {opts['size']}")
    return ImageFolder(root, spec, size=size, layout=str(opts.get("layout", "hwc")),
                       dtype=str(opts.get("dtype", "float32")),
                       scale=_floats(spec, "scale", opts["scale"])[0] if "scale" in opts else None,
                       mean=_floats(spec, "mean", opts["mean"]) if "mean" in opts else None,
                       std=_floats(spec, "std", opts["std"]) if "std" in opts else None,
                       gray=bool(opts.get("gray", False)))


def load(spec: Any) -> Any:
    """The dataset a spec names (see the module's docstring), or ``spec``
    itself when it is already a dataset."""
    if not isinstance(spec, str):
        ds = spec
    elif "::" in spec:
        from ..profile import load_object
        ds = load_object(spec, "dataset")
        if callable(ds) and not hasattr(ds, "__iter__"):
            ds = ds()
    else:
        name, _, rest = spec.partition(":")
        if name == "digits":
            ds = digits(spec, **_options(spec, rest))
        elif name == "images":
            root, _, opts = rest.partition(",")
            if not root:
                raise ValueError(f"dataset {spec!r}: give the folder, images:DIR[,size=HxW,...]")
            ds = images(spec, root, **_options(spec, opts))
        else:
            raise ValueError(f"unknown dataset {spec!r}: digits, images:DIR[,options], or module::object "
                             f"(see docs/bench.md)")
    if not hasattr(ds, "__iter__"):
        raise TypeError(f"dataset {spec!r} is a {type(ds).__name__}: a dataset yields (input, label) pairs")
    return ds


def size(ds: Any) -> Optional[int]:
    try:
        return len(ds)
    except TypeError:
        return None


def classes(ds: Any) -> List[str]:
    return [str(c) for c in (getattr(ds, "classes", None) or [])]
