"""Build the fake CUDA runtime (fake_cudart.c) into a shared library.

    python tests/fake_cudart/build.py [OUTDIR]    # prints the library's path

From Python: ``build(outdir)`` returns the path. The library is for tests
only (point $EDGEML_CUDART at it); it is never part of an install. It is
rebuilt only when fake_cudart.c is newer than the library."""
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "fake_cudart.c")
NAME = "libfake_cudart.so"


def build(outdir=None):
    outdir = outdir or os.path.join(tempfile.gettempdir(), "edgeml-fake-cudart")
    os.makedirs(outdir, exist_ok=True)
    out = os.path.join(outdir, NAME)
    if os.path.exists(out) and os.path.getmtime(out) >= os.path.getmtime(SRC):
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or "gcc"
    tmp = out + f".{os.getpid()}.tmp"
    cmd = [cc, "-std=c11", "-O1", "-g", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Wextra",
           "-o", tmp, SRC, "-lpthread"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or "warning" in r.stderr:
        raise RuntimeError("building the fake CUDA runtime failed:\n" + " ".join(cmd) + "\n" + r.stderr)
    os.replace(tmp, out)  # atomic: a concurrent build never sees half a library
    return out


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else None))
