"""Packaging: a clear one-sentence stop when the system libraries are missing."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup_py(env=None, path=None):
    """``setup.py --name`` (which runs find_deps, as pip does) in a child."""
    env = {**{k: v for k, v in os.environ.items() if k != "CC"}, **(env or {})}
    if path is not None:
        env["PATH"] = path
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def one_sentence(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    [line] = [ln for ln in r.stderr.splitlines() if ln.startswith("edgeml:")]
    assert line.endswith("then run pip again.") and line.count("`") == 2
    return line


def test_setup_names_missing_system_packages():
    r = setup_py({"PKG_CONFIG_LIBDIR": "/nonexistent", "PKG_CONFIG_PATH": ""})
    line = one_sentence(r)
    assert "libuv1-dev" in line and ("libmsgpack-dev" in line or "libmsgpack-c-dev" in line)
    assert "gcc" not in line and "pkg-config`" not in line  # only what is missing


def test_setup_without_pkg_config_names_pkg_config(tmp_path):
    """With a compiler but no pkg-config: names the pkg-config package (it
    used to name only the libraries), and no raw compiler error follows."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler here to leave on PATH")
    (tmp_path / "gcc").symlink_to(gcc)
    line = one_sentence(setup_py(path=str(tmp_path)))
    assert "without pkg-config:" in line and "apt-get install pkg-config`" in line


def test_setup_without_a_compiler_says_so_up_front(tmp_path):
    line = one_sentence(setup_py(path=str(tmp_path)))  # nothing on PATH: no compiler, no pkg-config
    assert "a C compiler" in line and "pkg-config" in line and " gcc " in line
    line = one_sentence(setup_py({"CC": "no-such-cc -O2"}))  # $CC names a compiler that is not there
    assert "without a C compiler:" in line and "install gcc`" in line


def test_msgpack_package_by_release(tmp_path, monkeypatch):
    """libmsgpack-dev up to Debian 12, libmsgpack-c-dev from 13 on."""
    sys.path.insert(0, ROOT)
    try:
        src = open(os.path.join(ROOT, "setup.py")).read()
        ns = {"__name__": "not_main"}
        exec(compile(src.split("\nhere = os.path.dirname")[0], "setup.py", "exec"), ns)
    finally:
        sys.path.remove(ROOT)
    monkeypatch.setitem(ns, "shutil", __import__("types").SimpleNamespace(which=lambda name: None))
    for version, want in (("12", "libmsgpack-dev"), ("13", "libmsgpack-c-dev")):
        monkeypatch.setitem(ns, "_os_release", lambda v=version: {"ID": "debian", "VERSION_ID": v})
        assert ns["msgpack_package"]() == want


def test_package_root_exports():
    import edgeml
    for name in edgeml.__all__:
        assert hasattr(edgeml, name), name
    assert os.path.exists(os.path.join(ROOT, "edgeml", "py.typed"))


def test_every_subpackage_is_packaged():
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = set()
    for d, _dirs, files in os.walk(os.path.join(ROOT, "edgeml")):
        if "__init__.py" in files and "__pycache__" not in d:
            found.add(os.path.relpath(d, ROOT).replace(os.sep, "."))
    assert found == listed


# ------------------------------------------------ scripts/setup.sh, Python side

FAKE_PY = """#!/bin/bash
# Debian's python3 as a test double: externally managed, with pip, and
# without ensurepip (python3-venv) until the fake apt-get installs it
real={real}
state={state}
if [ "$1" = -c ] && [[ "$2" == *EXTERNALLY-MANAGED* ]]; then exit 0; fi
if [ "$1" = -m ] && [ "$2" = venv ] && [ ! -e "$state/python3-venv" ]; then
  "$real" -m venv --without-pip "$3"  # what Debian leaves behind: a .venv without pip
  echo "The virtual environment was not created successfully because ensurepip is not available." >&2
  exit 1
fi
if [ "$1" = -m ] && [ "$2" = pip ] && [ "$3" = install ]; then
  echo "error: externally-managed-environment" >&2
  exit 1
fi
exec "$real" "$@"
"""

