/* edge_client.c: a C EdgeClient of a (Python or C) edgeml EdgeServer.
 *
 *   edge_client HOST PORT [VERSION]
 *
 * Its config: observation_keys ["cam", "state"], action_keys ["go"],
 * version VERSION (default "py/1"). It prints one line per step:
 *   keys obs=cam,state act=go bport=N
 *   obs cam dtype=|u1 shape=3x4 sum=66      (every key, nil request)
 *   obs state t=1.5 name=py                 (["state"] only)
 *   act key=go speed=2.5 vsum=6             (action {"speed": 2.5,
 *                                            "v": float32 [1, 2, 3]})
 *   badkey rc=EINVAL                        (a key outside the config)
 *   stream seq=N                            (three streamed values, rising)
 *   done
 * Exit status: 0; 3 when the server's config differs (the reason on
 * stderr); 1 on any other failure. */
#include <edgeml.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SEC 1000000000ull

static int fail(const char *what, int rc, em_msg *m) {
  char buf[512] = "";
  if (rc == EM_EREMOTE && m) em_msg_error(m, buf, sizeof buf);
  fprintf(stderr, "edge_client: %s: %s %s\n", what, em_errname(rc), buf);
  em_msg_free(m);
  return 1;
}

static double array_sum(const em_array *a) {
  double s = 0;
  if (strcmp(a->dtype, "|u1") == 0)
    for (size_t i = 0; i < a->len_bytes; i++) s += ((const uint8_t *)a->data)[i];
  else if (strcmp(a->dtype, "<f4") == 0)
    for (size_t i = 0; i < a->len_bytes / 4; i++) s += ((const float *)a->data)[i];
  return s;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s HOST PORT [VERSION]\n", argv[0]);
    return 1;
  }
  static const char *const obs_keys[] = {"cam", "state"};
  static const char *const act_keys[] = {"go"};
  em_edge_config cfg;
  em_edge_config_init(&cfg);
  cfg.observation_keys = obs_keys;
  cfg.n_observation_keys = 2;
  cfg.action_keys = act_keys;
  cfg.n_action_keys = 1;
  cfg.version = argc > 3 ? argv[3] : "py/1";
  char err[1024] = "";
  em_client_opts o;
  em_client_opts_init(&o);
  o.connect_timeout_ns = 5 * SEC;
  o.errbuf = err;
  o.errbuf_len = sizeof err;
  em_edge_client *c;
  int rc = em_edge_client_open(&c, argv[1], (uint16_t)atoi(argv[2]), &cfg, &o);
  if (rc == EM_EHANDSHAKE) {
    fprintf(stderr, "%s\n", err);
    return 3;
  }
  if (rc) {
    fprintf(stderr, "edge_client: open: %s (%s)\n", em_strerror(rc), err);
    return 1;
  }
  size_t no, na;
  const char *const *ok = em_edge_client_observation_keys(c, &no);
  const char *const *ak = em_edge_client_action_keys(c, &na);
  printf("keys obs=%s,%s act=%s bport=%u\n", ok[0], ok[1], ak[0], em_edge_client_broadcast_port(c));

  /* every observation key */
  em_msg *m;
  em_value v, cam, state, x;
  em_array a;
  if ((rc = em_edge_obs(c, NULL, 0, 5 * SEC, &m))) return fail("obs", rc, m);
  if (em_msg_value(m, &v) || em_value_get(&v, "cam", &cam) != 1 || em_value_ndarray(&cam, &a))
    return fail("obs reply", EM_EDECODE, m);
  printf("obs cam dtype=%s shape=%llux%llu sum=%g\n", a.dtype, (unsigned long long)a.shape[0],
         (unsigned long long)a.shape[1], array_sum(&a));
  em_msg_free(m);

  /* one key */
  const char *one[] = {"state"};
  if ((rc = em_edge_obs(c, one, 1, 5 * SEC, &m))) return fail("obs state", rc, m);
  char name[64];
  double t;
  if (em_msg_value(m, &v) || v.len != 1 || em_value_get(&v, "state", &state) != 1 ||
      em_value_get(&state, "t", &x) != 1 || em_value_double(&x, &t) || em_value_get(&state, "name", &x) != 1 ||
      em_value_cstr(&x, name, sizeof name))
    return fail("obs state reply", EM_EDECODE, m);
  printf("obs state t=%g name=%s\n", t, name);
  em_msg_free(m);

  /* an action (the key: the config's only one) */
  float vec[3] = {1, 2, 3};
  uint64_t shape[1] = {3};
  em_payload *p = em_payload_new();
  em_put_map(p, 2);
  em_put_cstr(p, "speed");
  em_put_double(p, 2.5);
  em_put_cstr(p, "v");
  em_put_ndarray(p, "<f4", 1, shape, vec, sizeof vec);
  rc = em_edge_act(c, NULL, p, 5 * SEC, &m);
  em_payload_free(p);
  if (rc) return fail("act", rc, m);
  em_value got, key, speed, vv;
  double sp;
  char kbuf[32];
  if (em_msg_value(m, &v) || em_value_get(&v, "got", &got) != 1 || em_value_get(&v, "key", &key) != 1 ||
      em_value_cstr(&key, kbuf, sizeof kbuf) || em_value_get(&got, "speed", &speed) != 1 ||
      em_value_double(&speed, &sp) || em_value_get(&got, "v", &vv) != 1 || em_value_ndarray(&vv, &a))
    return fail("act reply", EM_EDECODE, m);
  printf("act key=%s speed=%g vsum=%g\n", kbuf, sp, array_sum(&a));
  em_msg_free(m);

  /* a key outside the config: refused here, nothing sent */
  const char *bad[] = {"nope"};
  rc = em_edge_obs(c, bad, 1, 5 * SEC, &m);
  printf("badkey rc=%s\n", em_errname(rc));
  em_msg_free(m);

  /* the observation stream */
  em_sub *sub;
  if ((rc = em_edge_subscribe(c, &sub))) return fail("subscribe", rc, NULL);
  int64_t last = 0;
  for (int i = 0; i < 3; i++) {
    if ((rc = em_sub_next(sub, 5 * SEC, &m))) {
      em_sub_close(sub);
      return fail("stream", rc, m);
    }
    int64_t seq;
    if (em_msg_value(m, &v) || em_value_get(&v, "seq", &x) != 1 || em_value_int(&x, &seq) || seq <= last) {
      em_sub_close(sub);
      return fail("stream value", EM_EDECODE, m);
    }
    last = seq;
    printf("stream seq=%lld\n", (long long)seq);
    em_msg_free(m);
  }
  em_sub_close(sub);
  em_edge_client_close(c);
  printf("done\n");
  return 0;
}
