/* actor.c: an RL actor in C, a TrainerClient of a Python
 * edgeml.TrainerServer (or of examples/c/learner.c), through the public
 * header alone.
 *
 *   actor HOST PORT [--items N] [--every K] [--capacity C] [--delay-ms D]
 *                   [--version V] [--types a,b] [--keys a,b] [--no-weights]
 *
 * Streams N transitions {"obs": float32[4], "action": int, "reward": float,
 * "done": bool} into its local queued store "transitions" (capacity C),
 * calls update() after every K of them (retrying while the learner is away:
 * a restarted learner gets everything the store still holds again), then
 * one train_step, one request of the first type in --types (default
 * "stats"), one request of the type "no_such_type" (the server refuses it),
 * and waits for a weights broadcast. Transition i has obs = [i, i + 0.25,
 * i + 0.5, i + 0.75], action i % 3, reward i / 2, done (i % 10 == 9).
 *
 * Output: one line per event, a tag then JSON:
 *   open {"session": ..., "broadcast": true}
 *   update {"items": n, "acked": id}       after each successful update
 *   update_error {"error": "ECONNREFUSED", "why": ...}
 *   weights {"version": v, "value": ...}   from the weights thread
 *   train_step {"value": ...}   request {"value": ...}
 *   bad_request {"code": "EREMOTE", "error": {...the error map...}}
 *   stats {...}                              the client's counters
 * Exit status 0 on success, 3 when the handshake was refused (another
 * config: the reason is printed as open_failed), 1 on any other failure. */
#include <edgeml.h>

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SEC 1000000000ull

static pthread_mutex_t out_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t w_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t w_cv = PTHREAD_COND_INITIALIZER;
static uint64_t weights_seen;

/* A growing line of text. */
typedef struct line {
  char buf[8192];
  size_t len;
} line;

static void add(line *l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add(line *l, const char *fmt, ...) {
  if (l->len >= sizeof l->buf - 1) return;
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(l->buf + l->len, sizeof l->buf - l->len, fmt, ap);
  va_end(ap);
  if (n > 0) l->len += (size_t)n < sizeof l->buf - l->len ? (size_t)n : sizeof l->buf - l->len - 1;
}

static void add_str(line *l, const char *s, size_t n) {
  add(l, "\"");
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '"' || c == '\\') add(l, "\\%c", c);
    else if (c < 0x20) add(l, "\\u%04x", c);
    else add(l, "%c", c);
  }
  add(l, "\"");
}

