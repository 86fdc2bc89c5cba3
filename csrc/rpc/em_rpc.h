/* em_rpc.h: request/reply on top of frames: handshake, request ids, error
 * replies. Internal helpers shared by the client and the server. */
#ifndef EM_RPC_H
#define EM_RPC_H

#include "../net/em_net.h"
#include "../timing/em_timing.h" /* per-call stages, clock offset, histograms */

/* Pack an error map {"type", "message", "traceback"} as the whole body. */
int em__pack_error(em_payload *p, const char *type, const char *message, const char *traceback);
/* msgpack_object str equality with a C string */
bool em__obj_streq(const msgpack_object *o, const char *s);

/* What a server's HELLO told us. body is malloc'd (the caller frees it). */
typedef struct em__hello_info {
  uint64_t send_limit; /* the server's max_message_bytes */
  uint64_t epoch;      /* changes when the server restarts; 0 = unknown */
  uint8_t *body;
  size_t body_len;
} em__hello_info;

/* Token challenge-response (docs/protocol.md "Authentication"):
 * proof = HMAC-SHA256(token, label || a || b) over the two 16-byte nonces. */
#define EM__NONCE_BYTES 16
#define EM__AUTH_SERVER "edgeml-server-v1" /* a = client nonce, b = server nonce */
#define EM__AUTH_CLIENT "edgeml-client-v1" /* a = server nonce, b = client nonce */
void em__auth_proof(const char *token, const char *label, const uint8_t *a, const uint8_t *b, uint8_t out[32]);

/* Dial host:port and handshake as `role`, expecting `service` (NULL =
 * any), proving `token` (NULL or "" = none) if the server asks. On success
 * *fd_out is the connected socket and *info is filled. On EHANDSHAKE,
 * errbuf holds the reason (the server's, or why this side refused) and
 * info->body the server's ERROR body if it sent one; on other errors info
 * is empty. Blocks up to deadline. */
int em__hello_dial(const char *host, uint16_t port, const char *service, const char *role, const char *token,
                   em__reader *r, uint64_t deadline, char *errbuf, size_t errbuf_len, int *fd_out,
                   em__hello_info *info);

/* ---- reconnect policy (backoff.c): the one schedule for every re-dial
 * (docs/protocol.md "Reconnecting"). The k-th wait after a failure is
 * uniform in [d/2, d] with d = min(EM__BACKOFF_MIN_NS * 2^k,
 * EM__BACKOFF_MAX_NS): 10-20 ms, 20-40 ms, ... up to 0.5-1 s. Used by
 *  - em__open_retry (client and subscriber open, connect_timeout > 0);
 *  - a client's re-dial at a call (client.c em__reconnect), within the
 *    call's deadline and connect_timeout;
 *  - a subscriber's re-dials (sub.c), whose state lives across em_sub_next
 *    calls and is reset by a successful handshake.
 * Only a refused connect (ECONNREFUSED: nothing listening yet) is retried
 * within one call; a retrier gives up rather than wait past its window.
 * A subscriber's re-dial handshake gets at least EM__REDIAL_HANDSHAKE_MIN_NS
 * even past a shorter em_sub_next deadline (see sub.c). */
#define EM__BACKOFF_MIN_NS 20000000ull          /* 20 ms: the first wait's upper end */
#define EM__BACKOFF_MAX_NS 1000000000ull        /* 1 s: the cap */
#define EM__REDIAL_HANDSHAKE_MIN_NS 500000000ull /* 500 ms */
typedef struct em__backoff {
  uint64_t step_ns; /* d for the next wait */
} em__backoff;
void em__backoff_init(em__backoff *b);      /* the next wait is the first one */
void em__backoff_reset(em__backoff *b);     /* after a success: the same as init */
uint64_t em__backoff_next(em__backoff *b);  /* the wait before the next attempt (ns); doubles d */

/* Call attempt(ud, deadline) until it succeeds or fails with anything but
 * ECONNREFUSED, retrying a refused connect (a server still starting) for
 * up to connect_timeout_ns with the backoff above; the deadline handed to attempt
 * (dial and handshake) is the end of that window, so a server that
 * accepts and never answers cannot hold the caller longer. With
 * connect_timeout_ns 0: one attempt of up to EM__HANDSHAKE_DEFAULT_NS.
 * Returns attempt's last result. */
#define EM__HANDSHAKE_DEFAULT_NS 10000000000ull
int em__open_retry(int (*attempt)(void *ud, uint64_t deadline), void *ud, uint64_t connect_timeout_ns);

#endif
