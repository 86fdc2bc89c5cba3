/* em_proto.h: internal helpers shared by the roles (proto/edge.c,
 * proto/inference.c, proto/trainer.c): string lists, the compat map of a
 * role's HELLO info and its comparison, reading a server's HELLO, Python
 * style repr() text for messages, error replies, role server threads.
 * Internal: not installed, not part of the public API. Signatures here are
 * stable (other roles include this file). */
#ifndef EM_PROTO_H
#define EM_PROTO_H

#include "../base/em_base.h"

#include <pthread.h>

/* ---------------------------------------------------------------- strings */

/* An owned list of NUL-terminated strings (each malloc'd). */
typedef struct em__strlist {
  char **v;
  size_t n;
} em__strlist;

/* Copy n keys (n may be 0, keys then may be NULL). EM_EINVAL when a key is
 * NULL or the list has duplicates (*why, may be NULL, says which: a static
 * text), EM_ENOMEM. On error *l is empty. */
int em__strlist_init(em__strlist *l, const char *const *keys, size_t n, const char **why);
/* A sorted copy (strcmp order: Python's sorted() for ASCII keys). */
int em__strlist_sorted(em__strlist *out, const em__strlist *in);
void em__strlist_free(em__strlist *l); /* empties it; safe twice */
/* Index of the key of len bytes s (not NUL-terminated), or -1. */
long em__strlist_find(const em__strlist *l, const char *s, size_t len);
/* Add one copy of s (no duplicate check). EM_OK or EM_ENOMEM. */
int em__strlist_push(em__strlist *l, const char *s, size_t len);

/* A growing NUL-terminated text (malloc'd). On out-of-memory it stays what
 * it was and .oom is set; the text is always valid ("" when empty). */
