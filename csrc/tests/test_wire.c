/* test_wire.c: frame layout, the incremental reader, and the body checks,
 * including malformed, truncated and lying input. */
#include "../wire/em_wire.h"
#include "em_test.h"


static em_pool *pool;

/* Serialise a payload into one contiguous frame (caller frees). */
static uint8_t *frame_of(em_payload *p, uint8_t type, uint64_t id, size_t *len) {
  struct iovec iov[64];
  uint64_t flen;
  int n = em__payload_frame(p, type, 0, id, NULL, iov, &flen);
  if (n < 0) return NULL;
  uint8_t *out = malloc(flen ? flen : 1), *d = out;
  for (int i = 0; i < n; i++) {
    memcpy(d, iov[i].iov_base, iov[i].iov_len);
    d += iov[i].iov_len;
  }
  *len = (size_t)flen;
  return out;
}

/* Feed bytes to a reader in chunks of `chunk`; returns rc of the last next(). */
static int feed(em__reader *r, const uint8_t *data, size_t len, size_t chunk, em_msg **out, const char **why) {
  size_t off = 0;
  int rc = 0;
  *out = NULL;
  while (off < len) {
    uint8_t *dst;
    size_t n;
    em__reader_region(r, &dst, &n);
    n = EM__MIN(n, EM__MIN(chunk, len - off));
    memcpy(dst, data + off, n);
    em__reader_commit(r, n);
    off += n;
    while ((rc = em__reader_next(r, out, why)) == 1) {
      if (off == len) return 1;
      em_msg_free(*out); /* more frames follow: keep the last one only */
      *out = NULL;
    }
    if (rc < 0) return rc;
  }
  return rc;
}

static void test_roundtrip_layout(void) {
  em_payload p;
  CHECK_EQ(em_payload_init(&p), EM_OK);
  float a[5] = {1, 2, 3, 4, 5};
  uint8_t b[3] = {7, 8, 9};
  uint64_t sa[1] = {5}, sb[2] = {1, 3};
  msgpack_pack_map(&p.pk, 3);
  msgpack_pack_str_with_body(&p.pk, "a", 1);
  CHECK_EQ(em_payload_pack_array(&p, "<f4", 1, sa, a, sizeof a, 0), EM_OK);
  msgpack_pack_str_with_body(&p.pk, "b", 1);
  CHECK_EQ(em_payload_pack_array(&p, "|u1", 2, sb, b, sizeof b, 0), EM_OK);
  msgpack_pack_str_with_body(&p.pk, "n", 1);
  msgpack_pack_int(&p.pk, -3);
  CHECK_EQ(em_payload_pack_array(&p, "<f4", 1, sa, a, 12, 0), EM_EINVAL); /* size mismatch */
  CHECK_EQ(em_payload_pack_array(&p, "O8", 1, sa, a, 20, 0), EM_EINVAL);  /* not a dtype */
  size_t len;
  uint8_t *f = frame_of(&p, EM_MSG_REPLY, 42, &len);
  CHECK(f != NULL);
  CHECK(memcmp(f, "EDGM", 4) == 0);
  CHECK_EQ(f[4], EM_PROTOCOL_VERSION);
  CHECK_EQ(f[5], EM_MSG_REPLY);
  CHECK_EQ(em__get_u64(f + 8), 42);
  CHECK_EQ(em__get_u32(f + 20), 2);
  CHECK_EQ(em__get_u64(f + 24), len);
  for (size_t chunk = 1; chunk <= len; chunk = chunk * 3 + 1) {
    em__reader r;
    em__reader_init(&r, pool, 1 << 20);
    em_msg *m;
    const char *why;
    CHECK_EQ(feed(&r, f, len, chunk, &m, &why), 1);
    if (m) {
      CHECK_EQ(m->req_id, 42);
      CHECK_EQ(m->nblobs, 2);
      CHECK(((uintptr_t)m->blobs[0].data % EM_BLOB_ALIGN) == 0);
      CHECK(((uintptr_t)m->blobs[1].data % EM_BLOB_ALIGN) == 0);
      CHECK(memcmp(m->blobs[0].data, a, sizeof a) == 0);
      CHECK(memcmp(m->blobs[1].data, b, sizeof b) == 0);
      msgpack_zone z;
      msgpack_zone_init(&z, 256);
      msgpack_object o;
      CHECK_EQ(em_msg_unpack(m, &z, &o), EM_OK);
      em_array arr;
      CHECK_EQ(em_obj_array(m, em_obj_get(&o, "b"), &arr), EM_OK);
      CHECK_EQ(arr.ndim, 2);
      CHECK_EQ(arr.shape[1], 3);
      CHECK(strcmp(arr.dtype, "|u1") == 0);
      CHECK_EQ(em_obj_get(&o, "n")->via.i64, -3);
      CHECK(em_obj_get(&o, "zz") == NULL);
      msgpack_zone_destroy(&z);
    }
    em_msg_free(m);
    em__reader_destroy(&r);
  }
  free(f);
  em_payload_destroy(&p);
}

