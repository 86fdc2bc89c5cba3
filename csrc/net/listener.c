/* listener.c: the libuv side of a server: listen, accept, read frames,
 * write replies (uv_try_write first, queued remainder), stop and close.
 *
 * Everything here runs on the loop thread except em__listener_stop,
 * em__listener_wake and em__listener_wait, which only touch `mu`, `state`
 * and the async handle, and em__conn_ref_release (an atomic count). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "em_net.h"

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <uv.h>

#define EM__MAX_WRITE_QUEUE (64u << 20) /* pause reading a conn above this */
#define EM__STOP_GRACE_NS 5000000000ull /* wait this long for queued writes */

enum { EM__L_OPEN, EM__L_RUNNING, EM__L_STOPPING, EM__L_DONE };

struct em__conn {
  uv_tcp_t tcp;            /* loop thread only */
  em__listener *l;
  em__reader reader;
  int pending_writes;
  bool closing, close_after_writes, reading;
  bool mem_wait;           /* paused: its next frame does not fit the budget */
  bool pause_counted;      /* this pause is in n_paused already */
  int state;               /* for the layer above (handshake) */
  em__conn_sub sub;        /* for the layer above (broadcast) */
  uint64_t accepted_mono;  /* em_mono_ns() at accept */
  uint64_t progress_mono;  /* last time its frame in progress advanced by
                              EM__PROGRESS_BYTES, or it was between frames */
  uint64_t progress_bytes; /* read since progress_mono */
  uint8_t scratch[32];     /* for the layer above (handshake nonces) */
  uint64_t id;             /* unique in the listener, from 1 */
  em__conn_ref *ref;       /* NULL until the first em__conn_ref_get */
  int deferred;            /* requests taken for a later reply (em__conn_defer_add) */
  int64_t deferred_bytes;  /* and their frames' bytes */
  char peer[64];
  em__conn *prev, *next;   /* l->conns list */
};

struct em__listener {
  uv_loop_t loop;
  uv_tcp_t server;
  uv_async_t async;
  uv_timer_t tick, grace;
  em__listener_cbs cbs;
  em_pool *pool;
  uint64_t max_frame;
  uint16_t port;
  em__conn *conns;
  int nhandles_closing;
  bool grace_active;
  pthread_t loop_thread;
  int rc;                      /* run's result */
  pthread_mutex_t mu;          /* guards state */
  pthread_cond_t cv;
  int state;
  atomic_bool stop_requested;
  atomic_bool wake_pending;
  atomic_ullong n_open, n_total, n_proto, n_subs;
  em__budget budget;           /* loop thread (held is atomic for stats) */
  uint64_t last_released;      /* budget.released when waiters were last retried */
  int n_mem_wait;              /* conns with mem_wait set */
  uint64_t last_conn_id;
  bool retrying;
  atomic_ullong n_paused;
};

uint64_t em__default_pending_bytes(void) {
  long pages = sysconf(_SC_PHYS_PAGES), psize = sysconf(_SC_PAGESIZE);
  uint64_t ram = pages > 0 && psize > 0 ? (uint64_t)pages * (uint64_t)psize : (2ull << 30);
  return EM__MAX(ram / 8, 256ull << 20);
}

