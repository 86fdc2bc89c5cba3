#!/usr/bin/env bash
# The Python that scripts/setup.sh installed edgeml into.
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then echo "$PWD/.venv/bin/python"; else echo "${PYTHON:-python3}"; fi
