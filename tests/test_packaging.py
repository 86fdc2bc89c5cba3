"""Packaging: a clear one-sentence stop when the system libraries are missing."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_setup_names_missing_system_packages():
    env = {**os.environ, "PKG_CONFIG_LIBDIR": "/nonexistent", "PKG_CONFIG_PATH": ""}
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "libuv1-dev" in r.stderr and "libmsgpack-dev" in r.stderr
    assert "Traceback" not in r.stderr


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
