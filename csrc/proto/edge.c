/* edge.c: the Edge role (edgeml_roles.h; docs/protocol.md "Edge"): a
 * server of observations and actions with an observation stream, and its
 * client. Mirrors edgeml/edge.py message for message. */
#include "em_proto.h"

#include <stdio.h>
#include <stdlib.h>

#define EM__EDGE_DEFAULT_VERSION "0.0.1"

struct em_edge_server {
  em__duo duo;
  const em__strlist *obs, *act; /* the config's keys in its order: the gate's */
  em_edge_obs_fn obs_fn;
  void *obs_ud;
  em_edge_act_fn act_fn;
  void *act_ud;
  em_gate *gate; /* the request rules (gate.c), shared with Python's EdgeServer */
};

struct em_edge_client {
  em_client *c;
  char *host;
  uint16_t port, bport;
  em_client_opts sub_opts;
  char *token;
  em__strlist obs, act;
};

void em_edge_config_init(em_edge_config *c) {
  memset(c, 0, sizeof *c);
  c->version = EM__EDGE_DEFAULT_VERSION;
  c->broadcast_port = EM_EDGE_NO_BROADCAST;
}

void em_edge_server_opts_init(em_edge_server_opts *o) {
  memset(o, 0, sizeof *o);
  em_edge_config_init(&o->config);
  em_server_opts_init(&o->server);
}

/* ------------------------------------------------------------- handling */

/* The rules (callbacks present, keys in the config, payload shapes,
 * methods) are the gate's (gate.c); what passes them is served here. */
static int em__edge_handle(void *ud, const em_msg *req, em_payload *reply) {
  em_edge_server *s = ud;
  em_value method, payload;
  if (em_msg_request(req, &method, &payload))
    return em__error_reply(reply, "edgeml.InvalidArgumentError", 0,
                           "a request's body must be [method: str, payload]");
  int rc = em__gate_check_value(s->gate, &method, &payload, reply);
  if (rc == EM_MSG_ERROR) return rc;
  if (em_value_is(&method, "obs")) {
    if (payload.type == EM_T_NIL) {
      rc = s->obs_fn(s->obs_ud, (const char *const *)s->obs->v, s->obs->n, reply);
      rc = em__finish_reply(reply, rc, "observation callback");
    } else {
      const char *small[16];
      const char **keys = payload.len <= 16 ? small : malloc(payload.len * sizeof *keys);
      if (!keys) return em__error_reply(reply, "MemoryError", 0, "out of memory for %u keys", payload.len);
      em_iter it;
      em_iter_init(&it, &payload);
      em_value k;
      size_t n = 0;
      while (em_iter_next(&it, &k)) keys[n++] = s->obs->v[em__strlist_find(s->obs, k.as.str, k.len)];
      rc = em__finish_reply(reply, s->obs_fn(s->obs_ud, keys, n, reply), "observation callback");
      if (keys != small) free(keys);
    }
  } else { /* act: [key, action], key in the config */
    em_value key, action;
    em_value_at(&payload, 0, &key);
    em_value_at(&payload, 1, &action);
    const char *k = s->act->v[em__strlist_find(s->act, key.as.str, key.len)];
    rc = em__finish_reply(reply, s->act_fn(s->act_ud, k, &action, reply), "action callback");
  }
  em__reply_keep(reply, req);
  return rc;
}

/* --------------------------------------------------------------- server */

static void em__edge_free(em_edge_server *s) {
  em_gate_close(s->gate);
  free(s);
}

static void em__say(const em_server_opts *o, const char *fmt, const char *a) {
  char msg[256];
  snprintf(msg, sizeof msg, fmt, a);
  if (o->log) o->log(o->log_ud, EM_LOG_ERROR, msg);
  else fprintf(stderr, "edgeml: %s\n", msg);
}

