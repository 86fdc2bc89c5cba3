/* c_pingpong.c: the floor for bench/pingpong -- a plain C TCP ping-pong.
 *
 * Blocking sockets, TCP_NODELAY, messages framed as an 8-byte little-endian
 * length followed by the payload, one writev (header + payload) per message.
 *
 *   c_pingpong server                   binds 127.0.0.1:0, prints "READY <port>"
 *                                       on stdout, serves one connection: reads
 *                                       each message whole and echoes it back.
 *   c_pingpong client PORT SIZE ITERS WARMUP
 *                                       WARMUP + ITERS round trips of SIZE
 *                                       bytes, prints one JSON line with
 *                                       p50/p99/mean/min/max in microseconds.
 *
 * Percentiles are nearest-rank (sorted[ceil(p/100 * n) - 1]), the same
 * definition bench/pingpong uses for the Python stacks.
 *
 * Build: cc -O2 -o bench/out/c_pingpong bench/c_pingpong.c
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
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

/* Write header + payload with writev, finishing partial writes. */
static void write_msg(int fd, const void *payload, uint64_t len) {
  uint8_t hdr[8];
  for (int i = 0; i < 8; i++) hdr[i] = (uint8_t)(len >> (8 * i));
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

static uint64_t get_len(const uint8_t hdr[8]) {
  uint64_t len = 0;
  for (int i = 0; i < 8; i++) len |= (uint64_t)hdr[i] << (8 * i);
  return len;
}

static void set_nodelay(int fd) {
  int one = 1;
  if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) die("TCP_NODELAY");
}

static int run_server(void) {
  /* Die with the bench driver even if it is killed hard. */
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  int ls = socket(AF_INET, SOCK_STREAM, 0);
  if (ls < 0) die("socket");
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0) die("bind");
  if (listen(ls, 4) < 0) die("listen");
  socklen_t alen = sizeof a;
  if (getsockname(ls, (struct sockaddr *)&a, &alen) < 0) die("getsockname");
  printf("READY %u\n", (unsigned)ntohs(a.sin_port));
  fflush(stdout);

  int fd = accept(ls, NULL, NULL);
  if (fd < 0) die("accept");
  close(ls);
  set_nodelay(fd);

  size_t cap = 0;
  uint8_t *buf = NULL;
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
    write_msg(fd, buf, len);
  }
  close(fd);
  free(buf);
  return 0;
}

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

static int run_client(int port, size_t size, size_t iters, size_t warmup) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) die("socket");
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons((uint16_t)port);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) die("connect");
  set_nodelay(fd);

  uint8_t *out = malloc(size ? size : 1), *in = malloc(size ? size : 1);
  uint64_t *ns = malloc(sizeof(uint64_t) * (iters ? iters : 1));
  if (!out || !in || !ns) die("malloc");
  for (size_t i = 0; i < size; i++) out[i] = (uint8_t)(i * 31u + 7u);
  memset(in, 0, size);

  for (size_t i = 0; i < warmup + iters; i++) {
    uint64_t t0 = mono_ns();
    write_msg(fd, out, size);
    uint8_t hdr[8];
    if (read_full(fd, hdr, 8)) {
      errno = ECONNRESET;
      die("server closed");
    }
    uint64_t len = get_len(hdr);
    if (len != size) {
      fprintf(stderr, "c_pingpong: echoed %llu bytes, sent %zu\n", (unsigned long long)len, size);
      return 1;
    }
    if (len && read_full(fd, in, size)) die("read payload");
    uint64_t t1 = mono_ns();
    if (i >= warmup) ns[i - warmup] = t1 - t0;
  }
  if (size && memcmp(in, out, size) != 0) {
    fprintf(stderr, "c_pingpong: echo differs from what was sent\n");
    return 1;
  }
  close(fd);

  double sum = 0;
  for (size_t i = 0; i < iters; i++) sum += (double)ns[i];
  qsort(ns, iters, sizeof *ns, cmp_u64);
  printf("{\"size\": %zu, \"iters\": %zu, \"warmup\": %zu, \"p50_us\": %.3f, \"p99_us\": %.3f, "
         "\"mean_us\": %.3f, \"min_us\": %.3f, \"max_us\": %.3f}\n",
         size, iters, warmup, pct_us(ns, iters, 50), pct_us(ns, iters, 99),
         iters ? sum / (double)iters / 1000.0 : 0.0, iters ? ns[0] / 1000.0 : 0.0,
         iters ? ns[iters - 1] / 1000.0 : 0.0);
  free(out);
  free(in);
  free(ns);
  return 0;
}

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
  if (argc == 2 && strcmp(argv[1], "server") == 0) return run_server();
  if (argc == 6 && strcmp(argv[1], "client") == 0) {
    int port = atoi(argv[2]);
    size_t size = strtoull(argv[3], NULL, 10);
    size_t iters = strtoull(argv[4], NULL, 10);
    size_t warmup = strtoull(argv[5], NULL, 10);
    if (port <= 0 || port > 65535 || iters == 0) {
      fprintf(stderr, "c_pingpong: bad arguments\n");
      return 2;
    }
    return run_client(port, size, iters, warmup);
  }
  fprintf(stderr, "usage: %s server | %s client PORT SIZE ITERS WARMUP\n", argv[0], argv[0]);
  return 2;
}
