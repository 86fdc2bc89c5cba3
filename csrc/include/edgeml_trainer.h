/* edgeml_trainer.h: the Trainer role in C (included by edgeml.h through
 * edgeml_roles.h; include edgeml.h, not this).
 *
 * A C program is a first-class peer of edgeml.TrainerServer and
 * edgeml.TrainerClient (edgeml/trainer.py): the same service ("trainer"),
 * the same HELLO info and config check, the same "train_step", "request",
 * "data" and "cursor" messages (docs/protocol.md, "Roles" -> "Trainer")
 * and the same data-sync guarantees (docs/data-sync.md). Weights travel on
 * the broadcast port (service "trainer.broadcast"), latest value only.
 *
 * The conventions of edgeml.h hold: 0 (EM_OK) or a negative EM_* code,
 * nanosecond timeouts (EM_FOREVER: none), ownership and threads stated per
 * call. Nothing keeps a pointer to caller memory past a call unless it says
 * so. */
#ifndef EDGEML_TRAINER_H
#define EDGEML_TRAINER_H

#include "edgeml.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---------------------------------------------------------------- config
 *
 * The C spelling of edgeml.TrainerConfig. Client and server must agree on
 * payload_keys, request_types and version (the "compat" map of the HELLO;
 * lists compared sorted, as Python does); ports and rate_limit are not
 * compared. The arrays are borrowed for the open call only (copied). */

#define EM_TRAINER_NO_BROADCAST (-1)

typedef struct em_trainer_config {
  uint16_t port;          /* requests; server: 0 = any free port;
                             client: the port to dial when open's is 0 */
  int32_t broadcast_port; /* weights. EM_TRAINER_NO_BROADCAST: none (a
                             server publishes nothing; a client uses the
                             port its server announces). 0: server: any
                             free port; client: the announced one. */
  const char *const *payload_keys; /* keys a train_step payload map may
                                      hold; NULL = any (Python None). A
                                      non-NULL array with n = 0 allows none */
  size_t n_payload_keys;
  const char *const *request_types; /* the types of custom requests */
  size_t n_request_types;
  const char *version; /* compatibility tag; NULL = "0.0.1" */
  double rate_limit;   /* most calls per second of request() and update()
                          per client; 0 = none (Python None) */
} em_trainer_config;

/* Python's defaults: port 5555, broadcast_port 5556, no payload_keys
 * (any), no request types, version "0.0.1", no rate limit. Any thread. */
EM_API void em_trainer_config_init(em_trainer_config *c);

/* ---------------------------------------------------------------- server
 *
 * Callbacks run on the server's loop thread, one at a time (the thread
 * that runs em_trainer_server_run, or the one em_trainer_server_start
 * made). Values they get point into the request: valid for the call only
 * (copy what you keep, e.g. with em_put_value into a payload of your own
 * and em_frame_encode). */

typedef struct em_trainer_server em_trainer_server;

/* train_step: `payload` is the client's value (with payload_keys, a map's
 * keys were checked already). Write the reply's one value into `reply`
 * (already empty; nothing written = nil) and return EM_MSG_REPLY, or start
 * an error with em_payload_begin_error and return EM_MSG_ERROR. Any other
 * return value is sent as an ERROR "RuntimeError" naming it. */
typedef int (*em_trainer_train_step_fn)(void *ud, const em_value *payload, em_payload *reply);

/* A custom request: `type` (NUL-terminated, one of request_types) and its
 * payload. Returns as em_trainer_train_step_fn. */
typedef int (*em_trainer_request_fn)(void *ud, const char *type, const em_value *payload, em_payload *reply);

/* One new item of store `store` from client session `session` (both
 * NUL-terminated), in order: `id` is the item's id in that session's
 * store (0, 1, 2, ...), each (session, store, id) given once per server
 * run. Return 0 to take it; non-zero refuses it and the rest of its batch:
 * the client gets an ERROR ("RuntimeError") and sends them again at its
 * next update (the items before were taken and are not sent again). */
