/* fuzz_common.h: checks shared by the libFuzzer targets (fuzz_frame.c,
 * fuzz_payload.c). Header-only; each target includes it once.
 *
 * For every complete frame a target hands to fuzz_msg():
 *   1. the em_msg must describe memory inside its frame buffer (body after
 *      the header, blobs 64-byte aligned, in order, inside frame_bytes);
 *   2. em__body_check, then em_msg_unpack; a body the check accepts must
 *      also unpack with msgpack-c (the check exists to vet bodies for it);
 *   3. the msgpack object tree is walked (depth-bounded); every EM_EXT_ARRAY
 *      ext must give EM_OK from em_obj_array (the body check already vetted
 *      it), every other object EM_EINVAL, and an accepted array must be
 *      consistent: blob in range, data == that blob, itemsize x product of
 *      the shape == blob length (checked in 128-bit), a scalar has ndim 0,
 *      dtype == the ext's dtype bytes; em_obj_get is tried on every map;
 *      The dtype of an accepted array must also be one docs/protocol.md
 *      allows: [<>|=][biufcmMSUV]<digits>([unit] for m/M only), and
 *      em_array.itemsize must be the item size the string names;
 *   4. round trip: the tree is packed again with em_payload_* (arrays via
 *      em_payload_pack_array), framed with em__payload_frame, read back with
 *      an em__reader and compared with the original (arrays by content).
 * Any violation calls abort(), which libFuzzer reports as a crash; ASan,
 * UBSan (no recovery) and LeakSanitizer catch the rest.
 */
#ifndef EM_FUZZ_COMMON_H
#define EM_FUZZ_COMMON_H

