/* robot_server.c: a robot as an edgeml EdgeServer, in C. Python's
 * edgeml.EdgeClient reads its observations and sends it actions exactly as
 * it would to a Python edgeml.EdgeServer.
 *
 *   robot_server PORT BROADCAST_PORT [SECONDS [noact]]
 *
 * PORT 0 / BROADCAST_PORT 0 = any free port; BROADCAST_PORT -1 = no
 * observation stream. Prints "ports P B" (the bound ports) on stdout once
 * it serves. Runs until SIGTERM/SIGINT, or for SECONDS (0 = no limit).
 * "noact": serve without an action callback. Exit status 0.
 *
 * Config: observation_keys ["image", "joints"], action_keys ["move",
 * "reset", "fault", "broken"], version "robot/1".
 *   image  uint8 480x640x3, pixel [y, x, c] = (y + 2x + 3c) mod 256
 *   joints float64[7], at start joints[i] = 0.1 i
 * Actions:
 *   move   a float64 array of 7 (or a list of 7 numbers): added to the
 *          joints; reply {"ok": True, "moves": n, "joints": float64[7]}
 *   reset  joints back to the start; reply {"ok": True, "moves": 0}
 *   fault  replies an error (ValueError "arm fault: ..."), as a Python
 *          callback that raises
 *   broken returns -1 (not a message type): the role answers an error
 * The stream publishes {"image", "joints", "seq": n} every 50 ms. */
#include <edgeml.h>

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define H 480
#define W 640
#define NJ 7

static volatile sig_atomic_t stop_flag;
static void on_signal(int sig) {
  (void)sig;
  stop_flag = 1;
}

typedef struct robot {
  uint8_t *image; /* constant: replies borrow it */
  double joints[NJ];
  int64_t moves;
  int64_t seq;
  uint64_t end_ns, next_pub_ns;
  em_edge_server *server;
  em_payload *pub;
} robot;

static const uint64_t image_shape[3] = {H, W, 3};
static const uint64_t joints_shape[1] = {NJ};

/* The joints as they are now: a copy the reply borrows until it is sent. */
static int put_joints(robot *r, em_payload *reply) {
  double *copy = malloc(sizeof r->joints);
  if (!copy) return EM_ENOMEM;
  memcpy(copy, r->joints, sizeof r->joints);
  em_payload_on_release(reply, free, copy);
  return em_put_ndarray(reply, "<f8", 1, joints_shape, copy, sizeof r->joints);
}

static int on_obs(void *ud, const char *const *keys, size_t n, em_payload *reply) {
  robot *r = ud;
  double *joints = NULL; /* one copy per reply, even for ["joints", "joints"] */
  em_put_map(reply, (uint32_t)n);
  for (size_t i = 0; i < n; i++) {
    em_put_cstr(reply, keys[i]);
    if (strcmp(keys[i], "image") == 0) {
      em_put_ndarray(reply, "|u1", 3, image_shape, r->image, (size_t)H * W * 3);
    } else {
      if (!joints) {
        if (!(joints = malloc(sizeof r->joints))) return EM_ENOMEM;
        memcpy(joints, r->joints, sizeof r->joints);
        em_payload_on_release(reply, free, joints);
      }
      em_put_ndarray(reply, "<f8", 1, joints_shape, joints, sizeof r->joints);
    }
  }
  return EM_MSG_REPLY;
}

static int on_act(void *ud, const char *key, const em_value *action, em_payload *reply) {
  robot *r = ud;
  if (strcmp(key, "move") == 0) {
    double d[NJ];
    em_array a;
    if (em_value_ndarray(action, &a) == EM_OK) {
      if (strcmp(a.dtype, "<f8") != 0 || a.len_bytes != sizeof d) {
        em_payload_begin_error(reply, "ValueError", "move takes a float64 array of 7 joint deltas", NULL, 0);
        return EM_MSG_ERROR;
      }
      memcpy(d, a.data, sizeof d);
    } else if ((action->type == EM_T_LIST || action->type == EM_T_TUPLE) && action->len == NJ) {
      em_iter it;
      em_value e;
      em_iter_init(&it, action);
      for (int i = 0; i < NJ && em_iter_next(&it, &e); i++) {
        if (em_value_double(&e, &d[i])) {
          em_payload_begin_error(reply, "TypeError", "move: the deltas must be numbers", NULL, 0);
          return EM_MSG_ERROR;
        }
      }
    } else {
      em_payload_begin_error(reply, "ValueError", "move takes a float64 array of 7 joint deltas", NULL, 0);
      return EM_MSG_ERROR;
    }
    for (int i = 0; i < NJ; i++) r->joints[i] += d[i];
    r->moves++;
    em_put_map(reply, 3);
    em_put_cstr(reply, "ok");
    em_put_bool(reply, 1);
    em_put_cstr(reply, "moves");
    em_put_int(reply, r->moves);
    em_put_cstr(reply, "joints");
    put_joints(r, reply);
    return EM_MSG_REPLY;
  }
  if (strcmp(key, "reset") == 0) {
    for (int i = 0; i < NJ; i++) r->joints[i] = 0.1 * i;
    r->moves = 0;
    em_put_map(reply, 2);
    em_put_cstr(reply, "ok");
    em_put_bool(reply, 1);
    em_put_cstr(reply, "moves");
    em_put_int(reply, 0);
    return EM_MSG_REPLY;
  }
  if (strcmp(key, "fault") == 0) {
    em_payload_begin_error(reply, "ValueError", "arm fault: joint 3 over its limit", "robot_server.c on_act\n", 0);
    return EM_MSG_ERROR;
  }
  return -1; /* "broken": not a reply; the caller gets an error */
}

