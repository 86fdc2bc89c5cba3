/* test_defer.c: deferred replies (em_server_defer, em_pending_*): a
 * handler that defers every request and worker threads that answer them
 * out of order, four at once, for several clients with many requests in
 * flight each; clients that go away meanwhile; stop and close with replies
 * outstanding; drop, alive, error replies, replies that fail to build,
 * large replies, timestamps, and a connection's pipelining limit.
 *
 * Only the main thread CHECKs (em_test.h's counters are not atomic): other
 * threads count what went wrong in `bad` and the main thread checks it. */
#include "../rpc/em_rpc.h"
#include "em_test.h"

#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

static atomic_int bad; /* failures seen off the main thread */
#define BAD_IF(cond)                                                            \
  do {                                                                          \
    if (cond) {                                                                 \
      atomic_fetch_add(&bad, 1);                                                \
      fprintf(stderr, "%s:%d: off-main-thread failure: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                           \
  } while (0)

/* ---- between the handler (loop thread) and the workers / the test */
#define MAX_HELD 8192
typedef struct item {
  em_pending *p;
  uint64_t seq; /* arrival order */
  struct item *next;
} item;

static struct {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  item *head, *tail;
  bool quit;
  em_pending *held[MAX_HELD]; /* "hold" requests, answered by the test itself */
  int nheld;
  uint64_t seq;
} Q = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static void q_reset(void) {
  pthread_mutex_lock(&Q.mu);
  Q.head = Q.tail = NULL;
  Q.quit = false;
  Q.nheld = 0;
  Q.seq = 0;
  pthread_mutex_unlock(&Q.mu);
}

static int nheld(void) {
  pthread_mutex_lock(&Q.mu);
  int n = Q.nheld;
  pthread_mutex_unlock(&Q.mu);
  return n;
}

static em_pending *held(int i) {
  pthread_mutex_lock(&Q.mu);
  em_pending *p = Q.held[i];
  pthread_mutex_unlock(&Q.mu);
  return p;
}

/* Body [method, payload]. "now" is answered at once; "baddefer" returns
 * EM_MSG_DEFER without deferring; "hold" is deferred and kept for the test;
 * everything else is deferred to the workers ("echo", "fail", "big",
 * "slow"). */
static int handler(void *ud, const em_msg *req, em_payload *reply) {
  em_server *s = *(em_server **)ud;
  em_value mv, pv;
  if (em_msg_request(req, &mv, &pv) != EM_OK) return EM_EDECODE;
  if (em_value_is(&mv, "now")) {
    em_put_int(reply, 7);
    return EM_MSG_REPLY;
  }
  if (em_value_is(&mv, "baddefer")) return EM_MSG_DEFER;
  em_pending *p = em_server_defer(s, req);
  if (!p) return -1;
  BAD_IF(em_server_defer(s, req) != NULL); /* once per request */
  BAD_IF(em_pending_request(p) != req);
  BAD_IF(!em_pending_alive(p));
  pthread_mutex_lock(&Q.mu);
  if (em_value_is(&mv, "hold")) {
    if (Q.nheld < MAX_HELD) Q.held[Q.nheld++] = p;
    else em_pending_drop(p);
  } else {
    item *it = malloc(sizeof *it);
    it->p = p;
    it->seq = Q.seq++;
    it->next = NULL;
    if (Q.tail) Q.tail->next = it;
    else Q.head = it;
    Q.tail = it;
    pthread_cond_signal(&Q.cv);
  }
  pthread_mutex_unlock(&Q.mu);
  return EM_MSG_DEFER;
}

/* Answer one request the way its method asks. */
static void answer(em_pending *p, em_payload *out) {
  em_value mv, pv;
  const em_msg *m = em_pending_request(p);
  BAD_IF(em_msg_request(m, &mv, &pv) != EM_OK);
  int type = EM_MSG_REPLY;
  float *big = NULL;
  size_t nbig = 0;
  if (em_value_is(&mv, "fail")) {
    em_payload_begin_error(out, "ValueError", "asked to fail", NULL, 0);
    type = EM_MSG_ERROR;
  } else if (em_value_is(&mv, "big")) { /* {"a": float32[n], "b": uint8[n]} */
    int64_t n = 0;
    em_value_int(&pv, &n);
    nbig = (size_t)n;
    big = malloc(nbig * sizeof(float) + nbig);
    uint8_t *b8 = (uint8_t *)(big + nbig);
    for (size_t i = 0; i < nbig; i++) {
      big[i] = (float)i;
      b8[i] = (uint8_t)(i * 7);
    }
    uint64_t shape[1] = {nbig};
    em_put_map(out, 2);
    em_put_cstr(out, "a");
    em_put_ndarray(out, "<f4", 1, shape, big, nbig * sizeof(float));
    em_put_cstr(out, "b");
    em_put_ndarray(out, "|u1", 1, shape, b8, nbig);
  } else {
    if (em_value_is(&mv, "slow")) sleep_ms(30);
    em_put_value(out, &pv); /* may borrow arrays of the request */
  }
  int rc = em_pending_reply(p, type, out);
  BAD_IF(rc != EM_OK && rc != EM_ECONNCLOSED);
  BAD_IF(em_payload_error(out) != EM_OK);
  if (big) { /* the frame was copied: this memory is ours again */
    memset(big, 0xff, nbig * sizeof(float) + nbig);
    free(big);
  }
}

static void *worker(void *arg) {
  (void)arg;
  em_payload *out = em_payload_new();
  for (;;) {
    pthread_mutex_lock(&Q.mu);
    while (!Q.head && !Q.quit) pthread_cond_wait(&Q.cv, &Q.mu);
    if (!Q.head) {
      pthread_mutex_unlock(&Q.mu);
      break;
    }
    pthread_mutex_unlock(&Q.mu);
    usleep(300); /* let a batch gather */
    em_pending *batch[16];
    int n = 0;
    pthread_mutex_lock(&Q.mu);
    while (Q.head && n < 16) {
      item *it = Q.head;
      Q.head = it->next;
      if (!Q.head) Q.tail = NULL;
      batch[n++] = it->p;
      free(it);
    }
    pthread_mutex_unlock(&Q.mu);
    /* answered newest first: out of arrival order */
    for (int i = n - 1; i >= 0; i--) answer(batch[i], out);
  }
  em_payload_free(out);
  return NULL;
}

/* Arrival order vs answer order: the handler numbers requests; a worker
 * answering request k after some request > k counts an inversion. The
 * workers answer each batch in reverse, so with batches of 2+ there are. */
static atomic_ullong inversions, max_answered;
static void note_answer(uint64_t seq) {
  uint64_t m = atomic_load(&max_answered);
  if (seq < m) atomic_fetch_add(&inversions, 1);
  while (seq > m && !atomic_compare_exchange_weak(&max_answered, &m, seq)) {
  }
}

static void quiet_log(void *ud, int level, const char *msg) {
  (void)ud;
  (void)level;
  (void)msg;
}

typedef struct {
  em_server *s;
  pthread_t th;
  pthread_t workers[4];
  int nworkers;
} srv;

static void *run_thread(void *s) {
  em_server_run(s);
  return NULL;
}

static em_server *the_server; /* handler_ud points here */

static int start(srv *v, int nworkers, uint64_t max_message_bytes) {
  q_reset();
  em_server_opts o;
  em_server_opts_init(&o);
  o.host = "127.0.0.1";
  o.service = "test";
  o.handler = handler;
  o.handler_ud = &the_server;
  o.handler_checks_body = 1; /* the handler reads with em_msg_request */
  o.log = quiet_log;
  o.max_message_bytes = max_message_bytes;
  int rc = em_server_open(&v->s, &o);
  if (rc) return rc;
  the_server = v->s; /* before the loop thread starts: it reads it */
  pthread_create(&v->th, NULL, run_thread, v->s);
  v->nworkers = nworkers;
  for (int i = 0; i < nworkers; i++) pthread_create(&v->workers[i], NULL, worker, NULL);
  return EM_OK;
}

static void stop_workers(srv *v) {
  pthread_mutex_lock(&Q.mu);
  Q.quit = true;
  pthread_cond_broadcast(&Q.cv);
  pthread_mutex_unlock(&Q.mu);
  for (int i = 0; i < v->nworkers; i++) pthread_join(v->workers[i], NULL);
  v->nworkers = 0;
}

static void stop(srv *v) {
  stop_workers(v);
  em_server_stop(v->s);
  CHECK_EQ(em_server_wait(v->s, 10000000000ull), EM_OK);
  pthread_join(v->th, NULL);
  em_server_close(v->s);
}

static em_client *dial(srv *v) {
  em_client *c = NULL;
  em_client_opts co;
  em_client_opts_init(&co);
  co.service = "test";
  int rc = em_client_open(&c, "127.0.0.1", em_server_port(v->s), &co);
  return rc ? NULL : c;
}

/* Call method with an int; *out gets an int reply (if any). */
static int call_int(em_client *c, const char *method, int64_t v, uint64_t timeout_ns, int64_t *out) {
  em_payload *p = em_payload_new();
  em_payload_begin_request(p, method, strlen(method));
  em_put_int(p, v);
  em_msg *r = NULL;
  int rc = em_client_request(c, EM_MSG_REQUEST, p, timeout_ns, &r);
  em_payload_free(p);
  if (rc == EM_OK && out) {
    em_value val;
    if (em_msg_value(r, &val) != EM_OK || em_value_int(&val, out) != EM_OK) rc = EM_EDECODE;
  }
  em_msg_free(r);
  return rc;
}

/* ------------------------------------------------------------- tests */

typedef struct {
  em_client *c;
  int base, n;
} caller_arg;

static void *caller(void *arg) {
  caller_arg *a = arg;
  for (int i = 0; i < a->n; i++) {
    int64_t v = -1, want = (int64_t)a->base + i;
    int rc = call_int(a->c, i % 10 == 9 ? "now" : "echo", want, 20000000000ull, &v);
    BAD_IF(rc != EM_OK);
    BAD_IF(rc == EM_OK && v != (i % 10 == 9 ? 7 : want));
  }
  return NULL;
}

/* worker wrapper that also measures the answer order */
static void *ordered_worker(void *arg) {
  (void)arg;
  em_payload *out = em_payload_new();
  for (;;) {
    pthread_mutex_lock(&Q.mu);
    while (!Q.head && !Q.quit) pthread_cond_wait(&Q.cv, &Q.mu);
    if (!Q.head) {
      pthread_mutex_unlock(&Q.mu);
      break;
    }
    pthread_mutex_unlock(&Q.mu);
    usleep(300);
    item *batch[16];
    int n = 0;
    pthread_mutex_lock(&Q.mu);
    while (Q.head && n < 16) {
      item *it = Q.head;
      Q.head = it->next;
      if (!Q.head) Q.tail = NULL;
      batch[n++] = it;
    }
    pthread_mutex_unlock(&Q.mu);
    for (int i = n - 1; i >= 0; i--) {
      note_answer(batch[i]->seq);
      answer(batch[i]->p, out);
      free(batch[i]);
    }
  }
  em_payload_free(out);
  return NULL;
}

/* 3 clients x 4 threads x 150 calls, all deferred (but every tenth,
 * answered at once), answered by 4 workers at once, newest first. */
static void test_many_in_flight_out_of_order(void) {
  srv v;
  CHECK_EQ(start(&v, 0, 0), EM_OK);
  atomic_store(&inversions, 0);
  atomic_store(&max_answered, 0);
  for (int i = 0; i < 4; i++) pthread_create(&v.workers[i], NULL, ordered_worker, NULL);
  v.nworkers = 4;
  enum { NC = 3, NT = 4, N = 150 };
  em_client *cs[NC];
  pthread_t th[NC * NT];
  caller_arg args[NC * NT];
  for (int i = 0; i < NC; i++) {
    cs[i] = dial(&v);
    CHECK(cs[i] != NULL);
  }
  int bad0 = atomic_load(&bad);
  for (int i = 0; i < NC * NT; i++) {
    args[i] = (caller_arg){.c = cs[i / NT], .base = i * 100000, .n = N};
    pthread_create(&th[i], NULL, caller, &args[i]);
  }
  for (int i = 0; i < NC * NT; i++) pthread_join(th[i], NULL);
  CHECK_EQ(atomic_load(&bad), bad0);
  CHECK(atomic_load(&inversions) > 0);
  em_server_stats st;
  em_server_get_stats(v.s, &st);
  CHECK_EQ(st.requests, NC * NT * N);
  CHECK_EQ(st.deferred, 0);
  CHECK_EQ(st.connections_open, NC);
  for (int i = 0; i < NC; i++) em_client_close(cs[i]);
  stop(&v);
}

static void test_errors_large_and_timestamps(void) {
  srv v;
  CHECK_EQ(start(&v, 2, 0), EM_OK);
  em_client *c = dial(&v);
  CHECK(c != NULL);
  int bad0 = atomic_load(&bad);
  /* an error reply */
  em_payload *p = em_payload_new();
  em_payload_begin_request(p, "fail", 4);
  em_put_nil(p);
  em_msg *r = NULL;
  CHECK_EQ(em_client_request(c, EM_MSG_REQUEST, p, 10000000000ull, &r), EM_EREMOTE);
  char why[128] = "";
  CHECK(r && em_msg_error(r, why, sizeof why) == EM_OK);
  CHECK(strstr(why, "ValueError: asked to fail") != NULL);
  em_msg_free(r);
  em_server_stats st;
  em_server_get_stats(v.s, &st);
  CHECK_EQ(st.errors_sent, 1);

  /* a large reply built by a worker: 6M floats + 6M bytes (30 MB) */
  size_t n = 6u << 20;
  em_payload_reset(p);
  em_payload_begin_request(p, "big", 3);
  em_put_int(p, (int64_t)n);
  r = NULL;
  CHECK_EQ(em_client_request(c, EM_MSG_REQUEST, p, 30000000000ull, &r), EM_OK);
  em_value val, a, b;
  CHECK(r && em_msg_value(r, &val) == EM_OK);
  CHECK_EQ(em_value_get(&val, "a", &a), 1);
  CHECK_EQ(em_value_get(&val, "b", &b), 1);
  em_array aa, ab;
  CHECK_EQ(em_value_ndarray(&a, &aa), EM_OK);
  CHECK_EQ(em_value_ndarray(&b, &ab), EM_OK);
  CHECK_EQ(aa.shape[0], n);
  CHECK_EQ(ab.shape[0], n);
  const float *fa = aa.data;
  const uint8_t *fb = ab.data;
  size_t wrong = 0;
  for (size_t i = 0; i < n; i++) wrong += fa[i] != (float)i || fb[i] != (uint8_t)(i * 7);
  CHECK_EQ(wrong, 0);
  em_msg_free(r);

  /* a large echo: the reply borrows the request's arrays (8 MB) */
  size_t m = 2u << 20;
  float *x = malloc(m * sizeof(float));
  for (size_t i = 0; i < m; i++) x[i] = (float)(i % 1000) * 0.5f;
  uint64_t shape[2] = {m / 4, 4};
  em_payload_reset(p);
  em_payload_begin_request(p, "echo", 4);
  em_put_list(p, 2);
  em_put_ndarray(p, "<f4", 2, shape, x, m * sizeof(float));
  em_put_cstr(p, "tail");
  r = NULL;
  CHECK_EQ(em_client_request(c, EM_MSG_REQUEST, p, 30000000000ull, &r), EM_OK);
  em_value e0, e1;
  CHECK(r && em_msg_value(r, &val) == EM_OK);
  CHECK_EQ(em_value_at(&val, 0, &e0), EM_OK);
  CHECK_EQ(em_value_at(&val, 1, &e1), EM_OK);
  CHECK(em_value_is(&e1, "tail"));
  CHECK_EQ(em_value_ndarray(&e0, &aa), EM_OK);
  CHECK(aa.len_bytes == m * sizeof(float) && memcmp(aa.data, x, aa.len_bytes) == 0);
  CHECK_EQ(aa.shape[0], m / 4);
  em_msg_free(r);
  free(x);

  /* timestamps: t1 <= t2 <= t3 <= t4 on the server; the HANDLER stage is
   * the time in the queue and in the worker (which sleeps 30 ms) */
  em_client_set_synchronized(c, 1);
  em_payload_reset(p);
  em_payload_begin_request(p, "slow", 4);
  em_put_int(p, 5);
  em_call_timing tm;
  r = NULL;
  uint64_t before = em_now_ns();
  CHECK_EQ(em_client_request_timed(c, EM_MSG_REQUEST, p, 10000000000ull, &r, &tm), EM_OK);
  uint64_t after = em_now_ns();
  em_msg_free(r);
  CHECK(tm.t[0] >= before && tm.t[0] <= tm.t[1]);
  CHECK(tm.t[1] <= tm.t[2] && tm.t[2] <= tm.t[3] && tm.t[3] <= tm.t[4] && tm.t[4] <= tm.t[5]);
  CHECK(tm.t[5] <= after);
  CHECK(tm.stage[EM_STAGE_HANDLER] >= 30000000);
  CHECK(tm.stage[EM_STAGE_QUEUE] >= 0 && tm.stage[EM_STAGE_QUEUE] < 1000000000);
  CHECK(tm.stage[EM_STAGE_REPLY] >= 0 && tm.stage[EM_STAGE_REPLY] < 1000000000);
  CHECK(tm.stage[EM_STAGE_RTT] >= tm.stage[EM_STAGE_HANDLER]);

  /* a handler that returns EM_MSG_DEFER without deferring closes the
   * connection; answers at once still work next to deferred ones */
  int64_t got = 0;
  CHECK_EQ(call_int(c, "baddefer", 1, 5000000000ull, NULL), EM_ECONNCLOSED);
  CHECK_EQ(call_int(c, "now", 1, 5000000000ull, &got), EM_OK);
  CHECK_EQ(got, 7);
  CHECK_EQ(call_int(c, "echo", 41, 5000000000ull, &got), EM_OK);
  CHECK_EQ(got, 41);
  CHECK_EQ(atomic_load(&bad), bad0);
  em_payload_free(p);
  em_client_close(c);
  stop(&v);
}

static void wait_held(int n) {
  for (int i = 0; i < 1000 && nheld() < n; i++) sleep_ms(5);
}

/* A caller that goes away: its pendings see it (alive 0), a reply gets
 * ECONNCLOSED and frees everything (ASan: no leak); a fork child cannot
 * touch them. */
static void test_client_closes_while_pending(void) {
  srv v;
  CHECK_EQ(start(&v, 0, 0), EM_OK);
  em_client *c = dial(&v);
  CHECK(c != NULL);
  /* two requests the server holds; the client gives up on both */
  CHECK_EQ(call_int(c, "hold", 1, 100000000ull, NULL), EM_ETIMEDOUT);
  CHECK_EQ(call_int(c, "hold", 2, 100000000ull, NULL), EM_ETIMEDOUT);
  wait_held(2);
  CHECK_EQ(nheld(), 2);
  em_pending *p0 = held(0), *p1 = held(1);
  CHECK_EQ(em_pending_alive(p0), 1);
  CHECK_EQ(em_pending_alive(p1), 1);
  /* in a fork child the pendings are the parent's: nothing is touched */
  fflush(NULL);
  pid_t pid = fork();
  if (pid == 0) {
    int ok = em_pending_reply(p0, EM_MSG_REPLY, NULL) == EM_EFORKED && em_pending_alive(p0) == 0 &&
             em_pending_request(p0) != NULL;
    em_pending_drop(p1); /* does nothing */
    _exit(ok ? 0 : 1);
  }
  int wst = 0;
  CHECK(pid > 0 && waitpid(pid, &wst, 0) == pid);
  CHECK(WIFEXITED(wst) && WEXITSTATUS(wst) == 0);
  CHECK_EQ(em_pending_alive(p0), 1);
  CHECK_EQ(em_pending_alive(p1), 1);
  em_server_stats st;
  em_server_get_stats(v.s, &st);
  CHECK_EQ(st.deferred, 2);
  em_client_close(c);
  for (int i = 0; i < 400 && em_pending_alive(p0); i++) sleep_ms(5);
  CHECK_EQ(em_pending_alive(p0), 0);
  CHECK_EQ(em_pending_alive(p1), 0);
  /* the request stays readable until answered */
  em_value mv, pv;
  int64_t x = 0;
  CHECK_EQ(em_msg_request(em_pending_request(p1), &mv, &pv), EM_OK);
  CHECK_EQ(em_value_int(&pv, &x), EM_OK);
  CHECK_EQ(x, 2);
  em_payload *out = em_payload_new();
  em_put_int(out, 1);
  CHECK_EQ(em_pending_reply(p0, EM_MSG_REPLY, out), EM_ECONNCLOSED);
  CHECK_EQ(em_payload_error(out), EM_OK); /* reset: ready for the next */
  em_pending_drop(p1);
  em_server_get_stats(v.s, &st);
  CHECK_EQ(st.deferred, 0);
  /* the server goes on */
  em_client *c2 = dial(&v);
  CHECK(c2 != NULL);
  CHECK_EQ(call_int(c2, "now", 0, 5000000000ull, &x), EM_OK);
  em_client_close(c2);
  em_payload_free(out);
  stop(&v);
}

/* Replies that fail: the caller's connection goes on, its share of the
 * pipelining is given back, and the pending is freed (ASan: no leak). */
static void test_reply_errors(void) {
  srv v;
  CHECK_EQ(start(&v, 1, 1u << 20), EM_OK); /* max_message_bytes 1 MiB */
  em_client *c = dial(&v);
  CHECK(c != NULL);
  for (int i = 0; i < 4; i++) CHECK_EQ(call_int(c, "hold", i, 50000000ull, NULL), EM_ETIMEDOUT);
  wait_held(4);
  CHECK_EQ(nheld(), 4);
  em_payload *out = em_payload_new();
  em_put_int(out, 1);
  CHECK_EQ(em_pending_reply(held(0), EM_MSG_OK, out), EM_EINVAL);
  size_t n = 2u << 20;
  uint8_t *big = calloc(1, n);
  uint64_t shape[1] = {n};
  em_put_ndarray(out, "|u1", 1, shape, big, n);
  CHECK_EQ(em_pending_reply(held(1), EM_MSG_REPLY, out), EM_ETOOBIG);
  free(big);
  em_put_list(out, 2); /* incomplete */
  em_put_int(out, 1);
  CHECK_EQ(em_pending_reply(held(2), EM_MSG_REPLY, out), EM_EENCODE);
  CHECK_EQ(em_pending_reply(NULL, EM_MSG_REPLY, out), EM_EINVAL);
  em_put_int(out, 3);
  CHECK_EQ(em_pending_reply(held(3), EM_MSG_REPLY, out), EM_OK); /* to a caller that gave up: ignored */
  em_server_stats st;
  em_server_get_stats(v.s, &st);
  CHECK_EQ(st.deferred, 0);
  int64_t x = 0;
  CHECK_EQ(call_int(c, "echo", 5, 5000000000ull, &x), EM_OK);
  CHECK_EQ(x, 5);
  em_payload_free(out);
  em_client_close(c);
  stop(&v);
}

typedef struct {
  em_client *c;
  int64_t arg;
  int rc;
  int64_t got;
} hold_arg;

static void *hold_caller(void *arg) {
  hold_arg *a = arg;
  a->rc = call_int(a->c, "hold", a->arg, 20000000000ull, &a->got);
  return NULL;
}

/* Stop with requests outstanding: a reply queued before the stop is
 * written; later ones get ECLOSED, even after em_server_close. */
static void test_stop_with_pending(void) {
  srv v;
  CHECK_EQ(start(&v, 0, 0), EM_OK);
  em_client *c = dial(&v);
  CHECK(c != NULL);
  enum { N = 4 };
  hold_arg args[N];
  pthread_t th[N];
  for (int i = 0; i < N; i++) {
    args[i] = (hold_arg){.c = c, .arg = 100 + i};
    pthread_create(&th[i], NULL, hold_caller, &args[i]);
    wait_held(i + 1); /* so held(i) is args[i]'s */
  }
  CHECK_EQ(nheld(), N);
  em_payload *out = em_payload_new();
  em_put_int(out, 1000);
  CHECK_EQ(em_pending_reply(held(0), EM_MSG_REPLY, out), EM_OK);
  em_server_stop(v.s); /* at once: the reply is queued, not yet written */
  CHECK_EQ(em_server_wait(v.s, 10000000000ull), EM_OK);
  pthread_join(v.th, NULL);
  pthread_join(th[0], NULL);
  CHECK_EQ(args[0].rc, EM_OK);
  CHECK_EQ(args[0].got, 1000);
  CHECK_EQ(em_pending_alive(held(1)), 0);
  em_server_stats st;
  em_server_get_stats(v.s, &st);
  CHECK_EQ(st.deferred, 3);
  em_put_int(out, 1);
  CHECK_EQ(em_pending_reply(held(1), EM_MSG_REPLY, out), EM_ECLOSED);
  em_pending_drop(held(2));
  em_server_close(v.s); /* held(3) outlives the server */
  em_put_int(out, 1);
  CHECK_EQ(em_pending_alive(held(3)), 0);
  CHECK_EQ(em_pending_reply(held(3), EM_MSG_REPLY, out), EM_ECLOSED);
  for (int i = 1; i < N; i++) {
    pthread_join(th[i], NULL);
    CHECK(args[i].rc == EM_ECONNCLOSED || args[i].rc == EM_ECONNREFUSED);
  }
  em_payload_free(out);
  em_client_close(c);
}

/* A connection's deferred requests count toward its pipelining: past
 * EM__MAX_DEFERRED it is not read until some are answered. Raw frames on
 * one connection, many more than that in flight. */
typedef struct {
  int fd;
  uint8_t *buf;
  size_t len;
  int rc;
} writer_arg;

static void *writer(void *arg) {
  writer_arg *w = arg;
  struct iovec iov = {w->buf, w->len};
  w->rc = em__writev_all(w->fd, &iov, 1, em_mono_ns() + 30000000000ull);
  return NULL;
}

static void test_pipelining_limit(void) {
  srv v;
  CHECK_EQ(start(&v, 0, 0), EM_OK);
  em_pool *pool = em__pool_new(1u << 20);
  em__reader r;
  CHECK_EQ(em__reader_init(&r, pool, 1u << 20), EM_OK);
  int fd = -1;
  em__hello_info info;
  memset(&info, 0, sizeof info);
  char err[128];
  CHECK_EQ(em__hello_dial("127.0.0.1", em_server_port(v.s), "test", "client", NULL, &r,
                          em_mono_ns() + 5000000000ull, err, sizeof err, &fd, &info), EM_OK);
  free(info.body);
  enum { N = EM__MAX_DEFERRED + 904 };
  /* N "hold" requests, ids 1..N, back to back */
  size_t cap = 0, len = 0;
  uint8_t *all = NULL;
  em_payload *p = em_payload_new();
  for (int i = 1; i <= N; i++) {
    em_payload_reset(p);
    em_payload_begin_request(p, "hold", 4);
    em_put_int(p, i);
    uint8_t *f;
    size_t fl;
    CHECK_EQ(em_frame_encode(p, EM_MSG_REQUEST, (uint64_t)i, &f, &fl), EM_OK);
    if (len + fl > cap) {
      cap = (len + fl) * 2;
      all = realloc(all, cap);
    }
    memcpy(all + len, f, fl);
    len += fl;
    free(f);
  }
  em_payload_free(p);
  writer_arg w = {.fd = fd, .buf = all, .len = len};
  pthread_t wt;
  pthread_create(&wt, NULL, writer, &w);
  wait_held(EM__MAX_DEFERRED);
  sleep_ms(200); /* it would take more if it read on */
  CHECK_EQ(nheld(), EM__MAX_DEFERRED);
  em_server_stats st;
  em_server_get_stats(v.s, &st);
  CHECK_EQ(st.deferred, EM__MAX_DEFERRED);
  /* answer everything as it comes: the connection reads on */
  em_payload *out = em_payload_new();
  int answered = 0;
  for (int spins = 0; answered < N && spins < 2000;) {
    int have = nheld();
    if (answered == have) {
      sleep_ms(5);
      spins++;
      continue;
    }
    for (; answered < have; answered++) {
      em_pending *q = held(answered);
      em_value mv, pv;
      int64_t x = -1;
      em_msg_request(em_pending_request(q), &mv, &pv);
      em_value_int(&pv, &x);
      em_put_int(out, x);
      if (em_pending_reply(q, EM_MSG_REPLY, out) != EM_OK) atomic_fetch_add(&bad, 1);
    }
  }
  CHECK_EQ(answered, N);
  pthread_join(wt, NULL);
  CHECK_EQ(w.rc, EM_OK);
  /* every reply, once, with its own id */
  uint8_t *seen = calloc(N + 1, 1);
  int got = 0, wrong = 0;
  while (got < N) {
    em_msg *m = NULL;
    const char *why = NULL;
    int rc = em__read_frame(fd, &r, em_mono_ns() + 10000000000ull, &m, &why);
    if (rc != 1) break;
    em_value val;
    int64_t x = -1;
    if (m->type != EM_MSG_REPLY || m->req_id < 1 || m->req_id > N || seen[m->req_id] ||
        em_msg_value(m, &val) != EM_OK || em_value_int(&val, &x) != EM_OK || x != (int64_t)m->req_id)
      wrong++;
    else seen[m->req_id] = 1;
    got++;
    em_msg_free(m);
  }
  CHECK_EQ(got, N);
  CHECK_EQ(wrong, 0);
  em_server_get_stats(v.s, &st);
  CHECK_EQ(st.deferred, 0);
  CHECK_EQ(st.requests, N);
  free(seen);
  free(all);
  em_payload_free(out);
  close(fd);
  em__reader_destroy(&r);
  em__pool_release(pool);
  stop(&v);
}

int main(void) {
  RUN(test_many_in_flight_out_of_order);
  RUN(test_errors_large_and_timestamps);
  RUN(test_client_closes_while_pending);
  RUN(test_reply_errors);
  RUN(test_stop_with_pending);
  RUN(test_pipelining_limit);
  CHECK_EQ(atomic_load(&bad), 0);
  DONE();
}