typedef int (*em_trainer_insert_fn)(void *ud, const char *store, const char *session, uint64_t id,
                                    const em_value *item);

typedef struct em_trainer_server_opts {
  em_trainer_config config;
  const char *host;                /* bind address; NULL = "0.0.0.0" */
  em_trainer_train_step_fn train_step; /* NULL: train_step is answered
                                          edgeml.InvalidArgumentError */
  void *train_step_ud;
  em_trainer_request_fn request;   /* NULL: likewise for request */
  void *request_ud;
  const char *token;               /* as em_server_opts.token (both ports) */
  uint64_t max_message_bytes;      /* 0 = 1 GiB (both ports) */
  uint64_t handshake_timeout_ns;   /* as em_server_opts; 0 = defaults */
  uint64_t progress_timeout_ns;
  uint64_t max_pending_bytes;
  em_log_fn log;                   /* NULL = stderr */
  void *log_ud;
} em_trainer_server_opts;

/* Defaults: em_trainer_config_init's config, everything else 0/NULL. */
EM_API void em_trainer_server_opts_init(em_trainer_server_opts *o);

/* Bind the request port (and the broadcast port unless the config has
 * none) and make a new server instance (its id is sent in the HELLO and
 * every data reply). Serves nothing until run/start. On success *out is
 * owned by the caller (em_trainer_server_close); on failure *out is NULL.
 * Any thread. Errors: EINVAL (a NULL name in the config's lists,
 * duplicates, rate_limit < 0), EADDRINUSE, ENOMEM, EIO. */
EM_API int em_trainer_server_open(em_trainer_server **out, const em_trainer_server_opts *opts);

/* Register a data store: items clients send under `name` go to
 * insert(ud, ...). `name` is copied. A name registered again replaces the
 * callback. Any thread, also while the server runs. EINVAL (NULL/empty
 * name, NULL insert), ENOMEM. */
EM_API int em_trainer_server_add_store(em_trainer_server *s, const char *name, em_trainer_insert_fn insert,
                                       void *ud);

/* Serve on the calling thread until em_trainer_server_stop; the broadcast
 * port is served by a thread of the server's meanwhile. Returns EM_OK
 * when stopped (both ports are then closed). At most one of run/start,
 * once. EINVAL when already run. */
EM_API int em_trainer_server_run(em_trainer_server *s);

/* Serve on a thread of the server's; returns at once. EINVAL when already
 * run, ENOMEM/EIO when the thread cannot start. */
EM_API int em_trainer_server_start(em_trainer_server *s);

/* Ask both ports to stop (callbacks in progress finish; replies computed
 * are sent). Any thread (also a callback), any number of times; returns at
 * once. */
EM_API void em_trainer_server_stop(em_trainer_server *s);

/* Wait up to timeout_ns until run has returned, or start's thread ended.
 * EM_OK or ETIMEDOUT. Any thread but the loop's. */
EM_API int em_trainer_server_wait(em_trainer_server *s, uint64_t timeout_ns);

/* Stop, wait for the threads, free everything. No other call on s may be
 * running or start; not from a callback. NULL is fine. */
EM_API void em_trainer_server_close(em_trainer_server *s);

/* The bound ports (the real ones with port 0); broadcast 0 when none.
 * Any thread. */
EM_API uint16_t em_trainer_server_port(const em_trainer_server *s);
EM_API uint16_t em_trainer_server_broadcast_port(const em_trainer_server *s);

/* This run's instance id (32 hex digits, NUL-terminated, owned by s, valid
 * until close). Any thread. */
EM_API const char *em_trainer_server_instance(const em_trainer_server *s);

/* Broadcast `weights` (the payload's one value, e.g. a map of arrays) to
 * every subscribed client: latest value only, a late subscriber gets it at
 * once. The frame is copied: p and its arrays are the caller's again when
 * this returns. Works before run (sent once the server runs).
 * *version_out (may be NULL) gets its version (1, 2, ...). Any thread.
 * Errors: EINVAL (the config has no broadcast port), EENCODE (p is not one
 * complete value), ETOOBIG, ENOMEM, ECLOSED (stopped). */
