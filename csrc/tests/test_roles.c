/* test_roles.c: the Edge and Inference roles, C server + C client in one
 * process (the Python interop is tests/test_c_roles_edge.py). */
#include "../proto/em_proto.h"
#include "em_test.h"

#include <stdio.h>
#include <string.h>

#define SEC 1000000000ull

static em_client_opts copts(char *err, size_t n) {
  em_client_opts o;
  em_client_opts_init(&o);
  o.connect_timeout_ns = 2 * SEC;
  o.errbuf = err;
  o.errbuf_len = n;
  return o;
}

/* "type: message" of an ERROR reply */
static int err_is(em_msg *m, const char *want_prefix) {
  char buf[512];
  if (!m || em_msg_error(m, buf, sizeof buf)) return 0;
  int ok = strncmp(buf, want_prefix, strlen(want_prefix)) == 0;
  if (!ok) fprintf(stderr, "  got error: %s\n", buf);
  return ok;
}

/* ------------------------------------------------------------- inference */

static int f_double(void *ud, const em_value *payload, em_payload *reply) {
  int64_t v;
  (*(int *)ud)++;
  if (em_value_int(payload, &v)) return EM_EINVAL;
  em_put_int(reply, 2 * v);
  return EM_MSG_REPLY;
}
static int f_empty(void *ud, const em_value *payload, em_payload *reply) { return EM_MSG_REPLY; }
static int f_incomplete(void *ud, const em_value *payload, em_payload *reply) {
  em_put_map(reply, 2);
  em_put_cstr(reply, "only one key");
  em_put_int(reply, 1);
  return EM_MSG_REPLY;
}
static int f_seven(void *ud, const em_value *payload, em_payload *reply) {
  em_put_cstr(reply, "x");
  return 7;
}

static void test_inference(void) {
  em_infer_server_opts o;
  em_infer_server_opts_init(&o);
  o.server.host = "127.0.0.1";
  em_infer_server *s;
  CHECK_EQ(em_infer_server_open(&s, &o), EM_OK);
  int calls = 0;
  CHECK_EQ(em_infer_server_register(s, "double", f_double, &calls), EM_OK);
  CHECK_EQ(em_infer_server_register(s, "empty", f_empty, NULL), EM_OK);
  CHECK_EQ(em_infer_server_register(s, "incomplete", f_incomplete, NULL), EM_OK);
  CHECK_EQ(em_infer_server_register(s, "seven", f_seven, NULL), EM_OK);
  CHECK_EQ(em_infer_server_register(s, "__interfaces__", f_empty, NULL), EM_EINVAL);
  CHECK_EQ(em_infer_server_register(s, "", f_empty, NULL), EM_EINVAL);
  CHECK_EQ(em_infer_server_register(s, "x", NULL, NULL), EM_EINVAL);
  CHECK_EQ(em_infer_server_start(s), EM_OK);
  CHECK_EQ(em_infer_server_start(s), EM_EINVAL);

  char err[256] = "";
  em_client_opts co = copts(err, sizeof err);
  em_infer_client *c;
  CHECK_EQ(em_infer_client_open(&c, "127.0.0.1", em_infer_server_port(s), &co), EM_OK);
  em_payload *p = em_payload_new();
  em_msg *r;
  em_value v;
  em_put_int(p, 21);
  CHECK_EQ(em_infer_call(c, "double", p, 5 * SEC, &r), EM_OK);
  CHECK(r && em_msg_value(r, &v) == EM_OK && v.type == EM_T_INT && v.as.i == 42);
  em_msg_free(r);
  CHECK_EQ(calls, 1);
  /* a negative return: an error reply naming the interface */
  em_payload_reset(p);
  em_put_cstr(p, "not an int");
  CHECK_EQ(em_infer_call(c, "double", p, 5 * SEC, &r), EM_EREMOTE);
  CHECK(err_is(r, "RuntimeError: the interface 'double' failed: it returned -1 (EINVAL"));
  em_msg_free(r);
  CHECK_EQ(em_infer_call(c, "empty", NULL, 5 * SEC, &r), EM_OK);
  CHECK(r && em_msg_value(r, &v) == EM_OK && v.type == EM_T_NIL);
  em_msg_free(r);
  CHECK_EQ(em_infer_call(c, "incomplete", NULL, 5 * SEC, &r), EM_EREMOTE);
  CHECK(err_is(r, "edgeml.EncodeError: the interface 'incomplete''s reply is incomplete"));
  em_msg_free(r);
  CHECK_EQ(em_infer_call(c, "seven", NULL, 5 * SEC, &r), EM_EREMOTE);
  CHECK(err_is(r, "RuntimeError: the interface 'seven' failed: it returned 7"));
  em_msg_free(r);
  CHECK_EQ(em_infer_call(c, "nope", NULL, 5 * SEC, &r), EM_EREMOTE);
  CHECK(err_is(r, "edgeml.UnknownInterfaceError: no interface 'nope' on this server; it has: 'double', 'empty'"));
  em_value names, e;
  CHECK(em_msg_value(r, &v) == EM_OK && em_value_get(&v, "interfaces", &names) == 1 && names.len == 4 &&
        em_value_at(&names, 0, &e) == EM_OK && em_value_is(&e, "double"));
  em_msg_free(r);
  /* a payload that is incomplete is not sent */
  em_payload_reset(p);
  em_put_list(p, 2);
  em_put_int(p, 1);
  CHECK_EQ(em_infer_call(c, "double", p, 5 * SEC, &r), EM_EENCODE);
  CHECK(r == NULL);

  char **list;
  size_t n;
  CHECK_EQ(em_infer_interfaces(c, 5 * SEC, &list, &n), EM_OK);
  CHECK_EQ(n, 4);
  CHECK(n == 4 && !strcmp(list[0], "double") && !strcmp(list[3], "seven") && list[4] == NULL);
  free(list);
  /* while running: unregister, register again */
  CHECK_EQ(em_infer_server_unregister(s, "empty"), EM_OK);
  CHECK_EQ(em_infer_server_unregister(s, "empty"), EM_EINVAL);
  CHECK_EQ(em_infer_interfaces(c, 5 * SEC, &list, &n), EM_OK);
  CHECK_EQ(n, 3);
  free(list);

  /* an edge client is refused by an inference server */
  em_edge_client *ec;
  CHECK_EQ(em_edge_client_open(&ec, "127.0.0.1", em_infer_server_port(s), NULL, &co), EM_EHANDSHAKE);
  em_payload_free(p);
  em_infer_client_close(c);
  em_infer_server_stop(s);
  CHECK_EQ(em_infer_server_wait(s, 5 * SEC), EM_OK);
  em_infer_server_close(s);
}

