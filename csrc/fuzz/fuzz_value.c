/* fuzz_value.c: libFuzzer target for the public value API (csrc/wire/
 * value.c): the tokenizer em__tok behind em_reader, em_msg_value, em_iter,
 * em_value_get/at/ndarray and the em_put_* writers (em_put_value).
 *
 * Input: the layout of fuzz_payload.c, so its corpus (corpus_payload/)
 * seeds this target too:
 *   byte 0, bits 0-3  number of blobs N (0..15)
 *           bit 4     fix up blob sizes to what the array exts in the body
 *                     ask for (a byte scan, as in fuzz_payload.c)
 *           bits 5-7  message type - 1
 *   N x u16 LE        blob lengths (before any fix-up)
 *   rest              the body (msgpack)
 * The body is wrapped into a correct frame (docs/protocol.md layout) and
 * turned into an em_msg by em__frame_finish.
 *
 * Properties (any violation aborts):
 *   1. differential: em__body_check (payload.c) accepts the body iff the
 *      reader does, read whole with em_read_skip + em_reader_finish, iff it
 *      does read token by token with em_read + em_reader_finish, iff
 *      em_msg_value does; a refusing reader gives a reason;
 *   2. if accepted: walking every value from em_msg_value with em_iter
 *      gives the reader's token stream; every container yields exactly its
 *      len (2 x len for a map) elements; em_value_at(i) is the i-th
 *      element; em_value_get finds the first entry with a str key and
 *      returns 0 for an absent key; every ndarray gives EM_OK from
 *      em_value_ndarray, its blob's data, and item size x shape = length;
 *   3. em_put_value of the root into a new payload builds without error,
 *      em_frame_encode / em_frame_decode accept it, and the new body reads
 *      back as the same token stream (values bit for bit, str/bin/ext
 *      bytes, arrays by dtype, shape, flags and content).
 *
 * Build: csrc/fuzz/build.sh [builddir]  (-> builddir/fuzz_value)
 * Run (from the repository root):
 *   mkdir -p /tmp/cv && csrc/build-fuzz/fuzz_value -max_total_time=180 -timeout=10 -rss_limit_mb=2048 \
 *       -artifact_prefix=/tmp/ /tmp/cv csrc/fuzz/corpus_payload
 * See csrc/fuzz/README.md.
 */
#include "../wire/em_wire.h"

#include <stdio.h>
#include <stdlib.h>

#define VCHECK(cond, ...)                                                               \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      fprintf(stderr, "%s:%d: fuzz check failed: %s: ", __FILE__, __LINE__, #cond);    \
      fprintf(stderr, __VA_ARGS__);                                                     \
      fputc('\n', stderr);                                                              \
      abort();                                                                          \
    }                                                                                   \
  } while (0)

#define MAX_FIXED_BLOB (1u << 20)
#define MAX_BLOB_TOTAL (4u << 20)
#define MAX_WALK_DEPTH 40 /* > EM_READER_DEPTH: the checks bound it */

/* Item size of a dtype string per docs/protocol.md (for the fix-up only). */
static int ref_dtype(const uint8_t *d, size_t n, uint64_t *itemsize) {
  if (n < 3 || n > EM_DTYPE_MAX) return 0;
  if (!d[0] || !memchr("<>|=", d[0], 4)) return 0;
  uint8_t kind = d[1];
  if (!kind || !memchr("biufcmMSUV", kind, 10)) return 0;
  uint64_t size = 0;
  size_t i = 2;
  for (; i < n && d[i] >= '0' && d[i] <= '9'; i++) size = size * 10 + (uint64_t)(d[i] - '0');
  if (i == 2) return 0;
  *itemsize = kind == 'U' ? size * 4 : size;
  return 1;
}

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
    if (!ref_dtype(d + 7, dl, &size)) continue;
    if (size > MAX_FIXED_BLOB) size = MAX_FIXED_BLOB + 1;
    for (size_t k = 0; k < ndim; k++) {
      uint64_t s = em__get_u64(d + 7 + dl + 8 * k);
      if (s == 0) size = 0;
      else if (s > MAX_FIXED_BLOB || size * s > MAX_FIXED_BLOB) size = size ? MAX_FIXED_BLOB + 1 : 0;
      else size *= s;
    }
    if (size <= MAX_FIXED_BLOB) lens[blob] = size;
  }
}

