/* server.c: an edgeml server: the handshake, then each REQUEST runs the
 * user's handler on the loop thread and its reply is written from there
 * (run-to-completion: no thread handoff on the request path), unless the
 * handler defers it: then the reply comes later from any thread (see
 * "deferred replies" below). */
#include "em_rpc.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* ------------------------------------------------------ deferred replies
 *
 * A handler takes its request with em_server_defer and returns
 * EM_MSG_DEFER. em_pending_reply (any thread) builds the reply frame into
 * pooled memory, there and then, and queues it on the hub; the loop thread,
 * woken through the listener's async handle (em__listener_wake), writes
 * the queued frames in the order they were queued, one write each
 * (em__conn_send_buf). A drop, or a reply that failed to build, is queued
 * too (without a frame) so that the loop gives the request's share of the
 * connection's pipelining back (em__conn_defer_add).
 *
 * Lifetimes: each pending holds a reference to the hub and one to its
 * connection (em__conn_ref: an `open` flag and, for the loop thread only,
 * the connection while it exists), never a bare pointer. The hub is freed
 * by the last of the server and its pendings, so a reply after
 * em_server_close finds it closed (ECLOSED) rather than freed memory.
 * When the listener begins to stop (em__on_stop, on the loop thread) the
 * hub closes under its lock: replies queued before that are written (they
 * drain with the other queued writes before run returns); later ones get
 * ECLOSED. */
typedef struct em__hub {
  atomic_int refs;          /* the server's, and one per pending */
  pthread_mutex_t mu;       /* guards head/tail, and l while !closed */
  em_pending *head, *tail;  /* for the loop thread, oldest first */
  atomic_bool closed;       /* set under mu: nothing is queued any more */
  em__listener *l;          /* valid while !closed (used under mu) */
  em_pool *pool;            /* owned reference: reply frames */
  uint64_t max_message_bytes;
  unsigned fork_gen;
  atomic_ullong outstanding; /* pendings not yet answered or dropped */
  atomic_ullong n_errors;    /* ERROR replies queued */
} em__hub;

struct em_pending {
  em__hub *hub;        /* owned reference */
  em__conn_ref *conn;  /* owned reference */
  em_msg *req;         /* owned until answered or dropped */
  uint64_t req_id, t_recv, t_defer;
  int64_t held;        /* bytes counted on the connection's pipelining */
  em_buf *frame;       /* the reply frame (owned), NULL for a drop */
  size_t frame_len;
  em_pending *next;    /* on the hub's queue */
};

static void em__hub_release(em__hub *h) {
  if (atomic_fetch_sub(&h->refs, 1) != 1) return;
  pthread_mutex_destroy(&h->mu);
  if (h->pool) em__pool_release(h->pool);
  free(h);
}

static void em__pending_free(em_pending *p) {
  if (p->req) em_msg_free(p->req);
  if (p->frame) em_buf_release(p->frame);
  em__conn_ref_release(p->conn);
  em__hub_release(p->hub);
  free(p);
}

struct em_server {
  em__listener *l;
  em_server_opts opts;
  char *service;
  uint8_t *hello_info;
  em_payload reply; /* loop thread only; reused for every reply */
  uint64_t max_message_bytes;
  uint64_t epoch;           /* random per server: subscribers detect restarts */
  em_pool *pool;            /* owned reference; published frames */
  pthread_mutex_t pub_mu;   /* guards pub_buf, pub_len, pub_version */
  em_buf *pub_buf;          /* the current broadcast frame (owned ref) */
  size_t pub_len;
  uint64_t pub_version;
  atomic_bool closed_for_publish;
  atomic_ullong n_requests, n_errors, n_bad_bodies, n_pub_sends, n_auth_failures;
  char *token;              /* NULL: no authentication */
  uint64_t handshake_timeout_ns, last_sweep;
  uint64_t progress_timeout_ns; /* a frame in progress must advance within this */
  atomic_ullong n_stalled;
  unsigned fork_gen;        /* em__fork_gen() at open: a fork child must not touch the loop */
  atomic_int entered;       /* threads inside stop/wait/publish/stats: close waits for them */
  atomic_bool pub_dirty;    /* a value was published since on_wake last offered one */
  em__hub *hub;             /* owned reference (deferred replies) */
  /* the request whose handler runs now, for em_server_defer (loop thread) */
  const em_msg *cur_req;
  em__conn *cur_conn;
  uint64_t cur_t_recv;
  em_pending *cur_pending;
};

