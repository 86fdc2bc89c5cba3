/* inference.c: the Inference role (edgeml_roles.h; docs/protocol.md
 * "Inference"): a server of named interfaces and its client. */
#include "em_proto.h"

#include <stdio.h>
#include <stdlib.h>

#define EM__LIST "__interfaces__"

typedef struct em__iface {
  char *name;
  em_interface_fn fn;
  void *ud;
} em__iface;

struct em_infer_server {
  em__duo duo;
  pthread_mutex_t mu; /* guards ifaces */
  em__iface *ifaces;  /* sorted by name */
  size_t n, cap;
};

struct em_infer_client {
  em_client *c;
};

void em_infer_server_opts_init(em_infer_server_opts *o) {
  memset(o, 0, sizeof *o);
  em_server_opts_init(&o->server);
}

/* index of name, or -(insertion point) - 1 */
static long em__iface_find(const em_infer_server *s, const char *name, size_t len) {
  size_t lo = 0, hi = s->n;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    const char *m = s->ifaces[mid].name;
    size_t ml = strlen(m);
    int c = memcmp(m, name, ml < len ? ml : len);
    if (c == 0) c = ml < len ? -1 : ml > len ? 1 : 0;
    if (c == 0) return (long)mid;
    if (c < 0) lo = mid + 1;
    else hi = mid;
  }
  return -(long)lo - 1;
}

/* UnknownInterfaceError with the names (held: s->mu) */
static int em__unknown(em_infer_server *s, em_payload *reply, const em_value *method) {
  em__text t;
  em__text_init(&t);
  em__text_cstr(&t, "no interface ");
  em__text_repr_str(&t, method->as.str, method->len);
  em__text_cstr(&t, " on this server; it has: ");
  if (!s->n) em__text_cstr(&t, "none");
  for (size_t i = 0; i < s->n; i++) {
    if (i) em__text_cstr(&t, ", ");
    em__text_repr_str(&t, s->ifaces[i].name, strlen(s->ifaces[i].name));
  }
  em_payload_begin_error(reply, "edgeml.UnknownInterfaceError", t.s ? t.s : "no such interface", "", 1);
  em__text_free(&t);
  em_put_cstr(reply, "interfaces");
  em_put_list(reply, (uint32_t)s->n);
  for (size_t i = 0; i < s->n; i++) em_put_cstr(reply, s->ifaces[i].name);
  return EM_MSG_ERROR;
}

