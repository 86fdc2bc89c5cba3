/* value.c: the public value API (edgeml.h "values" and "outgoing
 * payloads"): a msgpack tokenizer shared by the one-pass reader and the
 * random-access values, the tracked em_put_* writers, and whole frames in
 * memory. The checks and decode-cost charges are those of em__body_check
 * (payload.c), so the reader accepts exactly the bodies the check accepts. */
#include "em_wire.h"

#include <stdio.h>
#include <stdlib.h>

static const char em__why_trunc[] = "body truncated or a length in it lies";
static const char em__why_costly[] = "body would decode into too many objects (more than " EM__STR(EM__DECODE_RATIO)
                                     " bytes of objects per body byte; send bulk data as numpy arrays)";

static inline uint64_t em__be(const uint8_t *p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; i++) v = (v << 8) | p[i];
  return v;
}

const char *em_type_name(int type) {
  static const char *const names[] = {"?",   "nil", "bool", "int", "uint", "float",   "str",
                                      "bin", "list", "tuple", "set", "map", "ndarray", "ext"};
  return type >= EM_T_NIL && type <= EM_T_EXT ? names[type] : "?";
}

/* The tuple/set tag a list's first element may be (docs/protocol.md: an
 * ext8 of length 0, or a fixext1 whose byte is ignored): EM_EXT_TUPLE_TAG,
 * EM_EXT_SET_TAG, or 0. No recursion (a list of lists is not looked into).
 * Other ext forms of type 2/3 are refused when read (em__tok). */
static int em__peek_tag(const uint8_t *p, const uint8_t *end, size_t *len) {
  size_t n = (size_t)(end - p);
  int t = -1;
  if (n >= 3 && p[0] == 0xc7 && p[1] == 0) t = (int8_t)p[2], *len = 3;
  else if (n >= 3 && p[0] == 0xd4) t = (int8_t)p[1], *len = 3;
  else if (n >= 4 && p[0] == 0xc8 && !p[1] && !p[2]) t = (int8_t)p[3], *len = 4;
  else if (n >= 6 && p[0] == 0xc9 && !p[1] && !p[2] && !p[3] && !p[4]) t = (int8_t)p[5], *len = 6;
  return t == EM_EXT_TUPLE_TAG || t == EM_EXT_SET_TAG ? t : 0;
}

/* One token at *pp (not past end): fills v's type, len, as and ext_type;
 * *elems gets the number of values that follow as its elements (2 per map
 * pair; a tuple/set tag already consumed), *cost the decode-cost charge.
 * Advances *pp past the token's own bytes (a container's header, a str's
 * bytes). EM_OK or EM_EDECODE with *why. */