#include "../wire/em_wire.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#define FUZZ_CHECK(cond, ...)                                                \
  do {                                                                       \
    if (!(cond)) {                                                           \
      fprintf(stderr, "%s:%d: fuzz check failed: %s: ", __FILE__, __LINE__, #cond); \
      fprintf(stderr, __VA_ARGS__);                                          \
      fputc('\n', stderr);                                                   \
      abort();                                                               \
    }                                                                        \
  } while (0)

#define FUZZ_MAX_WALK_DEPTH 64     /* > EM__MAX_DEPTH: the body check bounds it */
#define FUZZ_ROUNDTRIP_BLOB_BYTES (8u << 20)

/* Reference reading of a dtype string, straight from docs/protocol.md:
 * byte order [<>|=], kind [biufcmMSUV], item size (decimal digits),
 * optional [unit] (non-empty, alphanumeric) for the datetime kinds m/M.
 * Item size 0 only for the flexible kinds S, U, V; U counts 4-byte chars.
 * Returns 1 and *itemsize when valid. */
static int fuzz_ref_dtype(const uint8_t *d, size_t n, uint64_t *itemsize) {
  if (n < 3 || n > EM_DTYPE_MAX) return 0;
  if (!d[0] || !memchr("<>|=", d[0], 4)) return 0;
  uint8_t kind = d[1];
  if (!kind || !memchr("biufcmMSUV", kind, 10)) return 0;
  uint64_t size = 0;
  size_t i = 2;
  for (; i < n && d[i] >= '0' && d[i] <= '9'; i++) size = size * 10 + (uint64_t)(d[i] - '0');
  if (i == 2) return 0; /* at most 13 digits: no overflow */
  if (i < n) {
    if ((kind != 'm' && kind != 'M') || d[i] != '[' || d[n - 1] != ']' || n - i < 3) return 0;
    for (size_t j = i + 1; j < n - 1; j++)
      if (!((d[j] >= 'a' && d[j] <= 'z') || (d[j] >= 'A' && d[j] <= 'Z') || (d[j] >= '0' && d[j] <= '9')))
        return 0;
  }
  if (size == 0 && kind != 'S' && kind != 'U' && kind != 'V') return 0;
  *itemsize = kind == 'U' ? size * 4 : size;
  return 1;
}

/* ---------------------------------------------------------------- em_msg */

static void fuzz_check_msg_layout(const em_msg *m) {
  const uint8_t *base = em_buf_data(m->buf);
  FUZZ_CHECK(m->frame_bytes >= EM_FRAME_HEADER_BYTES, "frame_bytes %zu", m->frame_bytes);
  FUZZ_CHECK(m->frame_bytes <= em_buf_size(m->buf), "frame %zu > buffer %zu", m->frame_bytes,
             em_buf_size(m->buf));
  FUZZ_CHECK(((uintptr_t)base % EM_BLOB_ALIGN) == 0, "frame memory not 64-byte aligned");
  FUZZ_CHECK(m->body == base + EM_FRAME_HEADER_BYTES, "body not right after the header");
  uint64_t end = EM__ALIGN_UP((uint64_t)EM_FRAME_HEADER_BYTES + m->body_len, 8) + 8ull * m->nblobs;
  FUZZ_CHECK(end <= m->frame_bytes, "body + blob table (%llu) beyond the frame (%zu)", (unsigned long long)end,
             m->frame_bytes);
  FUZZ_CHECK(m->nblobs <= EM__MAX_BLOBS, "nblobs %u", m->nblobs);
  for (uint32_t i = 0; i < m->nblobs; i++) {
    const uint8_t *p = m->blobs[i].data;
    FUZZ_CHECK(p >= base + end && ((uintptr_t)(p - base) % EM_BLOB_ALIGN) == 0, "blob %u misplaced", i);
    FUZZ_CHECK((uint64_t)(p - base) + m->blobs[i].len_bytes <= m->frame_bytes, "blob %u overruns the frame", i);
    if (i) FUZZ_CHECK(p >= (const uint8_t *)m->blobs[i - 1].data + m->blobs[i - 1].len_bytes, "blobs %u/%u overlap", i - 1, i);
  }
  if (m->nblobs) {
    const em_blob *l = &m->blobs[m->nblobs - 1];
    FUZZ_CHECK((const uint8_t *)l->data + l->len_bytes == base + m->frame_bytes, "frame does not end at the last blob");
  } else {
    FUZZ_CHECK(end == m->frame_bytes, "blob-less frame of %zu bytes, expected %llu", m->frame_bytes,
               (unsigned long long)end);
  }
  /* touch the first and last byte of every blob (ASan: inside the allocation) */
  volatile uint8_t sink = 0;
  for (uint32_t i = 0; i < m->nblobs; i++)
    if (m->blobs[i].len_bytes)
      sink ^= ((const uint8_t *)m->blobs[i].data)[0] ^ ((const uint8_t *)m->blobs[i].data)[m->blobs[i].len_bytes - 1];
  (void)sink;
}

/* ----------------------------------------------------------------- arrays */

/* Checks an array em_obj_array accepted against the ext bytes it came from
 * and the reference reading of its dtype. */
static void fuzz_check_array(const em_msg *m, const msgpack_object *o, const em_array *a) {
  const uint8_t *d = (const uint8_t *)o->via.ext.ptr;
  size_t len = o->via.ext.size;
  FUZZ_CHECK(len >= 7, "accepted a %zu-byte array ext", len);
  size_t dl = d[6];
  FUZZ_CHECK(a->ndim == d[5] && a->ndim <= EM_ARRAY_MAX_NDIM, "ndim %u", a->ndim);
  FUZZ_CHECK(dl <= EM_DTYPE_MAX && len == 7 + dl + 8ull * a->ndim, "ext length %zu for dl %zu ndim %u", len, dl,
             a->ndim);
  FUZZ_CHECK(memcmp(a->dtype, d + 7, dl) == 0 && a->dtype[dl] == 0, "dtype differs from the ext bytes");
  FUZZ_CHECK(a->blob == em__get_u32(d) && a->blob < m->nblobs, "blob %u of %u", a->blob, m->nblobs);
  FUZZ_CHECK(a->data == m->blobs[a->blob].data && a->len_bytes == m->blobs[a->blob].len_bytes,
             "array does not view its blob");
  FUZZ_CHECK(!a->is_scalar || a->ndim == 0, "scalar with ndim %u", a->ndim);
  unsigned __int128 total = a->itemsize;
  for (uint32_t i = 0; i < a->ndim; i++) {
    FUZZ_CHECK(a->shape[i] == em__get_u64(d + 7 + dl + 8 * i), "shape[%u] differs from the ext bytes", i);
    if (total > ((unsigned __int128)1 << 64)) total = ((unsigned __int128)1 << 64) + 1; /* saturate */
    total *= a->shape[i];
    if (total > ((unsigned __int128)1 << 64)) total = ((unsigned __int128)1 << 64) + 1;
  }
  FUZZ_CHECK(total == a->len_bytes, "itemsize %u x shape = %llu%s != blob length %zu", a->itemsize,
             (unsigned long long)total, total > UINT64_MAX ? " (overflowed)" : "", a->len_bytes);
  uint64_t ref_itemsize = 0;
  int ref_ok = fuzz_ref_dtype(d + 7, dl, &ref_itemsize);
  char shown[4 * EM_DTYPE_MAX + 1], *q = shown; /* the dtype bytes, escaped */
  *q = 0;
  for (size_t i = 0; i < dl; i++)
    q += d[7 + i] >= 0x20 && d[7 + i] < 0x7f ? sprintf(q, "%c", d[7 + i]) : sprintf(q, "\\x%02x", d[7 + i]);
  FUZZ_CHECK(ref_ok, "accepted dtype \"%s\" (%zu bytes) is not [<>|=][biufcmMSUV]<digits>([unit])", shown, dl);
  FUZZ_CHECK(ref_itemsize == a->itemsize, "dtype \"%s\": em_array.itemsize %u, the string says %llu", shown,
             a->itemsize, (unsigned long long)ref_itemsize);
}

typedef struct fuzz_walk {
  const em_msg *m;
  size_t narrays;
  uint64_t array_bytes; /* sum over array exts (a blob may be named twice) */
} fuzz_walk;

static void fuzz_walk_obj(fuzz_walk *w, const msgpack_object *o, int depth) {
  FUZZ_CHECK(depth <= FUZZ_MAX_WALK_DEPTH, "object tree deeper than the body check allows");
  em_array a;
  int rc = em_obj_array(w->m, o, &a);
  if (o->type == MSGPACK_OBJECT_EXT && o->via.ext.type == EM_EXT_ARRAY) {
    FUZZ_CHECK(rc == EM_OK, "em_obj_array = %d on an array ext of a body em__body_check accepted", rc);
    fuzz_check_array(w->m, o, &a);
    w->narrays++;
    w->array_bytes += a.len_bytes;
    return;
  }
  FUZZ_CHECK(rc == EM_EINVAL, "em_obj_array = %d on a non-array object (type %d)", rc, (int)o->type);
  if (o->type == MSGPACK_OBJECT_ARRAY) {
    for (uint32_t i = 0; i < o->via.array.size; i++) fuzz_walk_obj(w, &o->via.array.ptr[i], depth + 1);
  } else if (o->type == MSGPACK_OBJECT_MAP) {
    FUZZ_CHECK(em_obj_get(o, "\x01no such key\x02") == NULL, "em_obj_get found a key that is not there");
    for (uint32_t i = 0; i < o->via.map.size; i++) {
      const msgpack_object_kv *kv = &o->via.map.ptr[i];
      /* msgpack-c gives an empty str a NULL ptr: "" is looked up too */
      size_t ks = kv->key.type == MSGPACK_OBJECT_STR ? kv->key.via.str.size : 64;
      if (ks < 64 && (!ks || !memchr(kv->key.via.str.ptr, 0, ks))) {
        char key[64];
        if (ks) memcpy(key, kv->key.via.str.ptr, ks);
        key[ks] = 0;
        /* the first entry with that key (duplicate keys are legal msgpack) */
        uint32_t first = 0;
        while (first < i && !(o->via.map.ptr[first].key.type == MSGPACK_OBJECT_STR &&
                              o->via.map.ptr[first].key.via.str.size == ks &&
                              (!ks || memcmp(o->via.map.ptr[first].key.via.str.ptr, key, ks) == 0)))
          first++;
        const msgpack_object *v = em_obj_get(o, key);
        FUZZ_CHECK(v == &o->via.map.ptr[first].val, "em_obj_get(\"%s\") is not entry %u's value", key, first);
      }
      fuzz_walk_obj(w, &kv->key, depth + 1);
      fuzz_walk_obj(w, &kv->val, depth + 1);
    }
  }
}

/* ------------------------------------------------------------- round trip */

static int fuzz_repack(const em_msg *m, em_payload *p, const msgpack_object *o) {
  switch (o->type) {
    case MSGPACK_OBJECT_ARRAY:
      if (msgpack_pack_array(&p->pk, o->via.array.size)) return EM_ENOMEM;
      for (uint32_t i = 0; i < o->via.array.size; i++) {
        int rc = fuzz_repack(m, p, &o->via.array.ptr[i]);
        if (rc) return rc;
      }
      return EM_OK;
    case MSGPACK_OBJECT_MAP:
      if (msgpack_pack_map(&p->pk, o->via.map.size)) return EM_ENOMEM;
      for (uint32_t i = 0; i < o->via.map.size; i++) {
        int rc = fuzz_repack(m, p, &o->via.map.ptr[i].key);
        if (!rc) rc = fuzz_repack(m, p, &o->via.map.ptr[i].val);
        if (rc) return rc;
      }
      return EM_OK;
    case MSGPACK_OBJECT_EXT:
      if (o->via.ext.type == EM_EXT_ARRAY) {
        em_array a;
        FUZZ_CHECK(em_obj_array(m, o, &a) == EM_OK, "array ext stopped parsing");
        return em_payload_pack_array(p, a.dtype, a.ndim, a.shape, a.data, a.len_bytes, a.is_scalar);
      }
      /* fall through */
    default:
      return msgpack_pack_object(&p->pk, *o) ? EM_ENOMEM : EM_OK;
  }
}

static int fuzz_same_f64(double a, double b) {
  if (isnan(a) && isnan(b)) return 1;
  return memcmp(&a, &b, sizeof a) == 0;
}

static int fuzz_same_obj(const em_msg *ma, const msgpack_object *a, const em_msg *mb, const msgpack_object *b) {
  if (a->type != b->type) return 0;
  switch (a->type) {
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: return fuzz_same_f64(a->via.f64, b->via.f64);
    case MSGPACK_OBJECT_ARRAY:
      if (a->via.array.size != b->via.array.size) return 0;
      for (uint32_t i = 0; i < a->via.array.size; i++)
        if (!fuzz_same_obj(ma, &a->via.array.ptr[i], mb, &b->via.array.ptr[i])) return 0;
      return 1;
    case MSGPACK_OBJECT_MAP:
      if (a->via.map.size != b->via.map.size) return 0;
      for (uint32_t i = 0; i < a->via.map.size; i++)
        if (!fuzz_same_obj(ma, &a->via.map.ptr[i].key, mb, &b->via.map.ptr[i].key) ||
            !fuzz_same_obj(ma, &a->via.map.ptr[i].val, mb, &b->via.map.ptr[i].val))
          return 0;
      return 1;
    case MSGPACK_OBJECT_EXT:
      if (a->via.ext.type != b->via.ext.type) return 0;
      if (a->via.ext.type == EM_EXT_ARRAY) {
        em_array x, y;
        if (em_obj_array(ma, a, &x) || em_obj_array(mb, b, &y)) return 0;
        if (strcmp(x.dtype, y.dtype) || x.ndim != y.ndim || x.itemsize != y.itemsize ||
            x.is_scalar != y.is_scalar || x.len_bytes != y.len_bytes ||
            memcmp(x.shape, y.shape, x.ndim * sizeof x.shape[0]))
          return 0;
        return x.len_bytes == 0 || memcmp(x.data, y.data, x.len_bytes) == 0;
      }
      /* fall through */
    default: return msgpack_object_equal(*a, *b);
  }
}

/* Pack `root` again, frame it, read it back, compare. */
static void fuzz_roundtrip(const em_msg *m, const msgpack_object *root) {
  em_payload p;
  FUZZ_CHECK(em_payload_init(&p) == EM_OK, "em_payload_init");
  int rc = fuzz_repack(m, &p, root);
  FUZZ_CHECK(rc == EM_OK, "re-packing an accepted body failed: %d", rc);
  struct iovec *iov = malloc(em__payload_iov_cap(&p) * sizeof *iov);
  FUZZ_CHECK(iov != NULL, "malloc");
  uint64_t flen = 0;
  int n = em__payload_frame(&p, m->type, m->flags, m->req_id, m->ts_ns, iov, &flen);
  FUZZ_CHECK(n > 0 && (size_t)n <= em__payload_iov_cap(&p), "em__payload_frame = %d", n);
  uint8_t *frame = malloc(flen), *d = frame;
  FUZZ_CHECK(frame != NULL, "malloc %llu", (unsigned long long)flen);
  for (int i = 0; i < n; i++) {
    memcpy(d, iov[i].iov_base, iov[i].iov_len);
    d += iov[i].iov_len;
  }
  FUZZ_CHECK((uint64_t)(d - frame) == flen, "iovecs add up to %zu, frame_len %llu", (size_t)(d - frame),
             (unsigned long long)flen);
  em_pool *pool = em__pool_new(0);
  em__reader r;
  FUZZ_CHECK(pool && em__reader_init(&r, pool, 64u << 20) == EM_OK, "reader init");
  size_t off = 0;
  em_msg *m2 = NULL;
  const char *why = "";
  while (!m2) {
    uint8_t *dst;
    size_t room;
    em__reader_region(&r, &dst, &room);
    FUZZ_CHECK(off < flen, "the re-packed frame ran out before the reader had a message");
    room = EM__MIN(room, (size_t)(flen - off));
    memcpy(dst, frame + off, room);
    em__reader_commit(&r, room);
    off += room;
    rc = em__reader_next(&r, &m2, &why);
    FUZZ_CHECK(rc >= 0, "the re-packed frame is rejected: %d %s", rc, why);
  }
  FUZZ_CHECK(off == flen && !em__reader_mid_frame(&r), "reader took %zu of %llu bytes", off, (unsigned long long)flen);
  FUZZ_CHECK(m2->type == m->type && m2->flags == m->flags && m2->req_id == m->req_id &&
                 memcmp(m2->ts_ns, m->ts_ns, sizeof m->ts_ns) == 0,
             "header fields changed in the round trip");
  fuzz_check_msg_layout(m2);
  msgpack_zone z;
  msgpack_zone_init(&z, 1024);
  msgpack_object o2;
  rc = em_msg_unpack(m2, &z, &o2);
  FUZZ_CHECK(rc == EM_OK, "the re-packed body does not unpack: %d", rc);
  FUZZ_CHECK(fuzz_same_obj(m, root, m2, &o2), "the round trip changed the value");
  msgpack_zone_destroy(&z);
  em_msg_free(m2);
  em__reader_destroy(&r);
  em__pool_release(pool);
  free(frame);
  free(iov);
  em_payload_destroy(&p);
}

/* ------------------------------------------------------------- one message */

static void fuzz_msg(const em_msg *m) {
  fuzz_check_msg_layout(m);
  const char *why = NULL;
  int check = em__body_check(m, &why);
  FUZZ_CHECK(check == EM_OK || (check == EM_EDECODE && why != NULL), "em__body_check = %d", check);
  msgpack_zone z;
  msgpack_zone_init(&z, 1024);
  msgpack_object o;
  int rc = em_msg_unpack(m, &z, &o);
  FUZZ_CHECK(rc == check, "em_msg_unpack = %d but em__body_check = %d (%s)", rc, check, why ? why : "");
  if (rc == EM_OK) {
    fuzz_walk w = {m, 0, 0};
    fuzz_walk_obj(&w, &o, 0);
    if (w.narrays < EM__MAX_BLOBS && w.array_bytes <= FUZZ_ROUNDTRIP_BLOB_BYTES)
      fuzz_roundtrip(m, &o);
  }
  msgpack_zone_destroy(&z);
}

#endif
