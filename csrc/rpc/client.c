/* client.c: an edgeml client: one TCP connection, calls multiplexed by
 * request id, and no I/O thread: each calling thread writes its own
 * request, and one waiting caller at a time (the "reader") reads frames
 * and hands replies to their callers (leader/follower). With a single call
 * in flight, the caller reads its own reply: no thread handoff at all.
 *
 * Locks: wmu (serialises writes and reconnects) is taken before mu (all
 * other state), and mu before smu (timing statistics only, held briefly).
 * The reader reads without holding mu.
 *
 * Lifetime: every public function that locks counts itself in `entered`
 * for its whole duration, so em_client_close (after waking everyone with
 * em_client_shutdown) frees only once the last thread has left, even one
 * that was still queued on wmu when close began.
 *
 * fork(): a child inherits the struct with mutexes that parent threads may
 * have held, and the socket the parent still uses. Every entry point first
 * checks the fork generation and, in a child, touches neither: calls fail
 * with EFORKED, close only closes the child's copy of the descriptor. */
#include "em_rpc.h"
#include "../timing/em_timing.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct em__slot {
  uint64_t id, gen;
  uint8_t type; /* what was sent: decides which replies can answer it */
  em_msg *reply;
  uint64_t recv_ns; /* t5: when the reader had the whole reply */
  int rc;
  bool done;
  struct em__slot *prev, *next;
} em__slot;

struct em_client {
  char *host;
  uint16_t port;
  em_client_opts opts;
  uint64_t max_frame;  /* largest frame we accept */
  uint64_t send_limit; /* largest frame the server accepts (from HELLO) */
  em_pool *pool;
  pthread_mutex_t wmu;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int fd;          /* -1 when disconnected; guarded by mu (+wmu to change) */
  uint64_t gen;    /* connection generation, guarded by mu */
  bool reader_busy, closed;
  bool broken;     /* the connection failed; re-dial at the next call */
  int users;       /* threads inside calls; guarded by mu */
  atomic_int entered; /* threads inside any locking entry point (see top) */
  unsigned fork_gen;  /* em__fork_gen() at open */
  em__reader reader; /* used only by the thread holding reader_busy */
  em__slot *slots;   /* guarded by mu */
  uint64_t next_id;  /* guarded by wmu */
  uint8_t *hello;
  size_t hello_len;
  /* timing, guarded by smu: never held across I/O, so stats() never waits
   * for a reconnect (mu may be held for a whole dial and handshake) */
  pthread_mutex_t smu;
  em__clock clock;
  em__hist hist[EM_STAGE_COUNT];
  uint64_t calls;
  uint64_t last_reply_mono;
  atomic_int synchronized;
  uint64_t last_io_mono; /* last write or read on the connection; guarded by mu */
};

/* The server closed (or reset) the connection while it was idle, e.g. it
 * restarted: its FIN is waiting on the socket. Checked before a call writes
 * when no other call is in flight and the connection has been idle for
 * 50 us (a back-to-back call loop pays nothing; no restart is that quick),
 * so such a call
 * re-dials instead of writing into a dead socket; a request that may have
 * reached a server is still never re-sent. mu held. */
static bool em__peer_gone(em_client *c) {
  uint64_t now = em_mono_ns();
  if (now - c->last_io_mono < 50000ull) return false; /* 50 us: less than any restart takes */
  c->last_io_mono = now;
  struct pollfd pfd = {.fd = c->fd, .events = POLLIN | POLLRDHUP};
  if (poll(&pfd, 1, 0) <= 0) return false;
  if (pfd.revents & (POLLRDHUP | POLLHUP | POLLERR)) return true;
  return false; /* readable: a late reply to a call that timed out, read by the next reader */
}

/* Frame types a server sends on a request connection after the handshake. */
static bool em__is_reply_type(uint8_t t) {
  return t == EM_MSG_REPLY || t == EM_MSG_ERROR || t == EM_MSG_OK || t == EM_MSG_PONG;
}

/* Whether a reply of type `got` can answer a request of type `sent`: a
 * REQUEST gets REPLY or ERROR, a PING gets PONG, other requests (from C
 * programs) REPLY, OK or ERROR. */
static bool em__answers(uint8_t sent, uint8_t got) {
  if (sent == EM_MSG_PING) return got == EM_MSG_PONG;
  if (sent == EM_MSG_REQUEST) return got == EM_MSG_REPLY || got == EM_MSG_ERROR;
  return got == EM_MSG_REPLY || got == EM_MSG_OK || got == EM_MSG_ERROR;
}

