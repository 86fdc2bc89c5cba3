/* test_timing.c: the histogram's quantiles against exact order statistics,
 * the clock-offset filter, and per-call stages from known timestamps. */
#include "../timing/em_timing.h"
#include "em_test.h"

#include <math.h>

static uint64_t rng_state = 88172645463325252ull;
static uint64_t xorshift(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return rng_state;
}

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return x < y ? -1 : x > y;
}

static double exact_rank(const int64_t *sorted, size_t n, double q) {
  size_t rank = (size_t)ceil(q * (double)n);
  if (rank < 1) rank = 1;
  return (double)sorted[rank - 1];
}

/* Quantiles within 1.6% (half a bucket) of the nearest-rank order
 * statistic, for values from 0 to minutes in ns; min, max, mean exact. */
static void test_hist_quantiles(void) {
  enum { N = 20000 };
  static int64_t v[N];
  const int64_t scales[] = {50, 3000, 250000, 40000000, 90000000000ll};
  for (size_t k = 0; k < sizeof scales / sizeof scales[0]; k++) {
    static em__hist h;
    memset(&h, 0, sizeof h);
    double sum = 0;
    for (int i = 0; i < N; i++) {
      /* log-uniform over two decades around the scale, a few exact zeros */
      double f = exp(((double)(xorshift() % 100000) / 100000.0 - 0.5) * 4.6);
      v[i] = i % 997 == 0 ? 0 : (int64_t)((double)scales[k] * f);
      sum += (double)v[i];
      em__hist_add(&h, v[i]);
    }
    qsort(v, N, sizeof v[0], cmp_i64);
    em_stage_stats s;
    em__hist_summary(&h, &s);
    CHECK_EQ(s.count, N);
    CHECK(s.min == (double)v[0]);
    CHECK(s.max == (double)v[N - 1]);
    CHECK(fabs(s.mean - sum / N) <= 1e-6 * fabs(sum / N) + 1e-9);
    const double qs[3] = {0.5, 0.9, 0.99};
    const double got[3] = {s.p50, s.p90, s.p99};
    for (int i = 0; i < 3; i++) {
      double want = exact_rank(v, N, qs[i]);
      double tol = want < 64 ? 0.5 : want * 0.016 + 0.5;
      if (fabs(got[i] - want) > tol)
        fprintf(stderr, "scale %lld q %.2f: got %.1f want %.1f\n", (long long)scales[k], qs[i], got[i], want);
      CHECK(fabs(got[i] - want) <= tol);
    }
  }
}

static void test_hist_negative_and_empty(void) {
  em__hist h;
  memset(&h, 0, sizeof h);
  em_stage_stats s;
  em__hist_summary(&h, &s);
  CHECK_EQ(s.count, 0);
  CHECK(s.p50 == 0 && s.max == 0);
  em__hist_add(&h, -500); /* a one-way stage under a bad offset estimate */
  em__hist_add(&h, 1000);
  em__hist_add(&h, 1000);
  em__hist_summary(&h, &s);
  CHECK(s.min == -500);
  CHECK(s.max == 1000);
  CHECK(fabs(s.mean - 500) < 1e-9);
  CHECK(fabs(s.p50 - 1000) <= 16.5);
}

/* The filter keeps the lowest-delay sample of each second, prefers the
 * lowest delay in the window, and drops samples older than the window. */
static void test_clock_filter(void) {
  em__clock k;
  memset(&k, 0, sizeof k);
  em__clock_sample b;
  CHECK_EQ(em__clock_best(&k, 0, &b), 0);
  uint64_t s = 1000000000ull, t = 100 * s;
  em__clock_add(&k, 5000, 900, t);             /* second 100 */
  em__clock_add(&k, 7000, 100, t + s / 2);     /* same second, lower delay: replaces */
  em__clock_add(&k, 9000, 5000, t + s / 2 + 1); /* same second, higher: ignored */
  CHECK_EQ(em__clock_best(&k, t + s, &b), 1);
  CHECK_EQ(b.offset, 7000);
  CHECK_EQ(b.delay, 100);
  /* many slow samples in later seconds do not push the good one out */
  for (int i = 1; i <= 20; i++) em__clock_add(&k, 100000 + i, 80000, t + (uint64_t)i * s);
  CHECK_EQ(em__clock_best(&k, t + 20 * s, &b), 21);
  CHECK_EQ(b.offset, 7000);
  /* once it is older than the window, the best of the rest wins */
  em__clock_add(&k, 4242, 70000, t + 25 * s);
  CHECK(em__clock_best(&k, t + 31 * s, &b) >= 1);
  CHECK_EQ(b.offset, 4242);
  /* all samples too old: the newest one is used */
  CHECK_EQ(em__clock_best(&k, t + 1000 * s, &b), 1);
  CHECK_EQ(b.offset, 4242);
  /* the ring wraps after EM__CLOCK_WINDOW seconds */
  for (int i = 0; i < 3 * EM__CLOCK_WINDOW; i++) em__clock_add(&k, i, 10 + (uint64_t)i, t + (uint64_t)(2000 + i) * s);
  CHECK(em__clock_best(&k, t + (uint64_t)(2000 + 3 * EM__CLOCK_WINDOW) * s, &b) >= 1);
  CHECK(b.offset >= 2 * EM__CLOCK_WINDOW); /* only samples still in the ring */
}