static int em__tok(const em_msg *m, const uint8_t **pp, const uint8_t *end, em_value *v, uint64_t *elems,
                   uint64_t *cost, const char **why, em_array *arr) {
  const uint8_t *p = *pp;
  if (p >= end) {
    *why = em__why_trunc;
    return EM_EDECODE;
  }
  uint8_t t = *p++;
  size_t left = (size_t)(end - p);
  uint64_t count = 0, len = 0;
  int ext = -1000, is_map = 0, is_list = 0, is_str = 0;
  *elems = 0;
  *cost = EM__COST_ELEM;
  v->ext_type = 0;
  v->len = 0;
  v->_msg = m;
#define NEED(k)                 \
  do {                          \
    if (left < (k)) goto trunc; \
  } while (0)
  if (t <= 0x7f) {
    v->type = EM_T_INT;
    v->as.i = t;
  } else if (t >= 0xe0) {
    v->type = EM_T_INT;
    v->as.i = (int8_t)t;
  } else if ((t & 0xf0) == 0x80) {
    is_map = 1;
    count = t & 0x0f;
  } else if ((t & 0xf0) == 0x90) {
    is_list = 1;
    count = t & 0x0f;
  } else if ((t & 0xe0) == 0xa0) {
    is_str = 1;
    len = t & 0x1f;
  } else {
    switch (t) {
      case 0xc0: v->type = EM_T_NIL; break;
      case 0xc2:
      case 0xc3:
        v->type = EM_T_BOOL;
        v->as.b = t == 0xc3;
        break;
      case 0xc4: case 0xc5: case 0xc6: {
        int n = 1 << (t - 0xc4);
        NEED((size_t)n);
        len = em__be(p, n);
        p += n;
        is_str = 2;
        break;
      }
      case 0xd9: case 0xda: case 0xdb: {
        int n = 1 << (t - 0xd9);
        NEED((size_t)n);
        len = em__be(p, n);
        p += n;
        is_str = 1;
        break;
      }
      case 0xc7: case 0xc8: case 0xc9: {
        int n = 1 << (t - 0xc7);
        NEED((size_t)n + 1);
        len = em__be(p, n);
        ext = (int8_t)p[n];
        p += n + 1;
        break;
      }
      case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8:
        NEED(1);
        ext = (int8_t)p[0];
        p += 1;
        len = 1u << (t - 0xd4);
        break;
      case 0xca: {
        NEED(4);
        uint32_t b = (uint32_t)em__be(p, 4);
        float f;
        memcpy(&f, &b, 4);
        p += 4;
        v->type = EM_T_FLOAT;
        v->as.f = f;
        *cost += EM__COST_NUM;
        break;
      }
      case 0xcb: {
        NEED(8);
        uint64_t b = em__be(p, 8);
        double d;
        memcpy(&d, &b, 8);
        p += 8;
        v->type = EM_T_FLOAT;
        v->as.f = d;
        *cost += EM__COST_NUM;
        break;
      }
      case 0xcc: case 0xcd: case 0xce: case 0xcf: {
        int n = 1 << (t - 0xcc);
        NEED((size_t)n);
        uint64_t u = em__be(p, n);
        p += n;
        if (u > (uint64_t)INT64_MAX) {
          v->type = EM_T_UINT;
          v->as.u = u;
        } else {
          v->type = EM_T_INT;
          v->as.i = (int64_t)u;
        }
        *cost += EM__COST_NUM;
        break;
      }
      case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
        int n = 1 << (t - 0xd0);
        NEED((size_t)n);
        uint64_t u = em__be(p, n);
        p += n;
        v->type = EM_T_INT;
        v->as.i = n == 1 ? (int8_t)u : n == 2 ? (int16_t)u : n == 4 ? (int32_t)u : (int64_t)u;
        *cost += EM__COST_NUM;
        break;
      }
      case 0xdc: case 0xdd: {
        int n = t == 0xdc ? 2 : 4;
        NEED((size_t)n);
        count = em__be(p, n);
        p += n;
        is_list = 1;
        break;
      }
      case 0xde: case 0xdf: {
        int n = t == 0xde ? 2 : 4;
        NEED((size_t)n);
        count = em__be(p, n);
        p += n;
        is_map = 1;
        break;
      }
      default: *why = "invalid msgpack type byte"; return EM_EDECODE;
    }
  }
  left = (size_t)(end - p);
  if (is_map || is_list) {
    uint64_t n = is_map ? count * 2 : count;
    if (n > left) goto trunc;
    *cost += is_map ? EM__COST_MAP + count * EM__COST_KV : EM__COST_LIST;
    v->type = is_map ? EM_T_MAP : EM_T_LIST;
    v->len = (uint32_t)count;
    if (is_list && count) { /* a tuple or set: its first element is a tag */
      size_t tag_len = 0;
      int tag = em__peek_tag(p, end, &tag_len);
      if (tag) {
        v->type = tag == EM_EXT_TUPLE_TAG ? EM_T_TUPLE : EM_T_SET;
        v->len = (uint32_t)(count - 1);
        *cost += EM__COST_ELEM + EM__COST_NUM; /* the tag element, as em__body_check charges it */
        p += tag_len;
        n--;
      } /* else: a malformed first element fails when it is read */
    }
    v->_p = p;
    v->_end = end;
    *elems = n;
    *pp = p;
    return EM_OK;
  }
  if (is_str || ext != -1000) {
    if (len > left) goto trunc;
    if (is_str) {
      v->type = is_str == 1 ? EM_T_STR : EM_T_BIN;
      v->as.bin = p;
      *cost += EM__COST_STR + len;
    } else {
      v->ext_type = (int8_t)ext;
      v->as.bin = p;
      if (ext == EM_EXT_ARRAY) {
        em_array local;
        int rc = em__array_parse(m, p, (size_t)len, arr ? arr : &local, why);
        if (rc) return rc;
        v->type = EM_T_NDARRAY;
        *cost += EM__COST_ARRAY;
      } else {
        if ((ext == EM_EXT_TUPLE_TAG || ext == EM_EXT_SET_TAG) && len != 0 && t != 0xd4) {
          *why = "malformed tuple/set tag";
          return EM_EDECODE;
        }
        v->type = EM_T_EXT;
        *cost += ext >= 0 ? EM__COST_NUM : EM__COST_STR + len;
      }
    }
    v->len = (uint32_t)len;
    p += len;
  }