/* ------------------------------------------------------------ tokens */

typedef struct toks {
  em_value *v;
  size_t n, cap;
} toks;

static void toks_add(toks *t, const em_value *v) {
  if (t->n == t->cap) {
    t->cap = t->cap ? 2 * t->cap : 64;
    t->v = realloc(t->v, t->cap * sizeof *t->v);
    VCHECK(t->v != NULL, "out of memory");
  }
  t->v[t->n++] = *v;
}

static uint64_t n_elems(const em_value *v) {
  if (v->type == EM_T_MAP) return 2ull * v->len;
  if (v->type >= EM_T_LIST && v->type <= EM_T_SET) return v->len;
  return 0;
}

/* Read the whole body token by token. EM_OK or EM_EDECODE (+ why). */
static int read_tokens(const em_msg *m, toks *t, const char **why) {
  em_reader r;
  em_reader_init(&r, m);
  uint64_t pending = 1;
  int rc = EM_OK;
  while (pending) {
    em_value v;
    rc = em_read(&r, &v);
    if (rc) break;
    if (t) toks_add(t, &v);
    pending = pending - 1 + n_elems(&v);
  }
  if (rc == EM_OK) rc = em_reader_finish(&r);
  *why = em_reader_why(&r);
  return rc;
}

static int reader_skip_all(const em_msg *m, const char **why) {
  em_reader r;
  em_reader_init(&r, m);
  int rc = em_read_skip(&r);
  if (rc == EM_OK) rc = em_reader_finish(&r);
  *why = em_reader_why(&r);
  return rc;
}

static void check_array(const em_msg *m, const em_value *v, em_array *a) {
  int rc = em_value_ndarray(v, a);
  VCHECK(rc == EM_OK, "em_value_ndarray of an accepted body: %d", rc);
  VCHECK(a->blob < m->nblobs, "blob %u of %u", a->blob, m->nblobs);
  VCHECK(a->data == m->blobs[a->blob].data && a->len_bytes == m->blobs[a->blob].len_bytes, "array data");
  VCHECK(a->ndim <= EM_ARRAY_MAX_NDIM && (!a->is_scalar || a->ndim == 0), "ndim %u scalar %d", a->ndim,
         a->is_scalar);
  unsigned __int128 count = a->itemsize;
  for (uint32_t i = 0; i < a->ndim; i++) count *= a->shape[i];
  VCHECK(count == a->len_bytes, "itemsize x shape != blob length");
}

/* The same value? (the token itself; containers by kind and size) */
static int same_tok(const em_value *x, const em_value *y) {
  if (x->type != y->type || x->len != y->len) return 0;
  switch (x->type) {
    case EM_T_BOOL: return x->as.b == y->as.b;
    case EM_T_INT: return x->as.i == y->as.i;
    case EM_T_UINT: return x->as.u == y->as.u;
    case EM_T_FLOAT: return memcmp(&x->as.f, &y->as.f, sizeof(double)) == 0;
    case EM_T_STR:
    case EM_T_BIN: return x->len == 0 || memcmp(x->as.bin, y->as.bin, x->len) == 0;
    case EM_T_EXT: return x->ext_type == y->ext_type && (x->len == 0 || memcmp(x->as.bin, y->as.bin, x->len) == 0);
    case EM_T_NDARRAY: {
      em_array a, b;
      if (em_value_ndarray(x, &a) || em_value_ndarray(y, &b)) return 0;
      if (strcmp(a.dtype, b.dtype) || a.ndim != b.ndim || a.is_scalar != b.is_scalar || a.itemsize != b.itemsize ||
          a.len_bytes != b.len_bytes)
        return 0;
      for (uint32_t i = 0; i < a.ndim; i++)
        if (a.shape[i] != b.shape[i]) return 0;
      return a.len_bytes == 0 || memcmp(a.data, b.data, a.len_bytes) == 0;
    }
    default: return 1; /* nil; containers: type and len above */
  }
}

