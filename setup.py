"""Build edgeml's C extension (edgeml._core) from csrc/.

libuv and msgpack-c come from the system and are found with pkg-config;
when they, pkg-config, a C compiler or Python's headers are missing the
build stops with one sentence naming the packages to install.
"""
import glob
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup

def pkg_config(*args):
    return subprocess.run(["pkg-config", *args], check=True, capture_output=True, text=True).stdout.split()


def _os_release():
    info = {}
    try:
        with open("/etc/os-release") as f:
            for line in f:
                key, sep, value = line.strip().partition("=")
                if sep:
                    info[key] = value.strip('"')
    except OSError:
        pass
    return info


def msgpack_package():
    """The Debian/Ubuntu package with msgpack-c's headers and .pc file:
    libmsgpack-dev up to Debian 12, libmsgpack-c-dev from Debian 13 on."""
    apt_cache = shutil.which("apt-cache")
    if apt_cache:
        for name in ("libmsgpack-c-dev", "libmsgpack-dev"):
            r = subprocess.run([apt_cache, "show", "--no-all-versions", name], capture_output=True, text=True)
            if r.returncode == 0 and "Package:" in r.stdout:
                return name
    osr = _os_release()
    major = osr.get("VERSION_ID", "").split(".")[0]
    if osr.get("ID") == "debian" and major.isdigit():
        return "libmsgpack-c-dev" if int(major) >= 13 else "libmsgpack-dev"
    return "libmsgpack-dev (libmsgpack-c-dev on Debian 13 and newer)"


def _have_compiler():
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    words = shlex.split(cc)
    return bool(words) and shutil.which(words[0]) is not None


def _have_header(name, dirs=("/usr/include", "/usr/local/include")):
    if any(os.path.exists(os.path.join(d, name)) for d in dirs):
        return True
    return any(os.path.exists(p) for p in glob.glob(os.path.join("/usr/include", "*-linux-gnu*", name)))


def stop(missing):
    """Exit with one sentence: what is missing, and the apt-get line that
    installs it."""
    what = [w for w, _ in missing]
    what = what[0] if len(what) == 1 else ", ".join(what[:-1]) + " and " + what[-1]
    pkgs = " ".join(p for _, p in missing)
    sudo = "" if hasattr(os, "geteuid") and os.geteuid() == 0 else "sudo "
    sys.exit(f"edgeml: cannot build its C extension without {what}: on Debian or Ubuntu install "
             f"{'it' if len(missing) == 1 else 'them'} with `{sudo}apt-get install {pkgs}`, then run pip again.")


def find_deps():
    """Compiler flags for libuv and msgpack-c, from pkg-config; stops with
    one sentence naming the packages to install when the compiler, Python's
    headers, pkg-config or the libraries are missing."""
    missing = []
    if not _have_compiler():
        missing.append(("a C compiler", "gcc"))
    elif sys.platform.startswith("linux") and not _have_header("stdio.h"):
        missing.append(("the C library's headers", "libc6-dev"))
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        missing.append((f"Python {sys.version_info[0]}.{sys.version_info[1]}'s headers (Python.h)", "python3-dev"))
    msgpack = None
    if shutil.which("pkg-config") is None:
        missing.append(("pkg-config", "pkg-config"))
        have_uv, have_msgpack = _have_header("uv.h"), _have_header("msgpack.h")
    else:
        for name in ("msgpack-c", "msgpack"):
            if subprocess.run(["pkg-config", "--exists", name]).returncode == 0:
                msgpack = name
                break
        have_uv = subprocess.run(["pkg-config", "--exists", "libuv"]).returncode == 0
        have_msgpack = msgpack is not None
    if not have_uv:
        missing.append(("libuv", "libuv1-dev"))
    if not have_msgpack:
        missing.append(("msgpack-c", msgpack_package()))
    if missing:
        stop(missing)
    cflags = pkg_config("--cflags", "libuv", msgpack)
    libs = pkg_config("--libs", "libuv", msgpack)
    return cflags, libs


here = os.path.dirname(os.path.abspath(__file__))
sources = []
for layer in ("base", "wire", "net", "timing", "rpc", "proto", "cuda", "batch", "python"):
    sources += sorted(glob.glob(os.path.join("csrc", layer, "*.c")))

cflags, libs = find_deps()
extra_compile = ["-std=gnu11", "-O2", "-fvisibility=hidden", "-Wall", "-Wextra", "-Wno-unused-parameter",
                 "-Wno-missing-field-initializers", "-D_GNU_SOURCE"] + cflags
extra_link = libs + ["-lpthread", "-lm", "-ldl"]
if os.environ.get("EDGEML_SANITIZE") == "asan":
    extra_compile += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    extra_link += ["-fsanitize=address,undefined"]
elif os.environ.get("EDGEML_SANITIZE") == "tsan":
    extra_compile += ["-fsanitize=thread", "-fno-omit-frame-pointer"]
    extra_link += ["-fsanitize=thread"]

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