int em_edge_server_open(em_edge_server **out, const em_edge_server_opts *opts) {
  *out = NULL;
  if (!opts) return EM_EINVAL;
  const em_edge_config *c = &opts->config;
  if (c->broadcast_port < EM_EDGE_NO_BROADCAST || c->broadcast_port > 65535) {
    em__say(&opts->server, "EdgeServer: broadcast_port %s is not -1 (none) or 0..65535", "out of range");
    return EM_EINVAL;
  }
  if (c->broadcast_port > 0 && c->broadcast_port == c->port) {
    em__say(&opts->server, "EdgeServer: %s", "broadcast_port must differ from the port");
    return EM_EINVAL;
  }
  em_edge_server *s = calloc(1, sizeof *s);
  if (!s) return EM_ENOMEM;
  const char *why = "out of memory";
  s->obs_fn = opts->observation;
  s->obs_ud = opts->observation_ud;
  s->act_fn = opts->action;
  s->act_ud = opts->action_ud;
  int rc = em_gate_open_edge(&s->gate, c, &why); /* the config, checked and copied once */
  if (rc) {
    em__say(&opts->server, "EdgeServer config: %s", why);
    em__edge_free(s);
    return rc;
  }
  s->obs = em__gate_keys(s->gate, 1);
  s->act = em__gate_keys(s->gate, 0);
  em_gate_set_handlers(s->gate, s->obs_fn != NULL, s->act_fn != NULL);

  em_server_opts so = opts->server;
  so.hello_info = NULL;
  so.hello_info_len = 0;
  if (c->broadcast_port != EM_EDGE_NO_BROADCAST) {
    em_server_opts bo = so;
    bo.port = (uint16_t)c->broadcast_port;
    bo.service = "edge.broadcast";
    bo.handler = NULL;
    bo.handler_ud = NULL;
    bo.tick = NULL; /* the user's tick runs on the request loop only */
    bo.tick_ud = NULL;
    if ((rc = em_server_open(&s->duo.bcast, &bo))) {
      em__edge_free(s);
      return rc;
    }
  }
  /* HELLO info: {"role": "edge", "compat": {...}, "broadcast_port": int | nil} */
  em_payload info;
  uint8_t *hello = NULL;
  size_t hello_len = 0;
  if (em_payload_init(&info)) rc = EM_ENOMEM;
  else {
    em_put_map(&info, 3);
    em_put_cstr(&info, "role");
    em_put_cstr(&info, "edge");
    em_put_cstr(&info, "compat");
    em_gate_put_compat(s->gate, &info);
    em_put_cstr(&info, "broadcast_port");
    if (s->duo.bcast) em_put_int(&info, em_server_port(s->duo.bcast));
    else em_put_nil(&info);
    rc = em__payload_body(&info, &hello, &hello_len);
    em_payload_destroy(&info);
  }
  if (!rc) {
    so.port = c->port;
    so.service = "edge";
    so.handler = em__edge_handle;
    so.handler_ud = s;
    so.hello_info = hello;
    so.hello_info_len = hello_len;
    rc = em_server_open(&s->duo.main, &so); /* copies hello_info */
  }
  free(hello);
  if (rc) {
    em_server_close(s->duo.bcast);
    em__edge_free(s);
    return rc;
  }
  *out = s;
  return EM_OK;
}

uint16_t em_edge_server_port(const em_edge_server *s) { return em_server_port(s->duo.main); }
uint16_t em_edge_server_broadcast_port(const em_edge_server *s) {
  return s->duo.bcast ? em_server_port(s->duo.bcast) : 0;
}
int em_edge_server_run(em_edge_server *s) { return em__duo_run(&s->duo); }
int em_edge_server_start(em_edge_server *s) { return em__duo_start(&s->duo); }
void em_edge_server_stop(em_edge_server *s) { em__duo_stop(&s->duo); }
int em_edge_server_wait(em_edge_server *s, uint64_t timeout_ns) { return em__duo_wait(&s->duo, timeout_ns); }

int em_edge_server_publish(em_edge_server *s, em_payload *obs, uint64_t *version_out) {
  if (version_out) *version_out = 0;
  if (!s || !obs || !s->duo.bcast) return EM_EINVAL;
  return em_server_publish(s->duo.bcast, obs, version_out);
}

em_server *em_edge_server_core(em_edge_server *s, int broadcast) { return broadcast ? s->duo.bcast : s->duo.main; }

void em_edge_server_close(em_edge_server *s) {
  if (!s) return;
  em__duo_close(&s->duo);
  em__edge_free(s);
}

/* --------------------------------------------------------------- client */

static void em__errbuf(const em_client_opts *o, const char *text) {
  if (o && o->errbuf && o->errbuf_len) snprintf(o->errbuf, o->errbuf_len, "%s", text);
}

static void em__edge_client_free(em_edge_client *c) {
  if (c->c) em_client_close(c->c);
  em__strlist_free(&c->obs);
  em__strlist_free(&c->act);
  free(c->host);
  free(c->token);
  free(c);
}

/* keys of a server's compat field (a list of str) into l */
static int em__keys_from(const em_value *compat, const char *field, em__strlist *l) {
  em_value v, e;
  if (compat->type != EM_T_MAP || em_value_get(compat, field, &v) != 1 || v.type != EM_T_LIST) return EM_OK;
  em_iter it;
  em_iter_init(&it, &v);
  while (em_iter_next(&it, &e)) {
    if (e.type != EM_T_STR || memchr(e.as.str, 0, e.len)) continue;
    if (em__strlist_push(l, e.as.str, e.len)) return EM_ENOMEM;
  }
  return EM_OK;
}