/* Handshake states of a connection (em__conn_state). */
enum { EM__CONN_NEW = 0, EM__CONN_READY = 1, EM__CONN_AUTH = 2 };

bool em__obj_streq(const msgpack_object *o, const char *s) {
  size_t n = strlen(s);
  return o && o->type == MSGPACK_OBJECT_STR && o->via.str.size == n && memcmp(o->via.str.ptr, s, n) == 0;
}

static void em__pack_cstr(msgpack_packer *pk, const char *s) {
  msgpack_pack_str_with_body(pk, s, strlen(s));
}

int em__pack_error(em_payload *p, const char *type, const char *message, const char *traceback) {
  msgpack_pack_map(&p->pk, 3);
  em__pack_cstr(&p->pk, "type");
  em__pack_cstr(&p->pk, type);
  em__pack_cstr(&p->pk, "message");
  em__pack_cstr(&p->pk, message);
  em__pack_cstr(&p->pk, "traceback");
  em__pack_cstr(&p->pk, traceback ? traceback : "");
  return EM_OK;
}

static void em__refuse(em_server *s, em__conn *c, uint64_t req_id, const char *why) {
  em_payload *p = &s->reply;
  em_payload_reset(p);
  em__pack_error(p, "HandshakeError", why, NULL);
  em__conn_send(c, p, EM_MSG_ERROR, req_id, NULL);
  em__conn_close(c, EM_LOG_WARNING, why);
}

/* A bin field of exactly n bytes, or NULL. */
static const uint8_t *em__obj_bin(const msgpack_object *o, const char *key, size_t n) {
  const msgpack_object *v = em_obj_get(o, key);
  if (!v || v->type != MSGPACK_OBJECT_BIN || v->via.bin.size != n) return NULL;
  return (const uint8_t *)v->via.bin.ptr;
}

static void em__handshake(em_server *s, em__conn *c, em_msg *m) {
  msgpack_zone zone;
  msgpack_zone_init(&zone, 1024);
  msgpack_object o;
  char why[256];
  why[0] = 0;
  const uint8_t *client_nonce = NULL;
  if (m->type != EM_MSG_HELLO) {
    snprintf(why, sizeof why, "expected HELLO, got message type %u", m->type);
  } else if (em_msg_unpack(m, &zone, &o) != EM_OK || o.type != MSGPACK_OBJECT_MAP) {
    snprintf(why, sizeof why, "malformed HELLO");
  } else {
    const msgpack_object *proto = em_obj_get(&o, "proto");
    const msgpack_object *svc = em_obj_get(&o, "service");
    client_nonce = em__obj_bin(&o, "nonce", EM__NONCE_BYTES);
    if (!proto || proto->type != MSGPACK_OBJECT_POSITIVE_INTEGER || proto->via.u64 != EM_PROTOCOL_VERSION) {
      snprintf(why, sizeof why, "client speaks another protocol version (server: %d)", EM_PROTOCOL_VERSION);
    } else if (svc && svc->type == MSGPACK_OBJECT_STR && !em__obj_streq(svc, s->service)) {
      snprintf(why, sizeof why, "client expects a '%.*s' server, this is a '%s' server",
               (int)EM__MIN(svc->via.str.size, 64u), svc->via.str.ptr, s->service);
    } else if (s->token && !client_nonce) {
      snprintf(why, sizeof why, "this server requires a token and the client sent no nonce (an older edgeml?)");
    }
  }
  uint8_t nonces[2 * EM__NONCE_BYTES]; /* server nonce, client nonce */
  if (!why[0] && s->token) {
    memcpy(nonces + EM__NONCE_BYTES, client_nonce, EM__NONCE_BYTES);
    if (em_random_bytes(nonces, EM__NONCE_BYTES)) snprintf(why, sizeof why, "no randomness for a nonce");
  }
  msgpack_zone_destroy(&zone);
  if (why[0]) {
    em__refuse(s, c, m->req_id, why);
    return;
  }
  em_payload *p = &s->reply;
  msgpack_pack_map(&p->pk, 4 + (s->hello_info ? 1 : 0) + (s->token ? 1 : 0));
  em__pack_cstr(&p->pk, "epoch");
  msgpack_pack_uint64(&p->pk, s->epoch);
  em__pack_cstr(&p->pk, "proto");
  msgpack_pack_uint32(&p->pk, EM_PROTOCOL_VERSION);
  em__pack_cstr(&p->pk, "max_message_bytes");
  msgpack_pack_uint64(&p->pk, s->max_message_bytes);
  em__pack_cstr(&p->pk, "service");
  em__pack_cstr(&p->pk, s->service);
  if (s->hello_info) {
    em__pack_cstr(&p->pk, "info");
    msgpack_sbuffer_write(&p->sbuf, (const char *)s->hello_info, s->opts.hello_info_len);
  }
  if (s->token) { /* the challenge */
    em__pack_cstr(&p->pk, "auth");
    msgpack_pack_map(&p->pk, 2);
    em__pack_cstr(&p->pk, "scheme");
    em__pack_cstr(&p->pk, "hmac-sha256");
    em__pack_cstr(&p->pk, "nonce");
    msgpack_pack_bin_with_body(&p->pk, nonces, EM__NONCE_BYTES);
    memcpy(em__conn_scratch(c), nonces, sizeof nonces);
  }
  em__conn_send(c, p, EM_MSG_HELLO, m->req_id, NULL);
  *em__conn_state(c) = s->token ? EM__CONN_AUTH : EM__CONN_READY;
  if (!s->token) em__conn_open_up(c);
}