FAKE_APT = """#!/bin/bash
echo "apt-get $*" >> {state}/apt.log
for a in "$@"; do [ "$a" = python3-venv ] && touch {state}/python3-venv; done
exit 0
"""


@pytest.fixture
def fake_checkout(tmp_path):
    """A checkout with edgeml's scripts/ and a tiny pure-Python package, a
    python3 that behaves like Debian 12's, and apt-get/sudo stand-ins."""
    co, state, bin_ = tmp_path / "co", tmp_path / "state", tmp_path / "bin"
    for d in (co / "scripts", state, bin_):
        d.mkdir(parents=True)
    for name in ("setup.sh", "python.sh"):
        shutil.copy(os.path.join(ROOT, "scripts", name), co / "scripts" / name)
    (co / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools>=61"]\n'
                                       'build-backend = "setuptools.build_meta"\n[project]\nname = "fakepkg"\n'
                                       'version = "0"\n[project.optional-dependencies]\ntest = []\n'
                                       '[tool.setuptools]\npy-modules = ["fakepkg"]\n')
    (co / "fakepkg.py").write_text("OK = 1\n")
    for name, text in (("python3", FAKE_PY.format(real=sys.executable, state=state)),
                       ("apt-get", FAKE_APT.format(state=state)),
                       ("apt-cache", "#!/bin/bash\nexit 1\n"),
                       ("sudo", '#!/bin/bash\nexec "$@"\n')):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "PYTHON": str(bin_ / "python3")}
    env.pop("VIRTUAL_ENV", None)

    def run(*args):
        r = subprocess.run(["bash", "scripts/setup.sh", *args], cwd=co, env=env, capture_output=True, text=True,
                           timeout=300)
        apt = (state / "apt.log").read_text() if (state / "apt.log").exists() else ""
        return r, apt

    def importable():
        return subprocess.run([str(co / ".venv" / "bin" / "python"), "-c", "import fakepkg"],
                              cwd=tmp_path, capture_output=True).returncode == 0

    return co, run, importable


@pytest.mark.timeout(600)
def test_setup_sh_with_pip_but_without_python3_venv(fake_checkout):
    co, run, importable = fake_checkout
    r, apt = run("demo")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "install -y -qq python3-venv" in apt  # venv failed for want of ensurepip: installed it, made .venv again
    assert "clang" not in apt and "iproute2" not in apt  # the demo installs what the demo needs
    assert '== installing edgeml (pip install -e ".")' in r.stdout
    assert importable()
    assert ". .venv/bin/activate" in r.stdout  # says what to run before the README's other commands
    # again: nothing to install, the same .venv
    r, apt2 = run("demo")
    assert r.returncode == 0, r.stdout + r.stderr
    assert apt2 == apt and "making it again" not in r.stdout and importable()


@pytest.mark.timeout(600)
def test_setup_sh_remakes_a_half_made_venv(fake_checkout):
    """A .venv with a python but no pip, as an earlier run leaves it when
    venv failed for want of ensurepip."""
    co, run, importable = fake_checkout
    (co.parent / "state" / "python3-venv").touch()  # python3-venv is there this time
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(co / ".venv")], check=True)
    r, apt = run("test")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "making it again" in r.stdout
    assert '== installing edgeml (pip install -e ".[test]")' in r.stdout
    assert importable() and ". .venv/bin/activate" in r.stdout


def test_setup_sh_refuses_an_unknown_mode(fake_checkout):
    co, run, _ = fake_checkout
    r, _ = run("everything")
    assert r.returncode == 2 and "usage: scripts/setup.sh [demo|test]" in r.stderr


# --------------------------------------------------------- make install (C)