static void publish(robot *r) {
  em_payload *p = r->pub;
  em_payload_reset(p);
  em_put_map(p, 3);
  em_put_cstr(p, "image");
  em_put_ndarray(p, "|u1", 3, image_shape, r->image, (size_t)H * W * 3);
  em_put_cstr(p, "joints");
  em_put_ndarray(p, "<f8", 1, joints_shape, r->joints, sizeof r->joints);
  em_put_cstr(p, "seq");
  em_put_int(p, ++r->seq);
  int rc = em_edge_server_publish(r->server, p, NULL); /* copied: p may change now */
  if (rc) fprintf(stderr, "robot_server: publish: %s\n", em_strerror(rc));
}

static int on_tick(void *ud) {
  robot *r = ud;
  if (stop_flag) return 1;
  uint64_t now = em_mono_ns();
  if (r->end_ns && now >= r->end_ns) return 1;
  if (r->pub && now >= r->next_pub_ns) {
    r->next_pub_ns = now + 50000000ull;
    publish(r);
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s PORT BROADCAST_PORT [SECONDS]\n", argv[0]);
    return 1;
  }
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);

  robot r;
  memset(&r, 0, sizeof r);
  r.image = malloc((size_t)H * W * 3);
  if (!r.image) return 1;
  for (int y = 0; y < H; y++)
    for (int x = 0; x < W; x++)
      for (int c = 0; c < 3; c++) r.image[((size_t)y * W + x) * 3 + c] = (uint8_t)(y + 2 * x + 3 * c);
  for (int i = 0; i < NJ; i++) r.joints[i] = 0.1 * i;
  if (argc > 3 && atof(argv[3]) > 0) r.end_ns = em_mono_ns() + (uint64_t)(atof(argv[3]) * 1e9);

  static const char *const obs_keys[] = {"image", "joints"};
  static const char *const act_keys[] = {"move", "reset", "fault", "broken"};
  em_edge_server_opts o;
  em_edge_server_opts_init(&o);
  o.config.observation_keys = obs_keys;
  o.config.n_observation_keys = 2;
  o.config.action_keys = act_keys;
  o.config.n_action_keys = 4;
  o.config.version = "robot/1";
  o.config.port = (uint16_t)atoi(argv[1]);
  o.config.broadcast_port = atoi(argv[2]);
  o.observation = on_obs;
  o.observation_ud = &r;
  o.action = argc > 4 && strcmp(argv[4], "noact") == 0 ? NULL : on_act;
  o.action_ud = &r;
  o.server.host = "127.0.0.1";
  o.server.tick = on_tick;
  o.server.tick_ud = &r;
  o.server.tick_ns = 10000000ull;
  int rc = em_edge_server_open(&r.server, &o);
  if (rc) {
    fprintf(stderr, "robot_server: %s\n", em_strerror(rc));
    free(r.image);
    return 1;
  }
  if (em_edge_server_broadcast_port(r.server)) {
    r.pub = em_payload_new();
    if (!r.pub) return 1;
  }
  printf("ports %u %u\n", em_edge_server_port(r.server), em_edge_server_broadcast_port(r.server));
  fflush(stdout);
  rc = em_edge_server_run(r.server); /* EM_EINTR: the tick stopped it */
  em_edge_server_close(r.server);
  em_payload_free(r.pub);
  free(r.image);
  if (rc != EM_OK && rc != EM_EINTR) {
    fprintf(stderr, "robot_server: %s\n", em_strerror(rc));
    return 1;
  }
  return 0;
}