void em__log(const em__listener_cbs *cbs, int level, const char *fmt, ...) {
  char msg[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (cbs->log) cbs->log(cbs->log_ud, level, msg);
  else em__log_stderr(NULL, level, msg);
}

static void em__close_handle(em__listener *l, uv_handle_t *h);
static void em__retry_waiters(em__listener *l);

static void em__conn_free_cb(uv_handle_t *h) {
  em__conn *c = (em__conn *)h;
  em__listener *l = c->l;
  if (c->ref) { /* holders (deferred replies) see a closed connection from now on */
    c->ref->c = NULL;
    em__conn_ref_release(c->ref);
  }
  em__reader_destroy(&c->reader); /* gives back its share of the budget */
  atomic_fetch_sub(&l->n_open, 1);
  if (c->sub.subscribed) atomic_fetch_sub(&l->n_subs, 1);
  free(c);
  em__retry_waiters(l);
}

static void em__conn_really_close(em__conn *c) {
  if (c->closing) return;
  c->closing = true;
  if (c->ref) atomic_store(&c->ref->open, false);
  em__listener *l = c->l;
  if (c->mem_wait) {
    c->mem_wait = false;
    l->n_mem_wait--;
  }
  if (c->prev) c->prev->next = c->next;
  else l->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  uv_close((uv_handle_t *)&c->tcp, em__conn_free_cb);
  if (!l->conns && l->grace_active) {
    l->grace_active = false;
    em__close_handle(l, (uv_handle_t *)&l->grace);
  }
}

void em__conn_close(em__conn *c, int level, const char *why) {
  if (c->closing || c->close_after_writes) return;
  if (c->ref) atomic_store(&c->ref->open, false); /* no deferred reply can go out now */
  if (why) em__log(&c->l->cbs, level, "closing connection from %s: %s", c->peer, why);
  if (c->reading) {
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = false;
  }
  if (c->mem_wait) {
    c->mem_wait = false;
    c->l->n_mem_wait--;
  }
  /* nothing more is read from c: give its unfinished frame (and its share
   * of the budget) back now, not when its queued replies have drained,
   * which a peer that never reads can put off for ever. Paused peers are
   * retried by the caller's path (read_cb, write_cb, tick), never here:
   * this may run inside a handler. */
  em__reader_reset(&c->reader);
  if (c->pending_writes) c->close_after_writes = true;
  else em__conn_really_close(c);
}

int *em__conn_state(em__conn *c) { return &c->state; }
uint8_t *em__conn_scratch(em__conn *c) { return c->scratch; }
void em__conn_open_up(em__conn *c) { c->reader.max_frame = c->l->max_frame; }
uint64_t em__conn_age_ns(const em__conn *c) { return em_mono_ns() - c->accepted_mono; }
bool em__conn_closing(const em__conn *c) { return c->closing || c->close_after_writes; }
em__conn_sub *em__conn_sub_state(em__conn *c) { return &c->sub; }

void em__conn_set_subscribed(em__conn *c) {
  if (c->sub.subscribed) return;
  c->sub.subscribed = true;
  atomic_fetch_add(&c->l->n_subs, 1);
}

uint64_t em__listener_subscribers(const em__listener *l) { return atomic_load(&((em__listener *)l)->n_subs); }

void em__listener_foreach(em__listener *l, void (*fn)(void *ud, em__conn *c), void *ud) {
  em__conn *c = l->conns;
  while (c) {
    em__conn *n = c->next; /* fn may close c */
    if (!c->closing && !c->close_after_writes) fn(ud, c);
    c = n;
  }
}
const char *em__conn_peer(const em__conn *c) { return c->peer; }

em__conn_ref *em__conn_ref_get(em__conn *c) {
  if (!c->ref) {
    em__conn_ref *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    atomic_init(&r->refs, 1); /* c's own, released when c is freed */
    atomic_init(&r->open, !em__conn_closing(c));
    r->c = c;
    r->id = c->id;
    c->ref = r;
  }
  atomic_fetch_add(&c->ref->refs, 1);
  return c->ref;
}

void em__conn_ref_release(em__conn_ref *r) {
  if (r && atomic_fetch_sub(&r->refs, 1) == 1) free(r);
}

static bool em__conn_defer_full(const em__conn *c) {
  return c->deferred >= EM__MAX_DEFERRED || c->deferred_bytes >= (int64_t)EM__MAX_DEFERRED_BYTES;
}

static void em__alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)suggested;
  em__conn *c = (em__conn *)h;
  uint8_t *p;
  size_t n;
  em__reader_region(&c->reader, &p, &n);
  buf->base = (char *)p;
  buf->len = n;
}