/* The client's AUTH: {"proof": HMAC(token, "edgeml-client-v1" || server
 * nonce || client nonce)}. Nothing reaches a handler before it checks. The
 * OK carries the server's own proof, {"proof": HMAC(token,
 * "edgeml-server-v1" || client nonce || server nonce)}, for the client to
 * check in turn. */
static void em__authenticate(em_server *s, em__conn *c, em_msg *m) {
  const char *why = NULL;
  msgpack_zone zone;
  msgpack_zone_init(&zone, 256);
  msgpack_object o;
  if (m->type != EM_MSG_AUTH) {
    why = "this server requires a token: the client sent a request without authenticating";
  } else if (em_msg_unpack(m, &zone, &o) != EM_OK || o.type != MSGPACK_OBJECT_MAP) {
    why = "malformed AUTH";
  } else {
    const uint8_t *proof = em__obj_bin(&o, "proof", 32);
    uint8_t want[32];
    const uint8_t *n = em__conn_scratch(c);
    em__auth_proof(s->token, EM__AUTH_CLIENT, n, n + EM__NONCE_BYTES, want);
    if (!proof || !em_ct_equal(proof, want, sizeof want)) why = "authentication failed: wrong token";
  }
  msgpack_zone_destroy(&zone);
  if (why) {
    atomic_fetch_add(&s->n_auth_failures, 1);
    em__refuse(s, c, m->req_id, why);
    return;
  }
  uint8_t proof[32];
  const uint8_t *n = em__conn_scratch(c);
  em__auth_proof(s->token, EM__AUTH_SERVER, n + EM__NONCE_BYTES, n, proof);
  msgpack_pack_map(&s->reply.pk, 1);
  em__pack_cstr(&s->reply.pk, "proof");
  msgpack_pack_bin_with_body(&s->reply.pk, proof, sizeof proof);
  em__conn_send(c, &s->reply, EM_MSG_OK, m->req_id, NULL);
  *em__conn_state(c) = EM__CONN_READY;
  em__conn_open_up(c);
}

static void em__sweep_one(void *ud, em__conn *c) {
  em_server *s = ud;
  if (em__conn_closing(c)) return;
  if (*em__conn_state(c) != EM__CONN_READY && em__conn_age_ns(c) > s->handshake_timeout_ns) {
    char why[96];
    snprintf(why, sizeof why, "no handshake within %.3g s", (double)s->handshake_timeout_ns / 1e9);
    em__conn_close(c, EM_LOG_WARNING, why);
  } else if (em__conn_stalled(c, em_mono_ns(), s->progress_timeout_ns)) {
    char why[128];
    snprintf(why, sizeof why, "a frame stalled: less than %u KiB of it arrived in %.3g s (progress_timeout)",
             EM__PROGRESS_BYTES / 1024, (double)s->progress_timeout_ns / 1e9);
    atomic_fetch_add(&s->n_stalled, 1);
    em__conn_close(c, EM_LOG_WARNING, why);
  }
}

/* Send the current value to c if it waits for one newer than it has. Loop
 * thread. */
static void em__pub_offer(em_server *s, em__conn *c, em_buf *b, size_t len, uint64_t version) {
  em__conn_sub *sub = em__conn_sub_state(c);
  if (!sub->waiting || !b || version <= sub->have) return;
  sub->waiting = false;
  sub->have = version;
  atomic_fetch_add(&s->n_pub_sends, 1); /* first: the peer may read it before send returns */
  em__conn_send_buf(c, b, len);
}

