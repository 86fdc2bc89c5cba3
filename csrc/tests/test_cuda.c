/* test_cuda.c: the CUDA layer (cuda/cuda.c) against the fake CUDA runtime
 * (tests/fake_cudart): loading and its errors, streams, device and pinned
 * memory, copies (the fake defers them to the sync), pinned pools, threads.
 *
 *   EDGEML_CUDART=/path/libfake_cudart.so test_cuda   the tests
 *   test_cuda                                        "skipped" (exit 0)
 *   test_cuda probe [device]                         open with the
 *     environment as it is (any runtime, the real one too) and print
 *     "rc=<ENAME> why=<why>", the device count and the info; exit 0.
 * tests/test_cuda_layer.py builds the fake and runs both. */
#include "../cuda/em_cuda.h"
#include "em_test.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *(*fake_stats)(void);
static long long (*fake_stat)(const char *name);
static const char *(*fake_problem)(void);

#define STAT(name) fake_stat(#name)
#define HAS(s, sub) (strstr((s), (sub)) != NULL)
#define CHECK_HAS(s, sub)                                                         \
  do {                                                                            \
    CHECK(HAS(s, sub));                                                           \
    if (!HAS(s, sub)) fprintf(stderr, "  in: \"%s\"\n  wanted: \"%s\"\n", s, sub); \
  } while (0)

static int probe(int argc, char **argv) {
  int device = argc > 2 ? atoi(argv[2]) : 0;
  char why[EM_CUDA_WHY_BYTES], cwhy[EM_CUDA_WHY_BYTES];
  em_cuda *c = NULL;
  int rc = em_cuda_open(&c, device, why, sizeof why);
  int n = em_cuda_device_count(cwhy, sizeof cwhy);
  printf("rc=%s why=%s\n", em_errname(rc), why);
  printf("count=%d count_why=%s\n", n, cwhy);
  if (!rc) {
    em_cuda_device_info in;
    int irc = em_cuda_info(c, &in);
    printf("info rc=%s device=%d devices=%d runtime=%d driver=%d cc=%d.%d sms=%d library=%s\n",
           em_errname(irc), in.device, in.device_count, in.runtime_version, in.driver_version, in.cc_major,
           in.cc_minor, in.multiprocessors, in.library);
  }
  em_cuda_close(c);
  return 0;
}

static em_cuda *open_ok(int device) {
  char why[EM_CUDA_WHY_BYTES];
  em_cuda *c = NULL;
  int rc = em_cuda_open(&c, device, why, sizeof why);
  CHECK_EQ(rc, EM_OK);
  if (rc) fprintf(stderr, "  em_cuda_open: %s\n", why);
  return c;
}

/* em_cuda_open(device) must fail with `code` and a why holding `sub`;
 * em_cuda_device_count then says the same (if `count_too`). */
static void open_fails(int device, int code, const char *sub, int count_too) {
  char why[EM_CUDA_WHY_BYTES], cwhy[EM_CUDA_WHY_BYTES];
  em_cuda *c = (em_cuda *)1;
  CHECK_EQ(em_cuda_open(&c, device, why, sizeof why), code);
  CHECK(c == NULL);
  CHECK_HAS(why, sub);
  CHECK_HAS(em_cuda_why(), sub);
  if (count_too) {
    CHECK_EQ(em_cuda_device_count(cwhy, sizeof cwhy), 0);
    CHECK_HAS(cwhy, sub);
  }
}

static void test_open_info(void) {
  em_cuda *c = open_ok(0);
  if (!c) return;
  em_cuda_device_info in;
  CHECK_EQ(em_cuda_info(c, &in), EM_OK);
  CHECK_EQ(in.device, 0);
  CHECK_EQ(in.device_count, 1);
  CHECK_EQ(in.runtime_version, 12020);
  CHECK_EQ(in.driver_version, 12080);
  CHECK_EQ(in.cc_major, 9);
  CHECK_EQ(in.cc_minor, 0);
  CHECK_EQ(in.multiprocessors, 132);
  CHECK_HAS(in.library, "libfake_cudart");
  CHECK_EQ(em_cuda_device_count(NULL, 0), 1);
  CHECK(STAT(set_device_calls) > 0);
  em_cuda_close(c);
  em_cuda_close(NULL);
}