static void em__read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf);
static void em__conn_process(em__conn *c);

static void em__resume_reading(em__conn *c) {
  if (!c->reading && !c->closing && !c->close_after_writes && !c->mem_wait && !em__conn_defer_full(c) &&
      uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) < EM__MAX_WRITE_QUEUE &&
      !atomic_load(&c->l->stop_requested)) {
    if (uv_read_start((uv_stream_t *)&c->tcp, em__alloc_cb, em__read_cb) == 0) {
      c->reading = true;
      c->progress_mono = em_mono_ns(); /* a pause of ours is not the peer's stall */
      c->progress_bytes = 0;
    }
  }
}

static void em__read_cb(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  (void)buf;
  em__conn *c = (em__conn *)s;
  if (nread < 0) {
    if (nread == UV_EOF) {
      if (em__reader_mid_frame(&c->reader))
        em__conn_close(c, EM_LOG_WARNING, "peer closed the connection in the middle of a frame");
      else
        em__conn_close(c, EM_LOG_DEBUG, NULL);
    } else {
      em__conn_close(c, EM_LOG_INFO, uv_strerror((int)nread));
    }
    return;
  }
  if (nread == 0) return;
  em__reader_commit(&c->reader, (size_t)nread);
  c->progress_bytes += (uint64_t)nread;
  em__conn_process(c);
  if (c->progress_bytes >= EM__PROGRESS_BYTES || !em__reader_mid_frame(&c->reader)) {
    c->progress_mono = em_mono_ns();
    c->progress_bytes = 0;
  }
  em__retry_waiters(c->l);
}

void em__listener_forgive(em__listener *l, uint64_t gap_ns) {
  for (em__conn *c = l->conns; c; c = c->next) c->progress_mono += gap_ns;
}

bool em__conn_stalled(const em__conn *c, uint64_t now, uint64_t timeout_ns) {
  return c->reading && !c->mem_wait && em__reader_mid_frame(&c->reader) && now > c->progress_mono &&
         now - c->progress_mono > timeout_ns;
}

/* Hand every whole frame buffered on c to on_frame. Stops reading c when
 * its replies queue up (a slow reader) or when its next frame does not fit
 * the memory budget (it then waits on the listener's list until another
 * frame completes or a connection closes). */
static void em__conn_process(em__conn *c) {
  for (;;) {
    if (c->closing || c->close_after_writes) return;
    em_msg *m = NULL;
    const char *why = NULL;
    int rc = em__reader_next(&c->reader, &m, &why);
    if (rc == 0) break;
    if (rc == EM__READER_WAIT) {
      if (c->reading) uv_read_stop((uv_stream_t *)&c->tcp);
      c->reading = false;
      if (!c->mem_wait) {
        c->mem_wait = true;
        c->l->n_mem_wait++;
      }
      if (!c->pause_counted) { /* once per pause, not per retry */
        c->pause_counted = true;
        atomic_fetch_add(&c->l->n_paused, 1);
        em__log(&c->l->cbs, EM_LOG_DEBUG, "pausing %s: %llu bytes held in unfinished frames (limit %llu)",
                c->peer, (unsigned long long)atomic_load(&c->l->budget.held),
                (unsigned long long)c->l->budget.limit);
      }
      return;
    }
    if (rc < 0) {
      atomic_fetch_add(&c->l->n_proto, 1);
      em__conn_close(c, EM_LOG_WARNING, why);
      return;
    }
    c->l->cbs.on_frame(c->l->cbs.ud, c, m);
    if (uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) >= EM__MAX_WRITE_QUEUE || em__conn_defer_full(c)) {
      /* slow reader, or too many requests awaiting deferred replies: stop
       * taking its requests */
      if (c->reading) uv_read_stop((uv_stream_t *)&c->tcp);
      c->reading = false;
      return; /* em__conn_unpause processes the rest once it drains */
    }
  }
}

