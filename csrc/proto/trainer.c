/* trainer.c: the Trainer role (edgeml_trainer.h), a peer of
 * edgeml/trainer.py: the same HELLO info, messages, errors and data-sync
 * semantics (docs/protocol.md "Roles" -> "Trainer", docs/data-sync.md). */
#include "em_proto.h"
#include "../wire/em_wire.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define TR_MAX_SESSIONS 65536u         /* cursors kept (least recently used dropped), as trainer.py */
#define TR_CHUNK_BYTES (32ull << 20)   /* a data message holds about this much */
#define TR_CHUNK_ITEMS 4096u
#define TR_DEFAULT_VERSION "0.0.1"

/* ---------------------------------------------------------------- config */

void em_trainer_config_init(em_trainer_config *c) {
  memset(c, 0, sizeof *c);
  c->port = 5555;
  c->broadcast_port = 5556;
  c->version = NULL;
}

void em_trainer_server_opts_init(em_trainer_server_opts *o) {
  memset(o, 0, sizeof *o);
  em_trainer_config_init(&o->config);
}

void em_trainer_client_opts_init(em_trainer_client_opts *o) {
  memset(o, 0, sizeof *o);
  em_trainer_config_init(&o->config);
  o->connect_timeout_ns = 5000000000ull;
}

/* A config's lists, copied and checked; the compat fields refer to them. */
typedef struct tr_cfg {
  int any_keys;             /* payload_keys NULL */
  em__strlist keys_sorted;  /* payload_keys, sorted */
  em__strlist types;        /* request_types, config order */
  em__strlist types_sorted;
  char *version;
  em__compat_field compat[3];
} tr_cfg;

static void tr_cfg_free(tr_cfg *k) {
  em__strlist_free(&k->keys_sorted);
  em__strlist_free(&k->types);
  em__strlist_free(&k->types_sorted);
  free(k->version);
  k->version = NULL;
}

static int tr_cfg_init(tr_cfg *k, const em_trainer_config *c, const char **why) {
  memset(k, 0, sizeof *k);
  em__strlist keys = {0};
  int rc;
  *why = NULL;
  if (c->rate_limit < 0 || c->rate_limit != c->rate_limit) {
    *why = "rate_limit must be >= 0 calls per second (0: none)";
    return EM_EINVAL;
  }
  if (c->broadcast_port < EM_TRAINER_NO_BROADCAST || c->broadcast_port > 65535) {
    *why = "broadcast_port must be a port, 0 or EM_TRAINER_NO_BROADCAST";
    return EM_EINVAL;
  }
  k->any_keys = c->payload_keys == NULL;
  if (!k->any_keys) {
    if ((rc = em__strlist_init(&keys, c->payload_keys, c->n_payload_keys, why))) goto fail;
    rc = em__strlist_sorted(&k->keys_sorted, &keys);
    em__strlist_free(&keys);
    if (rc) goto fail;
  }
  if (c->n_request_types && !c->request_types) {
    *why = "request_types is NULL with n_request_types > 0";
    rc = EM_EINVAL;
    goto fail;
  }
  if ((rc = em__strlist_init(&k->types, c->request_types, c->n_request_types, why))) goto fail;
  if ((rc = em__strlist_sorted(&k->types_sorted, &k->types))) goto fail;
  k->version = strdup(c->version ? c->version : TR_DEFAULT_VERSION);
  if (!k->version) {
    rc = EM_ENOMEM;
    goto fail;
  }
  /* sorted by name, as Python's dict is built */
  k->compat[0] = (em__compat_field){"payload_keys", k->any_keys ? EM__CF_NIL : EM__CF_STRLIST, NULL,
                                    k->any_keys ? NULL : &k->keys_sorted};
  k->compat[1] = (em__compat_field){"request_types", EM__CF_STRLIST, NULL, &k->types_sorted};
  k->compat[2] = (em__compat_field){"version", EM__CF_STR, k->version, NULL};
  return EM_OK;
fail:
  if (rc == EM_EINVAL && !*why) *why = "invalid config";
  tr_cfg_free(k);
  return rc;
}

static void tr_hex_id(char out[33]) {
  uint8_t b[16];
  if (em_random_bytes(b, sizeof b)) {
    uint64_t x = em__random_u64(), y = em__random_u64();
    memcpy(b, &x, 8);
    memcpy(b + 8, &y, 8);
  }
  for (int i = 0; i < 16; i++) snprintf(out + 2 * i, 3, "%02x", b[i]);
  out[32] = 0;
}