#undef NEED
  *pp = p;
  return EM_OK;
trunc:
  *why = em__why_trunc;
  return EM_EDECODE;
}

/* Past one whole value at p (its elements included); NULL if malformed. */
static const uint8_t *em__skip(const em_msg *m, const uint8_t *p, const uint8_t *end) {
  uint64_t pending = 1;
  const char *why;
  while (pending) {
    em_value v;
    uint64_t elems, cost;
    if (em__tok(m, &p, end, &v, &elems, &cost, &why, NULL)) return NULL;
    pending = pending - 1 + elems;
  }
  return p;
}

/* ------------------------------------------------------------ reader */

void em_reader_init(em_reader *r, const em_msg *m) {
  memset(r, 0, sizeof *r);
  r->_msg = m;
  r->_p = m->body;
  r->_end = m->body + m->body_len;
  r->_limit = em__decode_limit(m->body_len);
  r->_left[0] = 1;
  if (m->body_len == 0) r->_why = "empty body";
}

int em_read(em_reader *r, em_value *out) { return em_read_array(r, out, NULL); }

int em_read_array(em_reader *r, em_value *out, em_array *arr) {
  if (r->_why) return EM_EDECODE;
  while (r->_depth > 0 && r->_left[r->_depth] == 0) r->_depth--;
  if (r->_left[r->_depth] == 0) {
    r->_why = "no value left to read";
    return EM_EDECODE;
  }
  r->_left[r->_depth]--;
  uint64_t elems, cost;
  const char *why = NULL;
  if (em__tok(r->_msg, &r->_p, r->_end, out, &elems, &cost, &why, arr)) {
    r->_why = why ? why : em__why_trunc;
    return EM_EDECODE;
  }
  r->_cost += cost;
  if (r->_cost > r->_limit) {
    r->_why = em__why_costly;
    return EM_EDECODE;
  }
  if (out->type >= EM_T_LIST && out->type <= EM_T_MAP) {
    /* elements of a container at depth d are at d + 1 (as em__body_check) */
    if (r->_depth >= EM_READER_DEPTH) {
      r->_why = "body nested too deeply";
      return EM_EDECODE;
    }
    r->_left[++r->_depth] = elems;
  }
  return EM_OK;
}

int em_read_skip(em_reader *r) {
  em_value v;
  if (em_read(r, &v)) return EM_EDECODE;
  if (!(v.type >= EM_T_LIST && v.type <= EM_T_MAP)) return EM_OK;
  int d = r->_depth; /* the container's level: read until it and all below are done */
  for (;;) {
    bool pending = false;
    for (int k = d; k <= r->_depth && !pending; k++) pending = r->_left[k] > 0;
    if (!pending) return EM_OK;
    if (em_read(r, &v)) return EM_EDECODE;
  }
}

int em_reader_finish(em_reader *r) {
  if (r->_why) return EM_EDECODE;
  while (r->_depth > 0 && r->_left[r->_depth] == 0) r->_depth--;
  if (r->_depth > 0 || r->_left[0] != 0) {
    r->_why = "not all of the body was read";
    return EM_EDECODE;
  }
  if (r->_p != r->_end) {
    r->_why = "trailing bytes after the body";
    return EM_EDECODE;
  }
  return EM_OK;
}

const char *em_reader_why(const em_reader *r) { return r->_why; }

