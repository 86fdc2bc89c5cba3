/* payload.c: building message bodies (msgpack + out-of-band arrays) and
 * checking/unpacking received ones. */
#include "em_wire.h"

#include <stdlib.h>

static const uint8_t em__zeros[EM_BLOB_ALIGN];

int em_payload_init(em_payload *p) {
  memset(p, 0, sizeof *p);
  msgpack_sbuffer_init(&p->sbuf);
  p->sbuf.data = malloc(4096);
  if (!p->sbuf.data) return EM_ENOMEM;
  p->sbuf.alloc = 4096;
  memset(p->sbuf.data, 0, EM_FRAME_HEADER_BYTES);
  p->sbuf.size = EM_FRAME_HEADER_BYTES;
  msgpack_packer_init(&p->pk, &p->sbuf, msgpack_sbuffer_write);
  return EM_OK;
}

static void em__payload_release(em_payload *p) {
  if (p->release) {
    void (*fn)(void *) = p->release;
    p->release = NULL;
    fn(p->release_ctx);
  }
}

void em_payload_reset(em_payload *p) {
  em__payload_release(p);
  p->sbuf.size = EM_FRAME_HEADER_BYTES;
  if (p->sbuf.alloc > (256u << 10)) { /* do not keep a large in-band body's buffer */
    char *d = realloc(p->sbuf.data, 4096);
    if (d) {
      p->sbuf.data = d;
      p->sbuf.alloc = 4096;
    }
  }
  p->nblobs = 0;
  p->err = 0;
  p->depth = 0;
  p->roots = 0;
}

void em_payload_destroy(em_payload *p) {
  em__payload_release(p);
  msgpack_sbuffer_destroy(&p->sbuf);
  free(p->blobs);
  bool heap = p->heap;
  memset(p, 0, sizeof *p);
  p->heap = heap;
}


/* Parse a numpy dtype.str: byte order (one of "<>|="), kind (one of
 * "biufcmMSUV"), decimal item size (at most 2^24; 0 only for the flexible
 * kinds S, U, V), and for m/M an optional unit in brackets. *itemsize gets
 * the size in bytes (U counts 4 per character). -1 when it is not a dtype
 * edgeml carries. No NUL may appear inside (d is n bytes). */
static int em__dtype_parse(const char *d, size_t n, uint32_t *itemsize) {
  if (n < 3 || n > EM_DTYPE_MAX || memchr(d, 0, n)) return -1;
  if (!strchr("<>|=", d[0])) return -1;
  char kind = d[1];
  if (!strchr("biufcmMSUV", kind)) return -1;
  uint64_t size = 0;
  size_t i = 2;
  for (; i < n && d[i] >= '0' && d[i] <= '9'; i++) {
    size = size * 10 + (uint64_t)(d[i] - '0');
    if (size > (1u << 24)) return -1;
  }
  if (i == 2) return -1;
  if (i < n) { /* datetime unit: [..] only for m/M */
    if ((kind != 'm' && kind != 'M') || d[i] != '[' || d[n - 1] != ']' || n - i < 3) return -1;
    for (size_t j = i + 1; j < n - 1; j++)
      if (!((d[j] >= 'a' && d[j] <= 'z') || (d[j] >= 'A' && d[j] <= 'Z') || (d[j] >= '0' && d[j] <= '9'))) return -1;
  }
  if (kind == 'U') size *= 4;
  if (size == 0 && kind != 'S' && kind != 'U' && kind != 'V') return -1;
  *itemsize = (uint32_t)size;
  return 0;
}

/* Array ext layout (little-endian):
 *   u32 blob index | u8 flags (bit 0: scalar) | u8 ndim | u8 dtype_len |
 *   dtype chars | ndim x u64 shape */
int em_payload_pack_array(em_payload *p, const char *dtype, uint32_t ndim, const uint64_t *shape,
                          const void *data, size_t len_bytes, int is_scalar) {
  size_t dl = strlen(dtype);
  uint32_t itemsize = 0;
  if (em__dtype_parse(dtype, dl, &itemsize)) return EM_EINVAL;
  if (ndim > EM_ARRAY_MAX_NDIM) return EM_EINVAL;
  uint64_t count = 1;
  for (uint32_t i = 0; i < ndim; i++) {
    if (shape[i] && count > UINT64_MAX / shape[i]) return EM_EINVAL;
    count *= shape[i];
  }
  if (itemsize && count > UINT64_MAX / itemsize) return EM_EINVAL;
  if (count * itemsize != len_bytes) return EM_EINVAL;
  if (p->nblobs >= EM__MAX_BLOBS) return EM_EINVAL;
  if (p->nblobs == p->blobs_cap) {
    uint32_t cap = p->blobs_cap ? p->blobs_cap * 2 : 8;
    em_blob *nb = realloc(p->blobs, cap * sizeof *nb);
    if (!nb) return EM_ENOMEM;
    p->blobs = nb;
    p->blobs_cap = cap;
  }
  uint8_t ext[7 + EM_DTYPE_MAX + 8 * EM_ARRAY_MAX_NDIM];
  em__put_u32(ext, p->nblobs);
  ext[4] = is_scalar ? 1 : 0;
  ext[5] = (uint8_t)ndim;
  ext[6] = (uint8_t)dl;
  memcpy(ext + 7, dtype, dl);
  for (uint32_t i = 0; i < ndim; i++) em__put_u64(ext + 7 + dl + 8 * i, shape[i]);
  if (msgpack_pack_ext_with_body(&p->pk, ext, 7 + dl + 8 * ndim, EM_EXT_ARRAY)) return EM_ENOMEM;
  p->blobs[p->nblobs].data = data;
  p->blobs[p->nblobs].len_bytes = len_bytes;
  p->nblobs++;
  return EM_OK;
}