@pytest.mark.timeout(300)
@pytest.mark.parametrize("on_path", [False, True])
def test_make_install_updates_the_loader_cache(tmp_path, on_path):
    """`make -C csrc install` as root runs ldconfig itself, and says what to
    do where the prefix is not on the loader's path; the real ldconfig is
    replaced by a recorder so the test leaves the system alone."""
    if shutil.which("make") is None or shutil.which("cc") is None:
        pytest.skip("needs make and a C compiler")
    prefix, fake = tmp_path / "prefix", tmp_path / "bin"
    fake.mkdir()
    cache = f"\tlibedgeml.so (libc6,x86-64) => {prefix}/lib/libedgeml.so" if on_path else ""
    (fake / "ldconfig").write_text(f'#!/bin/bash\necho "ldconfig $*" >> {tmp_path}/ldconfig.log\n'
                                   f'[ "$1" = -p ] && printf "%s\\n" "{cache}"\nexit 0\n')
    (fake / "ldconfig").chmod(0o755)
    r = subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "csrc"), "install", f"PREFIX={prefix}",
                        f"BUILD={tmp_path / 'build'}", "-j4"], capture_output=True, text=True, timeout=280,
                       env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stdout + r.stderr
    for f in ("lib/libedgeml.so", "lib/libedgeml.a", "include/edgeml.h", "lib/pkgconfig/edgeml.pc"):
        assert (prefix / f).exists(), f
    log = (tmp_path / "ldconfig.log").read_text() if (tmp_path / "ldconfig.log").exists() else ""
    if os.geteuid() != 0:
        assert log == "" and "run ldconfig as root" in r.stdout
        return
    assert log.splitlines()[0] == "ldconfig "  # the cache rebuilt, as root
    note = "is not on the loader's path" in r.stdout
    assert note != on_path
    if note:
        assert f"LD_LIBRARY_PATH={prefix}/lib" in r.stdout
    # a staged install (DESTDIR, for packaging) leaves the cache to the package manager
    os.remove(tmp_path / "ldconfig.log")
    r = subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "csrc"), "install", "PREFIX=/usr/local",
                        f"DESTDIR={tmp_path / 'stage'}", f"BUILD={tmp_path / 'build'}"], capture_output=True,
                       text=True, timeout=280, env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "stage" / "usr" / "local" / "lib" / "libedgeml.so").exists()
    assert not (tmp_path / "ldconfig.log").exists() and "note" not in r.stdout


def test_docs_never_install_edgeml_from_the_index():
    """PyPI's `edgeml` is another project: extras install from the checkout
    (pip install -e ".[bench]"), never as pip install "edgeml[...]"."""
    import re
    bad = re.compile(r"""pip3?\s+install\s+(-U\s+|--upgrade\s+)?["']?edgeml\b""")
    found = []
    for top in ("README.md", "docs", "edgeml", "examples", "scripts", "bench", "csrc"):
        path = os.path.join(ROOT, top)
        files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
        for f in files:
            if not f.endswith((".md", ".py", ".sh", ".txt", ".ipynb", ".toml")) and "bench" not in f:
                continue
            try:
                text = open(f, encoding="utf-8").read()
            except (UnicodeDecodeError, OSError):
                continue
            found += [f"{os.path.relpath(f, ROOT)}: {m.group(0)}" for m in bad.finditer(text)]
    assert not found


@pytest.mark.timeout(300)
def test_core_stubs_match_the_extension(tmp_path):
    """edgeml/_core.pyi names exactly what the built edgeml._core has, with
    the right kinds (mypy's stubtest)."""
    pytest.importorskip("mypy.stubtest", reason="mypy is in the test extra")
    cfg = tmp_path / "stubtest.ini"
    cfg.write_text("[mypy]\nfollow_imports = silent\ncache_dir = %s\n"
                   "[mypy-edgeml.*]\nignore_errors = True\n"      # the package's own typing is not what is checked
                   "[mypy-edgeml._core]\nignore_errors = False\n" % (tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "mypy.stubtest", "edgeml._core", "--mypy-config-file", str(cfg)],
                       cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "Success" in r.stdout