EM_API int em_trainer_server_publish_weights(em_trainer_server *s, em_payload *weights, uint64_t *version_out);

typedef struct em_trainer_server_stats {
  uint64_t items_received;     /* items handed to insert callbacks */
  uint64_t duplicates_dropped; /* items at or below a session's cursor */
  uint64_t items_missed;       /* ids clients' stores dropped before sending */
  uint64_t restarted_replies;  /* "restarted" answers (sessions of an
                                  earlier instance) */
  uint64_t sessions;           /* cursors held (at most 65536; least
                                  recently used dropped) */
} em_trainer_server_stats;

/* Counters. Any thread (approximate while running). */
EM_API void em_trainer_server_get_stats(em_trainer_server *s, em_trainer_server_stats *st);

/* The server's cursor of (session, store): the last id stored, -1 when
 * none. Any thread. */
EM_API int64_t em_trainer_server_cursor(em_trainer_server *s, const char *session, const char *store);

/* ---------------------------------------------------------------- client */

typedef struct em_trainer_client em_trainer_client;

/* A weights broadcast: `weights` is the PUBLISH message (em_msg_value gives
 * the value), borrowed for the call (retain weights->buf to keep arrays);
 * `version` counts the values this client received, 1, 2, ..., increasing
 * across server restarts. Runs on the client's subscription thread, one
 * value at a time; a slow callback skips to the newest value. */
typedef void (*em_trainer_weights_fn)(void *ud, const em_msg *weights, uint64_t version);

typedef struct em_trainer_client_opts {
  em_trainer_config config;
  uint64_t connect_timeout_ns; /* keep retrying a refused connect at open
                                  (and the subscription's); 0 = one try */
  const char *token;           /* as em_client_opts.token */
  uint64_t max_message_bytes;  /* 0 = 1 GiB */
  char *errbuf;                /* open writes why it failed here (e.g.
                                  each differing config field) */
  size_t errbuf_len;
  int (*check_interrupt)(void *ud); /* as em_client_opts */
  void *interrupt_ud;
  em_log_fn log;               /* warnings (dropped items, resends, a lost
                                  weights connection); NULL = stderr */
  void *log_ud;
} em_trainer_client_opts;

/* Defaults: em_trainer_config_init's config, connect_timeout 5 s, the rest
 * 0/NULL. */
EM_API void em_trainer_client_opts_init(em_trainer_client_opts *o);

/* Connect to host:port (port 0: config.port), handshake as a "trainer"
 * client and compare the server's compat map with the config's. On
 * success *out is owned by the caller (em_trainer_client_close); on
 * failure *out is NULL. Blocks. Any thread. Errors: as em_client_open;
 * EHANDSHAKE also when the server's config differs (errbuf then names each
 * field: "payload_keys: client ['a'], server None; version: ...") or the
 * server is no trainer; EINVAL (a bad config). */
EM_API int em_trainer_client_open(em_trainer_client **out, const char *host, uint16_t port,
                                  const em_trainer_client_opts *opts);

/* A new local store `name` holding the newest `capacity` items (a
 * QueuedDataStore): update() sends it as the server's store `name`.
 * Any thread. EINVAL (NULL/empty name, capacity 0, name exists), ENOMEM. */
EM_API int em_trainer_add_store(em_trainer_client *c, const char *name, size_t capacity);

/* Append the payload's one value to store `store` as its next item (ids 0,
 * 1, 2, ...). The item is copied, arrays included: `item` and what it
 * borrows are the caller's again when this returns (reuse it). When the
 * store is full its oldest item is dropped (counted; see stats). Any
 * thread (a mutex guards each store). *id_out (may be NULL) gets the id.
 * Errors: EINVAL (no such store), EENCODE (not one complete value),
 * ENOMEM. */
EM_API int em_trainer_insert(em_trainer_client *c, const char *store, em_payload *item, uint64_t *id_out);