size_t em__payload_iov_cap(const em_payload *p) { return 1 + 2 * (size_t)p->nblobs; }

int em__payload_frame(em_payload *p, uint8_t type, uint16_t flags, uint64_t req_id,
                      const uint64_t ts_ns[4], struct iovec *iov, uint64_t *frame_len) {
  int ready = em__payload_ready(p);
  if (ready) return ready;
  em__hdr h;
  memset(&h, 0, sizeof h);
  size_t body_len = p->sbuf.size - EM_FRAME_HEADER_BYTES;
  if (body_len > UINT32_MAX) return EM_ETOOBIG;
  h.type = type;
  h.flags = flags;
  h.req_id = req_id;
  h.body_len = (uint32_t)body_len;
  h.nblobs = p->nblobs;
  if (ts_ns) memcpy(h.ts_ns, ts_ns, sizeof h.ts_ns);
  /* pad body to 8, then the blob table, then pad to the first blob */
  uint64_t off = p->sbuf.size;
  uint64_t pad = EM__ALIGN_UP(off, 8) - off;
  if (pad && msgpack_sbuffer_write(&p->sbuf, (const char *)em__zeros, pad)) return EM_ENOMEM;
  for (uint32_t i = 0; i < p->nblobs; i++) {
    uint8_t le[8];
    em__put_u64(le, p->blobs[i].len_bytes);
    if (msgpack_sbuffer_write(&p->sbuf, (const char *)le, 8)) return EM_ENOMEM;
  }
  off = p->sbuf.size;
  int n = 0;
  if (p->nblobs) {
    pad = EM__ALIGN_UP(off, EM_BLOB_ALIGN) - off;
    if (pad && msgpack_sbuffer_write(&p->sbuf, (const char *)em__zeros, pad)) return EM_ENOMEM;
    off = p->sbuf.size;
  }
  iov[n].iov_base = p->sbuf.data;
  iov[n++].iov_len = p->sbuf.size;
  for (uint32_t i = 0; i < p->nblobs; i++) {
    if (i) {
      pad = EM__ALIGN_UP(off, EM_BLOB_ALIGN) - off;
      if (pad) {
        iov[n].iov_base = (void *)em__zeros;
        iov[n++].iov_len = pad;
        off += pad;
      }
    }
    if (p->blobs[i].len_bytes) {
      iov[n].iov_base = (void *)p->blobs[i].data;
      iov[n++].iov_len = p->blobs[i].len_bytes;
    }
    off += p->blobs[i].len_bytes;
  }
  h.frame_len = off;
  em__hdr_write((uint8_t *)p->sbuf.data, &h);
  *frame_len = off;
  return n;
}

void em__payload_set_ts(em_payload *p, int i, uint64_t ts_ns) {
  em__put_u64((uint8_t *)p->sbuf.data + 32 + 8 * i, ts_ns);
}

/* ------------------------------------------------------- receiving side */

