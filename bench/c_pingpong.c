/* c_pingpong.c: the floor for bench/pingpong and bench/suite -- plain C TCP
 * over loopback, no library.
 *
 * Blocking sockets (except where noted), TCP_NODELAY, messages framed as an
 * 8-byte little-endian length followed by the payload, one writev (header +
 * payload) per message.
 *
 *   c_pingpong server [echo|ack]        binds 127.0.0.1:0, prints "READY <port>"
 *                                       on stdout, serves one connection: reads
 *                                       each message whole and echoes it back
 *                                       (echo, the default) or answers with an
 *                                       8-byte message (ack: a one-way transfer
 *                                       with an acknowledgement).
 *   c_pingpong client PORT SIZE ITERS WARMUP [echo|ack] [samples]
 *                                       WARMUP + ITERS round trips of SIZE
 *                                       bytes, prints one JSON line with
 *                                       p50/p99/mean/min/max in microseconds and
 *                                       the client's CPU time (user+sys,
 *                                       getrusage) per timed round trip; with
 *                                       "samples" also every timed round trip
 *                                       ("samples_ns", in order).
 *   c_pingpong mserver                  like server (echo), but any number of
 *                                       connections, served by one thread with
 *                                       epoll and non-blocking sockets (the
 *                                       shape of an event-loop server); exits
 *                                       when its stdin closes.
 *   c_pingpong rate PORT SIZE           one connection; prints "READY" after a
 *                                       few warmup round trips, then for each
 *                                       "GO <start_ns> <dur_ns>" line on stdin
 *                                       (CLOCK_MONOTONIC): round trips back to
 *                                       back until start+dur, then prints JSON
 *                                       {"calls": round trips completed inside
 *                                       [start, start+dur], "cpu_s": ...};
 *                                       exits when stdin closes.
 *   c_pingpong bpub N                   broadcast publisher: prints "READY
 *                                       <port>", accepts N subscribers, then
 *                                       for each "pub SIZE SEQ" line on stdin
 *                                       sends one SIZE-byte message (SEQ in its
 *                                       first 8 bytes) to every subscriber with
 *                                       non-blocking writes interleaved by
 *                                       poll(), and prints {"t0": ns, "t1": ns}
 *                                       (before the first byte, after the last).
 *   c_pingpong bsub PORT                broadcast subscriber: prints "READY",
 *                                       then {"seq": SEQ, "t": ns} when each
 *                                       message has arrived whole; exits when
 *                                       its stdin or the connection closes.
 *
 * Percentiles are nearest-rank (sorted[ceil(p/100 * n) - 1]), the same
 * definition the Python benches use. Times are CLOCK_MONOTONIC, which is
 * system-wide, so they compare with Python's time.monotonic_ns().
 *
 * Build: cc -O2 -o bench/out/c_pingpong bench/c_pingpong.c -lm
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) {
  fprintf(stderr, "c_pingpong: %s: %s\n", what, strerror(errno));
  exit(1);
}

static uint64_t mono_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static double cpu_s(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double)ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + (double)ru.ru_stime.tv_sec +
         ru.ru_stime.tv_usec / 1e6;
}

/* Read exactly n bytes; 0 on success, 1 on clean EOF before any byte. */
static int read_full(int fd, void *p, size_t n) {
  uint8_t *b = p;
  size_t got = 0;
  while (got < n) {
    ssize_t r = read(fd, b + got, n - got);
    if (r > 0) {
      got += (size_t)r;
    } else if (r == 0) {
      if (got == 0) return 1;
      errno = ECONNRESET;
      die("read (EOF mid-message)");
    } else if (errno != EINTR) {
      die("read");
    }
  }
  return 0;
}

static void put_len(uint8_t hdr[8], uint64_t len) {
  for (int i = 0; i < 8; i++) hdr[i] = (uint8_t)(len >> (8 * i));
}

static uint64_t get_len(const uint8_t hdr[8]) {
  uint64_t len = 0;
  for (int i = 0; i < 8; i++) len |= (uint64_t)hdr[i] << (8 * i);
  return len;
}

