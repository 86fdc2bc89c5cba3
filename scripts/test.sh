#!/usr/bin/env bash
# Install, then run every test: Python tests and, through pytest, the C unit
# tests (plain, ASan+UBSan and TSan builds) and the C example; then the
# Python tests again against the extension built with ASan+UBSan.
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
# The whole Python suite again, against the extension built with ASan and
# UBSan (a use-after-free aborts it). Only on a full run; set
# EDGEML_SKIP_SANITIZED_SUITE=1 to leave it out.
if [ $# -eq 0 ] && [ -z "${EDGEML_SKIP_SANITIZED_SUITE:-}" ]; then
  echo "== the Python suite against edgeml._core built with ASan+UBSan (scripts/sanitized_suite.sh)"
  PY="$PY" bash scripts/sanitized_suite.sh
  src=$?
  [ $rc -ne 0 ] || rc=$src
fi
bash scripts/python.sh --hint
exit $rc
