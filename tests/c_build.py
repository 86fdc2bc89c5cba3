"""Build libedgeml the way a C user does: `make install` into a temporary
prefix, then compile programs against it with pkg-config alone (no path
into csrc/). Shared by the tests of the C examples.

    prefix = installed_prefix(tmp_root, san=None | "asan")
    exe = build_program(prefix, "examples/c/robot_server.c", san=None)
    run_env(prefix, san)  -> the environment to run such a program in

Each (san) prefix is built once per test session (cached in a module
global); the ASan prefix builds the library with SAN=asan and compiles the
programs with -fsanitize=address,undefined."""
import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SAN_FLAGS = {None: [], "asan": ["-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                                "-fno-sanitize-recover=undefined"]}
_prefixes = {}


def installed_prefix(tmp_root, san=None):
    """make install of libedgeml (SAN=san) into tmp_root/prefix-<san>."""
    if san in _prefixes:
        return _prefixes[san]
    if shutil.which("make") is None or shutil.which("cc") is None or shutil.which("pkg-config") is None:
        raise RuntimeError("make, cc and pkg-config are needed to build libedgeml")
    tag = san or "plain"
    build = os.path.join(str(tmp_root), f"build-{tag}")
    prefix = os.path.join(str(tmp_root), f"prefix-{tag}")
    cmd = ["make", "-C", CSRC, f"BUILD={build}", f"PREFIX={prefix}", "-j2", "install"]
    if san:
        cmd.insert(3, f"SAN={san}")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"make install failed:\n{(r.stdout + r.stderr)[-4000:]}")
    if "warning:" in r.stderr:
        raise RuntimeError(f"the library builds with warnings:\n{r.stderr[-4000:]}")
    _prefixes[san] = prefix
    return prefix


def pkg_config_env(prefix):
    env = dict(os.environ)
    env["PKG_CONFIG_PATH"] = os.path.join(prefix, "lib", "pkgconfig") + os.pathsep + env.get("PKG_CONFIG_PATH", "")
    return env


def build_program(prefix, source, san=None, extra=()):
    """Compile one C file against the installed library, as a user would:
    cc prog.c $(pkg-config --cflags --libs edgeml). Returns the executable."""
    env = pkg_config_env(prefix)
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "edgeml"], capture_output=True, text=True,
                           env=env, check=True).stdout.split()
    src = source if os.path.isabs(source) else os.path.join(ROOT, source)
    exe = os.path.join(prefix, "bin", os.path.splitext(os.path.basename(src))[0])
    os.makedirs(os.path.dirname(exe), exist_ok=True)
    cmd = ["cc", "-std=c11", "-D_GNU_SOURCE", "-O1", "-g", "-Wall", "-Wextra", "-Werror", *SAN_FLAGS[san], src,
           "-o", exe, *flags, "-lpthread", "-lm", f"-Wl,-rpath,{os.path.join(prefix, 'lib')}", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout}{r.stderr}")
    return exe


def run_env(prefix, san=None):
    """Environment for running a program built by build_program."""
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.path.join(prefix, "lib")
    if san == "asan":
        env["ASAN_OPTIONS"] = "detect_leaks=1:abort_on_error=0:exitcode=99"
        env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1:exitcode=98"
    env.pop("LD_PRELOAD", None)
    return env