static void test_two_frames_back_to_back(void) {
  em_payload p;
  em_payload_init(&p);
  msgpack_pack_str_with_body(&p.pk, "hi", 2);
  size_t l1;
  uint8_t *f1 = frame_of(&p, EM_MSG_REPLY, 1, &l1);
  em_payload_reset(&p);
  msgpack_pack_int(&p.pk, 5);
  size_t l2;
  uint8_t *f2 = frame_of(&p, EM_MSG_REPLY, 2, &l2);
  uint8_t *both = malloc(l1 + l2);
  memcpy(both, f1, l1);
  memcpy(both + l1, f2, l2);
  em__reader r;
  em__reader_init(&r, pool, 1 << 20);
  uint8_t *dst;
  size_t n;
  em__reader_region(&r, &dst, &n);
  memcpy(dst, both, l1 + l2);
  em__reader_commit(&r, l1 + l2);
  em_msg *m;
  const char *why;
  CHECK_EQ(em__reader_next(&r, &m, &why), 1);
  CHECK_EQ(m->req_id, 1);
  em_msg_free(m);
  CHECK_EQ(em__reader_next(&r, &m, &why), 1);
  CHECK_EQ(m->req_id, 2);
  em_msg_free(m);
  CHECK_EQ(em__reader_next(&r, &m, &why), 0);
  CHECK(!em__reader_mid_frame(&r));
  em__reader_destroy(&r);
  free(f1);
  free(f2);
  free(both);
  em_payload_destroy(&p);
}

static int parse_hdr(const uint8_t *h, uint64_t max, const char **why) {
  em__hdr hh;
  return em__hdr_parse(h, max, &hh, why);
}

/* After a large frame the reader asks for the next header alone (no staging
 * copy of the large body); after a small one it offers the whole stage again.
 * Frames must come out whole and in order either way. */
