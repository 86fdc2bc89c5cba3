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

static void print_value(const em_value *v, int indent) {
  em_array a;
  em_iter it;
  em_value k, e;
  switch (v->type) {
    case EM_T_NDARRAY:
      if (em_value_ndarray(v, &a) != EM_OK) {
        printf("<malformed array>\n");
        return;
      }
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
    case EM_T_MAP:
      printf("{\n");
      em_iter_init(&it, v);
      while (em_iter_next(&it, &k) && em_iter_next(&it, &e)) {
        printf("%*s", indent + 2, "");
        if (k.type == EM_T_STR) printf("\"%.*s\": ", (int)k.len, k.as.str);
        else printf("<%s key>: ", em_type_name(k.type));
        print_value(&e, indent + 2);
      }
      printf("%*s}\n", indent, "");
      return;
    case EM_T_LIST:
    case EM_T_TUPLE:
    case EM_T_SET:
      printf("%s of %u: [\n", em_type_name(v->type), v->len);
      em_iter_init(&it, v);
      while (em_iter_next(&it, &e)) {
        printf("%*s", indent + 2, "");
        print_value(&e, indent + 2);
      }
      printf("%*s]\n", indent, "");
      return;
    case EM_T_STR: printf("\"%.*s\"\n", (int)v->len, v->as.str); return;
    case EM_T_INT: printf("%lld\n", (long long)v->as.i); return;
    case EM_T_UINT: printf("%llu\n", (unsigned long long)v->as.u); return;
    case EM_T_FLOAT: printf("%g\n", v->as.f); return;
    case EM_T_BOOL: printf("%s\n", v->as.b ? "true" : "false"); return;
    case EM_T_NIL: printf("nil\n"); return;
    default: printf("<%s, %u bytes>\n", em_type_name(v->type), v->len); return;
  }
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s HOST PORT [INTERFACE]\n", argv[0]);
    return 1;
  }
  const char *iface = argc > 3 ? argv[3] : "echo";
  em_client_opts opts;
  em_client_opts_init(&opts);
  opts.connect_timeout_ns = 5000000000ull;
  opts.service = "inference";
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
  em_payload *p = em_payload_new();
  if (!p) {
    fprintf(stderr, "out of memory\n");
    return 1;
  }
  em_payload_begin_request(p, iface, strlen(iface));
  em_put_map(p, 2);
  em_put_cstr(p, "x");
  em_put_ndarray(p, "<f4", 2, shape, x, sizeof x);
  em_put_cstr(p, "note");
  em_put_cstr(p, "from C");
  /* a writer error sticks: the call below returns EM_EENCODE if any put failed */

  em_msg *reply = NULL;
  rc = em_client_request(c, EM_MSG_REQUEST, p, 5000000000ull, &reply);
  em_payload_free(p);
  int status = 0;
  if (rc == EM_OK || rc == EM_EREMOTE) {
    em_value v;
    if (em_msg_value(reply, &v) == EM_OK) {
      printf(rc == EM_OK ? "reply: " : "remote error: ");
      print_value(&v, 0);
    } else {
      fprintf(stderr, "undecodable reply\n");
      status = 1;
    }
    if (rc == EM_EREMOTE) status = 2;
  } else {
    fprintf(stderr, "call failed: %s (%s)\n", em_strerror(rc), em_errname(rc));
    status = 1;
  }
  em_msg_free(reply);
  em_client_close(c);
  return status;
}
