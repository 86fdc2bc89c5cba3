#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz_frame, fuzz_payload, fuzz_value) with clang and
# ASan + UBSan (no recovery), compiling the library sources they need
# (csrc/base, csrc/wire) directly with the same instrumentation; libuv and
# msgpack-c come from pkg-config.
#
#   csrc/fuzz/build.sh [BUILD_DIR]   build into BUILD_DIR (default csrc/build-fuzz)
#   csrc/fuzz/build.sh --check       exit 0 if clang with libFuzzer works here,
#                                    else print why and exit 77
#
# CLANG=... picks the compiler (default: clang-14, else clang); EXTRA_CFLAGS
# adds flags, e.g. a coverage build (README.md, "Coverage"):
#   EXTRA_CFLAGS="-fprofile-instr-generate -fcoverage-mapping" csrc/fuzz/build.sh /tmp/fuzz-cov
set -euo pipefail
FUZZ_DIR=$(cd "$(dirname "$0")" && pwd)
CSRC=$(dirname "$FUZZ_DIR")

CLANG=${CLANG:-}
if [ -z "$CLANG" ]; then
  if command -v clang-14 >/dev/null 2>&1; then CLANG=clang-14
  elif command -v clang >/dev/null 2>&1; then CLANG=clang
  fi
fi

check() {
  if [ -z "$CLANG" ]; then
    echo "no clang-14 or clang on PATH (apt-get install clang-14 libclang-rt-14-dev)"
    return 77
  fi
  if ! command -v "$CLANG" >/dev/null 2>&1; then
    echo "CLANG=$CLANG is not on PATH"
    return 77
  fi
  local tmp
  tmp=$(mktemp -d)
  printf '%s\n' '#include <stddef.h>' '#include <stdint.h>' \
    'int LLVMFuzzerTestOneInput(const uint8_t *d, size_t n) { (void)d; (void)n; return 0; }' >"$tmp/probe.c"
  if ! "$CLANG" -fsanitize=fuzzer,address,undefined "$tmp/probe.c" -o "$tmp/probe" >"$tmp/log" 2>&1; then
    echo "$CLANG cannot link -fsanitize=fuzzer,address,undefined (libclang-rt-dev missing?): $(head -c 300 "$tmp/log")"
    rm -rf "$tmp"
    return 77
  fi
  rm -rf "$tmp"
  return 0
}

if [ "${1:-}" = "--check" ]; then
  check
  exit $?
fi
check >&2 || exit $?

BUILD=${1:-$CSRC/build-fuzz}
mkdir -p "$BUILD"
if pkg-config --exists msgpack 2>/dev/null; then MSGPACK_PC=msgpack; else MSGPACK_PC=msgpack-c; fi
# shellcheck disable=SC2207
DEPS=($(pkg-config --cflags --libs libuv "$MSGPACK_PC"))

CFLAGS=(-std=c11 -D_GNU_SOURCE -g -O1 -fno-omit-frame-pointer
        -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all
        -Wall -Wextra -Wno-unused-parameter
        -I"$CSRC/include")
# shellcheck disable=SC2206
CFLAGS+=(${EXTRA_CFLAGS:-})
LIB_SRCS=("$CSRC"/base/*.c "$CSRC"/wire/*.c)

for target in fuzz_frame fuzz_payload fuzz_value; do
  echo "== $BUILD/$target ($CLANG)"
  "$CLANG" "${CFLAGS[@]}" -o "$BUILD/$target" "$FUZZ_DIR/$target.c" "${LIB_SRCS[@]}" "${DEPS[@]}" -lpthread -lm
done