int em__array_parse(const em_msg *m, const uint8_t *d, size_t len, em_array *a, const char **why) {
  if (len < 7) goto bad;
  a->blob = em__get_u32(d);
  a->is_scalar = d[4] & 1;
  a->ndim = d[5];
  size_t dl = d[6];
  if (a->ndim > EM_ARRAY_MAX_NDIM || dl > EM_DTYPE_MAX || len != 7 + dl + 8ull * a->ndim) goto bad;
  memcpy(a->dtype, d + 7, dl);
  a->dtype[dl] = 0;
  if (em__dtype_parse(a->dtype, dl, &a->itemsize)) {
    *why = "array with an unsupported dtype";
    return EM_EDECODE;
  }
  uint64_t count = 1, nonzero = 1; /* nonzero: the product of the non-zero dimensions */
  bool overflow = false;
  for (uint32_t i = 0; i < a->ndim; i++) {
    a->shape[i] = em__get_u64(d + 7 + dl + 8 * i);
    uint64_t s = a->shape[i];
    if (s > (uint64_t)INT64_MAX || (s && nonzero > (uint64_t)INT64_MAX / s)) {
      *why = "array shape out of range (a dimension or their product exceeds 2^63 - 1)";
      return EM_EDECODE;
    }
    if (s) nonzero *= s;
    if (s && count > UINT64_MAX / s) overflow = true;
    else count *= s;
  }
  if (a->itemsize && nonzero > (uint64_t)INT64_MAX / a->itemsize) {
    *why = "array shape out of range (a dimension or their product exceeds 2^63 - 1)";
    return EM_EDECODE;
  }
  if (a->is_scalar && (a->ndim != 0)) goto bad;
  if (a->blob >= m->nblobs) {
    *why = "array names a blob that does not exist";
    return EM_EDECODE;
  }
  if (overflow || (a->itemsize && count > UINT64_MAX / a->itemsize) ||
      count * a->itemsize != m->blobs[a->blob].len_bytes) {
    *why = "array dtype and shape disagree with its blob size";
    return EM_EDECODE;
  }
  a->data = m->blobs[a->blob].data;
  a->len_bytes = m->blobs[a->blob].len_bytes;
  return EM_OK;
bad:
  *why = "malformed array header";
  return EM_EDECODE;
}

typedef struct em__scan_ctx {
  uint64_t cost, limit;
} em__scan_ctx;

/* One element of msgpack at *pos; recursion bounded by EM__MAX_DEPTH. Every
 * container count must fit in the bytes left (each element takes >= 1),
 * and the running decode cost must stay within the limit. */
static int em__scan(const em_msg *m, const uint8_t *p, size_t n, size_t *pos, int depth, em__scan_ctx *cx,
                    const char **why) {
  if (depth > EM__MAX_DEPTH) {
    *why = "body nested too deeply";
    return EM_EDECODE;
  }
  if (*pos >= n) goto trunc;
  uint8_t t = p[(*pos)++];
  size_t left = n - *pos;
  uint64_t count = 0, len = 0;
  int ext = -1, is_map = 0, is_arr = 0;
  cx->cost += EM__COST_ELEM;
#define NEED(k) do { if (left < (k)) goto trunc; } while (0)
  if (t <= 0x7f || t >= 0xe0 || t == 0xc0 || t == 0xc2 || t == 0xc3) goto small; /* cached objects */
  if ((t & 0xf0) == 0x80) { is_map = 1; count = t & 0x0f; }
  else if ((t & 0xf0) == 0x90) { is_arr = 1; count = t & 0x0f; }
  else if ((t & 0xe0) == 0xa0) { len = t & 0x1f; }
  else switch (t) {
    case 0xc4: case 0xd9: NEED(1); len = p[*pos]; *pos += 1; break;
    case 0xc5: case 0xda: NEED(2); len = ((uint64_t)p[*pos] << 8) | p[*pos + 1]; *pos += 2; break;
    case 0xc6: case 0xdb: NEED(4); len = ((uint64_t)p[*pos] << 24) | ((uint64_t)p[*pos + 1] << 16) | ((uint64_t)p[*pos + 2] << 8) | p[*pos + 3]; *pos += 4; break;
    case 0xc7: NEED(2); len = p[*pos]; ext = (int8_t)p[*pos + 1]; *pos += 2; break;
    case 0xc8: NEED(3); len = ((uint64_t)p[*pos] << 8) | p[*pos + 1]; ext = (int8_t)p[*pos + 2]; *pos += 3; break;
    case 0xc9: NEED(5); len = ((uint64_t)p[*pos] << 24) | ((uint64_t)p[*pos + 1] << 16) | ((uint64_t)p[*pos + 2] << 8) | p[*pos + 3]; ext = (int8_t)p[*pos + 4]; *pos += 5; break;
    case 0xca: len = 4; break;
    case 0xcb: len = 8; break;
    case 0xcc: case 0xd0: len = 1; break;
    case 0xcd: case 0xd1: len = 2; break;
    case 0xce: case 0xd2: len = 4; break;
    case 0xcf: case 0xd3: len = 8; break;
    case 0xd4: NEED(1); ext = (int8_t)p[*pos]; *pos += 1; len = 1; break;
    case 0xd5: NEED(1); ext = (int8_t)p[*pos]; *pos += 1; len = 2; break;
    case 0xd6: NEED(1); ext = (int8_t)p[*pos]; *pos += 1; len = 4; break;
    case 0xd7: NEED(1); ext = (int8_t)p[*pos]; *pos += 1; len = 8; break;
    case 0xd8: NEED(1); ext = (int8_t)p[*pos]; *pos += 1; len = 16; break;
    case 0xdc: NEED(2); is_arr = 1; count = ((uint64_t)p[*pos] << 8) | p[*pos + 1]; *pos += 2; break;
    case 0xdd: NEED(4); is_arr = 1; count = ((uint64_t)p[*pos] << 24) | ((uint64_t)p[*pos + 1] << 16) | ((uint64_t)p[*pos + 2] << 8) | p[*pos + 3]; *pos += 4; break;
    case 0xde: NEED(2); is_map = 1; count = ((uint64_t)p[*pos] << 8) | p[*pos + 1]; *pos += 2; break;
    case 0xdf: NEED(4); is_map = 1; count = ((uint64_t)p[*pos] << 24) | ((uint64_t)p[*pos + 1] << 16) | ((uint64_t)p[*pos + 2] << 8) | p[*pos + 3]; *pos += 4; break;
    default: *why = "invalid msgpack type byte"; return EM_EDECODE;
  }
#undef NEED
  left = n - *pos;
  if ((is_map || is_arr) && depth >= EM__MAX_DEPTH) {
    *why = "body nested too deeply";
    return EM_EDECODE;
  }
  if (is_map || is_arr) {
    uint64_t elems = is_map ? count * 2 : count;
    if (elems > left) goto trunc;
    cx->cost += is_map ? EM__COST_MAP + count * EM__COST_KV : EM__COST_LIST;
    if (cx->cost > cx->limit) goto costly;
    for (uint64_t i = 0; i < elems; i++) {
      int rc = em__scan(m, p, n, pos, depth + 1, cx, why);
      if (rc) return rc;
    }
    return EM_OK;
  }
  if (len > left) goto trunc;
  cx->cost += ext == EM_EXT_ARRAY ? EM__COST_ARRAY
              : (ext >= 0 || t == 0xca || t == 0xcb || (t >= 0xcc && t <= 0xd3)) ? EM__COST_NUM
                                                                                 : EM__COST_STR + len;
  if (ext == EM_EXT_ARRAY) {
    em_array a;
    int rc = em__array_parse(m, p + *pos, (size_t)len, &a, why);
    if (rc) return rc;
  } else if ((ext == EM_EXT_TUPLE_TAG || ext == EM_EXT_SET_TAG) && len != 0 && t != 0xd4) {
    /* tags carry no data (fixext1 with one ignored byte is tolerated) */
    *why = "malformed tuple/set tag";
    return EM_EDECODE;
  }
  *pos += len;
small:
  if (cx->cost > cx->limit) goto costly;
  return EM_OK;
trunc:
  *why = "body truncated or a length in it lies";
  return EM_EDECODE;
costly:
  *why = "body would decode into too many objects (more than " EM__STR(EM__DECODE_RATIO)
         " bytes of objects per body byte; send bulk data as numpy arrays)";
  return EM_EDECODE;
}

