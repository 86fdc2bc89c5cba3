#!/usr/bin/env bash
# Installs what edgeml needs on a Debian/Ubuntu machine, then edgeml itself
# (editable, with the test extras). Safe to run any number of times.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

have_libs() {
  pkg-config --exists libuv 2>/dev/null &&
    { pkg-config --exists msgpack-c 2>/dev/null || pkg-config --exists msgpack 2>/dev/null; }
}

if ! have_libs || ! command -v cc >/dev/null || ! command -v make >/dev/null; then
  echo "== installing system packages (libuv, msgpack-c, compiler)"
  $SUDO apt-get update -qq
  msgpack_pkg=libmsgpack-dev
  if ! apt-cache show libmsgpack-dev >/dev/null 2>&1; then msgpack_pkg=libmsgpack-c-dev; fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    pkg-config build-essential libuv1-dev "$msgpack_pkg" >/dev/null
fi

# iproute2 (ip, tc) for the timing tests over shaped links in network
# namespaces; they are skipped, saying why, where namespaces are not allowed
if [ "$(id -u)" = 0 ] && { ! command -v ip >/dev/null || ! command -v tc >/dev/null; }; then
  echo "== installing iproute2 (ip, tc)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 >/dev/null
fi

# clang with libFuzzer for the fuzz targets (csrc/fuzz, tests/test_fuzz.py);
# without it those tests are skipped, saying why
if [ "$(id -u)" = 0 ] && ! bash csrc/fuzz/build.sh --check >/dev/null 2>&1; then
  apt-get update -qq
  clang_pkgs=""
  if apt-cache show clang-14 >/dev/null 2>&1 && apt-cache show libclang-rt-14-dev >/dev/null 2>&1; then
    clang_pkgs="clang-14 libclang-rt-14-dev"
  elif apt-cache show clang >/dev/null 2>&1 && apt-cache show libclang-rt-dev >/dev/null 2>&1; then
    clang_pkgs="clang libclang-rt-dev"
  fi
  if [ -n "$clang_pkgs" ]; then
    echo "== installing $clang_pkgs (libFuzzer)"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $clang_pkgs >/dev/null ||
      echo "== could not install $clang_pkgs; the fuzz tests will be skipped" >&2
  fi
fi

PY=${PYTHON:-python3}
if ! "$PY" -m pip --version >/dev/null 2>&1; then
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip python3-venv >/dev/null
fi
echo "== installing edgeml (pip install -e .[test])"
if ! "$PY" -m pip install -q --disable-pip-version-check -e ".[test]" 2>/tmp/edgeml-pip.log; then
  if grep -q externally-managed /tmp/edgeml-pip.log; then
    # Debian's system Python: use a virtual environment in the checkout
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
  else
    cat /tmp/edgeml-pip.log >&2
    exit 1
  fi
fi
