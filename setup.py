"""Build edgeml's C extension (edgeml._core) from csrc/.

libuv and msgpack-c come from the system and are found with pkg-config;
when they are missing the build stops with one sentence saying what to
install.
"""
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup

MISSING = (
    "edgeml needs the system libraries libuv and msgpack-c: install them with "
    "`sudo apt-get install libuv1-dev libmsgpack-dev` (on Debian 13 and newer: "
    "libmsgpack-c-dev) and run pip again."
)


def pkg_config(*args):
    return subprocess.run(["pkg-config", *args], check=True, capture_output=True, text=True).stdout.split()


def find_deps():
    if shutil.which("pkg-config") is None:
        sys.exit("edgeml: pkg-config not found. " + MISSING)
    msgpack = None
    for name in ("msgpack-c", "msgpack"):
        if subprocess.run(["pkg-config", "--exists", name]).returncode == 0:
            msgpack = name
            break
    if msgpack is None or subprocess.run(["pkg-config", "--exists", "libuv"]).returncode != 0:
        sys.exit("edgeml: " + MISSING)
    cflags = pkg_config("--cflags", "libuv", msgpack)
    libs = pkg_config("--libs", "libuv", msgpack)
    return cflags, libs


here = os.path.dirname(os.path.abspath(__file__))
sources = []
for layer in ("base", "wire", "net", "rpc", "python"):
    sources += sorted(glob.glob(os.path.join("csrc", layer, "*.c")))

cflags, libs = find_deps()
extra_compile = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                 "-Wno-missing-field-initializers", "-D_GNU_SOURCE"] + cflags
extra_link = libs + ["-lpthread", "-lm"]
if os.environ.get("EDGEML_SANITIZE") == "asan":
    extra_compile += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    extra_link += ["-fsanitize=address,undefined"]

setup(
    ext_modules=[
        Extension(
            "edgeml._core",
            sources=sources,
            include_dirs=["csrc/include"],
            extra_compile_args=extra_compile,
            extra_link_args=extra_link,
        )
    ],
)
