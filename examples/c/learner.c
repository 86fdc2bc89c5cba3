/* learner.c: a GPU learner's side in C, a TrainerServer that Python
 * edgeml.TrainerClient actors (or examples/c/actor.c) talk to, through the
 * public header alone.
 *
 *   learner [PORT] [--broadcast-port B] [--version V] [--types a,b]
 *           [--keys a,b]
 *
 * Serves on PORT (default 0: any free port) with a weights broadcast port
 * (default 0: any free one), a data store "transitions" whose items it
 * prints, train_step (each call is a "training step": it answers and
 * publishes new weights {"w": float32[3] all = step, "step": step}), and
 * custom requests of the --types (default "stats") answered with
 * {"type", "items", "payload"}. Weights {"w": zeros, "step": 0} are
 * published before it serves. Stops when stdin closes (or a line "quit").
 *
 * Output: one line per event, a tag then JSON:
 *   ready {"port": P, "broadcast_port": B, "instance": "..."}
 *   item {"store": "transitions", "session": ..., "id": n, "value": {...}}
 *   train_step {"step": n, "value": <payload>}
 *   request {"type": t, "value": <payload>}
 *   stopped {...the server's counters...}
 * Exit status 0 on a clean stop, 1 on failure. */
#include <edgeml.h>

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static pthread_mutex_t out_mu = PTHREAD_MUTEX_INITIALIZER;

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

typedef struct learner {
  em_trainer_server *s;
  uint64_t step, items;
  em_payload *weights; /* reused for every publish (the loop thread only) */
} learner;

/* Publish {"w": float32[3] = step, "step": step}: the frame is copied, so
 * the array may live on the stack. */
static int publish(learner *L) {
  float w[3] = {(float)L->step, (float)L->step, (float)L->step};
  uint64_t shape[1] = {3};
  em_payload_reset(L->weights);
  em_put_map(L->weights, 2);
  em_put_cstr(L->weights, "w");
  em_put_ndarray(L->weights, "<f4", 1, shape, w, sizeof w);
  em_put_cstr(L->weights, "step");
  em_put_uint(L->weights, L->step);
  return em_trainer_server_publish_weights(L->s, L->weights, NULL);
}

/* Called on the loop thread for each new item, in order. A real learner
 * copies it into its replay buffer (em_put_value + em_frame_encode, or its
 * own structs); this one prints it. */
static int on_item(void *ud, const char *store, const char *session, uint64_t id, const em_value *item) {
  learner *L = ud;
  L->items++;
  line l = {.len = 0};
  add(&l, "{\"store\": ");
  add_str(&l, store, strlen(store));
  add(&l, ", \"session\": ");
  add_str(&l, session, strlen(session));
  add(&l, ", \"id\": %llu, \"value\": ", (unsigned long long)id);
  add_value(&l, item, 0);
  add(&l, "}");
  emit("item", &l);
  return 0;
}

static int on_train_step(void *ud, const em_value *payload, em_payload *reply) {
  learner *L = ud;
  L->step++;
  line l = {.len = 0};
  add(&l, "{\"step\": %llu, \"value\": ", (unsigned long long)L->step);
  add_value(&l, payload, 0);
  add(&l, "}");
  emit("train_step", &l);
  int rc = publish(L);
  if (rc) return em_payload_begin_error(reply, "RuntimeError", em_strerror(rc), NULL, 0), EM_MSG_ERROR;
  /* the reply: the new weights (the array is borrowed until the reply is
   * sent: keep it in memory that outlives this call) */
  static float w[3];
  uint64_t shape[1] = {3};
  w[0] = w[1] = w[2] = (float)L->step;
  em_put_map(reply, 2);
  em_put_cstr(reply, "w");
  em_put_ndarray(reply, "<f4", 1, shape, w, sizeof w);
  em_put_cstr(reply, "step");
  em_put_uint(reply, L->step);
  return EM_MSG_REPLY;
}