/* Memory was given back: let paused connections try their next frame. */
static void em__retry_waiters(em__listener *l) {
  if (!l->n_mem_wait || l->retrying || l->budget.released == l->last_released ||
      atomic_load(&l->stop_requested))
    return;
  l->retrying = true;
  while (l->n_mem_wait && l->budget.released != l->last_released) {
    l->last_released = l->budget.released;
    em__conn *c = l->conns;
    while (c) {
      em__conn *n = c->next; /* processing may close c */
      if (c->mem_wait) {
        c->mem_wait = false;
        l->n_mem_wait--;
        em__conn_process(c);
        if (!c->mem_wait) c->pause_counted = false; /* admitted */
        em__resume_reading(c);
      }
      c = n;
    }
  }
  l->retrying = false;
}

static void em__on_connection(uv_stream_t *server, int status) {
  em__listener *l = server->data;
  if (status < 0) {
    em__log(&l->cbs, EM_LOG_WARNING, "accept failed: %s", uv_strerror(status));
    return;
  }
  em__conn *c = calloc(1, sizeof *c);
  /* until the layer above raises it (handshake done), frames are small */
  if (!c || em__reader_init(&c->reader, l->pool, EM__MIN(l->max_frame, (uint64_t)EM__HANDSHAKE_MAX_FRAME))) {
    free(c);
    em__log(&l->cbs, EM_LOG_ERROR, "out of memory accepting a connection");
    return;
  }
  c->l = l;
  c->id = ++l->last_conn_id;
  c->reader.budget = &l->budget;
  c->accepted_mono = em_mono_ns();
  c->progress_mono = c->accepted_mono;
  uv_tcp_init(&l->loop, &c->tcp);
  if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
    em__reader_destroy(&c->reader);
    c->reader.stage = NULL;
    uv_close((uv_handle_t *)&c->tcp, (uv_close_cb)free);
    return;
  }
  atomic_fetch_add(&l->n_open, 1);
  atomic_fetch_add(&l->n_total, 1);
  uv_tcp_nodelay(&c->tcp, 1);
  struct sockaddr_storage ss;
  int len = sizeof ss;
  snprintf(c->peer, sizeof c->peer, "?");
  if (uv_tcp_getpeername(&c->tcp, (struct sockaddr *)&ss, &len) == 0) {
    char ip[48];
    if (ss.ss_family == AF_INET6) {
      uv_ip6_name((struct sockaddr_in6 *)&ss, ip, sizeof ip);
      snprintf(c->peer, sizeof c->peer, "[%s]:%u", ip, ntohs(((struct sockaddr_in6 *)&ss)->sin6_port));
    } else {
      uv_ip4_name((struct sockaddr_in *)&ss, ip, sizeof ip);
      snprintf(c->peer, sizeof c->peer, "%s:%u", ip, ntohs(((struct sockaddr_in *)&ss)->sin_port));
    }
  }
  c->next = l->conns;
  if (l->conns) l->conns->prev = c;
  l->conns = c;
  em__resume_reading(c);
}

/* A paused connection (its replies queued up, or its deferred requests)
 * may go on: first the requests already buffered (the peer may have sent
 * everything; the stage may be full), then read again. Loop thread, never
 * from inside on_frame. */
static void em__conn_unpause(em__conn *c) {
  if (!c->closing && !c->close_after_writes && !c->reading && !c->mem_wait && !em__conn_defer_full(c) &&
      uv_stream_get_write_queue_size((uv_stream_t *)&c->tcp) < EM__MAX_WRITE_QUEUE &&
      !atomic_load(&c->l->stop_requested)) {
    em__conn_process(c);
    em__resume_reading(c);
    em__retry_waiters(c->l);
  }
}

