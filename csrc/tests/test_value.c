/* test_value.c: the public value API of edgeml.h ("values" and "outgoing
 * payloads", csrc/wire/value.c): every em_put_* writer round-tripped through
 * em_frame_encode -> em_frame_decode -> em_msg_value / em_reader; the
 * random-access helpers and conversions; the writer's sticky error and
 * completeness checks; the reader refusing malformed, truncated, lying,
 * too deep, trailing and too costly bodies; the test vectors of
 * docs/protocol.md; and a differential check of the reader against the
 * internal body checker em__body_check (the two must accept the same
 * bodies).
 *
 * Open findings in value.c as of aa1b79b (these checks fail until fixed):
 *  - em_read_skip stops as soon as the skipped container's own count is
 *    used up, leaving the elements of its last element unread when that is
 *    a non-empty container: body 91 91 01 ([[1]]) -> em_read_skip OK, then
 *    em_reader_finish EDECODE "not all of the body was read" (em__body_check
 *    accepts it); in [[[1], [2]], 9] the next em_read returns 2, not 9.
 *    (test_reader_refusals, test_writer_rules at depth 32, test_cost_bombs,
 *    test_differential)
 *  - the writer undercounts nesting: a container that is its parent's last
 *    element is counted after the parent was closed, so 33 nested
 *    em_put_list(p, 1) (or em_put_map(p, 1) + key) + a value build and
 *    em_frame_encode returns OK, for a body the reader refuses
 *    (test_writer_rules).
 *  - em__tok peeks at a list's first element for a tuple/set tag by calling
 *    itself, once per nested list, before any depth check: em_read on a
 *    body of 0x91 x 30000 then 0x01 overflows the stack (SIGSEGV; ASan
 *    stack-overflow in em__tok) (test_reader_long_nesting). */
#include "../wire/em_wire.h"
#include "em_test.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <sys/wait.h>
#include <unistd.h>

/* ------------------------------------------------------------ helpers */

/* A frame laid out by hand as docs/protocol.md says (independent of the
 * encoder): header, body, pad to 8, blob table, 64-aligned blobs. Blob i
 * holds the bytes (i * 31 + k * 7 + 1). Caller frees. */
static uint8_t *frame_by_hand(uint8_t type, uint64_t req_id, const uint8_t *body, size_t body_len, uint32_t nblobs,
                              const uint64_t *blob_lens, size_t *len) {
  uint64_t off = EM__ALIGN_UP((uint64_t)EM_FRAME_HEADER_BYTES + body_len, 8) + 8ull * nblobs;
  uint64_t boff[16];
  for (uint32_t i = 0; i < nblobs; i++) {
    off = EM__ALIGN_UP(off, EM_BLOB_ALIGN);
    boff[i] = off;
    off += blob_lens[i];
  }
  uint8_t *f = calloc(1, (size_t)off);
  memcpy(f, "EDGM", 4);
  f[4] = EM_PROTOCOL_VERSION;
  f[5] = type;
  em__put_u64(f + 8, req_id);
  em__put_u32(f + 16, (uint32_t)body_len);
  em__put_u32(f + 20, nblobs);
  em__put_u64(f + 24, off);
  if (body_len) memcpy(f + EM_FRAME_HEADER_BYTES, body, body_len);
  uint8_t *table = f + EM__ALIGN_UP((uint64_t)EM_FRAME_HEADER_BYTES + body_len, 8);
  for (uint32_t i = 0; i < nblobs; i++) {
    em__put_u64(table + 8 * i, blob_lens[i]);
    for (uint64_t k = 0; k < blob_lens[i]; k++) f[boff[i] + k] = (uint8_t)(i * 31 + k * 7 + 1);
  }
  *len = (size_t)off;
  return f;
}

/* A received message with this body and blobs (NULL if the frame fails). */
static em_msg *msg_of(const uint8_t *body, size_t body_len, uint32_t nblobs, const uint64_t *blob_lens) {
  size_t len;
  uint8_t *f = frame_by_hand(EM_MSG_REPLY, 1, body, body_len, nblobs, blob_lens, &len);
  em_msg *m = NULL;
  const char *why = NULL;
  int rc = em_frame_decode(f, len, 0, &m, &why);
  free(f);
  if (rc) {
    fprintf(stderr, "em_frame_decode: %d %s\n", rc, why ? why : "");
    return NULL;
  }
  return m;
}

/* em_frame_encode -> em_frame_decode. NULL (and a failed check) on error. */
static em_msg *roundtrip(em_payload *p) {
  uint8_t *f = NULL;
  size_t len = 0;
  int rc = em_frame_encode(p, EM_MSG_REPLY, 99, &f, &len);
  CHECK_EQ(rc, EM_OK);
  if (rc) return NULL;
  em_msg *m = NULL;
  const char *why = NULL;
  rc = em_frame_decode(f, len, 0, &m, &why);
  CHECK_EQ(rc, EM_OK);
  free(f);
  if (rc) return NULL;
  CHECK_EQ(m->type, EM_MSG_REPLY);
  CHECK_EQ(m->req_id, 99);
  return m;
}

/* The whole body read with the one-pass reader: skip + finish. */
static int reader_accepts(const em_msg *m, const char **why) {
  em_reader r;
  em_reader_init(&r, m);
  int rc = em_read_skip(&r);
  if (rc == EM_OK) rc = em_reader_finish(&r);
  if (why) *why = em_reader_why(&r);
  return rc;
}

/* Text of one value (its own token: containers give their kind and size). */
typedef struct sbuf {
  char s[8192];
  size_t n;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  if (b->n < sizeof b->s) {
    int k = vsnprintf(b->s + b->n, sizeof b->s - b->n, fmt, ap);
    if (k > 0) b->n = EM__MIN(b->n + (size_t)k, sizeof b->s - 1);
  }
  va_end(ap);
}

static void tok_text(sbuf *b, const em_value *v) {
  if (b->n) sb_printf(b, " ");
  switch (v->type) {
    case EM_T_NIL: sb_printf(b, "nil"); break;
    case EM_T_BOOL: sb_printf(b, v->as.b ? "T" : "F"); break;
    case EM_T_INT: sb_printf(b, "i%lld", (long long)v->as.i); break;
    case EM_T_UINT: sb_printf(b, "u%llu", (unsigned long long)v->as.u); break;
    case EM_T_FLOAT: sb_printf(b, "f%.17g", v->as.f); break;
    case EM_T_STR:
      if (v->len <= 40) sb_printf(b, "s'%.*s'", (int)v->len, v->as.str);
      else sb_printf(b, "s#%u", v->len);
      break;
    case EM_T_BIN: sb_printf(b, "b#%u", v->len); break;
    case EM_T_LIST: sb_printf(b, "L%u", v->len); break;
    case EM_T_TUPLE: sb_printf(b, "T%u", v->len); break;
    case EM_T_SET: sb_printf(b, "S%u", v->len); break;
    case EM_T_MAP: sb_printf(b, "M%u", v->len); break;
    case EM_T_NDARRAY: {
      em_array a;
      if (em_value_ndarray(v, &a)) {
        sb_printf(b, "A?");
        break;
      }
      sb_printf(b, "%s%s(", a.is_scalar ? "a" : "A", a.dtype);
      for (uint32_t i = 0; i < a.ndim; i++) sb_printf(b, i ? ",%llu" : "%llu", (unsigned long long)a.shape[i]);
      sb_printf(b, ")");
      break;
    }
    case EM_T_EXT: sb_printf(b, "x%d#%u", v->ext_type, v->len); break;
    default: sb_printf(b, "?%d", (int)v->type); break;
  }
}

static uint64_t n_elems(const em_value *v) {
  if (v->type == EM_T_MAP) return 2ull * v->len;
  if (v->type >= EM_T_LIST && v->type <= EM_T_SET) return v->len;
  return 0;
}

/* The body as text, read token by token with em_read. */
static int dump_reader(const em_msg *m, sbuf *b) {
  em_reader r;
  em_reader_init(&r, m);
  b->n = 0;
  b->s[0] = 0;
  uint64_t pending = 1;
  while (pending) {
    em_value v;
    int rc = em_read(&r, &v);
    if (rc) return rc;
    tok_text(b, &v);
    pending = pending - 1 + n_elems(&v);
  }
  return em_reader_finish(&r);
}

/* The same text by random access: em_msg_value + em_iter, recursively. */
static void dump_value_rec(const em_value *v, sbuf *b, int *bad) {
  tok_text(b, v);
  em_iter it;
  em_iter_init(&it, v);
  em_value e;
  uint64_t n = 0;
  while (em_iter_next(&it, &e)) {
    dump_value_rec(&e, b, bad);
    n++;
  }
  if (n != n_elems(v)) *bad = 1;
}

static int dump_value(const em_msg *m, sbuf *b) {
  b->n = 0;
  b->s[0] = 0;
  em_value v;
  int rc = em_msg_value(m, &v);
  if (rc) return rc;
  int bad = 0;
  dump_value_rec(&v, b, &bad);
  return bad ? EM_EDECODE : EM_OK;
}

/* Both dumps of m must equal `want`. */
#define CHECK_DUMP(m, want)                                                           \
  do {                                                                                \
    sbuf _b1, _b2;                                                                    \
    CHECK_EQ(dump_reader((m), &_b1), EM_OK);                                          \
    CHECK_EQ(dump_value((m), &_b2), EM_OK);                                           \
    CHECK(strcmp(_b1.s, (want)) == 0);                                                \
    CHECK(strcmp(_b2.s, (want)) == 0);                                                \
    if (strcmp(_b1.s, (want)) || strcmp(_b2.s, (want)))                               \
      fprintf(stderr, "  want   %s\n  reader %s\n  value  %s\n", (want), _b1.s, _b2.s); \
  } while (0)

static void hex_dump(const char *label, const uint8_t *b, size_t n) {
  fprintf(stderr, "  %s (%zu bytes):", label, n);
  for (size_t i = 0; i < n && i < 200; i++) fprintf(stderr, " %02x", b[i]);
  fprintf(stderr, n > 200 ? " ...\n" : "\n");
}

/* -------------------------------------------------------------- ints */