static int on_request(void *ud, const char *type, const em_value *payload, em_payload *reply) {
  learner *L = ud;
  line l = {.len = 0};
  add(&l, "{\"type\": ");
  add_str(&l, type, strlen(type));
  add(&l, ", \"value\": ");
  add_value(&l, payload, 0);
  add(&l, "}");
  emit("request", &l);
  em_put_map(reply, 3);
  em_put_cstr(reply, "type");
  em_put_cstr(reply, type);
  em_put_cstr(reply, "items");
  em_put_uint(reply, L->items);
  em_put_cstr(reply, "payload");
  em_put_value(reply, payload); /* arrays borrowed from the request: it lives until the reply is sent */
  return EM_MSG_REPLY;
}

static size_t split(char *s, const char **out) {
  size_t n = 0;
  for (char *tok = strtok(s, ","); tok && n < 16; tok = strtok(NULL, ",")) out[n++] = tok;
  return n;
}

int main(int argc, char **argv) {
  learner L = {0};
  em_trainer_server_opts o;
  em_trainer_server_opts_init(&o);
  o.config.port = 0;
  o.config.broadcast_port = 0;
  o.host = "127.0.0.1";
  const char *types[16] = {"stats"}, *keys[16];
  size_t ntypes = 1, nkeys = 0;
  int have_keys = 0;
  for (int i = 1; i < argc; i++) {
    const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
    if (a[0] != '-') { o.config.port = (uint16_t)atoi(a); continue; }
    if (!v) { fprintf(stderr, "%s needs a value\n", a); return 1; }
    i++;
    if (!strcmp(a, "--broadcast-port")) o.config.broadcast_port = atoi(v);
    else if (!strcmp(a, "--version")) o.config.version = v;
    else if (!strcmp(a, "--types")) ntypes = split(argv[i], types);
    else if (!strcmp(a, "--keys")) { nkeys = split(argv[i], keys); have_keys = 1; }
    else if (!strcmp(a, "--host")) o.host = v;
    else { fprintf(stderr, "unknown option %s\n", a); return 1; }
  }
  o.config.request_types = types;
  o.config.n_request_types = ntypes;
  o.config.payload_keys = have_keys ? keys : NULL;
  o.config.n_payload_keys = nkeys;
  o.train_step = on_train_step;
  o.train_step_ud = &L;
  o.request = on_request;
  o.request_ud = &L;
  int rc = em_trainer_server_open(&L.s, &o);
  if (rc) {
    fprintf(stderr, "cannot open the trainer server: %s\n", em_strerror(rc));
    return 1;
  }
  L.weights = em_payload_new();
  if (!L.weights || em_trainer_server_add_store(L.s, "transitions", on_item, &L) || publish(&L) ||
      em_trainer_server_start(L.s)) {
    fprintf(stderr, "cannot start the trainer server\n");
    em_payload_free(L.weights);
    em_trainer_server_close(L.s);
    return 1;
  }
  line l = {.len = 0};
  add(&l, "{\"port\": %u, \"broadcast_port\": %u, \"instance\": \"%s\"}", em_trainer_server_port(L.s),
      em_trainer_server_broadcast_port(L.s), em_trainer_server_instance(L.s));
  emit("ready", &l);
  char buf[256];
  while (fgets(buf, sizeof buf, stdin))
    if (!strncmp(buf, "quit", 4)) break;
  em_trainer_server_stop(L.s);
  rc = em_trainer_server_wait(L.s, 10000000000ull);
  em_trainer_server_stats st;
  em_trainer_server_get_stats(L.s, &st);
  l.len = 0;
  add(&l, "{\"items_received\": %llu, \"duplicates_dropped\": %llu, \"items_missed\": %llu, "
          "\"restarted_replies\": %llu, \"sessions\": %llu}",
      (unsigned long long)st.items_received, (unsigned long long)st.duplicates_dropped,
      (unsigned long long)st.items_missed, (unsigned long long)st.restarted_replies,
      (unsigned long long)st.sessions);
  emit("stopped", &l);
  em_trainer_server_close(L.s);
  em_payload_free(L.weights);
  return rc ? 1 : 0;
}