static void test_header_first_after_big_frame(void) {
  em_payload p;
  em_payload_init(&p);
  static uint8_t big[100000];
  for (size_t i = 0; i < sizeof big; i++) big[i] = (uint8_t)(i * 7);
  uint64_t shape[1] = {sizeof big};
  CHECK_EQ(em_payload_pack_array(&p, "|u1", 1, shape, big, sizeof big, 0), EM_OK);
  size_t lb;
  uint8_t *fb = frame_of(&p, EM_MSG_REPLY, 1, &lb);
  em_payload_reset(&p);
  msgpack_pack_int(&p.pk, 5);
  size_t ls;
  uint8_t *fs = frame_of(&p, EM_MSG_REPLY, 2, &ls);
  size_t total = 2 * lb + 2 * ls, off = 0;
  uint8_t *all = malloc(total);
  memcpy(all, fb, lb);
  memcpy(all + lb, fs, ls);
  memcpy(all + lb + ls, fb, lb);
  memcpy(all + 2 * lb + ls, fs, ls);
  em__reader r;
  em__reader_init(&r, pool, 1 << 20);
  uint64_t want = 1;
  size_t max_boundary_region[5] = {0};
  while (off < total) {
    uint8_t *dst;
    size_t n;
    em__reader_region(&r, &dst, &n);
    if (!em__reader_mid_frame(&r) && want <= 4 && n > max_boundary_region[want]) max_boundary_region[want] = n;
    n = EM__MIN(n, total - off); /* a socket that always has data */
    memcpy(dst, all + off, n);
    em__reader_commit(&r, n);
    off += n;
    em_msg *m;
    const char *why;
    int rc;
    while ((rc = em__reader_next(&r, &m, &why)) == 1) {
      CHECK_EQ(m->req_id, want & 1 ? 1 : 2);
      if (m->req_id == 1) {
        CHECK_EQ(m->nblobs, 1);
        CHECK_EQ(m->blobs[0].len_bytes, sizeof big);
        CHECK(memcmp(m->blobs[0].data, big, sizeof big) == 0);
      }
      em_msg_free(m);
      want++;
    }
    CHECK_EQ(rc, 0);
  }
  CHECK_EQ(want, 5);
  CHECK(max_boundary_region[1] > EM_FRAME_HEADER_BYTES);  /* first frame: the whole stage */
  CHECK_EQ(max_boundary_region[2], EM_FRAME_HEADER_BYTES); /* after the big one: header only */
  CHECK(max_boundary_region[3] > EM_FRAME_HEADER_BYTES);  /* after a small one: whole stage */
  CHECK_EQ(max_boundary_region[4], EM_FRAME_HEADER_BYTES);
  CHECK(!em__reader_mid_frame(&r));
  em__reader_destroy(&r);
  free(fb);
  free(fs);
  free(all);
  em_payload_destroy(&p);
}

static void test_bad_headers(void) {
  uint8_t h[64] = {0};
  em__hdr good = {.type = EM_MSG_REQUEST, .body_len = 1, .nblobs = 0, .frame_len = 72};
  const char *why = NULL;
  em__hdr_write(h, &good);
  CHECK_EQ(parse_hdr(h, 1 << 20, &why), EM_OK);
  uint8_t b[64];
  memcpy(b, h, 64); b[0] = 'X';
  CHECK_EQ(parse_hdr(b, 1 << 20, &why), EM_EPROTO);
  memcpy(b, h, 64); b[4] = 99;
  CHECK_EQ(parse_hdr(b, 1 << 20, &why), EM_EVERSION);
  memcpy(b, h, 64); b[5] = 0;
  CHECK_EQ(parse_hdr(b, 1 << 20, &why), EM_EPROTO);
  /* a 4 GB frame against a 1 MiB limit: refused before any allocation */
  em__hdr big = good;
  big.frame_len = 4ull << 30;
  em__hdr_write(b, &big);
  CHECK_EQ(parse_hdr(b, 1 << 20, &why), EM_ETOOBIG);
  em__hdr many = good;
  many.nblobs = 1u << 30;
  em__hdr_write(b, &many);
  CHECK_EQ(parse_hdr(b, UINT64_MAX, &why), EM_EPROTO);
  em__hdr small = good;
  small.body_len = 1000;
  small.frame_len = 100; /* body does not fit */
  em__hdr_write(b, &small);
  CHECK_EQ(parse_hdr(b, 1 << 20, &why), EM_EPROTO);
}

static void test_absurd_length_no_alloc(void) {
  /* A 4 GB declared length is refused by the header check, before the
   * reader allocates anything (ETOOBIG, not ENOMEM). */
  uint8_t b[64];
  em__hdr big = {.type = EM_MSG_REQUEST, .body_len = 8, .frame_len = (4ull << 30) + 80};
  em__hdr_write(b, &big);
  em__reader r;
  em__reader_init(&r, pool, 64ull << 20);
  em_msg *m;
  const char *why = NULL;
  CHECK_EQ(feed(&r, b, 64, 64, &m, &why), EM_ETOOBIG);
  CHECK(why && strstr(why, "max_message_bytes"));
  em__reader_destroy(&r);
}