static void em__cond_wait_until(pthread_cond_t *cv, pthread_mutex_t *mu, uint64_t deadline_mono) {
  if (deadline_mono == EM_FOREVER) {
    /* wake up now and then so a missed broadcast can never hang a caller */
    deadline_mono = em_mono_ns() + 1000000000ull;
  }
  struct timespec ts = {.tv_sec = (time_t)(deadline_mono / 1000000000ull), .tv_nsec = (long)(deadline_mono % 1000000000ull)};
  pthread_cond_timedwait(cv, mu, &ts);
}

/* Fail every call on the current connection and drop it. mu held. The fd
 * is shut down here and closed by the next reconnect (no reader or writer
 * can be using it by then). */
static void em__break(em_client *c, int rc) {
  if (c->fd >= 0) shutdown(c->fd, SHUT_RDWR);
  c->broken = true;
  c->gen++;
  for (em__slot *s = c->slots; s; s = s->next) {
    if (!s->done) {
      s->done = true;
      s->rc = rc;
    }
  }
  pthread_cond_broadcast(&c->cv);
}

/* Dial and handshake. wmu and mu held, no reader active. */
static int em__connect(em_client *c, uint64_t deadline) {
  if (c->fd >= 0) {
    close(c->fd);
    c->fd = -1;
  }
  int fd = -1;
  em__hello_info info;
  int rc = em__hello_dial(c->host, c->port, c->opts.service, "client", c->opts.token, &c->reader, deadline,
                          c->opts.errbuf, c->opts.errbuf_len, &fd, &info);
  if (rc == EM_OK || rc == EM_EHANDSHAKE) {
    free(c->hello);
    c->hello = info.body;
    c->hello_len = info.body_len;
  }
  if (rc) return rc;
  c->send_limit = info.send_limit;
  c->fd = fd;
  c->broken = false;
  return EM_OK;
}

static int em__connect_attempt(void *ud, uint64_t deadline) { return em__connect(ud, deadline); }

/* Re-dial at a call after the connection broke. A refused connect (a server
 * restarting) is retried with the reconnect policy's backoff (em_rpc.h) for
 * up to connect_timeout, within the call's deadline (connect_timeout 0: one
 * attempt); em_client_shutdown ends the wait at once. wmu and mu held (mu
 * is released while waiting). */
static int em__reconnect(em_client *c, uint64_t deadline) {
  uint64_t start = em_mono_ns();
  uint64_t until = c->opts.connect_timeout_ns ? em__deadline(c->opts.connect_timeout_ns) : start;
  if (deadline != EM_FOREVER && deadline < until) until = deadline;
  em__backoff b;
  em__backoff_init(&b);
  /* one dial and handshake waits at most connect_timeout (or the default) */
  uint64_t attempt_until = em__deadline(c->opts.connect_timeout_ns ? c->opts.connect_timeout_ns
                                                                   : EM__HANDSHAKE_DEFAULT_NS);
  if (deadline < attempt_until) attempt_until = deadline;
  for (;;) {
    int rc = em__connect(c, attempt_until);
    if (rc != EM_ECONNREFUSED) return rc;
    uint64_t wait = em__backoff_next(&b), now = em_mono_ns();
    if (now + wait > until) return rc; /* never wait past the window */
    uint64_t wake = now + wait;
    while (!c->closed && em_mono_ns() < wake) em__cond_wait_until(&c->cv, &c->mu, wake);
    if (c->closed) return EM_ECLOSED;
  }
}

int em_client_open(em_client **out, const char *host, uint16_t port, const em_client_opts *opts) {
  *out = NULL;
  em_client *c = calloc(1, sizeof *c);
  if (c) c->last_reply_mono = em_mono_ns();
  if (!c) return EM_ENOMEM;
  if (opts) c->opts = *opts;
  c->host = strdup(host);
  if (c->opts.service) c->opts.service = strdup(c->opts.service);
  if (c->opts.token) c->opts.token = strdup(c->opts.token);
  c->port = port;
  c->fd = -1;
  c->fork_gen = em__fork_gen();
  c->next_id = 1;
  c->max_frame = c->opts.max_message_bytes ? c->opts.max_message_bytes : EM__DEFAULT_MAX_MESSAGE;
  c->pool = em__pool_new(256u << 20);
  pthread_mutex_init(&c->wmu, NULL);
  pthread_mutex_init(&c->mu, NULL);
  pthread_mutex_init(&c->smu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&c->cv, &ca);
  pthread_condattr_destroy(&ca);
  int rc = (c->pool && c->host) ? em__reader_init(&c->reader, c->pool, c->max_frame) : EM_ENOMEM;
  if (!rc) {
    pthread_mutex_lock(&c->wmu);
    pthread_mutex_lock(&c->mu);
    rc = em__open_retry(em__connect_attempt, c, c->opts.connect_timeout_ns);
    pthread_mutex_unlock(&c->mu);
    pthread_mutex_unlock(&c->wmu);
  }
  if (rc) {
    if (opts && opts->errbuf && opts->errbuf_len && rc != EM_EHANDSHAKE)
      snprintf(opts->errbuf, opts->errbuf_len, "%s", em_strerror(rc));
    c->opts.errbuf = NULL;
    em_client_close(c);
    return rc;
  }
  c->opts.errbuf = NULL; /* the caller's buffer is only valid during open */
  *out = c;
  return EM_OK;
}