void em__conn_defer_add(em__conn *c, int n, int64_t bytes) {
  bool was_full = em__conn_defer_full(c);
  c->deferred += n;
  c->deferred_bytes += bytes;
  if (c->deferred < 0) c->deferred = 0;
  if (c->deferred_bytes < 0) c->deferred_bytes = 0;
  if (n < 0 && was_full && !em__conn_defer_full(c)) em__conn_unpause(c);
}

typedef struct em__wreq {
  uv_write_t req;
  em__conn *c;
  em_buf *buf;  /* a shared frame (em__conn_send_buf), or NULL: */
  em_payload p; /* the payload whose buffers are being written */
} em__wreq;

static void em__write_cb(uv_write_t *req, int status) {
  em__wreq *w = (em__wreq *)req;
  em__conn *c = w->c;
  if (w->buf) em_buf_release(w->buf);
  else em_payload_destroy(&w->p);
  free(w);
  c->pending_writes--;
  if (status < 0 && status != UV_ECANCELED) em__conn_close(c, EM_LOG_INFO, uv_strerror(status));
  if (c->pending_writes == 0 && c->close_after_writes) {
    em__conn_really_close(c);
  } else {
    em__conn_unpause(c); /* a slow reader's queue may have drained */
  }
}

int em__conn_send(em__conn *c, em_payload *p, uint8_t type, uint64_t req_id, const uint64_t ts_ns[4]) {
  if (c->closing) {
    em_payload_reset(p);
    return EM_ECLOSED;
  }
  struct iovec iov_small[9];
  struct iovec *iov = iov_small;
  size_t cap = em__payload_iov_cap(p);
  if (cap > 9) iov = malloc(cap * sizeof *iov);
  if (!iov) {
    em_payload_reset(p);
    return EM_ENOMEM;
  }
  uint64_t frame_len;
  int n = em__payload_frame(p, type, 0, req_id, ts_ns, iov, &frame_len);
  int rc = EM_OK;
  if (n < 0) {
    rc = n;
    goto done;
  }
  em__payload_set_ts(p, 0, em_now_ns()); /* ts[0] of every frame: its send time */
  size_t written = 0;
  if (c->pending_writes == 0) {
    int w = uv_try_write((uv_stream_t *)&c->tcp, (uv_buf_t *)iov, (unsigned)n);
    if (w > 0) written = (size_t)w;
    else if (w < 0 && w != UV_EAGAIN) {
      rc = EM_ECONNCLOSED;
      em__conn_close(c, EM_LOG_INFO, uv_strerror(w));
      goto done;
    }
  }
  if (written == frame_len) goto done;
  /* skip what went out; queue the rest, keeping the payload's memory */
  int i = 0;
  while (i < n && written >= iov[i].iov_len) written -= iov[i++].iov_len;
  iov[i].iov_base = (char *)iov[i].iov_base + written;
  iov[i].iov_len -= written;
  em__wreq *wr = malloc(sizeof *wr);
  if (!wr) {
    rc = EM_ENOMEM;
    em__conn_close(c, EM_LOG_ERROR, "out of memory queueing a reply");
    goto done;
  }
  wr->c = c;
  wr->buf = NULL;
  wr->p = *p; /* take over the buffers and the release hook */
  if (em_payload_init(p)) { /* caller gets a fresh, empty payload */
    memset(p, 0, sizeof *p);
  }
  int r = uv_write(&wr->req, (uv_stream_t *)&c->tcp, (uv_buf_t *)(iov + i), (unsigned)(n - i), em__write_cb);
  if (r < 0) {
    em_payload_destroy(&wr->p);
    free(wr);
    em__conn_close(c, EM_LOG_INFO, uv_strerror(r));
    rc = EM_ECONNCLOSED;
  } else {
    c->pending_writes++;
  }
  if (iov != iov_small) free(iov);
  return rc;
done:
  if (iov != iov_small) free(iov);
  em_payload_reset(p);
  return rc;
}

