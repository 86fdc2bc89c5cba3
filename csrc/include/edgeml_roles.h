/* edgeml_roles.h: the Edge and Inference roles in C (included by edgeml.h;
 * include edgeml.h, not this). docs/c-api.md shows them in use.
 *
 * Each role is the C peer of the Python class of the same name and speaks
 * what docs/protocol.md ("Roles") says, so a C server serves Python
 * clients and a C client calls Python servers. The conventions are
 * edgeml.h's: EM_OK or a negative EM_E* code, nanosecond timeouts
 * (EM_FOREVER), and for each pointer who owns it.
 *
 * Servers: *_open binds the port(s) (errors such as EADDRINUSE come back
 * there), *_run serves on the calling thread until *_stop, *_start serves
 * on a thread of the server's own, *_close frees. Callbacks run on the
 * server's loop thread, one request at a time; they get the request's
 * payload as an em_value (valid during the call) and write their reply
 * into `reply` (an empty em_payload) with em_put_*. A callback returns
 * EM_MSG_REPLY, or EM_MSG_ERROR after em_payload_begin_error (Python
 * callers get the named exception: edgeml.InvalidKeyError and the other
 * edgeml.* types as themselves, anything else as RemoteError). Anything
 * else it returns (e.g. a negative EM_E* code), and a reply that failed
 * to build or is incomplete, is sent to the caller as an ERROR naming the
 * callback; the connection and the server go on. A reply left empty is
 * sent as nil. Arrays put into a reply are borrowed until the reply's
 * release callback runs (em_payload_on_release; it runs on the loop
 * thread once the reply is written, maybe after later requests were
 * handled); the request's own arrays may go into the reply as they are
 * (em_put_value): the role keeps the request's memory until then. */
#ifndef EDGEML_ROLES_H
#define EDGEML_ROLES_H

#include "edgeml_trainer.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------- inference
 *
 * An InferenceServer serves named functions ("interfaces"); an
 * InferenceClient calls them: method = the name, payload = any value, the
 * reply = what the interface wrote. "__interfaces__" lists the names
 * (sorted); an unknown name is an ERROR edgeml.UnknownInterfaceError whose
 * map also has "interfaces": [names]. Service "inference", no HELLO info. */

typedef struct em_infer_server em_infer_server;

/* An interface: `payload` is the request's payload (borrowed for the
 * call, see above for its arrays in the reply). */
typedef int (*em_interface_fn)(void *ud, const em_value *payload, em_payload *reply);

typedef struct em_infer_server_opts {
  /* host, port (0 = any free one), token, limits, timeouts, log and tick
   * as for em_server_open; the role sets service ("inference") and the
   * handler, and sends no hello_info (those fields are ignored). */
  em_server_opts server;
} em_infer_server_opts;

/* Defaults: em_server_opts_init, port 0. */
EM_API void em_infer_server_opts_init(em_infer_server_opts *o);

/* Create the server and bind its port. On success *out is owned by the
 * caller (em_infer_server_close); on failure *out is NULL. Any thread.
 * Errors: as em_server_open (EADDRINUSE, EINVAL, ENOMEM...). */
EM_API int em_infer_server_open(em_infer_server **out, const em_infer_server_opts *opts);

/* Serve fn(ud, ...) under `name` (copied), replacing an interface of that
 * name. Any thread, also while the server runs (the next request sees it).
 * fn and ud must stay valid until the interface is replaced or
 * unregistered and no call of it runs any more (after close, or after a
 * request made after the change has been answered).
 * Errors: EINVAL (name NULL, empty, or starting with "__"; fn NULL), ENOMEM. */
EM_API int em_infer_server_register(em_infer_server *s, const char *name, em_interface_fn fn, void *ud);
/* Stop serving `name`: EM_OK, or EINVAL when there is none. Any thread. */
EM_API int em_infer_server_unregister(em_infer_server *s, const char *name);

/* The bound port. Any thread. */
EM_API uint16_t em_infer_server_port(const em_infer_server *s);
/* Serve on the calling thread until em_infer_server_stop or a tick stops
 * it (then EM_EINTR); EINVAL when it already ran or was started. */
EM_API int em_infer_server_run(em_infer_server *s);
/* Serve on a new thread of the server's own; returns at once. EM_OK,
 * EINVAL (already running or ran), ENOMEM (no thread). */
EM_API int em_infer_server_start(em_infer_server *s);
/* Ask it to stop; returns at once. Any thread, also an interface. */
EM_API void em_infer_server_stop(em_infer_server *s);
/* Wait until serving has ended (or never began): EM_OK or ETIMEDOUT.
 * Any thread but the loop's. */
