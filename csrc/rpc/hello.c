/* hello.c: the client half of the handshake, shared by clients and
 * subscribers: dial, send HELLO, read and check the server's HELLO. */
#include "em_rpc.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

void em__auth_proof(const char *token, const char *label, const uint8_t *a, const uint8_t *b, uint8_t out[32]) {
  uint8_t msg[16 + 2 * EM__NONCE_BYTES];
  size_t ll = strlen(label);
  memcpy(msg, label, ll);
  memcpy(msg + ll, a, EM__NONCE_BYTES);
  memcpy(msg + ll + EM__NONCE_BYTES, b, EM__NONCE_BYTES);
  em_hmac_sha256(token, strlen(token), msg, ll + 2 * EM__NONCE_BYTES, NULL, 0, NULL, 0, out);
}

static void em__errf(char *errbuf, size_t len, const char *fmt, const char *a) {
  if (errbuf && len) snprintf(errbuf, len, fmt, a);
}

/* Read one frame of the handshake. */
static int em__hello_read(int fd, em__reader *r, uint64_t deadline, em_msg **m) {
  const char *why;
  int rc;
  do rc = em__read_frame(fd, r, deadline, m, &why);
  while (rc == EM_EINTR);
  return rc == 1 ? EM_OK : rc;
}

/* EHANDSHAKE with the ERROR's message in errbuf (and its body kept). */
static int em__hello_error(em_msg *m, char *errbuf, size_t errbuf_len, em__hello_info *info) {
  msgpack_zone zone;
  msgpack_zone_init(&zone, 512);
  msgpack_object o;
  if (em_msg_unpack(m, &zone, &o) == EM_OK) {
    const msgpack_object *msg = em_obj_get(&o, "message");
    if (msg && msg->type == MSGPACK_OBJECT_STR && errbuf && errbuf_len)
      snprintf(errbuf, errbuf_len, "%.*s", (int)msg->via.str.size, msg->via.str.ptr);
  }
  msgpack_zone_destroy(&zone);
  free(info->body);
  info->body = malloc(m->body_len ? m->body_len : 1);
  if (info->body) memcpy(info->body, m->body, m->body_len);
  info->body_len = info->body ? m->body_len : 0;
  return EM_EHANDSHAKE;
}

static int em__send_small(int fd, uint8_t type, em_payload *p, uint64_t deadline) {
  struct iovec iov[1];
  uint64_t flen;
  uint64_t ts[4] = {em_now_ns(), 0, 0, 0};
  int n = em__payload_frame(p, type, 0, 0, ts, iov, &flen);
  return n < 0 ? n : em__writev_all(fd, iov, n, deadline);
}