typedef struct {
  em_server *s;
  em_buf *b;
  size_t len;
  uint64_t version;
} em__pub_snap;

static void em__pub_offer_cb(void *ud, em__conn *c) {
  em__pub_snap *snap = ud;
  em__pub_offer(snap->s, c, snap->b, snap->len, snap->version);
}

static em__pub_snap em__pub_current(em_server *s) {
  em__pub_snap snap = {.s = s};
  pthread_mutex_lock(&s->pub_mu);
  if (s->pub_buf) snap.b = em_buf_retain(s->pub_buf);
  snap.len = s->pub_len;
  snap.version = s->pub_version;
  pthread_mutex_unlock(&s->pub_mu);
  return snap;
}

/* Write the replies (and account for the drops) of a list taken from the
 * hub, oldest first. Loop thread. */
static void em__deliver(em_pending *list) {
  while (list) {
    em_pending *p = list;
    list = p->next;
    em__conn *c = p->conn->c;
    if (c) {
      if (p->frame && atomic_load(&p->conn->open)) {
        em__put_u64(em_buf_data(p->frame) + 32, em_now_ns()); /* ts[0]: its send time */
        em__conn_send_buf(c, p->frame, p->frame_len);
      }
      em__conn_defer_add(c, -1, -p->held); /* may read c's next requests */
    }
    em__pending_free(p);
  }
}

static em_pending *em__hub_take(em__hub *h, bool close) {
  pthread_mutex_lock(&h->mu);
  em_pending *list = h->head;
  h->head = h->tail = NULL;
  if (close) {
    atomic_store(&h->closed, true);
    h->l = NULL;
  }
  pthread_mutex_unlock(&h->mu);
  return list;
}

/* A value was published (offer it to every waiting subscriber), or
 * deferred replies were queued (write them). */
static void em__on_wake(void *ud) {
  em_server *s = ud;
  if (atomic_exchange(&s->pub_dirty, false)) {
    em__pub_snap snap = em__pub_current(s);
    if (snap.b) {
      em__listener_foreach(s->l, em__pub_offer_cb, &snap);
      em_buf_release(snap.b);
    }
  }
  em__deliver(em__hub_take(s->hub, false));
}

/* The listener begins to stop: write what is queued, refuse the rest. */
static void em__on_stop(void *ud) {
  em_server *s = ud;
  em__deliver(em__hub_take(s->hub, true));
}

static void em__on_subscribe(em_server *s, em__conn *c, const em_msg *m) {
  em__conn_sub *sub = em__conn_sub_state(c);
  em__conn_set_subscribed(c);
  sub->waiting = true;
  sub->have = m->req_id;
  em__pub_snap snap = em__pub_current(s);
  if (snap.b) {
    em__pub_offer(s, c, snap.b, snap.len, snap.version);
    em_buf_release(snap.b);
  }
}

static int em__publish(em_server *s, em_payload *p, uint64_t *version_out);

int em_server_publish(em_server *s, em_payload *p, uint64_t *version_out) {
  if (em__forked_since(s->fork_gen)) return EM_EFORKED;
  atomic_fetch_add(&s->entered, 1);
  int rc = em__publish(s, p, version_out);
  atomic_fetch_sub(&s->entered, 1);
  return rc;
}

static int em__publish(em_server *s, em_payload *p, uint64_t *version_out) {
  if (atomic_load(&s->closed_for_publish)) return EM_ECLOSED;
  size_t cap = em__payload_iov_cap(p);
  struct iovec iov_small[9];
  struct iovec *iov = cap > 9 ? malloc(cap * sizeof *iov) : iov_small;
  if (!iov) return EM_ENOMEM;
  uint64_t frame_len;
  uint64_t ts[4] = {em_now_ns(), 0, 0, 0};
  /* the version is patched in below, under the lock that orders values */
  int n = em__payload_frame(p, EM_MSG_PUBLISH, 0, 0, ts, iov, &frame_len);
  int rc = n < 0 ? n : EM_OK;
  em_buf *b = NULL;
  if (!rc && frame_len > s->max_message_bytes) rc = EM_ETOOBIG;
  if (!rc && !(b = em__buf_alloc(s->pool, frame_len))) rc = EM_ENOMEM;
  if (!rc) {
    uint8_t *d = em_buf_data(b);
    for (int i = 0; i < n; i++) {
      memcpy(d, iov[i].iov_base, iov[i].iov_len);
      d += iov[i].iov_len;
    }
    pthread_mutex_lock(&s->pub_mu);
    uint64_t version = ++s->pub_version;
    em__put_u64(em_buf_data(b) + 8, version); /* req_id: see docs/protocol.md */
    em_buf *old = s->pub_buf;
    s->pub_buf = b;
    s->pub_len = frame_len;
    pthread_mutex_unlock(&s->pub_mu);
    if (old) em_buf_release(old);
    if (version_out) *version_out = version;
    atomic_store(&s->pub_dirty, true);
    em__listener_wake(s->l);
  }
  if (iov != iov_small) free(iov);
  return rc;
}

