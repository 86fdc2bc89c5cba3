/* gate.c: the Edge and Trainer request rules and config check, in one
 * place (edgeml_roles.h "role gates"). The C role servers (edge.c,
 * trainer.c) and the Python binding's servers all check requests here, so
 * both languages refuse the same requests with the same errors. */
#include "em_proto.h"

#include <stdlib.h>

#define EM__GATE_DEFAULT_VERSION "0.0.1"

enum { EM__GATE_EDGE = 1, EM__GATE_TRAINER = 2 };

struct em_gate {
  int role;
  int has_first, has_second; /* edge: obs, act; trainer: train_step, request */
  /* edge */
  em__strlist obs, act, obs_sorted, act_sorted;
  /* trainer */
  int any_keys;
  em__strlist keys_sorted, types, types_sorted;
  char *version;
  em__compat_field compat[3];
};

void em_gate_close(em_gate *g) {
  if (!g) return;
  em__strlist_free(&g->obs);
  em__strlist_free(&g->act);
  em__strlist_free(&g->obs_sorted);
  em__strlist_free(&g->act_sorted);
  em__strlist_free(&g->keys_sorted);
  em__strlist_free(&g->types);
  em__strlist_free(&g->types_sorted);
  free(g->version);
  free(g);
}

static em_gate *em__gate_new(int role, const char *version) {
  em_gate *g = calloc(1, sizeof *g);
  if (!g) return NULL;
  g->role = role;
  g->has_first = g->has_second = 1;
  if (!(g->version = strdup(version ? version : EM__GATE_DEFAULT_VERSION))) {
    free(g);
    return NULL;
  }
  return g;
}

int em_gate_open_edge(em_gate **out, const em_edge_config *c, const char **why) {
  const char *w = NULL;
  *out = NULL;
  em_gate *g = em__gate_new(EM__GATE_EDGE, c->version);
  if (!g) return EM_ENOMEM;
  int rc = em__strlist_init(&g->act, c->action_keys, c->n_action_keys, &w);
  if (!rc) rc = em__strlist_init(&g->obs, c->observation_keys, c->n_observation_keys, &w);
  if (!rc) rc = em__strlist_sorted(&g->act_sorted, &g->act);
  if (!rc) rc = em__strlist_sorted(&g->obs_sorted, &g->obs);
  if (rc) {
    if (why) *why = w ? w : "invalid config";
    em_gate_close(g);
    return rc;
  }
  g->compat[0] = (em__compat_field){"action_keys", EM__CF_STRLIST, NULL, &g->act_sorted};
  g->compat[1] = (em__compat_field){"observation_keys", EM__CF_STRLIST, NULL, &g->obs_sorted};
  g->compat[2] = (em__compat_field){"version", EM__CF_STR, g->version, NULL};
  *out = g;
  return EM_OK;
}

int em_gate_open_trainer(em_gate **out, const em_trainer_config *c, const char **why) {
  const char *w = NULL;
  *out = NULL;
  em_gate *g = em__gate_new(EM__GATE_TRAINER, c->version);
  if (!g) return EM_ENOMEM;
  int rc = EM_OK;
  g->any_keys = c->payload_keys == NULL;
  if (!g->any_keys) {
    em__strlist keys = {0};
    rc = em__strlist_init(&keys, c->payload_keys, c->n_payload_keys, &w);
    if (!rc) rc = em__strlist_sorted(&g->keys_sorted, &keys);
    em__strlist_free(&keys);
  }
  if (!rc && c->n_request_types && !c->request_types) {
    w = "request_types is NULL with n_request_types > 0";
    rc = EM_EINVAL;
  }
  if (!rc) rc = em__strlist_init(&g->types, c->request_types, c->n_request_types, &w);
  if (!rc) rc = em__strlist_sorted(&g->types_sorted, &g->types);
  if (rc) {
    if (why) *why = w ? w : "invalid config";
    em_gate_close(g);
    return rc;
  }
  /* sorted by name, as Python's dict is built */
  g->compat[0] = (em__compat_field){"payload_keys", g->any_keys ? EM__CF_NIL : EM__CF_STRLIST, NULL,
                                    g->any_keys ? NULL : &g->keys_sorted};
  g->compat[1] = (em__compat_field){"request_types", EM__CF_STRLIST, NULL, &g->types_sorted};
  g->compat[2] = (em__compat_field){"version", EM__CF_STR, g->version, NULL};
  *out = g;
  return EM_OK;
}

