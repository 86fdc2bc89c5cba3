/* fuzz_payload.c: libFuzzer target for the body decoder: em__body_check
 * (em__scan, its depth and length checks), em__array_parse (dtype, shape,
 * blob size), em_msg_unpack, em_obj_array, em_obj_get and the encoder it is
 * round-tripped through (em_payload_pack_array, em__payload_frame), with
 * bodies that always arrive in structurally valid frames: the input is a
 * msgpack body plus a blob table; this target wraps it into a correct frame
 * (header from em__hdr_write, padding, table, 64-byte aligned blobs), so no
 * fuzzing effort is spent on the framing (fuzz_frame.c covers that).
 *
 * Input:
 *   byte 0, bits 0-3  number of blobs N (0..15)
 *           bit 4     fix up blob sizes: every EM_EXT_ARRAY ext found in
 *                     the body (ext 8/16/32 encodings, by a byte scan) sets
 *                     the length of the blob it names to what its dtype and
 *                     shape need, so array checks pass and decoding goes on
 *           bits 5-7  message type - 1 (any type is decoded the same way)
 *   N x u16 LE        blob lengths (before any fix-up)
 *   rest              the body (msgpack), body_length = its size
 * Blob bytes are a fixed pattern. The frame is checked with em__hdr_parse
 * and turned into an em_msg by em__frame_finish (both must accept it), then
 * fuzz_msg() in fuzz_common.h runs the decoder checks.
 *
 * Build (ASan + UBSan + libFuzzer, clang-14):  csrc/fuzz/build.sh [builddir]
 * Run (from the repository root, default builddir csrc/build-fuzz):
 *   short:   mkdir -p /tmp/corpus_payload && csrc/build-fuzz/fuzz_payload -max_total_time=60 -timeout=10 \
 *              -rss_limit_mb=2048 -artifact_prefix=/tmp/ /tmp/corpus_payload csrc/fuzz/corpus_payload
 *   long:    mkdir -p /tmp/cp && csrc/build-fuzz/fuzz_payload -max_total_time=600 -jobs=1 -timeout=10 \
 *              -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix=/tmp/ /tmp/cp csrc/fuzz/corpus_payload
 *   one input (regression): csrc/build-fuzz/fuzz_payload csrc/fuzz/regressions/fuzz_payload/NAME
 * See csrc/fuzz/README.md.
 */
#include "fuzz_common.h"

#define MAX_FIXED_BLOB (1u << 20)
#define MAX_BLOB_TOTAL (4u << 20)

/* Sizes that the array exts in `body` want for their blobs. A byte scan,
 * not a parse: it may find exts inside strings, which is fine. */
