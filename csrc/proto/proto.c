/* proto.c: helpers shared by the roles (see em_proto.h). */
#include "em_proto.h"

#include "../wire/em_wire.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

/* ---------------------------------------------------------------- strings */

static char *em__strndup(const char *s, size_t len) {
  char *d = malloc(len + 1);
  if (!d) return NULL;
  memcpy(d, s, len);
  d[len] = 0;
  return d;
}

void em__strlist_free(em__strlist *l) {
  for (size_t i = 0; i < l->n; i++) free(l->v[i]);
  free(l->v);
  l->v = NULL;
  l->n = 0;
}

int em__strlist_push(em__strlist *l, const char *s, size_t len) {
  char **v = realloc(l->v, (l->n + 1) * sizeof *v);
  if (!v) return EM_ENOMEM;
  l->v = v;
  if (!(v[l->n] = em__strndup(s, len))) return EM_ENOMEM;
  l->n++;
  return EM_OK;
}

long em__strlist_find(const em__strlist *l, const char *s, size_t len) {
  for (size_t i = 0; i < l->n; i++)
    if (strlen(l->v[i]) == len && memcmp(l->v[i], s, len) == 0) return (long)i;
  return -1;
}

int em__strlist_init(em__strlist *l, const char *const *keys, size_t n, const char **why) {
  l->v = NULL;
  l->n = 0;
  if (n && !keys) {
    if (why) *why = "a key list is NULL but its count is not 0";
    return EM_EINVAL;
  }
  for (size_t i = 0; i < n; i++) {
    if (!keys[i]) {
      if (why) *why = "a key is NULL";
      em__strlist_free(l);
      return EM_EINVAL;
    }
    if (em__strlist_find(l, keys[i], strlen(keys[i])) >= 0) {
      if (why) *why = "a key list has duplicates";
      em__strlist_free(l);
      return EM_EINVAL;
    }
    if (em__strlist_push(l, keys[i], strlen(keys[i]))) {
      if (why) *why = "out of memory";
      em__strlist_free(l);
      return EM_ENOMEM;
    }
  }
  return EM_OK;
}

static int em__cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int em__strlist_sorted(em__strlist *out, const em__strlist *in) {
  int rc = em__strlist_init(out, (const char *const *)in->v, in->n, NULL);
  if (rc) return rc;
  if (out->n > 1) qsort(out->v, out->n, sizeof *out->v, em__cmp_str);
  return EM_OK;
}

/* ------------------------------------------------------------------ text */

void em__text_init(em__text *t) {
  t->s = NULL;
  t->len = t->cap = 0;
  t->oom = 0;
}

void em__text_free(em__text *t) {
  free(t->s);
  em__text_init(t);
}

static int em__text_room(em__text *t, size_t more) {
  if (t->oom) return 0;
  if (t->len + more + 1 <= t->cap) return 1;
  size_t cap = t->cap ? t->cap : 64;
  while (cap < t->len + more + 1) cap *= 2;
  char *s = realloc(t->s, cap);
  if (!s) {
    t->oom = 1;
    return 0;
  }
  t->s = s;
  t->cap = cap;
  return 1;
}

void em__text_add(em__text *t, const char *s, size_t len) {
  if (!em__text_room(t, len)) return;
  memcpy(t->s + t->len, s, len);
  t->len += len;
  t->s[t->len] = 0;
}

void em__text_cstr(em__text *t, const char *s) { em__text_add(t, s, strlen(s)); }

void em__text_printf(em__text *t, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  if (n < 0 || !em__text_room(t, (size_t)n)) return;
  va_start(ap, fmt);
  vsnprintf(t->s + t->len, (size_t)n + 1, fmt, ap);
  va_end(ap);
  t->len += (size_t)n;
}

void em__text_repr_str(em__text *t, const char *s, size_t len) {
  int sq = memchr(s, '\'', len) != NULL, dq = memchr(s, '"', len) != NULL;
  char q = sq && !dq ? '"' : '\'';
  em__text_add(t, &q, 1);
  for (size_t i = 0; i < len; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == (unsigned char)q || c == '\\') {
      char e[2] = {'\\', (char)c};
      em__text_add(t, e, 2);
    } else if (c == '\n') em__text_cstr(t, "\\n");
    else if (c == '\r') em__text_cstr(t, "\\r");
    else if (c == '\t') em__text_cstr(t, "\\t");
    else if (c < 0x20 || c == 0x7f) em__text_printf(t, "\\x%02x", c);
    else em__text_add(t, (const char *)&c, 1);
  }
  em__text_add(t, &q, 1);
}

