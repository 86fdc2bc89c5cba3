#!/usr/bin/env bash
# The Python test suite against edgeml._core built with AddressSanitizer and
# UBSan (EDGEML_SANITIZE=asan), so a use-after-free or an overflow in the C
# core aborts the run instead of passing by luck.
#   scripts/sanitized_suite.sh [pytest args...]
# SAN=tsan builds against ThreadSanitizer, but with an uninstrumented
# CPython TSan does not see the GIL's ordering and reports state the GIL
# guards (e.g. the client's spare payload) as races: use it to look for
# races in the C core's own threads, not as a pass/fail check. The C tests
# run under TSan for real (csrc/Makefile SAN=tsan, tests/test_c.py).
# Runs in a copy of the checkout (build/asan-tree) so the normal build is
# left alone; Python itself is not instrumented, so the ASan runtime is
# preloaded and leak checking is off (the interpreter's own allocations at
# exit are not leaks of ours; the C tests check leaks, csrc/Makefile SAN=asan).
# The C-only tests (test_c.py, test_fuzz.py) have sanitizer builds of their
# own and are not repeated here.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(bash scripts/python.sh)}
# the interpreter itself, not a wrapper script (a pyenv shim is bash, which
# must not get the preloaded runtime)
PY=$("$PY" -c 'import sys; print(sys.executable)')
CC=${CC:-cc}
SAN=${SAN:-asan}
case "$SAN" in asan) RTLIB=libasan.so ;; tsan) RTLIB=libtsan.so ;; *) echo "SAN must be asan or tsan" >&2; exit 2 ;; esac
SAN_RT=$("$CC" -print-file-name=$RTLIB)
if [ ! -e "$SAN_RT" ]; then
  echo "sanitized_suite: $CC has no $RTLIB (install gcc's lib${SAN}); cannot run the $SAN suite" >&2
  exit 1
fi
TREE=build/$SAN-tree
mkdir -p "$TREE"
# the checkout's files (tracked and new, not ignored), nothing built
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -C "$TREE" -xf -
else
  tar --exclude=./build --exclude=./.venv --exclude='./csrc/build*' --exclude='*.so' -cf - . | tar -C "$TREE" -xf -
fi
cd "$TREE"
EDGEML_SANITIZE=$SAN "$PY" setup.py -q build_ext --inplace >build_ext.log 2>&1 || {
  cat build_ext.log >&2
  exit 1
}
# libstdc++ right after: ASan's __cxa_throw interceptor needs the real one
# loaded at start, or C++ exceptions in other extensions (matplotlib) abort
STDCXX=$("$CC" -print-file-name=libstdc++.so.6)
export LD_PRELOAD="$SAN_RT${STDCXX:+ $STDCXX}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
# reports go to files (pytest captures the test process's stderr), shown below
rm -f "$PWD"/sanitizer-report.*
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:report_signal_unsafe=0:log_path=$PWD/sanitizer-report"
export ASAN_OPTIONS="$ASAN_OPTIONS:log_path=$PWD/sanitizer-report"
export EDGEML_TEST_TIMEOUT_MULTIPLIER=${EDGEML_TEST_TIMEOUT_MULTIPLIER:-3}
# cwd first on sys.path (python -m): this tree's edgeml, not the editable install
[ $# -gt 0 ] || set -- tests
# the tests of C programs build and run their own ASan variants in the main
# suite already (test_c, test_fuzz, the C roles, the CUDA layer, the C batcher)
"$PY" -m pytest -q -p no:cacheprovider --ignore=tests/test_c.py --ignore=tests/test_fuzz.py \
  --ignore=tests/test_c_roles_edge.py --ignore=tests/test_c_roles_trainer.py --ignore=tests/test_cuda_layer.py \
  --ignore=tests/test_c_batch.py "$@"
rc=$?
for f in "$PWD"/sanitizer-report.*; do
  [ -e "$f" ] || continue
  echo "== $SAN report $f" >&2
  head -c 20000 "$f" >&2
  rc=${rc/#0/1}
done
if [ $rc -eq 5 ]; then
  echo "sanitized_suite: pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit $rc