/* ------------------------------------------------------------ values */

int em_msg_value(const em_msg *m, em_value *out) {
  const char *why;
  if (em__body_check(m, &why) != EM_OK) return EM_EDECODE;
  const uint8_t *p = m->body;
  uint64_t elems, cost;
  return em__tok(m, &p, m->body + m->body_len, out, &elems, &cost, &why, NULL);
}

void em_iter_init(em_iter *it, const em_value *c) {
  it->_msg = c->_msg;
  if (c->type >= EM_T_LIST && c->type <= EM_T_MAP) {
    it->_p = c->_p;
    it->_end = c->_end;
    it->_left = c->type == EM_T_MAP ? 2ull * c->len : c->len;
  } else {
    it->_p = it->_end = NULL;
    it->_left = 0;
  }
}

int em_iter_next(em_iter *it, em_value *out) {
  if (!it->_left) return 0;
  const uint8_t *p = it->_p;
  uint64_t elems, cost;
  const char *why;
  if (em__tok(it->_msg, &p, it->_end, out, &elems, &cost, &why, NULL)) goto bad;
  /* the next element starts past this one's elements */
  const uint8_t *next = p;
  for (uint64_t i = 0; i < elems && next; i++) next = em__skip(it->_msg, next, it->_end);
  if (!next) goto bad;
  it->_p = next;
  it->_left--;
  return 1;
bad:
  it->_left = 0;
  return 0;
}

int em_value_get(const em_value *map, const char *key, em_value *out) {
  if (map->type != EM_T_MAP) return EM_EINVAL;
  em_iter it;
  em_iter_init(&it, map);
  em_value k, v;
  while (em_iter_next(&it, &k) && em_iter_next(&it, &v)) {
    if (em_value_is(&k, key)) {
      *out = v;
      return 1;
    }
  }
  return 0;
}

int em_value_at(const em_value *seq, uint32_t i, em_value *out) {
  if (!(seq->type >= EM_T_LIST && seq->type <= EM_T_SET) || i >= seq->len) return EM_EINVAL;
  em_iter it;
  em_iter_init(&it, seq);
  for (uint32_t j = 0; j <= i; j++)
    if (!em_iter_next(&it, out)) return EM_EINVAL;
  return EM_OK;
}

int em_value_ndarray(const em_value *v, em_array *out) {
  if (v->type != EM_T_NDARRAY) return EM_EINVAL;
  const char *why;
  return em__array_parse(v->_msg, v->as.bin, v->len, out, &why);
}

int em_value_int(const em_value *v, int64_t *out) {
  if (v->type == EM_T_INT) {
    *out = v->as.i;
    return EM_OK;
  }
  return EM_EINVAL;
}

int em_value_uint(const em_value *v, uint64_t *out) {
  if (v->type == EM_T_UINT || (v->type == EM_T_INT && v->as.i >= 0)) {
    *out = v->type == EM_T_UINT ? v->as.u : (uint64_t)v->as.i;
    return EM_OK;
  }
  return EM_EINVAL;
}

int em_value_double(const em_value *v, double *out) {
  switch (v->type) {
    case EM_T_FLOAT: *out = v->as.f; return EM_OK;
    case EM_T_INT: *out = (double)v->as.i; return EM_OK;
    case EM_T_UINT: *out = (double)v->as.u; return EM_OK;
    default: return EM_EINVAL;
  }
}

int em_value_bool(const em_value *v, int *out) {
  if (v->type != EM_T_BOOL) return EM_EINVAL;
  *out = v->as.b;
  return EM_OK;
}

int em_value_is(const em_value *v, const char *s) {
  size_t n = strlen(s);
  return v->type == EM_T_STR && v->len == n && (n == 0 || memcmp(v->as.str, s, n) == 0);
}

int em_value_cstr(const em_value *v, char *buf, size_t cap) {
  if (v->type != EM_T_STR || memchr(v->as.str, 0, v->len)) return EM_EINVAL;
  if (cap == 0) return EM_ETOOBIG;
  size_t n = v->len < cap - 1 ? v->len : cap - 1;
  memcpy(buf, v->as.str, n);
  buf[n] = 0;
  return n == v->len ? EM_OK : EM_ETOOBIG;
}