const uint8_t *em_client_server_hello(em_client *c, size_t *len) {
  *len = c->hello_len;
  return c->hello;
}

/* Feed a finished call's timestamps to the clock filter and the stats, and
 * fill *out. Takes smu. */
static void em__client_account(em_client *c, uint8_t type, const em_msg *m, uint64_t t0, uint64_t t5,
                               uint64_t bytes_up, em_call_timing *out) {
  em_call_timing t;
  memset(&t, 0, sizeof t);
  em__timing_fill(&t, m->ts_ns, t0, t5, bytes_up, m->frame_bytes);
  uint64_t now = em_mono_ns();
  pthread_mutex_lock(&c->smu);
  int64_t off;
  uint64_t delay;
  if (em__timing_sample(&t, &off, &delay)) em__clock_add(&c->clock, off, delay, now);
  em__clock_sample best = {0};
  em__clock_best(&c->clock, now, &best);
  em__timing_stages(&t, best.offset, best.delay / 2, atomic_load(&c->synchronized));
  c->last_reply_mono = now;
  if (type != EM_MSG_PING) { /* pings only feed the clock */
    c->calls++;
    for (int i = 0; i < EM_STAGE_COUNT; i++)
      if (i != EM_STAGE_ENCODE && i != EM_STAGE_DECODE) em__hist_add(&c->hist[i], t.stage[i]);
  }
  pthread_mutex_unlock(&c->smu);
  if (out) *out = t;
}

int em_client_request(em_client *c, uint8_t type, em_payload *p, uint64_t timeout_ns, em_msg **reply) {
  return em_client_request_timed(c, type, p, timeout_ns, reply, NULL);
}

static int em__request(em_client *c, uint8_t type, em_payload *p, uint64_t timeout_ns, em_msg **reply,
                       em_call_timing *timing);

int em_client_request_timed(em_client *c, uint8_t type, em_payload *p, uint64_t timeout_ns, em_msg **reply,
                            em_call_timing *timing) {
  *reply = NULL;
  if (em__forked_since(c->fork_gen)) return EM_EFORKED;
  atomic_fetch_add(&c->entered, 1);
  int rc = em__request(c, type, p, timeout_ns, reply, timing);
  atomic_fetch_sub(&c->entered, 1); /* the last touch of c */
  return rc;
}