static void em__on_frame(void *ud, em__conn *c, em_msg *m) {
  em_server *s = ud;
  uint64_t t_recv = em_now_ns();
  int state = *em__conn_state(c);
  if (state != EM__CONN_READY) {
    if (state == EM__CONN_NEW) em__handshake(s, c, m);
    else em__authenticate(s, c, m);
    em_msg_free(m);
    return;
  }
  em_payload *p = &s->reply;
  if (m->type == EM_MSG_PING) {
    msgpack_pack_nil(&p->pk);
    uint64_t ts[4] = {0, t_recv, t_recv, t_recv};
    em__conn_send(c, p, EM_MSG_PONG, m->req_id, ts);
  } else if (m->type == EM_MSG_SUBSCRIBE) {
    em__on_subscribe(s, c, m);
  } else if (m->type == EM_MSG_REQUEST && !s->opts.handler) {
    em__pack_error(p, "edgeml.ProtocolError",
                   "this port serves broadcasts only (subscribe to it); send requests to the server's main port",
                   NULL);
    atomic_fetch_add(&s->n_errors, 1);
    uint64_t ts[4] = {0, t_recv, t_recv, t_recv};
    em__conn_send(c, p, EM_MSG_ERROR, m->req_id, ts);
  } else if (m->type == EM_MSG_REQUEST) {
    const char *why = NULL;
    /* one pass: a handler that reads the body with em_reader checks it as
     * it goes and says EM_EDECODE; others get a body checked here first */
    if (!s->opts.handler_checks_body && em__body_check(m, &why) != EM_OK) {
      atomic_fetch_add(&s->n_bad_bodies, 1);
      em__conn_close(c, EM_LOG_WARNING, why);
      em_msg_free(m);
      return;
    }
    atomic_fetch_add(&s->n_requests, 1);
    s->cur_req = m;
    s->cur_conn = c;
    s->cur_t_recv = t_recv;
    s->cur_pending = NULL;
    uint64_t t_start = em_now_ns();
    int type = s->opts.handler(s->opts.handler_ud, m, p);
    uint64_t t_end = em_now_ns();
    em_pending *pend = s->cur_pending; /* then it owns m: do not read m below */
    s->cur_req = NULL;
    s->cur_conn = NULL;
    s->cur_pending = NULL;
    if (pend && (type == EM_MSG_REPLY || type == EM_MSG_ERROR)) {
      em__listener_cbs lc = {.log = s->opts.log, .log_ud = s->opts.log_ud};
      em__log(&lc, EM_LOG_ERROR, "a handler deferred a request and returned a reply too: the reply is dropped "
                                 "(it comes through the em_pending)");
      type = EM_MSG_DEFER;
    }
    if (type == EM_MSG_DEFER) {
      em_payload_reset(p);
      if (!pend) em__conn_close(c, EM_LOG_WARNING, "the handler returned EM_MSG_DEFER without em_server_defer");
    } else if (type == EM_MSG_REPLY || type == EM_MSG_ERROR) {
      if (type == EM_MSG_ERROR) atomic_fetch_add(&s->n_errors, 1);
      uint64_t ts[4] = {0, t_recv, t_start, t_end};
      em__conn_send(c, p, (uint8_t)type, m->req_id, ts);
    } else if (type == EM_EDECODE) {
      em_payload_reset(p);
      atomic_fetch_add(&s->n_bad_bodies, 1);
      /* a deferred m may have been answered (and freed) on another thread */
      if (pend || em__body_check(m, &why) == EM_OK) why = "malformed body";
      em__conn_close(c, EM_LOG_WARNING, why);
    } else {
      em_payload_reset(p);
      em__conn_close(c, EM_LOG_WARNING, "the handler rejected a request");
    }
    if (pend) return; /* m is the pending's */
  } else {
    char why[64];
    snprintf(why, sizeof why, "unexpected message type %u", m->type);
    em__conn_close(c, EM_LOG_WARNING, why);
  }
  em_msg_free(m);
}