/* The same value at the same place in the body? */
static int same_place(const em_value *x, const em_value *y) {
  if (!same_tok(x, y)) return 0;
  if (x->type >= EM_T_LIST && x->type <= EM_T_MAP) return x->_p == y->_p;
  if (x->type == EM_T_STR || x->type == EM_T_BIN || x->type == EM_T_EXT || x->type == EM_T_NDARRAY)
    return x->as.bin == y->as.bin;
  return 1;
}

/* Walk v and its elements with em_iter, checking them against the
 * reader's stream `t` from position *pos. */
static void walk(const em_msg *m, const em_value *v, const toks *t, size_t *pos, int depth) {
  VCHECK(depth <= MAX_WALK_DEPTH, "walk deeper than %d", MAX_WALK_DEPTH);
  VCHECK(*pos < t->n, "the walk has more values than the reader (%zu)", t->n);
  VCHECK(same_tok(v, &t->v[*pos]), "walk and reader differ at token %zu (types %d, %d)", *pos, v->type,
         t->v[*pos].type);
  (*pos)++;
  if (v->type == EM_T_NDARRAY) {
    em_array a;
    check_array(m, v, &a);
  }
  uint64_t want = n_elems(v);
  em_iter it;
  em_iter_init(&it, v);
  em_value e, prev_key;
  uint64_t n = 0;
  int have_key = 0;
  while (em_iter_next(&it, &e)) {
    if (v->type >= EM_T_LIST && v->type <= EM_T_SET && n < 8) {
      em_value at;
      int rc = em_value_at(v, (uint32_t)n, &at);
      VCHECK(rc == EM_OK && same_place(&at, &e), "em_value_at(%llu) differs from em_iter",
             (unsigned long long)n);
    }
    if (v->type == EM_T_MAP) {
      if (n % 2 == 0) {
        prev_key = e;
        have_key = 1;
      } else if (have_key && prev_key.type == EM_T_STR && prev_key.len < 64 &&
                 !memchr(prev_key.as.str, 0, prev_key.len)) {
        char key[64];
        memcpy(key, prev_key.as.str, prev_key.len);
        key[prev_key.len] = 0;
        em_value got;
        int rc = em_value_get(v, key, &got);
        VCHECK(rc == 1, "em_value_get of a present key: %d", rc);
        /* the first entry with that key, found by hand */
        if (n < 32) {
          em_iter it2;
          em_iter_init(&it2, v);
          em_value k2, v2;
          int found = 0;
          while (em_iter_next(&it2, &k2) && em_iter_next(&it2, &v2))
            if (em_value_is(&k2, key)) {
              found = 1;
              break;
            }
          VCHECK(found && same_place(&got, &v2), "em_value_get does not return the first entry with its key");
        }
      }
    }
    walk(m, &e, t, pos, depth + 1);
    n++;
  }
  VCHECK(n == want, "em_iter gave %llu elements, want %llu", (unsigned long long)n, (unsigned long long)want);
  if (v->type == EM_T_MAP) {
    em_value got;
    int rc = em_value_get(v, "\x01no such key\x02", &got);
    VCHECK(rc == 0, "em_value_get of an absent key: %d", rc);
  } else {
    em_value got;
    int rc = em_value_get(v, "k", &got);
    VCHECK(rc == EM_EINVAL, "em_value_get on a %s: %d", em_type_name(v->type), rc);
  }
  if (v->type >= EM_T_LIST && v->type <= EM_T_SET) {
    em_value at;
    VCHECK(em_value_at(v, v->len, &at) == EM_EINVAL, "em_value_at past the end");
  }
}