int em__body_check(const em_msg *m, const char **why) {
  size_t pos = 0;
  if (m->body_len == 0) {
    *why = "empty body";
    return EM_EDECODE;
  }
  em__scan_ctx cx = {0, EM__MAX((uint64_t)EM__DECODE_FLOOR_BYTES, (uint64_t)EM__DECODE_RATIO * m->body_len)};
  int rc = em__scan(m, m->body, m->body_len, &pos, 0, &cx, why);
  if (rc) return rc;
  if (pos != m->body_len) {
    *why = "trailing bytes after the body";
    return EM_EDECODE;
  }
  return EM_OK;
}

int em_msg_unpack(const em_msg *m, msgpack_zone *zone, msgpack_object *out) {
  const char *why;
  int rc = em__body_check(m, &why);
  if (rc) return rc;
  size_t off = 0;
  msgpack_unpack_return r = msgpack_unpack((const char *)m->body, m->body_len, &off, zone, out);
  if (r != MSGPACK_UNPACK_SUCCESS || off != m->body_len) return EM_EDECODE;
  return EM_OK;
}

int em_obj_array(const em_msg *m, const msgpack_object *o, em_array *a) {
  if (o->type != MSGPACK_OBJECT_EXT || o->via.ext.type != EM_EXT_ARRAY) return EM_EINVAL;
  const char *why;
  return em__array_parse(m, (const uint8_t *)o->via.ext.ptr, o->via.ext.size, a, &why);
}

const msgpack_object *em_obj_get(const msgpack_object *o, const char *key) {
  if (o->type != MSGPACK_OBJECT_MAP) return NULL;
  size_t kl = strlen(key);
  for (uint32_t i = 0; i < o->via.map.size; i++) {
    const msgpack_object *k = &o->via.map.ptr[i].key;
    if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == kl && (kl == 0 || memcmp(k->via.str.ptr, key, kl) == 0))
      return &o->via.map.ptr[i].val;
  }
  return NULL;
}