em_pending *em_server_defer(em_server *s, const em_msg *req) {
  if (!s || !req || req != s->cur_req || s->cur_pending) return NULL;
  em_pending *p = calloc(1, sizeof *p);
  if (!p) return NULL;
  if (!(p->conn = em__conn_ref_get(s->cur_conn))) {
    free(p);
    return NULL;
  }
  p->hub = s->hub;
  atomic_fetch_add(&p->hub->refs, 1);
  p->req = (em_msg *)req;
  p->req_id = req->req_id;
  p->t_recv = s->cur_t_recv;
  p->t_defer = em_now_ns();
  p->held = (int64_t)req->frame_bytes;
  em__conn_defer_add(s->cur_conn, 1, p->held);
  atomic_fetch_add(&p->hub->outstanding, 1);
  s->cur_pending = p;
  return p;
}

const em_msg *em_pending_request(const em_pending *p) { return p ? p->req : NULL; }

int em_pending_alive(const em_pending *p) {
  if (!p || em__forked_since(p->hub->fork_gen)) return 0;
  return !atomic_load(&p->hub->closed) && atomic_load(&p->conn->open);
}

/* Hand p (answered or dropped: req freed) to the loop thread, or free it
 * when the hub has closed. EM_OK or ECLOSED. Any thread. */
static int em__pending_queue(em_pending *p, bool is_error) {
  em__hub *h = p->hub;
  int rc = EM_ECLOSED;
  p->next = NULL;
  pthread_mutex_lock(&h->mu);
  if (!atomic_load(&h->closed)) {
    rc = EM_OK;
    bool was_empty = !h->head;
    if (h->tail) h->tail->next = p;
    else h->head = p;
    h->tail = p;
    if (is_error) atomic_fetch_add(&h->n_errors, 1); /* before the peer can see it */
    /* a non-empty queue has a wake on its way already; l is alive while
     * the hub is open (it closes at the listener's stop, under mu) */
    if (was_empty) em__listener_wake(h->l);
  }
  pthread_mutex_unlock(&h->mu);
  if (rc) em__pending_free(p);
  return rc;
}

/* Build the reply frame into p->frame (a copy: the payload's arrays are
 * not read after this). */
static int em__pending_build(em_pending *p, int type, em_payload *reply, uint64_t t3) {
  em__hub *h = p->hub;
  size_t cap = em__payload_iov_cap(reply);
  struct iovec iov_small[9];
  struct iovec *iov = cap > 9 ? malloc(cap * sizeof *iov) : iov_small;
  if (!iov) return EM_ENOMEM;
  uint64_t frame_len = 0;
  uint64_t ts[4] = {0 /* send time, set by the loop */, p->t_recv, p->t_defer, t3};
  int n = em__payload_frame(reply, (uint8_t)type, 0, p->req_id, ts, iov, &frame_len);
  int rc = n < 0 ? n : EM_OK;
  em_buf *b = NULL;
  if (!rc && frame_len > h->max_message_bytes) rc = EM_ETOOBIG;
  if (!rc && !(b = em__buf_alloc(h->pool, frame_len))) rc = EM_ENOMEM;
  if (!rc) {
    uint8_t *d = em_buf_data(b);
    for (int i = 0; i < n; i++) {
      memcpy(d, iov[i].iov_base, iov[i].iov_len);
      d += iov[i].iov_len;
    }
    p->frame = b;
    p->frame_len = frame_len;
  }
  if (iov != iov_small) free(iov);
  return rc;
}

int em_pending_reply(em_pending *p, int type, em_payload *reply) {
  uint64_t t3 = em_now_ns();
  if (!p) {
    if (reply) em_payload_reset(reply);
    return EM_EINVAL;
  }
  em__hub *h = p->hub;
  if (em__forked_since(h->fork_gen)) return EM_EFORKED; /* the parent's memory: touch nothing */
  atomic_fetch_sub(&h->outstanding, 1);
  int rc;
  if (!reply || (type != EM_MSG_REPLY && type != EM_MSG_ERROR)) rc = EM_EINVAL;
  else if (atomic_load(&h->closed)) rc = EM_ECLOSED;
  else if (!atomic_load(&p->conn->open)) rc = EM_ECONNCLOSED;
  else rc = em__pending_build(p, type, reply, t3);
  if (reply) em_payload_reset(reply); /* the caller's again (its release runs) */
  em_msg_free(p->req); /* after the build: the reply may borrow its arrays */
  p->req = NULL;
  if (rc && p->frame) { /* not sent: nothing is */
    em_buf_release(p->frame);
    p->frame = NULL;
  }
  /* even a failed reply goes to the loop, which gives the connection its
   * share of the pipelining back */
  int qrc = em__pending_queue(p, rc == EM_OK && type == EM_MSG_ERROR);
  return rc ? rc : qrc;
}

