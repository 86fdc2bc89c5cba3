/* em_rpc.h: request/reply on top of frames: handshake, request ids, error
 * replies. Internal helpers shared by the client and the server. */
#ifndef EM_RPC_H
#define EM_RPC_H

#include "../net/em_net.h"

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

/* Dial host:port and handshake as `role`, expecting `service` (NULL =
 * any). On success *fd_out is the connected socket and *info is filled.
 * On EHANDSHAKE, errbuf holds the server's reason and info->body its
 * ERROR body; on other errors info is empty. Blocks up to deadline. */
int em__hello_dial(const char *host, uint16_t port, const char *service, const char *role, em__reader *r,
                   uint64_t deadline, char *errbuf, size_t errbuf_len, int *fd_out, em__hello_info *info);

/* Call attempt(ud, deadline) until it succeeds or fails with anything but
 * ECONNREFUSED, retrying a refused connect (a server still starting) for
 * up to connect_timeout_ns with backoff. Returns attempt's last result. */
int em__open_retry(int (*attempt)(void *ud, uint64_t deadline), void *ud, uint64_t connect_timeout_ns);

#endif