static void roundtrip(const em_msg *m, const em_value *root, const toks *t) {
  em_payload *p = em_payload_new();
  VCHECK(p != NULL, "em_payload_new");
  int rc = em_put_value(p, root);
  VCHECK(rc == EM_OK && em_payload_error(p) == EM_OK, "em_put_value of an accepted body: %d", rc);
  uint8_t *f = NULL;
  size_t fl = 0;
  rc = em_frame_encode(p, EM_MSG_REPLY, 5, &f, &fl);
  VCHECK(rc == EM_OK, "em_frame_encode of a copied value: %d", rc);
  em_msg *m2 = NULL;
  const char *why = NULL;
  rc = em_frame_decode(f, fl, 0, &m2, &why);
  VCHECK(rc == EM_OK, "em_frame_decode of an encoded frame: %d %s", rc, why ? why : "");
  free(f);
  toks t2 = {0};
  rc = read_tokens(m2, &t2, &why);
  VCHECK(rc == EM_OK, "the copy does not read back: %s", why ? why : "");
  VCHECK(t2.n == t->n, "the copy has %zu tokens, the original %zu", t2.n, t->n);
  for (size_t i = 0; i < t->n; i++)
    VCHECK(same_tok(&t->v[i], &t2.v[i]), "the copy differs at token %zu (types %d, %d)", i, t->v[i].type,
           t2.v[i].type);
  const char *cwhy = NULL;
  VCHECK(em__body_check(m2, &cwhy) == EM_OK, "em__body_check refuses the copy: %s", cwhy);
  free(t2.v);
  em_msg_free(m2);
  em_payload_free(p);
}

static void check_msg(const em_msg *m) {
  const char *cwhy = NULL, *swhy = NULL, *twhy = NULL;
  int cr = em__body_check(m, &cwhy);
  int sr = reader_skip_all(m, &swhy);
  toks t = {0};
  int tr = read_tokens(m, &t, &twhy);
  em_value root;
  int vr = em_msg_value(m, &root);
  VCHECK((cr == EM_OK) == (sr == EM_OK) && (cr == EM_OK) == (tr == EM_OK) && (cr == EM_OK) == (vr == EM_OK),
         "differential: em__body_check %d (%s), em_read_skip+finish %d (%s), em_read+finish %d (%s), "
         "em_msg_value %d",
         cr, cwhy ? cwhy : "-", sr, swhy ? swhy : "-", tr, twhy ? twhy : "-", vr);
  VCHECK(sr == EM_OK || swhy, "a refusing reader gives no reason");
  VCHECK(tr == EM_OK || twhy, "a refusing reader gives no reason");
  VCHECK(sr != EM_OK || !swhy, "an accepting reader gives a reason");
  if (cr == EM_OK) {
    size_t pos = 0;
    walk(m, &root, &t, &pos, 0);
    VCHECK(pos == t.n, "the walk saw %zu values, the reader %zu", pos, t.n);
    roundtrip(m, &root, &t);
  }
  free(t.v);
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

  em__hdr h;
  memset(&h, 0, sizeof h);
  h.type = (uint8_t)(1 + (cfg >> 5));
  h.req_id = 77;
  h.body_len = (uint32_t)body_len;
  h.nblobs = nblobs;
  uint64_t off = EM__ALIGN_UP((uint64_t)EM_FRAME_HEADER_BYTES + body_len, 8) + 8ull * nblobs;
  uint64_t blob_off[16];
  for (uint32_t i = 0; i < nblobs; i++) {
    off = EM__ALIGN_UP(off, EM_BLOB_ALIGN);
    blob_off[i] = off;
    off += lens[i];
  }
  h.frame_len = off;

  em_pool *pool = em__pool_new(0);
  VCHECK(pool != NULL, "em__pool_new");
  em_buf *buf = em__buf_alloc(pool, (size_t)h.frame_len);
  VCHECK(buf != NULL, "em__buf_alloc");
  uint8_t *f = em_buf_data(buf);
  memset(f, 0, (size_t)h.frame_len);
  em__hdr_write(f, &h);
  if (body_len) memcpy(f + EM_FRAME_HEADER_BYTES, body, body_len);
  uint8_t *table = f + EM__ALIGN_UP((uint64_t)EM_FRAME_HEADER_BYTES + body_len, 8);
  for (uint32_t i = 0; i < nblobs; i++) {
    em__put_u64(table + 8 * i, lens[i]);
    for (uint64_t k = 0; k < lens[i]; k++) f[blob_off[i] + k] = (uint8_t)(i * 31 + k * 7 + 1);
  }
  em_msg *m = NULL;
  const char *why = NULL;
  int rc = em__frame_finish(buf, &h, &m, &why);
  VCHECK(rc == EM_OK, "a well-formed frame is rejected: %d %s", rc, why);

  check_msg(m);

  em_msg_free(m);
  em__pool_release(pool);
  return 0;
}
