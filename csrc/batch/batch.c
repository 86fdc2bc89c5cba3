/* batch.c: dynamic batching for C inference servers (edgeml_batch.h), the
 * semantics of edgeml/batching.py. Built on the public API only: deferred
 * replies (em_pending), values (em_value) and payloads (em_put_*). */
#include "edgeml_batch.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ------------------------------------------------------------ the queue */

typedef struct em__bent { /* one map entry of a request */
  const char *key;
  uint32_t klen;
  int is_arr;
  em_value v;
  em_array a; /* is_arr */
} em__bent;

typedef struct em__bitem {
  struct em__bitem *next;
  em_pending *p;
  em_value payload;
  uint64_t t; /* arrival, monotonic ns */
  uint8_t *sig;
  size_t sig_len;
  uint32_t nent;
  em__bent *ent; /* sorted by key bytes (map), else NULL */
  em_array arr;  /* EM_BATCH_ARRAY */
  int kind;
} em__bitem;

enum { EM__B_RUNNING = 0, EM__B_DRAINING = 1, EM__B_STOPPED = 2 };

struct em_batcher {
  char *name;
  uint32_t max_batch, nworkers;
  uint64_t max_delay_ns;
  em_batch_fn fn;
  void *ud;
  em_batch_alloc_fn alloc;
  em_batch_free_fn free;
  void *alloc_ud;
  em_log_fn log;
  void *log_ud;

  pthread_mutex_t mu; /* guards everything below */
  pthread_cond_t cv;
  int state;
  em__bitem *head, *tail;
  uint64_t count;
  em_batcher_stats st;

  pthread_mutex_t stop_mu; /* one stop at a time */
  pthread_t *threads;
  uint32_t nthreads;
  struct em__bworker *workers;
};

typedef struct em__bslot {
  void *p;
  size_t cap;
} em__bslot;

typedef struct em__bworker {
  em_batcher *b;
  uint32_t index;
  em__bitem **items; /* max_batch */
  em__bslot *slots;  /* stacked buffers kept between batches */
  uint32_t nslots;
  em_array *stacked; /* per map key (or [0] for an array batch) */
  uint32_t nstacked;
  em_payload *out, *reply;
} em__bworker;

struct em_batch {
  em__bworker *w;
  uint32_t n;
  int kind;
  em__bitem **items;
};