/* ------------------------------------------------------------------ edge */

typedef struct bot {
  int obs_calls, act_calls;
  char last_keys[128];
  double got;
} bot;

static int on_obs(void *ud, const char *const *keys, size_t n, em_payload *reply) {
  bot *b = ud;
  b->obs_calls++;
  b->last_keys[0] = 0;
  em_put_map(reply, (uint32_t)n);
  for (size_t i = 0; i < n; i++) {
    strncat(b->last_keys, keys[i], sizeof b->last_keys - strlen(b->last_keys) - 2);
    strcat(b->last_keys, ",");
    em_put_cstr(reply, keys[i]);
    em_put_int(reply, (int64_t)i);
  }
  return EM_MSG_REPLY;
}

static int on_act(void *ud, const char *key, const em_value *action, em_payload *reply) {
  bot *b = ud;
  b->act_calls++;
  em_value x;
  if (action->type == EM_T_MAP && em_value_get(action, "x", &x) == 1) em_value_double(&x, &b->got);
  em_put_map(reply, 1);
  em_put_cstr(reply, "key");
  em_put_cstr(reply, key);
  return EM_MSG_REPLY;
}

static const char *const OBS[] = {"cam", "arm"};
static const char *const ACT[] = {"go"};

static em_edge_config config(const char *version) {
  em_edge_config c;
  em_edge_config_init(&c);
  c.observation_keys = OBS;
  c.n_observation_keys = 2;
  c.action_keys = ACT;
  c.n_action_keys = 1;
  c.version = version;
  return c;
}

static void quiet(void *ud, int level, const char *msg) {}

static void test_edge_config_errors(void) {
  em_edge_server_opts o;
  em_edge_server_opts_init(&o);
  o.server.log = quiet;
  static const char *const dup[] = {"a", "a"};
  o.config = config("v");
  o.config.action_keys = dup;
  o.config.n_action_keys = 2;
  em_edge_server *s;
  CHECK_EQ(em_edge_server_open(&s, &o), EM_EINVAL);
  CHECK(s == NULL);
  o.config = config("v");
  o.config.port = 7777;
  o.config.broadcast_port = 7777;
  CHECK_EQ(em_edge_server_open(&s, &o), EM_EINVAL);
  o.config.broadcast_port = 70000;
  CHECK_EQ(em_edge_server_open(&s, &o), EM_EINVAL);
  /* no broadcast port: publish is refused */
  o.config = config("v");
  o.server.host = "127.0.0.1";
  CHECK_EQ(em_edge_server_open(&s, &o), EM_OK);
  CHECK_EQ(em_edge_server_broadcast_port(s), 0);
  em_payload *p = em_payload_new();
  em_put_nil(p);
  CHECK_EQ(em_edge_server_publish(s, p, NULL), EM_EINVAL);
  em_payload_free(p);
  em_edge_server_close(s); /* never run */
}