static void test_open_errors(void) {
  const char *lib = getenv("EDGEML_CUDART");
  char saved[1024];
  snprintf(saved, sizeof saved, "%s", lib);

  setenv("FAKE_CUDA_DEVICES", "0", 1);
  open_fails(0, EM_ENODEV, "no CUDA device (cudaGetDeviceCount: cudaErrorNoDevice: no CUDA-capable device", 1);

  setenv("FAKE_CUDA_DEVICES", "2", 1);
  open_fails(3, EM_ENODEV, "device 3 does not exist (2 devices)", 0);
  CHECK_EQ(em_cuda_device_count(NULL, 0), 2);
  em_cuda *c1 = open_ok(1);
  em_cuda_device_info in;
  if (c1) {
    CHECK_EQ(em_cuda_info(c1, &in), EM_OK);
    CHECK_EQ(in.device, 1);
    CHECK_EQ(in.device_count, 2);
    em_cuda_close(c1);
  }
  setenv("FAKE_CUDA_DEVICES", "1", 1);
  open_fails(1, EM_ENODEV, "device 1 does not exist (1 device)", 0);

  setenv("FAKE_CUDA_DRIVER", "11040", 1);
  open_fails(0, EM_ENODEV, "the driver (CUDA 11.4) is older than the runtime (CUDA 12.2)", 1);
  setenv("FAKE_CUDA_DRIVER", "0", 1);
  open_fails(0, EM_ENODEV,
             "no CUDA device (cudaGetDeviceCount: cudaErrorInsufficientDriver: CUDA driver version is "
             "insufficient for CUDA runtime version; no CUDA driver is installed)",
             1);
  unsetenv("FAKE_CUDA_DRIVER");

  /* $EDGEML_CUDART_ONLY is set (main): no fallback to the real runtime */
  setenv("EDGEML_CUDART", "/nonexistent/libcudart.so", 1);
  open_fails(0, EM_ENODEV, "no CUDA runtime library (tried $EDGEML_CUDART=/nonexistent/libcudart.so: ", 1);
  CHECK_HAS(em_cuda_why(), "No such file");
  unsetenv("EDGEML_CUDART");
  open_fails(0, EM_ENODEV, "tried nothing: $EDGEML_CUDART_ONLY is set and $EDGEML_CUDART is not", 1);
  setenv("EDGEML_CUDART", "libm.so.6", 1);
  open_fails(0, EM_ENODEV, "CUDA runtime library libm.so.6 lacks cudaGetDeviceCount", 1);
  setenv("EDGEML_CUDART", saved, 1);

  em_cuda *c = (em_cuda *)1;
  CHECK_EQ(em_cuda_open(&c, -1, NULL, 0), EM_EINVAL);
  CHECK(c == NULL);
  CHECK_EQ(em_cuda_open(NULL, 0, NULL, 0), EM_EINVAL);
  char small[8];
  setenv("FAKE_CUDA_DEVICES", "0", 1);
  CHECK_EQ(em_cuda_open(&c, 0, small, sizeof small), EM_ENODEV);
  CHECK_EQ(strlen(small), 7); /* cut, NUL-terminated */
  unsetenv("FAKE_CUDA_DEVICES");
  c = open_ok(0); /* all well again */
  em_cuda_close(c);
}

