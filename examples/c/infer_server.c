/* infer_server.c: an edgeml InferenceServer in C, called from Python's
 * edgeml.InferenceClient as any Python InferenceServer would be.
 *
 *   infer_server PORT [SECONDS]
 *
 * PORT 0 = any free port; prints "ports P" once it serves; runs until
 * SIGTERM/SIGINT or for SECONDS; exit status 0.
 * Interfaces:
 *   sum   a float32 array (any shape) -> {"sum": float, "n": int,
 *         "shape": [dims], "dtype": "<f4"}; anything else: TypeError
 *   echo  any value -> the same value (arrays included, sent back from
 *         the request's own memory)
 *   scale {"x": float32 array, "k": number} -> float32 array x * k
 *   fail  always a ValueError reply
 *   stop  replies {"stopping": True} and stops the server */
#include <edgeml.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static volatile sig_atomic_t stop_flag;
static void on_signal(int sig) {
  (void)sig;
  stop_flag = 1;
}

static uint64_t end_ns;

static int on_tick(void *ud) {
  (void)ud;
  return stop_flag || (end_ns && em_mono_ns() >= end_ns);
}

static int iface_sum(void *ud, const em_value *payload, em_payload *reply) {
  (void)ud;
  em_array a;
  if (em_value_ndarray(payload, &a) != EM_OK || strcmp(a.dtype, "<f4") != 0) {
    char msg[128];
    snprintf(msg, sizeof msg, "sum takes a float32 array, got %s",
             payload->type == EM_T_NDARRAY ? "another dtype" : em_type_name(payload->type));
    em_payload_begin_error(reply, "TypeError", msg, NULL, 0);
    return EM_MSG_ERROR;
  }
  const float *f = a.data;
  size_t n = a.len_bytes / sizeof *f;
  double s = 0;
  for (size_t i = 0; i < n; i++) s += f[i];
  em_put_map(reply, 4);
  em_put_cstr(reply, "sum");
  em_put_double(reply, s);
  em_put_cstr(reply, "n");
  em_put_int(reply, (int64_t)n);
  em_put_cstr(reply, "shape");
  em_put_list(reply, a.ndim);
  for (uint32_t i = 0; i < a.ndim; i++) em_put_uint(reply, a.shape[i]);
  em_put_cstr(reply, "dtype");
  em_put_cstr(reply, a.dtype);
  return EM_MSG_REPLY;
}

static int iface_echo(void *ud, const em_value *payload, em_payload *reply) {
  (void)ud;
  em_put_value(reply, payload); /* the role keeps the request until the reply is sent */
  return EM_MSG_REPLY;
}

static int iface_scale(void *ud, const em_value *payload, em_payload *reply) {
  (void)ud;
  em_value x, k;
  em_array a;
  double kk;
  if (payload->type != EM_T_MAP || em_value_get(payload, "x", &x) != 1 || em_value_get(payload, "k", &k) != 1 ||
      em_value_ndarray(&x, &a) != EM_OK || strcmp(a.dtype, "<f4") != 0 || em_value_double(&k, &kk) != EM_OK) {
    em_payload_begin_error(reply, "ValueError", "scale takes {\"x\": float32 array, \"k\": number}", NULL, 0);
    return EM_MSG_ERROR;
  }
  size_t n = a.len_bytes / sizeof(float);
  float *out = malloc(a.len_bytes ? a.len_bytes : 1);
  if (!out) return EM_ENOMEM; /* the role turns this into an error reply */
  const float *in = a.data;
  for (size_t i = 0; i < n; i++) out[i] = (float)(in[i] * kk);
  em_payload_on_release(reply, free, out); /* borrowed until sent */
  em_put_ndarray(reply, "<f4", a.ndim, a.shape, out, a.len_bytes);
  return EM_MSG_REPLY;
}

static int iface_fail(void *ud, const em_value *payload, em_payload *reply) {
  (void)ud;
  (void)payload;
  em_payload_begin_error(reply, "ValueError", "this interface always fails", "infer_server.c iface_fail\n", 0);
  return EM_MSG_ERROR;
}

static int iface_stop(void *ud, const em_value *payload, em_payload *reply) {
  (void)payload;
  em_infer_server_stop(ud); /* from the loop thread: it stops after this reply */
  em_put_map(reply, 1);
  em_put_cstr(reply, "stopping");
  em_put_bool(reply, 1);
  return EM_MSG_REPLY;
}

int main(int argc, char **argv) {
  if (argc < 2) {
    fprintf(stderr, "usage: %s PORT [SECONDS]\n", argv[0]);
    return 1;
  }
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  if (argc > 2) end_ns = em_mono_ns() + (uint64_t)(atof(argv[2]) * 1e9);

  em_infer_server_opts o;
  em_infer_server_opts_init(&o);
  o.server.host = "127.0.0.1";
  o.server.port = (uint16_t)atoi(argv[1]);
  o.server.tick = on_tick;
  o.server.tick_ns = 10000000ull;
  em_infer_server *s;
  int rc = em_infer_server_open(&s, &o);
  if (rc) {
    fprintf(stderr, "infer_server: %s\n", em_strerror(rc));
    return 1;
  }
  if (em_infer_server_register(s, "sum", iface_sum, NULL) || em_infer_server_register(s, "echo", iface_echo, NULL) ||
      em_infer_server_register(s, "scale", iface_scale, NULL) ||
      em_infer_server_register(s, "fail", iface_fail, NULL) || em_infer_server_register(s, "stop", iface_stop, s) ||
      em_infer_server_register(s, "__x", iface_echo, NULL) != EM_EINVAL) {
    fprintf(stderr, "infer_server: register failed\n");
    em_infer_server_close(s);
    return 1;
  }
  printf("ports %u\n", em_infer_server_port(s));
  fflush(stdout);
  rc = em_infer_server_run(s);
  em_infer_server_close(s);
  if (rc != EM_OK && rc != EM_EINTR) {
    fprintf(stderr, "infer_server: %s\n", em_strerror(rc));
    return 1;
  }
  return 0;
}