/* Send every store's items the server has not acknowledged, as "data"
 * messages of up to 4096 items / about 32 MiB, each acknowledged before
 * the next. A server that restarted without the acknowledged data (it
 * answers "restarted") gets everything the store still holds again, from
 * its oldest item. Items dropped by the local store before they were sent
 * are counted and logged. EM_OK: the server has every item that was in
 * the stores when the call began. On an error nothing is lost: the next
 * update sends the rest again (the server drops what it has). Waits for
 * rate_limit (at most the timeout). One update at a time (callers are
 * serialised); any thread. timeout_ns is per message. Errors: as
 * em_client_request; EREMOTE (the server refused: e.g.
 * edgeml.UnknownDataStoreError; the reason is logged and kept for
 * em_trainer_last_error), EPROTO (a reply that acknowledges nothing). */
EM_API int em_trainer_update(em_trainer_client *c, uint64_t timeout_ns);

/* Call the server's train_step with the payload's one value (NULL: nil),
 * or its custom request `type` (NUL-terminated) with it, and wait up to
 * timeout_ns for the reply. On EM_OK *reply is the REPLY (its value:
 * em_msg_value; the new weights for train_step) owned by the caller
 * (em_msg_free); on EM_EREMOTE it is the ERROR, owned likewise (em_msg_error
 * gives "type: message", e.g. "edgeml.UnknownRequestTypeError: ..."); else
 * *reply is NULL. The server checks payload_keys and request_types (its
 * config equals ours after the handshake). `payload` stays the caller's
 * (its bytes are copied, its arrays read until the call returns).
 * em_trainer_request first waits for rate_limit (at most the timeout).
 * Any thread, several at once. Errors: as em_client_request; EENCODE
 * (payload is not one complete value), EINVAL (NULL type). */
EM_API int em_trainer_train_step(em_trainer_client *c, em_payload *payload, uint64_t timeout_ns, em_msg **reply);
EM_API int em_trainer_request(em_trainer_client *c, const char *type, em_payload *payload, uint64_t timeout_ns,
                              em_msg **reply);

/* The server's cursor for this client's store `name` (-1: none yet) into
 * *cursor. Any thread. Errors: as em_client_request, EREMOTE
 * (edgeml.UnknownDataStoreError). */
EM_API int em_trainer_server_last_id(em_trainer_client *c, const char *name, uint64_t timeout_ns, int64_t *cursor);

/* Receive the weights broadcasts: connects to the broadcast port (the
 * config's, else the one the server announced) and starts a thread of the
 * client's that calls cb(ud, weights, version) for each value (the
 * current one at once, if any). A lost connection is re-dialled (logged).
 * Once per client; the thread stops at close. Any thread.
 * Errors: EINVAL (called before, or no broadcast port), as em_sub_open. */
EM_API int em_trainer_recv_weights(em_trainer_client *c, em_trainer_weights_fn cb, void *ud);

typedef struct em_trainer_client_stats {
  uint64_t items_inserted;        /* all stores */
  uint64_t items_sent;            /* stored by the server ("stored") */
  uint64_t items_dropped_locally; /* dropped by a full store before sent */
  uint64_t resends_after_restart; /* "restarted" replies followed */
  uint64_t weights_received;      /* the version of the newest weights */
} em_trainer_client_stats;

/* Counters. Any thread. */
EM_API void em_trainer_client_get_stats(em_trainer_client *c, em_trainer_client_stats *st);

/* This client's session id (32 hex digits; owned by c, valid until close).
 * Any thread. */
EM_API const char *em_trainer_session(const em_trainer_client *c);

/* The reason of the last EREMOTE/EPROTO of update or server_last_id on
 * this client ("type: message"), copied into buf (cut to cap). Any
 * thread. */
EM_API void em_trainer_last_error(em_trainer_client *c, char *buf, size_t cap);

/* Stop the weights thread, close the connections, free the stores. No
 * other call on c may be running or start; not from the weights callback.
 * NULL is fine. */
EM_API void em_trainer_client_close(em_trainer_client *c);

#ifdef __cplusplus
}
#endif

#endif /* EDGEML_TRAINER_H */
