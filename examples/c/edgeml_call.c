/* edgeml_call.c: a C program calling a Python edgeml.InferenceServer through
 * the public header alone.
 *
 *   edgeml_call HOST PORT [INTERFACE]
 *
 * Sends {"x": float32[2][3] = 0..5, "note": "from C"} to INTERFACE (default
 * "echo") and prints what came back: every key, and for arrays their dtype,
 * shape and values. Exit status 0 on success, 2 on a remote error, 1 else. */
#include <edgeml.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void print_obj(const em_msg *m, const msgpack_object *o, int indent) {
  em_array a;
  if (em_obj_array(m, o, &a) == EM_OK) {
    printf("array dtype=%s shape=(", a.dtype);
    for (uint32_t i = 0; i < a.ndim; i++) printf("%llu%s", (unsigned long long)a.shape[i], i + 1 < a.ndim ? "," : "");
    printf(")");
    if (strcmp(a.dtype, "<f4") == 0) {
      const float *f = a.data;
      printf(" values=");
      for (size_t i = 0; i < a.len_bytes / 4 && i < 16; i++) printf("%s%g", i ? "," : "", f[i]);
    }
    printf("\n");
    return;
  }
  if (o->type == MSGPACK_OBJECT_MAP) {
    printf("{\n");
    for (uint32_t i = 0; i < o->via.map.size; i++) {
      printf("%*s", indent + 2, "");
      msgpack_object_print(stdout, o->via.map.ptr[i].key);
      printf(": ");
      print_obj(m, &o->via.map.ptr[i].val, indent + 2);
    }
    printf("%*s}\n", indent, "");
    return;
  }
  msgpack_object_print(stdout, *o);
  printf("\n");
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s HOST PORT [INTERFACE]\n", argv[0]);
    return 1;
  }
  const char *iface = argc > 3 ? argv[3] : "echo";
  em_client_opts opts = {.connect_timeout_ns = 5000000000ull, .service = "inference"};
  em_client *c;
  int rc = em_client_open(&c, argv[1], (uint16_t)atoi(argv[2]), &opts);
  if (rc) {
    fprintf(stderr, "cannot connect to %s:%s: %s\n", argv[1], argv[2], em_strerror(rc));
    return 1;
  }
  /* payload: {"x": float32 2x3, "note": "from C"}; the array is a blob
   * that stays ours (borrowed until em_client_request returns) */
  float x[6] = {0, 1, 2, 3, 4, 5};
  uint64_t shape[2] = {2, 3};
  em_payload p;
  em_payload_init(&p);
  em_payload_begin_request(&p, iface, strlen(iface));
  msgpack_pack_map(&p.pk, 2);
  msgpack_pack_str_with_body(&p.pk, "x", 1);
  em_payload_pack_array(&p, "<f4", 2, shape, x, sizeof x, 0);
  msgpack_pack_str_with_body(&p.pk, "note", 4);
  msgpack_pack_str_with_body(&p.pk, "from C", 6);

  em_msg *reply = NULL;
  rc = em_client_request(c, EM_MSG_REQUEST, &p, 5000000000ull, &reply);
  em_payload_destroy(&p);
  int status = 0;
  if (rc == EM_OK || rc == EM_EREMOTE) {
    msgpack_zone zone;
    msgpack_zone_init(&zone, 1024);
    msgpack_object o;
    if (em_msg_unpack(reply, &zone, &o) == EM_OK) {
      printf(rc == EM_OK ? "reply: " : "remote error: ");
      print_obj(reply, &o, 0);
    } else {
      fprintf(stderr, "undecodable reply\n");
      status = 1;
    }
    msgpack_zone_destroy(&zone);
    if (rc == EM_EREMOTE) status = 2;
  } else {
    fprintf(stderr, "call failed: %s (%s)\n", em_strerror(rc), em_errname(rc));
    status = 1;
  }
  em_msg_free(reply);
  em_client_close(c);
  return status;
}
