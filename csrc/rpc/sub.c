/* sub.c: a subscription to a server's broadcasts. No thread of its own:
 * the caller of em_sub_next asks for the next value (SUBSCRIBE with the
 * version it has) and reads it, so a slow consumer is never sent a
 * backlog: each value it gets is the newest the server had when it asked.
 *
 * Threads: em_sub_next runs on one thread at a time and owns the reader
 * and the connection; em_sub_shutdown may come from any thread and only
 * touches `closed` and shuts the socket down, under mu. */
#include "em_rpc.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

struct em_sub {
  char *host;
  char *service;
  uint16_t port;
  em_client_opts opts;
  em_pool *pool;
  em__reader reader;          /* em_sub_next's thread only */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int fd;                     /* -1 when disconnected; changed by next() under mu */
  bool closed;                /* guarded by mu */
  atomic_int connected;
  uint64_t have;              /* version of the last value returned */
  uint64_t epoch;             /* the server's, from its HELLO */
  bool asked;                 /* a SUBSCRIBE is outstanding on this connection */
  em__backoff backoff;        /* the reconnect policy (em_rpc.h); reset by a handshake */
  uint64_t next_dial_ns;      /* no re-dial before this (mono ns) */
  unsigned fork_gen;          /* em__fork_gen() at open (see client.c) */
};

static void em__sub_drop(em_sub *s) {
  pthread_mutex_lock(&s->mu);
  if (s->fd >= 0) close(s->fd);
  s->fd = -1;
  pthread_mutex_unlock(&s->mu);
  atomic_store(&s->connected, 0);
  em__reader_reset(&s->reader);
  s->asked = false;
  s->next_dial_ns = em_mono_ns() + em__backoff_next(&s->backoff);
}

static bool em__sub_closed(em_sub *s) {
  pthread_mutex_lock(&s->mu);
  bool c = s->closed;
  pthread_mutex_unlock(&s->mu);
  return c;
}

/* Dial and handshake; on success the connection is installed. */
static int em__sub_dial(em_sub *s, uint64_t deadline) {
  int fd = -1;
  em__hello_info info;
  int rc = em__hello_dial(s->host, s->port, s->service, "subscriber", s->opts.token, &s->reader, deadline,
                          s->opts.errbuf, s->opts.errbuf_len, &fd, &info);
  free(info.body);
  if (rc) return rc;
  pthread_mutex_lock(&s->mu);
  if (s->closed) {
    pthread_mutex_unlock(&s->mu);
    close(fd);
    return EM_ECLOSED;
  }
  s->fd = fd;
  pthread_mutex_unlock(&s->mu);
  if (info.epoch != s->epoch) { /* another server (or a restarted one): its versions start again */
    s->epoch = info.epoch;
    s->have = 0;
  }
  s->asked = false;
  em__backoff_reset(&s->backoff);
  atomic_store(&s->connected, 1);
  return EM_OK;
}

static int em__sub_dial_attempt(void *ud, uint64_t deadline) { return em__sub_dial(ud, deadline); }

int em_sub_open(em_sub **out, const char *host, uint16_t port, const em_client_opts *opts) {
  *out = NULL;
  em_sub *s = calloc(1, sizeof *s);
  if (!s) return EM_ENOMEM;
  if (opts) s->opts = *opts;
  s->host = strdup(host);
  s->service = s->opts.service ? strdup(s->opts.service) : NULL;
  if (s->opts.token) s->opts.token = strdup(s->opts.token);
  s->port = port;
  s->fd = -1;
  em__backoff_init(&s->backoff);
  s->fork_gen = em__fork_gen();
  pthread_mutex_init(&s->mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&s->cv, &ca);
  pthread_condattr_destroy(&ca);
  uint64_t max_frame = s->opts.max_message_bytes ? s->opts.max_message_bytes : EM__DEFAULT_MAX_MESSAGE;
  s->pool = em__pool_new(256u << 20);
  int rc = (s->pool && s->host) ? em__reader_init(&s->reader, s->pool, max_frame) : EM_ENOMEM;
  if (!rc) rc = em__open_retry(em__sub_dial_attempt, s, s->opts.connect_timeout_ns);
  if (rc) {
    if (opts && opts->errbuf && opts->errbuf_len && rc != EM_EHANDSHAKE)
      snprintf(opts->errbuf, opts->errbuf_len, "%s", em_strerror(rc));
    s->opts.errbuf = NULL;
    em_sub_close(s);
    return rc;
  }
  s->opts.errbuf = NULL; /* the caller's buffer is only valid during open */
  *out = s;
  return EM_OK;
}

/* Wait until `until` (mono ns) or shutdown. */
static void em__sub_sleep(em_sub *s, uint64_t until) {
  pthread_mutex_lock(&s->mu);
  while (!s->closed && em_mono_ns() < until) {
    uint64_t slice = EM__MIN(until, em_mono_ns() + 200000000ull);
    struct timespec ts = {.tv_sec = (time_t)(slice / 1000000000ull), .tv_nsec = (long)(slice % 1000000000ull)};
    pthread_cond_timedwait(&s->cv, &s->mu, &ts);
    if (s->opts.check_interrupt) break; /* let the caller check for signals */
  }
  pthread_mutex_unlock(&s->mu);
}