typedef struct em__text {
  char *s;
  size_t len, cap;
  int oom;
} em__text;
void em__text_init(em__text *t);
void em__text_free(em__text *t);
void em__text_add(em__text *t, const char *s, size_t len);
void em__text_cstr(em__text *t, const char *s);
void em__text_printf(em__text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Python repr of a str: 'abc' (quotes, backslashes and control bytes
 * escaped; other bytes as they are). */
void em__text_repr_str(em__text *t, const char *s, size_t len);
/* repr of a list of str: ['a', 'b'] */
void em__text_repr_strlist(em__text *t, const em__strlist *l);
/* The config keys as Python's error messages list them:
 * "'a', 'b'" in sorted order, or "none" for an empty list. */
void em__text_keys(em__text *t, const em__strlist *sorted_keys);
/* repr of a received value as Python would print the decoded object:
 * None, True, 3, 1.5, 'x', b'..', [..], (..), {..}, {'k': v}; arrays as
 * array(dtype, shape). Nesting past 8 levels is "...". */
void em__text_repr_value(em__text *t, const em_value *v);

/* ----------------------------------------------------- payload rendering */

/* The msgpack body bytes of a payload without arrays (e.g. HELLO info for
 * em_server_opts.hello_info): *out malloc'd (free()), *len its size.
 * EM_OK, EM_EENCODE (incomplete, failed, or holds arrays), EM_ENOMEM. */
int em__payload_body(em_payload *p, uint8_t **out, size_t *len);

/* Reset `reply` and write an error reply {"type", "message", "traceback":
 * ""} with `extra` more pairs to follow. The message is printf-formatted.
 * Returns EM_MSG_ERROR (what a handler returns). */
int em__error_reply(em_payload *reply, const char *type, uint32_t extra, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* After a role callback filled `reply` and returned `rc`: make sure what
 * goes back is a valid REPLY or ERROR. An empty REPLY becomes nil; a
 * failed or incomplete payload, or a return value other than EM_MSG_REPLY
 * / EM_MSG_ERROR, becomes an ERROR (type "RuntimeError" or
 * "edgeml.EncodeError") naming `what` (e.g. "interface 'sum'"). Returns
 * the message type to send. */
int em__finish_reply(em_payload *reply, int rc, const char *what);

/* When `reply` holds arrays, keep the request's frame memory until the
 * reply's release (chained after a release hook the callback set), so a
 * callback may put the request's arrays into its reply (em_put_value).
 * Call after em__finish_reply. */
void em__reply_keep(em_payload *reply, const em_msg *req);

/* --------------------------------------------------------- compat & hello */

/* One field of a role's compat map (HELLO info "compat"). */
enum { EM__CF_NIL = 0, EM__CF_STR = 1, EM__CF_STRLIST = 2 };
typedef struct em__compat_field {
  const char *name;
  int kind;                 /* EM__CF_* */
  const char *str;          /* EM__CF_STR */
  const em__strlist *list;  /* EM__CF_STRLIST (sorted, as sent) */
} em__compat_field;

/* Write the compat map: n fields, in the order given (give them sorted by
 * name, as Python's dict is built). Returns the payload's error state. */
int em__put_compat(em_payload *p, const em__compat_field *f, size_t n);

/* Compare my compat fields with the server's compat map `theirs` as
 * Python's _compat_diff does: for each field name in either (sorted), if
 * they differ, "name: client <repr>, server <repr>" (a field one side
 * lacks is None), joined by "; " into *diff. Returns the number of
 * differing fields (0: equal), or EM_ENOMEM. `theirs` not a map counts as
 * every one of my fields differing from None. */
int em__compat_diff(const em__compat_field *mine, size_t n, const em_value *theirs, em__text *diff);

/* A server's HELLO body (em_client_server_hello) as a message one can read
 * with the value API. */
typedef struct em__hello {
  em_msg *msg;     /* owned; NULL when the client has no hello */
  em_value hello;  /* the whole HELLO map */
  em_value info;   /* its "info" (EM_T_NIL when absent) */
} em__hello;
/* EM_OK, EM_EDECODE (unreadable), EM_ENOMEM. Free with em__hello_free. */
int em__hello_read(em_client *c, em__hello *h);
void em__hello_free(em__hello *h);
/* info[key] as an int port: 1..65535 -> *port and 1; nil, absent or
 * anything else -> 0. */
int em__info_port(const em_value *info, const char *key, uint16_t *port);

/* ------------------------------------------------------------ gates */

/* em_gate_check on a request already read: EM_OK (serve it) or
 * EM_MSG_ERROR (reply holds the error). gate.c. */
int em__gate_check_value(const em_gate *g, const em_value *method, const em_value *payload, em_payload *reply);
/* An Edge gate's keys in the config's order: 0 action_keys, 1
 * observation_keys (owned by the gate). */
const em__strlist *em__gate_keys(const em_gate *g, int which);

/* ------------------------------------------------ role server threads */

/* The main server (handler) plus an optional broadcast-only server, run
 * the way Python's ServerBase does: the broadcast server on a thread of
 * its own, the main one on the caller's thread (run) or another thread
 * (start). */
typedef struct em__duo {
  em_server *main, *bcast; /* owned; bcast may be NULL */
  pthread_t main_thread, bcast_thread;
  int main_started, bcast_started; /* threads to join at close */
  int main_rc;
  atomic_int state; /* 0 created, 1 running, 2 done */
} em__duo;
/* Start the broadcast thread (if any) and run main here; when main
 * returns, stop and join the broadcast server. EM_OK, EM_EINTR (a tick
 * stopped it), EM_EINVAL (already run). */
int em__duo_run(em__duo *d);
/* The same on a thread of its own; returns at once. EM_OK, EM_EINVAL
 * (already run), EM_ENOMEM (no thread). */
int em__duo_start(em__duo *d);
void em__duo_stop(em__duo *d);
int em__duo_wait(em__duo *d, uint64_t timeout_ns);
/* Stop, join, close both servers. */
void em__duo_close(em__duo *d);

/* ------------------------------------------------------------------ calls */

/* Build the REQUEST body [method, value] in `req` (initialised, empty)
 * from a payload holding one value (NULL = nil). The value's bytes are
 * copied, its arrays stay borrowed (as value's). EM_OK, EM_EENCODE (value
 * failed to build, is empty or incomplete), EM_ENOMEM. */
/* Write the one value `value` holds as the next value of dst (its bytes
 * copied, its arrays borrowed). dst must hold no arrays yet when value
 * has some (EM_EINVAL). EM_OK, EM_EENCODE (value failed, is empty or
 * incomplete; dst's top level is full), EM_ENOMEM (sticks in dst). */
int em__put_payload(em_payload *dst, em_payload *value);
int em__request_wrap(em_payload *req, const char *method, em_payload *value);
/* em_client_request of [method, value] (see em__request_wrap): EM_OK and
 * *reply the REPLY, EM_EREMOTE and *reply the ERROR, else *reply NULL. */
int em__call(em_client *c, const char *method, em_payload *value, uint64_t timeout_ns, em_msg **reply);

#endif