int em_msg_request(const em_msg *m, em_value *method, em_value *payload) {
  em_value root;
  if (em_msg_value(m, &root) || root.type != EM_T_LIST || root.len != 2) return EM_EDECODE;
  if (em_value_at(&root, 0, method) || method->type != EM_T_STR) return EM_EDECODE;
  return em_value_at(&root, 1, payload) ? EM_EDECODE : EM_OK;
}

int em_msg_error(const em_msg *m, char *buf, size_t cap) {
  em_value root, t, msg;
  char ts[256] = "", ms[768] = "";
  if (em_msg_value(m, &root) || root.type != EM_T_MAP || em_value_get(&root, "type", &t) != 1 ||
      em_value_get(&root, "message", &msg) != 1 || t.type != EM_T_STR || msg.type != EM_T_STR) {
    if (cap) snprintf(buf, cap, "an error reply that is not an error map");
    return EM_EDECODE;
  }
  em_value_cstr(&t, ts, sizeof ts);
  em_value_cstr(&msg, ms, sizeof ms);
  if (cap) snprintf(buf, cap, "%s: %s", ts, ms);
  return EM_OK;
}

/* ------------------------------------------------------------ writer */

em_payload *em_payload_new(void) {
  em_payload *p = malloc(sizeof *p);
  if (!p) return NULL;
  if (em_payload_init(p)) {
    free(p);
    return NULL;
  }
  p->heap = true;
  return p;
}

void em_payload_free(em_payload *p) {
  if (!p) return;
  em_payload_destroy(p);
  free(p);
}

int em_payload_error(const em_payload *p) { return p->err; }

void em_payload_on_release(em_payload *p, void (*fn)(void *ctx), void *ctx) {
  p->release = fn;
  p->release_ctx = ctx;
}

int em__payload_ready(const em_payload *p) {
  if (p->err) return EM_EENCODE;
  if ((p->roots || p->depth) && (p->depth != 0 || p->roots != 1)) return EM_EENCODE;
  return EM_OK;
}

static int em__w_fail(em_payload *p, int code) {
  if (!p->err) p->err = code;
  return code;
}

/* Levels whose values have all been written are closed. */
static inline void em__w_close(em_payload *p) {
  while (p->depth > 0 && p->need[p->depth] == 0) p->depth--;
}

/* Account for one value about to be written: its slot in the open
 * container (or the top level). A scalar is complete at once; a container
 * stays open (em__w_open) until its elements are written, so depth is the
 * nesting depth, as a reader counts it. */
static inline int em__w_slot(em_payload *p) {
  if (p->err) return p->err;
  if (p->depth == 0) {
    if (p->roots++) return em__w_fail(p, EM_EENCODE); /* a second top-level value */
    return EM_OK;
  }
  p->need[p->depth]--;
  return EM_OK;
}

static inline int em__w_item(em_payload *p) {
  int rc = em__w_slot(p);
  if (!rc) em__w_close(p);
  return rc;
}

/* A container's slot: refused where a reader would refuse its nesting. */
static inline int em__w_container(em_payload *p) {
  if (p->err) return p->err;
  if (p->depth >= EM_READER_DEPTH) return em__w_fail(p, EM_EENCODE); /* nested deeper than a reader takes */
  return em__w_slot(p);
}

static inline int em__w_open(em_payload *p, uint64_t n) {
  if (n) p->need[++p->depth] = n;
  else em__w_close(p);
  return EM_OK;
}

#define EM__W(call) ((call) == 0 ? EM_OK : em__w_fail(p, EM_ENOMEM))