/* Write header + payload with writev, finishing partial writes. */
static void write_msg(int fd, const void *payload, uint64_t len) {
  uint8_t hdr[8];
  put_len(hdr, len);
  struct iovec iov[2] = {{hdr, 8}, {(void *)payload, (size_t)len}};
  int iovcnt = len ? 2 : 1;
  struct iovec *v = iov;
  while (iovcnt > 0) {
    ssize_t w = writev(fd, v, iovcnt);
    if (w < 0) {
      if (errno == EINTR) continue;
      die("writev");
    }
    size_t left = (size_t)w;
    while (iovcnt > 0 && left >= v->iov_len) {
      left -= v->iov_len;
      v++;
      iovcnt--;
    }
    if (iovcnt > 0) {
      v->iov_base = (uint8_t *)v->iov_base + left;
      v->iov_len -= left;
    }
  }
}

static void set_nodelay(int fd) {
  int one = 1;
  if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) die("TCP_NODELAY");
}

static void set_nonblock(int fd) {
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0 || fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) die("O_NONBLOCK");
}

/* Listen on 127.0.0.1:0 and print "READY <port>". */
static int listen_ready(int backlog) {
  int ls = socket(AF_INET, SOCK_STREAM, 0);
  if (ls < 0) die("socket");
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
  if (listen(ls, backlog) < 0) die("listen");
  socklen_t alen = sizeof a;
  if (getsockname(ls, (struct sockaddr *)&a, &alen) < 0) die("getsockname");
  printf("READY %u\n", (unsigned)ntohs(a.sin_port));
  fflush(stdout);
  return ls;
}

static int dial(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) die("socket");
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons((uint16_t)port);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
  set_nodelay(fd);
  return fd;
}

/* ------------------------------------------------------------ server */

static int run_server(int ack) {
  /* Die with the bench driver even if it is killed hard. */
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  int ls = listen_ready(4);
  int fd = accept(ls, NULL, NULL);
  if (fd < 0) die("accept");
  close(ls);
  set_nodelay(fd);

  size_t cap = 0;
  uint8_t *buf = NULL;
  uint8_t ackmsg[8] = {0};
  for (;;) {
    uint8_t hdr[8];
    if (read_full(fd, hdr, 8)) break; /* client done */
    uint64_t len = get_len(hdr);
    if (len > (1ull << 31)) {
      fprintf(stderr, "c_pingpong: message of %llu bytes refused\n", (unsigned long long)len);
      return 1;
    }
    if (len > cap) {
      free(buf);
      cap = (size_t)len;
      buf = malloc(cap);
      if (!buf) die("malloc");
      memset(buf, 0, cap); /* touch the pages once, outside the echo path */
    }
    if (len && read_full(fd, buf, (size_t)len)) die("read payload");
    if (ack) write_msg(fd, ackmsg, sizeof ackmsg);
    else write_msg(fd, buf, len);
  }
  close(fd);
  free(buf);
  return 0;
}

/* ------------------------------------------------------------ client */

static int cmp_u64(const void *x, const void *y) {
  uint64_t a = *(const uint64_t *)x, b = *(const uint64_t *)y;
  return a < b ? -1 : a > b;
}

static double pct_us(const uint64_t *sorted, size_t n, double p) {
  size_t k = (size_t)ceil(p / 100.0 * (double)n);
  if (k < 1) k = 1;
  if (k > n) k = n;
  return (double)sorted[k - 1] / 1000.0;
}

/* One round trip: send `size` bytes, read the reply into *in (grown as
 * needed); returns the reply's length. */
static uint64_t round_trip(int fd, const uint8_t *out, size_t size, uint8_t **in, size_t *incap) {
  write_msg(fd, out, size);
  uint8_t hdr[8];
  if (read_full(fd, hdr, 8)) {
    errno = ECONNRESET;
    die("server closed");
  }
  uint64_t len = get_len(hdr);
  if (len > *incap) {
    free(*in);
    *incap = (size_t)len;
    *in = malloc(*incap);
    if (!*in) die("malloc");
  }
  if (len && read_full(fd, *in, (size_t)len)) die("read payload");
  return len;
}

static uint8_t *make_payload(size_t size) {
  uint8_t *out = malloc(size ? size : 1);
  if (!out) die("malloc");
  for (size_t i = 0; i < size; i++) out[i] = (uint8_t)(i * 31u + 7u);
  return out;
}