static void test_blob_table_lies(void) {
  em_payload p;
  em_payload_init(&p);
  uint8_t d[100] = {0};
  uint64_t s[1] = {100};
  em_payload_pack_array(&p, "|u1", 1, s, d, 100, 0);
  size_t len;
  uint8_t *f = frame_of(&p, EM_MSG_REPLY, 1, &len);
  uint32_t body_len = em__get_u32(f + 16);
  size_t table = EM__ALIGN_UP(64 + body_len, 8);
  /* blob length larger than the frame */
  uint8_t *g = malloc(len);
  memcpy(g, f, len);
  em__put_u64(g + table, 1ull << 40);
  em__reader r;
  em__reader_init(&r, pool, 1 << 20);
  em_msg *m;
  const char *why;
  CHECK_EQ(feed(&r, g, len, 7, &m, &why), EM_EPROTO);
  em__reader_destroy(&r);
  /* blob shorter than declared in the header's frame_len */
  memcpy(g, f, len);
  em__put_u64(g + table, 50);
  em__reader_init(&r, pool, 1 << 20);
  CHECK_EQ(feed(&r, g, len, 4096, &m, &why), EM_EPROTO);
  em__reader_destroy(&r);
  /* array header whose size disagrees with its blob: body check fails */
  memcpy(g, f, len);
  em__put_u64(g + table, 100);
  em__reader_init(&r, pool, 1 << 20);
  CHECK_EQ(feed(&r, g, len, 4096, &m, &why), 1);
  CHECK_EQ(em__body_check(m, &why), EM_OK);
  /* shape is the last 8 bytes of the ext payload inside the body */
  uint8_t *shape = (uint8_t *)m->body + m->body_len - 8;
  em__put_u64(shape, 101);
  CHECK_EQ(em__body_check(m, &why), EM_EDECODE);
  CHECK(strstr(why, "disagree") != NULL);
  em__put_u64(shape, UINT64_MAX);
  CHECK_EQ(em__body_check(m, &why), EM_EDECODE);
  em_msg_free(m);
  em__reader_destroy(&r);
  free(g);
  free(f);
  em_payload_destroy(&p);
}

static em_msg fake_msg(const uint8_t *body, size_t len) {
  em_msg m;
  memset(&m, 0, sizeof m);
  m.body = body;
  m.body_len = len;
  return m;
}

static void test_body_lies(void) {
  const char *why;
  /* array32 claiming 2^32-1 elements in 5 bytes */
  uint8_t a[] = {0xdd, 0xff, 0xff, 0xff, 0xff};
  em_msg m = fake_msg(a, sizeof a);
  CHECK_EQ(em__body_check(&m, &why), EM_EDECODE);
  /* map32 claiming many pairs */
  uint8_t b[] = {0xdf, 0x7f, 0xff, 0xff, 0xff, 0x01, 0x02};
  m = fake_msg(b, sizeof b);
  CHECK_EQ(em__body_check(&m, &why), EM_EDECODE);
  /* str32 longer than the body */
  uint8_t c[] = {0xdb, 0x00, 0x01, 0x00, 0x00, 'a'};
  m = fake_msg(c, sizeof c);
  CHECK_EQ(em__body_check(&m, &why), EM_EDECODE);
  /* reserved byte 0xc1 */
  uint8_t d[] = {0xc1};
  m = fake_msg(d, sizeof d);
  CHECK_EQ(em__body_check(&m, &why), EM_EDECODE);
  /* trailing bytes */
  uint8_t e[] = {0x01, 0x02};
  m = fake_msg(e, sizeof e);
  CHECK_EQ(em__body_check(&m, &why), EM_EDECODE);
  /* array ext naming a blob that does not exist */
  uint8_t f[] = {0xc7, 10, EM_EXT_ARRAY, 5, 0, 0, 0, 0, 0, 3, '|', 'u', '1'};
  m = fake_msg(f, sizeof f);
  CHECK_EQ(em__body_check(&m, &why), EM_EDECODE);
  /* deep nesting: 200 nested arrays */
  uint8_t g[201];
  memset(g, 0x91, 200);
  g[200] = 0x01;
  m = fake_msg(g, sizeof g);
  CHECK_EQ(em__body_check(&m, &why), EM_EDECODE);
  CHECK(strstr(why, "deep") != NULL);
  /* 31 nested arrays are fine, and msgpack-c agrees */
  m = fake_msg(g + 200 - 31, 32);
  CHECK_EQ(em__body_check(&m, &why), EM_OK);
  msgpack_zone z;
  msgpack_zone_init(&z, 1024);
  msgpack_object o;
  CHECK_EQ(em_msg_unpack(&m, &z, &o), EM_OK);
  msgpack_zone_destroy(&z);
  /* empty body */
  m = fake_msg(g, 0);
  CHECK_EQ(em__body_check(&m, &why), EM_EDECODE);
}