void em__text_repr_strlist(em__text *t, const em__strlist *l) {
  em__text_cstr(t, "[");
  for (size_t i = 0; i < l->n; i++) {
    if (i) em__text_cstr(t, ", ");
    em__text_repr_str(t, l->v[i], strlen(l->v[i]));
  }
  em__text_cstr(t, "]");
}

void em__text_keys(em__text *t, const em__strlist *sorted_keys) {
  if (!sorted_keys->n) {
    em__text_cstr(t, "none");
    return;
  }
  for (size_t i = 0; i < sorted_keys->n; i++) {
    if (i) em__text_cstr(t, ", ");
    em__text_repr_str(t, sorted_keys->v[i], strlen(sorted_keys->v[i]));
  }
}

/* Python's repr of a float: the shortest text that reads back the same. */
static void em__text_float(em__text *t, double f) {
  if (isnan(f)) {
    em__text_cstr(t, "nan");
    return;
  }
  if (isinf(f)) {
    em__text_cstr(t, f > 0 ? "inf" : "-inf");
    return;
  }
  char b[40];
  for (int prec = 1; prec <= 17; prec++) {
    snprintf(b, sizeof b, "%.*g", prec, f);
    if (strtod(b, NULL) == f) break;
  }
  em__text_cstr(t, b);
  if (!strpbrk(b, ".en")) em__text_cstr(t, ".0");
}

static void em__text_value(em__text *t, const em_value *v, int depth) {
  if (depth > 8) {
    em__text_cstr(t, "...");
    return;
  }
  switch (v->type) {
    case EM_T_NIL: em__text_cstr(t, "None"); return;
    case EM_T_BOOL: em__text_cstr(t, v->as.b ? "True" : "False"); return;
    case EM_T_INT: em__text_printf(t, "%lld", (long long)v->as.i); return;
    case EM_T_UINT: em__text_printf(t, "%llu", (unsigned long long)v->as.u); return;
    case EM_T_FLOAT: em__text_float(t, v->as.f); return;
    case EM_T_STR: em__text_repr_str(t, v->as.str, v->len); return;
    case EM_T_BIN:
      em__text_cstr(t, "b");
      em__text_repr_str(t, (const char *)v->as.bin, v->len);
      return;
    case EM_T_NDARRAY: {
      em_array a;
      if (em_value_ndarray(v, &a)) {
        em__text_cstr(t, "array(?)");
        return;
      }
      em__text_printf(t, "array(dtype='%s', shape=(", a.dtype);
      for (uint32_t i = 0; i < a.ndim; i++) em__text_printf(t, "%s%llu", i ? ", " : "", (unsigned long long)a.shape[i]);
      em__text_cstr(t, a.ndim == 1 ? ",))" : "))");
      return;
    }
    case EM_T_EXT: em__text_printf(t, "ExtType(%d, ...)", v->ext_type); return;
    case EM_T_LIST:
    case EM_T_TUPLE:
    case EM_T_SET:
    case EM_T_MAP: {
      const char *open = v->type == EM_T_LIST ? "[" : v->type == EM_T_TUPLE ? "(" : "{";
      const char *close = v->type == EM_T_LIST ? "]" : v->type == EM_T_TUPLE ? ")" : "}";
      if (v->type == EM_T_SET && v->len == 0) {
        em__text_cstr(t, "set()");
        return;
      }
      em__text_cstr(t, open);
      em_iter it;
      em_iter_init(&it, v);
      em_value e;
      for (uint32_t i = 0; i < v->len; i++) {
        if (i) em__text_cstr(t, ", ");
        if (!em_iter_next(&it, &e)) break;
        em__text_value(t, &e, depth + 1);
        if (v->type == EM_T_MAP) {
          em__text_cstr(t, ": ");
          if (!em_iter_next(&it, &e)) break;
          em__text_value(t, &e, depth + 1);
        }
      }
      if (v->type == EM_T_TUPLE && v->len == 1) em__text_cstr(t, ",");
      em__text_cstr(t, close);
      return;
    }
  }
  em__text_cstr(t, "?");
}

void em__text_repr_value(em__text *t, const em_value *v) { em__text_value(t, v, 0); }

/* ----------------------------------------------------- payload rendering */