EM_API int em_infer_server_wait(em_infer_server *s, uint64_t timeout_ns);
/* The underlying server (stats, em_server_on_loop_thread); owned by s. */
EM_API em_server *em_infer_server_core(em_infer_server *s);
/* Stop, wait for the serving thread (from _start), free. Call it from a
 * thread other than the loop's, after _run has returned when _run was
 * used. NULL is fine. */
EM_API void em_infer_server_close(em_infer_server *s);

typedef struct em_infer_client em_infer_client;

/* Connect to an InferenceServer at host:port (opts may be NULL: the
 * defaults; its service is ignored, "inference" is expected). On success
 * *out is owned by the caller (em_infer_client_close). Blocks. Any thread.
 * Errors: as em_client_open (EHANDSHAKE for a server of another role). */
EM_API int em_infer_client_open(em_infer_client **out, const char *host, uint16_t port,
                                const em_client_opts *opts);

/* Call interface `name` with `payload` (a payload holding one value, or
 * NULL for nil; it stays the caller's, its arrays are read until this
 * returns) and wait up to timeout_ns for the reply.
 * EM_OK: *reply is the REPLY (owned by the caller: em_msg_free; read it
 * with em_msg_value). EM_EREMOTE: *reply is the ERROR message (its map has
 * "type", "message", "traceback"; em_msg_error gives "type: message").
 * Other codes: *reply is NULL (as em_client_request: ETIMEDOUT,
 * ECONNCLOSED, EENCODE for a payload that failed to build or is
 * incomplete...). Thread-safe: calls from several threads share the
 * connection. */
EM_API int em_infer_call(em_infer_client *c, const char *name, em_payload *payload, uint64_t timeout_ns,
                         em_msg **reply);

/* The server's interface names, sorted: *names is one malloc'd block
 * (free(*names) frees all) of *n pointers followed by a NULL, then the
 * strings. EM_OK, EM_EREMOTE (errbuf-less: the server answered ERROR),
 * EM_EDECODE (the reply is not a list of str), or a call's error. */
EM_API int em_infer_interfaces(em_infer_client *c, uint64_t timeout_ns, char ***names, size_t *n);

/* The underlying client (timing statistics, em_client_shutdown); owned by c. */
EM_API em_client *em_infer_client_core(em_infer_client *c);
/* Close (as em_client_close: calls in flight fail with ECLOSED). NULL ok. */
EM_API void em_infer_client_close(em_infer_client *c);

/* ------------------------------------------------------------------ edge
 *
 * An EdgeServer (a robot, a camera board) serves observations ("obs") and
 * takes actions ("act"); an EdgeClient reads and sends them. With a
 * broadcast port the server also streams observations (latest value only)
 * to subscribers. Service "edge"; the HELLO info is {"role": "edge",
 * "compat": {"action_keys": sorted, "observation_keys": sorted, "version"},
 * "broadcast_port": int | nil}, and a client with a config refuses a
 * server whose compat differs. */

#define EM_EDGE_NO_BROADCAST (-1)

/* What an edge server serves: the C form of Python's EdgeConfig. The key
 * arrays are borrowed by the call that takes the config (open copies
 * them). */
typedef struct em_edge_config {
  const char *const *action_keys;
  size_t n_action_keys;
  const char *const *observation_keys; /* their order is "every key"'s order */
  size_t n_observation_keys;
  const char *version;   /* your compatibility tag; NULL = "0.0.1" */
  uint16_t port;         /* requests; 0 = any free port */
  int32_t broadcast_port; /* the observation stream: EM_EDGE_NO_BROADCAST
                             (-1, none), 0 = any free port, or the port */
} em_edge_config;

/* No keys, version "0.0.1", port 0, no broadcast port. */
EM_API void em_edge_config_init(em_edge_config *c);

/* The observation callback: `keys` are the requested observation keys (n
 * of them, all declared in the config; for a request of every key the
 * config's keys in their order). The strings are the server's, valid
 * during the call. Write the observation (a map, usually) into reply. */
typedef int (*em_edge_obs_fn)(void *ud, const char *const *keys, size_t n, em_payload *reply);
/* The action callback: `key` one of the config's action keys (the
 * server's string), `action` the action value (borrowed for the call). */
typedef int (*em_edge_act_fn)(void *ud, const char *key, const em_value *action, em_payload *reply);

typedef struct em_edge_server_opts {
  em_edge_config config;
  em_edge_obs_fn observation; /* NULL: "obs" is answered InvalidArgumentError */
  void *observation_ud;
  em_edge_act_fn action;      /* NULL: "act" is answered InvalidArgumentError */
  void *action_ud;
  /* host, token, limits, timeouts, log and tick (the tick runs on the
   * request loop) as for em_server_open; the port comes from config, and
   * the role sets service, handler and hello_info (ignored here). */
  em_server_opts server;
} em_edge_server_opts;