/* A received value as JSON; arrays as {"dtype", "shape", "data" (first 16)}. */
static void add_value(line *l, const em_value *v, int depth) {
  em_iter it;
  em_value e, k;
  if (depth > 8) {
    add(l, "\"...\"");
    return;
  }
  switch (v->type) {
    case EM_T_NIL: add(l, "null"); break;
    case EM_T_BOOL: add(l, v->as.b ? "true" : "false"); break;
    case EM_T_INT: add(l, "%lld", (long long)v->as.i); break;
    case EM_T_UINT: add(l, "%llu", (unsigned long long)v->as.u); break;
    case EM_T_FLOAT: add(l, "%.17g", v->as.f); break;
    case EM_T_STR: add_str(l, v->as.str, v->len); break;
    case EM_T_BIN: add(l, "{\"bin\": %u}", v->len); break;
    case EM_T_LIST:
    case EM_T_TUPLE:
    case EM_T_SET: {
      add(l, "[");
      em_iter_init(&it, v);
      for (int i = 0; em_iter_next(&it, &e); i++) {
        if (i) add(l, ", ");
        add_value(l, &e, depth + 1);
      }
      add(l, "]");
      break;
    }
    case EM_T_MAP: {
      add(l, "{");
      em_iter_init(&it, v);
      for (int i = 0; em_iter_next(&it, &k) && em_iter_next(&it, &e); i++) {
        if (i) add(l, ", ");
        if (k.type == EM_T_STR) add_str(l, k.as.str, k.len);
        else add(l, "\"?\"");
        add(l, ": ");
        add_value(l, &e, depth + 1);
      }
      add(l, "}");
      break;
    }
    case EM_T_NDARRAY: {
      em_array a;
      if (em_value_ndarray(v, &a)) {
        add(l, "\"bad array\"");
        break;
      }
      add(l, "{\"dtype\": \"%s\", \"shape\": [", a.dtype);
      size_t count = 1;
      for (uint32_t i = 0; i < a.ndim; i++) {
        add(l, "%s%llu", i ? ", " : "", (unsigned long long)a.shape[i]);
        count *= (size_t)a.shape[i];
      }
      add(l, "], \"data\": [");
      for (size_t i = 0; i < count && i < 16; i++) {
        if (i) add(l, ", ");
        if (strcmp(a.dtype, "<f4") == 0) add(l, "%.9g", ((const float *)a.data)[i]);
        else if (strcmp(a.dtype, "<f8") == 0) add(l, "%.17g", ((const double *)a.data)[i]);
        else if (strcmp(a.dtype, "<i8") == 0) add(l, "%lld", (long long)((const int64_t *)a.data)[i]);
        else if (strcmp(a.dtype, "<i4") == 0) add(l, "%d", ((const int32_t *)a.data)[i]);
        else add(l, "null");
      }
      add(l, "]}");
      break;
    }
    default: add(l, "\"%s\"", em_type_name(v->type)); break;
  }
}

static void emit(const char *tag, line *l) {
  pthread_mutex_lock(&out_mu);
  printf("%s %.*s\n", tag, (int)l->len, l->buf);
  fflush(stdout);
  pthread_mutex_unlock(&out_mu);
}

/* {"value": <the message's value>} */
static void emit_msg(const char *tag, const em_msg *m, const char *extra) {
  line l = {.len = 0};
  em_value v;
  add(&l, "{%s\"value\": ", extra ? extra : "");
  if (em_msg_value(m, &v) == EM_OK) add_value(&l, &v, 0);
  else add(&l, "\"undecodable\"");
  add(&l, "}");
  emit(tag, &l);
}

static void on_weights(void *ud, const em_msg *weights, uint64_t version) {
  (void)ud;
  char extra[64];
  snprintf(extra, sizeof extra, "\"version\": %llu, ", (unsigned long long)version);
  emit_msg("weights", weights, extra);
  pthread_mutex_lock(&w_mu);
  weights_seen = version;
  pthread_cond_broadcast(&w_cv);
  pthread_mutex_unlock(&w_mu);
}