static void test_ints(void) {
  static const struct {
    int64_t v;
    uint8_t first; /* the msgpack type byte (minimal encoding) */
    size_t len;
  } ints[] = {
      {0, 0x00, 1},
      {1, 0x01, 1},
      {127, 0x7f, 1},
      {128, 0xcc, 2},
      {255, 0xcc, 2},
      {256, 0xcd, 3},
      {65535, 0xcd, 3},
      {65536, 0xce, 5},
      {4294967295LL, 0xce, 5},
      {4294967296LL, 0xcf, 9},
      {INT64_MAX, 0xcf, 9},
      {-1, 0xff, 1},
      {-32, 0xe0, 1},
      {-33, 0xd0, 2},
      {-128, 0xd0, 2},
      {-129, 0xd1, 3},
      {-32768, 0xd1, 3},
      {-32769, 0xd2, 5},
      {INT32_MIN, 0xd2, 5},
      {(int64_t)INT32_MIN - 1, 0xd3, 9},
      {INT64_MIN + 1, 0xd3, 9},
      {INT64_MIN, 0xd3, 9},
  };
  em_payload *p = em_payload_new();
  CHECK(p != NULL);
  for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
    em_payload_reset(p);
    CHECK_EQ(em_put_int(p, ints[i].v), EM_OK);
    em_msg *m = roundtrip(p);
    if (!m) continue;
    CHECK_EQ(m->body_len, ints[i].len);
    CHECK_EQ(m->body[0], ints[i].first);
    em_value v;
    CHECK_EQ(em_msg_value(m, &v), EM_OK);
    CHECK_EQ(v.type, EM_T_INT);
    CHECK(v.as.i == ints[i].v);
    int64_t i64 = 0;
    CHECK_EQ(em_value_int(&v, &i64), EM_OK);
    CHECK(i64 == ints[i].v);
    uint64_t u64 = 12345;
    CHECK_EQ(em_value_uint(&v, &u64), ints[i].v >= 0 ? EM_OK : EM_EINVAL);
    if (ints[i].v >= 0) CHECK(u64 == (uint64_t)ints[i].v);
    double d = 0;
    CHECK_EQ(em_value_double(&v, &d), EM_OK);
    CHECK(d == (double)ints[i].v);
    int b;
    CHECK_EQ(em_value_bool(&v, &b), EM_EINVAL);
    /* the reader sees the same */
    em_reader r;
    em_reader_init(&r, m);
    em_value w;
    CHECK_EQ(em_read(&r, &w), EM_OK);
    CHECK(w.type == EM_T_INT && w.as.i == ints[i].v);
    CHECK_EQ(em_reader_finish(&r), EM_OK);
    CHECK(em_reader_why(&r) == NULL);
    em_msg_free(m);
  }

  static const struct {
    uint64_t v;
    uint8_t first;
    size_t len;
  } uints[] = {
      {0, 0x00, 1},
      {127, 0x7f, 1},
      {128, 0xcc, 2},
      {255, 0xcc, 2},
      {256, 0xcd, 3},
      {65535, 0xcd, 3},
      {65536, 0xce, 5},
      {UINT32_MAX, 0xce, 5},
      {(uint64_t)UINT32_MAX + 1, 0xcf, 9},
      {(uint64_t)INT64_MAX, 0xcf, 9},
      {(uint64_t)INT64_MAX + 1, 0xcf, 9},
      {UINT64_MAX - 1, 0xcf, 9},
      {UINT64_MAX, 0xcf, 9},
  };
  for (size_t i = 0; i < sizeof uints / sizeof uints[0]; i++) {
    em_payload_reset(p);
    CHECK_EQ(em_put_uint(p, uints[i].v), EM_OK);
    em_msg *m = roundtrip(p);
    if (!m) continue;
    CHECK_EQ(m->body_len, uints[i].len);
    CHECK_EQ(m->body[0], uints[i].first);
    em_value v;
    CHECK_EQ(em_msg_value(m, &v), EM_OK);
    int big = uints[i].v > (uint64_t)INT64_MAX;
    CHECK_EQ(v.type, big ? EM_T_UINT : EM_T_INT);
    if (big) CHECK(v.as.u == uints[i].v);
    else CHECK(v.as.i == (int64_t)uints[i].v);
    uint64_t u64 = 0;
    CHECK_EQ(em_value_uint(&v, &u64), EM_OK);
    CHECK(u64 == uints[i].v);
    int64_t i64 = 777;
    CHECK_EQ(em_value_int(&v, &i64), big ? EM_EINVAL : EM_OK); /* above INT64_MAX: out of range */
    if (!big) CHECK(i64 == (int64_t)uints[i].v);
    double d = 0;
    CHECK_EQ(em_value_double(&v, &d), EM_OK);
    CHECK(d == (double)uints[i].v);
    em_msg_free(m);
  }

  /* non-minimal encodings on the wire decode to the same values */
  static const struct {
    uint8_t b[9];
    size_t n;
    int64_t v;
  } wide[] = {
      {{0xcc, 0x05}, 2, 5},
      {{0xcd, 0x00, 0x05}, 3, 5},
      {{0xce, 0, 0, 0, 5}, 5, 5},
      {{0xcf, 0, 0, 0, 0, 0, 0, 0, 5}, 9, 5},
      {{0xd0, 0xff}, 2, -1},
      {{0xd1, 0xff, 0xfe}, 3, -2},
      {{0xd2, 0xff, 0xff, 0xff, 0xfd}, 5, -3},
      {{0xd3, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfc}, 9, -4},
      {{0xd3, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, 9, INT64_MAX},
      {{0xd0, 0x05}, 2, 5},
  };
  for (size_t i = 0; i < sizeof wide / sizeof wide[0]; i++) {
    em_msg *m = msg_of(wide[i].b, wide[i].n, 0, NULL);
    CHECK(m != NULL);
    if (!m) continue;
    em_value v;
    CHECK_EQ(em_msg_value(m, &v), EM_OK);
    CHECK(v.type == EM_T_INT && v.as.i == wide[i].v);
    em_msg_free(m);
  }
  em_payload_free(p);
}

/* ----------------------------------------------------------- doubles */

static void test_doubles(void) {
  const double ds[] = {0.0, -0.0, 1.5, -2.25, 1e300, -1e-300, DBL_MAX, DBL_MIN, 4.9e-324, INFINITY, -INFINITY, NAN};
  em_payload *p = em_payload_new();
  for (size_t i = 0; i < sizeof ds / sizeof ds[0]; i++) {
    em_payload_reset(p);
    CHECK_EQ(em_put_double(p, ds[i]), EM_OK);
    em_msg *m = roundtrip(p);
    if (!m) continue;
    CHECK_EQ(m->body_len, 9);
    CHECK_EQ(m->body[0], 0xcb);
    em_value v;
    CHECK_EQ(em_msg_value(m, &v), EM_OK);
    CHECK_EQ(v.type, EM_T_FLOAT);
    CHECK(memcmp(&v.as.f, &ds[i], sizeof(double)) == 0); /* bit for bit: -0.0, NaN */
    double d = 0;
    CHECK_EQ(em_value_double(&v, &d), EM_OK);
    CHECK(memcmp(&d, &ds[i], sizeof(double)) == 0);
    int64_t i64;
    uint64_t u64;
    CHECK_EQ(em_value_int(&v, &i64), EM_EINVAL);
    CHECK_EQ(em_value_uint(&v, &u64), EM_EINVAL);
    em_msg_free(m);
  }
  /* a float32 on the wire is widened */
  const uint8_t f32[] = {0xca, 0x3f, 0xc0, 0x00, 0x00};
  em_msg *m = msg_of(f32, sizeof f32, 0, NULL);
  CHECK(m != NULL);
  if (m) {
    em_value v;
    CHECK_EQ(em_msg_value(m, &v), EM_OK);
    CHECK(v.type == EM_T_FLOAT && v.as.f == 1.5);
    em_msg_free(m);
  }
  em_payload_free(p);
}

/* ------------------------------------------------------- str and bin */

static void test_str_bin(void) {
  const size_t lens[] = {0, 1, 31, 32, 255, 256, 65535, 65536, 70000};
  const uint8_t str_first[] = {0xa0, 0xa1, 0xbf, 0xd9, 0xd9, 0xda, 0xda, 0xdb, 0xdb};
  const size_t str_hdr[] = {1, 1, 1, 2, 2, 3, 3, 5, 5};
  const uint8_t bin_first[] = {0xc4, 0xc4, 0xc4, 0xc4, 0xc4, 0xc5, 0xc5, 0xc6, 0xc6};
  const size_t bin_hdr[] = {2, 2, 2, 2, 2, 3, 3, 5, 5};
  char *s = malloc(70001);
  for (size_t i = 0; i < 70000; i++) s[i] = (char)('a' + i % 26);
  s[70000] = 0;
  em_payload *p = em_payload_new();
  for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
    for (int bin = 0; bin < 2; bin++) {
      em_payload_reset(p);
      CHECK_EQ(bin ? em_put_bin(p, s, lens[i]) : em_put_str(p, s, lens[i]), EM_OK);
      em_msg *m = roundtrip(p);
      if (!m) continue;
      CHECK_EQ(m->body[0], bin ? bin_first[i] : str_first[i]);
      CHECK_EQ(m->body_len, lens[i] + (bin ? bin_hdr[i] : str_hdr[i]));
      em_value v;
      CHECK_EQ(em_msg_value(m, &v), EM_OK);
      CHECK_EQ(v.type, bin ? EM_T_BIN : EM_T_STR);
      CHECK_EQ(v.len, lens[i]);
      CHECK(lens[i] == 0 || memcmp(v.as.bin, s, lens[i]) == 0);
      CHECK((const uint8_t *)v.as.bin >= m->body && (const uint8_t *)v.as.bin + v.len <= m->body + m->body_len);
      em_reader r;
      em_reader_init(&r, m);
      em_value w;
      CHECK_EQ(em_read(&r, &w), EM_OK);
      CHECK(w.type == v.type && w.len == v.len && w.as.bin == v.as.bin);
      CHECK_EQ(em_reader_finish(&r), EM_OK);
      em_msg_free(m);
    }
  }
  /* em_put_cstr, and the empty cstr */
  em_payload_reset(p);
  CHECK_EQ(em_put_list(p, 2), EM_OK);
  CHECK_EQ(em_put_cstr(p, "hello"), EM_OK);
  CHECK_EQ(em_put_cstr(p, ""), EM_OK);
  em_msg *m = roundtrip(p);
  if (m) {
    CHECK_DUMP(m, "L2 s'hello' s''");
    em_value root, e;
    CHECK_EQ(em_msg_value(m, &root), EM_OK);
    CHECK_EQ(em_value_at(&root, 1, &e), EM_OK);
    CHECK(e.type == EM_T_STR && e.len == 0);
    CHECK(em_value_is(&e, ""));
    CHECK(!em_value_is(&e, "x"));
    em_msg_free(m);
  }
  em_payload_free(p);
  free(s);
}

/* ----------------------------------------------------------- nesting */

static void test_nested(void) {
  em_payload *p = em_payload_new();
  CHECK_EQ(em_put_map(p, 7), EM_OK);
  CHECK_EQ(em_put_cstr(p, "l"), EM_OK);
  CHECK_EQ(em_put_list(p, 3), EM_OK);
  CHECK_EQ(em_put_int(p, 1), EM_OK);
  CHECK_EQ(em_put_tuple(p, 2), EM_OK);
  CHECK_EQ(em_put_int(p, 2), EM_OK);
  CHECK_EQ(em_put_cstr(p, "x"), EM_OK);
  CHECK_EQ(em_put_set(p, 1), EM_OK);
  CHECK_EQ(em_put_int(p, 3), EM_OK);
  CHECK_EQ(em_put_cstr(p, "m"), EM_OK);
  CHECK_EQ(em_put_map(p, 0), EM_OK);
  CHECK_EQ(em_put_cstr(p, "e"), EM_OK);
  CHECK_EQ(em_put_list(p, 0), EM_OK);
  CHECK_EQ(em_put_cstr(p, "t"), EM_OK);
  CHECK_EQ(em_put_tuple(p, 0), EM_OK);
  CHECK_EQ(em_put_cstr(p, "s"), EM_OK);
  CHECK_EQ(em_put_set(p, 0), EM_OK);
  /* non-str keys: an int, nil, a tuple */
  CHECK_EQ(em_put_int(p, -5), EM_OK);
  CHECK_EQ(em_put_map(p, 2), EM_OK);
  CHECK_EQ(em_put_nil(p), EM_OK);
  CHECK_EQ(em_put_bool(p, 1), EM_OK);
  CHECK_EQ(em_put_tuple(p, 1), EM_OK);
  CHECK_EQ(em_put_bool(p, 0), EM_OK);
  CHECK_EQ(em_put_list(p, 1), EM_OK);
  CHECK_EQ(em_put_list(p, 1), EM_OK);
  CHECK_EQ(em_put_double(p, 0.5), EM_OK);
  CHECK_EQ(em_put_cstr(p, "b"), EM_OK);
  CHECK_EQ(em_put_bin(p, "\x00\x01", 2), EM_OK);
  CHECK_EQ(em_payload_error(p), EM_OK);
  em_msg *m = roundtrip(p);
  if (m) {
    CHECK_DUMP(m, "M7 s'l' L3 i1 T2 i2 s'x' S1 i3 s'm' M0 s'e' L0 s't' T0 s's' S0 i-5 M2 nil T T1 F L1 L1 "
                  "f0.5 s'b' b#2");
    em_value root, l, t, x, n;
    CHECK_EQ(em_msg_value(m, &root), EM_OK);
    CHECK_EQ(em_value_get(&root, "l", &l), 1);
    CHECK(l.type == EM_T_LIST && l.len == 3);
    CHECK_EQ(em_value_at(&l, 1, &t), EM_OK);
    CHECK(t.type == EM_T_TUPLE && t.len == 2);
    CHECK_EQ(em_value_at(&t, 1, &x), EM_OK);
    CHECK(em_value_is(&x, "x"));
    CHECK_EQ(em_value_at(&l, 2, &x), EM_OK);
    CHECK(x.type == EM_T_SET && x.len == 1);
    CHECK_EQ(em_value_at(&x, 0, &n), EM_OK);
    CHECK(n.type == EM_T_INT && n.as.i == 3);
    CHECK_EQ(em_value_get(&root, "t", &x), 1);
    CHECK(x.type == EM_T_TUPLE && x.len == 0);
    CHECK_EQ(em_value_at(&x, 0, &n), EM_EINVAL);
    CHECK_EQ(em_value_get(&root, "s", &x), 1);
    CHECK(x.type == EM_T_SET && x.len == 0);
    CHECK_EQ(em_value_get(&root, "b", &x), 1);
    CHECK(x.type == EM_T_BIN && x.len == 2 && x.as.bin[0] == 0 && x.as.bin[1] == 1);
    em_msg_free(m);
  }
  em_payload_free(p);
}