static int em__infer_handle(void *ud, const em_msg *req, em_payload *reply) {
  em_infer_server *s = ud;
  em_value method, payload;
  if (em_msg_request(req, &method, &payload))
    return em__error_reply(reply, "edgeml.InvalidArgumentError", 0,
                           "a request's body must be [method: str, payload]");
  pthread_mutex_lock(&s->mu);
  long i = em__iface_find(s, method.as.str, method.len);
  if (i < 0) {
    int rc;
    if (em_value_is(&method, EM__LIST)) {
      em_put_list(reply, (uint32_t)s->n);
      for (size_t k = 0; k < s->n; k++) em_put_cstr(reply, s->ifaces[k].name);
      rc = EM_MSG_REPLY;
    } else {
      rc = em__unknown(s, reply, &method);
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
  }
  em_interface_fn fn = s->ifaces[i].fn;
  void *fud = s->ifaces[i].ud;
  pthread_mutex_unlock(&s->mu); /* not held in the call: it may register */
  int rc = fn(fud, &payload, reply);
  if ((rc == EM_MSG_REPLY || rc == EM_MSG_ERROR) && reply->roots == 1 && em__payload_ready(reply) == EM_OK) {
    em__reply_keep(reply, req); /* the usual case: no text to build */
    return rc;
  }
  char what[96];
  em__text t;
  em__text_init(&t);
  em__text_cstr(&t, "interface ");
  em__text_repr_str(&t, method.as.str, method.len > 60 ? 60 : method.len);
  snprintf(what, sizeof what, "%s", t.s ? t.s : "interface");
  em__text_free(&t);
  rc = em__finish_reply(reply, rc, what);
  em__reply_keep(reply, req);
  return rc;
}

int em_infer_server_open(em_infer_server **out, const em_infer_server_opts *opts) {
  *out = NULL;
  if (!opts) return EM_EINVAL;
  em_infer_server *s = calloc(1, sizeof *s);
  if (!s) return EM_ENOMEM;
  pthread_mutex_init(&s->mu, NULL);
  em_server_opts so = opts->server;
  so.service = "inference";
  so.handler = em__infer_handle;
  so.handler_ud = s;
  so.hello_info = NULL;
  so.hello_info_len = 0;
  int rc = em_server_open(&s->duo.main, &so);
  if (rc) {
    pthread_mutex_destroy(&s->mu);
    free(s);
    return rc;
  }
  *out = s;
  return EM_OK;
}

int em_infer_server_register(em_infer_server *s, const char *name, em_interface_fn fn, void *ud) {
  if (!s || !name || !*name || !fn || strncmp(name, "__", 2) == 0) return EM_EINVAL;
  size_t len = strlen(name);
  pthread_mutex_lock(&s->mu);
  long i = em__iface_find(s, name, len);
  if (i >= 0) {
    s->ifaces[i].fn = fn;
    s->ifaces[i].ud = ud;
    pthread_mutex_unlock(&s->mu);
    return EM_OK;
  }
  size_t at = (size_t)(-i - 1);
  char *copy = malloc(len + 1);
  if (copy && s->n == s->cap) {
    size_t cap = s->cap ? 2 * s->cap : 8;
    em__iface *v = realloc(s->ifaces, cap * sizeof *v);
    if (!v) {
      free(copy);
      copy = NULL;
    } else {
      s->ifaces = v;
      s->cap = cap;
    }
  }
  if (!copy) {
    pthread_mutex_unlock(&s->mu);
    return EM_ENOMEM;
  }
  memcpy(copy, name, len + 1);
  memmove(s->ifaces + at + 1, s->ifaces + at, (s->n - at) * sizeof *s->ifaces);
  s->ifaces[at] = (em__iface){copy, fn, ud};
  s->n++;
  pthread_mutex_unlock(&s->mu);
  return EM_OK;
}

int em_infer_server_unregister(em_infer_server *s, const char *name) {
  if (!s || !name) return EM_EINVAL;
  pthread_mutex_lock(&s->mu);
  long i = em__iface_find(s, name, strlen(name));
  if (i < 0) {
    pthread_mutex_unlock(&s->mu);
    return EM_EINVAL;
  }
  free(s->ifaces[i].name);
  memmove(s->ifaces + i, s->ifaces + i + 1, (s->n - (size_t)i - 1) * sizeof *s->ifaces);
  s->n--;
  pthread_mutex_unlock(&s->mu);
  return EM_OK;
}

uint16_t em_infer_server_port(const em_infer_server *s) { return em_server_port(s->duo.main); }
int em_infer_server_run(em_infer_server *s) { return em__duo_run(&s->duo); }
int em_infer_server_start(em_infer_server *s) { return em__duo_start(&s->duo); }
void em_infer_server_stop(em_infer_server *s) { em__duo_stop(&s->duo); }
int em_infer_server_wait(em_infer_server *s, uint64_t timeout_ns) { return em__duo_wait(&s->duo, timeout_ns); }
em_server *em_infer_server_core(em_infer_server *s) { return s->duo.main; }

void em_infer_server_close(em_infer_server *s) {
  if (!s) return;
  em__duo_close(&s->duo);
  for (size_t i = 0; i < s->n; i++) free(s->ifaces[i].name);
  free(s->ifaces);
  pthread_mutex_destroy(&s->mu);
  free(s);
}

/* ---------------------------------------------------------------- client */

int em_infer_client_open(em_infer_client **out, const char *host, uint16_t port, const em_client_opts *opts) {
  *out = NULL;
  em_client_opts o;
  if (opts) o = *opts;
  else em_client_opts_init(&o);
  o.service = "inference";
  em_infer_client *c = calloc(1, sizeof *c);
  if (!c) return EM_ENOMEM;
  int rc = em_client_open(&c->c, host, port, &o);
  if (rc) {
    free(c);
    return rc;
  }
  *out = c;
  return EM_OK;
}

int em_infer_call(em_infer_client *c, const char *name, em_payload *payload, uint64_t timeout_ns, em_msg **reply) {
  *reply = NULL;
  if (!c || !name) return EM_EINVAL;
  return em__call(c->c, name, payload, timeout_ns, reply);
}

int em_infer_interfaces(em_infer_client *c, uint64_t timeout_ns, char ***names, size_t *n) {
  *names = NULL;
  *n = 0;
  em_msg *r;
  int rc = em_infer_call(c, EM__LIST, NULL, timeout_ns, &r);
  if (rc) {
    em_msg_free(r);
    return rc;
  }
  em_value v, e;
  if (em_msg_value(r, &v) || v.type != EM_T_LIST) {
    em_msg_free(r);
    return EM_EDECODE;
  }
  size_t bytes = (v.len + 1) * sizeof(char *);
  em_iter it;
  em_iter_init(&it, &v);
  while (em_iter_next(&it, &e)) {
    if (e.type != EM_T_STR || memchr(e.as.str, 0, e.len)) {
      em_msg_free(r);
      return EM_EDECODE;
    }
    bytes += e.len + 1;
  }
  char **out = malloc(bytes);
  if (!out) {
    em_msg_free(r);
    return EM_ENOMEM;
  }
  char *strs = (char *)(out + v.len + 1);
  size_t k = 0;
  em_iter_init(&it, &v);
  while (em_iter_next(&it, &e)) {
    out[k++] = strs;
    memcpy(strs, e.as.str, e.len);
    strs[e.len] = 0;
    strs += e.len + 1;
  }
  out[k] = NULL;
  em_msg_free(r);
  *names = out;
  *n = k;
  return EM_OK;
}

em_client *em_infer_client_core(em_infer_client *c) { return c->c; }

void em_infer_client_close(em_infer_client *c) {
  if (!c) return;
  em_client_close(c->c);
  free(c);
}