int em__conn_send_buf(em__conn *c, em_buf *b, size_t len) {
  if (c->closing || c->close_after_writes) return EM_ECLOSED;
  size_t written = 0;
  if (c->pending_writes == 0) {
    uv_buf_t ub = {.base = (char *)em_buf_data(b), .len = len};
    int w = uv_try_write((uv_stream_t *)&c->tcp, &ub, 1);
    if (w > 0) written = (size_t)w;
    else if (w < 0 && w != UV_EAGAIN) {
      em__conn_close(c, EM_LOG_INFO, uv_strerror(w));
      return EM_ECONNCLOSED;
    }
  }
  if (written == len) return EM_OK;
  em__wreq *wr = calloc(1, sizeof *wr);
  if (!wr) {
    em__conn_close(c, EM_LOG_ERROR, "out of memory queueing a broadcast");
    return EM_ENOMEM;
  }
  wr->c = c;
  wr->buf = em_buf_retain(b);
  uv_buf_t ub = {.base = (char *)em_buf_data(b) + written, .len = len - written};
  int r = uv_write(&wr->req, (uv_stream_t *)&c->tcp, &ub, 1, em__write_cb);
  if (r < 0) {
    em_buf_release(wr->buf);
    free(wr);
    em__conn_close(c, EM_LOG_INFO, uv_strerror(r));
    return EM_ECONNCLOSED;
  }
  c->pending_writes++;
  return EM_OK;
}

/* ------------------------------------------------------------- listener */

static void em__handle_closed(uv_handle_t *h) {
  em__listener *l = h->loop->data;
  l->nhandles_closing--;
}

static void em__close_handle(em__listener *l, uv_handle_t *h) {
  if (!uv_is_closing(h)) {
    l->nhandles_closing++;
    uv_close(h, em__handle_closed);
  }
}

static void em__grace_cb(uv_timer_t *t) {
  em__listener *l = t->data;
  if (l->conns) em__log(&l->cbs, EM_LOG_WARNING, "stop: dropping replies still queued after %u s",
                        (unsigned)(EM__STOP_GRACE_NS / 1000000000ull));
  while (l->conns) em__conn_really_close(l->conns); /* closes the timer with the last */
}

/* Stop accepting, stop reading, let queued replies drain, then close all. */
static void em__begin_stop(em__listener *l) {
  pthread_mutex_lock(&l->mu);
  bool first = l->state == EM__L_RUNNING;
  l->state = EM__L_STOPPING;
  pthread_mutex_unlock(&l->mu);
  if (!first) return;
  atomic_store(&l->stop_requested, true);
  em__close_handle(l, (uv_handle_t *)&l->server);
  em__close_handle(l, (uv_handle_t *)&l->async);
  if (l->cbs.on_tick) em__close_handle(l, (uv_handle_t *)&l->tick);
  if (l->cbs.on_stop) l->cbs.on_stop(l->cbs.ud); /* last frames (deferred replies) */
  em__conn *c = l->conns;
  while (c) {
    em__conn *n = c->next;
    em__conn_close(c, EM_LOG_DEBUG, NULL);
    c = n;
  }
  if (l->conns) { /* some still have writes queued */
    uv_timer_init(&l->loop, &l->grace);
    l->grace.data = l;
    uv_timer_start(&l->grace, em__grace_cb, EM__STOP_GRACE_NS / 1000000, 0);
    l->grace_active = true;
  }
}

static void em__async_cb(uv_async_t *a) {
  em__listener *l = a->data;
  if (atomic_load(&l->stop_requested)) {
    em__begin_stop(l);
    return;
  }
  if (atomic_exchange(&l->wake_pending, false) && l->cbs.on_wake) l->cbs.on_wake(l->cbs.ud);
}

static void em__tick_cb(uv_timer_t *t) {
  em__listener *l = t->data;
  if (l->cbs.on_tick(l->cbs.ud)) {
    l->rc = EM_EINTR;
    em__begin_stop(l);
    return;
  }
  em__retry_waiters(l); /* the tick may have closed stalled peers, freeing budget */
}