int em_edge_client_open(em_edge_client **out, const char *host, uint16_t port, const em_edge_config *config,
                        const em_client_opts *opts) {
  *out = NULL;
  if (!host) return EM_EINVAL;
  em_client_opts o;
  if (opts) o = *opts;
  else em_client_opts_init(&o);
  o.service = "edge";
  em_edge_client *c = calloc(1, sizeof *c);
  if (!c) return EM_ENOMEM;
  c->port = port;
  if (!(c->host = strdup(host)) || (o.token && !(c->token = strdup(o.token)))) {
    em__edge_client_free(c);
    return EM_ENOMEM;
  }
  em_gate *gate = NULL; /* the config, checked once; it compares configs as servers do */
  if (config) {
    const char *why = "out of memory";
    int rc = em_gate_open_edge(&gate, config, &why);
    const em__strlist *ko = gate ? em__gate_keys(gate, 1) : NULL, *ka = gate ? em__gate_keys(gate, 0) : NULL;
    if (!rc) rc = em__strlist_init(&c->obs, (const char *const *)ko->v, ko->n, &why);
    if (!rc) rc = em__strlist_init(&c->act, (const char *const *)ka->v, ka->n, &why);
    if (rc) {
      em__errbuf(opts, why);
      em_gate_close(gate);
      em__edge_client_free(c);
      return rc;
    }
  }
  int rc = em_client_open(&c->c, host, port, &o);
  em__hello h;
  memset(&h, 0, sizeof h);
  if (!rc) rc = em__hello_read(c->c, &h);
  if (rc == EM_EDECODE) em__errbuf(opts, "the server's HELLO cannot be decoded");
  em_value compat = {.type = EM_T_NIL};
  if (!rc && (h.info.type != EM_T_MAP || em_value_get(&h.info, "compat", &compat) != 1))
    compat.type = EM_T_NIL;
  if (!rc && gate) {
    char diff[2048];
    int nd = em_gate_compat_diff(gate, &h.info, diff, sizeof diff);
    if (nd < 0) rc = nd;
    else if (nd > 0) {
      em__text t;
      em__text_init(&t);
      em__text_printf(&t, "the EdgeServer at %s:%u has another config: %s", host, port, diff);
      em__errbuf(opts, t.s ? t.s : "the EdgeServer has another config");
      em__text_free(&t);
      rc = EM_EHANDSHAKE;
    }
  }
  if (!rc && !config) {
    rc = em__keys_from(&compat, "observation_keys", &c->obs);
    if (!rc) rc = em__keys_from(&compat, "action_keys", &c->act);
  }
  if (!rc) {
    if (config && config->broadcast_port > 0 && config->broadcast_port <= 65535)
      c->bport = (uint16_t)config->broadcast_port;
    else if (!em__info_port(&h.info, "broadcast_port", &c->bport))
      c->bport = 0;
  }
  em__hello_free(&h);
  em_gate_close(gate);
  if (rc) {
    em__edge_client_free(c);
    return rc;
  }
  c->sub_opts = o;
  c->sub_opts.service = "edge.broadcast";
  c->sub_opts.token = c->token;
  c->sub_opts.errbuf = NULL;
  c->sub_opts.errbuf_len = 0;
  *out = c;
  return EM_OK;
}

int em_edge_obs(em_edge_client *c, const char *const *keys, size_t n, uint64_t timeout_ns, em_msg **reply) {
  *reply = NULL;
  if (!c || (n && !keys)) return EM_EINVAL;
  em_payload req;
  if (em_payload_init(&req)) return EM_ENOMEM;
  em_payload_begin_request(&req, "obs", 3);
  if (!keys) em_put_nil(&req);
  else {
    em_put_list(&req, (uint32_t)n);
    for (size_t i = 0; i < n; i++) {
      if (!keys[i] || em__strlist_find(&c->obs, keys[i], strlen(keys[i])) < 0) {
        em_payload_destroy(&req);
        return EM_EINVAL;
      }
      em_put_cstr(&req, keys[i]);
    }
  }
  int rc = em_client_request(c->c, EM_MSG_REQUEST, &req, timeout_ns, reply);
  em_payload_destroy(&req);
  return rc;
}

int em_edge_act(em_edge_client *c, const char *key, em_payload *action, uint64_t timeout_ns, em_msg **reply) {
  *reply = NULL;
  if (!c) return EM_EINVAL;
  if (!key) {
    if (c->act.n != 1) return EM_EINVAL;
    key = c->act.v[0];
  }
  if (em__strlist_find(&c->act, key, strlen(key)) < 0) return EM_EINVAL;
  em_payload req;
  if (em_payload_init(&req)) return EM_ENOMEM;
  em_payload_begin_request(&req, "act", 3);
  em_put_list(&req, 2);
  em_put_cstr(&req, key);
  int rc = action ? em__put_payload(&req, action) : em_put_map(&req, 0);
  if (!rc) rc = em_client_request(c->c, EM_MSG_REQUEST, &req, timeout_ns, reply);
  em_payload_destroy(&req);
  return rc;
}

const char *const *em_edge_client_observation_keys(const em_edge_client *c, size_t *n_out) {
  *n_out = c->obs.n;
  return (const char *const *)c->obs.v;
}

const char *const *em_edge_client_action_keys(const em_edge_client *c, size_t *n_out) {
  *n_out = c->act.n;
  return (const char *const *)c->act.v;
}

uint16_t em_edge_client_broadcast_port(const em_edge_client *c) { return c->bport; }

int em_edge_subscribe(em_edge_client *c, em_sub **out) {
  *out = NULL;
  if (!c || !c->bport) return EM_EINVAL;
  return em_sub_open(out, c->host, c->bport, &c->sub_opts);
}

em_client *em_edge_client_core(em_edge_client *c) { return c->c; }

void em_edge_client_close(em_edge_client *c) {
  if (!c) return;
  em__edge_client_free(c);
}