/* Every truncation of a valid frame is "need more", never a crash. */
static void test_truncations(void) {
  em_payload p;
  em_payload_init(&p);
  uint8_t d[300];
  for (int i = 0; i < 300; i++) d[i] = (uint8_t)i;
  uint64_t s[1] = {300};
  msgpack_pack_array(&p.pk, 2);
  em_payload_pack_array(&p, "|u1", 1, s, d, 300, 0);
  msgpack_pack_str_with_body(&p.pk, "tail", 4);
  size_t len;
  uint8_t *f = frame_of(&p, EM_MSG_REPLY, 9, &len);
  for (size_t cut = 0; cut < len; cut++) {
    em__reader r;
    em__reader_init(&r, pool, 1 << 20);
    em_msg *m = NULL;
    const char *why;
    int rc = cut ? feed(&r, f, cut, 13, &m, &why) : 0;
    CHECK_EQ(rc, 0);
    CHECK(m == NULL);
    CHECK_EQ(em__reader_mid_frame(&r), cut > 0);
    em__reader_destroy(&r);
  }
  free(f);
  em_payload_destroy(&p);
}

/* Random bytes after a valid header: errors or frames, never a crash. */
static void test_garbage(void) {
  srand(1234);
  for (int it = 0; it < 2000; it++) {
    uint8_t buf[512];
    for (size_t i = 0; i < sizeof buf; i++) buf[i] = (uint8_t)rand();
    if (it % 2) {
      em__hdr h = {.type = (uint8_t)(1 + rand() % 13), .body_len = (uint32_t)(rand() % 400),
                   .nblobs = (uint32_t)(rand() % 4)};
      h.frame_len = 64 + (uint64_t)(rand() % 448);
      em__hdr_write(buf, &h);
    }
    em__reader r;
    em__reader_init(&r, pool, 1 << 20);
    em_msg *m = NULL;
    const char *why;
    int rc = feed(&r, buf, sizeof buf, 100, &m, &why);
    if (rc == 1 && m) {
      msgpack_zone z;
      msgpack_zone_init(&z, 1024);
      msgpack_object o;
      (void)em_msg_unpack(m, &z, &o);
      msgpack_zone_destroy(&z);
      em_msg_free(m);
    }
    CHECK(rc <= 1);
    em__reader_destroy(&r);
  }
}

static void test_pool_reuse(void) {
  em_pool *p = em__pool_new(1 << 20);
  em_buf *a = em__buf_alloc(p, 5000);
  uint8_t *mem = a->data;
  CHECK(((uintptr_t)mem % 64) == 0);
  CHECK(a->cap_bytes >= 5000);
  em_buf_release(a);
  em_buf *b = em__buf_alloc(p, 6000);
  CHECK(b->data == mem); /* same class: reused */
  em_buf *big = em__buf_alloc(p, 300u << 20); /* unpooled size */
  CHECK(big != NULL);
  em_buf_release(big);
  em__pool_release(p); /* buffers keep the pool alive */
  em_buf_release(b);
}

int main(void) {
  pool = em__pool_new(16 << 20);
  RUN(test_roundtrip_layout);
  RUN(test_two_frames_back_to_back);
  RUN(test_header_first_after_big_frame);
  RUN(test_bad_headers);
  RUN(test_absurd_length_no_alloc);
  RUN(test_blob_table_lies);
  RUN(test_body_lies);
  RUN(test_truncations);
  RUN(test_garbage);
  RUN(test_pool_reuse);
  em__pool_release(pool);
  DONE();
}