/* libuv writes with write(2): a reply to a peer that has gone would raise
 * SIGPIPE, whose default action kills the process. A server must survive
 * that (the write fails with EPIPE and the connection closes), so the first
 * server of a process ignores SIGPIPE unless the program installed a
 * handler of its own (Python ignores it already). */
static void em__ignore_sigpipe_once(void) {
  struct sigaction sa;
  if (sigaction(SIGPIPE, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL && !(sa.sa_flags & SA_SIGINFO)) {
    signal(SIGPIPE, SIG_IGN);
  }
}

int em__listener_open(em__listener **out, const char *host, uint16_t port, em_pool *pool,
                      uint64_t max_frame, const em__listener_cbs *cbs) {
  *out = NULL;
  static pthread_once_t sigpipe_once = PTHREAD_ONCE_INIT;
  pthread_once(&sigpipe_once, em__ignore_sigpipe_once);
  em__listener *l = calloc(1, sizeof *l);
  if (!l) return EM_ENOMEM;
  int r = uv_loop_init(&l->loop);
  if (r) {
    free(l);
    return EM_EIO;
  }
  l->loop.data = l;
  l->cbs = *cbs;
  l->pool = pool;
  em__pool_retain(pool);
  l->max_frame = max_frame;
  l->budget.limit = cbs->max_pending_bytes ? cbs->max_pending_bytes : em__default_pending_bytes();
  pthread_mutex_init(&l->mu, NULL);
  pthread_cond_init(&l->cv, NULL);
  uv_tcp_init(&l->loop, &l->server);
  l->server.data = l;
  struct sockaddr_storage ss;
  int rc = EM_OK;
  if (uv_ip4_addr(host, port, (struct sockaddr_in *)&ss) != 0 &&
      uv_ip6_addr(host, port, (struct sockaddr_in6 *)&ss) != 0) {
    rc = EM_ERESOLVE;
  } else if ((r = uv_tcp_bind(&l->server, (struct sockaddr *)&ss, 0)) != 0 ||
             (r = uv_listen((uv_stream_t *)&l->server, 511, em__on_connection)) != 0) {
    rc = (r == UV_EADDRINUSE) ? EM_EADDRINUSE : (r == UV_EADDRNOTAVAIL ? EM_ERESOLVE : EM_EIO);
  }
  if (rc) {
    em__close_handle(l, (uv_handle_t *)&l->server);
    uv_run(&l->loop, UV_RUN_DEFAULT);
    uv_loop_close(&l->loop);
    em__pool_release(l->pool);
    pthread_mutex_destroy(&l->mu);
    pthread_cond_destroy(&l->cv);
    free(l);
    return rc;
  }
  int len = sizeof ss;
  uv_tcp_getsockname(&l->server, (struct sockaddr *)&ss, &len);
  l->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                           : ((struct sockaddr_in *)&ss)->sin_port);
  uv_async_init(&l->loop, &l->async, em__async_cb);
  l->async.data = l;
  if (cbs->on_tick) {
    uv_timer_init(&l->loop, &l->tick);
    l->tick.data = l;
  }
  l->state = EM__L_OPEN;
  *out = l;
  return EM_OK;
}

uint16_t em__listener_port(const em__listener *l) { return l->port; }

int em__listener_run(em__listener *l) {
  pthread_mutex_lock(&l->mu);
  if (l->state != EM__L_OPEN) {
    pthread_mutex_unlock(&l->mu);
    return EM_ECLOSED;
  }
  l->state = EM__L_RUNNING;
  l->loop_thread = pthread_self();
  pthread_mutex_unlock(&l->mu);
  if (l->cbs.on_tick) {
    uint64_t ms = l->cbs.tick_ns / 1000000;
    uv_timer_start(&l->tick, em__tick_cb, ms ? ms : 1, ms ? ms : 1);
  }
  if (atomic_load(&l->stop_requested)) em__begin_stop(l);
  else if (atomic_load(&l->wake_pending)) uv_async_send(&l->async);
  uv_run(&l->loop, UV_RUN_DEFAULT);
  /* Everything is closed once uv_run returns: listener, async, conns. */
  pthread_mutex_lock(&l->mu);
  l->state = EM__L_DONE;
  pthread_cond_broadcast(&l->cv);
  pthread_mutex_unlock(&l->mu);
  return l->rc;
}

