/* em_rpc.h: request/reply on top of frames: handshake, request ids, error
 * replies. Internal helpers shared by the client and the server. */
#ifndef EM_RPC_H
#define EM_RPC_H

#include "../net/em_net.h"

/* Pack an error map {"type", "message", "traceback"} as the whole body. */
int em__pack_error(em_payload *p, const char *type, const char *message, const char *traceback);
/* msgpack_object str equality with a C string */
bool em__obj_streq(const msgpack_object *o, const char *s);

#endif
