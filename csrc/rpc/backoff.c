/* backoff.c: the one reconnect policy (em_rpc.h "reconnect policy"), used
 * by a client's re-dial at a call, by em__open_retry (client and
 * subscriber open) and by a subscriber's re-dials. */
#include "em_rpc.h"

void em__backoff_init(em__backoff *b) { b->step_ns = EM__BACKOFF_MIN_NS; }

void em__backoff_reset(em__backoff *b) { b->step_ns = EM__BACKOFF_MIN_NS; }

uint64_t em__backoff_next(em__backoff *b) {
  uint64_t d = b->step_ns;
  if (d < EM__BACKOFF_MIN_NS || d > EM__BACKOFF_MAX_NS) d = EM__BACKOFF_MIN_NS; /* zeroed struct */
  b->step_ns = EM__MIN(d * 2, EM__BACKOFF_MAX_NS);
  /* "equal jitter": uniform in [d/2, d], so waits never exceed the plain
   * doubling schedule and clients dropped together do not re-dial in step */
  uint64_t half = d / 2;
  return half + em__random_u64() % (d - half + 1);
}
