#!/usr/bin/env bash
# Install, then run every test: Python tests and, through pytest, the C unit
# tests (plain, ASan+UBSan and TSan builds) and the C example.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test || exit 1
PY=$(bash scripts/python.sh)
"$PY" -m pytest -q -p no:cacheprovider "$@" tests
rc=$?
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
bash scripts/python.sh --hint
exit $rc