/* em_edge_config_init + em_server_opts_init; no callbacks. */
EM_API void em_edge_server_opts_init(em_edge_server_opts *o);

typedef struct em_edge_server em_edge_server;

/* Check the config (keys non-NULL and without duplicates, ports distinct),
 * copy it, and bind the broadcast port (if any) and the port. On success
 * *out is owned by the caller (em_edge_server_close); on failure *out is
 * NULL and a bad config is logged (opts->server.log, else stderr). Any
 * thread.
 * Errors: EINVAL (a bad config), EADDRINUSE, ENOMEM, as em_server_open. */
EM_API int em_edge_server_open(em_edge_server **out, const em_edge_server_opts *opts);

/* Bound ports (0: no broadcast port). Any thread. */
EM_API uint16_t em_edge_server_port(const em_edge_server *s);
EM_API uint16_t em_edge_server_broadcast_port(const em_edge_server *s);

/* Serve: requests on the calling thread, the broadcast port on a thread of
 * its own, until em_edge_server_stop or a tick returns non-zero (then
 * EM_EINTR). When it returns both ports are closed. EINVAL when it already
 * ran or was started. */
EM_API int em_edge_server_run(em_edge_server *s);
/* The same on a new thread; returns at once. EM_OK, EINVAL, ENOMEM. */
EM_API int em_edge_server_start(em_edge_server *s);
/* Ask it to stop (both ports); returns at once. Any thread, callbacks too. */
EM_API void em_edge_server_stop(em_edge_server *s);
/* Wait until serving has ended (or never began): EM_OK or ETIMEDOUT. */
EM_API int em_edge_server_wait(em_edge_server *s, uint64_t timeout_ns);

/* Publish `obs` (a whole payload, e.g. one map) to the observation stream:
 * subscribers get the newest observation, never a backlog. The payload is
 * copied into a frame, so it and its arrays stay the caller's and may
 * change once this returns. Before run it is kept and sent once the server
 * runs. *version_out (may be NULL) gets its version (1, 2, ...). Any thread.
 * Errors: EINVAL (no broadcast port), EENCODE (obs failed to build or is
 * incomplete), ENOMEM, ETOOBIG, ECLOSED (the server has stopped). */
EM_API int em_edge_server_publish(em_edge_server *s, em_payload *obs, uint64_t *version_out);

/* The request server (broadcast = 0) or the broadcast server (1; NULL
 * without one), for stats. Owned by s. */
EM_API em_server *em_edge_server_core(em_edge_server *s, int broadcast);

/* Stop, wait for the serving threads, free. Not from a callback; after
 * _run has returned when _run was used. NULL is fine. */
EM_API void em_edge_server_close(em_edge_server *s);

typedef struct em_edge_client em_edge_client;

/* Connect to the EdgeServer at host:port (opts may be NULL; its service is
 * ignored, "edge" is expected). With a config (may be NULL: learn the keys
 * from the server) the server's compat must equal it, else the open fails
 * with EM_EHANDSHAKE and opts->errbuf (if any) says "the EdgeServer at
 * host:port has another config: " and, for each differing field,
 * "field: client [...], server [...]" joined by "; ". config's ports are
 * not used, except a non-zero broadcast_port, which is where
 * em_edge_subscribe connects (else the one the server announced). On
 * success *out is owned by the caller (em_edge_client_close). Blocks.
 * Errors: as em_client_open, EINVAL (a bad config), EDECODE (the server's
 * HELLO info is unreadable). */
EM_API int em_edge_client_open(em_edge_client **out, const char *host, uint16_t port,
                               const em_edge_config *config, const em_client_opts *opts);

/* The observation for `keys` (n of them; keys NULL = every key, in the
 * server's config order). EM_OK: *reply the REPLY (owned by the caller).
 * EM_EREMOTE: *reply the ERROR. EINVAL (nothing sent): a key the config
 * (or the server's, without a config) does not declare. Else as
 * em_client_request. Thread-safe. */
EM_API int em_edge_obs(em_edge_client *c, const char *const *keys, size_t n, uint64_t timeout_ns,
                       em_msg **reply);

/* Send `action` (a payload of one value; NULL sends {} as agentlace's
 * act(key) did) under `key` (NULL: the config's only action key) and wait
 * for the action callback's reply. Replies and errors as em_edge_obs;
 * EINVAL for a key not declared (or NULL with other than one key). */
EM_API int em_edge_act(em_edge_client *c, const char *key, em_payload *action, uint64_t timeout_ns,
                       em_msg **reply);