const em__strlist *em__gate_keys(const em_gate *g, int which) { return which ? &g->obs : &g->act; }

void em_gate_set_handlers(em_gate *g, int first, int second) {
  g->has_first = first != 0;
  g->has_second = second != 0;
}

int em_gate_put_compat(const em_gate *g, em_payload *p) { return em__put_compat(p, g->compat, 3); }

int em_gate_compat_diff(const em_gate *g, const em_value *info, char *buf, size_t cap) {
  em_value theirs;
  if (cap) buf[0] = 0;
  /* nothing to compare (as Python's clients: `if theirs:`) */
  if (info->type != EM_T_MAP || em_value_get(info, "compat", &theirs) != 1 || theirs.type != EM_T_MAP ||
      theirs.len == 0)
    return 0;
  em__text diff;
  em__text_init(&diff);
  int n = em__compat_diff(g->compat, 3, &theirs, &diff);
  if (n > 0 && cap) {
    size_t k = diff.len < cap - 1 ? diff.len : cap - 1;
    memcpy(buf, diff.s, k);
    buf[k] = 0;
  }
  em__text_free(&diff);
  return n;
}

int em_msg_from_body(const void *body, size_t len, em_msg **out) {
  /* one block: em_msg_free (free(m), no buf) frees the copy too */
  *out = NULL;
  em_msg *m = calloc(1, sizeof *m + (len ? len : 1));
  if (!m) return EM_ENOMEM;
  uint8_t *b = (uint8_t *)(m + 1);
  if (len) memcpy(b, body, len);
  m->type = EM_MSG_REPLY;
  m->body = b;
  m->body_len = len;
  m->frame_bytes = len;
  *out = m;
  return EM_OK;
}

/* ------------------------------------------------------------- the rules */

static int em__gate_invalid_key(em_payload *reply, const em_value *key, const em__strlist *sorted,
                                const char *what) {
  em__text t;
  em__text_init(&t);
  em__text_repr_value(&t, key);
  em__text_printf(&t, " is not one of the config's %s: ", what);
  em__text_keys(&t, sorted);
  int rc = em__error_reply(reply, "edgeml.InvalidKeyError", 0, "%s", t.s ? t.s : "invalid key");
  em__text_free(&t);
  return rc;
}

static int em__gate_unknown(em_payload *reply, const char *serves, const em_value *method,
                            const char *const *names, uint32_t n) {
  em__text t;
  em__text_init(&t);
  em__text_cstr(&t, serves);
  em__text_repr_str(&t, method->as.str, method->len);
  em__error_reply(reply, "edgeml.UnknownInterfaceError", 1, "%s", t.s ? t.s : "unknown method");
  em__text_free(&t);
  em_put_cstr(reply, "interfaces");
  em_put_list(reply, n);
  for (uint32_t i = 0; i < n; i++) em_put_cstr(reply, names[i]);
  return EM_MSG_ERROR;
}

static int em__gate_edge(const em_gate *g, const em_value *method, const em_value *payload, em_payload *reply) {
  if (em_value_is(method, "obs")) {
    if (!g->has_first)
      return em__error_reply(reply, "edgeml.InvalidArgumentError", 0, "this EdgeServer has no observation_callback");
    if (payload->type == EM_T_NIL) return EM_OK;
    if (payload->type != EM_T_LIST && payload->type != EM_T_TUPLE)
      return em__error_reply(reply, "edgeml.InvalidArgumentError", 0,
                             "malformed observation request: the payload must be nil or a list of keys, not %s",
                             em_type_name(payload->type));
    em_iter it;
    em_iter_init(&it, payload);
    em_value k;
    while (em_iter_next(&it, &k))
      if (k.type != EM_T_STR || em__strlist_find(&g->obs, k.as.str, k.len) < 0)
        return em__gate_invalid_key(reply, &k, &g->obs_sorted, "observation_keys");
    return EM_OK;
  }
  if (em_value_is(method, "act")) {
    if (!g->has_second)
      return em__error_reply(reply, "edgeml.InvalidArgumentError", 0, "this EdgeServer has no action_callback");
    em_value key, action;
    if ((payload->type != EM_T_LIST && payload->type != EM_T_TUPLE) || payload->len != 2 ||
        em_value_at(payload, 0, &key) || em_value_at(payload, 1, &action))
      return em__error_reply(reply, "edgeml.InvalidArgumentError", 0, "malformed action request");
    if (key.type != EM_T_STR || em__strlist_find(&g->act, key.as.str, key.len) < 0)
      return em__gate_invalid_key(reply, &key, &g->act_sorted, "action_keys");
    return EM_OK;
  }
  static const char *const names[] = {"act", "obs"};
  return em__gate_unknown(reply, "an EdgeServer serves 'obs' and 'act', not ", method, names, 2);
}

