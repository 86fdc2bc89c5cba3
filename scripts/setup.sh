#!/usr/bin/env bash
# Installs what edgeml needs on a Debian/Ubuntu machine, then edgeml itself
# (editable). Safe to run any number of times.
#
#   scripts/setup.sh demo   what the demo needs: a C compiler, pkg-config,
#                           Python's headers, libuv and msgpack-c, then
#                           `pip install -e .`
#   scripts/setup.sh test   (the default) the same, plus make, iproute2 (ip,
#                           tc) and clang with libFuzzer as root, then
#                           `pip install -e ".[test]"`
#
# Where the system Python is externally managed (Debian 12 and newer), edgeml
# goes into a virtual environment in the checkout, .venv (python3-venv is
# installed when missing; a .venv left half-made by an earlier run is made
# again), and the last lines say to activate it. scripts/python.sh prints the
# Python edgeml went into. PYTHON=... picks the Python (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."

MODE=${1:-test}
case "$MODE" in
  demo) EXTRAS="" ;;
  test) EXTRAS="[test]" ;;
  *) echo "usage: scripts/setup.sh [demo|test]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
LOG=$(mktemp /tmp/edgeml-setup.XXXXXX)
trap 'rm -f "$LOG"' EXIT

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

APT_UPDATED=0
apt_update_once() {
  if [ "$APT_UPDATED" = 0 ] && command -v apt-get >/dev/null; then
    $SUDO apt-get update -qq || true
    APT_UPDATED=1
  fi
}
apt_has() { apt_update_once; apt-cache show --no-all-versions "$1" >/dev/null 2>&1; }
# apt_install WHY PACKAGE...: installs them, or says exactly what to run
apt_install() {
  local why=$1; shift
  if ! command -v apt-get >/dev/null; then
    echo "setup: $why: install $* with this system's package manager, then run this again" >&2
    return 1
  fi
  if [ -n "$SUDO" ] && ! command -v sudo >/dev/null; then
    echo "setup: $why: as root, run \`apt-get install $*\`, then run this again" >&2
    return 1
  fi
  echo "== installing $* ($why)"
  apt_update_once
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# What setup.py needs to build the C extension (it names the same packages
# when run on its own)
pkgs=()
command -v gcc >/dev/null || command -v cc >/dev/null || pkgs+=(gcc)
[ -e /usr/include/stdio.h ] || pkgs+=(libc6-dev)
command -v pkg-config >/dev/null || pkgs+=(pkg-config)
pkg-config --exists libuv 2>/dev/null || pkgs+=(libuv1-dev)
if ! { pkg-config --exists msgpack-c 2>/dev/null || pkg-config --exists msgpack 2>/dev/null; }; then
  if apt_has libmsgpack-c-dev; then pkgs+=(libmsgpack-c-dev); else pkgs+=(libmsgpack-dev); fi  # Debian 13 / 12
fi
"$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ||
  pkgs+=(python3-dev)
if [ "$MODE" = test ]; then
  command -v make >/dev/null || pkgs+=(make)  # the C library, its tests and the C example (csrc/Makefile)
fi
if [ ${#pkgs[@]} -gt 0 ]; then
  apt_install "to build edgeml's C core" "${pkgs[@]}"
fi

if [ "$MODE" = test ]; then
  # iproute2 (ip, tc) for the timing tests over shaped links in network
  # namespaces; they are skipped, saying why, where namespaces are not allowed
  if [ "$(id -u)" = 0 ] && { ! command -v ip >/dev/null || ! command -v tc >/dev/null; }; then
    apt_install "ip and tc, for the shaped-link timing tests" iproute2
  fi

  # clang with libFuzzer for the fuzz targets (csrc/fuzz, tests/test_fuzz.py);
  # without it those tests are skipped, saying why
  if [ "$(id -u)" = 0 ] && ! bash csrc/fuzz/build.sh --check >/dev/null 2>&1; then
    apt_update_once
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
fi

# Python: the system's where pip may install there, else .venv
externally_managed() {
  "$PY" -c 'import os, sys, sysconfig
sys.exit(sys.prefix != sys.base_prefix or not os.path.isfile(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'
}
venv_works() { [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; }
make_venv() {
  venv_works && return 0
  if [ -e .venv ] || [ -L .venv ]; then
    echo "== .venv has no working python and pip (an earlier run stopped half-way?): making it again"
    rm -rf .venv
  fi
  echo "== making a virtual environment, .venv ($PY is externally managed)"
  if ! "$PY" -m venv .venv >"$LOG" 2>&1; then
    rm -rf .venv  # Debian's python3 leaves a .venv without pip when ensurepip is missing
    if grep -q ensurepip "$LOG"; then
      apt_install "python3 -m venv needs ensurepip" python3-venv || exit 1
      "$PY" -m venv .venv
    else
      cat "$LOG" >&2
      exit 1
    fi
  fi
  venv_works || { echo "setup: .venv was made, but .venv/bin/python -m pip does not work" >&2; exit 1; }
}

if [ -e .venv ] || [ -L .venv ] || externally_managed; then
  make_venv
  PIP_PY=.venv/bin/python
else
  if ! "$PY" -m pip --version >/dev/null 2>&1; then apt_install "pip for $PY" python3-pip || exit 1; fi
  PIP_PY=$PY
fi
echo "== installing edgeml (pip install -e \".$EXTRAS\")"
if ! "$PIP_PY" -m pip install -q --disable-pip-version-check -e ".$EXTRAS" 2>"$LOG"; then
  if [ "$PIP_PY" = "$PY" ] && grep -q externally-managed "$LOG"; then
    make_venv
    PIP_PY=.venv/bin/python
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".$EXTRAS"
  else
    cat "$LOG" >&2
    exit 1
  fi
fi
bash scripts/python.sh --hint