/* ---------------------------------------------------------- ndarrays */

static void test_ndarray(void) {
  static float f4[6] = {0, 1, 2, 3, 4, 5};
  static uint8_t u1[5] = {9, 8, 7, 6, 5};
  static int64_t i8 = -42;
  static int16_t i2[4] = {1, -2, 3, -4};
  static uint8_t b1[3] = {1, 0, 1};
  static double c16[2] = {1.0, -1.0};
  static uint32_t u3[6] = {'a', 'b', 'c', 'd', 'e', 'f'};
  static int64_t m8[2] = {1, 2};
  static float scal = 1.5f;
  const struct {
    const char *dtype;
    uint32_t ndim;
    uint64_t shape[3];
    const void *data;
    size_t len;
    uint32_t itemsize;
  } arrs[] = {
      {"<f4", 2, {2, 3}, f4, sizeof f4, 4},
      {"|u1", 1, {5}, u1, sizeof u1, 1},
      {"<i8", 0, {0}, &i8, sizeof i8, 8},          /* 0-d */
      {"<f8", 1, {0}, NULL, 0, 8},                 /* empty */
      {"<i8", 3, {2, 0, 7}, f4, 0, 8},             /* empty, several dims */
      {">i2", 2, {2, 2}, i2, sizeof i2, 2},
      {"|b1", 1, {3}, b1, sizeof b1, 1},
      {"<c16", 1, {1}, c16, sizeof c16, 16},
      {"<U3", 1, {2}, u3, sizeof u3, 12},
      {"<M8[ns]", 1, {2}, m8, sizeof m8, 8},
      {"|S0", 1, {4}, NULL, 0, 0},                 /* zero item size */
  };
  const size_t na = sizeof arrs / sizeof arrs[0];
  em_payload *p = em_payload_new();
  CHECK_EQ(em_put_list(p, (uint32_t)na + 1), EM_OK);
  for (size_t i = 0; i < na; i++)
    CHECK_EQ(em_put_ndarray(p, arrs[i].dtype, arrs[i].ndim, arrs[i].shape, arrs[i].data, arrs[i].len), EM_OK);
  CHECK_EQ(em_put_scalar(p, "<f4", &scal, sizeof scal), EM_OK);
  em_msg *m = roundtrip(p);
  if (m) {
    CHECK_EQ(m->nblobs, na + 1);
    CHECK_DUMP(m, "L12 A<f4(2,3) A|u1(5) A<i8() A<f8(0) A<i8(2,0,7) A>i2(2,2) A|b1(3) A<c16(1) A<U3(2) "
                  "A<M8[ns](2) A|S0(4) a<f4()");
    em_value root, e;
    CHECK_EQ(em_msg_value(m, &root), EM_OK);
    em_iter it;
    em_iter_init(&it, &root);
    for (size_t i = 0; i <= na; i++) {
      CHECK_EQ(em_iter_next(&it, &e), 1);
      CHECK_EQ(e.type, EM_T_NDARRAY);
      em_array a;
      CHECK_EQ(em_value_ndarray(&e, &a), EM_OK);
      CHECK_EQ(a.blob, i);
      CHECK(((uintptr_t)a.data % EM_BLOB_ALIGN) == 0);
      CHECK(a.data == m->blobs[i].data);
      if (i == na) {
        CHECK(strcmp(a.dtype, "<f4") == 0);
        CHECK_EQ(a.is_scalar, 1);
        CHECK_EQ(a.ndim, 0);
        CHECK_EQ(a.len_bytes, 4);
        CHECK(memcmp(a.data, &scal, 4) == 0);
        continue;
      }
      CHECK(strcmp(a.dtype, arrs[i].dtype) == 0);
      CHECK_EQ(a.is_scalar, 0);
      CHECK_EQ(a.ndim, arrs[i].ndim);
      for (uint32_t d = 0; d < a.ndim; d++) CHECK_EQ(a.shape[d], arrs[i].shape[d]);
      CHECK_EQ(a.itemsize, arrs[i].itemsize);
      CHECK_EQ(a.len_bytes, arrs[i].len);
      CHECK(arrs[i].len == 0 || memcmp(a.data, arrs[i].data, arrs[i].len) == 0);
    }
    CHECK_EQ(em_iter_next(&it, &e), 0);
    CHECK_EQ(em_iter_next(&it, &e), 0); /* stays at the end */
    /* not an ndarray */
    em_array a;
    CHECK_EQ(em_value_ndarray(&root, &a), EM_EINVAL);
    em_msg_free(m);
  }

  /* refusals: size disagreeing with dtype x shape, a bad dtype, too many
   * dims; the first one sticks */
  uint64_t sh[1] = {5};
  em_payload_reset(p);
  CHECK_EQ(em_put_list(p, 1), EM_OK);
  CHECK_EQ(em_put_ndarray(p, "<f4", 1, sh, f4, 12), EM_EINVAL);
  CHECK_EQ(em_payload_error(p), EM_EINVAL);
  CHECK(em_put_int(p, 1) != EM_OK);
  uint8_t *f;
  size_t fl;
  CHECK_EQ(em_frame_encode(p, EM_MSG_REPLY, 1, &f, &fl), EM_EENCODE);
  CHECK(f == NULL);
  const char *bad_dtypes[] = {"O8", "<f", "f4", "<x4", "<i0", "<f4[ns]", "<M8[n", "<S99999999", "<U1234567890123"};
  for (size_t i = 0; i < sizeof bad_dtypes / sizeof bad_dtypes[0]; i++) {
    em_payload_reset(p);
    CHECK_EQ(em_put_ndarray(p, bad_dtypes[i], 1, sh, u1, 5), EM_EINVAL);
    CHECK_EQ(em_frame_encode(p, EM_MSG_REPLY, 1, &f, &fl), EM_EENCODE);
  }
  uint64_t many[EM_ARRAY_MAX_NDIM + 1];
  for (int i = 0; i <= EM_ARRAY_MAX_NDIM; i++) many[i] = 1;
  em_payload_reset(p);
  CHECK_EQ(em_put_ndarray(p, "|u1", EM_ARRAY_MAX_NDIM + 1, many, u1, 1), EM_EINVAL);
  em_payload_reset(p);
  CHECK_EQ(em_put_ndarray(p, "|u1", EM_ARRAY_MAX_NDIM, many, u1, 1), EM_OK);
  m = roundtrip(p);
  if (m) {
    em_value v;
    em_array a;
    CHECK_EQ(em_msg_value(m, &v), EM_OK);
    CHECK_EQ(em_value_ndarray(&v, &a), EM_OK);
    CHECK_EQ(a.ndim, EM_ARRAY_MAX_NDIM);
    em_msg_free(m);
  }
  em_payload_reset(p);
  CHECK_EQ(em_put_scalar(p, "<f4", &scal, 8), EM_EINVAL);
  em_payload_free(p);
}

/* ------------------------------------------ em_put_value (copying) */

static void test_put_value(void) {
  static float f4[3] = {1, 2, 3};
  static uint8_t none[1];
  static double sc = 2.5;
  uint64_t sh3[1] = {3}, sh20[2] = {2, 0};
  em_payload *p = em_payload_new();
  CHECK_EQ(em_put_map(p, 6), EM_OK);
  CHECK_EQ(em_put_cstr(p, "a"), EM_OK);
  CHECK_EQ(em_put_ndarray(p, "<f4", 1, sh3, f4, sizeof f4), EM_OK);
  CHECK_EQ(em_put_cstr(p, "t"), EM_OK);
  CHECK_EQ(em_put_tuple(p, 3), EM_OK);
  CHECK_EQ(em_put_uint(p, UINT64_MAX), EM_OK);
  CHECK_EQ(em_put_int(p, INT64_MIN), EM_OK);
  CHECK_EQ(em_put_set(p, 2), EM_OK);
  CHECK_EQ(em_put_nil(p), EM_OK);
  CHECK_EQ(em_put_bool(p, 0), EM_OK);
  CHECK_EQ(em_put_cstr(p, "z"), EM_OK);
  CHECK_EQ(em_put_ndarray(p, "<i8", 2, sh20, none, 0), EM_OK);
  CHECK_EQ(em_put_int(p, 7), EM_OK);
  CHECK_EQ(em_put_scalar(p, "<f8", &sc, sizeof sc), EM_OK);
  CHECK_EQ(em_put_bin(p, "xyz", 3), EM_OK);
  CHECK_EQ(em_put_list(p, 2), EM_OK);
  CHECK_EQ(em_put_double(p, -0.25), EM_OK);
  CHECK_EQ(em_put_map(p, 1), EM_OK);
  CHECK_EQ(em_put_cstr(p, ""), EM_OK);
  CHECK_EQ(em_put_str(p, "q\0r", 3), EM_OK);
  CHECK_EQ(em_put_cstr(p, "e"), EM_OK);
  CHECK_EQ(em_put_map(p, 0), EM_OK);
  em_msg *m1 = roundtrip(p);
  if (!m1) {
    em_payload_free(p);
    return;
  }
  const char *want = "M6 s'a' A<f4(3) s't' T3 u18446744073709551615 i-9223372036854775808 S2 nil F s'z' "
                     "A<i8(2,0) i7 a<f8() b#3 L2 f-0.25 M1 s'' s'q' s'e' M0";
  sbuf b;
  CHECK_EQ(dump_reader(m1, &b), EM_OK);
  /* (the str "q\0r" prints as 'q' through %.*s) */
  CHECK(strcmp(b.s, want) == 0);
  if (strcmp(b.s, want)) fprintf(stderr, "  got %s\n", b.s);

  /* copy the root, then each map value separately into a list */
  em_value root;
  CHECK_EQ(em_msg_value(m1, &root), EM_OK);
  em_payload *q = em_payload_new();
  CHECK_EQ(em_put_value(q, &root), EM_OK);
  em_msg *m2 = roundtrip(q);
  if (m2) {
    CHECK_EQ(m2->body_len, m1->body_len);
    CHECK(m2->body_len == m1->body_len && memcmp(m2->body, m1->body, m1->body_len) == 0);
    CHECK_EQ(m2->nblobs, m1->nblobs);
    for (uint32_t i = 0; i < m2->nblobs && i < m1->nblobs; i++) {
      CHECK_EQ(m2->blobs[i].len_bytes, m1->blobs[i].len_bytes);
      CHECK(memcmp(m2->blobs[i].data, m1->blobs[i].data, m1->blobs[i].len_bytes) == 0);
    }
    sbuf b2;
    CHECK_EQ(dump_reader(m2, &b2), EM_OK);
    CHECK(strcmp(b.s, b2.s) == 0);
    em_msg_free(m2);
  }
  em_payload_reset(q);
  CHECK_EQ(em_put_list(q, root.len), EM_OK);
  em_iter it;
  em_iter_init(&it, &root);
  em_value k, v;
  while (em_iter_next(&it, &k) && em_iter_next(&it, &v)) CHECK_EQ(em_put_value(q, &v), EM_OK);
  m2 = roundtrip(q);
  if (m2) {
    CHECK_DUMP(m2, "L6 A<f4(3) T3 u18446744073709551615 i-9223372036854775808 S2 nil F A<i8(2,0) a<f8() L2 "
                   "f-0.25 M1 s'' s'q' M0");
    em_value r2, a0;
    em_array a;
    CHECK_EQ(em_msg_value(m2, &r2), EM_OK);
    CHECK_EQ(em_value_at(&r2, 0, &a0), EM_OK);
    CHECK_EQ(em_value_ndarray(&a0, &a), EM_OK);
    CHECK(a.len_bytes == sizeof f4 && memcmp(a.data, f4, sizeof f4) == 0);
    CHECK_EQ(em_value_at(&r2, 3, &a0), EM_OK);
    CHECK_EQ(em_value_ndarray(&a0, &a), EM_OK);
    CHECK(a.is_scalar && a.len_bytes == 8 && memcmp(a.data, &sc, 8) == 0);
    em_value l, mm, s;
    CHECK_EQ(em_value_at(&r2, 4, &l), EM_OK);
    CHECK_EQ(em_value_at(&l, 1, &mm), EM_OK);
    CHECK_EQ(em_value_get(&mm, "", &s), 1);
    CHECK(s.type == EM_T_STR && s.len == 3 && memcmp(s.as.str, "q\0r", 3) == 0);
    em_msg_free(m2);
  }
  /* an ext of another type is copied as it is */
  const uint8_t ext[] = {0x92, 0xd6, 0xff, 1, 2, 3, 4, 0xc7, 0x02, 0x05, 0xaa, 0xbb};
  em_msg *m3 = msg_of(ext, sizeof ext, 0, NULL);
  if (m3) {
    CHECK_DUMP(m3, "L2 x-1#4 x5#2");
    em_value r3;
    CHECK_EQ(em_msg_value(m3, &r3), EM_OK);
    em_payload_reset(q);
    CHECK_EQ(em_put_value(q, &r3), EM_OK);
    em_msg *m4 = roundtrip(q);
    if (m4) {
      CHECK_DUMP(m4, "L2 x-1#4 x5#2"); /* (ext8 of 2 bytes comes back as fixext2) */
      em_value r4, e4;
      CHECK_EQ(em_msg_value(m4, &r4), EM_OK);
      CHECK_EQ(em_value_at(&r4, 1, &e4), EM_OK);
      CHECK(e4.type == EM_T_EXT && e4.ext_type == 5 && e4.len == 2 && e4.as.bin[0] == 0xaa && e4.as.bin[1] == 0xbb);
      em_msg_free(m4);
    }
    em_msg_free(m3);
  }
  em_payload_free(q);
  em_msg_free(m1);
  em_payload_free(p);
}