int em__payload_body(em_payload *p, uint8_t **out, size_t *len) {
  *out = NULL;
  *len = 0;
  if (em__payload_ready(p) || p->roots != 1 || p->nblobs) return EM_EENCODE;
  uint8_t *frame;
  size_t flen;
  int rc = em_frame_encode(p, EM_MSG_REPLY, 0, &frame, &flen);
  if (rc) return rc;
  uint32_t body_len = em__get_u32(frame + 16);
  uint8_t *b = malloc(body_len ? body_len : 1);
  if (!b) {
    free(frame);
    return EM_ENOMEM;
  }
  memcpy(b, frame + EM_FRAME_HEADER_BYTES, body_len);
  free(frame);
  *out = b;
  *len = body_len;
  return EM_OK;
}

int em__error_reply(em_payload *reply, const char *type, uint32_t extra, const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  em_payload_begin_error(reply, type, msg, "", extra);
  return EM_MSG_ERROR;
}

int em__finish_reply(em_payload *reply, int rc, const char *what) {
  if (rc != EM_MSG_REPLY && rc != EM_MSG_ERROR) {
    if (rc < 0)
      return em__error_reply(reply, "RuntimeError", 0,
                             "the %s failed: it returned %d (%s: %s), not EM_MSG_REPLY or EM_MSG_ERROR", what, rc,
                             em_errname(rc), em_strerror(rc));
    return em__error_reply(reply, "RuntimeError", 0, "the %s failed: it returned %d, not EM_MSG_REPLY or EM_MSG_ERROR",
                           what, rc);
  }
  if (!reply->err && reply->roots == 0 && reply->depth == 0 && reply->sbuf.size == EM_FRAME_HEADER_BYTES) {
    if (rc == EM_MSG_ERROR)
      return em__error_reply(reply, "RuntimeError", 0, "the %s failed (it returned EM_MSG_ERROR without an error body)", what);
    em_put_nil(reply); /* nothing written: None, as a Python callback returning nothing */
    return EM_MSG_REPLY;
  }
  int ready = em__payload_ready(reply);
  if (ready || reply->roots != 1) {
    int err = reply->err;
    if (err)
      return em__error_reply(reply, "edgeml.EncodeError", 0, "the %s's reply cannot be sent: %s (%s)", what,
                             em_errname(err), em_strerror(err));
    return em__error_reply(reply, "edgeml.EncodeError", 0,
                           "the %s's reply is incomplete (a container holds fewer values than declared)",
                           what);
  }
  return rc;
}

typedef struct em__keep {
  void (*fn)(void *ctx);
  void *ctx;
  em_buf *buf;
} em__keep;

static void em__keep_release(void *ud) {
  em__keep *k = ud;
  if (k->fn) k->fn(k->ctx);
  em_buf_release(k->buf);
  free(k);
}

static void em__buf_release_hook(void *ud) { em_buf_release(ud); }

void em__reply_keep(em_payload *reply, const em_msg *req) {
  if (!reply->nblobs || !req->buf) return;
  if (!reply->release) {
    em_payload_on_release(reply, em__buf_release_hook, em_buf_retain(req->buf));
    return;
  }
  em__keep *k = malloc(sizeof *k);
  if (!k) return; /* the callback's own hook still runs; its arrays are its business */
  k->fn = reply->release;
  k->ctx = reply->release_ctx;
  k->buf = em_buf_retain(req->buf);
  em_payload_on_release(reply, em__keep_release, k);
}

/* --------------------------------------------------------- compat & hello */

int em__put_compat(em_payload *p, const em__compat_field *f, size_t n) {
  em_put_map(p, (uint32_t)n);
  for (size_t i = 0; i < n; i++) {
    em_put_cstr(p, f[i].name);
    if (f[i].kind == EM__CF_STR && f[i].str) em_put_cstr(p, f[i].str);
    else if (f[i].kind == EM__CF_STRLIST && f[i].list) {
      em_put_list(p, (uint32_t)f[i].list->n);
      for (size_t k = 0; k < f[i].list->n; k++) em_put_cstr(p, f[i].list->v[k]);
    } else em_put_nil(p);
  }
  return em_payload_error(p);
}

static const em__compat_field *em__field(const em__compat_field *f, size_t n, const char *name) {
  for (size_t i = 0; i < n; i++)
    if (strcmp(f[i].name, name) == 0) return &f[i];
  return NULL;
}

/* Python's ==, for a field of mine against the server's value (or none). */
static int em__field_equal(const em__compat_field *f, const em_value *v) {
  int mine_nil = !f || f->kind == EM__CF_NIL || (f->kind == EM__CF_STR && !f->str) ||
                 (f->kind == EM__CF_STRLIST && !f->list);
  if (!v || v->type == EM_T_NIL) return mine_nil;
  if (mine_nil) return 0;
  if (f->kind == EM__CF_STR) return v->type == EM_T_STR && strlen(f->str) == v->len && !memcmp(f->str, v->as.str, v->len);
  if (v->type != EM_T_LIST || v->len != f->list->n) return 0;
  em_iter it;
  em_iter_init(&it, v);
  em_value e;
  for (size_t i = 0; i < f->list->n; i++) {
    if (!em_iter_next(&it, &e) || e.type != EM_T_STR) return 0;
    if (strlen(f->list->v[i]) != e.len || memcmp(f->list->v[i], e.as.str, e.len)) return 0;
  }
  return 1;
}