static void test_memory(void) {
  em_cuda *c = open_ok(0);
  if (!c) return;
  long long live = STAT(live_device_allocs), bad = STAT(bad_pointers);
  void *d = NULL;
  CHECK_EQ(em_cuda_malloc(c, 4096, &d), EM_OK);
  CHECK(d != NULL);
  CHECK_EQ(STAT(live_device_allocs), live + 1);
  char host[64];
  CHECK_EQ(em_cuda_free(c, host), EM_ECUDA); /* a host pointer */
  CHECK_HAS(em_cuda_why(), "cudaFree(");
  CHECK_HAS(em_cuda_why(), "cudaErrorInvalidValue: invalid argument");
  CHECK_HAS(fake_problem(), "not a pointer from cudaMalloc");
  CHECK_EQ(em_cuda_free(c, (char *)d + 64), EM_ECUDA); /* inside, not the start */
  CHECK_EQ(STAT(bad_pointers), bad + 2);
  CHECK_EQ(em_cuda_free(c, d), EM_OK);
  CHECK_EQ(em_cuda_free(c, d), EM_ECUDA); /* twice */
  CHECK_EQ(em_cuda_free(c, NULL), EM_OK);
  CHECK_EQ(STAT(live_device_allocs), live);

  void *x = (void *)1;
  CHECK_EQ(em_cuda_malloc(c, 0, &x), EM_EINVAL);
  CHECK(x == NULL);
  CHECK_EQ(em_cuda_malloc(NULL, 16, &x), EM_EINVAL);

  char nth[32];
  snprintf(nth, sizeof nth, "%lld", STAT(malloc_calls) + 2); /* the second from here */
  setenv("FAKE_CUDA_FAIL_MALLOC", nth, 1);
  void *a = NULL, *b = NULL, *e = NULL;
  CHECK_EQ(em_cuda_malloc(c, 4096, &a), EM_OK);
  CHECK_EQ(em_cuda_malloc(c, 1 << 20, &b), EM_ENOMEM);
  CHECK(b == NULL);
  CHECK_HAS(em_cuda_why(), "cudaMalloc(1048576 bytes) on device 0: cudaErrorMemoryAllocation: out of memory");
  CHECK_EQ(em_cuda_malloc(c, 4096, &e), EM_OK); /* only the Nth */
  unsetenv("FAKE_CUDA_FAIL_MALLOC");
  CHECK_EQ(em_cuda_free(c, a), EM_OK);
  CHECK_EQ(em_cuda_free(c, e), EM_OK);

  void *h = NULL;
  long long pinned = STAT(live_pinned), portable = STAT(pinned_portable);
  CHECK_EQ(em_cuda_host_alloc(c, 10000, &h), EM_OK);
  CHECK(h != NULL);
  CHECK_EQ(STAT(live_pinned), pinned + 1);
  CHECK_EQ(STAT(pinned_portable), portable + 1);
  CHECK_EQ(em_cuda_malloc(c, 64, &d), EM_OK);
  CHECK_EQ(em_cuda_host_free(c, d), EM_ECUDA); /* device memory */
  CHECK_HAS(em_cuda_why(), "cudaFreeHost(");
  CHECK_HAS(fake_problem(), "(it is device memory)");
  CHECK_EQ(em_cuda_free(c, h), EM_ECUDA); /* pinned host memory */
  CHECK_HAS(fake_problem(), "(it is pinned host memory)");
  CHECK_EQ(em_cuda_host_free(c, h), EM_OK);
  CHECK_EQ(em_cuda_free(c, d), EM_OK);
  CHECK_EQ(em_cuda_host_free(c, NULL), EM_OK);
  CHECK_EQ(STAT(live_pinned), pinned);
  em_cuda_close(c);
}

