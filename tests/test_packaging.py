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