int em__hello_dial(const char *host, uint16_t port, const char *service, const char *role, const char *token,
                   em__reader *r, uint64_t deadline, char *errbuf, size_t errbuf_len, int *fd_out,
                   em__hello_info *info) {
  *fd_out = -1;
  memset(info, 0, sizeof *info);
  em__reader_reset(r);
  if (token && !token[0]) token = NULL;
  uint8_t nonces[2 * EM__NONCE_BYTES]; /* client nonce, server nonce */
  if (em_random_bytes(nonces, EM__NONCE_BYTES)) return EM_EIO;
  int fd = -1;
  int rc = em__dial(host, port, deadline, &fd);
  if (rc) return rc;
  em_payload p;
  if (em_payload_init(&p)) {
    close(fd);
    return EM_ENOMEM;
  }
  msgpack_pack_map(&p.pk, service ? 4 : 3);
  msgpack_pack_str_with_body(&p.pk, "proto", 5);
  msgpack_pack_uint32(&p.pk, EM_PROTOCOL_VERSION);
  msgpack_pack_str_with_body(&p.pk, "role", 4);
  msgpack_pack_str_with_body(&p.pk, role, strlen(role));
  msgpack_pack_str_with_body(&p.pk, "nonce", 5);
  msgpack_pack_bin_with_body(&p.pk, nonces, EM__NONCE_BYTES);
  if (service) {
    msgpack_pack_str_with_body(&p.pk, "service", 7);
    msgpack_pack_str_with_body(&p.pk, service, strlen(service));
  }
  rc = em__send_small(fd, EM_MSG_HELLO, &p, deadline);
  em_msg *m = NULL;
  if (!rc) rc = em__hello_read(fd, r, deadline, &m);
  bool auth = false;
  if (!rc) {
    msgpack_zone zone;
    msgpack_zone_init(&zone, 512);
    msgpack_object o;
    if (m->type == EM_MSG_ERROR) {
      rc = em__hello_error(m, errbuf, errbuf_len, info);
    } else if (m->type != EM_MSG_HELLO || em_msg_unpack(m, &zone, &o) || o.type != MSGPACK_OBJECT_MAP) {
      rc = EM_EPROTO;
    } else {
      const msgpack_object *lim = em_obj_get(&o, "max_message_bytes");
      info->send_limit = (lim && lim->type == MSGPACK_OBJECT_POSITIVE_INTEGER) ? lim->via.u64 : EM__DEFAULT_MAX_MESSAGE;
      const msgpack_object *ep = em_obj_get(&o, "epoch");
      info->epoch = (ep && ep->type == MSGPACK_OBJECT_POSITIVE_INTEGER) ? ep->via.u64 : 0;
      const msgpack_object *a = em_obj_get(&o, "auth");
      const msgpack_object *sn = a ? em_obj_get(a, "nonce") : NULL;
      if (a && !token) {
        rc = EM_EHANDSHAKE;
        em__errf(errbuf, errbuf_len, "%s requires a token: pass token=... or set EDGEML_TOKEN", "the server");
      } else if (!a && token) {
        rc = EM_EHANDSHAKE;
        em__errf(errbuf, errbuf_len,
                 "this client has a token but %s asks for none, so it cannot prove it knows it; refusing "
                 "(give the server the same token, or this client token='')", "the server");
      } else if (a) {
        if (sn && sn->type == MSGPACK_OBJECT_BIN && sn->via.bin.size == EM__NONCE_BYTES) {
          memcpy(nonces + EM__NONCE_BYTES, sn->via.bin.ptr, EM__NONCE_BYTES);
          auth = true;
        } else {
          rc = EM_EPROTO;
        }
      }
      if (!rc) {
        info->body = malloc(m->body_len ? m->body_len : 1);
        if (info->body) memcpy(info->body, m->body, m->body_len);
        info->body_len = info->body ? m->body_len : 0;
      }
    }
    msgpack_zone_destroy(&zone);
  }
  em_msg_free(m);
  m = NULL;
  if (!rc && auth) { /* prove we know the token, then check the server's proof */
    uint8_t proof[32];
    em__auth_proof(token, EM__AUTH_CLIENT, nonces + EM__NONCE_BYTES, nonces, proof);
    em_payload_reset(&p);
    msgpack_pack_map(&p.pk, 1);
    msgpack_pack_str_with_body(&p.pk, "proof", 5);
    msgpack_pack_bin_with_body(&p.pk, proof, sizeof proof);
    rc = em__send_small(fd, EM_MSG_AUTH, &p, deadline);
    if (!rc) rc = em__hello_read(fd, r, deadline, &m);
    if (!rc && m->type == EM_MSG_ERROR) {
      rc = em__hello_error(m, errbuf, errbuf_len, info); /* its body replaces the HELLO's */
    } else if (!rc && m->type != EM_MSG_OK) {
      rc = EM_EPROTO;
    } else if (!rc) {
      msgpack_zone zone;
      msgpack_zone_init(&zone, 256);
      msgpack_object o;
      const msgpack_object *sp = NULL;
      if (em_msg_unpack(m, &zone, &o) == EM_OK && o.type == MSGPACK_OBJECT_MAP) sp = em_obj_get(&o, "proof");
      uint8_t want[32];
      em__auth_proof(token, EM__AUTH_SERVER, nonces, nonces + EM__NONCE_BYTES, want);
      if (!sp || sp->type != MSGPACK_OBJECT_BIN || sp->via.bin.size != 32 || !em_ct_equal(want, sp->via.bin.ptr, 32)) {
        rc = EM_EHANDSHAKE;
        em__errf(errbuf, errbuf_len, "authentication failed: %s did not prove it knows the token (an impostor?)",
                 "the server");
      }
      msgpack_zone_destroy(&zone);
    }
    em_msg_free(m);
  }
  em_payload_destroy(&p);
  if (rc) {
    close(fd);
    em__reader_reset(r);
    if (rc != EM_EHANDSHAKE || !info->body) {
      free(info->body);
      info->body = NULL;
      info->body_len = 0;
    }
    return rc;
  }
  *fd_out = fd;
  return EM_OK;
}

int em__open_retry(int (*attempt)(void *ud, uint64_t deadline), void *ud, uint64_t connect_timeout_ns) {
  /* connect_timeout bounds everything: the dial, the handshake's waits and
   * the retries (0 = one attempt of up to EM__HANDSHAKE_DEFAULT_NS) */
  uint64_t retry_until = em__deadline(connect_timeout_ns);
  uint64_t deadline = em__deadline(connect_timeout_ns ? connect_timeout_ns : EM__HANDSHAKE_DEFAULT_NS);
  em__backoff b; /* the reconnect policy (em_rpc.h) */
  em__backoff_init(&b);
  for (;;) {
    int rc = attempt(ud, deadline);
    if (rc != EM_ECONNREFUSED) return rc;
    uint64_t wait = em__backoff_next(&b);
    if (em_mono_ns() + wait > retry_until) return rc; /* never wait past the window */
    struct timespec ts = {.tv_sec = (time_t)(wait / 1000000000ull), .tv_nsec = (long)(wait % 1000000000ull)};
    nanosleep(&ts, NULL);
  }
}