int em_put_nil(em_payload *p) { return em__w_item(p) ? p->err : EM__W(msgpack_pack_nil(&p->pk)); }
int em_put_bool(em_payload *p, int v) {
  return em__w_item(p) ? p->err : EM__W(v ? msgpack_pack_true(&p->pk) : msgpack_pack_false(&p->pk));
}
int em_put_int(em_payload *p, int64_t v) { return em__w_item(p) ? p->err : EM__W(msgpack_pack_int64(&p->pk, v)); }
int em_put_uint(em_payload *p, uint64_t v) {
  return em__w_item(p) ? p->err : EM__W(msgpack_pack_uint64(&p->pk, v));
}
int em_put_double(em_payload *p, double v) {
  return em__w_item(p) ? p->err : EM__W(msgpack_pack_double(&p->pk, v));
}
int em_put_str(em_payload *p, const char *s, size_t len) {
  if (em__w_item(p)) return p->err;
  if (len > UINT32_MAX) return em__w_fail(p, EM_ETOOBIG);
  return EM__W(msgpack_pack_str_with_body(&p->pk, s, len));
}
int em_put_cstr(em_payload *p, const char *s) { return em_put_str(p, s, strlen(s)); }
int em_put_bin(em_payload *p, const void *data, size_t len) {
  if (em__w_item(p)) return p->err;
  if (len > UINT32_MAX) return em__w_fail(p, EM_ETOOBIG);
  return EM__W(msgpack_pack_bin_with_body(&p->pk, data, len));
}

static int em__put_seq(em_payload *p, uint32_t n, int tag) {
  if (em__w_container(p)) return p->err;
  if (tag && n == UINT32_MAX) return em__w_fail(p, EM_ETOOBIG);
  if (msgpack_pack_array(&p->pk, (size_t)n + (tag ? 1 : 0))) return em__w_fail(p, EM_ENOMEM);
  if (tag && msgpack_pack_ext(&p->pk, 0, (int8_t)tag)) return em__w_fail(p, EM_ENOMEM);
  return em__w_open(p, n);
}
int em_put_list(em_payload *p, uint32_t n) { return em__put_seq(p, n, 0); }
int em_put_tuple(em_payload *p, uint32_t n) { return em__put_seq(p, n, EM_EXT_TUPLE_TAG); }
int em_put_set(em_payload *p, uint32_t n) { return em__put_seq(p, n, EM_EXT_SET_TAG); }
int em_put_map(em_payload *p, uint32_t n) {
  if (em__w_container(p)) return p->err;
  if (msgpack_pack_map(&p->pk, n)) return em__w_fail(p, EM_ENOMEM);
  return em__w_open(p, 2ull * n);
}

int em_put_ndarray(em_payload *p, const char *dtype, uint32_t ndim, const uint64_t *shape, const void *data,
                   size_t len_bytes) {
  if (em__w_item(p)) return p->err;
  int rc = em_payload_pack_array(p, dtype, ndim, shape, data, len_bytes, 0);
  return rc ? em__w_fail(p, rc) : EM_OK;
}

int em_put_scalar(em_payload *p, const char *dtype, const void *data, size_t len_bytes) {
  if (em__w_item(p)) return p->err;
  int rc = em_payload_pack_array(p, dtype, 0, NULL, data, len_bytes, 1);
  return rc ? em__w_fail(p, rc) : EM_OK;
}

int em_put_value(em_payload *p, const em_value *v) {
  switch (v->type) {
    case EM_T_NIL: return em_put_nil(p);
    case EM_T_BOOL: return em_put_bool(p, v->as.b);
    case EM_T_INT: return em_put_int(p, v->as.i);
    case EM_T_UINT: return em_put_uint(p, v->as.u);
    case EM_T_FLOAT: return em_put_double(p, v->as.f);
    case EM_T_STR: return em_put_str(p, v->as.str, v->len);
    case EM_T_BIN: return em_put_bin(p, v->as.bin, v->len);
    case EM_T_NDARRAY: {
      em_array a;
      if (em_value_ndarray(v, &a)) return em__w_fail(p, EM_EINVAL);
      if (em__w_item(p)) return p->err;
      int rc = em_payload_pack_array(p, a.dtype, a.ndim, a.shape, a.data, a.len_bytes, a.is_scalar);
      return rc ? em__w_fail(p, rc) : EM_OK;
    }
    case EM_T_EXT:
      if (em__w_item(p)) return p->err;
      return EM__W(msgpack_pack_ext_with_body(&p->pk, v->as.bin, v->len, v->ext_type));
    case EM_T_LIST:
    case EM_T_TUPLE:
    case EM_T_SET:
    case EM_T_MAP: {
      int rc = v->type == EM_T_MAP     ? em_put_map(p, v->len)
               : v->type == EM_T_LIST  ? em_put_list(p, v->len)
               : v->type == EM_T_TUPLE ? em_put_tuple(p, v->len)
                                       : em_put_set(p, v->len);
      if (rc) return rc;
      em_iter it;
      em_iter_init(&it, v);
      em_value e;
      uint64_t n = v->type == EM_T_MAP ? 2ull * v->len : v->len;
      for (uint64_t i = 0; i < n; i++) {
        if (!em_iter_next(&it, &e)) return em__w_fail(p, EM_EINVAL);
        if ((rc = em_put_value(p, &e))) return rc;
      }
      return EM_OK;
    }
    default: return em__w_fail(p, EM_EINVAL);
  }
}

