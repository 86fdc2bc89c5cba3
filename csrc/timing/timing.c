/* timing.c: per-call stages from the wire's timestamps, the clock-offset
 * estimate (NTP minimum-delay filter) and running statistics in log-linear
 * histograms. Contract in include/edgeml.h ("timing") and docs/timing.md.
 * Nothing here locks: the client calls it with its mutex held. */
#include "em_timing.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

const char *const em_stage_names[EM_STAGE_COUNT] = {
    "rtt", "upload", "queue", "handler", "reply", "download", "encode", "decode", "bytes_up", "bytes_down",
};

/* ------------------------------------------------------------ histogram
 * Values v >= 0. Bucket b < 64 holds v == b exactly; above that, each power
 * of two [2^e, 2^(e+1)) (e >= 6) is split into 32 equal buckets, so a bucket
 * is at most 1/32 of its lower bound wide and its midpoint is within 1.6% of
 * any value in it. Negative values (one-way stages with a bad offset
 * estimate) are counted in bucket 0 and in min/mean. */

static int em__hist_bucket(uint64_t v) {
  if (v < 64) return (int)v;
  int e = 63 - __builtin_clzll(v); /* 2^e <= v, e >= 6 */
  int sub = (int)((v >> (e - 5)) & 31);
  return 64 + (e - 6) * 32 + sub;
}

static double em__hist_mid(int b) {
  if (b < 64) return (double)b;
  int e = (b - 64) / 32 + 6, sub = (b - 64) % 32;
  double lo = ldexp(1.0, e) * (1.0 + sub / 32.0);
  double w = ldexp(1.0, e - 5);
  return lo + w / 2 - 0.5;
}

void em__hist_add(em__hist *h, int64_t v) {
  if (h->count == 0 || v < h->min) h->min = v;
  if (h->count == 0 || v > h->max) h->max = v;
  h->count++;
  h->sum += (double)v;
  h->counts[v <= 0 ? 0 : em__hist_bucket((uint64_t)v)]++;
}

static double em__hist_quantile(const em__hist *h, double q) {
  if (!h->count) return 0;
  /* nearest rank, as numpy's "inverted_cdf" and the bench suite use */
  uint64_t rank = (uint64_t)ceil(q * (double)h->count);
  if (rank < 1) rank = 1;
  uint64_t seen = 0;
  for (int b = 0; b < EM__HIST_BUCKETS; b++) {
    seen += h->counts[b];
    if (seen >= rank) {
      double v = b == 0 && h->min <= 0 ? (double)h->min : em__hist_mid(b);
      if (v < (double)h->min) v = (double)h->min;
      if (v > (double)h->max) v = (double)h->max;
      return v;
    }
  }
  return (double)h->max;
}

void em__hist_summary(const em__hist *h, em_stage_stats *s) {
  memset(s, 0, sizeof *s);
  s->count = h->count;
  if (!h->count) return;
  s->mean = h->sum / (double)h->count;
  s->min = (double)h->min;
  s->max = (double)h->max;
  s->p50 = em__hist_quantile(h, 0.50);
  s->p90 = em__hist_quantile(h, 0.90);
  s->p99 = em__hist_quantile(h, 0.99);
}

/* ------------------------------------------------------------ clock offset */

/* The ring holds, for each of the last EM__CLOCK_WINDOW seconds that had
 * samples, the lowest-delay sample of that second, so a ping's good sample
 * is kept for the whole window however many slow (large) calls follow it. */
void em__clock_add(em__clock *k, int64_t offset, uint64_t delay, uint64_t mono) {
  uint64_t epoch = mono / 1000000000ull;
  if (k->next) {
    em__clock_sample *last = &k->ring[(k->next - 1) % EM__CLOCK_WINDOW];
    if (last->mono / 1000000000ull == epoch) {
      if (delay <= last->delay) {
        last->offset = offset;
        last->delay = delay;
        last->mono = mono;
      }
      return;
    }
  }
  em__clock_sample *s = &k->ring[k->next % EM__CLOCK_WINDOW];
  s->offset = offset;
  s->delay = delay;
  s->mono = mono;
  k->next++;
}

/* The lowest-delay sample taken within EM__CLOCK_WINDOW_NS; if all are
 * older, the newest one. Returns the number of seconds with samples in the
 * window (0: no sample at all). */
int em__clock_best(const em__clock *k, uint64_t now_mono, em__clock_sample *out) {
  uint64_t n = k->next < EM__CLOCK_WINDOW ? k->next : EM__CLOCK_WINDOW;
  if (!n) return 0;
  const em__clock_sample *best = NULL;
  int fresh = 0;
  for (uint64_t i = 0; i < n; i++) {
    const em__clock_sample *s = &k->ring[i];
    if (now_mono - s->mono > EM__CLOCK_WINDOW_NS) continue;
    fresh++;
    if (!best || s->delay < best->delay) best = s;
  }
  if (!best) best = &k->ring[(k->next - 1) % EM__CLOCK_WINDOW];
  *out = *best;
  return fresh ? fresh : 1;
}

/* ------------------------------------------------------------ per call */

void em__timing_fill(em_call_timing *t, const uint64_t ts_reply[4], uint64_t t0, uint64_t t5,
                     uint64_t bytes_up, uint64_t bytes_down) {
  t->t[0] = t0;
  t->t[1] = ts_reply[1];
  t->t[2] = ts_reply[2];
  t->t[3] = ts_reply[3];
  t->t[4] = ts_reply[0];
  t->t[5] = t5;
  t->stage[EM_STAGE_BYTES_UP] = (int64_t)bytes_up;
  t->stage[EM_STAGE_BYTES_DOWN] = (int64_t)bytes_down;
}

int em__timing_sample(const em_call_timing *t, int64_t *offset, uint64_t *delay) {
  const uint64_t *x = t->t;
  /* a peer that does not stamp its replies, or clocks that stepped */
  if (!x[1] || !x[4] || x[4] < x[1] || x[5] < x[0]) return 0;
  uint64_t server = x[4] - x[1], rtt = x[5] - x[0];
  *delay = rtt > server ? rtt - server : 0;
  /* ((t1 - t0) + (t4 - t5)) / 2 without overflow for any pair of clocks */
  *offset = (int64_t)((x[1] - x[0]) + (x[4] - x[5])) / 2;
  return 1;
}

void em__timing_stages(em_call_timing *t, int64_t offset, uint64_t offset_err, int synchronized) {
  const uint64_t *x = t->t;
  t->synchronized = synchronized;
  t->offset_ns = synchronized ? 0 : offset;
  t->offset_err_ns = synchronized ? 0 : offset_err;
  int64_t off = t->offset_ns;
  t->stage[EM_STAGE_RTT] = (int64_t)(x[5] - x[0]);
  if (!x[1] || !x[4]) { /* unstamped reply: only the round trip is known */
    for (int i = EM_STAGE_UPLOAD; i <= EM_STAGE_DOWNLOAD; i++) t->stage[i] = 0;
    return;
  }
  t->stage[EM_STAGE_UPLOAD] = (int64_t)(x[1] - x[0]) - off;
  t->stage[EM_STAGE_QUEUE] = (int64_t)(x[2] - x[1]);
  t->stage[EM_STAGE_HANDLER] = (int64_t)(x[3] - x[2]);
  t->stage[EM_STAGE_REPLY] = (int64_t)(x[4] - x[3]);
  t->stage[EM_STAGE_DOWNLOAD] = (int64_t)(x[5] - x[4]) + off;
}
