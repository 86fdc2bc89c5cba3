/* em_timing.h: the timing layer (timing.c): per-call stages from the
 * wire's timestamps, the clock-offset estimate and running statistics in
 * histograms. Contract in include/edgeml.h ("timing") and docs/timing.md.
 * Depends on base only (the public header and libc): no sockets, no
 * msgpack. No locking: callers hold theirs. */
#ifndef EM_TIMING_H
#define EM_TIMING_H

#include "../base/em_base.h"

#define EM__HIST_BUCKETS (64 + 58 * 32) /* exact below 64, then 2^6..2^63 */
typedef struct em__hist {
  uint64_t count;
  double sum;
  int64_t min, max;
  uint32_t counts[EM__HIST_BUCKETS];
} em__hist;
void em__hist_add(em__hist *h, int64_t v);
void em__hist_summary(const em__hist *h, em_stage_stats *s);

#define EM__CLOCK_WINDOW 32 /* seconds */
#define EM__CLOCK_WINDOW_NS (30ull * 1000000000ull)
typedef struct em__clock_sample {
  int64_t offset;
  uint64_t delay, mono;
} em__clock_sample;
typedef struct em__clock {
  em__clock_sample ring[EM__CLOCK_WINDOW];
  uint64_t next; /* slots ever used */
} em__clock;
void em__clock_add(em__clock *k, int64_t offset, uint64_t delay, uint64_t mono);
/* The sample to use now; returns the number in the window (0: none). */
int em__clock_best(const em__clock *k, uint64_t now_mono, em__clock_sample *out);

/* t0..t5 and the byte counts from a reply's timestamps ({t4, t1, t2, t3}). */
void em__timing_fill(em_call_timing *t, const uint64_t ts_reply[4], uint64_t t0, uint64_t t5, uint64_t bytes_up,
                     uint64_t bytes_down);
/* This call's own offset and delay; 0 if the reply is not usable for it. */
int em__timing_sample(const em_call_timing *t, int64_t *offset, uint64_t *delay);
/* Fill the stages given the offset to use. */
void em__timing_stages(em_call_timing *t, int64_t offset, uint64_t offset_err, int synchronized);

#endif