/* --------------------------------------------- random-access helpers */

static void test_access(void) {
  em_payload *p = em_payload_new();
  CHECK_EQ(em_put_map(p, 4), EM_OK);
  CHECK_EQ(em_put_cstr(p, "k1"), EM_OK);
  CHECK_EQ(em_put_int(p, 10), EM_OK);
  CHECK_EQ(em_put_int(p, 5), EM_OK); /* an int key */
  CHECK_EQ(em_put_cstr(p, "five"), EM_OK);
  CHECK_EQ(em_put_cstr(p, "k2"), EM_OK);
  CHECK_EQ(em_put_list(p, 2), EM_OK);
  CHECK_EQ(em_put_map(p, 1), EM_OK); /* skipping this value needs its size */
  CHECK_EQ(em_put_cstr(p, "k1"), EM_OK);
  CHECK_EQ(em_put_int(p, -1), EM_OK);
  CHECK_EQ(em_put_cstr(p, "last"), EM_OK);
  CHECK_EQ(em_put_cstr(p, "k1"), EM_OK); /* a duplicate key: the first wins */
  CHECK_EQ(em_put_int(p, 20), EM_OK);
  em_msg *m = roundtrip(p);
  if (m) {
    em_value root, v, w;
    CHECK_EQ(em_msg_value(m, &root), EM_OK);
    CHECK(root.type == EM_T_MAP && root.len == 4);
    CHECK_EQ(em_value_get(&root, "k1", &v), 1);
    CHECK(v.type == EM_T_INT && v.as.i == 10);
    CHECK_EQ(em_value_get(&root, "k2", &v), 1);
    CHECK(v.type == EM_T_LIST && v.len == 2);
    CHECK_EQ(em_value_get(&root, "absent", &w), 0);
    CHECK_EQ(em_value_get(&root, "", &w), 0);
    CHECK_EQ(em_value_get(&root, "k", &w), 0);   /* prefix of a key */
    CHECK_EQ(em_value_get(&root, "k12", &w), 0); /* a key is a prefix of it */
    CHECK_EQ(em_value_get(&root, "five", &w), 0); /* a value, not a key */
    CHECK_EQ(em_value_get(&v, "k1", &w), EM_EINVAL); /* not a map */
    /* em_value_at */
    CHECK_EQ(em_value_at(&v, 0, &w), EM_OK);
    CHECK(w.type == EM_T_MAP && w.len == 1);
    em_value x;
    CHECK_EQ(em_value_get(&w, "k1", &x), 1);
    CHECK(x.type == EM_T_INT && x.as.i == -1);
    CHECK_EQ(em_value_at(&v, 1, &w), EM_OK);
    CHECK(em_value_is(&w, "last"));
    CHECK(!em_value_is(&w, "las"));
    CHECK(!em_value_is(&w, "lastx"));
    CHECK_EQ(em_value_at(&v, 2, &w), EM_EINVAL);
    CHECK_EQ(em_value_at(&v, UINT32_MAX, &w), EM_EINVAL);
    CHECK_EQ(em_value_at(&root, 0, &w), EM_EINVAL); /* a map is not a sequence */
    CHECK_EQ(em_value_get(&root, "k1", &x), 1);
    CHECK_EQ(em_value_at(&x, 0, &w), EM_EINVAL);   /* an int */
    /* em_iter over the map: key, value, ... in order */
    em_iter it;
    em_iter_init(&it, &root);
    const char *want[] = {"s'k1'", "i10", "i5", "s'five'", "s'k2'", "L2", "s'k1'", "i20"};
    for (int i = 0; i < 8; i++) {
      CHECK_EQ(em_iter_next(&it, &w), 1);
      sbuf b = {.n = 0};
      tok_text(&b, &w);
      CHECK(strcmp(b.s, want[i]) == 0);
    }
    CHECK_EQ(em_iter_next(&it, &w), 0);
    /* em_iter on a scalar: nothing */
    em_iter_init(&it, &x);
    CHECK_EQ(em_iter_next(&it, &w), 0);
    em_msg_free(m);
  }
  em_payload_free(p);

  /* a map with an empty str key */
  const uint8_t body[] = {0x82, 0xa0, 0x01, 0xa1, 'a', 0x02};
  m = msg_of(body, sizeof body, 0, NULL);
  if (m) {
    em_value root, v;
    CHECK_EQ(em_msg_value(m, &root), EM_OK);
    CHECK_EQ(em_value_get(&root, "", &v), 1);
    CHECK(v.type == EM_T_INT && v.as.i == 1);
    CHECK_EQ(em_value_get(&root, "a", &v), 1);
    CHECK(v.type == EM_T_INT && v.as.i == 2);
    em_msg_free(m);
  }
}

static void test_cstr_and_conversions(void) {
  const uint8_t body[] = {0x97, 0xa5, 'h', 'e', 'l', 'l', 'o', 0xa3, 'a', 0, 'b', 0xa0, 0x05, 0xc3, 0xc0, 0xff};
  em_msg *m = msg_of(body, sizeof body, 0, NULL);
  if (!m) {
    CHECK(0);
    return;
  }
  em_value root, s, z, e, n, t, nil, neg;
  CHECK_EQ(em_msg_value(m, &root), EM_OK);
  CHECK_EQ(em_value_at(&root, 0, &s), EM_OK);
  CHECK_EQ(em_value_at(&root, 1, &z), EM_OK);
  CHECK_EQ(em_value_at(&root, 2, &e), EM_OK);
  CHECK_EQ(em_value_at(&root, 3, &n), EM_OK);
  CHECK_EQ(em_value_at(&root, 4, &t), EM_OK);
  CHECK_EQ(em_value_at(&root, 5, &nil), EM_OK);
  CHECK_EQ(em_value_at(&root, 6, &neg), EM_OK);
  char buf[16];
  memset(buf, 'X', sizeof buf);
  CHECK_EQ(em_value_cstr(&s, buf, sizeof buf), EM_OK);
  CHECK(strcmp(buf, "hello") == 0);
  memset(buf, 'X', sizeof buf);
  CHECK_EQ(em_value_cstr(&s, buf, 6), EM_OK); /* exactly fits with the NUL */
  CHECK(strcmp(buf, "hello") == 0);
  memset(buf, 'X', sizeof buf);
  CHECK_EQ(em_value_cstr(&s, buf, 5), EM_ETOOBIG);
  CHECK(strcmp(buf, "hell") == 0);
  CHECK_EQ(buf[5], 'X'); /* nothing written past cap */
  memset(buf, 'X', sizeof buf);
  CHECK_EQ(em_value_cstr(&s, buf, 1), EM_ETOOBIG);
  CHECK_EQ(buf[0], 0);
  CHECK_EQ(buf[1], 'X');
  memset(buf, 'X', sizeof buf);
  CHECK_EQ(em_value_cstr(&s, buf, 0), EM_ETOOBIG);
  CHECK_EQ(buf[0], 'X');
  CHECK_EQ(em_value_cstr(&z, buf, sizeof buf), EM_EINVAL); /* holds a NUL */
  memset(buf, 'X', sizeof buf);
  CHECK_EQ(em_value_cstr(&e, buf, sizeof buf), EM_OK);
  CHECK_EQ(buf[0], 0);
  CHECK_EQ(em_value_cstr(&n, buf, sizeof buf), EM_EINVAL); /* not a str */
  CHECK_EQ(em_value_cstr(&root, buf, sizeof buf), EM_EINVAL);
  CHECK(em_value_is(&s, "hello"));
  CHECK(!em_value_is(&n, "5"));
  /* conversions and refusals */
  int64_t i64;
  uint64_t u64;
  double d;
  int b;
  CHECK_EQ(em_value_int(&n, &i64), EM_OK);
  CHECK_EQ(i64, 5);
  CHECK_EQ(em_value_uint(&n, &u64), EM_OK);
  CHECK_EQ(u64, 5);
  CHECK_EQ(em_value_double(&n, &d), EM_OK);
  CHECK(d == 5.0);
  CHECK_EQ(em_value_uint(&neg, &u64), EM_EINVAL);
  CHECK_EQ(em_value_int(&neg, &i64), EM_OK);
  CHECK_EQ(i64, -1);
  CHECK_EQ(em_value_bool(&t, &b), EM_OK);
  CHECK_EQ(b, 1);
  CHECK_EQ(em_value_int(&t, &i64), EM_EINVAL);
  CHECK_EQ(em_value_double(&t, &d), EM_EINVAL);
  CHECK_EQ(em_value_bool(&n, &b), EM_EINVAL);
  CHECK_EQ(em_value_int(&s, &i64), EM_EINVAL);
  CHECK_EQ(em_value_uint(&s, &u64), EM_EINVAL);
  CHECK_EQ(em_value_double(&s, &d), EM_EINVAL);
  CHECK_EQ(em_value_int(&nil, &i64), EM_EINVAL);
  CHECK_EQ(em_value_bool(&nil, &b), EM_EINVAL);
  CHECK_EQ(em_value_double(&root, &d), EM_EINVAL);
  CHECK_EQ(nil.type, EM_T_NIL);
  em_msg_free(m);
  /* type names */
  CHECK(strcmp(em_type_name(EM_T_MAP), "map") == 0);
  CHECK(strcmp(em_type_name(EM_T_NDARRAY), "ndarray") == 0);
  CHECK(strcmp(em_type_name(EM_T_UINT), "uint") == 0);
  CHECK(em_type_name(0) != NULL);
  CHECK(em_type_name(1000) != NULL);
}

/* ------------------------------------------------ request and error */