static int em__gate_trainer(const em_gate *g, const em_value *method, const em_value *payload,
                            em_payload *reply) {
  if (em_value_is(method, "train_step")) {
    if (!g->has_first)
      return em__error_reply(reply, "edgeml.InvalidArgumentError", 0, "this TrainerServer has no train_step");
    if (!g->any_keys && payload->type == EM_T_MAP) {
      em_iter it;
      em_value k, v;
      em_iter_init(&it, payload);
      while (em_iter_next(&it, &k) && em_iter_next(&it, &v))
        if (k.type != EM_T_STR || em__strlist_find(&g->keys_sorted, k.as.str, k.len) < 0)
          return em__gate_invalid_key(reply, &k, &g->keys_sorted, "payload_keys");
    }
    return EM_OK;
  }
  if (em_value_is(method, "request")) {
    em_value type, body;
    if ((payload->type != EM_T_LIST && payload->type != EM_T_TUPLE) || payload->len != 2 ||
        em_value_at(payload, 0, &type) || type.type != EM_T_STR || em_value_at(payload, 1, &body))
      return em__error_reply(reply, "edgeml.InvalidArgumentError", 0, "malformed request");
    if (em__strlist_find(&g->types, type.as.str, type.len) < 0) {
      em__text t;
      em__text_init(&t);
      em__text_repr_str(&t, type.as.str, type.len);
      em__text_cstr(&t, " is not one of the config's request_types: ");
      for (size_t i = 0; i < g->types.n; i++) { /* config order, as Python lists them */
        if (i) em__text_cstr(&t, ", ");
        em__text_repr_str(&t, g->types.v[i], strlen(g->types.v[i]));
      }
      if (!g->types.n) em__text_cstr(&t, "none");
      em__error_reply(reply, "edgeml.UnknownRequestTypeError", 1, "%s", t.s ? t.s : "unknown request type");
      em__text_free(&t);
      em_put_cstr(reply, "request_types");
      em_put_list(reply, (uint32_t)g->types.n);
      for (size_t i = 0; i < g->types.n; i++) em_put_cstr(reply, g->types.v[i]);
      return EM_MSG_ERROR;
    }
    if (!g->has_second)
      return em__error_reply(reply, "edgeml.InvalidArgumentError", 0, "this TrainerServer has no request_callback");
    return EM_OK;
  }
  static const char *const names[] = {"cursor", "data", "request", "train_step"};
  return em__gate_unknown(reply, "a TrainerServer serves 'train_step', 'data', 'cursor' and 'request', not ",
                          method, names, 4);
}

int em__gate_check_value(const em_gate *g, const em_value *method, const em_value *payload, em_payload *reply) {
  return g->role == EM__GATE_EDGE ? em__gate_edge(g, method, payload, reply)
                                  : em__gate_trainer(g, method, payload, reply);
}

int em_gate_check(const em_gate *g, const em_msg *req, em_payload *reply) {
  /* the method first, in one pass over the start of the body: methods
   * whose payload the rules do not inspect are not read further */
  em_reader r;
  em_value root, method, payload;
  em_reader_init(&r, req);
  if (em_read(&r, &root) != EM_OK || root.type != EM_T_LIST || root.len != 2 || em_read(&r, &method) != EM_OK ||
      method.type != EM_T_STR)
    return EM_OK; /* the decoder refuses it with the reason */
  if (g->role == EM__GATE_TRAINER && (em_value_is(&method, "data") || em_value_is(&method, "cursor")))
    return EM_OK;
  if (em_msg_request(req, &method, &payload) != EM_OK) return EM_OK; /* likewise */
  return em__gate_check_value(g, &method, &payload, reply);
}
