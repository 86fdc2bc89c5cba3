#!/usr/bin/env bash
# The main job: install, then run the demo (a server process and a client).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo  # only what the demo needs (the test command adds the rest)
rc=0
"$(bash scripts/python.sh)" examples/demo.py "$@" || rc=$?
bash scripts/python.sh --hint  # again, after the demo's output
exit $rc