static void test_request_error(void) {
  em_payload *p = em_payload_new();
  CHECK_EQ(em_payload_begin_request(p, "echo", 4), EM_OK);
  CHECK_EQ(em_put_map(p, 1), EM_OK);
  CHECK_EQ(em_put_cstr(p, "x"), EM_OK);
  CHECK_EQ(em_put_int(p, 3), EM_OK);
  em_msg *m = roundtrip(p);
  if (m) {
    CHECK_DUMP(m, "L2 s'echo' M1 s'x' i3");
    em_value meth, pl, x;
    CHECK_EQ(em_msg_request(m, &meth, &pl), EM_OK);
    CHECK(em_value_is(&meth, "echo"));
    CHECK_EQ(pl.type, EM_T_MAP);
    CHECK_EQ(em_value_get(&pl, "x", &x), 1);
    CHECK(x.type == EM_T_INT && x.as.i == 3);
    char buf[64];
    CHECK_EQ(em_msg_error(m, buf, sizeof buf), EM_EDECODE); /* not an error map */
    CHECK(buf[0] != 0);
    em_msg_free(m);
  }
  /* a request without its payload is incomplete */
  em_payload_reset(p);
  CHECK_EQ(em_payload_begin_request(p, "m", 1), EM_OK);
  uint8_t *f;
  size_t fl;
  CHECK_EQ(em_frame_encode(p, EM_MSG_REQUEST, 1, &f, &fl), EM_EENCODE);
  /* bodies that are not [str, value] */
  const uint8_t *bad[] = {(const uint8_t *)"\x92\x01\x02", (const uint8_t *)"\x91\xa1m",
                          (const uint8_t *)"\x93\xa1m\x01\x02", (const uint8_t *)"\x81\xa1m\x01",
                          (const uint8_t *)"\xa1m", (const uint8_t *)"\x92\xa1m"};
  const size_t badn[] = {3, 3, 5, 4, 2, 3};
  for (int i = 0; i < 6; i++) {
    em_msg *mb = msg_of(bad[i], badn[i], 0, NULL);
    if (!mb) continue;
    em_value meth, pl;
    CHECK_EQ(em_msg_request(mb, &meth, &pl), EM_EDECODE);
    em_msg_free(mb);
  }
  /* a tuple [method, payload] is not a request body */
  const uint8_t tup[] = {0x93, 0xc7, 0x00, 0x02, 0xa1, 'm', 0x01};
  m = msg_of(tup, sizeof tup, 0, NULL);
  if (m) {
    em_value meth, pl;
    CHECK_EQ(em_msg_request(m, &meth, &pl), EM_EDECODE);
    em_msg_free(m);
  }

  /* error bodies; begin_error resets a payload holding something (and a
   * sticky error) */
  em_payload_reset(p);
  CHECK_EQ(em_put_list(p, 1), EM_OK);
  CHECK_EQ(em_put_ndarray(p, "bad", 0, NULL, NULL, 0), EM_EINVAL);
  CHECK_EQ(em_payload_begin_error(p, "ValueError", "bad frame", NULL, 1), EM_OK);
  CHECK_EQ(em_payload_error(p), EM_OK);
  CHECK_EQ(em_put_cstr(p, "code"), EM_OK);
  CHECK_EQ(em_put_int(p, 42), EM_OK);
  m = roundtrip(p);
  if (m) {
    CHECK_DUMP(m, "M4 s'type' s'ValueError' s'message' s'bad frame' s'traceback' s'' s'code' i42");
    char buf[64];
    CHECK_EQ(em_msg_error(m, buf, sizeof buf), EM_OK);
    CHECK(strcmp(buf, "ValueError: bad frame") == 0);
    memset(buf, 'X', sizeof buf);
    CHECK_EQ(em_msg_error(m, buf, 9), EM_OK);
    CHECK(strcmp(buf, "ValueErr") == 0);
    CHECK_EQ(buf[9], 'X');
    em_value v, c;
    CHECK_EQ(em_msg_value(m, &v), EM_OK);
    CHECK_EQ(em_value_get(&v, "code", &c), 1);
    CHECK(c.type == EM_T_INT && c.as.i == 42);
    em_msg_free(m);
  }
  /* without the extra pairs written the error body is incomplete */
  CHECK_EQ(em_payload_begin_error(p, "KeyError", "k", "tb", 2), EM_OK);
  CHECK_EQ(em_frame_encode(p, EM_MSG_ERROR, 1, &f, &fl), EM_EENCODE);
  CHECK_EQ(em_payload_begin_error(p, NULL, NULL, "Traceback...", 0), EM_OK);
  m = roundtrip(p);
  if (m) {
    char buf[64];
    CHECK_EQ(em_msg_error(m, buf, sizeof buf), EM_OK);
    CHECK(strcmp(buf, "RuntimeError: ") == 0);
    em_value v, tb;
    CHECK_EQ(em_msg_value(m, &v), EM_OK);
    CHECK_EQ(em_value_get(&v, "traceback", &tb), 1);
    CHECK(em_value_is(&tb, "Traceback..."));
    em_msg_free(m);
  }
  /* maps that are not error maps */
  const uint8_t *nb[] = {(const uint8_t *)"\x81\xa4type\xa1T", (const uint8_t *)"\x82\xa4type\x01\xa7message\xa1m",
                         (const uint8_t *)"\x90"};
  const size_t nbn[] = {8, 17, 1};
  for (int i = 0; i < 3; i++) {
    em_msg *mb = msg_of(nb[i], nbn[i], 0, NULL);
    if (!mb) continue;
    char buf[64] = "";
    CHECK_EQ(em_msg_error(mb, buf, sizeof buf), EM_EDECODE);
    CHECK(buf[0] != 0);
    em_msg_free(mb);
  }
  em_payload_free(p);
}

/* ------------------------------------------------- the writer's rules */

static int release_calls;
static void on_release(void *ctx) { release_calls += *(int *)ctx; }

static void test_writer_rules(void) {
  em_payload *p = em_payload_new();
  uint8_t *f;
  size_t fl;
  /* incomplete containers */
  CHECK_EQ(em_put_list(p, 2), EM_OK);
  CHECK_EQ(em_put_int(p, 1), EM_OK);
  CHECK_EQ(em_payload_error(p), EM_OK); /* not an error yet: it may be completed */
  CHECK_EQ(em_frame_encode(p, EM_MSG_REPLY, 1, &f, &fl), EM_EENCODE);
  CHECK(f == NULL && fl == 0);
  CHECK_EQ(em_put_int(p, 2), EM_OK); /* completed now */
  CHECK_EQ(em_frame_encode(p, EM_MSG_REPLY, 1, &f, &fl), EM_OK);
  free(f);
  em_payload_reset(p);
  CHECK_EQ(em_put_map(p, 2), EM_OK);
  CHECK_EQ(em_put_cstr(p, "a"), EM_OK);
  CHECK_EQ(em_put_int(p, 1), EM_OK);
  CHECK_EQ(em_put_cstr(p, "b"), EM_OK); /* a key without its value */
  CHECK_EQ(em_frame_encode(p, EM_MSG_REPLY, 1, &f, &fl), EM_EENCODE);
  em_payload_reset(p);
  CHECK_EQ(em_put_list(p, 1), EM_OK);
  CHECK_EQ(em_put_map(p, 1), EM_OK);
  CHECK_EQ(em_frame_encode(p, EM_MSG_REPLY, 1, &f, &fl), EM_EENCODE);
  em_payload_reset(p);
  CHECK_EQ(em_put_tuple(p, 3), EM_OK);
  CHECK_EQ(em_put_set(p, 0), EM_OK);
  CHECK_EQ(em_put_list(p, 0), EM_OK);
  CHECK_EQ(em_frame_encode(p, EM_MSG_REPLY, 1, &f, &fl), EM_EENCODE);
  CHECK_EQ(em_put_map(p, 0), EM_OK);
  CHECK_EQ(em_frame_encode(p, EM_MSG_REPLY, 1, &f, &fl), EM_OK);
  free(f);

  /* two top-level values */
  em_payload_reset(p);
  CHECK_EQ(em_put_int(p, 1), EM_OK);
  CHECK_EQ(em_put_int(p, 2), EM_EENCODE);
  CHECK_EQ(em_payload_error(p), EM_EENCODE);
  CHECK_EQ(em_frame_encode(p, EM_MSG_REPLY, 1, &f, &fl), EM_EENCODE);
  em_payload_reset(p);
  CHECK_EQ(em_put_list(p, 1), EM_OK);
  CHECK_EQ(em_put_nil(p), EM_OK);
  CHECK(em_put_map(p, 0) != EM_OK);
  CHECK_EQ(em_frame_encode(p, EM_MSG_REPLY, 1, &f, &fl), EM_EENCODE);

  /* sticky: after the first error every put fails, and so does the send */
  em_payload_reset(p);
  CHECK_EQ(em_put_list(p, 3), EM_OK);
  CHECK_EQ(em_put_ndarray(p, "<q9", 0, NULL, NULL, 0), EM_EINVAL);
  CHECK(em_put_int(p, 1) != EM_OK);
  CHECK(em_put_nil(p) != EM_OK);
  CHECK(em_put_cstr(p, "x") != EM_OK);
  CHECK_EQ(em_payload_error(p), EM_EINVAL); /* the first error */
  CHECK_EQ(em_frame_encode(p, EM_MSG_REPLY, 1, &f, &fl), EM_EENCODE);
  /* reset clears it */
  em_payload_reset(p);
  CHECK_EQ(em_payload_error(p), EM_OK);
  CHECK_EQ(em_put_int(p, 5), EM_OK);
  em_msg *m = roundtrip(p);
  if (m) {
    CHECK_DUMP(m, "i5");
    em_msg_free(m);
  }

  /* nesting: 32 containers are fine, a 33rd is refused (the reader would
   * refuse the body), whether each level has one element or more */
  for (int shape = 0; shape < 3; shape++) {
    for (int depth = EM_READER_DEPTH; depth <= EM_READER_DEPTH + 1; depth++) {
      em_payload_reset(p);
      int rc = EM_OK;
      for (int d = 0; d < depth && rc == EM_OK; d++) {
        if (shape == 0) rc = em_put_list(p, 1);       /* [[[...]]] */
        else if (shape == 1) rc = em_put_list(p, 2);  /* [[[..., 0], 0], 0] */
        else {                                         /* {"k": {"k": ...}} */
          rc = em_put_map(p, 1);
          if (rc == EM_OK) rc = em_put_cstr(p, "k");
        }
      }
      if (rc == EM_OK) rc = em_put_int(p, 7);
      for (int d = 0; d < depth && rc == EM_OK && shape == 1; d++) rc = em_put_int(p, 0);
      int enc = em_frame_encode(p, EM_MSG_REPLY, 1, &f, &fl);
      if (depth <= EM_READER_DEPTH) {
        CHECK_EQ(rc, EM_OK);
        CHECK_EQ(enc, EM_OK);
        if (enc == EM_OK) {
          em_msg *mm = NULL;
          CHECK_EQ(em_frame_decode(f, fl, 0, &mm, NULL), EM_OK);
          if (mm) {
            CHECK_EQ(reader_accepts(mm, NULL), EM_OK);
            em_msg_free(mm);
          }
          free(f);
        }
      } else {
        if (enc != EM_EENCODE) fprintf(stderr, "  nesting %d (shape %d): put rc %d, encode rc %d\n", depth, shape, rc, enc);
        CHECK_EQ(enc, EM_EENCODE);
        if (enc == EM_OK) free(f);
      }
    }
  }

  /* release runs once, at reset (never sent) or free */
  int one = 1;
  release_calls = 0;
  em_payload_reset(p);
  em_payload_on_release(p, on_release, &one);
  em_payload_reset(p);
  CHECK_EQ(release_calls, 1);
  em_payload_reset(p);
  CHECK_EQ(release_calls, 1);
  em_payload_on_release(p, on_release, &one);
  em_payload_free(p);
  CHECK_EQ(release_calls, 2);
  em_payload_free(NULL);
}

/* ----------------------------------------------------- reader refusals */