void em_pending_drop(em_pending *p) {
  if (!p || em__forked_since(p->hub->fork_gen)) return;
  atomic_fetch_sub(&p->hub->outstanding, 1);
  em_msg_free(p->req);
  p->req = NULL;
  em__pending_queue(p, false);
}

static int em__on_tick(void *ud) {
  em_server *s = ud;
  uint64_t now = em_mono_ns();
  uint64_t every = EM__MIN(EM__MIN(s->handshake_timeout_ns, s->progress_timeout_ns) / 4, 1000000000ull);
  if (now - s->last_sweep >= every) {
    /* ticks come every `every` or sooner unless a handler held the loop:
     * then the peers could not be read, and that time is not theirs */
    if (now - s->last_sweep > 2 * every + 100000000ull) em__listener_forgive(s->l, now - s->last_sweep - every);
    s->last_sweep = now;
    em__listener_foreach(s->l, em__sweep_one, s);
  }
  return s->opts.tick ? s->opts.tick(s->opts.tick_ud) : 0;
}

int em_server_open(em_server **out, const em_server_opts *opts) {
  *out = NULL;
  if (!opts) return EM_EINVAL;
  em_server *s = calloc(1, sizeof *s);
  if (!s) return EM_ENOMEM;
  s->opts = *opts;
  s->service = strdup(opts->service ? opts->service : "edgeml");
  if (opts->hello_info && opts->hello_info_len) {
    s->hello_info = malloc(opts->hello_info_len);
    if (s->hello_info) memcpy(s->hello_info, opts->hello_info, opts->hello_info_len);
  }
  if (em_payload_init(&s->reply) != EM_OK) {
    free(s->service);
    free(s->hello_info);
    free(s);
    return EM_ENOMEM;
  }
  s->max_message_bytes = opts->max_message_bytes ? opts->max_message_bytes : EM__DEFAULT_MAX_MESSAGE;
  s->epoch = em__random_u64();
  s->fork_gen = em__fork_gen();
  pthread_mutex_init(&s->pub_mu, NULL);
  em_pool *pool = em__pool_new(256u << 20);
  em__hub *hub = pool ? calloc(1, sizeof *hub) : NULL;
  if (hub) {
    atomic_init(&hub->refs, 1);
    pthread_mutex_init(&hub->mu, NULL);
    hub->pool = pool;
    em__pool_retain(pool);
    hub->max_message_bytes = s->max_message_bytes;
    hub->fork_gen = s->fork_gen;
  }
  s->handshake_timeout_ns = opts->handshake_timeout_ns ? opts->handshake_timeout_ns : 10000000000ull;
  s->progress_timeout_ns = opts->progress_timeout_ns ? opts->progress_timeout_ns : 30000000000ull;
  s->last_sweep = em_mono_ns();
  if (opts->token && opts->token[0] && !(s->token = strdup(opts->token))) {
    if (hub) em__hub_release(hub);
    if (pool) em__pool_release(pool);
    pthread_mutex_destroy(&s->pub_mu);
    free(s->service);
    free(s->hello_info);
    em_payload_destroy(&s->reply);
    free(s);
    return EM_ENOMEM;
  }
  s->opts.token = NULL; /* the caller's string; s->token is ours */
  /* the tick also closes connections that never finish the handshake */
  uint64_t sweep_ns = EM__MIN(EM__MIN(s->handshake_timeout_ns, s->progress_timeout_ns) / 4, 1000000000ull);
  uint64_t tick_ns = opts->tick && opts->tick_ns ? EM__MIN(opts->tick_ns, sweep_ns) : sweep_ns;
  em__listener_cbs cbs = {.ud = s, .on_frame = em__on_frame, .on_tick = em__on_tick,
                          .tick_ns = EM__MAX(tick_ns, 1000000ull), .on_wake = em__on_wake, .log = opts->log,
                          .log_ud = opts->log_ud, .max_pending_bytes = opts->max_pending_bytes,
                          .on_stop = em__on_stop};
  s->hub = hub;
  int rc = pool && hub ? EM_OK : EM_ENOMEM;
  if (!rc) {
    /* received frames from the caller's pool when given (a pinned pool:
     * em_cuda_pinned_pool), replies and broadcasts from the server's */
    rc = em__listener_open(&s->l, opts->host ? opts->host : "0.0.0.0", opts->port,
                           opts->recv_pool ? opts->recv_pool : pool, s->max_message_bytes, &cbs);
    if (!rc) {
      s->pool = pool;
      hub->l = s->l;
    }
  }
  if (rc) {
    if (hub) em__hub_release(hub);
    if (pool) em__pool_release(pool);
    pthread_mutex_destroy(&s->pub_mu);
    em_payload_destroy(&s->reply);
    free(s->service);
    free(s->hello_info);
    free(s->token);
    free(s);
    return rc;
  }
  *out = s;
  return EM_OK;
}

