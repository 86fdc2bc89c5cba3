/* clock.c: the two clocks: wall time for the wire, monotonic for timeouts. */
#include "em_base.h"

#include <pthread.h>
#include <sys/random.h>
#include <sys/types.h>

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* Test hook: EDGEML_TEST_CLOCK_SKEW_NS (signed ns, read once at load) is
 * added to every wire timestamp this process writes, so tests can give a
 * server or a client a clock that is off by a known amount. */
static int64_t em__clock_skew_ns;

__attribute__((constructor)) static void em__clock_skew_init(void) {
  const char *v = getenv("EDGEML_TEST_CLOCK_SKEW_NS");
  if (v && *v) em__clock_skew_ns = strtoll(v, NULL, 10);
}

uint64_t em_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec + (uint64_t)em__clock_skew_ns;
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

/* A random 64-bit value (not for secrets): getrandom, else clock and
 * address bits mixed with splitmix64. */
uint64_t em__random_u64(void) {
  uint64_t v = 0;
  if (getrandom(&v, sizeof v, GRND_NONBLOCK) == (ssize_t)sizeof v && v) return v;
  static atomic_ullong counter;
  v = em_mono_ns() ^ (em_now_ns() << 17) ^ (uint64_t)(uintptr_t)&v ^ atomic_fetch_add(&counter, 1);
  v += 0x9e3779b97f4a7c15ull;
  v = (v ^ (v >> 30)) * 0xbf58476d1ce4e5b9ull;
  v = (v ^ (v >> 27)) * 0x94d049bb133111ebull;
  return (v ^ (v >> 31)) | 1;
}

/* Fork detection: the child handler bumps a generation counter, so an
 * object opened before a fork(), whose mutexes may have been held by
 * threads that do not exist in the child and whose socket the parent
 * still uses, can tell at the next call that it must not be touched. */
static atomic_uint em__fork_counter;
static void em__fork_child(void) { atomic_fetch_add(&em__fork_counter, 1); }
static void em__fork_register(void) { pthread_atfork(NULL, NULL, em__fork_child); }

unsigned em__fork_gen(void) {
  static pthread_once_t once = PTHREAD_ONCE_INIT;
  pthread_once(&once, em__fork_register);
  return atomic_load_explicit(&em__fork_counter, memory_order_relaxed);
}

bool em__forked_since(unsigned gen) {
  return atomic_load_explicit(&em__fork_counter, memory_order_relaxed) != gen;
}

uint64_t em__deadline(uint64_t timeout_ns) {
  if (timeout_ns == EM_FOREVER) return EM_FOREVER;
  uint64_t now = em_mono_ns();
  if (timeout_ns >= EM_FOREVER - now) return EM_FOREVER; /* beyond any real clock: no limit */
  return now + timeout_ns;
}