/* A server clock 3 s ahead and a path of 2 ms up, 2 ms down, 1 ms queue,
 * 10 ms handler, 0.5 ms reply. */
static void test_stages_from_timestamps(void) {
  const uint64_t ms = 1000000ull, skew = 3000 * ms, t0 = 1700000000000000000ull;
  uint64_t t1 = t0 + 2 * ms + skew, t2 = t1 + 1 * ms, t3 = t2 + 10 * ms, t4 = t3 + ms / 2;
  uint64_t t5 = t4 - skew + 2 * ms;
  uint64_t reply_ts[4] = {t4, t1, t2, t3};
  em_call_timing t;
  memset(&t, 0, sizeof t);
  em__timing_fill(&t, reply_ts, t0, t5, 1234, 99);
  int64_t off;
  uint64_t delay;
  CHECK(em__timing_sample(&t, &off, &delay));
  CHECK_EQ(off, (int64_t)skew);
  CHECK_EQ(delay, 4 * ms);
  em__timing_stages(&t, off, delay / 2, 0);
  CHECK_EQ(t.stage[EM_STAGE_RTT], (int64_t)(t5 - t0));
  CHECK_EQ(t.stage[EM_STAGE_UPLOAD], (int64_t)(2 * ms));
  CHECK_EQ(t.stage[EM_STAGE_QUEUE], (int64_t)ms);
  CHECK_EQ(t.stage[EM_STAGE_HANDLER], (int64_t)(10 * ms));
  CHECK_EQ(t.stage[EM_STAGE_REPLY], (int64_t)(ms / 2));
  CHECK_EQ(t.stage[EM_STAGE_DOWNLOAD], (int64_t)(2 * ms));
  CHECK_EQ(t.stage[EM_STAGE_BYTES_UP], 1234);
  CHECK_EQ(t.stage[EM_STAGE_BYTES_DOWN], 99);
  CHECK_EQ(t.offset_err_ns, 2 * ms);
  /* the server clock behind instead (t1 < t0 numerically) */
  const uint64_t back = 5000 * ms;
  uint64_t r2[4] = {t4 - skew - back, t1 - skew - back, t2 - skew - back, t3 - skew - back};
  em__timing_fill(&t, r2, t0, t5, 0, 0);
  CHECK(em__timing_sample(&t, &off, &delay));
  CHECK_EQ(off, -(int64_t)back);
  em__timing_stages(&t, off, 0, 0);
  CHECK_EQ(t.stage[EM_STAGE_UPLOAD], (int64_t)(2 * ms));
  CHECK_EQ(t.stage[EM_STAGE_DOWNLOAD], (int64_t)(2 * ms));
  /* declared synchronised: offset 0, so one-way figures carry the skew */
  em__timing_stages(&t, off, 0, 1);
  CHECK_EQ(t.offset_ns, 0);
  CHECK_EQ(t.stage[EM_STAGE_UPLOAD], (int64_t)(2 * ms) - (int64_t)back);
  /* an unstamped reply gives the round trip only and no clock sample */
  uint64_t r3[4] = {0, 0, 0, 0};
  em__timing_fill(&t, r3, t0, t5, 0, 0);
  CHECK(!em__timing_sample(&t, &off, &delay));
  em__timing_stages(&t, 0, 0, 0);
  CHECK_EQ(t.stage[EM_STAGE_RTT], (int64_t)(t5 - t0));
  CHECK_EQ(t.stage[EM_STAGE_UPLOAD], 0);
}

int main(void) {
  RUN(test_hist_quantiles);
  RUN(test_hist_negative_and_empty);
  RUN(test_clock_filter);
  RUN(test_stages_from_timestamps);
  DONE();
}