/* body rejected by all three (reader, em_msg_value, em__body_check) */
static void expect_refused(const uint8_t *body, size_t n, uint32_t nblobs, const uint64_t *lens, const char *why_part,
                           int line) {
  em_msg *m = msg_of(body, n, nblobs, lens);
  if (!m) {
    CHECK(0);
    return;
  }
  const char *why = NULL, *cwhy = NULL;
  int rr = reader_accepts(m, &why);
  em_value v;
  int vr = em_msg_value(m, &v);
  int cr = em__body_check(m, &cwhy);
  if (rr != EM_EDECODE || vr != EM_EDECODE || cr != EM_EDECODE || !why ||
      (why_part && !strstr(why, why_part))) {
    fprintf(stderr, "  line %d: reader %d (%s), value %d, check %d (%s)\n", line, rr, why ? why : "-", vr, cr,
            cwhy ? cwhy : "-");
    hex_dump("body", body, n);
  }
  CHECK_EQ(rr, EM_EDECODE);
  CHECK_EQ(vr, EM_EDECODE);
  CHECK_EQ(cr, EM_EDECODE);
  CHECK(why != NULL);
  if (why_part) CHECK(why && strstr(why, why_part));
  em_msg_free(m);
}
#define REFUSED(b, n, nb, lens, part) expect_refused((b), (n), (nb), (lens), (part), __LINE__)

static void expect_accepted(const uint8_t *body, size_t n, uint32_t nblobs, const uint64_t *lens, int line) {
  em_msg *m = msg_of(body, n, nblobs, lens);
  if (!m) {
    CHECK(0);
    return;
  }
  const char *why = NULL, *cwhy = NULL;
  int rr = reader_accepts(m, &why);
  em_value v;
  int vr = em_msg_value(m, &v);
  int cr = em__body_check(m, &cwhy);
  if (rr || vr || cr) {
    fprintf(stderr, "  line %d: reader %d (%s), value %d, check %d (%s)\n", line, rr, why ? why : "-", vr, cr,
            cwhy ? cwhy : "-");
    hex_dump("body", body, n);
  }
  CHECK_EQ(rr, EM_OK);
  CHECK_EQ(vr, EM_OK);
  CHECK_EQ(cr, EM_OK);
  em_msg_free(m);
}
#define ACCEPTED(b, n, nb, lens) expect_accepted((b), (n), (nb), (lens), __LINE__)

static void test_reader_truncated(void) {
  static float f4[3] = {1, 2, 3};
  uint64_t sh[1] = {3};
  em_payload *p = em_payload_new();
  CHECK_EQ(em_put_map(p, 3), EM_OK);
  CHECK_EQ(em_put_cstr(p, "arr"), EM_OK);
  CHECK_EQ(em_put_ndarray(p, "<f4", 1, sh, f4, sizeof f4), EM_OK);
  CHECK_EQ(em_put_cstr(p, "nest"), EM_OK);
  CHECK_EQ(em_put_list(p, 4), EM_OK);
  CHECK_EQ(em_put_tuple(p, 2), EM_OK);
  CHECK_EQ(em_put_int(p, 300), EM_OK);
  CHECK_EQ(em_put_double(p, 2.5), EM_OK);
  CHECK_EQ(em_put_set(p, 1), EM_OK);
  CHECK_EQ(em_put_uint(p, UINT64_MAX), EM_OK);
  CHECK_EQ(em_put_bin(p, "abcdef", 6), EM_OK);
  CHECK_EQ(em_put_int(p, -70000), EM_OK);
  CHECK_EQ(em_put_int(p, 1), EM_OK);
  char s300[300];
  memset(s300, 's', sizeof s300);
  CHECK_EQ(em_put_str(p, s300, sizeof s300), EM_OK);
  em_msg *m = roundtrip(p);
  if (!m) {
    em_payload_free(p);
    return;
  }
  uint64_t lens[1] = {12};
  ACCEPTED(m->body, m->body_len, 1, lens);
  int fails = 0;
  for (size_t k = 0; k < m->body_len; k++) {
    em_msg *t = msg_of(m->body, k, 1, lens);
    if (!t) {
      fails++;
      continue;
    }
    const char *why = NULL, *cwhy = NULL;
    int rr = reader_accepts(t, &why);
    em_value v;
    int vr = em_msg_value(t, &v);
    int cr = em__body_check(t, &cwhy);
    sbuf b;
    int dr = dump_reader(t, &b); /* token by token, too */
    if (rr != EM_EDECODE || vr != EM_EDECODE || cr != EM_EDECODE || dr != EM_EDECODE || !why) {
      if (fails < 3) fprintf(stderr, "  prefix %zu of %zu: reader %d dump %d value %d check %d\n", k, m->body_len, rr, dr, vr, cr);
      fails++;
    }
    em_msg_free(t);
  }
  CHECK_EQ(fails, 0);
  em_msg_free(m);
  em_payload_free(p);
}

static void test_reader_refusals(void) {
  /* empty body */
  em_msg *m = msg_of(NULL, 0, 0, NULL);
  if (m) {
    em_reader r;
    em_value v;
    em_reader_init(&r, m);
    CHECK_EQ(em_read(&r, &v), EM_EDECODE);
    CHECK(em_reader_why(&r) != NULL);
    CHECK_EQ(em_msg_value(m, &v), EM_EDECODE);
    em_msg_free(m);
  }
  /* counts and lengths that lie */
  REFUSED((const uint8_t *)"\xdc\xff\xff\x01", 4, 0, NULL, "lies");
  REFUSED((const uint8_t *)"\xdd\x00\x00\x00\x03\x01\x02", 7, 0, NULL, NULL);
  REFUSED((const uint8_t *)"\x92\x01", 2, 0, NULL, NULL);
  REFUSED((const uint8_t *)"\x83\x01\x02\x03\x04\x05", 6, 0, NULL, NULL);
  REFUSED((const uint8_t *)"\xde\x00\x02\x01\x02\x03", 6, 0, NULL, NULL);
  REFUSED((const uint8_t *)"\xdf\xff\xff\xff\xff\x01\x02", 7, 0, NULL, NULL);
  REFUSED((const uint8_t *)"\xdb\x00\x01\x00\x00\x61", 6, 0, NULL, "lies");
  REFUSED((const uint8_t *)"\xa3" "ab", 3, 0, NULL, NULL);
  REFUSED((const uint8_t *)"\xc4\x05\x01", 3, 0, NULL, NULL);
  REFUSED((const uint8_t *)"\xc6\xff\xff\xff\xff", 5, 0, NULL, NULL);
  REFUSED((const uint8_t *)"\xc9\x00\x00\x01\x00\x05", 6, 0, NULL, NULL);
  REFUSED((const uint8_t *)"\xd8\x05\x00", 3, 0, NULL, NULL);
  REFUSED((const uint8_t *)"\xcb\x00\x00", 3, 0, NULL, NULL);
  REFUSED((const uint8_t *)"\xd3\x00", 2, 0, NULL, NULL);
  /* a container count that lies, deeper inside */
  REFUSED((const uint8_t *)"\x82\xa1x\x93\x01\x02\xa1y\x01", 9, 0, NULL, NULL);
  /* invalid type byte */
  REFUSED((const uint8_t *)"\xc1", 1, 0, NULL, "invalid");
  REFUSED((const uint8_t *)"\x92\x01\xc1", 3, 0, NULL, "invalid");
  /* malformed tuple/set tags */
  REFUSED((const uint8_t *)"\x92\xd5\x02\x00\x00\x01", 6, 0, NULL, "tag");
  REFUSED((const uint8_t *)"\x92\xc7\x01\x03\x00\x01", 6, 0, NULL, "tag");
  ACCEPTED((const uint8_t *)"\x92\xd4\x02\x00\x01", 5, 0, NULL); /* fixext1 tag tolerated */
  /* trailing bytes */
  REFUSED((const uint8_t *)"\x01\x02", 2, 0, NULL, "trailing");
  REFUSED((const uint8_t *)"\x91\x01\xc0", 3, 0, NULL, "trailing");
  REFUSED((const uint8_t *)"\x80\x00", 2, 0, NULL, "trailing");

  /* depth: 32 nested containers are accepted, 33 are not */
  uint8_t deep[40];
  for (int d = 30; d <= 34; d++) {
    for (int i = 0; i < d; i++) deep[i] = 0x91;
    deep[d] = 0x01;
    if (d <= EM__MAX_DEPTH) ACCEPTED(deep, (size_t)d + 1, 0, NULL);
    else REFUSED(deep, (size_t)d + 1, 0, NULL, "deep");
    deep[d - 1] = 0x90; /* the innermost empty */
    if (d <= EM__MAX_DEPTH) ACCEPTED(deep, (size_t)d, 0, NULL);
    else REFUSED(deep, (size_t)d, 0, NULL, "deep");
  }
  uint8_t mdeep[80];
  for (int d = 32; d <= 33; d++) {
    size_t n = 0;
    for (int i = 0; i < d; i++) {
      mdeep[n++] = 0x81;
      mdeep[n++] = 0x00;
    }
    mdeep[n++] = 0xc0;
    if (d <= 32) ACCEPTED(mdeep, n, 0, NULL);
    else REFUSED(mdeep, n, 0, NULL, "deep");
  }
  /* the reader's one-pass view: read past the end, finish too early */
  m = msg_of((const uint8_t *)"\x92\x01\x02", 3, 0, NULL);
  if (m) {
    em_reader r;
    em_value v;
    em_reader_init(&r, m);
    CHECK_EQ(em_read(&r, &v), EM_OK);
    CHECK(v.type == EM_T_LIST && v.len == 2);
    CHECK_EQ(em_read(&r, &v), EM_OK);
    CHECK_EQ(em_reader_finish(&r), EM_EDECODE); /* one element left */
    CHECK(em_reader_why(&r) != NULL);
    CHECK_EQ(em_read(&r, &v), EM_EDECODE); /* stopped at the first error */
    em_reader_init(&r, m);
    CHECK_EQ(em_read_skip(&r), EM_OK);
    CHECK_EQ(em_read(&r, &v), EM_EDECODE); /* nothing is left */
    CHECK(em_reader_why(&r) != NULL);
    em_msg_free(m);
  }
  /* em_read_skip over containers that end at the same time as their parent */
  static const struct {
    const char *b;
    size_t n;
  } skips[] = {
      {"\x91\x91\x01", 3},                     /* [[1]]: the smallest such body */
      {"\x91\x92\x01\x02", 4},                 /* [[1, 2]] */
      {"\x92\x01\x91\x91\x01", 5},             /* [1, [[1]]] */
      {"\x81\xa1k\x82\x01\x91\x02\x03\x93\x01\x02\x03", 12},
      {"\x92\x91\x01\x02", 4},                 /* [[1], 2] */
      {"\x93\xc7\x00\x02\x92\x01\x02\x90", 8}, /* ([1, 2], []) */
  };
  for (size_t i = 0; i < sizeof skips / sizeof skips[0]; i++) {
    m = msg_of((const uint8_t *)skips[i].b, skips[i].n, 0, NULL);
    if (!m) continue;
    const char *why = NULL;
    int rr = reader_accepts(m, &why);
    if (rr) {
      fprintf(stderr, "  em_read_skip + em_reader_finish refuse a valid body: %s\n", why ? why : "-");
      hex_dump("body", (const uint8_t *)skips[i].b, skips[i].n);
    }
    CHECK_EQ(rr, EM_OK);
    CHECK_EQ(em__body_check(m, &why), EM_OK);
    /* skipping the inner value of [x, 9] lands on the 9 */
    em_msg_free(m);
  }
  m = msg_of((const uint8_t *)"\x92\x92\x91\x01\x91\x02\x09", 7, 0, NULL);
  if (m) {
    em_reader r;
    em_value v;
    em_reader_init(&r, m);
    CHECK_EQ(em_read(&r, &v), EM_OK);
    CHECK_EQ(em_read_skip(&r), EM_OK);
    CHECK_EQ(em_read(&r, &v), EM_OK);
    CHECK(v.type == EM_T_INT && v.as.i == 9);
    CHECK_EQ(em_reader_finish(&r), EM_OK);
    em_msg_free(m);
  }

  /* arrays: a blob that does not exist, size disagreeing, bad header */
  uint8_t arr[32];
  size_t an = 0;
  arr[an++] = 0xc7;
  arr[an++] = 7 + 3 + 8;
  arr[an++] = EM_EXT_ARRAY;
  em__put_u32(arr + an, 1); /* blob 1 */
  an += 4;
  arr[an++] = 0;
  arr[an++] = 1;
  arr[an++] = 3;
  memcpy(arr + an, "<f4", 3);
  an += 3;
  em__put_u64(arr + an, 3);
  an += 8;
  uint64_t lens1[1] = {12}, lens2[2] = {5, 12}, lens2bad[2] = {12, 8};
  REFUSED(arr, an, 1, lens1, "blob that does not exist");
  REFUSED(arr, an, 0, NULL, "blob that does not exist");
  ACCEPTED(arr, an, 2, lens2);
  REFUSED(arr, an, 2, lens2bad, "disagree");
  arr[8] = 33; /* ndim too large */
  REFUSED(arr, an, 2, lens2, "array");
  arr[8] = 1;
  arr[11] = 'O'; /* "<O4" */
  REFUSED(arr, an, 2, lens2, "dtype");
  arr[11] = 'f';
  arr[7] = 1; /* scalar flag with ndim 1 */
  REFUSED(arr, an, 2, lens2, "array");
  arr[7] = 0;
  /* em_value_ndarray's answer for a valid one */
  m = msg_of(arr, an, 2, lens2);
  if (m) {
    em_value v;
    em_array a;
    CHECK_EQ(em_msg_value(m, &v), EM_OK);
    CHECK_EQ(v.type, EM_T_NDARRAY);
    CHECK_EQ(em_value_ndarray(&v, &a), EM_OK);
    CHECK(a.blob == 1 && a.data == m->blobs[1].data && a.len_bytes == 12 && a.shape[0] == 3);
    em_msg_free(m);
  }
}

