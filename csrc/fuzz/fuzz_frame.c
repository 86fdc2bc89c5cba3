/* fuzz_frame.c: libFuzzer target for the frame parser: the incremental
 * reader (em__reader_region / _commit / _next / _reset), the header checks
 * (em__hdr_parse), the blob table (em__frame_finish), and then, for every
 * complete frame, the body checks and decoding of fuzz_common.h
 * (em__body_check, em_msg_unpack, em_obj_array, em_obj_get and a
 * re-pack / re-read round trip through em_payload_* and em__payload_frame).
 *
 * Input: two control bytes, then the byte stream a socket would deliver.
 *   byte 0, bits 0-2  chunk sizes the "socket" delivers: 0 = as much as the
 *                     reader's region takes, 1 = 1 byte, 2 = 3, 3 = 64,
 *                     4 = 1000, 5-7 = pseudo-random 1 .. 2^16 (seed: byte 1);
 *                     1 and 3 bytes only for the first 4 KiB, then random
 *                     (byte-by-byte copies of bulk data find nothing new and
 *                     made long runs 20x slower)
 *           bit 3     pool keeps released buffers (1 MiB cache) instead of
 *                     freeing them at once (0: ASan sees every use after
 *                     release)
 *           bits 4-5  max_frame: 1 MiB, 64 KiB, 4 KiB, 1 MiB
 *           bit 6     after a stream error: em__reader_reset and go on with
 *                     the rest of the input (0: stop, as a server closes)
 *           bit 7     keep the frame memory of every message (em_buf_retain)
 *                     until the end of the input, as numpy arrays that view
 *                     it would
 *   byte 1            seed for the random chunk sizes
 *
 * Build (ASan + UBSan + libFuzzer, clang-14):  csrc/fuzz/build.sh [builddir]
 * Run (from the repository root, default builddir csrc/build-fuzz):
 *   short:   mkdir -p /tmp/corpus_frame && csrc/build-fuzz/fuzz_frame -max_total_time=60 -timeout=10 \
 *              -rss_limit_mb=2048 -artifact_prefix=/tmp/ /tmp/corpus_frame csrc/fuzz/corpus_frame
 *   long:    mkdir -p /tmp/cf && csrc/build-fuzz/fuzz_frame -max_total_time=600 -jobs=1 -timeout=10 \
 *              -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix=/tmp/ /tmp/cf csrc/fuzz/corpus_frame
 *   one input (regression): csrc/build-fuzz/fuzz_frame csrc/fuzz/regressions/fuzz_frame/NAME
 * The first corpus directory receives new inputs; keep the seed corpus read-only
 * by putting a scratch directory first. See csrc/fuzz/README.md.
 */
#include "fuzz_common.h"

#define FINE_CHUNK_BYTES 4096

static size_t chunk_size(unsigned mode, size_t off, uint32_t *rng) {
  static const size_t fixed[5] = {SIZE_MAX, 1, 3, 64, 1000};
  if (mode < 5 && !(mode >= 1 && mode <= 2 && off >= FINE_CHUNK_BYTES)) return fixed[mode];
  *rng ^= *rng << 13; /* xorshift32 */
  *rng ^= *rng >> 17;
  *rng ^= *rng << 5;
  unsigned bits = *rng % 17;
  return 1 + (*rng >> 8) % ((size_t)1 << bits);
}

#define MAX_KEPT 64

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 2) return 0;
  const uint8_t cfg = data[0];
  uint32_t rng = 0x9e3779b9u ^ ((uint32_t)data[1] * 0x01000193u);
  if (!rng) rng = 1;
  data += 2;
  size -= 2;
  static const uint64_t max_frames[4] = {1u << 20, 64u << 10, 4u << 10, 1u << 20};
  const uint64_t max_frame = max_frames[(cfg >> 4) & 3];
  const int resume = cfg & 0x40, keep = cfg & 0x80;

  em_pool *pool = em__pool_new(cfg & 8 ? (1u << 20) : 0);
  FUZZ_CHECK(pool != NULL, "em__pool_new");
  em__reader r;
  FUZZ_CHECK(em__reader_init(&r, pool, max_frame) == EM_OK, "em__reader_init");
  em_buf *kept[MAX_KEPT];
  size_t nkept = 0;

  size_t off = 0;
  int stopped = 0;
  while (off < size && !stopped) {
    uint8_t *dst;
    size_t room;
    em__reader_region(&r, &dst, &room);
    FUZZ_CHECK(room > 0, "the reader offers no room (the connection would stall)");
    size_t n = chunk_size(cfg & 7, off, &rng); /* once: EM__MIN evaluates its arguments twice */
    n = EM__MIN(n, EM__MIN(room, size - off));
    memcpy(dst, data + off, n);
    em__reader_commit(&r, n);
    off += n;
    for (;;) {
      em_msg *m = NULL;
      const char *why = NULL;
      int rc = em__reader_next(&r, &m, &why);
      if (rc == 0) break;
      if (rc == 1) {
        FUZZ_CHECK(m != NULL && m->frame_bytes <= max_frame, "message of %zu bytes, max_frame %llu",
                   m ? m->frame_bytes : 0, (unsigned long long)max_frame);
        fuzz_msg(m);
        if (keep && nkept < MAX_KEPT) kept[nkept++] = em_buf_retain(m->buf);
        em_msg_free(m);
        continue;
      }
      FUZZ_CHECK(rc == EM_EPROTO || rc == EM_EVERSION || rc == EM_ETOOBIG, "em__reader_next = %d", rc);
      FUZZ_CHECK(why != NULL && *why, "error %d without a reason", rc);
      if (resume) {
        em__reader_reset(&r);
        FUZZ_CHECK(!em__reader_mid_frame(&r), "mid-frame after reset");
      } else {
        stopped = 1;
      }
      break;
    }
  }
  (void)em__reader_mid_frame(&r);
  em__reader_destroy(&r);
  /* Frame memory outlives the reader and its owner (the pool stays alive
   * while a buffer holds it). */
  for (size_t i = 0; i < nkept; i++) {
    volatile uint8_t b = em_buf_data(kept[i])[0];
    (void)b;
    em_buf_release(kept[i]);
  }
  em__pool_release(pool);
  return 0;
}
