/* opts.c: the defaults of the public options structs. */
#include "em_rpc.h"

void em_client_opts_init(em_client_opts *o) { memset(o, 0, sizeof *o); }

void em_server_opts_init(em_server_opts *o) {
  memset(o, 0, sizeof *o);
  o->host = "0.0.0.0";
  o->service = "edgeml";
}
