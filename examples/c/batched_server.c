/* batched_server.c: an InferenceServer in C whose "mlp" interface is
 * dynamically batched (edgeml_batch.h), called from Python's
 * edgeml.InferenceClient like any InferenceServer.
 *
 *   batched_server PORT [SECONDS] [MAX_BATCH] [MAX_DELAY_MS] [WORKERS]
 *
 * PORT 0 = any free port; prints "ports P" once it serves; runs until
 * SIGTERM/SIGINT or for SECONDS (0 = no limit); on the way out it answers
 * what is queued, prints "stats mlp B R M E" (batches, requests, max
 * batch, errors) and exits 0. Defaults: 16 rows a batch, 2 ms, 2 workers.
 *
 * Interfaces:
 *   mlp    batched. A float32 array of shape (4,) -> float32 (2,), the
 *          output of a fixed 4-16-2 MLP (weights below; tanh hidden
 *          layer). Or a dict {"obs": float32 (4,), anything else...} ->
 *          {"action": float32 (2,), "echo": the caller's other values by
 *          key (a dict), "version": "mlp-1"}. Any other payload is refused
 *          with edgeml.InvalidArgumentError. An obs whose first value is
 *          -999 poisons its batch: every caller of it gets a ValueError.
 *   fail   batched; every batch fails with ValueError("fail: batch of n").
 *   stats  plain: {"mlp": {...}, "fail": {...}} of em_batcher_get_stats.
 *   __interfaces__ and an unknown name as in the InferenceServer role.
 *
 * Not the em_infer_server role: its interfaces get the payload, not the
 * request, so they cannot defer it. This is a plain em_server (service
 * "inference") with its own handler, which defers the batched interfaces'
 * requests (em_server_defer) to their batcher (em_batcher_submit). */
#include <edgeml.h>
#include <edgeml_batch.h>

#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define IN 4
#define HID 16
#define OUT 2

/* W1[h][i] = sin(h * IN + i) / 2, b1[h] = cos(h) / 4; W2[o][h] =
 * cos(o * HID + h) / 4, b2[o] = 0.1 * (o + 1) (the test computes the same). */
static float W1[HID][IN], B1[HID], W2[OUT][HID], B2[OUT];

static void init_weights(void) {
  for (int h = 0; h < HID; h++) {
    for (int i = 0; i < IN; i++) W1[h][i] = (float)(sin((double)(h * IN + i)) / 2);
    B1[h] = (float)(cos((double)h) / 4);
  }
  for (int o = 0; o < OUT; o++) {
    for (int h = 0; h < HID; h++) W2[o][h] = (float)(cos((double)(o * HID + h)) / 4);
    B2[o] = (float)(0.1 * (o + 1));
  }
}

/* y (n, OUT) = mlp(x (n, IN)): one pass over the batch. */
static void mlp(const float *x, float *y, uint32_t n) {
  for (uint32_t r = 0; r < n; r++) {
    float hid[HID];
    for (int h = 0; h < HID; h++) {
      float s = B1[h];
      for (int i = 0; i < IN; i++) s += W1[h][i] * x[r * IN + i];
      hid[h] = tanhf(s);
    }
    for (int o = 0; o < OUT; o++) {
      float s = B2[o];
      for (int h = 0; h < HID; h++) s += W2[o][h] * hid[h];
      y[r * OUT + o] = s;
    }
  }
}

static int bad_shape(const em_array *a) {
  return strcmp(a->dtype, "<f4") != 0 || a->ndim != 2 || a->shape[1] != IN;
}