/* A long run of nested lists read with em_reader (which checks as it
 * goes; nothing vetted the body first): the reader must stop at depth 33
 * with EDECODE. The tokenizer looks at a list's first element for a
 * tuple/set tag; it must not recurse once per nested list (a 1 MiB body
 * would then overflow the stack). Run in a child process so that a crash
 * is a failed check here, not the end of the test program. */
static void test_reader_long_nesting(void) {
  const size_t sizes[] = {64, 4096, 32768, 1u << 20};
  for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
    size_t n = sizes[si];
    uint8_t *b = malloc(n + 1);
    memset(b, 0x91, n);
    b[n] = 0x01;
    em_msg *m = msg_of(b, n + 1, 0, NULL);
    free(b);
    CHECK(m != NULL);
    if (!m) continue;
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
      em_reader r;
      em_value v;
      em_reader_init(&r, m);
      int rc = EM_OK, reads = 0;
      while (rc == EM_OK && reads < 40) rc = em_read(&r, &v), reads++;
      const char *why = em_reader_why(&r);
      /* reads 1..32 are the lists that fit, the 33rd is refused */
      _exit(rc == EM_EDECODE && reads == EM_READER_DEPTH + 1 && why && strstr(why, "deep") ? 0 : 1);
    }
    int st = 0;
    CHECK(pid > 0 && waitpid(pid, &st, 0) == pid);
    if (!(WIFEXITED(st) && WEXITSTATUS(st) == 0))
      fprintf(stderr, "  em_reader over %zu nested lists (0x91 x %zu, 0x01): %s %d\n", n, n,
              WIFSIGNALED(st) ? "killed by signal" : "exit", WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    em_msg_free(m);
  }
}

/* The decode-cost bound: a list of N empty maps costs
 * ELEM + LIST + N x (ELEM + MAP) against max(FLOOR, RATIO x body length). */
static void test_cost_bombs(void) {
  const uint64_t per = EM__COST_ELEM + EM__COST_MAP;
  const uint64_t base = EM__COST_ELEM + EM__COST_LIST;
  /* largest N accepted: base + per * N <= limit(5 + N) */
  uint64_t n_ok = 0;
  for (uint64_t n = (EM__DECODE_FLOOR_BYTES - base) / per - 2; n < (EM__DECODE_FLOOR_BYTES - base) / per + 4; n++)
    if (base + per * n <= em__decode_limit(5 + n)) n_ok = n;
  CHECK(n_ok > 100000);
  uint8_t *b = malloc(5 + n_ok + 1);
  for (int extra = 0; extra <= 1; extra++) {
    uint64_t n = n_ok + (uint64_t)extra;
    b[0] = 0xdd;
    b[1] = (uint8_t)(n >> 24);
    b[2] = (uint8_t)(n >> 16);
    b[3] = (uint8_t)(n >> 8);
    b[4] = (uint8_t)n;
    memset(b + 5, 0x80, n);
    if (extra) REFUSED(b, 5 + n, 0, NULL, "too many objects");
    else ACCEPTED(b, 5 + n, 0, NULL);
  }
  free(b);
  /* a map of empty maps: ELEM + MAP + N x (KV + ELEM (key 0) + ELEM + MAP) */
  const uint64_t mper = EM__COST_KV + EM__COST_ELEM + EM__COST_ELEM + EM__COST_MAP;
  const uint64_t mbase = EM__COST_ELEM + EM__COST_MAP;
  n_ok = 0;
  for (uint64_t n = (EM__DECODE_FLOOR_BYTES - mbase) / mper - 2; n < (EM__DECODE_FLOOR_BYTES - mbase) / mper + 4; n++)
    if (mbase + mper * n <= em__decode_limit(5 + 2 * n)) n_ok = n;
  b = malloc(5 + 2 * (n_ok + 1));
  for (int extra = 0; extra <= 1; extra++) {
    uint64_t n = n_ok + (uint64_t)extra;
    b[0] = 0xdf;
    b[1] = (uint8_t)(n >> 24);
    b[2] = (uint8_t)(n >> 16);
    b[3] = (uint8_t)(n >> 8);
    b[4] = (uint8_t)n;
    for (uint64_t i = 0; i < n; i++) b[5 + 2 * i] = 0x00, b[6 + 2 * i] = 0x80;
    if (extra) REFUSED(b, 5 + 2 * n, 0, NULL, "too many objects");
    else ACCEPTED(b, 5 + 2 * n, 0, NULL);
  }
  free(b);
  /* a large body is charged against 16 x its length: 1 MiB str pads the
   * budget so the same list of maps fits */
  {
    uint64_t n = 500000; /* 144 * n = 72 MB > 64 MiB alone */
    size_t pad = 8u << 20;
    size_t len = 1 + 5 + n + 5 + pad;
    uint8_t *c = malloc(len);
    size_t k = 0;
    c[k++] = 0x92;
    c[k++] = 0xdd;
    c[k++] = (uint8_t)(n >> 24);
    c[k++] = (uint8_t)(n >> 16);
    c[k++] = (uint8_t)(n >> 8);
    c[k++] = (uint8_t)n;
    memset(c + k, 0x80, n);
    k += n;
    c[k++] = 0xc4 + 2; /* bin32 */
    c[k++] = (uint8_t)(pad >> 24);
    c[k++] = (uint8_t)(pad >> 16);
    c[k++] = (uint8_t)(pad >> 8);
    c[k++] = (uint8_t)pad;
    memset(c + k, 0, pad);
    k += pad;
    CHECK_EQ(k, len);
    ACCEPTED(c, len, 0, NULL);
    /* without the padding it is too costly */
    c[0] = 0x91;
    REFUSED(c, 1 + 5 + n, 0, NULL, "too many objects");
    free(c);
  }
}

/* ------------------------------------------------------ test vectors */

static uint8_t *from_hex(const char *h, size_t *n) {
  size_t len = strlen(h);
  uint8_t *b = malloc(len / 2 + 1);
  size_t k = 0;
  for (size_t i = 0; i + 1 < len; i += 2) {
    unsigned x;
    sscanf(h + i, "%2x", &x);
    b[k++] = (uint8_t)x;
  }
  *n = k;
  return b;
}

static const char vec1[] =
    "4544474d010d0000070000000000000004000000000000004800000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "81a1780100000000";
static const char vec2[] =
    "4544474d010d0000070000000000000021000000010000008300000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "82a161c71201000000000001037c75310300000000000000a17493c7000201a1"
    "6200000000000000030000000000000000000000000000000000000000000000"
    "000102";
static const char vec3[] =
    "4544474d010d0000070000000000000039000000020000000001000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "93c71201000000000001033c66340100000000000000c71a0101000000000203"
    "3c69380200000000000000000000000000000093c70003010200000000000000"
    "0400000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
    "0000c03f00000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000";

/* The vector decodes, reads as `want`, and the same value written with
 * em_put_* (by `build`) encodes to exactly its bytes. */
static em_msg *vector_msg(const char *hex, size_t want_len, uint8_t **bytes, size_t *n) {
  *bytes = from_hex(hex, n);
  CHECK_EQ(*n, want_len);
  em_msg *m = NULL;
  const char *why = NULL;
  CHECK_EQ(em_frame_decode(*bytes, *n, 0, &m, &why), EM_OK);
  if (m) {
    CHECK_EQ(m->type, EM_MSG_REPLY);
    CHECK_EQ(m->req_id, 7);
  }
  return m;
}

static void check_encodes_to(em_payload *p, const uint8_t *want, size_t n) {
  uint8_t *f = NULL;
  size_t fl = 0;
  CHECK_EQ(em_frame_encode(p, EM_MSG_REPLY, 7, &f, &fl), EM_OK);
  CHECK_EQ(fl, n);
  CHECK(f && fl == n && memcmp(f, want, n) == 0);
  if (f && (fl != n || memcmp(f, want, n))) hex_dump("encoded", f, fl);
  free(f);
}