static void test_edge(void) {
  bot b;
  memset(&b, 0, sizeof b);
  em_edge_server_opts o;
  em_edge_server_opts_init(&o);
  o.config = config("bot/1");
  o.config.broadcast_port = 0;
  o.observation = on_obs;
  o.observation_ud = &b;
  o.action = on_act;
  o.action_ud = &b;
  o.server.host = "127.0.0.1";
  em_edge_server *s;
  CHECK_EQ(em_edge_server_open(&s, &o), EM_OK);
  uint16_t port = em_edge_server_port(s), bport = em_edge_server_broadcast_port(s);
  CHECK(port && bport && port != bport);
  /* published before running: kept, sent once it runs */
  em_payload *pub = em_payload_new();
  em_put_map(pub, 1);
  em_put_cstr(pub, "seq");
  em_put_int(pub, 1);
  uint64_t ver = 0;
  CHECK_EQ(em_edge_server_publish(s, pub, &ver), EM_OK);
  CHECK_EQ(ver, 1);
  CHECK_EQ(em_edge_server_start(s), EM_OK);

  char err[512] = "";
  em_client_opts co = copts(err, sizeof err);
  /* config check: another version and keys are refused, each field named */
  em_edge_config other = config("bot/2");
  static const char *const act2[] = {"go", "stop"};
  other.action_keys = act2;
  other.n_action_keys = 2;
  em_edge_client *c;
  CHECK_EQ(em_edge_client_open(&c, "127.0.0.1", port, &other, &co), EM_EHANDSHAKE);
  CHECK(strstr(err, "has another config: action_keys: client ['go', 'stop'], server ['go']; "
                    "version: client 'bot/2', server 'bot/1'") != NULL);
  /* without a config: the server's keys */
  CHECK_EQ(em_edge_client_open(&c, "127.0.0.1", port, NULL, &co), EM_OK);
  size_t n;
  const char *const *k = em_edge_client_observation_keys(c, &n);
  CHECK(n == 2 && !strcmp(k[0], "arm") && !strcmp(k[1], "cam")); /* sorted, as sent */
  CHECK_EQ(em_edge_client_broadcast_port(c), bport);
  em_edge_client_close(c);

  em_edge_config mine = config("bot/1");
  CHECK_EQ(em_edge_client_open(&c, "127.0.0.1", port, &mine, &co), EM_OK);
  em_msg *r;
  em_value v, e;
  CHECK_EQ(em_edge_obs(c, NULL, 0, 5 * SEC, &r), EM_OK);
  CHECK(!strcmp(b.last_keys, "cam,arm,")); /* every key, config order */
  CHECK(em_msg_value(r, &v) == EM_OK && v.type == EM_T_MAP && v.len == 2);
  em_msg_free(r);
  const char *one[] = {"arm", "arm"};
  CHECK_EQ(em_edge_obs(c, one, 2, 5 * SEC, &r), EM_OK);
  CHECK(!strcmp(b.last_keys, "arm,arm,"));
  em_msg_free(r);
  const char *bad[] = {"leg"};
  CHECK_EQ(em_edge_obs(c, bad, 1, 5 * SEC, &r), EM_EINVAL);
  CHECK(r == NULL);
  CHECK_EQ(b.obs_calls, 2);

  em_payload *a = em_payload_new();
  em_put_map(a, 1);
  em_put_cstr(a, "x");
  em_put_double(a, 2.5);
  CHECK_EQ(em_edge_act(c, NULL, a, 5 * SEC, &r), EM_OK); /* the only key */
  CHECK(em_msg_value(r, &v) == EM_OK && em_value_get(&v, "key", &e) == 1 && em_value_is(&e, "go"));
  CHECK(b.got == 2.5);
  em_msg_free(r);
  CHECK_EQ(em_edge_act(c, "fly", a, 5 * SEC, &r), EM_EINVAL);
  CHECK_EQ(em_edge_act(c, "go", NULL, 5 * SEC, &r), EM_OK); /* {} */
  em_msg_free(r);
  CHECK_EQ(b.act_calls, 2);

  /* raw requests past the client's checks: the server's errors */
  em_client *raw = em_edge_client_core(c);
  em_payload *q = em_payload_new();
  em_payload_begin_request(q, "obs", 3);
  em_put_list(q, 1);
  em_put_cstr(q, "leg");
  CHECK_EQ(em_client_request(raw, EM_MSG_REQUEST, q, 5 * SEC, &r), EM_EREMOTE);
  CHECK(err_is(r, "edgeml.InvalidKeyError: 'leg' is not one of the config's observation_keys: 'arm', 'cam'"));
  em_msg_free(r);
  em_payload_reset(q);
  em_payload_begin_request(q, "act", 3);
  em_put_list(q, 1);
  em_put_cstr(q, "go");
  CHECK_EQ(em_client_request(raw, EM_MSG_REQUEST, q, 5 * SEC, &r), EM_EREMOTE);
  CHECK(err_is(r, "edgeml.InvalidArgumentError: malformed action request"));
  em_msg_free(r);
  em_payload_reset(q);
  em_payload_begin_request(q, "walk", 4);
  em_put_nil(q);
  CHECK_EQ(em_client_request(raw, EM_MSG_REQUEST, q, 5 * SEC, &r), EM_EREMOTE);
  CHECK(err_is(r, "edgeml.UnknownInterfaceError: an EdgeServer serves 'obs' and 'act', not 'walk'"));
  em_msg_free(r);
  em_payload_free(q);

  /* the stream: the value published before run, then newer ones */
  em_sub *sub;
  CHECK_EQ(em_edge_subscribe(c, &sub), EM_OK);
  int64_t seq = 0;
  CHECK_EQ(em_sub_next(sub, 5 * SEC, &r), EM_OK);
  CHECK(r && em_msg_value(r, &v) == EM_OK && em_value_get(&v, "seq", &e) == 1 && em_value_int(&e, &seq) == EM_OK &&
        seq == 1);
  em_msg_free(r);
  em_payload_reset(pub);
  em_put_map(pub, 1);
  em_put_cstr(pub, "seq");
  em_put_int(pub, 2);
  CHECK_EQ(em_edge_server_publish(s, pub, &ver), EM_OK);
  CHECK_EQ(ver, 2);
  CHECK_EQ(em_sub_next(sub, 5 * SEC, &r), EM_OK);
  CHECK(r && r->req_id == 2 && em_msg_value(r, &v) == EM_OK && em_value_get(&v, "seq", &e) == 1 &&
        em_value_int(&e, &seq) == EM_OK && seq == 2);
  em_msg_free(r);
  em_sub_close(sub);

  em_payload_free(a);
  em_payload_free(pub);
  em_edge_client_close(c);
  em_edge_server_stop(s);
  CHECK_EQ(em_edge_server_wait(s, 5 * SEC), EM_OK);
  em_edge_server_close(s);
}