static uint64_t em__mono(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void em__blog(em_batcher *b, int level, const char *fmt, ...) {
  if (!b->log) return;
  char msg[256];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  b->log(b->log_ud, level, msg);
}

static void em__item_free(em__bitem *it) {
  if (!it) return;
  free(it->sig);
  free(it->ent);
  free(it);
}

/* Python's type name of a value, for messages */
static const char *em__pytype(const em_value *v) {
  switch (v->type) {
    case EM_T_NIL: return "NoneType";
    case EM_T_BOOL: return "bool";
    case EM_T_INT:
    case EM_T_UINT: return "int";
    case EM_T_FLOAT: return "float";
    case EM_T_STR: return "str";
    case EM_T_BIN: return "bytes";
    case EM_T_LIST: return "list";
    case EM_T_TUPLE: return "tuple";
    case EM_T_SET: return "set";
    case EM_T_MAP: return "dict";
    case EM_T_NDARRAY: {
      em_array a;
      if (em_value_ndarray(v, &a) != EM_OK || !a.is_scalar) return "ndarray";
      /* numpy's scalar type names, as Python's message says them */
      static const char *const names[][2] = {
          {"f2", "float16"}, {"f4", "float32"},   {"f8", "float64"}, {"i1", "int8"},     {"i2", "int16"},
          {"i4", "int32"},   {"i8", "int64"},     {"u1", "uint8"},   {"u2", "uint16"},   {"u4", "uint32"},
          {"u8", "uint64"},  {"b1", "bool"},      {"c8", "complex64"}, {"c16", "complex128"}};
      const char *d = a.dtype[0] == '<' || a.dtype[0] == '>' || a.dtype[0] == '|' || a.dtype[0] == '=' ? a.dtype + 1
                                                                                                      : a.dtype;
      for (size_t k = 0; k < sizeof names / sizeof names[0]; k++)
        if (strcmp(d, names[k][0]) == 0) return names[k][1];
      return "numpy scalar";
    }
    default: return em_type_name(v->type);
  }
}

static void em__reply_error(em_batcher *b, em_pending *p, const char *type, const char *msg) {
  em_payload *r = em_payload_new();
  if (!r) {
    em_pending_drop(p); /* nothing to answer with: the caller times out */
    return;
  }
  em_payload_begin_error(r, type, msg, "", 0);
  int rc = em_pending_reply(p, EM_MSG_ERROR, r);
  if (rc) em__blog(b, EM_LOG_DEBUG, "batcher %s: error reply not sent: %s", b->name, em_strerror(rc));
  em_payload_free(r);
}

/* ----------------------------------------------------------- signatures */

typedef struct em__sigbuf {
  uint8_t *p;
  size_t len, cap;
  int oom;
} em__sigbuf;

static void em__sig_put(em__sigbuf *s, const void *d, size_t n) {
  if (s->oom) return;
  if (s->len + n > s->cap) {
    size_t cap = s->cap ? s->cap : 64;
    while (cap < s->len + n) cap *= 2;
    uint8_t *q = realloc(s->p, cap);
    if (!q) {
      s->oom = 1;
      return;
    }
    s->p = q;
    s->cap = cap;
  }
  memcpy(s->p + s->len, d, n);
  s->len += n;
}

static void em__sig_array(em__sigbuf *s, const em_array *a) {
  em__sig_put(s, a->dtype, strlen(a->dtype) + 1);
  em__sig_put(s, &a->ndim, sizeof a->ndim);
  em__sig_put(s, a->shape, a->ndim * sizeof a->shape[0]);
}

static int em__ent_cmp(const void *x, const void *y) {
  const em__bent *a = x, *b = y;
  uint32_t n = a->klen < b->klen ? a->klen : b->klen;
  int c = memcmp(a->key, b->key, n);
  if (c) return c;
  return a->klen < b->klen ? -1 : a->klen > b->klen;
}

/* Fill it's form from it->payload: EM_OK, EINVAL (not batchable: why),
 * ENOMEM. */
static int em__classify(em_batcher *b, em__bitem *it, char *why, size_t cap) {
  em__sigbuf s = {0};
  const em_value *v = &it->payload;
  if (b->max_batch == 1) {
    it->kind = EM_BATCH_SINGLE;
    em__sig_put(&s, "S", 1);
  } else if (v->type == EM_T_NDARRAY) {
    if (em_value_ndarray(v, &it->arr) != EM_OK || it->arr.is_scalar) goto refuse;
    it->kind = EM_BATCH_ARRAY;
    em__sig_put(&s, "A", 1);
    em__sig_array(&s, &it->arr);
  } else if (v->type == EM_T_MAP) {
    it->kind = EM_BATCH_MAP;
    it->nent = v->len;
    it->ent = v->len ? calloc(v->len, sizeof *it->ent) : NULL;
    if (v->len && !it->ent) return EM_ENOMEM;
    em_iter iter;
    em_iter_init(&iter, v);
    for (uint32_t j = 0; j < v->len; j++) {
      em_value k;
      em__bent *e = &it->ent[j];
      if (!em_iter_next(&iter, &k) || !em_iter_next(&iter, &e->v)) goto refuse;
      if (k.type != EM_T_STR) {
        snprintf(why, cap, "its dict keys must be str, not %s", em__pytype(&k));
        free(s.p);
        return EM_EINVAL;
      }
      e->key = k.as.str;
      e->klen = k.len;
      if (e->v.type == EM_T_NDARRAY && em_value_ndarray(&e->v, &e->a) == EM_OK && !e->a.is_scalar) e->is_arr = 1;
    }
    qsort(it->ent, it->nent, sizeof *it->ent, em__ent_cmp);
    em__sig_put(&s, "M", 1);
    for (uint32_t j = 0; j < it->nent; j++) {
      em__bent *e = &it->ent[j];
      if (j && em__ent_cmp(&it->ent[j - 1], e) == 0) {
        snprintf(why, cap, "its dict has the key '%.*s' twice", (int)(e->klen > 60 ? 60 : e->klen), e->key);
        free(s.p);
        return EM_EINVAL;
      }
      em__sig_put(&s, &e->klen, sizeof e->klen);
      em__sig_put(&s, e->key, e->klen);
      em__sig_put(&s, e->is_arr ? "a" : "v", 1);
      if (e->is_arr) em__sig_array(&s, &e->a);
    }
  } else {
    goto refuse;
  }
  if (s.oom) {
    free(s.p);
    return EM_ENOMEM;
  }
  it->sig = s.p;
  it->sig_len = s.len;
  return EM_OK;
refuse:
  free(s.p);
  snprintf(why, cap, "its payload must be an array or a dict (of arrays and values), not %s", em__pytype(v));
  return EM_EINVAL;
}

/* -------------------------------------------------------------- options */

void em_batcher_opts_init(em_batcher_opts *o) {
  memset(o, 0, sizeof *o);
  o->max_batch_size = 8;
  o->workers = 1;
}

static void *em__default_alloc(void *ud, size_t bytes) {
  (void)ud;
  return aligned_alloc(64, (bytes + 63) & ~(size_t)63);
}
static void em__default_free(void *ud, void *p) {
  (void)ud;
  free(p);
}

static void *em__worker_main(void *arg);

int em_batcher_new(em_batcher **out, const em_batcher_opts *o) {
  if (out) *out = NULL;
  if (!out || !o || !o->fn || !o->max_batch_size || !o->workers || (!o->alloc) != (!o->free)) return EM_EINVAL;
  em_batcher *b = calloc(1, sizeof *b);
  if (!b) return EM_ENOMEM;
  const char *name = o->name ? o->name : "batched";
  b->name = strdup(name);
  b->max_batch = o->max_batch_size;
  b->nworkers = o->workers;
  b->max_delay_ns = o->max_delay_ns;
  b->fn = o->fn;
  b->ud = o->ud;
  b->alloc = o->alloc ? o->alloc : em__default_alloc;
  b->free = o->free ? o->free : em__default_free;
  b->alloc_ud = o->alloc_ud;
  b->log = o->log;
  b->log_ud = o->log_ud;
  b->threads = calloc(b->nworkers, sizeof *b->threads);
  b->workers = calloc(b->nworkers, sizeof *b->workers);
  if (!b->name || !b->threads || !b->workers) goto oom;
  for (uint32_t i = 0; i < b->nworkers; i++) {
    em__bworker *w = &b->workers[i];
    w->b = b;
    w->index = i;
    w->items = calloc(b->max_batch, sizeof *w->items);
    w->out = em_payload_new();
    w->reply = em_payload_new();
    if (!w->items || !w->out || !w->reply) goto oom;
  }
  pthread_mutex_init(&b->mu, NULL);
  pthread_mutex_init(&b->stop_mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&b->cv, &ca);
  pthread_condattr_destroy(&ca);
  for (uint32_t i = 0; i < b->nworkers; i++) {
    if (pthread_create(&b->threads[i], NULL, em__worker_main, &b->workers[i])) break;
    b->nthreads++;
  }
  if (b->nthreads < b->nworkers) {
    em_batcher_free(b); /* stops (and joins) the threads that did start */
    return EM_ENOMEM;
  }
  *out = b;
  return EM_OK;
oom:
  if (b->workers)
    for (uint32_t i = 0; i < b->nworkers; i++) {
      free(b->workers[i].items);
      em_payload_free(b->workers[i].out);
      em_payload_free(b->workers[i].reply);
    }
  free(b->workers);
  free(b->threads);
  free(b->name);
  free(b);
  return EM_ENOMEM;
}

/* --------------------------------------------------------------- submit */

int em_batcher_submit(em_batcher *b, em_pending *p) {
  if (!p) return EM_EINVAL;
  if (!b) {
    em_pending_drop(p);
    return EM_EINVAL;
  }
  char msg[400], why[200];
  em_value method;
  em__bitem *it = calloc(1, sizeof *it);
  if (!it) {
    em__reply_error(b, p, "MemoryError", "out of memory queueing a request");
    return EM_ENOMEM;
  }
  it->p = p;
  if (em_msg_request(em_pending_request(p), &method, &it->payload) != EM_OK) {
    em__item_free(it);
    em__reply_error(b, p, "edgeml.InvalidArgumentError", "a request's body must be [method: str, payload]");
    pthread_mutex_lock(&b->mu);
    b->st.refused++;
    pthread_mutex_unlock(&b->mu);
    return EM_EDECODE;
  }
  int rc = em__classify(b, it, why, sizeof why);
  if (rc) {
    em__item_free(it);
    if (rc == EM_EINVAL) {
      snprintf(msg, sizeof msg, "interface '%s' is batched (max_batch_size=%u): %s", b->name, b->max_batch, why);
      em__reply_error(b, p, "edgeml.InvalidArgumentError", msg);
    } else {
      em__reply_error(b, p, "MemoryError", "out of memory queueing a request");
    }
    pthread_mutex_lock(&b->mu);
    b->st.refused++;
    pthread_mutex_unlock(&b->mu);
    return rc;
  }
  it->t = em__mono();
  pthread_mutex_lock(&b->mu);
  if (b->state != EM__B_RUNNING) {
    b->st.refused++;
    pthread_mutex_unlock(&b->mu);
    em__item_free(it);
    snprintf(msg, sizeof msg, "the server is stopping; interface '%s' takes no more requests", b->name);
    em__reply_error(b, p, "edgeml.ClosedError", msg);
    return EM_ECLOSED;
  }
  if (b->tail) b->tail->next = it;
  else b->head = it;
  b->tail = it;
  b->count++;
  pthread_cond_signal(&b->cv);
  pthread_mutex_unlock(&b->mu);
  return EM_OK;
}

/* -------------------------------------------------------------- workers */

/* The next batch into w->items (held: b->mu): the oldest request and the
 * queued ones of its form, in order, up to max_batch. */
static uint32_t em__take(em_batcher *b, em__bitem **items) {
  em__bitem *head = b->head;
  b->head = head->next;
  head->next = NULL;
  items[0] = head;
  uint32_t n = 1;
  if (head->kind != EM_BATCH_SINGLE) {
    em__bitem **pp = &b->head;
    while (*pp && n < b->max_batch) {
      em__bitem *x = *pp;
      if (x->sig_len == head->sig_len && memcmp(x->sig, head->sig, x->sig_len) == 0) {
        *pp = x->next;
        x->next = NULL;
        items[n++] = x;
      } else {
        pp = &x->next;
      }
    }
  }
  /* the tail: the last element left */
  b->tail = NULL;
  for (em__bitem *x = b->head; x; x = x->next) b->tail = x;
  b->count -= n;
  return n;
}

/* A stacked buffer of `bytes` for slot j (a worker's, reused). */
static void *em__slot(em__bworker *w, uint32_t j, size_t bytes, size_t hint) {
  em_batcher *b = w->b;
  if (j >= w->nslots) {
    uint32_t ns = j + 1 > 2 * w->nslots ? j + 1 : 2 * w->nslots;
    em__bslot *s = realloc(w->slots, ns * sizeof *s);
    if (!s) return NULL;
    memset(s + w->nslots, 0, (ns - w->nslots) * sizeof *s);
    w->slots = s;
    w->nslots = ns;
  }
  em__bslot *s = &w->slots[j];
  if (s->cap < bytes || !s->p) {
    if (s->p) b->free(b->alloc_ud, s->p);
    size_t cap = hint > bytes ? hint : bytes;
    if (cap < 64) cap = 64;
    cap = (cap + 63) & ~(size_t)63;
    s->p = b->alloc(b->alloc_ud, cap);
    s->cap = s->p ? cap : 0;
  }
  return s->p;
}

/* Stack arrays src[i] (each of one dtype and shape) into slot j as *out. */
static int em__stack(em__bworker *w, uint32_t j, em__bitem **items, uint32_t n, int key, em_array *out) {
  const em_array *a0 = key < 0 ? &items[0]->arr : &items[0]->ent[key].a;
  size_t row = a0->len_bytes;
  if (a0->ndim + 1 > EM_ARRAY_MAX_NDIM) return EM_EINVAL;
  uint8_t *dst = em__slot(w, j, row * n, row * w->b->max_batch);
  if (!dst) return EM_ENOMEM;
  for (uint32_t i = 0; i < n; i++) {
    const em_array *a = key < 0 ? &items[i]->arr : &items[i]->ent[key].a;
    if (row) memcpy(dst + i * row, a->data, row);
  }
  memset(out, 0, sizeof *out);
  memcpy(out->dtype, a0->dtype, sizeof out->dtype);
  out->ndim = a0->ndim + 1;
  out->shape[0] = n;
  memcpy(out->shape + 1, a0->shape, a0->ndim * sizeof a0->shape[0]);
  out->itemsize = a0->itemsize;
  out->data = dst;
  out->len_bytes = row * n;
  return EM_OK;
}

/* How v splits into n: 1 a list/tuple of n, 2 an array with leading n,
 * 0 it does not. */
static int em__rows(const em_value *v, uint32_t n, em_array *a) {
  if ((v->type == EM_T_LIST || v->type == EM_T_TUPLE) && v->len == n) return 1;
  if (v->type == EM_T_NDARRAY && em_value_ndarray(v, a) == EM_OK && !a->is_scalar && a->ndim >= 1 &&
      a->shape[0] == n)
    return 2;
  return 0;
}

/* Caller i's part of v (split when it splits, else the whole value). */
static void em__put_part(em_payload *r, const em_value *v, uint32_t i, uint32_t n) {
  em_array a;
  int k = em__rows(v, n, &a);
  if (k == 1) {
    em_value e;
    em_value_at(v, i, &e);
    em_put_value(r, &e);
  } else if (k == 2) {
    size_t row = a.len_bytes / n;
    const uint8_t *d = (const uint8_t *)a.data + i * row;
    if (a.ndim == 1) em_put_scalar(r, a.dtype, d, row);
    else em_put_ndarray(r, a.dtype, a.ndim - 1, a.shape + 1, d, row);
  } else {
    em_put_value(r, v);
  }
}

static void em__describe(const em_value *v, char *buf, size_t cap) {
  em_array a;
  if (v->type == EM_T_NDARRAY && em_value_ndarray(v, &a) == EM_OK && !a.is_scalar) {
    size_t o = (size_t)snprintf(buf, cap, "ndarray of shape (");
    for (uint32_t d = 0; d < a.ndim && o < cap; d++)
      o += (size_t)snprintf(buf + o, cap - o, "%s%llu", d ? ", " : "", (unsigned long long)a.shape[d]);
    if (o < cap) snprintf(buf + o, cap - o, "%s)", a.ndim == 1 ? "," : "");
  } else {
    snprintf(buf, cap, "%s", em__pytype(v));
  }
}

static void em__send(em__bworker *w, em_pending *p, int type) {
  int rc = em_pending_reply(p, type, w->reply);
  if (rc) em__blog(w->b, EM_LOG_DEBUG, "batcher %s: reply not sent: %s", w->b->name, em_strerror(rc));
  em_payload_reset(w->reply);
}

static void em__run_batch(em__bworker *w, uint32_t n0) {
  em_batcher *b = w->b;
  uint64_t t0 = em__mono(), waited = 0;
  em__bitem **items = w->items;
  uint32_t n = 0, dropped = 0;
  for (uint32_t i = 0; i < n0; i++) { /* callers gone: skip their work */
    if (em_pending_alive(items[i]->p)) {
      waited += t0 - items[i]->t;
      items[n++] = items[i];
    } else {
      em_pending_drop(items[i]->p);
      em__item_free(items[i]);
      dropped++;
    }
  }
  if (!n) {
    pthread_mutex_lock(&b->mu);
    b->st.dropped += dropped;
    pthread_mutex_unlock(&b->mu);
    return;
  }
  int kind = items[0]->kind, failed = 0, rc = EM_OK;
  em_batch batch = {w, n, kind, items};
  const char *etype = NULL;
  char emsg[512];
  /* stack */
  uint32_t nst = kind == EM_BATCH_ARRAY ? 1 : kind == EM_BATCH_MAP ? items[0]->nent : 0;
  if (nst > w->nstacked) {
    em_array *s = realloc(w->stacked, nst * sizeof *s);
    if (!s) rc = EM_ENOMEM;
    else {
      w->stacked = s;
      w->nstacked = nst;
    }
  }
  if (rc == EM_OK && kind == EM_BATCH_ARRAY) rc = em__stack(w, 0, items, n, -1, &w->stacked[0]);
  for (uint32_t j = 0; rc == EM_OK && kind == EM_BATCH_MAP && j < nst; j++)
    if (items[0]->ent[j].is_arr) rc = em__stack(w, j, items, n, (int)j, &w->stacked[j]);
  uint8_t *frame = NULL;
  size_t flen = 0;
  em_msg *res = NULL;
  em_value v;
  if (rc) {
    etype = "MemoryError";
    snprintf(emsg, sizeof emsg, "batched interface '%s': no memory to stack a batch of %u (%s)", b->name, n,
             em_strerror(rc));
  } else {
    em_payload_reset(w->out);
    int frc = b->fn(b->ud, &batch, w->out);
    if (frc != EM_MSG_REPLY && frc != EM_MSG_ERROR) {
      etype = "RuntimeError";
      if (frc < 0)
        snprintf(emsg, sizeof emsg,
                 "the batched interface '%s' failed: it returned %d (%s: %s), not EM_MSG_REPLY or EM_MSG_ERROR",
                 b->name, frc, em_errname(frc), em_strerror(frc));
      else
        snprintf(emsg, sizeof emsg,
                 "the batched interface '%s' failed: it returned %d, not EM_MSG_REPLY or EM_MSG_ERROR", b->name, frc);
    } else {
      int erc = em_frame_encode(w->out, (uint8_t)frc, 0, &frame, &flen);
      if (erc == EM_OK) erc = em_frame_decode(frame, flen, 0, &res, NULL);
      if (erc == EM_OK) erc = em_msg_value(res, &v);
      if (erc) {
        etype = "RuntimeError";
        snprintf(emsg, sizeof emsg,
                 "the batched interface '%s' failed: its result failed to build or is incomplete (%s: %s)", b->name,
                 em_errname(erc), em_strerror(erc));
      } else if (frc == EM_MSG_ERROR) {
        failed = 1;
      } else if (kind != EM_BATCH_SINGLE && v.type != EM_T_MAP) {
        em_array a;
        if (!em__rows(&v, n, &a)) {
          char got[128];
          em__describe(&v, got, sizeof got);
          etype = "ValueError";
          snprintf(emsg, sizeof emsg,
                   "batched interface '%s' returned %s for a batch of %u: return an array whose leading axis is %u, "
                   "a list of %u results, or a dict of those",
                   b->name, got, n, n, n);
        }
      }
    }
    em_payload_reset(w->out); /* fn's release hook: the result is copied */
  }
  free(frame);
  /* answer */
  for (uint32_t i = 0; i < n; i++) {
    em_pending *p = items[i]->p;
    if (etype) {
      em_payload_begin_error(w->reply, etype, emsg, "", 0);
      em__send(w, p, EM_MSG_ERROR);
    } else if (failed) {
      em_put_value(w->reply, &v);
      em__send(w, p, EM_MSG_ERROR);
    } else if (kind == EM_BATCH_SINGLE) {
      em_put_value(w->reply, &v);
      em__send(w, p, EM_MSG_REPLY);
    } else if (v.type == EM_T_MAP) {
      em_put_map(w->reply, v.len);
      em_iter it;
      em_iter_init(&it, &v);
      em_value k, x;
      while (em_iter_next(&it, &k) && em_iter_next(&it, &x)) {
        em_put_value(w->reply, &k);
        em__put_part(w->reply, &x, i, n);
      }
      em__send(w, p, EM_MSG_REPLY);
    } else {
      em__put_part(w->reply, &v, i, n);
      em__send(w, p, EM_MSG_REPLY);
    }
    em__item_free(items[i]);
  }
  em_msg_free(res);
  uint64_t t1 = em__mono();
  pthread_mutex_lock(&b->mu);
  b->st.batches++;
  b->st.requests += n;
  if (n > b->st.max_batch) b->st.max_batch = n;
  if (etype || failed) b->st.errors++;
  b->st.dropped += dropped;
  b->st.queue_ns += waited;
  b->st.run_ns += t1 - t0;
  pthread_mutex_unlock(&b->mu);
}

static void *em__worker_main(void *arg) {
  em__bworker *w = arg;
  em_batcher *b = w->b;
  pthread_mutex_lock(&b->mu);
  for (;;) {
    if (b->head) {
      uint64_t now = em__mono();
      uint64_t at = (b->state != EM__B_RUNNING || b->count >= b->max_batch) ? 0 : b->head->t + b->max_delay_ns;
      if (at <= now) {
        uint32_t n = em__take(b, w->items);
        if (b->head) pthread_cond_signal(&b->cv); /* more is queued: another worker may take it */
        pthread_mutex_unlock(&b->mu);
        em__run_batch(w, n);
        pthread_mutex_lock(&b->mu);
        continue;
      }
      struct timespec ts = {(time_t)(at / 1000000000ull), (long)(at % 1000000000ull)};
      pthread_cond_timedwait(&b->cv, &b->mu, &ts);
    } else if (b->state != EM__B_RUNNING) {
      break;
    } else {
      pthread_cond_wait(&b->cv, &b->mu);
    }
  }
  pthread_mutex_unlock(&b->mu);
  for (uint32_t j = 0; j < w->nslots; j++)
    if (w->slots[j].p) b->free(b->alloc_ud, w->slots[j].p);
  free(w->slots);
  w->slots = NULL;
  w->nslots = 0;
  return NULL;
}

/* ------------------------------------------------------------ lifecycle */

void em_batcher_stop(em_batcher *b) {
  if (!b) return;
  pthread_mutex_lock(&b->stop_mu);
  pthread_mutex_lock(&b->mu);
  int state = b->state;
  if (state == EM__B_RUNNING) {
    b->state = EM__B_DRAINING;
    pthread_cond_broadcast(&b->cv);
  }
  pthread_mutex_unlock(&b->mu);
  if (state == EM__B_RUNNING) {
    for (uint32_t i = 0; i < b->nthreads; i++) pthread_join(b->threads[i], NULL);
    pthread_mutex_lock(&b->mu);
    b->state = EM__B_STOPPED;
    em__bitem *left = b->head; /* only when no worker started */
    b->head = b->tail = NULL;
    b->count = 0;
    pthread_mutex_unlock(&b->mu);
    while (left) {
      em__bitem *next = left->next;
      em__reply_error(b, left->p, "edgeml.ClosedError", "the server stopped before this request ran");
      em__item_free(left);
      left = next;
    }
    em__blog(b, EM_LOG_DEBUG, "batcher %s stopped", b->name);
  }
  pthread_mutex_unlock(&b->stop_mu);
}

void em_batcher_free(em_batcher *b) {
  if (!b) return;
  em_batcher_stop(b);
  for (uint32_t i = 0; i < b->nworkers; i++) {
    em__bworker *w = &b->workers[i];
    free(w->items);
    free(w->stacked);
    em_payload_free(w->out);
    em_payload_free(w->reply);
  }
  pthread_cond_destroy(&b->cv);
  pthread_mutex_destroy(&b->mu);
  pthread_mutex_destroy(&b->stop_mu);
  free(b->workers);
  free(b->threads);
  free(b->name);
  free(b);
}

void em_batcher_get_stats(em_batcher *b, em_batcher_stats *st) {
  pthread_mutex_lock(&b->mu);
  *st = b->st;
  st->queued = b->count;
  pthread_mutex_unlock(&b->mu);
}

/* ------------------------------------------------------- reading a batch */

uint32_t em_batch_size(const em_batch *b) { return b->n; }
int em_batch_kind(const em_batch *b) { return b->kind; }
uint32_t em_batch_worker(const em_batch *b) { return b->w->index; }
const char *em_batch_name(const em_batch *b) { return b->w->b->name; }

static long em__key_find(const em_batch *b, const char *key) {
  if (b->kind != EM_BATCH_MAP || !key) return -1;
  const em__bitem *h = b->items[0];
  em__bent k = {.key = key, .klen = (uint32_t)strlen(key)};
  const em__bent *e = bsearch(&k, h->ent, h->nent, sizeof *h->ent, em__ent_cmp);
  return e ? (long)(e - h->ent) : -1;
}

int em_batch_array(const em_batch *b, const char *key, em_array *out) {
  if (b->kind == EM_BATCH_ARRAY && !key) {
    *out = b->w->stacked[0];
    return EM_OK;
  }
  long j = em__key_find(b, key);
  if (j < 0 || !b->items[0]->ent[j].is_arr) return EM_EINVAL;
  *out = b->w->stacked[j];
  return EM_OK;
}

int em_batch_value(const em_batch *b, const char *key, uint32_t i, em_value *out) {
  if (i >= b->n) return EM_EINVAL;
  if (!key) {
    *out = b->items[i]->payload;
    return EM_OK;
  }
  long j = em__key_find(b, key);
  if (j < 0) return EM_EINVAL;
  *out = b->items[i]->ent[j].v;
  return EM_OK;
}

uint32_t em_batch_nkeys(const em_batch *b) { return b->kind == EM_BATCH_MAP ? b->items[0]->nent : 0; }

int em_batch_key(const em_batch *b, uint32_t j, const char **key, size_t *len, int *is_array) {
  if (j >= em_batch_nkeys(b)) return EM_EINVAL;
  const em__bent *e = &b->items[0]->ent[j];
  if (key) *key = e->key;
  if (len) *len = e->klen;
  if (is_array) *is_array = e->is_arr;
  return EM_OK;
}

const em_msg *em_batch_request(const em_batch *b, uint32_t i) {
  return i < b->n ? em_pending_request(b->items[i]->p) : NULL;
}