/* The keys this client checks against (the config's, else the server's):
 * n_out gets the count; the strings are c's, valid until close. */
EM_API const char *const *em_edge_client_observation_keys(const em_edge_client *c, size_t *n_out);
EM_API const char *const *em_edge_client_action_keys(const em_edge_client *c, size_t *n_out);

/* The broadcast port subscriptions go to: the config's when non-zero, else
 * the one the server announced; 0 when there is none. */
EM_API uint16_t em_edge_client_broadcast_port(const em_edge_client *c);

/* Subscribe to the observation stream: a new em_sub (owned by the caller:
 * em_sub_close) on the broadcast port, with the client's token and
 * connect timeout, service "edge.broadcast". em_sub_next then returns each
 * PUBLISH (its body the observation, req_id its version). Blocks for the
 * handshake. Errors: EINVAL (no broadcast port), as em_sub_open. Any
 * thread. */
EM_API int em_edge_subscribe(em_edge_client *c, em_sub **out);

/* The underlying client; owned by c. */
EM_API em_client *em_edge_client_core(em_edge_client *c);
/* Close; NULL is fine. Subscriptions are separate (close them yourself). */
EM_API void em_edge_client_close(em_edge_client *c);

/* ------------------------------------------------------------ role gates
 *
 * A role's request rules and config check without its server: for a
 * program that runs its own handler on an em_server (the Python binding
 * does: edgeml.EdgeServer and edgeml.TrainerServer are em_servers whose
 * handler asks a gate first, so Python and C servers refuse the same
 * requests with the same errors). The C role servers above use the same
 * gates.
 *
 * Edge rules: methods "obs" (nil, or a list/tuple of observation keys)
 * and "act" ([action key, action]); a missing callback is
 * edgeml.InvalidArgumentError, a key outside the config
 * edgeml.InvalidKeyError, another method edgeml.UnknownInterfaceError.
 * Trainer rules: "train_step" (a map's keys within payload_keys, unless
 * any), "request" ([type in request_types, payload]); "data" and "cursor"
 * are passed on unchecked (their rules need the server's stores: see
 * docs/protocol.md); others edgeml.UnknownInterfaceError. */
typedef struct em_gate em_gate;

/* A gate for an Edge / a Trainer config (copied; only the keys, request
 * types, payload keys and version are used). *out owned by the caller
 * (em_gate_close). Errors: EINVAL (duplicate or NULL keys; why, may be
 * NULL, gets a static reason), ENOMEM. Any thread. */
EM_API int em_gate_open_edge(em_gate **out, const em_edge_config *config, const char **why);
EM_API int em_gate_open_trainer(em_gate **out, const em_trainer_config *config, const char **why);
EM_API void em_gate_close(em_gate *g); /* NULL is fine */

/* Which handlers the server has (edge: observation, action; trainer:
 * train_step, request). A request for a missing one is refused with
 * edgeml.InvalidArgumentError. Default: both present. Not thread-safe
 * against a concurrent em_gate_check (set them from the loop thread, or
 * before the server runs). */
EM_API void em_gate_set_handlers(em_gate *g, int first, int second);

/* Check a REQUEST against the rules. EM_OK: serve it (the body may still
 * be malformed where the rules did not look: the decoder will say so);
 * EM_MSG_ERROR: `reply` (reset first) holds the error reply to send.
 * Reads the body (checking it) only for the methods whose payload the
 * rules inspect. Thread-safe (the gate is read only). */
EM_API int em_gate_check(const em_gate *g, const em_msg *req, em_payload *reply);

/* The gate's compat map (docs/protocol.md "Roles": the HELLO info's
 * "compat"), written into p as one value. EM_OK or p's error. */
EM_API int em_gate_put_compat(const em_gate *g, em_payload *p);

/* Compare the config with a server's HELLO `info` value: returns the
 * number of differing fields (0: compatible) and, when there are some,
 * writes "field: client X, server Y; ..." (Python's repr of each side)
 * into buf (cut to cap, NUL-terminated); EM_ENOMEM. A server without a
 * "compat" map, or with an empty one, is compatible (nothing to compare).
 * Thread-safe. */
EM_API int em_gate_compat_diff(const em_gate *g, const em_value *server_info, char *buf, size_t cap);

/* A message holding a copy of a bare msgpack body (no blobs), e.g. the
 * handshake body em_client_server_hello gives, to read with the value
 * API. *out owned by the caller (em_msg_free). EM_OK, EM_ENOMEM. The body
 * is not checked here (em_msg_value checks it). */
EM_API int em_msg_from_body(const void *body, size_t len, em_msg **out);

#ifdef __cplusplus
}
#endif

#endif
