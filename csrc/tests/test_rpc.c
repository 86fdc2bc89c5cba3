/* test_rpc.c: a C server and C clients in one process over loopback:
 * echo, ping, concurrent callers on one connection, timeouts, handshake
 * refusal, garbage from one peer not hurting another, stop and re-bind. */
#include "../rpc/em_rpc.h"
#include "em_test.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* Handler: body [method, payload]; "echo" returns payload, "sleep" sleeps
 * payload ms then returns it, "fail" returns an error map. */
static int handler(void *ud, const em_msg *req, em_payload *reply) {
  (void)ud;
  msgpack_zone z;
  msgpack_zone_init(&z, 1024);
  msgpack_object o;
  int type = EM_MSG_REPLY;
  if (em_msg_unpack(req, &z, &o) != EM_OK || o.type != MSGPACK_OBJECT_ARRAY || o.via.array.size != 2) {
    msgpack_zone_destroy(&z);
    return -1;
  }
  const msgpack_object *method = &o.via.array.ptr[0];
  const msgpack_object *payload = &o.via.array.ptr[1];
  if (em__obj_streq(method, "fail")) {
    em__pack_error(reply, "ValueError", "asked to fail", NULL);
    type = EM_MSG_ERROR;
  } else {
    if (em__obj_streq(method, "sleep") && payload->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
      sleep_ms((int)payload->via.u64);
    em_array a;
    (void)a;
    em_value mv, pv; /* the public reader and writer: echo the payload back */
    if (em_msg_request(req, &mv, &pv) != EM_OK || em_put_value(reply, &pv) != EM_OK) type = -1;
  }
  msgpack_zone_destroy(&z);
  return type;
}

static void quiet_log(void *ud, int level, const char *msg) {
  (void)ud;
  (void)level;
  (void)msg;
}

static void *run_thread(void *s) {
  em_server_run(s);
  return NULL;
}

static const char *server_token; /* for start_server */

static em_server *start_server(uint16_t port, pthread_t *th) {
  em_server_opts o = {.host = "127.0.0.1", .port = port, .service = "test", .handler = handler,
                      .log = quiet_log, .token = server_token};
  em_server *s;
  if (em_server_open(&s, &o) != EM_OK) return NULL;
  pthread_create(th, NULL, run_thread, s);
  return s;
}

static void stop_server(em_server *s, pthread_t th) {
  em_server_stop(s);
  CHECK_EQ(em_server_wait(s, 5000000000ull), EM_OK);
  pthread_join(th, NULL);
  em_server_close(s);
}

static int call_int(em_client *c, const char *method, int64_t v, uint64_t timeout_ns, int64_t *out) {
  em_payload p;
  em_payload_init(&p);
  em_payload_begin_request(&p, method, strlen(method));
  em_put_int(&p, v);
  em_msg *r = NULL;
  int rc = em_client_request(c, EM_MSG_REQUEST, &p, timeout_ns, &r);
  em_payload_destroy(&p);
  if (rc == EM_OK) {
    msgpack_zone z;
    msgpack_zone_init(&z, 256);
    msgpack_object o;
    if (em_msg_unpack(r, &z, &o) == EM_OK) *out = o.via.i64;
    msgpack_zone_destroy(&z);
  }
  em_msg_free(r);
  return rc;
}

static void test_echo_and_errors(void) {
  pthread_t th;
  em_server *s = start_server(0, &th);
  CHECK(s != NULL);
  em_client *c;
  em_client_opts co = {.service = "test"};
  CHECK_EQ(em_client_open(&c, "127.0.0.1", em_server_port(s), &co), EM_OK);
  int64_t v = 0;
  CHECK_EQ(call_int(c, "echo", 12345, EM_FOREVER, &v), EM_OK);
  CHECK_EQ(v, 12345);
  CHECK_EQ(call_int(c, "fail", 1, EM_FOREVER, &v), EM_EREMOTE);
  /* ping */
  em_payload p;
  em_payload_init(&p);
  msgpack_pack_nil(&p.pk);
  em_msg *r = NULL;
  CHECK_EQ(em_client_request(c, EM_MSG_PING, &p, 1000000000ull, &r), EM_OK);
  CHECK(r && r->type == EM_MSG_PONG);
  em_msg_free(r);
  /* a big array round trip (8 MB) */
  size_t n = 2u << 20;
  float *big = malloc(n * sizeof(float));
  for (size_t i = 0; i < n; i++) big[i] = (float)i;
  uint64_t shape[1] = {n};
  em_payload_reset(&p);
  em_payload_begin_request(&p, "echo", 4);
  em_put_ndarray(&p, "<f4", 1, shape, big, n * sizeof(float));
  CHECK_EQ(em_client_request(c, EM_MSG_REQUEST, &p, 10000000000ull, &r), EM_OK);
  if (r) {
    CHECK_EQ(r->nblobs, 1);
    CHECK(r->blobs[0].len_bytes == n * sizeof(float) && memcmp(r->blobs[0].data, big, n * sizeof(float)) == 0);
  }
  em_msg_free(r);
  free(big);
  /* timing: a timed call's stages add up to its round trip, its byte counts
   * are the frames' sizes, and the stats count calls but not pings */
  em_call_timing tm;
  em_payload_reset(&p);
  em_payload_begin_request(&p, "sleep", 5);
  em_put_int(&p, 20);
  CHECK_EQ(em_client_request_timed(c, EM_MSG_REQUEST, &p, 10000000000ull, &r, &tm), EM_OK);
  CHECK(tm.stage[EM_STAGE_HANDLER] >= 20000000);
  CHECK_EQ(tm.stage[EM_STAGE_UPLOAD] + tm.stage[EM_STAGE_QUEUE] + tm.stage[EM_STAGE_HANDLER] +
               tm.stage[EM_STAGE_REPLY] + tm.stage[EM_STAGE_DOWNLOAD],
           tm.stage[EM_STAGE_RTT]);
  CHECK_EQ(tm.stage[EM_STAGE_BYTES_DOWN], r ? r->frame_bytes : 0);
  CHECK(tm.stage[EM_STAGE_BYTES_UP] >= EM_FRAME_HEADER_BYTES);
  CHECK(!tm.synchronized && tm.t[0] < tm.t[5]);
  em_msg_free(r);
  em_client_stats cst;
  em_client_get_stats(c, &cst);
  CHECK_EQ(cst.calls, 4); /* echo, fail, big echo, sleep; not the ping */
  CHECK_EQ(cst.stage[EM_STAGE_RTT].count, 4);
  CHECK(cst.stage[EM_STAGE_HANDLER].max >= 20000000);
  CHECK(cst.offset_samples >= 1);
  CHECK(cst.offset_ns > -5000000 && cst.offset_ns < 5000000); /* one host, one clock */
  em_client_reset_stats(c);
  em_client_get_stats(c, &cst);
  CHECK_EQ(cst.calls, 0);
  CHECK(cst.offset_samples >= 1); /* the clock estimate is kept */
  em_payload_destroy(&p);
  /* timeout: the handler sleeps 300 ms, we wait 50 ms; the connection is
   * still usable afterwards and the late reply is dropped */
  uint64_t t0 = em_mono_ns();
  CHECK_EQ(call_int(c, "sleep", 300, 50000000ull, &v), EM_ETIMEDOUT);
  CHECK(em_mono_ns() - t0 < 250000000ull);
  CHECK_EQ(call_int(c, "echo", 7, EM_FOREVER, &v), EM_OK);
  CHECK_EQ(v, 7);
  em_server_stats st;
  em_server_get_stats(s, &st);
  CHECK(st.requests >= 4);
  CHECK_EQ(st.connections_open, 1);
  em_client_close(c);
  /* wrong service: refused at the handshake */
  em_client_opts bad = {.service = "other"};
  CHECK_EQ(em_client_open(&c, "127.0.0.1", em_server_port(s), &bad), EM_EHANDSHAKE);
  stop_server(s, th);
}

typedef struct {
  em_client *c;
  int base, n, ok;
} worker_arg;

static void *worker(void *arg) {
  worker_arg *w = arg;
  for (int i = 0; i < w->n; i++) {
    int64_t v = -1;
    if (call_int(w->c, "echo", w->base + i, 5000000000ull, &v) == EM_OK && v == w->base + i) w->ok++;
  }
  return NULL;
}

static void test_threads_share_a_client(void) {
  pthread_t th;
  em_server *s = start_server(0, &th);
  em_client *c;
  CHECK_EQ(em_client_open(&c, "127.0.0.1", em_server_port(s), NULL), EM_OK);
  enum { T = 6, N = 500 };
  pthread_t ts[T];
  worker_arg wa[T];
  for (int i = 0; i < T; i++) {
    wa[i] = (worker_arg){c, i * 100000, N, 0};
    pthread_create(&ts[i], NULL, worker, &wa[i]);
  }
  int ok = 0;
  for (int i = 0; i < T; i++) {
    pthread_join(ts[i], NULL);
    ok += wa[i].ok;
  }
  CHECK_EQ(ok, T * N);
  em_client_close(c);
  stop_server(s, th);
}

typedef struct {
  em_client *c;
  atomic_int *started;
  int rc;
} closer_arg;

static void *slow_caller(void *arg) {
  closer_arg *a = arg;
  int64_t v;
  atomic_fetch_add(a->started, 1);
  a->rc = call_int(a->c, "sleep", 1000, 10000000000ull, &v);
  return NULL;
}

/* em_client_close while threads wait in calls: each of them returns
 * ECLOSED promptly, and close frees only after the last has left (ASan and
 * TSan runs of this test catch it otherwise). */
static void test_close_wakes_callers(void) {
  pthread_t th;
  em_server *s = start_server(0, &th);
  for (int round = 0; round < 2; round++) {
    em_client *c;
    CHECK_EQ(em_client_open(&c, "127.0.0.1", em_server_port(s), NULL), EM_OK);
    enum { T = 5 };
    atomic_int started = 0;
    pthread_t ts[T];
    closer_arg ca[T];
    for (int i = 0; i < T; i++) {
      ca[i] = (closer_arg){c, &started, 1};
      pthread_create(&ts[i], NULL, slow_caller, &ca[i]);
    }
    while (atomic_load(&started) < T) sleep_ms(1);
    sleep_ms(30 + 20 * round);
    uint64_t t0 = em_mono_ns();
    em_client_close(c);
    for (int i = 0; i < T; i++) {
      pthread_join(ts[i], NULL);
      CHECK_EQ(ca[i].rc, EM_ECLOSED);
    }
    CHECK(em_mono_ns() - t0 < 700000000ull); /* not the 1 s handler */
  }
  stop_server(s, th);
}

static void test_garbage_peer_does_not_hurt_others(void) {
  pthread_t th;
  em_server *s = start_server(0, &th);
  em_client *c;
  CHECK_EQ(em_client_open(&c, "127.0.0.1", em_server_port(s), NULL), EM_OK);
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(em_server_port(s))};
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  CHECK_EQ(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
  char junk[256];
  memset(junk, 'Z', sizeof junk);
  CHECK(write(fd, junk, sizeof junk) == (ssize_t)sizeof junk);
  char rb[16];
  CHECK_EQ(read(fd, rb, sizeof rb), 0); /* server closed it */
  close(fd);
  int64_t v = 0;
  CHECK_EQ(call_int(c, "echo", 99, 2000000000ull, &v), EM_OK);
  CHECK_EQ(v, 99);
  em_server_stats st;
  em_server_get_stats(s, &st);
  CHECK(st.protocol_errors >= 1);
  em_client_close(c);
  stop_server(s, th);
}

typedef struct {
  uint16_t port;
  em_server *s;
  pthread_t th;
} restart_arg;

static void *restart_later(void *arg) {
  restart_arg *a = arg;
  sleep_ms(200);
  a->s = start_server(a->port, &a->th);
  return NULL;
}

static void test_stop_rebind_reconnect(void) {
  pthread_t th;
  em_server *s = start_server(0, &th);
  uint16_t port = em_server_port(s);
  em_client *c;
  CHECK_EQ(em_client_open(&c, "127.0.0.1", port, NULL), EM_OK);
  int64_t v = 0;
  CHECK_EQ(call_int(c, "echo", 1, 2000000000ull, &v), EM_OK);
  stop_server(s, th);
  /* server gone: the call fails at once with a connection error */
  uint64_t t0 = em_mono_ns();
  int rc = call_int(c, "echo", 2, 5000000000ull, &v);
  CHECK(rc == EM_ECONNCLOSED || rc == EM_ECONNREFUSED);
  CHECK(em_mono_ns() - t0 < 1000000000ull);
  CHECK_EQ(call_int(c, "echo", 2, 5000000000ull, &v), EM_ECONNREFUSED);
  /* the port is free at once */
  s = start_server(port, &th);
  CHECK(s != NULL);
  if (!s) return;
  CHECK_EQ(call_int(c, "echo", 3, 2000000000ull, &v), EM_OK);
  CHECK_EQ(v, 3);
  em_client_close(c);
  /* with a connect_timeout, a call made while the server restarts retries
   * the refused connect with backoff and succeeds once it is back */
  em_client_opts co = {.connect_timeout_ns = 5000000000ull};
  CHECK_EQ(em_client_open(&c, "127.0.0.1", port, &co), EM_OK);
  CHECK_EQ(call_int(c, "echo", 4, 2000000000ull, &v), EM_OK);
  stop_server(s, th);
  rc = call_int(c, "echo", 5, 300000000ull, &v); /* notices the dead connection */
  CHECK(rc == EM_ECONNCLOSED || rc == EM_ECONNREFUSED || rc == EM_ETIMEDOUT);
  restart_arg ra = {.port = port};
  pthread_t rt;
  pthread_create(&rt, NULL, restart_later, &ra);
  t0 = em_mono_ns();
  CHECK_EQ(call_int(c, "echo", 6, 5000000000ull, &v), EM_OK);
  CHECK_EQ(v, 6);
  CHECK(em_mono_ns() - t0 >= 150000000ull); /* it did wait for the restart */
  pthread_join(rt, NULL);
  em_client_close(c);
  stop_server(ra.s, ra.th);
}

static void test_open_errors(void) {
  em_client *c;
  CHECK_EQ(em_client_open(&c, "no-such-host.invalid", 1, NULL), EM_ERESOLVE);
  pthread_t th;
  em_server *s = start_server(0, &th);
  em_server *s2;
  em_server_opts o = {.host = "127.0.0.1", .port = em_server_port(s), .handler = handler, .log = quiet_log};
  CHECK_EQ(em_server_open(&s2, &o), EM_EADDRINUSE);
  stop_server(s, th);
  /* a server that never ran closes cleanly */
  o.port = 0;
  CHECK_EQ(em_server_open(&s2, &o), EM_OK);
  em_server_close(s2);
}

static int publish_int(em_server *s, int64_t v, uint64_t *version) {
  em_payload p;
  em_payload_init(&p);
  msgpack_pack_int64(&p.pk, v);
  int rc = em_server_publish(s, &p, version);
  em_payload_destroy(&p);
  return rc;
}

static int64_t msg_int(const em_msg *m) {
  msgpack_zone z;
  msgpack_zone_init(&z, 256);
  msgpack_object o;
  int64_t v = -999;
  if (em_msg_unpack(m, &z, &o) == EM_OK && (o.type == MSGPACK_OBJECT_POSITIVE_INTEGER || o.type == MSGPACK_OBJECT_NEGATIVE_INTEGER))
    v = o.via.i64;
  msgpack_zone_destroy(&z);
  return v;
}

/* Latest value: a late subscriber gets the current value at once; a slow
 * one gets the newest, never a backlog; a waiting one gets a publish
 * pushed; a broadcast-only server refuses requests; a server restart on
 * the same port is followed by the subscriber (versions start again). */
static void test_broadcast_latest_value(void) {
  em_server_opts o = {.host = "127.0.0.1", .port = 0, .service = "bcast", .log = quiet_log};
  em_server *s;
  CHECK_EQ(em_server_open(&s, &o), EM_OK);
  uint64_t v = 0;
  CHECK_EQ(publish_int(s, 1, &v), EM_OK); /* before run: kept as the current value */
  CHECK_EQ(v, 1);
  pthread_t th;
  pthread_create(&th, NULL, run_thread, s);
  uint16_t port = em_server_port(s);
  em_client_opts co = {.service = "bcast"};
  em_sub *sub;
  CHECK_EQ(em_sub_open(&sub, "127.0.0.1", port, &co), EM_OK);
  em_msg *m = NULL;
  CHECK_EQ(em_sub_next(sub, 2000000000ull, &m), EM_OK); /* late joiner: current value at once */
  CHECK(m && m->type == EM_MSG_PUBLISH && m->req_id == 1 && msg_int(m) == 1);
  em_msg_free(m);
  for (int i = 2; i <= 50; i++) publish_int(s, i, NULL); /* a slow subscriber... */
  sleep_ms(50);
  CHECK_EQ(em_sub_next(sub, 2000000000ull, &m), EM_OK); /* ...gets the newest, not 2 */
  CHECK(m && msg_int(m) == 50 && m->req_id == 50);
  em_msg_free(m);
  CHECK_EQ(em_sub_next(sub, 50000000ull, &m), EM_ETIMEDOUT);
  publish_int(s, 51, NULL); /* pushed to the waiting subscriber */
  CHECK_EQ(em_sub_next(sub, 2000000000ull, &m), EM_OK);
  CHECK(m && msg_int(m) == 51);
  em_msg_free(m);
  em_server_stats st;
  em_server_get_stats(s, &st);
  CHECK_EQ(st.subscribers, 1);
  CHECK_EQ(st.publishes, 51);
  CHECK_EQ(st.publish_sends, 3);
  /* requests to a broadcast-only server get an error reply */
  em_client *c;
  CHECK_EQ(em_client_open(&c, "127.0.0.1", port, &co), EM_OK);
  int64_t out;
  CHECK_EQ(call_int(c, "echo", 1, 2000000000ull, &out), EM_EREMOTE);
  em_client_close(c);
  /* restart on the same port: the subscriber reconnects and starts over */
  em_server_stop(s);
  CHECK_EQ(em_server_wait(s, 5000000000ull), EM_OK);
  pthread_join(th, NULL);
  CHECK_EQ(publish_int(s, 99, NULL), EM_ECLOSED);
  em_server_close(s);
  int rc = em_sub_next(sub, 300000000ull, &m);
  CHECK(rc == EM_ECONNCLOSED || rc == EM_ECONNREFUSED || rc == EM_ETIMEDOUT);
  CHECK(!em_sub_connected(sub));
  o.port = port;
  CHECK_EQ(em_server_open(&s, &o), EM_OK);
  publish_int(s, 7, NULL);
  pthread_create(&th, NULL, run_thread, s);
  uint64_t end = em_mono_ns() + 5000000000ull;
  do rc = em_sub_next(sub, 500000000ull, &m);
  while (rc != EM_OK && em_mono_ns() < end);
  CHECK_EQ(rc, EM_OK);
  CHECK(m && msg_int(m) == 7 && m->req_id == 1);
  em_msg_free(m);
  CHECK(em_sub_connected(sub));
  /* shutdown from another thread wakes a waiting next() */
  em_sub_shutdown(sub);
  CHECK_EQ(em_sub_next(sub, 1000000000ull, &m), EM_ECLOSED);
  em_sub_close(sub);
  stop_server(s, th);
}

typedef struct {
  em_sub *sub;
  int rc;
} wait_arg;

static void *wait_next(void *ud) {
  wait_arg *a = ud;
  em_msg *m = NULL;
  a->rc = em_sub_next(a->sub, 10000000000ull, &m);
  em_msg_free(m);
  return NULL;
}

static void test_sub_shutdown_wakes_waiter(void) {
  em_server_opts o = {.host = "127.0.0.1", .port = 0, .service = "bcast", .log = quiet_log};
  em_server *s;
  CHECK_EQ(em_server_open(&s, &o), EM_OK);
  pthread_t th;
  pthread_create(&th, NULL, run_thread, s);
  em_sub *sub;
  CHECK_EQ(em_sub_open(&sub, "127.0.0.1", em_server_port(s), NULL), EM_OK);
  wait_arg a = {sub, 1};
  pthread_t w;
  pthread_create(&w, NULL, wait_next, &a);
  sleep_ms(100);
  em_sub_shutdown(sub);
  pthread_join(w, NULL);
  CHECK_EQ(a.rc, EM_ECLOSED); /* woken, not timed out (ETIMEDOUT after 10 s) */
  em_sub_close(sub);
  stop_server(s, th);
}

/* SHA-256 (FIPS 180-4 examples) and HMAC-SHA256 (RFC 4231 cases 1, 2, 6). */
static void hex(const uint8_t *d, size_t n, char *out) {
  for (size_t i = 0; i < n; i++) sprintf(out + 2 * i, "%02x", d[i]);
}

static void test_sha256_hmac_vectors(void) {
  uint8_t out[32];
  char h[65];
  em_sha256 s;
  em_sha256_init(&s);
  em_sha256_update(&s, "abc", 3);
  em_sha256_final(&s, out);
  hex(out, 32, h);
  CHECK(strcmp(h, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad") == 0);
  const char *m2 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
  em_sha256_init(&s);
  for (size_t i = 0; i < strlen(m2); i++) em_sha256_update(&s, m2 + i, 1); /* byte by byte */
  em_sha256_final(&s, out);
  hex(out, 32, h);
  CHECK(strcmp(h, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1") == 0);
  uint8_t key1[20];
  memset(key1, 0x0b, sizeof key1);
  em_hmac_sha256(key1, sizeof key1, "Hi ", 3, "There", 5, NULL, 0, out);
  hex(out, 32, h);
  CHECK(strcmp(h, "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7") == 0);
  em_hmac_sha256("Jefe", 4, "what do ya want ", 16, "for nothing?", 12, NULL, 0, out);
  hex(out, 32, h);
  CHECK(strcmp(h, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843") == 0);
  uint8_t key6[131];
  memset(key6, 0xaa, sizeof key6);
  const char *m6 = "Test Using Larger Than Block-Size Key - Hash Key First";
  em_hmac_sha256(key6, sizeof key6, m6, strlen(m6), NULL, 0, NULL, 0, out);
  hex(out, 32, h);
  CHECK(strcmp(h, "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54") == 0);
  CHECK(em_ct_equal("abcd", "abcd", 4));
  CHECK(!em_ct_equal("abcd", "abce", 4));
}

/* A server with a token: the right token gets through; a wrong or missing
 * one is EHANDSHAKE with a reason; a client with a token refuses a server
 * without one. */
static void test_token_auth(void) {
  pthread_t th;
  server_token = "correct horse battery staple";
  em_server *s = start_server(0, &th);
  server_token = NULL;
  CHECK(s != NULL);
  uint16_t port = em_server_port(s);
  em_client *c = NULL;
  char why[300] = "";
  em_client_opts co = {.service = "test", .token = "correct horse battery staple", .errbuf = why,
                       .errbuf_len = sizeof why};
  CHECK_EQ(em_client_open(&c, "127.0.0.1", port, &co), EM_OK);
  int64_t v = 0;
  CHECK_EQ(call_int(c, "echo", 99, EM_FOREVER, &v), EM_OK);
  CHECK_EQ(v, 99);
  em_client *bad = NULL;
  co.token = "wrong";
  CHECK_EQ(em_client_open(&bad, "127.0.0.1", port, &co), EM_EHANDSHAKE);
  CHECK(bad == NULL && strstr(why, "authentication failed") != NULL);
  co.token = NULL;
  why[0] = 0;
  CHECK_EQ(em_client_open(&bad, "127.0.0.1", port, &co), EM_EHANDSHAKE);
  CHECK(strstr(why, "requires a token") != NULL);
  em_sub *sub = NULL; /* subscriptions authenticate the same way */
  co.token = "correct horse battery staple";
  CHECK_EQ(em_sub_open(&sub, "127.0.0.1", port, &co), EM_OK);
  em_sub_close(sub);
  co.token = "nope";
  CHECK_EQ(em_sub_open(&sub, "127.0.0.1", port, &co), EM_EHANDSHAKE);
  CHECK_EQ(call_int(c, "echo", 7, EM_FOREVER, &v), EM_OK); /* unaffected */
  em_server_stats st;
  em_server_get_stats(s, &st);
  CHECK_EQ(st.requests, 2);
  em_client_close(c);
  stop_server(s, th);
  /* a client with a token refuses a server without one */
  s = start_server(0, &th);
  co.token = "correct horse battery staple";
  why[0] = 0;
  CHECK_EQ(em_client_open(&bad, "127.0.0.1", em_server_port(s), &co), EM_EHANDSHAKE);
  CHECK(strstr(why, "asks for none") != NULL);
  stop_server(s, th);
}

int main(void) {
  RUN(test_echo_and_errors);
  RUN(test_sha256_hmac_vectors);
  RUN(test_token_auth);
  RUN(test_threads_share_a_client);
  RUN(test_close_wakes_callers);
  RUN(test_garbage_peer_does_not_hurt_others);
  RUN(test_stop_rebind_reconnect);
  RUN(test_open_errors);
  RUN(test_broadcast_latest_value);
  RUN(test_sub_shutdown_wakes_waiter);
  DONE();
}
