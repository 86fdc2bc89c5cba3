/* sock.c: client-side sockets: dial with a deadline (poll), write whole
 * frames without blocking (MSG_DONTWAIT, poll when the buffer is full) and
 * read them with a blocking recv bounded by SO_RCVTIMEO, so a blocked call
 * can always time out. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "em_net.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

/* Waits are cut into slices of at most this long; the end of a slice is
 * reported as EM_EINTR so that callers check for signals (a SIGINT may be
 * delivered to another thread, leaving this poll() uninterrupted). */
#define EM__POLL_SLICE_MS 200

static int em__poll_ms(uint64_t deadline_ns) {
  if (deadline_ns == EM_FOREVER) return EM__POLL_SLICE_MS;
  uint64_t now = em_mono_ns();
  if (now >= deadline_ns) return 0;
  uint64_t ms = (deadline_ns - now + 999999) / 1000000;
  return ms > EM__POLL_SLICE_MS ? EM__POLL_SLICE_MS : (int)ms;
}

/* EM_OK when ready, EM_ETIMEDOUT at the deadline, EM_EINTR on a signal or
 * at the end of a slice (call again), EM_EIO when poll fails. */
static int em__wait_fd(int fd, short events, uint64_t deadline_ns) {
  struct pollfd pfd = {.fd = fd, .events = events};
  int ms = em__poll_ms(deadline_ns);
  if (ms == 0) return poll(&pfd, 1, 0) > 0 ? EM_OK : EM_ETIMEDOUT;
  int r = poll(&pfd, 1, ms);
  if (r > 0) return EM_OK;
  if (r < 0 && errno != EINTR) return EM_EIO;
  if (r == 0 && deadline_ns != EM_FOREVER && em_mono_ns() >= deadline_ns) return EM_ETIMEDOUT;
  return EM_EINTR;
}

int em__dial(const char *host, uint16_t port, uint64_t deadline_ns, int *fd_out) {
  struct addrinfo hints, *res = NULL;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  char ps[16];
  snprintf(ps, sizeof ps, "%u", (unsigned)port);
  if (getaddrinfo(host, ps, &hints, &res) != 0 || !res) return EM_ERESOLVE;
  int rc = EM_ECONNREFUSED;
  for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      rc = EM_EIO;
      continue;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int r = connect(fd, ai->ai_addr, ai->ai_addrlen);
    if (r < 0 && errno == EINPROGRESS) {
      do r = em__wait_fd(fd, POLLOUT, deadline_ns); while (r == EM_EINTR);
      if (r == EM_OK) {
        int err = 0;
        socklen_t el = sizeof err;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err == 0) r = 0;
        else { errno = err; r = -1; }
      } else {
        close(fd);
        rc = r;
        continue;
      }
    }
    if (r == 0) {
      /* connected: reads block (with SO_RCVTIMEO, see em__read_frame),
       * writes stay non-blocking (MSG_DONTWAIT) */
      int fl = fcntl(fd, F_GETFL);
      if (fl >= 0) fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
      freeaddrinfo(res);
      *fd_out = fd;
      return EM_OK;
    }
    rc = (errno == ECONNREFUSED) ? EM_ECONNREFUSED : (errno == ETIMEDOUT ? EM_ETIMEDOUT : EM_EIO);
    close(fd);
  }
  freeaddrinfo(res);
  return rc;
}

int em__writev_all(int fd, struct iovec *iov, int n, uint64_t deadline_ns) {
  int i = 0;
  while (i < n) {
    if (iov[i].iov_len == 0) {
      i++;
      continue;
    }
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    mh.msg_iov = iov + i;
    mh.msg_iovlen = (size_t)EM__MIN(n - i, 1024);
    ssize_t w = sendmsg(fd, &mh, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        int rc = em__wait_fd(fd, POLLOUT, deadline_ns);
        if (rc && rc != EM_EINTR) return rc;
        continue;
      }
      return (errno == EPIPE || errno == ECONNRESET) ? EM_ECONNCLOSED : EM_EIO;
    }
    size_t left = (size_t)w;
    while (i < n && left >= iov[i].iov_len) {
      left -= iov[i].iov_len;
      iov[i].iov_len = 0;
      i++;
    }
    if (left) {
      iov[i].iov_base = (char *)iov[i].iov_base + left;
      iov[i].iov_len -= left;
    }
  }
  return EM_OK;
}

/* The receive timeout a blocking recv should have now: the poll slice, or
 * what is left before the deadline (rounded up to 1 ms, so that a call
 * loop with one timeout sets it once); 0 when the deadline has passed. */
static uint32_t em__rcvtimeo_us(uint64_t deadline_ns) {
  if (deadline_ns == EM_FOREVER) return EM__POLL_SLICE_MS * 1000u;
  uint64_t now = em_mono_ns();
  if (now >= deadline_ns) return 0;
  uint64_t ms = (deadline_ns - now + 999999) / 1000000;
  return (uint32_t)(ms > EM__POLL_SLICE_MS ? EM__POLL_SLICE_MS : ms) * 1000u;
}

int em__read_frame(int fd, em__reader *r, uint64_t deadline_ns, em_msg **out, const char **why) {
  /* The socket blocks on reads: a recv sleeps until the reply is there (one
   * system call, no poll with a timer armed per call), bounded by
   * SO_RCVTIMEO, which is the poll slice or what is left of the deadline,
   * set only when it changes (r->rcvtimeo_us). At the end of a slice the
   * call returns EM_EINTR so that callers check for signals. */
  for (;;) {
    int rc = em__reader_next(r, out, why);
    if (rc != 0) return rc;
    uint8_t *p;
    size_t n;
    em__reader_region(r, &p, &n);
    uint32_t us = em__rcvtimeo_us(deadline_ns);
    int flags = 0;
    if (us == 0) {
      flags = MSG_DONTWAIT; /* the deadline has passed: only what is already there */
    } else if (us != r->rcvtimeo_us) {
      struct timeval tv = {.tv_sec = us / 1000000u, .tv_usec = us % 1000000u};
      if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) == 0) r->rcvtimeo_us = us;
    }
    ssize_t got = recv(fd, p, n, flags);
    if (got > 0) {
      em__reader_commit(r, (size_t)got);
      continue;
    }
    if (got == 0) {
      *why = "connection closed by the server";
      return EM_ECONNCLOSED;
    }
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
      if (deadline_ns != EM_FOREVER && em_mono_ns() >= deadline_ns) {
        *why = "timed out";
        return EM_ETIMEDOUT;
      }
      *why = "interrupted";
      return EM_EINTR; /* a signal or the end of a slice: the caller checks and calls again */
    }
    *why = "connection reset";
    return errno == ECONNRESET ? EM_ECONNCLOSED : EM_EIO;
  }
}