static void test_copies(void) {
  em_cuda *c = open_ok(0);
  if (!c) return;
  enum { N = 1 << 20 };
  em_cuda_stream *s = NULL;
  long long nb = STAT(streams_nonblocking), live_streams = STAT(live_streams);
  CHECK_EQ(em_cuda_stream_new(c, &s), EM_OK);
  if (!s) return;
  CHECK_EQ(STAT(streams_nonblocking), nb + 1);
  CHECK(em_cuda_stream_handle(s) != NULL);
  uint8_t *src = NULL, *dst = NULL;
  void *d = NULL;
  CHECK_EQ(em_cuda_host_alloc(c, N, (void **)&src), EM_OK);
  CHECK_EQ(em_cuda_host_alloc(c, N, (void **)&dst), EM_OK);
  CHECK_EQ(em_cuda_malloc(c, N, &d), EM_OK);
  for (int i = 0; i < N; i++) src[i] = (uint8_t)(i * 7 + 1);
  memset(dst, 0, N);
  long long h2d = STAT(h2d_bytes), d2h = STAT(d2h_bytes), syncs = STAT(stream_syncs), pageable = STAT(pageable_copies);
  CHECK_EQ(em_cuda_copy_h2d_async(s, d, src, N), EM_OK);
  CHECK_EQ(em_cuda_copy_d2h_async(s, dst, d, N), EM_OK);
  CHECK(dst[0] == 0 && dst[N - 1] == 0); /* queued, not done: the fake defers to the sync */
  CHECK_EQ(STAT(pending_ops), 2);
  CHECK_EQ(em_cuda_stream_sync(s), EM_OK);
  CHECK(memcmp(dst, src, N) == 0);
  CHECK_EQ(STAT(pending_ops), 0);
  CHECK_EQ(STAT(h2d_bytes), h2d + N);
  CHECK_EQ(STAT(d2h_bytes), d2h + N);
  CHECK_EQ(STAT(stream_syncs), syncs + 1);
  CHECK_EQ(STAT(pageable_copies), pageable);
  CHECK_EQ(em_cuda_copy_h2d_async(s, d, src, 0), EM_OK); /* nothing to copy */

  /* wrong pointers are refused when queued, and nothing is queued */
  long long bad = STAT(bad_pointers);
  CHECK_EQ(em_cuda_copy_h2d_async(s, dst, src, 64), EM_ECUDA); /* host as device */
  CHECK_HAS(em_cuda_why(), "cudaMemcpyAsync(host to device, 64 bytes");
  CHECK_HAS(em_cuda_why(), "cudaErrorInvalidValue");
  CHECK_HAS(fake_problem(), "is not inside a device allocation");
  CHECK_EQ(em_cuda_copy_h2d_async(s, (uint8_t *)d + N - 10, src, 20), EM_ECUDA); /* past the end */
  CHECK_HAS(fake_problem(), "runs past its end");
  CHECK_EQ(em_cuda_copy_d2h_async(s, dst, src, 64), EM_ECUDA); /* host as device source */
  CHECK_HAS(em_cuda_why(), "cudaMemcpyAsync(device to host, 64 bytes");
  CHECK_EQ(em_cuda_copy_d2h_async(s, d, d, 64), EM_ECUDA); /* device as host destination */
  CHECK_HAS(fake_problem(), "the host side");
  CHECK_EQ(STAT(bad_pointers), bad + 4);
  CHECK_EQ(STAT(pending_ops), 0);
  CHECK_EQ(em_cuda_copy_h2d_async(s, NULL, src, 64), EM_EINVAL);
  CHECK_EQ(em_cuda_copy_h2d_async(NULL, d, src, 64), EM_EINVAL);
  CHECK_EQ(em_cuda_stream_sync(s), EM_OK);

  /* pageable host memory works, and is counted */
  uint8_t small[256], back[256];
  for (int i = 0; i < 256; i++) small[i] = (uint8_t)(255 - i);
  CHECK_EQ(em_cuda_copy_h2d_async(s, d, small, sizeof small), EM_OK);
  CHECK_EQ(em_cuda_copy_d2h_async(s, back, d, sizeof back), EM_OK);
  CHECK_EQ(em_cuda_stream_sync(s), EM_OK);
  CHECK(memcmp(small, back, sizeof back) == 0);
  CHECK_EQ(STAT(pageable_copies), pageable + 2);

  /* stream_free waits for the queued work */
  long long dp = STAT(destroyed_pending);
  memset(dst, 0, N);
  CHECK_EQ(em_cuda_copy_d2h_async(s, dst, d, 4096), EM_OK);
  em_cuda_stream_free(s);
  CHECK_EQ(STAT(destroyed_pending), dp); /* synced, not left to the destroy */
  CHECK(dst[0] == small[0] && dst[4095] == src[4095]);
  CHECK_EQ(STAT(live_streams), live_streams);
  em_cuda_stream_free(NULL);
  CHECK_EQ(em_cuda_stream_sync(NULL), EM_EINVAL);

  /* a stream outlives the handle it was made from */
  CHECK_EQ(em_cuda_stream_new(c, &s), EM_OK);
  CHECK_EQ(em_cuda_free(c, d), EM_OK);
  CHECK_EQ(em_cuda_host_free(c, src), EM_OK);
  CHECK_EQ(em_cuda_host_free(c, dst), EM_OK);
  em_cuda_close(c);
  CHECK_EQ(em_cuda_copy_d2h_async(s, back, small, 1), EM_ECUDA);
  CHECK_EQ(em_cuda_stream_sync(s), EM_OK);
  em_cuda_stream_free(s);
  CHECK_EQ(STAT(live_streams), live_streams);
}