static int em__request(em_client *c, uint8_t type, em_payload *p, uint64_t timeout_ns, em_msg **reply,
                       em_call_timing *timing) {
  uint64_t t0 = 0, bytes_up = 0;
  uint64_t deadline = em__deadline(timeout_ns);
  em__slot slot;
  memset(&slot, 0, sizeof slot);
  struct iovec iov_small[9];
  struct iovec *iov = iov_small;
  size_t cap = em__payload_iov_cap(p);
  if (cap > 9 && !(iov = malloc(cap * sizeof *iov))) return EM_ENOMEM;

  pthread_mutex_lock(&c->wmu);
  pthread_mutex_lock(&c->mu);
  if (c->closed) {
    pthread_mutex_unlock(&c->mu);
    pthread_mutex_unlock(&c->wmu);
    if (iov != iov_small) free(iov);
    return EM_ECLOSED;
  }
  c->users++;
  int rc = EM_OK;
  if (c->fd >= 0 && !c->broken && !c->slots && !c->reader_busy && em__peer_gone(c)) em__break(c, EM_ECONNCLOSED);
  if (c->fd < 0 || c->broken) {
    while (c->reader_busy) em__cond_wait_until(&c->cv, &c->mu, deadline);
    rc = em__reconnect(c, deadline);
  }
  uint64_t gen = c->gen;
  if (!rc) {
    slot.id = c->next_id++;
    slot.gen = gen;
    slot.type = type;
    slot.next = c->slots;
    if (c->slots) c->slots->prev = &slot;
    c->slots = &slot;
  }
  int fd = c->fd;
  pthread_mutex_unlock(&c->mu);
  if (!rc) {
    uint64_t frame_len;
    t0 = em_now_ns();
    uint64_t ts[4] = {t0, 0, 0, 0};
    int n = em__payload_frame(p, type, 0, slot.id, ts, iov, &frame_len);
    bytes_up = frame_len;
    if (n < 0) rc = n;
    else if (frame_len > c->send_limit) rc = EM_ETOOBIG; /* the server would refuse it */
    else rc = em__writev_all(fd, iov, n, deadline);
    if (rc && n >= 0 && rc != EM_ETOOBIG) {
      /* part of a frame may be out: the stream is unusable */
      pthread_mutex_lock(&c->mu);
      if (c->gen == gen) em__break(c, rc == EM_ETIMEDOUT ? EM_ECONNCLOSED : rc);
      pthread_mutex_unlock(&c->mu);
    }
  }
  pthread_mutex_unlock(&c->wmu);
  if (iov != iov_small) free(iov);

  pthread_mutex_lock(&c->mu);
  if (rc) goto out; /* (slot may be registered; removed below) */
  for (;;) {
    if (slot.done) {
      rc = slot.rc;
      break;
    }
    if (c->closed) {
      rc = EM_ECLOSED;
      break;
    }
    if (!c->reader_busy) {
      c->reader_busy = true;
      int rfd = c->fd;
      uint64_t rgen = c->gen;
      pthread_mutex_unlock(&c->mu);
      em_msg *m = NULL;
      const char *why = NULL;
      int r = em__read_frame(rfd, &c->reader, deadline, &m, &why);
      if (r == EM_EINTR && (!c->opts.check_interrupt || c->opts.check_interrupt(c->opts.interrupt_ud) == 0))
        r = 0; /* a signal that asks nothing of us: keep going */
      uint64_t t5 = r == 1 ? em_now_ns() : 0;
      pthread_mutex_lock(&c->mu);
      c->reader_busy = false;
      c->last_io_mono = em_mono_ns();
      if (r == 1 && !em__is_reply_type(m->type)) {
        /* PUBLISH, HELLO, a request...: not something a server sends on a
         * request connection. Trust nothing more from this stream. */
        em_msg_free(m);
        if (c->gen == rgen) em__break(c, EM_EPROTO);
      } else if (r == 1) {
        for (em__slot *s = c->slots; s; s = s->next) {
          if (s->id == m->req_id && s->gen == rgen && !s->done) {
            s->done = true;
            if (em__answers(s->type, m->type)) {
              s->reply = m;
              s->recv_ns = t5;
              s->rc = EM_OK;
              m = NULL;
            } else { /* e.g. an OK to a REQUEST: the stream is not to be trusted */
              s->rc = EM_EPROTO;
              em__break(c, EM_EPROTO);
            }
            break;
          }
        }
        em_msg_free(m); /* a reply nobody waits for (its caller timed out) */
      } else if (r == EM_EINTR) {
        rc = EM_EINTR;
        pthread_cond_broadcast(&c->cv);
        break;
      } else if (r == EM_ETIMEDOUT || r == 0) {
        /* our deadline: give the reader role to someone else */
      } else if (c->closed) {
        rc = EM_ECLOSED;
        break;
      } else if (c->gen == rgen) {
        em__break(c, r == EM_ENOMEM || r == EM_ETOOBIG || r == EM_EPROTO || r == EM_EVERSION ? r : EM_ECONNCLOSED);
      }
      pthread_cond_broadcast(&c->cv);
      if (!slot.done && deadline != EM_FOREVER && em_mono_ns() >= deadline) {
        rc = EM_ETIMEDOUT;
        break;
      }
      continue;
    }
    if (deadline != EM_FOREVER && em_mono_ns() >= deadline) {
      rc = EM_ETIMEDOUT;
      break;
    }
    em__cond_wait_until(&c->cv, &c->mu, deadline);
  }
out:
  /* a connection error caused by close (its shutdown of the socket) is
   * reported as what it is */
  if (c->closed && rc != EM_OK && rc != EM_EREMOTE && rc != EM_EINTR) rc = EM_ECLOSED;
  if (slot.id) { /* unlink */
    if (slot.prev) slot.prev->next = slot.next;
    else if (c->slots == &slot) c->slots = slot.next;
    if (slot.next) slot.next->prev = slot.prev;
  }
  c->users--;
  pthread_cond_broadcast(&c->cv);
  pthread_mutex_unlock(&c->mu);
  if ((rc == EM_OK || rc == EM_EREMOTE) && slot.reply)
    em__client_account(c, type, slot.reply, t0, slot.recv_ns, bytes_up, timing);
  if (rc == EM_OK && slot.reply) {
    if (slot.reply->type == EM_MSG_ERROR) rc = EM_EREMOTE;
    *reply = slot.reply;
  } else if (slot.reply) {
    em_msg_free(slot.reply);
  }
  return rc;
}