static void sleep_ms(unsigned ms) {
  struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* Split "a,b" into at most 16 names (pointing into s, which is modified). */
static size_t split(char *s, const char **out) {
  size_t n = 0;
  for (char *tok = strtok(s, ","); tok && n < 16; tok = strtok(NULL, ",")) out[n++] = tok;
  return n;
}

static int update_retrying(em_trainer_client *c, uint64_t items, uint64_t deadline_s) {
  uint64_t end = em_mono_ns() + deadline_s * SEC;
  for (;;) {
    int rc = em_trainer_update(c, 5 * SEC);
    line l = {.len = 0};
    if (rc == EM_OK) {
      int64_t acked = -1;
      em_trainer_server_last_id(c, "transitions", 5 * SEC, &acked);
      add(&l, "{\"items\": %llu, \"acked\": %lld}", (unsigned long long)items, (long long)acked);
      emit("update", &l);
      return 0;
    }
    char why[512];
    em_trainer_last_error(c, why, sizeof why);
    add(&l, "{\"error\": \"%s\", \"why\": ", em_errname(rc));
    add_str(&l, rc == EM_EREMOTE || rc == EM_EPROTO ? why : em_strerror(rc),
            strlen(rc == EM_EREMOTE || rc == EM_EPROTO ? why : em_strerror(rc)));
    add(&l, "}");
    emit("update_error", &l);
    if (rc == EM_EREMOTE || em_mono_ns() > end) return 1; /* refused, or the learner stays away */
    sleep_ms(100);
  }
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s HOST PORT [--items N] [--every K] [--capacity C] [--delay-ms D] [--version V] "
                    "[--types a,b] [--keys a,b] [--no-weights]\n", argv[0]);
    return 1;
  }
  const char *host = argv[1];
  uint16_t port = (uint16_t)atoi(argv[2]);
  unsigned items = 50, every = 10, delay_ms = 0;
  size_t capacity = 1000;
  int want_weights = 1;
  const char *version = NULL;
  const char *types[16] = {"stats"}, *keys[16];
  size_t ntypes = 1, nkeys = 0;
  int have_keys = 0;
  for (int i = 3; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (!strcmp(a, "--no-weights")) { want_weights = 0; continue; }
    if (!v) { fprintf(stderr, "%s needs a value\n", a); return 1; }
    i++;
    if (!strcmp(a, "--items")) items = (unsigned)atoi(v);
    else if (!strcmp(a, "--every")) every = (unsigned)atoi(v);
    else if (!strcmp(a, "--capacity")) capacity = (size_t)atol(v);
    else if (!strcmp(a, "--delay-ms")) delay_ms = (unsigned)atoi(v);
    else if (!strcmp(a, "--version")) version = v;
    else if (!strcmp(a, "--types")) ntypes = split(argv[i], types);
    else if (!strcmp(a, "--keys")) { nkeys = split(argv[i], keys); have_keys = 1; }
    else { fprintf(stderr, "unknown option %s\n", a); return 1; }
  }
  if (every == 0) every = 1;

  /* the config must equal the server's TrainerConfig: payload_keys,
   * request_types and version are compared in the handshake */
  char errbuf[1024] = "";
  em_trainer_client_opts o;
  em_trainer_client_opts_init(&o);
  o.config.broadcast_port = 0; /* use the port the server announces */
  o.config.request_types = types;
  o.config.n_request_types = ntypes;
  o.config.payload_keys = have_keys ? keys : NULL;
  o.config.n_payload_keys = nkeys;
  o.config.version = version;
  o.errbuf = errbuf;
  o.errbuf_len = sizeof errbuf;
  em_trainer_client *c;
  int rc = em_trainer_client_open(&c, host, port, &o);
  if (rc) {
    line l = {.len = 0};
    add(&l, "{\"error\": \"%s\", \"why\": ", em_errname(rc));
    add_str(&l, errbuf, strlen(errbuf));
    add(&l, "}");
    emit("open_failed", &l);
    return rc == EM_EHANDSHAKE ? 3 : 1;
  }
  int status = 0;
  if ((rc = em_trainer_add_store(c, "transitions", capacity))) {
    fprintf(stderr, "add_store: %s\n", em_strerror(rc));
    em_trainer_client_close(c);
    return 1;
  }
  if (want_weights && (rc = em_trainer_recv_weights(c, on_weights, NULL))) {
    fprintf(stderr, "recv_weights: %s\n", em_strerror(rc));
    em_trainer_client_close(c);
    return 1;
  }
  {
    line l = {.len = 0};
    add(&l, "{\"session\": \"%s\", \"broadcast\": %s}", em_trainer_session(c), want_weights ? "true" : "false");
    emit("open", &l);
  }

  /* the transitions: one payload, reused (insert copies the item) */
  em_payload *p = em_payload_new();
  if (!p) return 1;
  for (unsigned i = 0; i < items && !status; i++) {
    float obs[4] = {(float)i, (float)i + 0.25f, (float)i + 0.5f, (float)i + 0.75f};
    uint64_t shape[1] = {4};
    em_payload_reset(p);
    em_put_map(p, 4);
    em_put_cstr(p, "obs");
    em_put_ndarray(p, "<f4", 1, shape, obs, sizeof obs);
    em_put_cstr(p, "action");
    em_put_int(p, i % 3);
    em_put_cstr(p, "reward");
    em_put_double(p, i / 2.0);
    em_put_cstr(p, "done");
    em_put_bool(p, i % 10 == 9);
    if ((rc = em_trainer_insert(c, "transitions", p, NULL))) {
      fprintf(stderr, "insert: %s\n", em_strerror(rc));
      status = 1;
      break;
    }
    if ((i + 1) % every == 0 || i + 1 == items) status = update_retrying(c, i + 1, 30);
    if (delay_ms) sleep_ms(delay_ms);
  }

  /* one train_step: the new weights come back */
  em_msg *reply = NULL;
  if (!status) {
    float obs[4] = {1, 2, 3, 4};
    uint64_t shape[1] = {4};
    em_payload_reset(p);
    em_put_map(p, 1);
    em_put_cstr(p, "obs");
    em_put_ndarray(p, "<f4", 1, shape, obs, sizeof obs);
    rc = em_trainer_train_step(c, p, 10 * SEC, &reply);
    if (rc == EM_OK) emit_msg("train_step", reply, NULL);
    else {
      char why[512] = "";
      if (reply) em_msg_error(reply, why, sizeof why);
      fprintf(stderr, "train_step: %s %s\n", em_errname(rc), why);
      status = 1;
    }
    em_msg_free(reply);
    reply = NULL;
  }
  /* one custom request */
  if (!status) {
    em_payload_reset(p);
    em_put_map(p, 1);
    em_put_cstr(p, "items");
    em_put_uint(p, items);
    rc = em_trainer_request(c, types[0], p, 10 * SEC, &reply);
    if (rc == EM_OK) emit_msg("request", reply, NULL);
    else {
      char why[512] = "";
      if (reply) em_msg_error(reply, why, sizeof why);
      fprintf(stderr, "request: %s %s\n", em_errname(rc), why);
      status = 1;
    }
    em_msg_free(reply);
    reply = NULL;
  }
  /* a type outside request_types: the server answers
   * edgeml.UnknownRequestTypeError (with the types it has) */
  if (!status) {
    rc = em_trainer_request(c, "no_such_type", NULL, 10 * SEC, &reply);
    char extra[64];
    snprintf(extra, sizeof extra, "\"code\": \"%s\", ", em_errname(rc));
    if (reply) emit_msg("bad_request", reply, extra);
    else {
      line l = {.len = 0};
      add(&l, "{\"code\": \"%s\"}", em_errname(rc));
      emit("bad_request", &l);
    }
    if (rc != EM_EREMOTE) status = 1;
    em_msg_free(reply);
    reply = NULL;
  }
  /* the weights: the current value arrives on subscribing, so wait a little */
  if (!status && want_weights) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 10;
    pthread_mutex_lock(&w_mu);
    while (weights_seen == 0)
      if (pthread_cond_timedwait(&w_cv, &w_mu, &until)) break;
    uint64_t seen = weights_seen;
    pthread_mutex_unlock(&w_mu);
    if (!seen) {
      fprintf(stderr, "no weights within 10 s\n");
      status = 1;
    }
  }
  em_trainer_client_stats st;
  em_trainer_client_get_stats(c, &st);
  line l = {.len = 0};
  add(&l,
      "{\"items_inserted\": %llu, \"items_sent\": %llu, \"items_dropped_locally\": %llu, "
      "\"resends_after_restart\": %llu, \"weights_received\": %llu}",
      (unsigned long long)st.items_inserted, (unsigned long long)st.items_sent,
      (unsigned long long)st.items_dropped_locally, (unsigned long long)st.resends_after_restart,
      (unsigned long long)st.weights_received);
  emit("stats", &l);
  em_payload_free(p);
  em_trainer_client_close(c);
  return status;
}