static void test_pinned_pool(void) {
  em_cuda *c = open_ok(0);
  if (!c) return;
  long long pinned = STAT(pinned_allocs), live = STAT(live_pinned);
  em_pool *p = NULL;
  CHECK_EQ(em_cuda_pinned_pool(c, (1 << 20) + 100, &p), EM_OK); /* rounded up to 1 MiB + 4 KiB */
  if (!p) return;
  CHECK_EQ(STAT(pinned_allocs), pinned + 1);
  em_cuda_pool_stats ps;
  em_cuda_pool_get_stats(p, &ps);
  CHECK_EQ(ps.pinned_bytes, (1 << 20) + 4096);
  CHECK_EQ(ps.pinned_used_bytes, 0);

  em_buf *a = NULL;
  CHECK_EQ(em_cuda_pool_alloc(p, 5000, &a), EM_OK);
  if (!a) return;
  CHECK(em_cuda_buf_pinned(a));
  CHECK_EQ((uintptr_t)em_buf_data(a) % EM_BLOB_ALIGN, 0);
  CHECK_EQ(em_buf_size(a), 8192); /* the pool's size class */
  CHECK(em_buf_retain(a) == a);
  em_buf_release(a); /* still one reference */
  em_cuda_pool_get_stats(p, &ps);
  CHECK_EQ(ps.pinned_used_bytes, 8192);
  CHECK_EQ(ps.pinned_bufs_out, 1);

  /* fill the block with 64 KiB buffers; the one that does not fit is
   * ordinary memory, counted, and no new pinned allocation is made */
  em_buf *bufs[40];
  int n = 0, npinned = 0;
  while (n < 40) {
    CHECK_EQ(em_cuda_pool_alloc(p, 65536, &bufs[n]), EM_OK);
    if (!bufs[n]) return;
    CHECK_EQ((uintptr_t)em_buf_data(bufs[n]) % EM_BLOB_ALIGN, 0);
    if (!em_cuda_buf_pinned(bufs[n++])) break;
    npinned++;
  }
  CHECK_EQ(npinned, ((1 << 20) + 4096 - 8192) / 65536); /* 15 */
  em_cuda_pool_get_stats(p, &ps);
  CHECK_EQ(ps.fallback_allocs, 1);
  CHECK_EQ(ps.pinned_allocs, 1 + npinned);
  CHECK_EQ(ps.pinned_used_bytes, 8192 + 65536 * npinned);
  CHECK_EQ(ps.pinned_peak_bytes, ps.pinned_used_bytes);
  CHECK_EQ(STAT(pinned_allocs), pinned + 1);
  /* memory of distinct buffers does not overlap */
  for (int i = 0; i < n; i++) memset(em_buf_data(bufs[i]), i + 1, 65536);
  for (int i = 0; i < n; i++) CHECK(em_buf_data(bufs[i])[65535] == (uint8_t)(i + 1));

  /* a pinned buffer released goes back to the block and is taken first,
   * before the ordinary one cached by the pool */
  uint8_t *mem = em_buf_data(bufs[3]);
  em_buf_release(bufs[3]);
  em_buf_release(bufs[n - 1]); /* the ordinary one: cached */
  em_buf *again = NULL;
  CHECK_EQ(em_cuda_pool_alloc(p, 60000, &again), EM_OK);
  CHECK(em_cuda_buf_pinned(again));
  CHECK(em_buf_data(again) == mem);
  bufs[3] = again;
  n--;

  /* larger than the block: ordinary memory, not a failure */
  em_buf *big = NULL;
  CHECK_EQ(em_cuda_pool_alloc(p, 2 << 20, &big), EM_OK);
  CHECK(big && !em_cuda_buf_pinned(big));
  em_buf_release(big);

  /* all released: free runs merge, a buffer of half the block fits */
  for (int i = 0; i < n; i++) em_buf_release(bufs[i]);
  em_buf_release(a);
  em_cuda_pool_get_stats(p, &ps);
  CHECK_EQ(ps.pinned_used_bytes, 0);
  CHECK_EQ(ps.pinned_bufs_out, 0);
  em_buf *half = NULL;
  CHECK_EQ(em_cuda_pool_alloc(p, 512 << 10, &half), EM_OK);
  CHECK(half && em_cuda_buf_pinned(half));

  /* a pool buffer is pinned memory for copies */
  em_cuda_stream *s = NULL;
  void *d = NULL;
  CHECK_EQ(em_cuda_stream_new(c, &s), EM_OK);
  CHECK_EQ(em_cuda_malloc(c, 4096, &d), EM_OK);
  long long pageable = STAT(pageable_copies);
  memset(em_buf_data(half), 0x5a, 4096);
  CHECK_EQ(em_cuda_copy_h2d_async(s, d, em_buf_data(half), 4096), EM_OK);
  CHECK_EQ(em_cuda_stream_sync(s), EM_OK);
  CHECK_EQ(STAT(pageable_copies), pageable);
  em_cuda_stream_free(s);
  CHECK_EQ(em_cuda_free(c, d), EM_OK);

  /* the pool outlives the handle and its owner: the block goes with the
   * last buffer */
  em_cuda_close(c);
  em_cuda_pool_release(p);
  CHECK_EQ(STAT(live_pinned), live + 1);
  em_buf_release(half);
  CHECK_EQ(STAT(live_pinned), live);
  em_cuda_pool_release(NULL);

  /* an ordinary pool: not pinned, no pinned counters */
  em_pool *plain = em__pool_new(1 << 20);
  em_buf *o = NULL;
  CHECK_EQ(em_cuda_pool_alloc(plain, 100, &o), EM_OK);
  CHECK(!em_cuda_buf_pinned(o));
  em_cuda_pool_get_stats(plain, &ps);
  CHECK_EQ(ps.pinned_bytes, 0);
  CHECK_EQ(ps.fallback_allocs, 0);
  em_buf_release(o);
  em_cuda_pool_release(plain);

  /* the pinned allocation fails: ENOMEM, and why says which call */
  c = open_ok(0);
  if (!c) return;
  char nth[32];
  snprintf(nth, sizeof nth, "%lld", STAT(hostalloc_calls) + 1);
  setenv("FAKE_CUDA_FAIL_HOSTALLOC", nth, 1);
  p = (em_pool *)1;
  CHECK_EQ(em_cuda_pinned_pool(c, 1 << 20, &p), EM_ENOMEM);
  CHECK(p == NULL);
  CHECK_HAS(em_cuda_why(), "cudaHostAlloc(1048576 bytes, cudaHostAllocPortable): cudaErrorMemoryAllocation");
  unsetenv("FAKE_CUDA_FAIL_HOSTALLOC");
  CHECK_EQ(em_cuda_pinned_pool(c, 0, &p), EM_EINVAL);
  em_cuda_close(c);
}