int em_sub_next(em_sub *s, uint64_t timeout_ns, em_msg **out) {
  *out = NULL;
  if (em__forked_since(s->fork_gen)) return EM_EFORKED;
  uint64_t deadline = em__deadline(timeout_ns);
  uint64_t dial_ns = s->opts.connect_timeout_ns ? s->opts.connect_timeout_ns : EM__HANDSHAKE_DEFAULT_NS;
  for (;;) {
    if (em__sub_closed(s)) return EM_ECLOSED;
    if (s->fd < 0) {
      uint64_t now = em_mono_ns();
      if (now < s->next_dial_ns) {
        if (deadline != EM_FOREVER && deadline <= now) return EM_ETIMEDOUT;
        em__sub_sleep(s, EM__MIN(s->next_dial_ns, deadline));
        if (s->opts.check_interrupt && s->opts.check_interrupt(s->opts.interrupt_ud)) return EM_EINTR;
        continue;
      }
      /* the handshake gets at least EM__REDIAL_HANDSHAKE_MIN_NS (500 ms)
       * even when this call's deadline is sooner: a re-dial timed to land
       * at the end of a call would otherwise be cut off every time (the
       * backoff can keep that phase), and the subscriber would never get back
       * to a restarted server */
      uint64_t floor = em__deadline(EM__REDIAL_HANDSHAKE_MIN_NS);
      int rc = em__sub_dial(s, EM__MIN(em__deadline(dial_ns), EM__MAX(deadline, floor)));
      if (rc) {
        if (rc == EM_ECLOSED) return rc;
        s->next_dial_ns = em_mono_ns() + em__backoff_next(&s->backoff);
        return rc;
      }
    }
    if (!s->asked) {
      em_payload p;
      if (em_payload_init(&p)) return EM_ENOMEM;
      msgpack_pack_nil(&p.pk);
      struct iovec iov[1];
      uint64_t flen;
      uint64_t ts[4] = {em_now_ns(), 0, 0, 0};
      int n = em__payload_frame(&p, EM_MSG_SUBSCRIBE, 0, s->have, ts, iov, &flen);
      int rc = n < 0 ? n : em__writev_all(s->fd, iov, n, deadline);
      em_payload_destroy(&p);
      if (rc) {
        em__sub_drop(s);
        return em__sub_closed(s) ? EM_ECLOSED : rc == EM_ETIMEDOUT ? EM_ETIMEDOUT : EM_ECONNCLOSED;
      }
      s->asked = true;
    }
    em_msg *m = NULL;
    const char *why = NULL;
    int r = em__read_frame(s->fd, &s->reader, deadline, &m, &why);
    if (r == 1) {
      if (m->type == EM_MSG_PUBLISH) {
        s->asked = false;
        if (m->req_id > s->have) {
          s->have = m->req_id;
          *out = m;
          return EM_OK;
        }
        em_msg_free(m); /* not newer: ask again */
        continue;
      }
      em_msg_free(m); /* e.g. an ERROR: this is not a broadcast port */
      em__sub_drop(s);
      return EM_EPROTO;
    }
    if (r == EM_EINTR) {
      if (s->opts.check_interrupt && s->opts.check_interrupt(s->opts.interrupt_ud)) return EM_EINTR;
      continue;
    }
    if (r == EM_ETIMEDOUT) return EM_ETIMEDOUT; /* still subscribed: the next call goes on waiting */
    em__sub_drop(s);
    if (em__sub_closed(s)) return EM_ECLOSED;
    return (r == EM_EPROTO || r == EM_ETOOBIG || r == EM_EVERSION || r == EM_ENOMEM) ? r : EM_ECONNCLOSED;
  }
}

int em_sub_connected(const em_sub *s) { return atomic_load(&((em_sub *)s)->connected); }

void em_sub_shutdown(em_sub *s) {
  if (em__forked_since(s->fork_gen)) return; /* the socket is the parent's too */
  pthread_mutex_lock(&s->mu);
  s->closed = true;
  if (s->fd >= 0) shutdown(s->fd, SHUT_RDWR);
  pthread_cond_broadcast(&s->cv);
  pthread_mutex_unlock(&s->mu);
}

void em_sub_close(em_sub *s) {
  if (!s) return;
  if (s->fd >= 0) close(s->fd);
  if (em__forked_since(s->fork_gen)) return; /* a fork child: leave the rest (see client.c) */
  em__reader_destroy(&s->reader);
  if (s->pool) em__pool_release(s->pool);
  pthread_mutex_destroy(&s->mu);
  pthread_cond_destroy(&s->cv);
  free(s->service);
  if (s->opts.token) {
    memset((char *)s->opts.token, 0, strlen(s->opts.token));
    free((char *)s->opts.token);
  }
  free(s->host);
  free(s);
}