void em__listener_stop(em__listener *l) {
  atomic_store(&l->stop_requested, true);
  pthread_mutex_lock(&l->mu);
  if (l->state == EM__L_RUNNING) uv_async_send(&l->async);
  pthread_mutex_unlock(&l->mu);
}

void em__listener_wake(em__listener *l) {
  atomic_store(&l->wake_pending, true);
  pthread_mutex_lock(&l->mu);
  if (l->state == EM__L_RUNNING) uv_async_send(&l->async);
  pthread_mutex_unlock(&l->mu);
}

bool em__listener_on_loop_thread(const em__listener *l) {
  return l->state == EM__L_RUNNING || l->state == EM__L_STOPPING
             ? pthread_equal(l->loop_thread, pthread_self()) != 0
             : false;
}

int em__listener_wait(em__listener *l, uint64_t timeout_ns) {
  uint64_t deadline = timeout_ns == EM_FOREVER ? EM_FOREVER : em_now_ns() + timeout_ns;
  pthread_mutex_lock(&l->mu);
  int rc = EM_OK;
  while (l->state == EM__L_RUNNING || l->state == EM__L_STOPPING) {
    if (deadline == EM_FOREVER) {
      pthread_cond_wait(&l->cv, &l->mu);
    } else {
      struct timespec ts = {.tv_sec = (time_t)(deadline / 1000000000ull), .tv_nsec = (long)(deadline % 1000000000ull)};
      if (pthread_cond_timedwait(&l->cv, &l->mu, &ts) != 0 && em_now_ns() >= deadline) {
        rc = EM_ETIMEDOUT;
        break;
      }
    }
  }
  pthread_mutex_unlock(&l->mu);
  return rc;
}

void em__listener_close_fds_in_child(em__listener *l) {
  /* the parent's sockets: drop this process's copies (a copy of the
   * listening socket would keep the port bound, a connection's would keep
   * it open after the parent closes it); touch nothing else */
  uv_os_fd_t fd;
  for (em__conn *c = l->conns; c; c = c->next)
    if (uv_fileno((uv_handle_t *)&c->tcp, &fd) == 0) close(fd);
  if (uv_fileno((uv_handle_t *)&l->server, &fd) == 0) close(fd);
  int bfd = uv_backend_fd(&l->loop);
  if (bfd >= 0) close(bfd);
}

void em__listener_close(em__listener *l) {
  if (!l) return;
  if (l->state == EM__L_OPEN) { /* never ran: close the handles here */
    l->state = EM__L_RUNNING;
    em__begin_stop(l);
    uv_run(&l->loop, UV_RUN_DEFAULT);
  }
  uv_loop_close(&l->loop);
  em__pool_release(l->pool);
  pthread_mutex_destroy(&l->mu);
  pthread_cond_destroy(&l->cv);
  free(l);
}

void em__listener_counts(const em__listener *l, uint64_t *open, uint64_t *total, uint64_t *proto) {
  *open = atomic_load(&((em__listener *)l)->n_open);
  *total = atomic_load(&((em__listener *)l)->n_total);
  *proto = atomic_load(&((em__listener *)l)->n_proto);
}

void em__listener_memory(const em__listener *l, uint64_t *pending_bytes, uint64_t *limit, uint64_t *paused) {
  *pending_bytes = atomic_load(&((em__listener *)l)->budget.held);
  *limit = l->budget.limit;
  *paused = atomic_load(&((em__listener *)l)->n_paused);
}