/* The batch function of "mlp": runs on a worker thread. */
static int mlp_batch(void *ud, const em_batch *b, em_payload *out) {
  (void)ud;
  uint32_t n = em_batch_size(b);
  int is_map = em_batch_kind(b) == EM_BATCH_MAP;
  em_array x;
  if (em_batch_array(b, is_map ? "obs" : NULL, &x) != EM_OK || bad_shape(&x)) {
    em_payload_begin_error(out, "ValueError",
                           is_map ? "mlp takes {\"obs\": float32 array of shape (4,), ...}"
                                  : "mlp takes a float32 array of shape (4,)",
                           NULL, 0);
    return EM_MSG_ERROR;
  }
  const float *xf = x.data; /* (n, IN), stacked by the batcher */
  for (uint32_t r = 0; r < n; r++)
    if (xf[r * IN] == -999.0f) {
      char msg[96];
      snprintf(msg, sizeof msg, "poisoned input in a batch of %u", n);
      em_payload_begin_error(out, "ValueError", msg, NULL, 0);
      return EM_MSG_ERROR;
    }
  float *y = malloc((size_t)n * OUT * sizeof *y);
  if (!y) return EM_ENOMEM; /* every caller gets a RuntimeError */
  mlp(xf, y, n);
  em_payload_on_release(out, free, y); /* runs once the replies are built */
  uint64_t shape[2] = {n, OUT};
  if (!is_map) { /* (n, OUT): caller i gets row i */
    em_put_ndarray(out, "<f4", 2, shape, y, (size_t)n * OUT * sizeof *y);
    return EM_MSG_REPLY;
  }
  /* {"action": (n, OUT) -> a row each, "echo": [n dicts] -> one each,
   *  "version": a str -> the same for every caller} */
  em_put_map(out, 3);
  em_put_cstr(out, "action");
  em_put_ndarray(out, "<f4", 2, shape, y, (size_t)n * OUT * sizeof *y);
  em_put_cstr(out, "echo");
  em_put_list(out, n);
  uint32_t nk = em_batch_nkeys(b);
  for (uint32_t i = 0; i < n; i++) {
    em_put_map(out, nk - 1);
    for (uint32_t j = 0; j < nk; j++) {
      const char *k;
      size_t kl;
      em_batch_key(b, j, &k, &kl, NULL);
      if (kl == 3 && memcmp(k, "obs", 3) == 0) continue;
      char key[256];
      snprintf(key, sizeof key, "%.*s", (int)kl, k);
      em_value v;
      em_batch_value(b, key, i, &v);
      em_put_str(out, k, kl);
      em_put_value(out, &v); /* borrowed from the request: read before it is freed */
    }
  }
  em_put_cstr(out, "version");
  em_put_cstr(out, "mlp-1");
  return EM_MSG_REPLY;
}

static int fail_batch(void *ud, const em_batch *b, em_payload *out) {
  (void)ud;
  char msg[64];
  snprintf(msg, sizeof msg, "fail: batch of %u", em_batch_size(b));
  em_payload_begin_error(out, "ValueError", msg, NULL, 0);
  return EM_MSG_ERROR;
}

/* ------------------------------------------------------------- the server */

static const char *const NAMES[] = {"fail", "mlp", "stats"}; /* sorted */
#define NNAMES 3

typedef struct app {
  em_server *s;
  em_batcher *mlp, *fail;
} app;

static void put_stats(em_payload *p, em_batcher *b) {
  em_batcher_stats st;
  em_batcher_get_stats(b, &st);
  em_put_map(p, 7);
  em_put_cstr(p, "batches");
  em_put_uint(p, st.batches);
  em_put_cstr(p, "requests");
  em_put_uint(p, st.requests);
  em_put_cstr(p, "max_batch");
  em_put_uint(p, st.max_batch);
  em_put_cstr(p, "errors");
  em_put_uint(p, st.errors);
  em_put_cstr(p, "queued");
  em_put_uint(p, st.queued);
  em_put_cstr(p, "refused");
  em_put_uint(p, st.refused);
  em_put_cstr(p, "dropped");
  em_put_uint(p, st.dropped);
}