static void fixup_blob_lens(const uint8_t *b, size_t n, uint32_t nblobs, uint64_t *lens) {
  for (size_t i = 0; i + 3 <= n; i++) {
    size_t hdr, len;
    if (b[i] == 0xc7) {
      hdr = 3;
      len = b[i + 1];
    } else if (b[i] == 0xc8 && i + 4 <= n) {
      hdr = 4;
      len = ((size_t)b[i + 1] << 8) | b[i + 2];
    } else if (b[i] == 0xc9 && i + 6 <= n) {
      hdr = 6;
      len = ((size_t)b[i + 1] << 24) | ((size_t)b[i + 2] << 16) | ((size_t)b[i + 3] << 8) | b[i + 4];
    } else {
      continue;
    }
    if ((int8_t)b[i + hdr - 1] != EM_EXT_ARRAY || len < 7 || len > n - i - hdr) continue;
    const uint8_t *d = b + i + hdr;
    uint32_t blob = em__get_u32(d);
    size_t ndim = d[5], dl = d[6];
    if (blob >= nblobs || ndim > EM_ARRAY_MAX_NDIM || len != 7 + dl + 8 * ndim) continue;
    uint64_t size;
    if (!fuzz_ref_dtype(d + 7, dl, &size)) continue;
    if (size > MAX_FIXED_BLOB) size = MAX_FIXED_BLOB + 1; /* saturate; a 0 in the shape still wins */
    for (size_t k = 0; k < ndim; k++) {
      uint64_t s = em__get_u64(d + 7 + dl + 8 * k);
      if (s == 0) size = 0;
      else if (s > MAX_FIXED_BLOB || size * s > MAX_FIXED_BLOB) size = size ? MAX_FIXED_BLOB + 1 : 0;
      else size *= s;
    }
    if (size <= MAX_FIXED_BLOB) lens[blob] = size;
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1) return 0;
  const uint8_t cfg = data[0];
  const uint32_t nblobs = cfg & 15;
  if (size < 1 + 2 * (size_t)nblobs) return 0;
  uint64_t lens[16];
  for (uint32_t i = 0; i < nblobs; i++) lens[i] = em__get_u16(data + 1 + 2 * i);
  const uint8_t *body = data + 1 + 2 * nblobs;
  const size_t body_len = size - 1 - 2 * nblobs;
  if (body_len > UINT32_MAX) return 0;
  if (cfg & 16) fixup_blob_lens(body, body_len, nblobs, lens);
  uint64_t total = 0;
  for (uint32_t i = 0; i < nblobs; i++) total += lens[i];
  if (total > MAX_BLOB_TOTAL) return 0;

  /* the frame, laid out as docs/protocol.md says */
  em__hdr h;
  memset(&h, 0, sizeof h);
  h.type = (uint8_t)(1 + (cfg >> 5));
  h.req_id = 0x0123456789abcdefull;
  h.body_len = (uint32_t)body_len;
  h.nblobs = nblobs;
  for (int i = 0; i < 4; i++) h.ts_ns[i] = 1000u * (uint64_t)(i + 1);
  uint64_t off = EM__ALIGN_UP((uint64_t)EM_FRAME_HEADER_BYTES + body_len, 8) + 8ull * nblobs;
  uint64_t blob_off[16];
  for (uint32_t i = 0; i < nblobs; i++) {
    off = EM__ALIGN_UP(off, EM_BLOB_ALIGN);
    blob_off[i] = off;
    off += lens[i];
  }
  h.frame_len = off;

  em_pool *pool = em__pool_new(0);
  FUZZ_CHECK(pool != NULL, "em__pool_new");
  em_buf *buf = em__buf_alloc(pool, (size_t)h.frame_len);
  FUZZ_CHECK(buf != NULL, "em__buf_alloc(%llu)", (unsigned long long)h.frame_len);
  uint8_t *f = em_buf_data(buf);
  memset(f, 0, (size_t)h.frame_len);
  em__hdr_write(f, &h);
  memcpy(f + EM_FRAME_HEADER_BYTES, body, body_len);
  uint8_t *table = f + EM__ALIGN_UP((uint64_t)EM_FRAME_HEADER_BYTES + body_len, 8);
  for (uint32_t i = 0; i < nblobs; i++) {
    em__put_u64(table + 8 * i, lens[i]);
    for (uint64_t k = 0; k < lens[i]; k++) f[blob_off[i] + k] = (uint8_t)(i * 31 + k * 7 + 1);
  }

  em__hdr h2;
  const char *why = NULL;
  int rc = em__hdr_parse(f, h.frame_len, &h2, &why);
  FUZZ_CHECK(rc == EM_OK, "a well-formed header is rejected: %d %s", rc, why);
  FUZZ_CHECK(h2.version == EM_PROTOCOL_VERSION && h2.type == h.type && h2.flags == h.flags &&
                 h2.req_id == h.req_id && h2.body_len == h.body_len && h2.nblobs == h.nblobs &&
                 h2.frame_len == h.frame_len && memcmp(h2.ts_ns, h.ts_ns, sizeof h.ts_ns) == 0,
             "em__hdr_parse(em__hdr_write(h)) != h");
  if (h.frame_len > EM_FRAME_HEADER_BYTES) {
    rc = em__hdr_parse(f, h.frame_len - 1, &h2, &why);
    FUZZ_CHECK(rc == EM_ETOOBIG, "frame_len above max_frame: %d", rc);
  }
  em_msg *m = NULL;
  rc = em__frame_finish(buf, &h, &m, &why);
  FUZZ_CHECK(rc == EM_OK, "a well-formed frame is rejected: %d %s", rc, why);
  FUZZ_CHECK(m->body_len == body_len && m->nblobs == nblobs && m->frame_bytes == h.frame_len, "em_msg fields");
  for (uint32_t i = 0; i < nblobs; i++)
    FUZZ_CHECK(m->blobs[i].data == f + blob_off[i] && m->blobs[i].len_bytes == lens[i], "blob %u placed wrong", i);

  fuzz_msg(m);

  em_msg_free(m); /* releases buf */
  em__pool_release(pool);
  return 0;
}