static void tr_logf(em_log_fn log, void *ud, int level, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
static void tr_logf(em_log_fn log, void *ud, int level, const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (log)
    log(ud, level, msg);
  else
    em__log_stderr(NULL, level, msg);
}

/* ================================================================ server */

typedef struct tr_sstore {
  char *name;
  em_trainer_insert_fn fn;
  void *ud;
} tr_sstore;

/* A cursor per (session, store), in a chained hash table with an LRU list. */
typedef struct tr_cur {
  char *key; /* store '\0' session */
  size_t klen;
  uint64_t hash;
  int64_t cursor;
  struct tr_cur *hnext, *prev, *next; /* prev/next: LRU, head = oldest */
} tr_cur;

struct em_trainer_server {
  em__duo duo;
  tr_cfg cfg;
  em_gate *gate; /* the request rules (gate.c), shared with Python's TrainerServer */
  em_trainer_train_step_fn train_step;
  void *train_step_ud;
  em_trainer_request_fn request;
  void *request_ud;
  em_log_fn log;
  void *log_ud;
  char instance[33];
  pthread_mutex_t mu; /* stores, cursors */
  tr_sstore *stores;
  size_t nstores, stores_cap;
  tr_cur **buckets;
  size_t nbuckets, ncur;
  tr_cur *lru_head, *lru_tail;
  atomic_ullong items_received, duplicates_dropped, items_missed, restarted_replies;
  uint16_t port, bport;
};

static uint64_t tr_hash(const char *s, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
  return h;
}

/* Find (mu held): the entry of key, or NULL. */
static tr_cur *tr_cur_find(em_trainer_server *s, const char *key, size_t klen, uint64_t h) {
  if (!s->nbuckets) return NULL;
  for (tr_cur *e = s->buckets[h & (s->nbuckets - 1)]; e; e = e->hnext)
    if (e->hash == h && e->klen == klen && memcmp(e->key, key, klen) == 0) return e;
  return NULL;
}

static void tr_lru_unlink(em_trainer_server *s, tr_cur *e) {
  if (e->prev) e->prev->next = e->next; else s->lru_head = e->next;
  if (e->next) e->next->prev = e->prev; else s->lru_tail = e->prev;
  e->prev = e->next = NULL;
}

static void tr_lru_append(em_trainer_server *s, tr_cur *e) {
  e->prev = s->lru_tail;
  e->next = NULL;
  if (s->lru_tail) s->lru_tail->next = e; else s->lru_head = e;
  s->lru_tail = e;
}

static void tr_hash_unlink(em_trainer_server *s, tr_cur *e) {
  tr_cur **pp = &s->buckets[e->hash & (s->nbuckets - 1)];
  while (*pp && *pp != e) pp = &(*pp)->hnext;
  if (*pp) *pp = e->hnext;
}

static int tr_grow(em_trainer_server *s) {
  size_t nb = s->nbuckets ? s->nbuckets * 2 : 1024;
  tr_cur **b = calloc(nb, sizeof *b);
  if (!b) return EM_ENOMEM;
  for (tr_cur *e = s->lru_head; e; e = e->next) {
    e->hnext = b[e->hash & (nb - 1)];
    b[e->hash & (nb - 1)] = e;
  }
  free(s->buckets);
  s->buckets = b;
  s->nbuckets = nb;
  return EM_OK;
}

/* Set the cursor of key (mu held), making it the most recently used and
 * dropping the least recently used past TR_MAX_SESSIONS. */
static int tr_cur_set(em_trainer_server *s, const char *key, size_t klen, uint64_t h, int64_t cursor) {
  tr_cur *e = tr_cur_find(s, key, klen, h);
  if (e) {
    e->cursor = cursor;
    tr_lru_unlink(s, e);
    tr_lru_append(s, e);
    return EM_OK;
  }
  if (s->ncur + 1 > s->nbuckets && s->nbuckets < 2 * TR_MAX_SESSIONS && tr_grow(s)) return EM_ENOMEM;
  if (!s->nbuckets) return EM_ENOMEM;
  e = calloc(1, sizeof *e);
  if (!e || !(e->key = malloc(klen))) {
    free(e);
    return EM_ENOMEM;
  }
  memcpy(e->key, key, klen);
  e->klen = klen;
  e->hash = h;
  e->cursor = cursor;
  e->hnext = s->buckets[h & (s->nbuckets - 1)];
  s->buckets[h & (s->nbuckets - 1)] = e;
  tr_lru_append(s, e);
  s->ncur++;
  while (s->ncur > TR_MAX_SESSIONS) {
    tr_cur *old = s->lru_head;
    tr_lru_unlink(s, old);
    tr_hash_unlink(s, old);
    free(old->key);
    free(old);
    s->ncur--;
  }
  return EM_OK;
}

static void tr_cur_touch(em_trainer_server *s, tr_cur *e) {
  tr_lru_unlink(s, e);
  tr_lru_append(s, e);
}

/* "store\0session" */
static char *tr_cur_key(const char *store, size_t slen, const char *session, size_t sesslen, size_t *klen) {
  *klen = slen + 1 + sesslen;
  char *k = malloc(*klen ? *klen : 1);
  if (!k) return NULL;
  memcpy(k, store, slen);
  k[slen] = 0;
  memcpy(k + slen + 1, session, sesslen);
  return k;
}

/* The store named by the len bytes `name` (mu held), or NULL. */
static tr_sstore *tr_store_find(em_trainer_server *s, const char *name, size_t len) {
  for (size_t i = 0; i < s->nstores; i++)
    if (strlen(s->stores[i].name) == len && memcmp(s->stores[i].name, name, len) == 0) return &s->stores[i];
  return NULL;
}

/* edgeml.UnknownDataStoreError naming the store and those registered. */
static int tr_unknown_store(em_trainer_server *s, em_payload *reply, const char *name, size_t len) {
  em__text t;
  em__text_init(&t);
  em__text_cstr(&t, "no data store named ");
  em__text_repr_str(&t, name, len);
  em__text_cstr(&t, " on this trainer; it has: ");
  em__strlist names = {0}, sorted = {0};
  pthread_mutex_lock(&s->mu);
  for (size_t i = 0; i < s->nstores; i++) em__strlist_push(&names, s->stores[i].name, strlen(s->stores[i].name));
  pthread_mutex_unlock(&s->mu);
  em__strlist_sorted(&sorted, &names);
  em__text_keys(&t, &sorted);
  em__text_cstr(&t, " (em_trainer_server_add_store)");
  em__strlist_free(&names);
  em__strlist_free(&sorted);
  int rc = em__error_reply(reply, "edgeml.UnknownDataStoreError", 0, "%s", t.s);
  em__text_free(&t);
  return rc;
}

static int tr_malformed(em_payload *reply, const char *what) {
  return em__error_reply(reply, "edgeml.InvalidArgumentError", 0, "malformed %s", what);
}

/* A str value as a malloc'd C string (NULL: not a str, holds a NUL, or
 * out of memory). */
static char *tr_strdup_value(const em_value *v) {
  if (v->type != EM_T_STR || memchr(v->as.str, 0, v->len)) return NULL;
  char *s = malloc((size_t)v->len + 1);
  if (!s) return NULL;
  memcpy(s, v->as.str, v->len);
  s[v->len] = 0;
  return s;
}

/* train_step and request: the gate (gate.c) checked them */
static int tr_on_train_step(em_trainer_server *s, const em_value *payload, em_payload *reply) {
  int rc = s->train_step(s->train_step_ud, payload, reply);
  return em__finish_reply(reply, rc, "train_step");
}

static int tr_on_request(em_trainer_server *s, const em_value *payload, em_payload *reply) {
  em_value type, body;
  em_value_at(payload, 0, &type);
  em_value_at(payload, 1, &body);
  char *t = tr_strdup_value(&type); /* in request_types: no NUL inside */
  if (!t) return em__error_reply(reply, "MemoryError", 0, "out of memory");
  int rc = s->request(s->request_ud, t, &body, reply);
  char what[300];
  snprintf(what, sizeof what, "request %s", t);
  free(t);
  return em__finish_reply(reply, rc, what);
}

static int tr_on_cursor(em_trainer_server *s, const em_value *p, em_payload *reply) {
  em_value session, store;
  if (p->type != EM_T_MAP || em_value_get(p, "session", &session) != 1 || session.type != EM_T_STR ||
      em_value_get(p, "store", &store) != 1 || store.type != EM_T_STR)
    return tr_malformed(reply, "cursor request");
  pthread_mutex_lock(&s->mu);
  int known = tr_store_find(s, store.as.str, store.len) != NULL;
  pthread_mutex_unlock(&s->mu);
  if (!known) return tr_unknown_store(s, reply, store.as.str, store.len);
  size_t klen;
  char *key = tr_cur_key(store.as.str, store.len, session.as.str, session.len, &klen);
  if (!key) return em__error_reply(reply, "MemoryError", 0, "out of memory");
  uint64_t h = tr_hash(key, klen);
  pthread_mutex_lock(&s->mu);
  tr_cur *e = tr_cur_find(s, key, klen, h);
  int64_t c = e ? e->cursor : -1;
  pthread_mutex_unlock(&s->mu);
  free(key);
  em_put_int(reply, c);
  return EM_MSG_REPLY;
}

static void tr_data_reply(em_payload *reply, int64_t cursor, uint64_t stored, uint64_t missed, const char *inst) {
  em_put_map(reply, 4);
  em_put_cstr(reply, "cursor");
  em_put_int(reply, cursor);
  em_put_cstr(reply, "stored");
  em_put_uint(reply, stored);
  em_put_cstr(reply, "missed");
  em_put_uint(reply, missed);
  em_put_cstr(reply, "instance");
  em_put_cstr(reply, inst);
}

static int tr_on_data(em_trainer_server *s, const em_value *p, em_payload *reply) {
  em_value session, store, first_v, items, inst;
  int64_t first;
  if (p->type != EM_T_MAP || em_value_get(p, "session", &session) != 1 || session.type != EM_T_STR ||
      em_value_get(p, "store", &store) != 1 || store.type != EM_T_STR || em_value_get(p, "first", &first_v) != 1 ||
      first_v.type != EM_T_INT || em_value_int(&first_v, &first) || first < 0 ||
      em_value_get(p, "items", &items) != 1 || items.type != EM_T_LIST)
    return tr_malformed(reply, "data message");
  pthread_mutex_lock(&s->mu);
  tr_sstore *st = tr_store_find(s, store.as.str, store.len);
  tr_sstore target = st ? *st : (tr_sstore){0};
  pthread_mutex_unlock(&s->mu);
  if (!st) return tr_unknown_store(s, reply, store.as.str, store.len);
  char *session_s = tr_strdup_value(&session);
  if (!session_s) return tr_malformed(reply, "data message (session)");
  size_t klen;
  char *key = tr_cur_key(store.as.str, store.len, session.as.str, session.len, &klen);
  if (!key) {
    free(session_s);
    return em__error_reply(reply, "MemoryError", 0, "out of memory");
  }
  uint64_t h = tr_hash(key, klen);
  pthread_mutex_lock(&s->mu);
  tr_cur *e = tr_cur_find(s, key, klen, h);
  int have = e != NULL;
  int64_t cursor = have ? e->cursor : -1;
  if (e) tr_cur_touch(s, e);
  pthread_mutex_unlock(&s->mu);
  int acked_elsewhere = em_value_get(p, "instance", &inst) == 1 && inst.type == EM_T_STR &&
                        !(inst.len == 32 && memcmp(inst.as.str, s->instance, 32) == 0);
  int rc = EM_MSG_REPLY;
  if (!have && acked_elsewhere) {
    /* acknowledged by an earlier run whose cursors are gone: ask for all of
     * it again rather than store from the middle */
    tr_logf(s->log, s->log_ud, EM_LOG_WARNING,
            "data store '%s': session %.8s was acknowledged by a previous run of this trainer; asking it to send "
            "again what it still holds", target.name, session_s);
    atomic_fetch_add(&s->restarted_replies, 1);
    em_put_map(reply, 5);
    em_put_cstr(reply, "restarted");
    em_put_bool(reply, 1);
    em_put_cstr(reply, "cursor");
    em_put_int(reply, -1);
    em_put_cstr(reply, "stored");
    em_put_int(reply, 0);
    em_put_cstr(reply, "missed");
    em_put_int(reply, 0);
    em_put_cstr(reply, "instance");
    em_put_cstr(reply, s->instance);
    goto out;
  }
  int64_t n = items.len;
  int64_t last = first + n - 1;
  int64_t skip = !have ? 0 : EM__MAX(0, EM__MIN(n, cursor + 1 - first));
  int64_t missed = !have ? 0 : EM__MAX(0, first - cursor - 1);
  atomic_fetch_add(&s->duplicates_dropped, (uint64_t)skip);
  if (missed) {
    atomic_fetch_add(&s->items_missed, (uint64_t)missed);
    tr_logf(s->log, s->log_ud, EM_LOG_WARNING,
            "data store '%s': session %.8s skipped %lld items (its local store dropped them before they were sent; "
            "increase its capacity or update more often)", target.name, session_s, (long long)missed);
  }
  em_iter it;
  em_value item;
  em_iter_init(&it, &items);
  int64_t stored = 0, i = 0, refused = 0;
  int cb_rc = 0;
  for (; i < n && em_iter_next(&it, &item); i++) {
    if (i < skip) continue;
    cb_rc = target.fn(target.ud, target.name, session_s, (uint64_t)(first + i), &item);
    if (cb_rc) {
      refused = 1;
      break;
    }
    stored++;
  }
  /* the cursor covers what was stored (all of it unless refused) */
  int64_t reached = refused ? first + i - 1 : last;
  int64_t newc = EM__MAX(reached, have ? cursor : -1);
  if (stored || !have) {
    pthread_mutex_lock(&s->mu);
    int set = tr_cur_set(s, key, klen, h, newc);
    pthread_mutex_unlock(&s->mu);
    if (set) {
      rc = em__error_reply(reply, "MemoryError", 0, "out of memory (cursor table)");
      goto out;
    }
    atomic_fetch_add(&s->items_received, (uint64_t)stored);
    cursor = newc;
  }
  if (refused) {
    rc = em__error_reply(reply, "RuntimeError", 0,
                         "data store '%s' refused item %lld of session %.8s (insert returned %d); %lld items of "
                         "the batch stored, the rest will be sent again", target.name, (long long)(first + i),
                         session_s, cb_rc, (long long)stored);
    goto out;
  }
  tr_data_reply(reply, cursor, (uint64_t)stored, (uint64_t)missed, s->instance);
out:
  free(key);
  free(session_s);
  return rc;
}

static int tr_dispatch(em_trainer_server *s, const em_msg *req, em_payload *reply);

/* A reply holding arrays keeps the request's frame memory until it has
 * been sent, so a callback may answer with the request's arrays
 * (em_put_value); chained after a release hook the callback set. */
typedef struct tr_keep {
  void (*fn)(void *ctx);
  void *ctx;
  em_buf *buf;
} tr_keep;

static void tr_keep_release(void *ud) {
  tr_keep *k = ud;
  if (k->fn) k->fn(k->ctx);
  em_buf_release(k->buf);
  free(k);
}

static void tr_reply_keep(em_payload *reply, const em_msg *req) {
  if (!reply->nblobs || !req->buf) return;
  tr_keep *k = malloc(sizeof *k);
  if (!k) return; /* the callback's own hook still runs */
  k->fn = reply->release;
  k->ctx = reply->release_ctx;
  k->buf = em_buf_retain(req->buf);
  em_payload_on_release(reply, tr_keep_release, k);
}

static int tr_handler(void *ud, const em_msg *req, em_payload *reply) {
  int rc = tr_dispatch(ud, req, reply);
  tr_reply_keep(reply, req);
  return rc;
}

static int tr_dispatch(em_trainer_server *s, const em_msg *req, em_payload *reply) {
  em_value method, payload;
  if (em_msg_request(req, &method, &payload))
    return em__error_reply(reply, "edgeml.DecodeError", 0, "a request body must be [method: str, payload]");
  if (em_value_is(&method, "data")) return tr_on_data(s, &payload, reply);
  if (em_value_is(&method, "cursor")) return tr_on_cursor(s, &payload, reply);
  int rc = em__gate_check_value(s->gate, &method, &payload, reply);
  if (rc == EM_MSG_ERROR) return rc;
  return em_value_is(&method, "train_step") ? tr_on_train_step(s, &payload, reply)
                                             : tr_on_request(s, &payload, reply);
}

static void tr_server_free(em_trainer_server *s) {
  em__duo_close(&s->duo);
  for (size_t i = 0; i < s->nstores; i++) free(s->stores[i].name);
  free(s->stores);
  for (tr_cur *e = s->lru_head, *n; e; e = n) {
    n = e->next;
    free(e->key);
    free(e);
  }
  free(s->buckets);
  tr_cfg_free(&s->cfg);
  em_gate_close(s->gate);
  pthread_mutex_destroy(&s->mu);
  free(s);
}

static void tr_server_opts(em_server_opts *so, const em_trainer_server_opts *o) {
  em_server_opts_init(so);
  so->host = o->host ? o->host : "0.0.0.0";
  so->max_message_bytes = o->max_message_bytes;
  so->token = o->token;
  so->handshake_timeout_ns = o->handshake_timeout_ns;
  so->progress_timeout_ns = o->progress_timeout_ns;
  so->max_pending_bytes = o->max_pending_bytes;
  so->log = o->log;
  so->log_ud = o->log_ud;
}

int em_trainer_server_open(em_trainer_server **out, const em_trainer_server_opts *o) {
  *out = NULL;
  if (!o) return EM_EINVAL;
  em_trainer_server *s = calloc(1, sizeof *s);
  if (!s) return EM_ENOMEM;
  pthread_mutex_init(&s->mu, NULL);
  const char *why = NULL;
  int rc = tr_cfg_init(&s->cfg, &o->config, &why);
  if (rc) {
    if (why) tr_logf(o->log, o->log_ud, EM_LOG_ERROR, "TrainerServer config: %s", why);
    pthread_mutex_destroy(&s->mu);
    free(s);
    return rc;
  }
  if ((rc = em_gate_open_trainer(&s->gate, &o->config, &why))) {
    tr_cfg_free(&s->cfg);
    pthread_mutex_destroy(&s->mu);
    free(s);
    return rc;
  }
  s->train_step = o->train_step;
  s->train_step_ud = o->train_step_ud;
  em_gate_set_handlers(s->gate, o->train_step != NULL, o->request != NULL);
  s->request = o->request;
  s->request_ud = o->request_ud;
  s->log = o->log;
  s->log_ud = o->log_ud;
  tr_hex_id(s->instance);
  em_server_opts so;
  tr_server_opts(&so, o);
  if (o->config.broadcast_port != EM_TRAINER_NO_BROADCAST) {
    if (o->config.port && o->config.broadcast_port == o->config.port) {
      tr_logf(o->log, o->log_ud, EM_LOG_ERROR, "broadcast_port must differ from the port (%u)", o->config.port);
      rc = EM_EINVAL;
      goto fail;
    }
    so.port = (uint16_t)o->config.broadcast_port;
    so.service = "trainer.broadcast";
    if ((rc = em_server_open(&s->duo.bcast, &so))) goto fail;
    s->bport = em_server_port(s->duo.bcast);
  }
  /* HELLO info, as trainer.py's _hello_info */
  em_payload *info = em_payload_new();
  if (!info) {
    rc = EM_ENOMEM;
    goto fail;
  }
  em_put_map(info, 5);
  em_put_cstr(info, "role");
  em_put_cstr(info, "trainer");
  em_put_cstr(info, "compat");
  em__put_compat(info, s->cfg.compat, 3);
  em_put_cstr(info, "broadcast_port");
  if (s->duo.bcast) em_put_uint(info, s->bport); else em_put_nil(info);
  em_put_cstr(info, "rate_limit");
  if (o->config.rate_limit > 0) em_put_double(info, o->config.rate_limit); else em_put_nil(info);
  em_put_cstr(info, "instance");
  em_put_cstr(info, s->instance);
  uint8_t *hello = NULL;
  size_t hello_len = 0;
  rc = em__payload_body(info, &hello, &hello_len);
  em_payload_free(info);
  if (rc) goto fail;
  so.port = o->config.port;
  so.service = "trainer";
  so.hello_info = hello;
  so.hello_info_len = hello_len;
  so.handler = tr_handler;
  so.handler_ud = s;
  rc = em_server_open(&s->duo.main, &so);
  free(hello);
  if (rc) goto fail;
  s->port = em_server_port(s->duo.main);
  *out = s;
  return EM_OK;
fail:
  tr_server_free(s);
  return rc;
}

int em_trainer_server_add_store(em_trainer_server *s, const char *name, em_trainer_insert_fn insert, void *ud) {
  if (!s || !name || !*name || !insert) return EM_EINVAL;
  pthread_mutex_lock(&s->mu);
  tr_sstore *st = tr_store_find(s, name, strlen(name));
  int rc = EM_OK;
  if (st) {
    st->fn = insert;
    st->ud = ud;
  } else {
    char *n = strdup(name);
    if (n && s->nstores == s->stores_cap) {
      size_t cap = s->stores_cap ? 2 * s->stores_cap : 4;
      tr_sstore *v = realloc(s->stores, cap * sizeof *v);
      if (v) {
        s->stores = v;
        s->stores_cap = cap;
      }
    }
    if (!n || s->nstores == s->stores_cap) {
      free(n);
      rc = EM_ENOMEM;
    } else {
      s->stores[s->nstores++] = (tr_sstore){n, insert, ud};
    }
  }
  pthread_mutex_unlock(&s->mu);
  return rc;
}

int em_trainer_server_run(em_trainer_server *s) { return em__duo_run(&s->duo); }
int em_trainer_server_start(em_trainer_server *s) { return em__duo_start(&s->duo); }
void em_trainer_server_stop(em_trainer_server *s) { em__duo_stop(&s->duo); }
int em_trainer_server_wait(em_trainer_server *s, uint64_t timeout_ns) { return em__duo_wait(&s->duo, timeout_ns); }

void em_trainer_server_close(em_trainer_server *s) {
  if (s) tr_server_free(s);
}

uint16_t em_trainer_server_port(const em_trainer_server *s) { return s->port; }
uint16_t em_trainer_server_broadcast_port(const em_trainer_server *s) { return s->bport; }
const char *em_trainer_server_instance(const em_trainer_server *s) { return s->instance; }

int em_trainer_server_publish_weights(em_trainer_server *s, em_payload *weights, uint64_t *version_out) {
  if (!s->duo.bcast) return EM_EINVAL;
  if (!weights || em__payload_ready(weights) || weights->roots != 1) return EM_EENCODE;
  return em_server_publish(s->duo.bcast, weights, version_out);
}

void em_trainer_server_get_stats(em_trainer_server *s, em_trainer_server_stats *st) {
  memset(st, 0, sizeof *st);
  st->items_received = atomic_load(&s->items_received);
  st->duplicates_dropped = atomic_load(&s->duplicates_dropped);
  st->items_missed = atomic_load(&s->items_missed);
  st->restarted_replies = atomic_load(&s->restarted_replies);
  pthread_mutex_lock(&s->mu);
  st->sessions = s->ncur;
  pthread_mutex_unlock(&s->mu);
}

int64_t em_trainer_server_cursor(em_trainer_server *s, const char *session, const char *store) {
  if (!session || !store) return -1;
  size_t klen;
  char *key = tr_cur_key(store, strlen(store), session, strlen(session), &klen);
  if (!key) return -1;
  uint64_t h = tr_hash(key, klen);
  pthread_mutex_lock(&s->mu);
  tr_cur *e = tr_cur_find(s, key, klen, h);
  int64_t c = e ? e->cursor : -1;
  pthread_mutex_unlock(&s->mu);
  free(key);
  return c;
}

/* ================================================================ client */

/* One item of a local store: a frame of its own (its value and arrays),
 * shared by the store and the updates sending it. */
typedef struct tr_item {
  atomic_int refs;
  em_msg *msg;
  em_value v;
} tr_item;

static void tr_item_release(tr_item *it) {
  if (it && atomic_fetch_sub(&it->refs, 1) == 1) {
    em_msg_free(it->msg);
    free(it);
  }
}

typedef struct tr_cstore {
  char *name;
  size_t cap;
  pthread_mutex_t mu; /* ring, count, latest, dropped */
  tr_item **ring;
  size_t head, count; /* head: the oldest */
  int64_t latest;     /* id of the newest item, -1: none yet */
  uint64_t dropped;
  /* guarded by the client's sync_mu */
  int64_t acked;
  char acked_by[33]; /* the instance that acknowledged `acked`; "" none */
} tr_cstore;

struct em_trainer_client {
  em_client *rpc;
  em_pool *pool;
  char *host;
  uint16_t port, bport;
  tr_cfg cfg;
  double rate_limit;
  em_log_fn log;
  void *log_ud;
  char session[33];
  pthread_mutex_t stores_mu; /* the store list */
  tr_cstore **stores;
  size_t nstores, stores_cap;
  pthread_mutex_t sync_mu; /* one update at a time; the stores' acked */
  pthread_mutex_t rate_mu;
  uint64_t last_limited;
  pthread_mutex_t err_mu;
  char last_error[512];
  /* weights */
  em_client_opts sub_opts;
  char *token;
  em_sub *sub;
  pthread_t sub_thread;
  int sub_started;
  atomic_bool closing;
  em_trainer_weights_fn weights_cb;
  void *weights_ud;
  atomic_ullong items_inserted, items_sent, items_dropped_locally, resends, weights_received;
};

static void tr_set_error(em_trainer_client *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void tr_set_error(em_trainer_client *c, const char *fmt, ...) {
  va_list ap;
  pthread_mutex_lock(&c->err_mu);
  va_start(ap, fmt);
  vsnprintf(c->last_error, sizeof c->last_error, fmt, ap);
  va_end(ap);
  pthread_mutex_unlock(&c->err_mu);
}

static void tr_errbuf(const em_trainer_client_opts *o, const char *msg) {
  if (o->errbuf && o->errbuf_len) snprintf(o->errbuf, o->errbuf_len, "%s", msg);
}

static void tr_store_free(tr_cstore *st) {
  if (!st) return;
  for (size_t i = 0; i < st->count; i++) tr_item_release(st->ring[(st->head + i) % st->cap]);
  free(st->ring);
  free(st->name);
  pthread_mutex_destroy(&st->mu);
  free(st);
}

static void tr_client_free(em_trainer_client *c) {
  if (c->rpc) em_client_close(c->rpc);
  for (size_t i = 0; i < c->nstores; i++) tr_store_free(c->stores[i]);
  free(c->stores);
  if (c->pool) em__pool_release(c->pool);
  tr_cfg_free(&c->cfg);
  free(c->host);
  free(c->token);
  pthread_mutex_destroy(&c->stores_mu);
  pthread_mutex_destroy(&c->sync_mu);
  pthread_mutex_destroy(&c->rate_mu);
  pthread_mutex_destroy(&c->err_mu);
  free(c);
}

int em_trainer_client_open(em_trainer_client **out, const char *host, uint16_t port,
                           const em_trainer_client_opts *o) {
  *out = NULL;
  if (!o || !host) return EM_EINVAL;
  if (o->errbuf && o->errbuf_len) o->errbuf[0] = 0;
  em_trainer_client *c = calloc(1, sizeof *c);
  if (!c) return EM_ENOMEM;
  pthread_mutex_init(&c->stores_mu, NULL);
  pthread_mutex_init(&c->sync_mu, NULL);
  pthread_mutex_init(&c->rate_mu, NULL);
  pthread_mutex_init(&c->err_mu, NULL);
  const char *why = NULL;
  int rc = tr_cfg_init(&c->cfg, &o->config, &why);
  if (rc) {
    tr_errbuf(o, why ? why : em_strerror(rc));
    pthread_mutex_destroy(&c->stores_mu);
    pthread_mutex_destroy(&c->sync_mu);
    pthread_mutex_destroy(&c->rate_mu);
    pthread_mutex_destroy(&c->err_mu);
    free(c);
    return rc;
  }
  c->log = o->log;
  c->log_ud = o->log_ud;
  c->rate_limit = o->config.rate_limit;
  c->port = port ? port : o->config.port;
  c->host = strdup(host);
  c->token = o->token ? strdup(o->token) : NULL;
  c->pool = em__pool_new(8u << 20);
  if (!c->host || (o->token && !c->token) || !c->pool) {
    rc = EM_ENOMEM;
    goto fail;
  }
  tr_hex_id(c->session);
  em_client_opts co;
  em_client_opts_init(&co);
  co.connect_timeout_ns = o->connect_timeout_ns;
  co.max_message_bytes = o->max_message_bytes;
  co.service = "trainer";
  co.check_interrupt = o->check_interrupt;
  co.interrupt_ud = o->interrupt_ud;
  co.errbuf = o->errbuf;
  co.errbuf_len = o->errbuf_len;
  co.token = c->token;
  c->sub_opts = co;
  c->sub_opts.service = "trainer.broadcast";
  c->sub_opts.errbuf = NULL;
  c->sub_opts.errbuf_len = 0;
  if ((rc = em_client_open(&c->rpc, host, c->port, &co))) goto fail;
  em__hello h;
  if ((rc = em__hello_read(c->rpc, &h))) {
    tr_errbuf(o, "the server's handshake cannot be read");
    rc = EM_EHANDSHAKE;
    goto fail;
  }
  em_value theirs;
  if (h.info.type == EM_T_MAP && em_value_get(&h.info, "compat", &theirs) == 1 && theirs.type == EM_T_MAP &&
      theirs.len > 0) {
    em__text diff;
    em__text_init(&diff);
    int n = em__compat_diff(c->cfg.compat, 3, &theirs, &diff);
    if (n != 0) {
      char msg[2048];
      snprintf(msg, sizeof msg, "the TrainerServer at %s:%u has another config: %s", host, c->port,
               n < 0 ? "(out of memory)" : diff.s);
      tr_errbuf(o, msg);
      rc = n < 0 ? EM_ENOMEM : EM_EHANDSHAKE;
    }
    em__text_free(&diff);
  }
  uint16_t bp = 0;
  if (!rc && em__info_port(&h.info, "broadcast_port", &bp)) c->bport = bp;
  em_value rl;
  double r = 0;
  if (!rc && c->rate_limit == 0 && h.info.type == EM_T_MAP && em_value_get(&h.info, "rate_limit", &rl) == 1 &&
      em_value_double(&rl, &r) == EM_OK && r > 0)
    c->rate_limit = r; /* the server's, when our config has none */
  em__hello_free(&h);
  if (rc) goto fail;
  if (o->config.broadcast_port > 0) c->bport = (uint16_t)o->config.broadcast_port;
  *out = c;
  return EM_OK;
fail:
  tr_client_free(c);
  return rc;
}

int em_trainer_add_store(em_trainer_client *c, const char *name, size_t capacity) {
  if (!c || !name || !*name || capacity == 0 || capacity > (SIZE_MAX / sizeof(tr_item *))) return EM_EINVAL;
  tr_cstore *st = calloc(1, sizeof *st);
  if (!st) return EM_ENOMEM;
  st->name = strdup(name);
  st->ring = calloc(capacity, sizeof *st->ring);
  st->cap = capacity;
  st->latest = -1;
  st->acked = -1;
  pthread_mutex_init(&st->mu, NULL);
  if (!st->name || !st->ring) {
    tr_store_free(st);
    return EM_ENOMEM;
  }
  int rc = EM_OK;
  pthread_mutex_lock(&c->stores_mu);
  for (size_t i = 0; i < c->nstores; i++)
    if (strcmp(c->stores[i]->name, name) == 0) rc = EM_EINVAL;
  if (!rc && c->nstores == c->stores_cap) {
    size_t cap = c->stores_cap ? 2 * c->stores_cap : 4;
    tr_cstore **v = realloc(c->stores, cap * sizeof *v);
    if (!v) rc = EM_ENOMEM;
    else {
      c->stores = v;
      c->stores_cap = cap;
    }
  }
  if (!rc) c->stores[c->nstores++] = st;
  pthread_mutex_unlock(&c->stores_mu);
  if (rc) tr_store_free(st);
  return rc;
}

static tr_cstore *tr_store_get(em_trainer_client *c, const char *name) {
  tr_cstore *st = NULL;
  pthread_mutex_lock(&c->stores_mu);
  for (size_t i = 0; i < c->nstores && !st; i++)
    if (strcmp(c->stores[i]->name, name) == 0) st = c->stores[i];
  pthread_mutex_unlock(&c->stores_mu);
  return st;
}

/* The payload's one value as a frame of its own: one copy of the body and
 * the arrays, into a pooled 64-byte aligned buffer laid out as a frame. */
static int tr_item_from_payload(em_pool *pool, const em_payload *p, tr_item **out) {
  *out = NULL;
  if (em__payload_ready(p) || p->sbuf.size <= EM_FRAME_HEADER_BYTES) return EM_EENCODE;
  size_t body_len = p->sbuf.size - EM_FRAME_HEADER_BYTES;
  if (body_len > UINT32_MAX) return EM_ETOOBIG;
  uint64_t flen = EM__ALIGN_UP((uint64_t)EM_FRAME_HEADER_BYTES + body_len, 8) + 8ull * p->nblobs;
  for (uint32_t i = 0; i < p->nblobs; i++) flen = EM__ALIGN_UP(flen, EM_BLOB_ALIGN) + p->blobs[i].len_bytes;
  em_buf *b = em__buf_alloc(pool, (size_t)flen);
  if (!b) return EM_ENOMEM;
  uint8_t *d = em_buf_data(b);
  em__hdr h;
  memset(&h, 0, sizeof h);
  h.version = EM_PROTOCOL_VERSION;
  h.type = EM_MSG_REPLY;
  h.body_len = (uint32_t)body_len;
  h.nblobs = p->nblobs;
  h.frame_len = flen;
  em__hdr_write(d, &h);
  memcpy(d + EM_FRAME_HEADER_BYTES, p->sbuf.data + EM_FRAME_HEADER_BYTES, body_len);
  uint64_t off = EM_FRAME_HEADER_BYTES + body_len;
  uint64_t end = EM__ALIGN_UP(off, 8);
  memset(d + off, 0, end - off);
  off = end;
  for (uint32_t i = 0; i < p->nblobs; i++, off += 8) em__put_u64(d + off, p->blobs[i].len_bytes);
  for (uint32_t i = 0; i < p->nblobs; i++) {
    end = EM__ALIGN_UP(off, EM_BLOB_ALIGN);
    memset(d + off, 0, end - off);
    off = end;
    if (p->blobs[i].len_bytes) memcpy(d + off, p->blobs[i].data, p->blobs[i].len_bytes);
    off += p->blobs[i].len_bytes;
  }
  em_msg *m = NULL;
  const char *why;
  int rc = em__frame_finish(b, &h, &m, &why);
  if (rc) {
    em_buf_release(b);
    return rc == EM_ENOMEM ? rc : EM_EENCODE;
  }
  tr_item *it = calloc(1, sizeof *it);
  if (!it) {
    em_msg_free(m);
    return EM_ENOMEM;
  }
  it->msg = m;
  atomic_init(&it->refs, 1);
  if (em_msg_value(m, &it->v)) {
    tr_item_release(it);
    return EM_EENCODE;
  }
  *out = it;
  return EM_OK;
}

int em_trainer_insert(em_trainer_client *c, const char *store, em_payload *item, uint64_t *id_out) {
  if (!c || !store || !item) return EM_EINVAL;
  tr_cstore *st = tr_store_get(c, store);
  if (!st) return EM_EINVAL;
  tr_item *it;
  int rc = tr_item_from_payload(c->pool, item, &it);
  if (rc) return rc;
  tr_item *old = NULL;
  pthread_mutex_lock(&st->mu);
  if (st->count == st->cap) {
    old = st->ring[st->head];
    st->ring[st->head] = it;
    st->head = (st->head + 1) % st->cap;
    st->dropped++;
  } else {
    st->ring[(st->head + st->count) % st->cap] = it;
    st->count++;
  }
  int64_t id = ++st->latest;
  pthread_mutex_unlock(&st->mu);
  tr_item_release(old);
  atomic_fetch_add(&c->items_inserted, 1);
  if (id_out) *id_out = (uint64_t)id;
  return EM_OK;
}

/* Wait until rate_limit allows another call; ETIMEDOUT when that is
 * further away than timeout_ns. */
static int tr_rate_wait(em_trainer_client *c, uint64_t timeout_ns) {
  if (!(c->rate_limit > 0)) return EM_OK;
  uint64_t period = (uint64_t)(1e9 / c->rate_limit);
  pthread_mutex_lock(&c->rate_mu);
  uint64_t now = em_mono_ns();
  if (c->last_limited && now - c->last_limited < period) {
    uint64_t gap = period - (now - c->last_limited);
    if (gap > timeout_ns) {
      pthread_mutex_unlock(&c->rate_mu);
      return EM_ETIMEDOUT;
    }
    struct timespec ts = {(time_t)(gap / 1000000000ull), (long)(gap % 1000000000ull)};
    while (nanosleep(&ts, &ts) != 0) {
    }
    now = em_mono_ns();
  }
  c->last_limited = now;
  pthread_mutex_unlock(&c->rate_mu);
  return EM_OK;
}

/* EREMOTE: keep and log the server's reason. */
static void tr_remote_error(em_trainer_client *c, const em_msg *reply, const char *what) {
  char buf[480];
  if (!reply || em_msg_error(reply, buf, sizeof buf)) snprintf(buf, sizeof buf, "(unreadable error reply)");
  tr_set_error(c, "%s", buf);
  tr_logf(c->log, c->log_ud, EM_LOG_WARNING, "trainer %s:%u: %s failed: %s", c->host, c->port, what, buf);
}

/* Send store st's items after from_id (sync_mu held), as trainer.py's
 * _send_store. */
static int tr_send_store(em_trainer_client *c, tr_cstore *st, int64_t from_id, uint64_t timeout_ns, int depth) {
  pthread_mutex_lock(&st->mu);
  int64_t last_id = st->latest;
  int64_t n_new = last_id - from_id;
  size_t k = n_new <= 0 ? 0 : (size_t)EM__MIN((uint64_t)n_new, (uint64_t)st->count);
  tr_item **items = NULL;
  if (k) {
    items = malloc(k * sizeof *items);
    if (items)
      for (size_t i = 0; i < k; i++) {
        items[i] = st->ring[(st->head + st->count - k + i) % st->cap];
        atomic_fetch_add(&items[i]->refs, 1);
      }
  }
  pthread_mutex_unlock(&st->mu);
  if (!k) return EM_OK;
  if (!items) return EM_ENOMEM;
  int64_t first = last_id - (int64_t)k + 1;
  if (first > from_id + 1) {
    atomic_fetch_add(&c->items_dropped_locally, (uint64_t)(first - from_id - 1));
    tr_logf(c->log, c->log_ud, EM_LOG_WARNING,
            "data store '%s' dropped %lld items before they could be sent (it holds %zu); increase its capacity "
            "or update more often", st->name, (long long)(first - from_id - 1), st->cap);
  }
  int rc = EM_OK;
  em_payload *p = em_payload_new();
  if (!p) rc = EM_ENOMEM;
  size_t i = 0;
  while (!rc && i < k) {
    size_t n = 0;
    uint64_t bytes = 0;
    while (i + n < k && n < TR_CHUNK_ITEMS && (n == 0 || bytes + items[i + n]->msg->frame_bytes <= TR_CHUNK_BYTES))
      bytes += items[i + n++]->msg->frame_bytes;
    em_payload_reset(p);
    em_payload_begin_request(p, "data", 4);
    em_put_map(p, 5);
    em_put_cstr(p, "session");
    em_put_cstr(p, c->session);
    em_put_cstr(p, "store");
    em_put_cstr(p, st->name);
    em_put_cstr(p, "first");
    em_put_int(p, first + (int64_t)i);
    em_put_cstr(p, "items");
    em_put_list(p, (uint32_t)n);
    for (size_t j = 0; j < n; j++) em_put_value(p, &items[i + j]->v);
    em_put_cstr(p, "instance");
    if (st->acked_by[0]) em_put_cstr(p, st->acked_by); else em_put_nil(p);
    if (em_payload_error(p)) {
      rc = em_payload_error(p);
      break;
    }
    em_msg *reply = NULL;
    rc = em_client_request(c->rpc, EM_MSG_REQUEST, p, timeout_ns, &reply);
    em_payload_reset(p); /* the arrays it borrowed are no longer read */
    if (rc == EM_EREMOTE) {
      tr_remote_error(c, reply, "data update");
      em_msg_free(reply);
      break;
    }
    if (rc) break;
    em_value v, f;
    int restarted = 0;
    int64_t cursor = -1, stored = 0;
    char inst[33] = "";
    if (em_msg_value(reply, &v) == EM_OK && v.type == EM_T_MAP) {
      if (em_value_get(&v, "restarted", &f) == 1 && f.type == EM_T_BOOL && f.as.b) restarted = 1;
      if (em_value_get(&v, "cursor", &f) == 1 && em_value_int(&f, &cursor)) cursor = -1;
      if (em_value_get(&v, "stored", &f) == 1 && em_value_int(&f, &stored)) stored = 0;
      if (em_value_get(&v, "instance", &f) == 1 && f.type == EM_T_STR && em_value_cstr(&f, inst, sizeof inst))
        inst[0] = 0;
    }
    em_msg_free(reply);
    if (restarted) {
      /* the learner restarted and lost what it had acknowledged: send it
       * everything this store still holds */
      size_t held;
      pthread_mutex_lock(&st->mu);
      held = st->count;
      pthread_mutex_unlock(&st->mu);
      tr_logf(c->log, c->log_ud, EM_LOG_WARNING,
              "trainer %s:%u restarted without the data it had acknowledged for store '%s'; sending again the %zu "
              "items this client still holds", c->host, c->port, st->name, held);
      atomic_fetch_add(&c->resends, 1);
      st->acked = -1;
      memcpy(st->acked_by, inst, sizeof inst);
      if (depth >= 3 || !inst[0]) {
        tr_set_error(c, "edgeml.ProtocolError: the trainer keeps answering 'restarted' for store '%s'", st->name);
        rc = EM_EPROTO;
        break;
      }
      for (size_t j = 0; j < k; j++) tr_item_release(items[j]);
      free(items);
      em_payload_free(p);
      return tr_send_store(c, st, -1, timeout_ns, depth + 1);
    }
    if (cursor < first + (int64_t)(i + n) - 1) {
      tr_set_error(c, "edgeml.ProtocolError: the trainer did not acknowledge data for store '%s'", st->name);
      rc = EM_EPROTO;
      break;
    }
    if (cursor > st->acked) st->acked = cursor;
    memcpy(st->acked_by, inst, sizeof inst);
    if (stored > 0) atomic_fetch_add(&c->items_sent, (uint64_t)stored);
    i += n;
  }
  em_payload_free(p);
  for (size_t j = 0; j < k; j++) tr_item_release(items[j]);
  free(items);
  return rc;
}

int em_trainer_update(em_trainer_client *c, uint64_t timeout_ns) {
  int rc = tr_rate_wait(c, timeout_ns);
  if (rc) return rc;
  pthread_mutex_lock(&c->sync_mu);
  pthread_mutex_lock(&c->stores_mu);
  size_t n = c->nstores;
  tr_cstore **v = n ? malloc(n * sizeof *v) : NULL;
  if (v) memcpy(v, c->stores, n * sizeof *v);
  pthread_mutex_unlock(&c->stores_mu);
  if (n && !v) rc = EM_ENOMEM;
  for (size_t i = 0; !rc && i < n; i++) rc = tr_send_store(c, v[i], v[i]->acked, timeout_ns, 0);
  pthread_mutex_unlock(&c->sync_mu);
  free(v);
  return rc;
}

int em_trainer_train_step(em_trainer_client *c, em_payload *payload, uint64_t timeout_ns, em_msg **reply) {
  *reply = NULL;
  return em__call(c->rpc, "train_step", payload, timeout_ns, reply);
}

int em_trainer_request(em_trainer_client *c, const char *type, em_payload *payload, uint64_t timeout_ns,
                       em_msg **reply) {
  *reply = NULL;
  if (!type) return EM_EINVAL;
  int rc = tr_rate_wait(c, timeout_ns);
  if (rc) return rc;
  em_payload req;
  if (em_payload_init(&req)) return EM_ENOMEM;
  em_payload_begin_request(&req, "request", 7);
  em_put_list(&req, 2);
  em_put_cstr(&req, type);
  rc = payload ? em__put_payload(&req, payload) : em_put_nil(&req);
  if (!rc) rc = em_client_request(c->rpc, EM_MSG_REQUEST, &req, timeout_ns, reply);
  em_payload_destroy(&req);
  return rc;
}

int em_trainer_server_last_id(em_trainer_client *c, const char *name, uint64_t timeout_ns, int64_t *cursor) {
  if (!name || !cursor) return EM_EINVAL;
  em_payload req;
  if (em_payload_init(&req)) return EM_ENOMEM;
  em_payload_begin_request(&req, "cursor", 6);
  em_put_map(&req, 2);
  em_put_cstr(&req, "session");
  em_put_cstr(&req, c->session);
  em_put_cstr(&req, "store");
  em_put_cstr(&req, name);
  em_msg *reply = NULL;
  int rc = em_client_request(c->rpc, EM_MSG_REQUEST, &req, timeout_ns, &reply);
  em_payload_destroy(&req);
  if (rc == EM_EREMOTE) tr_remote_error(c, reply, "cursor");
  if (rc == EM_OK) {
    em_value v;
    if (em_msg_value(reply, &v) || em_value_int(&v, cursor)) {
      tr_set_error(c, "edgeml.ProtocolError: the trainer's cursor reply is not an int");
      rc = EM_EPROTO;
    }
  }
  em_msg_free(reply);
  return rc;
}

static void *tr_weights_main(void *ud) {
  em_trainer_client *c = ud;
  int lost = 0;
  while (!atomic_load(&c->closing)) {
    em_msg *m = NULL;
    int rc = em_sub_next(c->sub, 250000000ull, &m);
    if (rc == EM_ECLOSED) break;
    if (rc == EM_ETIMEDOUT) continue;
    if (rc) {
      if (atomic_load(&c->closing)) break;
      if (!lost)
        tr_logf(c->log, c->log_ud, EM_LOG_WARNING, "weights from %s:%u: %s; reconnecting", c->host, c->bport,
                em_strerror(rc));
      lost = 1;
      if (rc != EM_ECONNCLOSED) {
        struct timespec ts = {0, 50000000};
        nanosleep(&ts, NULL);
      }
      continue;
    }
    if (lost) tr_logf(c->log, c->log_ud, EM_LOG_INFO, "weights from %s:%u: connected again", c->host, c->bport);
    lost = 0;
    uint64_t version = atomic_fetch_add(&c->weights_received, 1) + 1;
    c->weights_cb(c->weights_ud, m, version);
    em_msg_free(m);
  }
  return NULL;
}

int em_trainer_recv_weights(em_trainer_client *c, em_trainer_weights_fn cb, void *ud) {
  if (!cb || c->sub || !c->bport) return EM_EINVAL;
  int rc = em_sub_open(&c->sub, c->host, c->bport, &c->sub_opts);
  if (rc) {
    c->sub = NULL;
    return rc;
  }
  c->weights_cb = cb;
  c->weights_ud = ud;
  if (pthread_create(&c->sub_thread, NULL, tr_weights_main, c)) {
    em_sub_close(c->sub);
    c->sub = NULL;
    return EM_ENOMEM;
  }
  c->sub_started = 1;
  return EM_OK;
}

void em_trainer_client_get_stats(em_trainer_client *c, em_trainer_client_stats *st) {
  memset(st, 0, sizeof *st);
  st->items_inserted = atomic_load(&c->items_inserted);
  st->items_sent = atomic_load(&c->items_sent);
  st->items_dropped_locally = atomic_load(&c->items_dropped_locally);
  st->resends_after_restart = atomic_load(&c->resends);
  st->weights_received = atomic_load(&c->weights_received);
}

const char *em_trainer_session(const em_trainer_client *c) { return c->session; }

void em_trainer_last_error(em_trainer_client *c, char *buf, size_t cap) {
  if (!buf || !cap) return;
  pthread_mutex_lock(&c->err_mu);
  snprintf(buf, cap, "%s", c->last_error);
  pthread_mutex_unlock(&c->err_mu);
}

void em_trainer_client_close(em_trainer_client *c) {
  if (!c) return;
  atomic_store(&c->closing, 1);
  if (c->sub) {
    em_sub_shutdown(c->sub);
    if (c->sub_started) pthread_join(c->sub_thread, NULL);
    em_sub_close(c->sub);
    c->sub = NULL;
  }
  tr_client_free(c);
}