int em_payload_begin_request(em_payload *p, const char *method, size_t method_len) {
  int rc = em_put_list(p, 2);
  return rc ? rc : em_put_str(p, method, method_len);
}

int em_payload_begin_error(em_payload *p, const char *type, const char *message, const char *traceback,
                           uint32_t extra) {
  em_payload_reset(p);
  if (extra > UINT32_MAX - 3) return em__w_fail(p, EM_EINVAL);
  em_put_map(p, 3 + extra);
  em_put_cstr(p, "type");
  em_put_cstr(p, type ? type : "RuntimeError");
  em_put_cstr(p, "message");
  em_put_cstr(p, message ? message : "");
  em_put_cstr(p, "traceback");
  return em_put_cstr(p, traceback ? traceback : "");
}

/* ------------------------------------------------------------ frames */

int em_frame_encode(em_payload *p, uint8_t type, uint64_t req_id, uint8_t **out, size_t *len) {
  *out = NULL;
  *len = 0;
  struct iovec *iov = malloc(em__payload_iov_cap(p) * sizeof *iov);
  if (!iov) return EM_ENOMEM;
  uint64_t flen, ts[4] = {0, 0, 0, 0};
  int n = em__payload_frame(p, type, 0, req_id, ts, iov, &flen);
  if (n < 0) {
    free(iov);
    return n;
  }
  uint8_t *d = malloc(flen ? flen : 1);
  if (!d) {
    free(iov);
    return EM_ENOMEM;
  }
  size_t off = 0;
  for (int i = 0; i < n; i++) {
    memcpy(d + off, iov[i].iov_base, iov[i].iov_len);
    off += iov[i].iov_len;
  }
  free(iov);
  *out = d;
  *len = off;
  return EM_OK;
}

int em_frame_decode(const void *data, size_t len, uint64_t max_bytes, em_msg **out, const char **why) {
  const char *w = "truncated frame";
  *out = NULL;
  em_pool *pool = em__pool_new(0);
  em__reader r;
  if (!pool) return EM_ENOMEM;
  if (em__reader_init(&r, pool, max_bytes ? max_bytes : EM__DEFAULT_MAX_MESSAGE)) {
    em__pool_release(pool);
    return EM_ENOMEM;
  }
  size_t off = 0;
  em_msg *msg = NULL;
  int rc = 0;
  while (rc == 0 && off < len) {
    uint8_t *dst;
    size_t n;
    em__reader_region(&r, &dst, &n);
    n = EM__MIN(n, len - off);
    memcpy(dst, (const uint8_t *)data + off, n);
    off += n;
    em__reader_commit(&r, n);
    rc = em__reader_next(&r, &msg, &w);
  }
  if (rc == 1 && msg->frame_bytes != len) {
    static _Thread_local char extra[96]; /* why is static per thread */
    snprintf(extra, sizeof extra, "%zu bytes after the frame (exactly one frame expected)", len - msg->frame_bytes);
    em_msg_free(msg);
    w = extra;
    rc = EM_EPROTO;
  } else if (rc == 1) {
    *out = msg;
    rc = EM_OK;
  } else if (rc == 0 || rc == EM__READER_WAIT) {
    rc = EM_EPROTO;
  }
  if (rc && why) *why = w;
  em__reader_destroy(&r);
  em__pool_release(pool);
  return rc;
}
