/* hello.c: the client half of the handshake, shared by clients and
 * subscribers: dial, send HELLO, read and check the server's HELLO. */
#include "em_rpc.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int em__hello_dial(const char *host, uint16_t port, const char *service, const char *role, em__reader *r,
                   uint64_t deadline, char *errbuf, size_t errbuf_len, int *fd_out, em__hello_info *info) {
  *fd_out = -1;
  memset(info, 0, sizeof *info);
  em__reader_reset(r);
  int fd = -1;
  int rc = em__dial(host, port, deadline, &fd);
  if (rc) return rc;
  em_payload p;
  if (em_payload_init(&p)) {
    close(fd);
    return EM_ENOMEM;
  }
  msgpack_pack_map(&p.pk, service ? 3 : 2);
  msgpack_pack_str_with_body(&p.pk, "proto", 5);
  msgpack_pack_uint32(&p.pk, EM_PROTOCOL_VERSION);
  msgpack_pack_str_with_body(&p.pk, "role", 4);
  msgpack_pack_str_with_body(&p.pk, role, strlen(role));
  if (service) {
    msgpack_pack_str_with_body(&p.pk, "service", 7);
    msgpack_pack_str_with_body(&p.pk, service, strlen(service));
  }
  struct iovec iov[1];
  uint64_t flen;
  uint64_t ts[4] = {em_now_ns(), 0, 0, 0};
  int n = em__payload_frame(&p, EM_MSG_HELLO, 0, 0, ts, iov, &flen);
  rc = n < 0 ? n : em__writev_all(fd, iov, n, deadline);
  em_payload_destroy(&p);
  em_msg *m = NULL;
  const char *why;
  if (!rc) {
    do rc = em__read_frame(fd, r, deadline, &m, &why);
    while (rc == EM_EINTR);
    if (rc == 1) rc = EM_OK;
  }
  if (!rc) {
    msgpack_zone zone;
    msgpack_zone_init(&zone, 512);
    msgpack_object o;
    if (m->type == EM_MSG_ERROR) {
      rc = EM_EHANDSHAKE;
      if (em_msg_unpack(m, &zone, &o) == EM_OK) {
        const msgpack_object *msg = em_obj_get(&o, "message");
        if (msg && msg->type == MSGPACK_OBJECT_STR && errbuf && errbuf_len)
          snprintf(errbuf, errbuf_len, "%.*s", (int)msg->via.str.size, msg->via.str.ptr);
      }
    } else if (m->type != EM_MSG_HELLO || em_msg_unpack(m, &zone, &o) || o.type != MSGPACK_OBJECT_MAP) {
      rc = EM_EPROTO;
    } else {
      const msgpack_object *lim = em_obj_get(&o, "max_message_bytes");
      info->send_limit = (lim && lim->type == MSGPACK_OBJECT_POSITIVE_INTEGER) ? lim->via.u64 : EM__DEFAULT_MAX_MESSAGE;
      const msgpack_object *ep = em_obj_get(&o, "epoch");
      info->epoch = (ep && ep->type == MSGPACK_OBJECT_POSITIVE_INTEGER) ? ep->via.u64 : 0;
    }
    msgpack_zone_destroy(&zone);
    if (rc == EM_EHANDSHAKE || !rc) {
      info->body = malloc(m->body_len ? m->body_len : 1);
      if (info->body) memcpy(info->body, m->body, m->body_len);
      info->body_len = info->body ? m->body_len : 0;
    }
  }
  em_msg_free(m);
  if (rc) {
    close(fd);
    em__reader_reset(r);
    if (rc != EM_EHANDSHAKE) {
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
  uint64_t deadline = em_mono_ns() + connect_timeout_ns;
  uint64_t backoff = 20000000ull; /* 20 ms, doubling to 500 ms */
  for (;;) {
    /* each attempt may take up to 10 s or the whole window */
    int rc = attempt(ud, em_mono_ns() + EM__MAX(10000000000ull, connect_timeout_ns));
    if (rc != EM_ECONNREFUSED || em_mono_ns() + backoff > deadline) return rc;
    struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)backoff};
    nanosleep(&ts, NULL);
    backoff = EM__MIN(backoff * 2, 500000000ull);
  }
}