uint16_t em_server_port(const em_server *s) { return em__listener_port(s->l); }
int em_server_run(em_server *s) {
  int rc = em__listener_run(s->l);
  atomic_store(&s->closed_for_publish, true);
  return rc;
}
/* In a fork child the server's loop thread does not exist: stop and wait
 * must neither signal the parent's loop (the async handle's descriptor is
 * shared) nor wait for a thread that is not there. */
void em_server_stop(em_server *s) {
  if (em__forked_since(s->fork_gen)) return;
  atomic_fetch_add(&s->entered, 1);
  em__listener_stop(s->l);
  atomic_fetch_sub(&s->entered, 1);
}
int em_server_wait(em_server *s, uint64_t timeout_ns) {
  if (em__forked_since(s->fork_gen)) return EM_OK;
  atomic_fetch_add(&s->entered, 1);
  int rc = em__listener_wait(s->l, timeout_ns);
  atomic_fetch_sub(&s->entered, 1);
  return rc;
}
int em_server_forked(const em_server *s) { return em__forked_since(s->fork_gen); }
int em_server_on_loop_thread(const em_server *s) { return em__listener_on_loop_thread(s->l); }

void em_server_get_stats(const em_server *s, em_server_stats *st) {
  memset(st, 0, sizeof *st);
  if (em__forked_since(s->fork_gen)) return;
  atomic_fetch_add(&((em_server *)s)->entered, 1);
  em__listener_memory(s->l, &st->pending_bytes, &st->max_pending_bytes, &st->reads_paused);
  em__listener_counts(s->l, &st->connections_open, &st->connections_total, &st->protocol_errors);
  st->protocol_errors += atomic_load(&((em_server *)s)->n_bad_bodies);
  st->requests = atomic_load(&((em_server *)s)->n_requests);
  st->errors_sent = atomic_load(&((em_server *)s)->n_errors);
  st->auth_failures = atomic_load(&((em_server *)s)->n_auth_failures);
  st->stalled_closed = atomic_load(&((em_server *)s)->n_stalled);
  st->errors_sent += atomic_load(&s->hub->n_errors);
  st->deferred = atomic_load(&s->hub->outstanding);
  st->subscribers = em__listener_subscribers(s->l);
  st->publish_sends = atomic_load(&((em_server *)s)->n_pub_sends);
  pthread_mutex_lock(&((em_server *)s)->pub_mu);
  st->publishes = s->pub_version;
  pthread_mutex_unlock(&((em_server *)s)->pub_mu);
  atomic_fetch_sub(&((em_server *)s)->entered, 1);
}

void em_server_close(em_server *s) {
  if (!s) return;
  if (em__forked_since(s->fork_gen)) { /* a fork child: free the port, leave the rest (see em_server_stop) */
    em__listener_close_fds_in_child(s->l);
    return;
  }
  /* a thread woken in em_server_wait may still be on its way out */
  while (atomic_load(&s->entered) > 0) {
    struct timespec ts = {0, 200000};
    nanosleep(&ts, NULL);
  }
  em__listener_close(s->l); /* closes the hub (on_stop) if run never did */
  em_pending *left = em__hub_take(s->hub, true);
  while (left) { /* none: the hub closed at the loop's stop, with every connection */
    em_pending *n = left->next;
    em__pending_free(left);
    left = n;
  }
  em__hub_release(s->hub); /* pendings still held keep it until their reply or drop */
  if (s->pub_buf) em_buf_release(s->pub_buf);
  if (s->pool) em__pool_release(s->pool);
  pthread_mutex_destroy(&s->pub_mu);
  em_payload_destroy(&s->reply);
  free(s->service);
  free(s->hello_info);
  free(s->token);
  free(s);
}