static int run_client(int port, size_t size, size_t iters, size_t warmup, int ack, int samples) {
  int fd = dial(port);
  uint8_t *out = make_payload(size);
  size_t incap = size ? size : 8;
  uint8_t *in = malloc(incap);
  uint64_t *ns = malloc(sizeof(uint64_t) * (iters ? iters : 1));
  if (!in || !ns) die("malloc");
  memset(in, 0, incap);

  double cpu0 = 0;
  uint64_t len = 0;
  for (size_t i = 0; i < warmup + iters; i++) {
    if (i == warmup) cpu0 = cpu_s();
    uint64_t t0 = mono_ns();
    len = round_trip(fd, out, size, &in, &incap);
    uint64_t t1 = mono_ns();
    if (!ack && len != size) {
      fprintf(stderr, "c_pingpong: echoed %llu bytes, sent %zu\n", (unsigned long long)len, size);
      return 1;
    }
    if (i >= warmup) ns[i - warmup] = t1 - t0;
  }
  double cpu = cpu_s() - cpu0;
  if (!ack && size && memcmp(in, out, size) != 0) {
    fprintf(stderr, "c_pingpong: echo differs from what was sent\n");
    return 1;
  }
  close(fd);

  double sum = 0;
  for (size_t i = 0; i < iters; i++) sum += (double)ns[i];
  if (samples) {
    printf("{\"samples_ns\": [");
    for (size_t i = 0; i < iters; i++) printf("%s%llu", i ? ", " : "", (unsigned long long)ns[i]);
    printf("], ");
  } else {
    printf("{");
  }
  qsort(ns, iters, sizeof *ns, cmp_u64);
  printf("\"size\": %zu, \"iters\": %zu, \"warmup\": %zu, \"p50_us\": %.3f, \"p99_us\": %.3f, "
         "\"mean_us\": %.3f, \"min_us\": %.3f, \"max_us\": %.3f, \"cpu_us_per_call\": %.3f}\n",
         size, iters, warmup, pct_us(ns, iters, 50), pct_us(ns, iters, 99),
         iters ? sum / (double)iters / 1000.0 : 0.0, iters ? ns[0] / 1000.0 : 0.0,
         iters ? ns[iters - 1] / 1000.0 : 0.0, iters ? cpu * 1e6 / (double)iters : 0.0);
  free(out);
  free(in);
  free(ns);
  return 0;
}

/* ------------------------------------------------------------ rate */

static int run_rate(int port, size_t size) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  int fd = dial(port);
  uint8_t *out = make_payload(size);
  size_t incap = size ? size : 8;
  uint8_t *in = malloc(incap);
  if (!in) die("malloc");
  for (int i = 0; i < 100; i++) round_trip(fd, out, size, &in, &incap);
  printf("READY\n");
  fflush(stdout);
  char line[256];
  while (fgets(line, sizeof line, stdin)) {
    unsigned long long start = 0, dur = 0;
    if (sscanf(line, "GO %llu %llu", &start, &dur) != 2) {
      fprintf(stderr, "c_pingpong rate: expected 'GO <start_ns> <dur_ns>'\n");
      return 2;
    }
    uint64_t end = start + dur, calls = 0;
    double cpu0 = 0, cpu1 = 0;
    int in_window = 0;
    for (;;) {
      uint64_t now = mono_ns();
      if (!in_window && now >= start) {
        in_window = 1;
        cpu0 = cpu_s();
      }
      if (now >= end) break;
      round_trip(fd, out, size, &in, &incap);
      uint64_t t = mono_ns();
      if (t >= start && t <= end) calls++;
    }
    cpu1 = cpu_s();
    printf("{\"calls\": %llu, \"cpu_s\": %.6f}\n", (unsigned long long)calls, in_window ? cpu1 - cpu0 : 0.0);
    fflush(stdout);
  }
  close(fd);
  return 0;
}

/* ------------------------------------------------------------ mserver */

typedef struct {
  int fd;
  uint8_t *in;       /* bytes received, not yet consumed */
  size_t in_len, in_cap;
  uint8_t *out;      /* bytes to send */
  size_t out_off, out_len, out_cap;
} mconn;

static void grow(uint8_t **p, size_t *cap, size_t need) {
  if (need <= *cap) return;
  size_t c = *cap ? *cap : 4096;
  while (c < need) c *= 2;
  uint8_t *n = realloc(*p, c);
  if (!n) die("realloc");
  *p = n;
  *cap = c;
}

static void mconn_free(mconn *c) {
  close(c->fd);
  free(c->in);
  free(c->out);
  free(c);
}

/* Write what is queued; returns -1 when the connection failed. */
static int mconn_flush(mconn *c) {
  while (c->out_off < c->out_len) {
    ssize_t w = write(c->fd, c->out + c->out_off, c->out_len - c->out_off);
    if (w > 0) {
      c->out_off += (size_t)w;
    } else if (w < 0 && errno == EINTR) {
      continue;
    } else if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      return 0;
    } else {
      return -1;
    }
  }
  c->out_off = c->out_len = 0;
  return 0;
}