static int handler(void *ud, const em_msg *req, em_payload *reply) {
  app *a = ud;
  em_value method, payload;
  if (em_msg_request(req, &method, &payload) != EM_OK) return EM_EDECODE; /* closes: malformed */
  em_batcher *b = em_value_is(&method, "mlp") ? a->mlp : em_value_is(&method, "fail") ? a->fail : NULL;
  if (b) {
    em_pending *p = em_server_defer(a->s, req);
    if (!p) {
      em_payload_begin_error(reply, "MemoryError", "out of memory deferring a request", NULL, 0);
      return EM_MSG_ERROR;
    }
    em_batcher_submit(b, p); /* owns p: queued, or answered with an error */
    return EM_MSG_DEFER;
  }
  if (em_value_is(&method, "stats")) {
    em_put_map(reply, 2);
    em_put_cstr(reply, "mlp");
    put_stats(reply, a->mlp);
    em_put_cstr(reply, "fail");
    put_stats(reply, a->fail);
    return EM_MSG_REPLY;
  }
  if (em_value_is(&method, "__interfaces__")) {
    em_put_list(reply, NNAMES);
    for (int i = 0; i < NNAMES; i++) em_put_cstr(reply, NAMES[i]);
    return EM_MSG_REPLY;
  }
  char msg[200];
  snprintf(msg, sizeof msg, "no interface '%.*s' on this server; it has: 'fail', 'mlp', 'stats'",
           (int)(method.len > 60 ? 60 : method.len), method.as.str);
  em_payload_begin_error(reply, "edgeml.UnknownInterfaceError", msg, "", 1);
  em_put_cstr(reply, "interfaces");
  em_put_list(reply, NNAMES);
  for (int i = 0; i < NNAMES; i++) em_put_cstr(reply, NAMES[i]);
  return EM_MSG_ERROR;
}

static volatile sig_atomic_t stop_flag;
static void on_signal(int sig) {
  (void)sig;
  stop_flag = 1;
}
static uint64_t end_ns;

/* On the loop thread: when it is time, answer what is queued (the workers
 * hand their replies to this loop, which writes them after the tick) and
 * stop. */
static int on_tick(void *ud) {
  app *a = ud;
  if (!stop_flag && !(end_ns && em_mono_ns() >= end_ns)) return 0;
  em_batcher_stop(a->mlp);
  em_batcher_stop(a->fail);
  return 1;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s PORT [SECONDS] [MAX_BATCH] [MAX_DELAY_MS] [WORKERS]\n", argv[0]);
    return 1;
  }
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  if (argc > 2 && atof(argv[2]) > 0) end_ns = em_mono_ns() + (uint64_t)(atof(argv[2]) * 1e9);
  init_weights();

  app a = {0};
  em_batcher_opts bo;
  em_batcher_opts_init(&bo);
  bo.name = "mlp";
  bo.max_batch_size = argc > 3 ? (uint32_t)atoi(argv[3]) : 16;
  bo.max_delay_ns = (uint64_t)((argc > 4 ? atof(argv[4]) : 2.0) * 1e6);
  bo.workers = argc > 5 ? (uint32_t)atoi(argv[5]) : 2;
  bo.fn = mlp_batch;
  int rc = em_batcher_new(&a.mlp, &bo);
  if (rc == EM_OK) {
    bo.name = "fail";
    bo.workers = 1;
    bo.fn = fail_batch;
    rc = em_batcher_new(&a.fail, &bo);
  }
  if (rc) {
    fprintf(stderr, "batched_server: batcher: %s\n", em_strerror(rc));
    em_batcher_free(a.mlp);
    return 1;
  }

  em_server_opts o;
  em_server_opts_init(&o);
  o.host = "127.0.0.1";
  o.port = (uint16_t)atoi(argv[1]);
  o.service = "inference";
  o.handler = handler;
  o.handler_ud = &a;
  o.handler_checks_body = 1; /* em_msg_request checks it */
  o.tick = on_tick;
  o.tick_ud = &a;
  o.tick_ns = 10000000ull;
  rc = em_server_open(&a.s, &o);
  if (rc) {
    fprintf(stderr, "batched_server: %s\n", em_strerror(rc));
    em_batcher_free(a.mlp);
    em_batcher_free(a.fail);
    return 1;
  }
  printf("ports %u\n", em_server_port(a.s));
  fflush(stdout);
  rc = em_server_run(a.s);
  em_batcher_stop(a.mlp); /* (a no-op after the tick's) */
  em_batcher_stop(a.fail);
  em_batcher_stats st;
  em_batcher_get_stats(a.mlp, &st);
  printf("stats mlp %llu %llu %llu %llu\n", (unsigned long long)st.batches, (unsigned long long)st.requests,
         (unsigned long long)st.max_batch, (unsigned long long)st.errors);
  fflush(stdout);
  em_server_close(a.s);
  em_batcher_free(a.mlp);
  em_batcher_free(a.fail);
  if (rc != EM_OK && rc != EM_EINTR) {
    fprintf(stderr, "batched_server: %s\n", em_strerror(rc));
    return 1;
  }
  return 0;
}