static void test_vectors(void) {
  uint8_t *b;
  size_t n;
  /* vector 1: {"x": 1} */
  em_msg *m = vector_msg(vec1, 72, &b, &n);
  if (m) {
    CHECK_DUMP(m, "M1 s'x' i1");
    em_reader r;
    em_value v;
    em_reader_init(&r, m);
    CHECK_EQ(em_read(&r, &v), EM_OK);
    CHECK(v.type == EM_T_MAP && v.len == 1);
    CHECK_EQ(em_read(&r, &v), EM_OK);
    CHECK(em_value_is(&v, "x"));
    CHECK_EQ(em_read(&r, &v), EM_OK);
    CHECK(v.type == EM_T_INT && v.as.i == 1);
    CHECK_EQ(em_reader_finish(&r), EM_OK);
    em_msg_free(m);
  }
  em_payload *p = em_payload_new();
  CHECK_EQ(em_put_map(p, 1), EM_OK);
  CHECK_EQ(em_put_cstr(p, "x"), EM_OK);
  CHECK_EQ(em_put_int(p, 1), EM_OK);
  check_encodes_to(p, b, n);
  free(b);

  /* vector 2: {"a": np.arange(3, dtype=np.uint8), "t": (1, "b")} */
  static const uint8_t ar[3] = {0, 1, 2};
  m = vector_msg(vec2, 131, &b, &n);
  if (m) {
    CHECK_DUMP(m, "M2 s'a' A|u1(3) s't' T2 i1 s'b'");
    em_reader r;
    em_value v;
    em_array a;
    em_reader_init(&r, m);
    CHECK_EQ(em_read(&r, &v), EM_OK);
    CHECK(v.type == EM_T_MAP && v.len == 2);
    CHECK_EQ(em_read(&r, &v), EM_OK);
    CHECK(em_value_is(&v, "a"));
    CHECK_EQ(em_read(&r, &v), EM_OK);
    CHECK_EQ(v.type, EM_T_NDARRAY);
    CHECK_EQ(em_value_ndarray(&v, &a), EM_OK);
    CHECK(strcmp(a.dtype, "|u1") == 0 && a.ndim == 1 && a.shape[0] == 3 && a.len_bytes == 3 && !a.is_scalar);
    CHECK(a.data == m->blobs[0].data);
    CHECK((const uint8_t *)a.data - em_buf_data(m->buf) == 128);
    CHECK(memcmp(a.data, ar, 3) == 0);
    CHECK_EQ(em_read(&r, &v), EM_OK);
    CHECK(em_value_is(&v, "t"));
    CHECK_EQ(em_read(&r, &v), EM_OK);
    CHECK(v.type == EM_T_TUPLE && v.len == 2);
    CHECK_EQ(em_read(&r, &v), EM_OK);
    CHECK(v.type == EM_T_INT && v.as.i == 1);
    CHECK_EQ(em_read(&r, &v), EM_OK);
    CHECK(em_value_is(&v, "b"));
    CHECK_EQ(em_reader_finish(&r), EM_OK);
    em_msg_free(m);
  }
  uint64_t sh3[1] = {3};
  em_payload_reset(p);
  CHECK_EQ(em_put_map(p, 2), EM_OK);
  CHECK_EQ(em_put_cstr(p, "a"), EM_OK);
  CHECK_EQ(em_put_ndarray(p, "|u1", 1, sh3, ar, 3), EM_OK);
  CHECK_EQ(em_put_cstr(p, "t"), EM_OK);
  CHECK_EQ(em_put_tuple(p, 2), EM_OK);
  CHECK_EQ(em_put_int(p, 1), EM_OK);
  CHECK_EQ(em_put_cstr(p, "b"), EM_OK);
  check_encodes_to(p, b, n);
  free(b);

  /* vector 3: [np.array([1.5], np.float32), np.zeros((2, 0), np.int64), {1, 2}] */
  static const float f15 = 1.5f;
  m = vector_msg(vec3, 256, &b, &n);
  if (m) {
    CHECK_DUMP(m, "L3 A<f4(1) A<i8(2,0) S2 i1 i2");
    em_reader r;
    em_value v;
    em_array a;
    em_reader_init(&r, m);
    CHECK_EQ(em_read(&r, &v), EM_OK);
    CHECK(v.type == EM_T_LIST && v.len == 3);
    CHECK_EQ(em_read(&r, &v), EM_OK);
    CHECK_EQ(em_value_ndarray(&v, &a), EM_OK);
    CHECK(strcmp(a.dtype, "<f4") == 0 && a.ndim == 1 && a.shape[0] == 1 && a.blob == 0);
    CHECK((const uint8_t *)a.data - em_buf_data(m->buf) == 192);
    CHECK(a.len_bytes == 4 && memcmp(a.data, &f15, 4) == 0);
    CHECK_EQ(em_read(&r, &v), EM_OK);
    CHECK_EQ(em_value_ndarray(&v, &a), EM_OK);
    CHECK(strcmp(a.dtype, "<i8") == 0 && a.ndim == 2 && a.shape[0] == 2 && a.shape[1] == 0 && a.blob == 1);
    CHECK_EQ(a.len_bytes, 0);
    CHECK_EQ(em_read(&r, &v), EM_OK);
    CHECK(v.type == EM_T_SET && v.len == 2);
    CHECK_EQ(em_read_skip(&r), EM_OK);
    CHECK_EQ(em_read(&r, &v), EM_OK);
    CHECK(v.type == EM_T_INT && v.as.i == 2);
    CHECK_EQ(em_reader_finish(&r), EM_OK);
    em_msg_free(m);
  }
  uint64_t sh1[1] = {1}, sh20[2] = {2, 0};
  em_payload_reset(p);
  CHECK_EQ(em_put_list(p, 3), EM_OK);
  CHECK_EQ(em_put_ndarray(p, "<f4", 1, sh1, &f15, 4), EM_OK);
  CHECK_EQ(em_put_ndarray(p, "<i8", 2, sh20, NULL, 0), EM_OK);
  CHECK_EQ(em_put_set(p, 2), EM_OK);
  CHECK_EQ(em_put_int(p, 1), EM_OK);
  CHECK_EQ(em_put_int(p, 2), EM_OK);
  check_encodes_to(p, b, n);
  free(b);
  em_payload_free(p);
}

/* -------------------------------------- differential: reader vs check */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rnd(void) {
  uint64_t x = rng_state;
  x ^= x << 13;
  x ^= x >> 7;
  x ^= x << 17;
  return rng_state = x;
}
static uint64_t rn(uint64_t n) { return n ? rnd() % n : 0; }

typedef struct gbuf {
  uint8_t *b;
  size_t n, cap;
} gbuf;
static void g1(gbuf *g, uint8_t x) {
  if (g->n == g->cap) {
    g->cap = g->cap ? g->cap * 2 : 256;
    g->b = realloc(g->b, g->cap);
  }
  g->b[g->n++] = x;
}
static void gbe(gbuf *g, uint64_t v, int n) {
  for (int i = n - 1; i >= 0; i--) g1(g, (uint8_t)(v >> (8 * i)));
}

/* An array ext naming blob 0 (<f4, 3: 12 bytes) or blob 1 (|u1, 0). */
static void gen_array(gbuf *g) {
  int which = (int)rn(3); /* 2: a blob that does not exist */
  const char *dt = which == 0 ? "<f4" : "|u1";
  uint8_t ext[7 + 3 + 8];
  em__put_u32(ext, (uint32_t)which);
  ext[4] = 0;
  ext[5] = 1;
  ext[6] = 3;
  memcpy(ext + 7, dt, 3);
  em__put_u64(ext + 10, which == 0 ? 3 : 0);
  g1(g, 0xc7);
  g1(g, sizeof ext);
  g1(g, EM_EXT_ARRAY);
  for (size_t i = 0; i < sizeof ext; i++) g1(g, ext[i]);
}

static void gen_value(gbuf *g, int depth) {
  int k = (int)rn(depth > 34 ? 12 : 20);
  switch (k) {
    case 0: g1(g, (uint8_t)rn(256)); break; /* any byte */
    case 1: g1(g, (uint8_t)rn(128)); break;
    case 2: g1(g, 0xc0 + (uint8_t)rn(4)); break;
    case 3: {
      int w = (int)rn(4);
      g1(g, (uint8_t)((rn(2) ? 0xcc : 0xd0) + w));
      gbe(g, rnd(), 1 << w);
      break;
    }
    case 4:
      g1(g, rn(2) ? 0xca : 0xcb);
      gbe(g, rnd(), g->b[g->n - 1] == 0xca ? 4 : 8);
      break;
    case 5:
    case 6: {
      size_t len = rn(4) ? rn(40) : rn(300);
      int form = (int)rn(4);
      if (form == 0 && len < 32) g1(g, (uint8_t)(0xa0 + len));
      else if (form == 1) g1(g, rn(2) ? 0xd9 : 0xc4), gbe(g, len & 0xff, 1), len &= 0xff;
      else if (form == 2) g1(g, rn(2) ? 0xda : 0xc5), gbe(g, len, 2);
      else g1(g, rn(2) ? 0xdb : 0xc6), gbe(g, len, 4);
      for (size_t i = 0; i < len; i++) g1(g, (uint8_t)rn(256));
      break;
    }
    case 7: {
      /* ext: fixext of any type, or ext8 */
      int8_t t = (int8_t)(rn(3) ? (int)rn(6) - 1 : (int)rn(256) - 128);
      if (rn(2)) {
        int w = (int)rn(5);
        g1(g, (uint8_t)(0xd4 + w));
        g1(g, (uint8_t)t);
        for (int i = 0; i < (1 << w); i++) g1(g, (uint8_t)rn(256));
      } else {
        size_t len = rn(3) ? 0 : rn(20);
        g1(g, 0xc7);
        g1(g, (uint8_t)len);
        g1(g, (uint8_t)t);
        for (size_t i = 0; i < len; i++) g1(g, (uint8_t)rn(256));
      }
      break;
    }
    case 8:
    case 9: gen_array(g); break;
    case 10:
    case 11: g1(g, 0x90 + (uint8_t)rn(2)); break; /* tiny containers, stacking deep */
    case 12:
    case 13:
    case 14:
    case 15: {
      size_t n = rn(5);
      int form = (int)rn(6);
      int tag = rn(3) == 0;
      size_t tot = n + (size_t)tag;
      if (form < 4) g1(g, (uint8_t)(0x90 + (tot & 15)));
      else if (form == 4) g1(g, 0xdc), gbe(g, tot, 2);
      else g1(g, 0xdd), gbe(g, tot, 4);
      if (tag) {
        g1(g, rn(2) ? 0xc7 : 0xd4);
        if (g->b[g->n - 1] == 0xc7) g1(g, 0);
        g1(g, (uint8_t)(rn(2) ? EM_EXT_TUPLE_TAG : EM_EXT_SET_TAG));
        if (g->b[g->n - 2] == 0xd4) g1(g, 0);
      }
      for (size_t i = 0; i < n; i++) gen_value(g, depth + 1);
      break;
    }
    default: {
      size_t n = rn(4);
      int form = (int)rn(5);
      if (form < 3) g1(g, (uint8_t)(0x80 + n));
      else if (form == 3) g1(g, 0xde), gbe(g, n, 2);
      else g1(g, 0xdf), gbe(g, n, 4);
      for (size_t i = 0; i < 2 * n; i++) gen_value(g, depth + 1);
      break;
    }
  }
}

static void mutate(gbuf *g) {
  int nm = 1 + (int)rn(3);
  for (int j = 0; j < nm && g->n; j++) {
    size_t at = rn(g->n);
    switch (rn(6)) {
      case 0: g->b[at] = (uint8_t)rn(256); break;
      case 1: g->b[at] ^= (uint8_t)(1u << rn(8)); break;
      case 2: g->n = at; break; /* truncate */
      case 3:                    /* insert a byte */
        g1(g, 0);
        memmove(g->b + at + 1, g->b + at, g->n - at - 1);
        g->b[at] = (uint8_t)rn(256);
        break;
      case 4: /* delete a byte */
        memmove(g->b + at, g->b + at + 1, g->n - at - 1);
        g->n--;
        break;
      default: g->b[at] = (uint8_t)(g->b[at] + rn(3) - 1); break; /* count +-1 */
    }
  }
}

static void test_differential(void) {
  uint64_t lens[2] = {12, 0};
  int mismatches = 0, accepted = 0, total = 0;
  gbuf g = {0};
  for (int iter = 0; iter < 6000; iter++) {
    g.n = 0;
    if (iter % 7 == 6) { /* random bytes */
      size_t n = 1 + rn(24);
      for (size_t i = 0; i < n; i++) g1(&g, (uint8_t)rn(256));
    } else {
      gen_value(&g, iter % 5 == 0 ? 28 : 0); /* sometimes start near the depth limit */
      if (iter % 3) mutate(&g);
      if (iter % 11 == 0) g1(&g, 0xc0); /* trailing */
    }
    if (!g.n) continue;
    em_msg *m = msg_of(g.b, g.n, 2, lens);
    if (!m) {
      CHECK(0);
      continue;
    }
    total++;
    const char *why = NULL, *cwhy = NULL;
    int rr = reader_accepts(m, &why);
    int cr = em__body_check(m, &cwhy);
    sbuf b1, b2;
    int dr = dump_reader(m, &b1);
    em_value v;
    int vr = em_msg_value(m, &v);
    int dv = dump_value(m, &b2);
    int agree = (rr == EM_OK) == (cr == EM_OK) && (dr == EM_OK) == (cr == EM_OK) && (vr == EM_OK) == (cr == EM_OK) &&
                (rr == EM_OK || why != NULL);
    if (cr == EM_OK) {
      accepted++;
      if (dv != EM_OK || strcmp(b1.s, b2.s) != 0) agree = 0; /* both walks give the same tokens */
    }
    if (!agree) {
      if (mismatches < 5) {
        fprintf(stderr, "  differential mismatch: check %d (%s), reader skip %d (%s), reader tokens %d, value %d\n",
                cr, cwhy ? cwhy : "-", rr, why ? why : "-", dr, vr);
        hex_dump("body", g.b, g.n);
      }
      mismatches++;
    }
    em_msg_free(m);
  }
  free(g.b);
  printf("  differential: %d bodies, %d accepted by em__body_check, %d mismatches\n", total, accepted, mismatches);
  CHECK(accepted > total / 20);
  CHECK(accepted < total - total / 20);
  CHECK_EQ(mismatches, 0);
}

int main(void) {
  RUN(test_ints);
  RUN(test_doubles);
  RUN(test_str_bin);
  RUN(test_nested);
  RUN(test_ndarray);
  RUN(test_put_value);
  RUN(test_access);
  RUN(test_cstr_and_conversions);
  RUN(test_request_error);
  RUN(test_writer_rules);
  RUN(test_reader_truncated);
  RUN(test_reader_refusals);
  RUN(test_reader_long_nesting);
  RUN(test_cost_bombs);
  RUN(test_vectors);
  RUN(test_differential);
  DONE();
}
