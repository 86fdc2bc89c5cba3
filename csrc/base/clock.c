/* clock.c: the two clocks: wall time for the wire, monotonic for timeouts. */
#include "em_base.h"

#include <stdio.h>
#include <time.h>

uint64_t em_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

uint64_t em_mono_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void em__log_stderr(void *ud, int level, const char *msg) {
  (void)ud;
  const char *l = level >= EM_LOG_ERROR ? "error" : level >= EM_LOG_WARNING ? "warning"
                : level >= EM_LOG_INFO ? "info" : "debug";
  fprintf(stderr, "edgeml %s: %s\n", l, msg);
}
