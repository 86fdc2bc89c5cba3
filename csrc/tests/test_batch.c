/* test_batch.c: the dynamic batcher (edgeml_batch.h) behind a real server:
 * 8 client threads whose requests are stacked, run once and split back
 * (each caller its own rows), map payloads (stacked arrays and per-caller
 * values; results split per entry or copied), requests of two forms,
 * errors reaching every caller (EM_MSG_ERROR, a bad return code, a result
 * that does not split, one that failed to build), payloads that do not
 * batch, max_batch_size 1, callers gone before their batch ran, stop
 * draining the queue (and refusing after), the allocator hook, stats.
 *
 * Only the main thread CHECKs (em_test.h's counters are not atomic): other
 * threads count what went wrong in `bad`. */
#include "edgeml_batch.h"
#include "em_test.h"

#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>

static atomic_int bad;
#define BAD_IF(cond)                                                                      \
  do {                                                                                    \
    if (cond) {                                                                           \
      atomic_fetch_add(&bad, 1);                                                          \
      fprintf(stderr, "%s:%d: off-main-thread failure: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                                     \
  } while (0)

static void sleep_ms(int ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* ------------------------------------------------------- server harness */

typedef struct srv {
  em_server *s;
  em_batcher *b;
  pthread_t th;
  uint16_t port;
} srv;

static int handler(void *ud, const em_msg *req, em_payload *reply) {
  srv *v = ud;
  em_pending *p = em_server_defer(v->s, req);
  if (!p) {
    em_payload_begin_error(reply, "MemoryError", "defer", NULL, 0);
    return EM_MSG_ERROR;
  }
  em_batcher_submit(v->b, p);
  return EM_MSG_DEFER;
}

static void *run_main(void *arg) {
  srv *v = arg;
  em_server_run(v->s);
  return NULL;
}

static int srv_open(srv *v, const em_batcher_opts *bo) {
  memset(v, 0, sizeof *v);
  if (em_batcher_new(&v->b, bo)) return -1;
  em_server_opts o;
  em_server_opts_init(&o);
  o.host = "127.0.0.1";
  o.service = "inference";
  o.handler = handler;
  o.handler_ud = v;
  if (em_server_open(&v->s, &o)) return -1;
  v->port = em_server_port(v->s);
  pthread_create(&v->th, NULL, run_main, v);
  return 0;
}

static void srv_close(srv *v) {
  em_batcher_stop(v->b); /* answers what is queued while the loop runs */
  em_server_stop(v->s);
  pthread_join(v->th, NULL);
  em_server_close(v->s);
  em_batcher_free(v->b);
}

static em_infer_client *client(uint16_t port) {
  em_infer_client *c = NULL;
  BAD_IF(em_infer_client_open(&c, "127.0.0.1", port, NULL) != EM_OK);
  return c;
}

/* Call with a float32 array of `dim` values base, base+1, ...; *out the
 * reply (owned), returns the call's code. */
static int call_array(em_infer_client *c, const char *name, float base, uint32_t dim, uint64_t timeout_ns,
                      em_msg **out) {
  float x[64];
  for (uint32_t k = 0; k < dim; k++) x[k] = base + (float)k;
  uint64_t shape[1] = {dim};
  em_payload *p = em_payload_new();
  em_put_ndarray(p, "<f4", 1, shape, x, dim * sizeof(float));
  int rc = em_infer_call(c, name, p, timeout_ns, out);
  em_payload_free(p);
  return rc;
}

static int error_is(const em_msg *m, const char *prefix) {
  char buf[512];
  if (!m || em_msg_error(m, buf, sizeof buf) != EM_OK) return 0;
  if (strncmp(buf, prefix, strlen(prefix)) != 0) {
    fprintf(stderr, "error reply: %s (expected %s...)\n", buf, prefix);
    return 0;
  }
  return 1;
}

/* --------------------------------------------------- batch functions */

/* ARRAY: stacked (n, dim) float32 -> (n, dim) x * 2 (own memory), checks
 * the batch's shape; sleeps a little so batches form. */
static atomic_int allocs, frees;
static void *my_alloc(void *ud, size_t bytes) {
  BAD_IF(ud != (void *)&allocs);
  atomic_fetch_add(&allocs, 1);
  return aligned_alloc(64, (bytes + 63) & ~(size_t)63);
}
static void my_free(void *ud, void *p) {
  atomic_fetch_add(&frees, 1);
  free(p);
}

static int fn_double(void *ud, const em_batch *b, em_payload *out) {
  (void)ud;
  em_array a;
  uint32_t n = em_batch_size(b);
  BAD_IF(em_batch_kind(b) != EM_BATCH_ARRAY);
  BAD_IF(em_batch_array(b, NULL, &a) != EM_OK);
  BAD_IF(em_batch_array(b, "x", &a) != EM_EINVAL);
  BAD_IF(em_batch_array(b, NULL, &a) != EM_OK);
  BAD_IF(a.ndim != 2 || a.shape[0] != n || strcmp(a.dtype, "<f4") != 0);
  BAD_IF(((uintptr_t)a.data & 63) != 0);
  BAD_IF(em_batch_nkeys(b) != 0 || em_batch_request(b, n) != NULL || em_batch_request(b, 0) == NULL);
  em_value v;
  BAD_IF(em_batch_value(b, NULL, n - 1, &v) != EM_OK || v.type != EM_T_NDARRAY);
  BAD_IF(em_batch_value(b, NULL, n, &v) != EM_EINVAL);
  size_t cnt = a.len_bytes / sizeof(float);
  float *y = malloc(a.len_bytes ? a.len_bytes : 1);
  const float *x = a.data;
  for (size_t k = 0; k < cnt; k++) y[k] = x[k] * 2;
  em_payload_on_release(out, free, y);
  sleep_ms(2);
  return em_put_ndarray(out, "<f4", a.ndim, a.shape, y, a.len_bytes) ? EM_ENOMEM : EM_MSG_REPLY;
}

typedef struct cargs {
  uint16_t port;
  int id, calls;
  uint32_t dim;
} cargs;

static void *client_rows(void *arg) {
  cargs *a = arg;
  em_infer_client *c = client(a->port);
  if (!c) return NULL;
  for (int k = 0; k < a->calls; k++) {
    float base = (float)(a->id * 1000 + k * 10);
    em_msg *r = NULL;
    int rc = call_array(c, "double", base, a->dim, 10000000000ull, &r);
    BAD_IF(rc != EM_OK);
    em_value v;
    em_array y;
    if (rc == EM_OK && em_msg_value(r, &v) == EM_OK && em_value_ndarray(&v, &y) == EM_OK) {
      BAD_IF(y.ndim != 1 || y.shape[0] != a->dim || y.is_scalar);
      const float *f = y.data;
      for (uint32_t d = 0; d < a->dim && y.shape[0] == a->dim; d++) BAD_IF(f[d] != 2 * (base + (float)d));
    } else {
      BAD_IF(1);
    }
    em_msg_free(r);
  }
  em_infer_client_close(c);
  return NULL;
}

static void test_rows(void) {
  em_batcher_opts o;
  em_batcher_opts_init(&o);
  o.name = "double";
  o.max_batch_size = 8;
  o.max_delay_ns = 5000000;
  o.workers = 2;
  o.fn = fn_double;
  o.alloc = my_alloc;
  o.free = my_free;
  o.alloc_ud = &allocs;
  srv v;
  CHECK(srv_open(&v, &o) == 0);
  pthread_t th[8];
  cargs ca[8];
  for (int i = 0; i < 8; i++) {
    /* two forms: dims 3 and 4 batch apart */
    ca[i] = (cargs){v.port, i, 25, i % 2 ? 3u : 4u};
    pthread_create(&th[i], NULL, client_rows, &ca[i]);
  }
  for (int i = 0; i < 8; i++) pthread_join(th[i], NULL);
  em_batcher_stats st;
  em_batcher_get_stats(v.b, &st);
  CHECK_EQ(st.requests, 200);
  CHECK(st.batches < 200);
  CHECK(st.max_batch > 1 && st.max_batch <= 8);
  CHECK_EQ(st.errors, 0);
  CHECK_EQ(st.queued, 0);
  CHECK(st.queue_ns > 0 && st.run_ns > 0);
  printf("  rows: %llu requests in %llu batches (max %llu)\n", (unsigned long long)st.requests,
         (unsigned long long)st.batches, (unsigned long long)st.max_batch);
  srv_close(&v);
  CHECK(atomic_load(&allocs) >= 1);
  CHECK_EQ(atomic_load(&allocs), atomic_load(&frees)); /* the workers' buffers, freed at stop */
  CHECK_EQ(atomic_load(&bad), 0);
}

/* MAP: {"x": f32[2], "id": int, "tag": str} -> {"y": x+id (n,2), "ids": [id...],
 * "s": f32 (n,) = id, "version": "v1", "t": (tags as a tuple)} */
static int fn_map(void *ud, const em_batch *b, em_payload *out) {
  (void)ud;
  uint32_t n = em_batch_size(b);
  BAD_IF(em_batch_kind(b) != EM_BATCH_MAP);
  BAD_IF(em_batch_nkeys(b) != 3);
  const char *k;
  size_t kl;
  int isa;
  BAD_IF(em_batch_key(b, 0, &k, &kl, &isa) != EM_OK || kl != 2 || memcmp(k, "id", 2) || isa);
  BAD_IF(em_batch_key(b, 2, &k, &kl, &isa) != EM_OK || kl != 1 || memcmp(k, "x", 1) || !isa);
  BAD_IF(em_batch_key(b, 3, NULL, NULL, NULL) != EM_EINVAL);
  em_array x;
  BAD_IF(em_batch_array(b, "x", &x) != EM_OK || x.ndim != 2 || x.shape[0] != n || x.shape[1] != 2);
  BAD_IF(em_batch_array(b, "id", &x) != EM_EINVAL || em_batch_array(b, NULL, &x) != EM_EINVAL);
  em_batch_array(b, "x", &x);
  float *mem = malloc(3 * n * sizeof(float) + 1);
  float *y = mem, *s = mem + 2 * n;
  const float *xf = x.data;
  int64_t ids[64];
  em_put_map(out, 5);
  em_put_cstr(out, "ids");
  em_put_list(out, n);
  for (uint32_t i = 0; i < n; i++) {
    em_value iv;
    BAD_IF(em_batch_value(b, "id", i, &iv) != EM_OK || em_value_int(&iv, &ids[i]) != EM_OK);
    em_put_int(out, ids[i]);
    y[2 * i] = xf[2 * i] + (float)ids[i];
    y[2 * i + 1] = xf[2 * i + 1] + (float)ids[i];
    s[i] = (float)ids[i];
  }
  em_put_cstr(out, "y");
  uint64_t ys[2] = {n, 2};
  em_put_ndarray(out, "<f4", 2, ys, y, 2 * n * sizeof(float));
  em_put_cstr(out, "s");
  uint64_t ss[1] = {n};
  em_put_ndarray(out, "<f4", 1, ss, s, n * sizeof(float));
  em_put_cstr(out, "version");
  em_put_cstr(out, "v1");
  em_put_cstr(out, "t");
  em_put_tuple(out, n);
  for (uint32_t i = 0; i < n; i++) {
    em_value tv;
    BAD_IF(em_batch_value(b, "tag", i, &tv) != EM_OK || tv.type != EM_T_STR);
    em_put_value(out, &tv); /* borrowed from the request: fine */
  }
  em_payload_on_release(out, free, mem);
  sleep_ms(3);
  return EM_MSG_REPLY;
}

static void *client_map(void *arg) {
  cargs *a = arg;
  em_infer_client *c = client(a->port);
  if (!c) return NULL;
  for (int k = 0; k < a->calls; k++) {
    int64_t id = a->id * 100 + k;
    float x[2] = {(float)k, (float)(k + 1)};
    uint64_t shape[1] = {2};
    char tag[32];
    snprintf(tag, sizeof tag, "tag-%lld", (long long)id);
    em_payload *p = em_payload_new();
    em_put_map(p, 3); /* key order differs between clients: they still batch */
    if (a->id % 2) {
      em_put_cstr(p, "x");
      em_put_ndarray(p, "<f4", 1, shape, x, sizeof x);
      em_put_cstr(p, "id");
      em_put_int(p, id);
    } else {
      em_put_cstr(p, "id");
      em_put_int(p, id);
      em_put_cstr(p, "x");
      em_put_ndarray(p, "<f4", 1, shape, x, sizeof x);
    }
    em_put_cstr(p, "tag");
    em_put_cstr(p, tag);
    em_msg *r = NULL;
    int rc = em_infer_call(c, "map", p, 10000000000ull, &r);
    em_payload_free(p);
    BAD_IF(rc != EM_OK);
    em_value v, e;
    em_array ya;
    if (rc == EM_OK && em_msg_value(r, &v) == EM_OK && v.type == EM_T_MAP) {
      int64_t got;
      BAD_IF(em_value_get(&v, "ids", &e) != 1 || em_value_int(&e, &got) || got != id);
      BAD_IF(em_value_get(&v, "y", &e) != 1 || em_value_ndarray(&e, &ya) || ya.ndim != 1 || ya.shape[0] != 2 ||
             ((const float *)ya.data)[0] != x[0] + (float)id || ((const float *)ya.data)[1] != x[1] + (float)id);
      BAD_IF(em_value_get(&v, "s", &e) != 1 || em_value_ndarray(&e, &ya) || !ya.is_scalar ||
             *(const float *)ya.data != (float)id);
      BAD_IF(em_value_get(&v, "version", &e) != 1 || !em_value_is(&e, "v1"));
      BAD_IF(em_value_get(&v, "t", &e) != 1 || !em_value_is(&e, tag));
    } else {
      BAD_IF(1);
    }
    em_msg_free(r);
  }
  em_infer_client_close(c);
  return NULL;
}

static void test_map(void) {
  em_batcher_opts o;
  em_batcher_opts_init(&o);
  o.name = "map";
  o.max_batch_size = 16;
  o.max_delay_ns = 5000000;
  o.fn = fn_map;
  srv v;
  CHECK(srv_open(&v, &o) == 0);
  pthread_t th[8];
  cargs ca[8];
  for (int i = 0; i < 8; i++) {
    ca[i] = (cargs){v.port, i, 20, 2};
    pthread_create(&th[i], NULL, client_map, &ca[i]);
  }
  for (int i = 0; i < 8; i++) pthread_join(th[i], NULL);
  em_batcher_stats st;
  em_batcher_get_stats(v.b, &st);
  CHECK_EQ(st.requests, 160);
  CHECK(st.max_batch > 1);
  CHECK_EQ(st.errors, 0);
  srv_close(&v);
  CHECK_EQ(atomic_load(&bad), 0);
}

/* Errors: the method names what fn does (all requests are the batcher's:
 * its "name" is the interface, so each test uses one mode). */
static atomic_int mode;
enum { M_ERROR, M_CODE, M_SHAPE, M_INCOMPLETE, M_LIST, M_CODE_POS };
static int fn_modes(void *ud, const em_batch *b, em_payload *out) {
  (void)ud;
  uint32_t n = em_batch_size(b);
  sleep_ms(5);
  switch (atomic_load(&mode)) {
    case M_ERROR:
      em_payload_begin_error(out, "ValueError", "bad batch", "tb\n", 1);
      em_put_cstr(out, "n");
      em_put_uint(out, n);
      return EM_MSG_ERROR;
    case M_CODE: return EM_ENOMEM;
    case M_CODE_POS: return 77;
    case M_SHAPE: {
      static const float z[3] = {0};
      uint64_t s[1] = {3};
      em_put_ndarray(out, "<f4", 1, s, z, sizeof z); /* leading axis 3, not n (n < 3 here) */
      return EM_MSG_REPLY;
    }
    case M_INCOMPLETE: em_put_list(out, 2); return EM_MSG_REPLY;
    default: /* M_LIST: a list of n values: caller i gets i's id */
      em_put_list(out, n);
      for (uint32_t i = 0; i < n; i++) {
        em_array a;
        em_value v;
        em_batch_value(b, NULL, i, &v);
        em_value_ndarray(&v, &a);
        em_put_double(out, ((const float *)a.data)[0]);
      }
      return EM_MSG_REPLY;
  }
}

typedef struct ecall {
  uint16_t port;
  float base;
  int rc;
  em_msg *r;
} ecall;
static void *one_call(void *arg) {
  ecall *e = arg;
  em_infer_client *c = client(e->port);
  if (!c) return NULL;
  e->rc = call_array(c, "errs", e->base, 2, 10000000000ull, &e->r);
  em_infer_client_close(c);
  return NULL;
}

/* k concurrent callers; each result into e[] */
static void concurrent(uint16_t port, ecall *e, int k) {
  pthread_t th[8];
  for (int i = 0; i < k; i++) {
    e[i] = (ecall){port, (float)i, 0, NULL};
    pthread_create(&th[i], NULL, one_call, &e[i]);
  }
  for (int i = 0; i < k; i++) pthread_join(th[i], NULL);
}

static void test_errors(void) {
  em_batcher_opts o;
  em_batcher_opts_init(&o);
  o.name = "errs";
  o.max_batch_size = 4;
  o.max_delay_ns = 200000000; /* 200 ms: the callers batch */
  o.fn = fn_modes;
  srv v;
  CHECK(srv_open(&v, &o) == 0);
  ecall e[3];
  struct {
    int mode;
    const char *prefix;
  } cases[] = {
      {M_ERROR, "ValueError: bad batch"},
      {M_CODE, "RuntimeError: the batched interface 'errs' failed: it returned -2 (ENOMEM"},
      {M_CODE_POS, "RuntimeError: the batched interface 'errs' failed: it returned 77,"},
      {M_SHAPE, "ValueError: batched interface 'errs' returned ndarray of shape (3,) for a batch of 2: return an "
                "array whose leading axis is 2, a list of 2 results, or a dict of those"},
      {M_INCOMPLETE, "RuntimeError: the batched interface 'errs' failed: its result failed to build"},
  };
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    atomic_store(&mode, cases[c].mode);
    em_batcher_stats before, after;
    em_batcher_get_stats(v.b, &before);
    concurrent(v.port, e, 2);
    for (int i = 0; i < 2; i++) {
      CHECK_EQ(e[i].rc, EM_EREMOTE);
      CHECK(error_is(e[i].r, cases[c].prefix));
      em_msg_free(e[i].r);
    }
    em_batcher_get_stats(v.b, &after);
    CHECK_EQ(after.requests - before.requests, 2);
    CHECK(after.errors - before.errors >= 1);
  }
  /* the error map's extra entry reaches each caller as built */
  atomic_store(&mode, M_ERROR);
  concurrent(v.port, e, 2);
  for (int i = 0; i < 2; i++) {
    em_value m, x;
    CHECK(e[i].r && em_msg_value(e[i].r, &m) == EM_OK && em_value_get(&m, "n", &x) == 1);
    em_msg_free(e[i].r);
  }
  /* a list of n values splits */
  atomic_store(&mode, M_LIST);
  concurrent(v.port, e, 3);
  for (int i = 0; i < 3; i++) {
    em_value m;
    double d = -1;
    CHECK_EQ(e[i].rc, EM_OK);
    CHECK(e[i].r && em_msg_value(e[i].r, &m) == EM_OK && em_value_double(&m, &d) == EM_OK && d == (double)i);
    em_msg_free(e[i].r);
  }

  /* payloads that do not batch: answered at once */
  em_infer_client *c = client(v.port);
  struct {
    int kind;
    const char *prefix;
  } refuse[] = {
      {0, "edgeml.InvalidArgumentError: interface 'errs' is batched (max_batch_size=4): its payload must be an "
          "array or a dict (of arrays and values), not str"},
      {1, "edgeml.InvalidArgumentError: interface 'errs' is batched (max_batch_size=4): its payload must be an "
          "array or a dict (of arrays and values), not list"},
      {2, "edgeml.InvalidArgumentError: interface 'errs' is batched (max_batch_size=4): its payload must be an "
          "array or a dict (of arrays and values), not float32"},
      {3, "edgeml.InvalidArgumentError: interface 'errs' is batched (max_batch_size=4): its dict keys must be str, "
          "not int"},
      {4, "edgeml.InvalidArgumentError: interface 'errs' is batched (max_batch_size=4): its dict has the key 'a' "
          "twice"},
  };
  em_batcher_stats before, after;
  em_batcher_get_stats(v.b, &before);
  for (size_t k = 0; k < sizeof refuse / sizeof refuse[0]; k++) {
    em_payload *p = em_payload_new();
    float f = 1;
    switch (refuse[k].kind) {
      case 0: em_put_cstr(p, "hello"); break;
      case 1: em_put_list(p, 1); em_put_int(p, 1); break;
      case 2: em_put_scalar(p, "<f4", &f, sizeof f); break;
      case 3: em_put_map(p, 1); em_put_int(p, 1); em_put_int(p, 2); break;
      default: em_put_map(p, 2); em_put_cstr(p, "a"); em_put_int(p, 1); em_put_cstr(p, "a"); em_put_int(p, 2);
    }
    em_msg *r = NULL;
    CHECK_EQ(em_infer_call(c, "errs", p, 5000000000ull, &r), EM_EREMOTE);
    CHECK(error_is(r, refuse[k].prefix));
    em_msg_free(r);
    em_payload_free(p);
  }
  em_batcher_get_stats(v.b, &after);
  CHECK_EQ(after.refused - before.refused, 5);
  CHECK_EQ(after.batches, before.batches);
  em_infer_client_close(c);
  srv_close(&v);
  CHECK_EQ(atomic_load(&bad), 0);
}

/* max_batch_size 1: any payload, the result as it is */
static int fn_single(void *ud, const em_batch *b, em_payload *out) {
  (void)ud;
  em_value v;
  em_array a;
  BAD_IF(em_batch_kind(b) != EM_BATCH_SINGLE || em_batch_size(b) != 1);
  BAD_IF(em_batch_array(b, NULL, &a) != EM_EINVAL);
  BAD_IF(em_batch_value(b, NULL, 0, &v) != EM_OK);
  em_put_list(out, 2);
  em_put_cstr(out, "got");
  em_put_value(out, &v);
  return EM_MSG_REPLY;
}

static void test_single(void) {
  em_batcher_opts o;
  em_batcher_opts_init(&o);
  o.max_batch_size = 1;
  o.fn = fn_single;
  srv v;
  CHECK(srv_open(&v, &o) == 0);
  em_infer_client *c = client(v.port);
  em_payload *p = em_payload_new();
  em_put_cstr(p, "a string");
  em_msg *r = NULL;
  CHECK_EQ(em_infer_call(c, "one", p, 5000000000ull, &r), EM_OK);
  em_value m, x;
  CHECK(r && em_msg_value(r, &m) == EM_OK && m.type == EM_T_LIST && m.len == 2);
  CHECK(em_value_at(&m, 1, &x) == EM_OK && em_value_is(&x, "a string"));
  em_msg_free(r);
  em_payload_free(p);
  em_infer_client_close(c);
  srv_close(&v);
  CHECK_EQ(atomic_load(&bad), 0);
}

/* Stop drains the queue; callers gone are dropped; submits after stop are
 * refused. */
static int fn_echo(void *ud, const em_batch *b, em_payload *out) {
  (void)ud;
  em_array a;
  em_batch_array(b, NULL, &a);
  return em_put_ndarray(out, a.dtype, a.ndim, a.shape, a.data, a.len_bytes) ? EM_EINVAL : EM_MSG_REPLY;
}

static void test_stop_and_gone(void) {
  em_batcher_opts o;
  em_batcher_opts_init(&o);
  o.name = "errs";
  o.max_batch_size = 64;
  o.max_delay_ns = 60000000000ull; /* a minute: only stop runs them */
  o.fn = fn_echo;
  srv v;
  CHECK(srv_open(&v, &o) == 0);
  /* a caller that goes away: its request waits, then its connection closes */
  em_infer_client *g = client(v.port);
  em_msg *r = NULL;
  CHECK_EQ(call_array(g, "errs", 1, 2, 100000000ull, &r), EM_ETIMEDOUT);
  em_infer_client_close(g);
  /* three that wait for the stop */
  pthread_t th[3];
  ecall e[3];
  for (int i = 0; i < 3; i++) {
    e[i] = (ecall){v.port, (float)(10 * i), 0, NULL};
    pthread_create(&th[i], NULL, one_call, &e[i]);
  }
  em_batcher_stats st;
  for (int t = 0; t < 500; t++) {
    em_batcher_get_stats(v.b, &st);
    if (st.queued == 4) break;
    sleep_ms(10);
  }
  CHECK_EQ(st.queued, 4);
  CHECK_EQ(st.batches, 0);
  sleep_ms(50); /* the server notices the closed connection */
  em_batcher_stop(v.b);
  em_batcher_stop(v.b); /* twice is fine */
  for (int i = 0; i < 3; i++) pthread_join(th[i], NULL);
  for (int i = 0; i < 3; i++) {
    CHECK_EQ(e[i].rc, EM_OK);
    em_value m;
    em_array a;
    CHECK(e[i].r && em_msg_value(e[i].r, &m) == EM_OK && em_value_ndarray(&m, &a) == EM_OK && a.ndim == 1 &&
          ((const float *)a.data)[0] == (float)(10 * i));
    em_msg_free(e[i].r);
  }
  em_batcher_get_stats(v.b, &st);
  CHECK_EQ(st.dropped, 1);
  CHECK_EQ(st.requests, 3);
  CHECK_EQ(st.batches, 1);
  CHECK_EQ(st.queued, 0);
  /* after stop: ClosedError */
  em_infer_client *c = client(v.port);
  CHECK_EQ(call_array(c, "errs", 1, 2, 5000000000ull, &r), EM_EREMOTE);
  CHECK(error_is(r, "edgeml.ClosedError: the server is stopping; interface 'errs' takes no more requests"));
  em_msg_free(r);
  em_infer_client_close(c);
  srv_close(&v);
  CHECK_EQ(atomic_load(&bad), 0);
}

static int fn_nop(void *ud, const em_batch *b, em_payload *out) { return EM_MSG_REPLY; }

static void test_opts(void) {
  em_batcher_opts o;
  em_batcher_opts_init(&o);
  CHECK_EQ(o.max_batch_size, 8);
  CHECK_EQ(o.workers, 1);
  em_batcher *b = (em_batcher *)1;
  CHECK_EQ(em_batcher_new(&b, &o), EM_EINVAL); /* no fn */
  CHECK(b == NULL);
  o.fn = fn_nop;
  o.workers = 0;
  CHECK_EQ(em_batcher_new(&b, &o), EM_EINVAL);
  o.workers = 3;
  o.max_batch_size = 0;
  CHECK_EQ(em_batcher_new(&b, &o), EM_EINVAL);
  o.max_batch_size = 2;
  o.alloc = my_alloc;
  CHECK_EQ(em_batcher_new(&b, &o), EM_EINVAL);
  o.alloc = NULL;
  CHECK_EQ(em_batcher_new(&b, NULL), EM_EINVAL);
  CHECK_EQ(em_batcher_new(&b, &o), EM_OK);
  CHECK_EQ(em_batcher_submit(b, NULL), EM_EINVAL);
  em_batcher_stats st;
  em_batcher_get_stats(b, &st);
  CHECK_EQ(st.batches + st.queued, 0);
  em_batcher_free(b); /* never used: stops and joins its 3 workers */
  em_batcher_free(NULL);
}

int main(void) {
  RUN(test_opts);
  RUN(test_rows);
  RUN(test_map);
  RUN(test_errors);
  RUN(test_single);
  RUN(test_stop_and_gone);
  DONE();
}