static __attribute__((noreturn)) int run_mserver(void) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  int ls = listen_ready(512);
  set_nonblock(ls);
  int ep = epoll_create1(0);
  if (ep < 0) die("epoll_create1");
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
  if (epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev) < 0) die("epoll_ctl");
  /* stdin closed (by the bench driver) or gone: exit */
  static char stdin_tag;
  struct epoll_event sev = {.events = EPOLLIN, .data.ptr = &stdin_tag};
  epoll_ctl(ep, EPOLL_CTL_ADD, STDIN_FILENO, &sev); /* fails harmlessly if stdin is a file */
  struct epoll_event evs[64];
  for (;;) {
    int n = epoll_wait(ep, evs, 64, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      die("epoll_wait");
    }
    for (int i = 0; i < n; i++) {
      if (evs[i].data.ptr == &stdin_tag) {
        char junk[256];
        ssize_t r = read(STDIN_FILENO, junk, sizeof junk);
        if (r == 0 || (r < 0 && errno != EINTR && errno != EAGAIN)) exit(0);
        continue;
      }
      mconn *c = evs[i].data.ptr;
      if (!c) { /* the listener */
        for (;;) {
          int fd = accept(ls, NULL, NULL);
          if (fd < 0) break;
          set_nodelay(fd);
          set_nonblock(fd);
          c = calloc(1, sizeof *c);
          if (!c) die("calloc");
          c->fd = fd;
          struct epoll_event ce = {.events = EPOLLIN, .data.ptr = c};
          if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ce) < 0) die("epoll_ctl");
        }
        continue;
      }
      int dead = 0;
      if (evs[i].events & EPOLLOUT) dead = mconn_flush(c) < 0;
      if (!dead && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) {
        for (;;) { /* read what is there */
          grow(&c->in, &c->in_cap, c->in_len + 65536);
          ssize_t r = read(c->fd, c->in + c->in_len, c->in_cap - c->in_len);
          if (r > 0) {
            c->in_len += (size_t)r;
            if ((size_t)r < 65536) break;
          } else if (r < 0 && errno == EINTR) {
            continue;
          } else if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break;
          } else {
            dead = 1;
            break;
          }
        }
        /* echo every whole message */
        size_t off = 0;
        while (c->in_len - off >= 8) {
          uint64_t len = get_len(c->in + off);
          if (c->in_len - off - 8 < len) break;
          grow(&c->out, &c->out_cap, c->out_len + 8 + len);
          memcpy(c->out + c->out_len, c->in + off, 8 + len);
          c->out_len += 8 + len;
          off += 8 + len;
        }
        if (off) {
          memmove(c->in, c->in + off, c->in_len - off);
          c->in_len -= off;
        }
        if (!dead && c->out_len) dead = mconn_flush(c) < 0;
      }
      if (dead) {
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        mconn_free(c);
        continue;
      }
      struct epoll_event ce = {.events = EPOLLIN | (c->out_len ? EPOLLOUT : 0), .data.ptr = c};
      epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ce);
    }
  }
}

/* ------------------------------------------------------------ broadcast */

static int run_bpub(int nsubs) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  int ls = listen_ready(512);
  int *fds = calloc((size_t)nsubs, sizeof *fds);
  size_t *sent = calloc((size_t)nsubs, sizeof *sent);
  struct pollfd *pfd = calloc((size_t)nsubs, sizeof *pfd);
  if (!fds || !sent || !pfd) die("calloc");
  for (int i = 0; i < nsubs; i++) {
    fds[i] = accept(ls, NULL, NULL);
    if (fds[i] < 0) die("accept");
    set_nodelay(fds[i]);
    set_nonblock(fds[i]);
  }
  close(ls);
  printf("ACCEPTED\n");
  fflush(stdout);
  uint8_t *msg = NULL;
  size_t cap = 0;
  char line[256];
  while (fgets(line, sizeof line, stdin)) {
    unsigned long long size = 0, seq = 0;
    if (sscanf(line, "pub %llu %llu", &size, &seq) != 2) break;
    size_t total = 8 + (size_t)size;
    if (total > cap) {
      free(msg);
      cap = total;
      msg = malloc(cap);
      if (!msg) die("malloc");
      for (size_t i = 0; i < cap; i++) msg[i] = (uint8_t)(i * 31u + 7u);
    }
    put_len(msg, size);
    if (size >= 8) put_len(msg + 8, seq);
    uint64_t t0 = mono_ns();
    int left = nsubs;
    for (int i = 0; i < nsubs; i++) sent[i] = 0;
    while (left > 0) {
      int np = 0;
      for (int i = 0; i < nsubs; i++) {
        if (sent[i] == total) continue;
        ssize_t w = write(fds[i], msg + sent[i], total - sent[i]);
        if (w > 0) sent[i] += (size_t)w;
        else if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) die("write");
        if (sent[i] == total) left--;
        else pfd[np++] = (struct pollfd){.fd = fds[i], .events = POLLOUT};
      }
      if (np) poll(pfd, (nfds_t)np, 1000);
    }
    uint64_t t1 = mono_ns();
    printf("{\"t0\": %llu, \"t1\": %llu}\n", (unsigned long long)t0, (unsigned long long)t1);
    fflush(stdout);
  }
  for (int i = 0; i < nsubs; i++) close(fds[i]);
  return 0;
}