void em_client_set_synchronized(em_client *c, int yes) { atomic_store(&c->synchronized, yes ? 1 : 0); }

void em_client_note(em_client *c, int stage, int64_t value) {
  if (stage < 0 || stage >= EM_STAGE_COUNT || em__forked_since(c->fork_gen)) return;
  atomic_fetch_add(&c->entered, 1);
  pthread_mutex_lock(&c->smu);
  em__hist_add(&c->hist[stage], value);
  pthread_mutex_unlock(&c->smu);
  atomic_fetch_sub(&c->entered, 1);
}

void em_client_get_stats(em_client *c, em_client_stats *st) {
  memset(st, 0, sizeof *st);
  if (em__forked_since(c->fork_gen)) return; /* smu may be held by a thread of the parent */
  atomic_fetch_add(&c->entered, 1);
  pthread_mutex_lock(&c->smu);
  st->calls = c->calls;
  for (int i = 0; i < EM_STAGE_COUNT; i++) em__hist_summary(&c->hist[i], &st->stage[i]);
  uint64_t now = em_mono_ns();
  em__clock_sample best;
  int n = em__clock_best(&c->clock, now, &best);
  st->synchronized = atomic_load(&c->synchronized);
  if (n) {
    st->offset_samples = (uint64_t)n;
    st->offset_ns = st->synchronized ? 0 : best.offset;
    st->offset_err_ns = st->synchronized ? 0 : best.delay / 2;
    st->offset_age_ns = now - best.mono;
  }
  pthread_mutex_unlock(&c->smu);
  atomic_fetch_sub(&c->entered, 1);
}

void em_client_reset_stats(em_client *c) {
  if (em__forked_since(c->fork_gen)) return;
  atomic_fetch_add(&c->entered, 1);
  pthread_mutex_lock(&c->smu);
  c->calls = 0;
  memset(c->hist, 0, sizeof c->hist);
  pthread_mutex_unlock(&c->smu);
  atomic_fetch_sub(&c->entered, 1);
}

uint64_t em_client_idle_ns(em_client *c) {
  if (em__forked_since(c->fork_gen)) return 0;
  atomic_fetch_add(&c->entered, 1);
  pthread_mutex_lock(&c->smu);
  uint64_t last = c->last_reply_mono, now = em_mono_ns();
  pthread_mutex_unlock(&c->smu);
  atomic_fetch_sub(&c->entered, 1);
  return now - last;
}

int em_client_forked(const em_client *c) { return em__forked_since(c->fork_gen); }

void em_client_shutdown(em_client *c) {
  if (em__forked_since(c->fork_gen)) return; /* never shut the parent's socket down */
  atomic_fetch_add(&c->entered, 1);
  pthread_mutex_lock(&c->mu);
  c->closed = true;
  if (c->fd >= 0) shutdown(c->fd, SHUT_RDWR);
  pthread_cond_broadcast(&c->cv);
  pthread_mutex_unlock(&c->mu);
  atomic_fetch_sub(&c->entered, 1);
}

void em_client_close(em_client *c) {
  if (!c) return;
  if (em__forked_since(c->fork_gen)) {
    /* In a fork child: drop this process's copy of the socket and leave
     * the rest (its locks may be held forever); the parent is unaffected. */
    if (c->fd >= 0) close(c->fd);
    return;
  }
  em_client_shutdown(c);
  pthread_mutex_lock(&c->mu);
  while (c->users > 0) em__cond_wait_until(&c->cv, &c->mu, em_mono_ns() + 100000000ull);
  pthread_mutex_unlock(&c->mu);
  /* threads woken by the shutdown may still be on their way out (or just
   * arriving at wmu): wait until none is inside */
  while (atomic_load(&c->entered) > 0) {
    struct timespec ts = {0, 200000};
    nanosleep(&ts, NULL);
  }
  if (c->fd >= 0) close(c->fd);
  em__reader_destroy(&c->reader);
  if (c->pool) em__pool_release(c->pool);
  pthread_mutex_destroy(&c->wmu);
  pthread_mutex_destroy(&c->mu);
  pthread_mutex_destroy(&c->smu);
  pthread_cond_destroy(&c->cv);
  free(c->hello);
  free((char *)c->opts.service);
  if (c->opts.token) {
    memset((char *)c->opts.token, 0, strlen(c->opts.token));
    free((char *)c->opts.token);
  }
  free(c->host);
  free(c);
}