static void em__field_repr(em__text *t, const em__compat_field *f) {
  if (!f || f->kind == EM__CF_NIL || (f->kind == EM__CF_STR && !f->str) || (f->kind == EM__CF_STRLIST && !f->list))
    em__text_cstr(t, "None");
  else if (f->kind == EM__CF_STR) em__text_repr_str(t, f->str, strlen(f->str));
  else em__text_repr_strlist(t, f->list);
}

int em__compat_diff(const em__compat_field *mine, size_t n, const em_value *theirs, em__text *diff) {
  em__strlist names = {NULL, 0};
  int rc = EM_OK;
  for (size_t i = 0; i < n && !rc; i++) rc = em__strlist_push(&names, mine[i].name, strlen(mine[i].name));
  int is_map = theirs && theirs->type == EM_T_MAP;
  if (is_map && !rc) {
    em_iter it;
    em_iter_init(&it, theirs);
    em_value k, v;
    while (!rc && em_iter_next(&it, &k) && em_iter_next(&it, &v))
      if (k.type == EM_T_STR && em__strlist_find(&names, k.as.str, k.len) < 0)
        rc = em__strlist_push(&names, k.as.str, k.len);
  }
  if (rc) {
    em__strlist_free(&names);
    return EM_ENOMEM;
  }
  if (names.n > 1) qsort(names.v, names.n, sizeof *names.v, em__cmp_str);
  int ndiff = 0;
  for (size_t i = 0; i < names.n; i++) {
    const em__compat_field *f = em__field(mine, n, names.v[i]);
    em_value v;
    int have = is_map && em_value_get(theirs, names.v[i], &v) == 1;
    if (em__field_equal(f, have ? &v : NULL)) continue;
    if (ndiff++) em__text_cstr(diff, "; ");
    em__text_printf(diff, "%s: client ", names.v[i]);
    em__field_repr(diff, f);
    em__text_cstr(diff, ", server ");
    if (have) em__text_repr_value(diff, &v);
    else em__text_cstr(diff, "None");
  }
  em__strlist_free(&names);
  return diff->oom ? EM_ENOMEM : ndiff;
}

void em__hello_free(em__hello *h) {
  em_msg_free(h->msg);
  memset(h, 0, sizeof *h);
  h->info.type = EM_T_NIL;
}

int em__hello_read(em_client *c, em__hello *h) {
  memset(h, 0, sizeof *h);
  h->hello.type = h->info.type = EM_T_NIL;
  size_t len = 0;
  const uint8_t *body = em_client_server_hello(c, &len);
  if (!body || !len) return EM_OK;
  size_t flen = EM__ALIGN_UP(EM_FRAME_HEADER_BYTES + len, 8);
  uint8_t *f = calloc(1, flen);
  if (!f) return EM_ENOMEM;
  em__hdr hdr;
  memset(&hdr, 0, sizeof hdr);
  hdr.version = EM_PROTOCOL_VERSION;
  hdr.type = EM_MSG_REPLY;
  hdr.body_len = (uint32_t)len;
  hdr.frame_len = flen;
  em__hdr_write(f, &hdr);
  memcpy(f + EM_FRAME_HEADER_BYTES, body, len);
  int rc = em_frame_decode(f, flen, 0, &h->msg, NULL);
  free(f);
  if (rc) return rc == EM_ENOMEM ? rc : EM_EDECODE;
  if (em_msg_value(h->msg, &h->hello)) {
    em__hello_free(h);
    return EM_EDECODE;
  }
  if (h->hello.type == EM_T_MAP && em_value_get(&h->hello, "info", &h->info) != 1) h->info.type = EM_T_NIL;
  return EM_OK;
}

int em__info_port(const em_value *info, const char *key, uint16_t *port) {
  em_value v;
  int64_t n;
  if (!info || info->type != EM_T_MAP || em_value_get(info, key, &v) != 1) return 0;
  if (em_value_int(&v, &n) || n < 1 || n > 65535) return 0;
  *port = (uint16_t)n;
  return 1;
}

/* ------------------------------------------------ role server threads */