static int run_bsub(int port) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  int fd = dial(port);
  printf("READY\n");
  fflush(stdout);
  size_t cap = 0;
  uint8_t *buf = NULL;
  for (;;) {
    /* between messages: exit when stdin closes (the driver is done) */
    struct pollfd pf[2] = {{.fd = fd, .events = POLLIN}, {.fd = STDIN_FILENO, .events = POLLIN}};
    if (poll(pf, 2, -1) < 0) {
      if (errno == EINTR) continue;
      die("poll");
    }
    if (pf[1].revents) {
      char junk[256];
      if (read(STDIN_FILENO, junk, sizeof junk) <= 0) break;
    }
    if (!(pf[0].revents)) continue;
    uint8_t hdr[8];
    if (read_full(fd, hdr, 8)) break;
    uint64_t len = get_len(hdr);
    if (len > cap) {
      free(buf);
      cap = (size_t)len;
      buf = malloc(cap);
      if (!buf) die("malloc");
    }
    if (len && read_full(fd, buf, (size_t)len)) die("read payload");
    uint64_t t = mono_ns();
    printf("{\"seq\": %llu, \"t\": %llu}\n", (unsigned long long)(len >= 8 ? get_len(buf) : 0),
           (unsigned long long)t);
    fflush(stdout);
  }
  return 0;
}

/* ------------------------------------------------------------ main */

/* Is `flag` among argv[i..]? Anything else there but echo/ack/samples is an error. */
static int has_flag(int argc, char **argv, int i, const char *flag) {
  int found = 0;
  for (; i < argc; i++) {
    if (strcmp(argv[i], "ack") && strcmp(argv[i], "echo") && strcmp(argv[i], "samples")) {
      fprintf(stderr, "c_pingpong: unknown option %s (echo, ack, samples)\n", argv[i]);
      exit(2);
    }
    if (strcmp(argv[i], flag) == 0) found = 1;
  }
  return found;
}

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
  if (argc >= 2 && argc <= 3 && strcmp(argv[1], "server") == 0) return run_server(has_flag(argc, argv, 2, "ack"));
  if (argc == 2 && strcmp(argv[1], "mserver") == 0) return run_mserver();
  if (argc >= 6 && argc <= 8 && strcmp(argv[1], "client") == 0) {
    int port = atoi(argv[2]);
    size_t size = strtoull(argv[3], NULL, 10);
    size_t iters = strtoull(argv[4], NULL, 10);
    size_t warmup = strtoull(argv[5], NULL, 10);
    if (port <= 0 || port > 65535 || iters == 0) {
      fprintf(stderr, "c_pingpong: bad arguments\n");
      return 2;
    }
    return run_client(port, size, iters, warmup, has_flag(argc, argv, 6, "ack"), has_flag(argc, argv, 6, "samples"));
  }
  if (argc == 4 && strcmp(argv[1], "rate") == 0) return run_rate(atoi(argv[2]), strtoull(argv[3], NULL, 10));
  if (argc == 3 && strcmp(argv[1], "bpub") == 0) return run_bpub(atoi(argv[2]));
  if (argc == 3 && strcmp(argv[1], "bsub") == 0) return run_bsub(atoi(argv[2]));
  fprintf(stderr,
          "usage: %s server [echo|ack] | client PORT SIZE ITERS WARMUP [echo|ack] [samples] | mserver |\n"
          "       %s rate PORT SIZE | bpub NSUBS | bsub PORT\n",
          argv[0], argv[0]);
  return 2;
}