/* ------------------------------------------------- threads, one handle */

enum { THREADS = 4, ROUNDS = 200, CHUNK = 16384 };

typedef struct worker {
  em_cuda *c;
  em_pool *pool;
  int id, errors;
  char why[EM_CUDA_WHY_BYTES];
} worker;

static void *worker_main(void *arg) {
  worker *w = arg;
  em_cuda_stream *s = NULL;
  void *d = NULL;
  em_buf *in = NULL, *out = NULL;
  if (em_cuda_stream_new(w->c, &s) || em_cuda_malloc(w->c, CHUNK, &d) ||
      em_cuda_pool_alloc(w->pool, CHUNK, &in) || em_cuda_pool_alloc(w->pool, CHUNK, &out)) {
    w->errors++;
    goto done;
  }
  for (int r = 0; r < ROUNDS; r++) {
    uint8_t v = (uint8_t)(w->id * 31 + r);
    memset(em_buf_data(in), v, CHUNK);
    memset(em_buf_data(out), 0, CHUNK);
    if (em_cuda_copy_h2d_async(s, d, em_buf_data(in), CHUNK) ||
        em_cuda_copy_d2h_async(s, em_buf_data(out), d, CHUNK) || em_cuda_stream_sync(s)) {
      w->errors++;
      break;
    }
    if (em_buf_data(out)[0] != v || em_buf_data(out)[CHUNK - 1] != v) w->errors++;
  }
  /* a failure on this thread is this thread's why only */
  char host[8];
  if (em_cuda_free(w->c, host) != EM_ECUDA) w->errors++;
  snprintf(w->why, sizeof w->why, "%s", em_cuda_why());
done:
  em_buf_release(in);
  em_buf_release(out);
  if (d && em_cuda_free(w->c, d)) w->errors++;
  em_cuda_stream_free(s);
  return NULL;
}