static void *em__bcast_main(void *ud) {
  em_server_run(((em__duo *)ud)->bcast);
  return NULL;
}

static int em__duo_body(em__duo *d) {
  if (d->bcast) {
    if (pthread_create(&d->bcast_thread, NULL, em__bcast_main, d)) {
      d->main_rc = EM_ENOMEM;
      atomic_store(&d->state, 2);
      return EM_ENOMEM;
    }
    d->bcast_started = 1;
  }
  int rc = em_server_run(d->main);
  if (d->bcast) {
    em_server_stop(d->bcast);
    pthread_join(d->bcast_thread, NULL);
    d->bcast_started = 0;
  }
  d->main_rc = rc;
  atomic_store(&d->state, 2);
  return rc;
}

int em__duo_run(em__duo *d) {
  int expect = 0;
  if (!atomic_compare_exchange_strong(&d->state, &expect, 1)) return EM_EINVAL;
  return em__duo_body(d);
}

static void *em__duo_thread(void *ud) {
  em__duo_body(ud);
  return NULL;
}

int em__duo_start(em__duo *d) {
  int expect = 0;
  if (!atomic_compare_exchange_strong(&d->state, &expect, 1)) return EM_EINVAL;
  if (pthread_create(&d->main_thread, NULL, em__duo_thread, d)) {
    atomic_store(&d->state, 0);
    return EM_ENOMEM;
  }
  d->main_started = 1;
  return EM_OK;
}

void em__duo_stop(em__duo *d) {
  if (d->main) em_server_stop(d->main);
  if (d->bcast) em_server_stop(d->bcast);
}

int em__duo_wait(em__duo *d, uint64_t timeout_ns) {
  int rc = em_server_wait(d->main, timeout_ns);
  if (rc) return rc;
  /* run has returned; the broadcast thread is joined right after it */
  uint64_t deadline = em__deadline(timeout_ns);
  while (atomic_load(&d->state) == 1) {
    if (em_mono_ns() >= deadline) return EM_ETIMEDOUT;
    struct timespec ts = {0, 200000};
    nanosleep(&ts, NULL);
  }
  return EM_OK;
}

void em__duo_close(em__duo *d) {
  em__duo_stop(d);
  if (d->main_started) {
    pthread_join(d->main_thread, NULL);
    d->main_started = 0;
  }
  if (d->main) em_server_close(d->main);
  if (d->bcast) em_server_close(d->bcast);
  d->main = d->bcast = NULL;
}

/* ------------------------------------------------------------------ calls */

int em__put_payload(em_payload *dst, em_payload *value) {
  if (dst->err) return dst->err;
  if (dst->nblobs && value->nblobs) return EM_EINVAL;
  if (em__payload_ready(value) || value->roots != 1) return EM_EENCODE;
  if (dst->depth == 0 && dst->roots) return EM_EENCODE;
  /* the same bytes; its arrays keep their blob indices (dst has none) */
  size_t body = value->sbuf.size - EM_FRAME_HEADER_BYTES;
  if (msgpack_sbuffer_write(&dst->sbuf, value->sbuf.data + EM_FRAME_HEADER_BYTES, body)) {
    dst->err = EM_ENOMEM;
    return EM_ENOMEM;
  }
  if (value->nblobs) {
    em_blob *b = malloc(value->nblobs * sizeof *b);
    if (!b) {
      dst->err = EM_ENOMEM;
      return EM_ENOMEM;
    }
    memcpy(b, value->blobs, value->nblobs * sizeof *b);
    free(dst->blobs);
    dst->blobs = b;
    dst->nblobs = dst->blobs_cap = value->nblobs;
  }
  /* account for the one value written, as em_put_* does */
  if (dst->depth == 0) dst->roots++;
  else if (--dst->need[dst->depth] == 0)
    while (dst->depth > 0 && dst->need[dst->depth] == 0) dst->depth--;
  return EM_OK;
}

int em__request_wrap(em_payload *req, const char *method, em_payload *value) {
  int rc = em_payload_begin_request(req, method, strlen(method));
  if (rc) return rc;
  return value ? em__put_payload(req, value) : em_put_nil(req);
}

int em__call(em_client *c, const char *method, em_payload *value, uint64_t timeout_ns, em_msg **reply) {
  *reply = NULL;
  em_payload req;
  if (em_payload_init(&req)) return EM_ENOMEM;
  int rc = em__request_wrap(&req, method, value);
  if (!rc) rc = em_client_request(c, EM_MSG_REQUEST, &req, timeout_ns, reply);
  em_payload_destroy(&req);
  return rc;
}