/* --------------------------------------------------------------- helpers */

static void test_compat_diff(void) {
  em__strlist a;
  const char *keys[] = {"b", "a"};
  CHECK_EQ(em__strlist_init(&a, keys, 2, NULL), EM_OK);
  em__strlist as;
  CHECK_EQ(em__strlist_sorted(&as, &a), EM_OK);
  em__compat_field f[2] = {{"keys", EM__CF_STRLIST, NULL, &as}, {"version", EM__CF_STR, "it's", NULL}};
  em_payload *p = em_payload_new();
  em__put_compat(p, f, 2);
  uint8_t *frame;
  size_t len;
  CHECK_EQ(em_frame_encode(p, EM_MSG_REPLY, 0, &frame, &len), EM_OK);
  em_msg *m;
  CHECK_EQ(em_frame_decode(frame, len, 0, &m, NULL), EM_OK);
  free(frame);
  em_value v;
  CHECK_EQ(em_msg_value(m, &v), EM_OK);
  em__text t;
  em__text_init(&t);
  CHECK_EQ(em__compat_diff(f, 2, &v, &t), 0);
  em__compat_field g[2] = {{"keys", EM__CF_STRLIST, NULL, &a}, {"extra", EM__CF_NIL, NULL, NULL}};
  CHECK_EQ(em__compat_diff(g, 2, &v, &t), 2);
  CHECK(t.s && !strcmp(t.s, "keys: client ['b', 'a'], server ['a', 'b']; version: client None, server \"it's\""));
  em__text_free(&t);
  em_msg_free(m);
  em_payload_free(p);
  em__strlist_free(&a);
  em__strlist_free(&as);
}

int main(void) {
  RUN(test_compat_diff);
  RUN(test_inference);
  RUN(test_edge_config_errors);
  RUN(test_edge);
  DONE();
}