static void test_threads(void) {
  em_cuda *c = open_ok(0);
  if (!c) return;
  em_pool *pool = NULL;
  CHECK_EQ(em_cuda_pinned_pool(c, THREADS * 2 * CHUNK, &pool), EM_OK);
  if (!pool) return;
  worker w[THREADS];
  pthread_t t[THREADS];
  long long syncs = STAT(stream_syncs);
  for (int i = 0; i < THREADS; i++) {
    w[i] = (worker){.c = c, .pool = pool, .id = i};
    CHECK_EQ(pthread_create(&t[i], NULL, worker_main, &w[i]), 0);
  }
  for (int i = 0; i < THREADS; i++) {
    pthread_join(t[i], NULL);
    CHECK_EQ(w[i].errors, 0);
    CHECK_HAS(w[i].why, "cudaFree(");
  }
  CHECK(STAT(stream_syncs) >= syncs + THREADS * ROUNDS);
  em_cuda_pool_stats ps;
  em_cuda_pool_get_stats(pool, &ps);
  CHECK_EQ(ps.pinned_allocs, THREADS * 2);
  CHECK_EQ(ps.fallback_allocs, 0);
  CHECK_EQ(ps.pinned_bufs_out, 0);
  em_cuda_pool_release(pool);
  em_cuda_close(c);
}

static void test_nothing_leaked(void) {
  CHECK_EQ(STAT(live_device_allocs), 0);
  CHECK_EQ(STAT(live_pinned), 0);
  CHECK_EQ(STAT(live_streams), 0);
  CHECK_EQ(STAT(pending_ops), 0);
  printf("fake: %s\n", fake_stats());
}

int main(int argc, char **argv) {
  if (argc > 1 && !strcmp(argv[1], "probe")) return probe(argc, argv);
  const char *lib = getenv("EDGEML_CUDART");
  void *dl = lib && *lib ? dlopen(lib, RTLD_NOW | RTLD_LOCAL) : NULL;
  if (dl) {
    *(void **)&fake_stats = dlsym(dl, "fake_cuda_stats");
    *(void **)&fake_stat = dlsym(dl, "fake_cuda_stat");
    *(void **)&fake_problem = dlsym(dl, "fake_cuda_last_problem");
  }
  if (!fake_stats || !fake_stat || !fake_problem) {
    printf("test_cuda: skipped (set EDGEML_CUDART to the fake CUDA runtime: python tests/fake_cudart/build.py)\n");
    printf("0 checks passed, 0 failed\n");
    return 0;
  }
  setenv("EDGEML_CUDART_ONLY", "1", 1); /* never fall back to a real libcudart */
  unsetenv("FAKE_CUDA_DEVICES");
  unsetenv("FAKE_CUDA_DRIVER");
  unsetenv("FAKE_CUDA_RUNTIME");
  unsetenv("FAKE_CUDA_FAIL_MALLOC");
  unsetenv("FAKE_CUDA_FAIL_HOSTALLOC");
  unsetenv("FAKE_CUDA_IMMEDIATE");
  RUN(test_open_info);
  RUN(test_open_errors);
  RUN(test_memory);
  RUN(test_copies);
  RUN(test_pinned_pool);
  RUN(test_threads);
  RUN(test_nothing_leaked);
  DONE();
}
