#!/usr/bin/env bash
# The Python that scripts/setup.sh installed edgeml into.
#   scripts/python.sh          prints its path
#   scripts/python.sh --hint   says how to use it for the README's other commands
cd "$(dirname "$0")/.."
if [ "${1:-}" = --hint ]; then
  if [ -x .venv/bin/python ]; then
    echo "== edgeml is installed in .venv, a virtual environment in this checkout (the system's Python is"
    echo "   externally managed). Before the README's other commands, run:  . .venv/bin/activate"
    echo "   (or call .venv/bin/python, .venv/bin/pip and .venv/bin/edgeml directly)"
  else
    echo "== edgeml is installed for ${PYTHON:-python3}"
  fi
  exit 0
fi
if [ -x .venv/bin/python ]; then echo "$PWD/.venv/bin/python"; else echo "${PYTHON:-python3}"; fi
