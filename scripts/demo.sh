#!/usr/bin/env bash
# The main job: install, then run the demo (a server process and a client).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "$(bash scripts/python.sh)" examples/demo.py "$@"
