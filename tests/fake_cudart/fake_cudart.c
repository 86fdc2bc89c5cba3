/* fake_cudart.c: a fake CUDA runtime (libcudart) for tests, on host memory.
 * Build: python tests/fake_cudart/build.py [outdir] (a shared library,
 * libfake_cudart.so); point $EDGEML_CUDART at it. Never installed.
 *
 * It implements the calls libedgeml's CUDA layer uses (csrc/cuda/em_cuda.h)
 * with the runtime's C ABI (enums as int, streams as pointers) and is
 * strict where the real runtime is forgiving, so the tests catch mistakes
 * a real GPU would hide or turn into corruption:
 *  - "device" memory is malloc'd memory in a registry: cudaFree of a
 *    pointer it did not hand out, or a copy whose device side is not
 *    (entirely) inside a device allocation, or whose host side is, fails
 *    with cudaErrorInvalidValue and counts in bad_pointers (the detail in
 *    fake_cuda_last_problem());
 *  - cudaMemcpyAsync only queues the copy on its stream; the stream's
 *    operations run in order at cudaStreamSynchronize (or cudaFree,
 *    cudaFreeHost, which wait for the device, or cudaStreamDestroy, which
 *    counts them in destroyed_pending), so code that reads a copy's
 *    destination before synchronising sees stale bytes;
 *  - pinned memory (cudaHostAlloc/cudaMallocHost) is registered too:
 *    copies from or to host memory that is not pinned count in
 *    pageable_copies.
 *
 * Knobs (environment, read at each call, so a test may change them):
 *  FAKE_CUDA_DEVICES=n      devices (default 1; 0: cudaErrorNoDevice)
 *  FAKE_CUDA_RUNTIME=v      cudaRuntimeGetVersion (default 12020 = 12.2)
 *  FAKE_CUDA_DRIVER=v       cudaDriverGetVersion (default 12080); 0 = no
 *                           driver installed; below the runtime's version
 *                           every call fails with cudaErrorInsufficientDriver
 *  FAKE_CUDA_FAIL_MALLOC=N  the Nth cudaMalloc call (1-based, counted in
 *                           malloc_calls: since the start or the last
 *                           fake_cuda_reset_stats) fails with
 *                           cudaErrorMemoryAllocation
 *  FAKE_CUDA_FAIL_HOSTALLOC=N  the same for cudaHostAlloc/cudaMallocHost
 *                           (hostalloc_calls)
 *  FAKE_CUDA_IMMEDIATE=1    copies run at once instead of at sync
 *  FAKE_CUDA_STATS=path     write fake_cuda_stats() to path at exit
 *
 * Counters: fake_cuda_stats() returns "name=value ..." for all of them,
 * fake_cuda_stat("name") one (-1: no such counter); fake_cuda_reset_stats()
 * zeroes them (not the live allocations). Callable with ctypes or dlsym. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define API __attribute__((visibility("default")))

enum {
  E_OK = 0,
  E_INVALID_VALUE = 1,
  E_MEMORY_ALLOCATION = 2,
  E_INVALID_MEMCPY_DIRECTION = 21,
  E_INSUFFICIENT_DRIVER = 35,
  E_NO_DEVICE = 100,
  E_INVALID_DEVICE = 101,
  E_INVALID_RESOURCE_HANDLE = 400,
};

static const struct {
  int code;
  const char *name, *text;
} errors[] = {
    {E_OK, "cudaSuccess", "no error"},
    {E_INVALID_VALUE, "cudaErrorInvalidValue", "invalid argument"},
    {E_MEMORY_ALLOCATION, "cudaErrorMemoryAllocation", "out of memory"},
    {E_INVALID_MEMCPY_DIRECTION, "cudaErrorInvalidMemcpyDirection", "invalid copy direction for memcpy"},
    {E_INSUFFICIENT_DRIVER, "cudaErrorInsufficientDriver",
     "CUDA driver version is insufficient for CUDA runtime version"},
    {E_NO_DEVICE, "cudaErrorNoDevice", "no CUDA-capable device is detected"},
    {E_INVALID_DEVICE, "cudaErrorInvalidDevice", "invalid device ordinal"},
    {E_INVALID_RESOURCE_HANDLE, "cudaErrorInvalidResourceHandle", "invalid resource handle"},
};

#define STATS(X)                                                                                   \
  X(device_count_calls) X(set_device_calls) X(malloc_calls) X(hostalloc_calls) X(mallocs) X(malloc_bytes) X(failed_mallocs) X(frees) \
  X(live_device_allocs) X(live_device_bytes) X(pinned_allocs) X(pinned_portable) X(pinned_bytes) X(failed_pinned)    \
  X(pinned_frees) X(live_pinned) X(h2d_copies) X(h2d_bytes) X(d2h_copies) X(d2h_bytes)           \
  X(pageable_copies) X(pending_ops) X(streams_created) X(streams_nonblocking) X(streams_destroyed) \
  X(live_streams) X(stream_syncs) X(destroyed_pending) X(bad_pointers) X(errors)

static struct {
#define F(n) long long n;
  STATS(F)
#undef F
} st;

typedef struct region {
  uint8_t *p;
  size_t n;
  int device;
  struct region *next;
} region;

typedef struct op {
  int kind;
  void *dst;
  const void *src;
  size_t n;
  struct op *next;
} op;

typedef struct stream {
  op *head, *tail;
  int device;
  unsigned flags;
  struct stream *next;
} stream;

static pthread_mutex_t mu = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP; /* fail() locks it too */
static region *dev_regions, *pinned_regions; /* guarded by mu */
static stream *streams;                      /* guarded by mu */
static char problem[256];
static _Thread_local int cur_device;
static _Thread_local int last_error;

static long long env_ll(const char *name, long long dflt) {
  const char *s = getenv(name);
  return s && *s ? strtoll(s, NULL, 10) : dflt;
}

static int fail(int e) {
  last_error = e;
  pthread_mutex_lock(&mu);
  st.errors++;
  pthread_mutex_unlock(&mu);
  return e;
}

static int bad_pointer(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int bad_pointer(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(problem, sizeof problem, fmt, ap);
  va_end(ap);
  st.bad_pointers++;
  return fail(E_INVALID_VALUE);
}

/* cudaErrorInsufficientDriver / NoDevice when no device is usable. */
static int usable(void) {
  long long drv = env_ll("FAKE_CUDA_DRIVER", 12080), rt = env_ll("FAKE_CUDA_RUNTIME", 12020);
  if (drv <= 0 || drv < rt) return E_INSUFFICIENT_DRIVER;
  if (env_ll("FAKE_CUDA_DEVICES", 1) <= 0) return E_NO_DEVICE;
  return E_OK;
}

/* The region of `list` holding [p, p + n), or NULL. */
static region *find(region *list, const void *p, size_t n) {
  const uint8_t *q = p;
  for (region *r = list; r; r = r->next)
    if (q >= r->p && q < r->p + r->n && n <= (size_t)(r->p + r->n - q)) return r;
  return NULL;
}
static region *find_any(region *list, const void *p) {
  for (region *r = list; r; r = r->next)
    if ((const uint8_t *)p >= r->p && (const uint8_t *)p < r->p + r->n) return r;
  return NULL;
}

static void run_ops(stream *s, int at_destroy) {
  while (s->head) {
    op *o = s->head;
    s->head = o->next;
    memcpy(o->dst, o->src, o->n);
    st.pending_ops--;
    if (at_destroy) st.destroyed_pending++;
    free(o);
  }
  s->tail = NULL;
}

static void run_all(void) {
  for (stream *s = streams; s; s = s->next) run_ops(s, 0);
}

static stream default_stream; /* the legacy stream (NULL) */

static stream *find_stream(void *h) {
  if (!h) return &default_stream;
  for (stream *s = streams; s; s = s->next)
    if (s == h) return s;
  return NULL;
}

/* ------------------------------------------------------------- the API */

API int cudaGetDeviceCount(int *count) {
  if (!count) return fail(E_INVALID_VALUE);
  pthread_mutex_lock(&mu);
  st.device_count_calls++;
  pthread_mutex_unlock(&mu);
  int e = usable();
  if (e == E_NO_DEVICE) *count = 0;
  if (e) return fail(e);
  *count = (int)env_ll("FAKE_CUDA_DEVICES", 1);
  return E_OK;
}

API int cudaSetDevice(int device) {
  int e = usable();
  if (e) return fail(e);
  if (device < 0 || device >= env_ll("FAKE_CUDA_DEVICES", 1)) return fail(E_INVALID_DEVICE);
  pthread_mutex_lock(&mu);
  st.set_device_calls++;
  pthread_mutex_unlock(&mu);
  cur_device = device;
  return E_OK;
}

API int cudaGetDevice(int *device) {
  if (!device) return fail(E_INVALID_VALUE);
  int e = usable();
  if (e) return fail(e);
  *device = cur_device;
  return E_OK;
}

API int cudaDriverGetVersion(int *v) {
  if (!v) return fail(E_INVALID_VALUE);
  *v = (int)env_ll("FAKE_CUDA_DRIVER", 12080);
  return E_OK;
}

API int cudaRuntimeGetVersion(int *v) {
  if (!v) return fail(E_INVALID_VALUE);
  *v = (int)env_ll("FAKE_CUDA_RUNTIME", 12020);
  return E_OK;
}

API const char *cudaGetErrorName(int e) {
  for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++)
    if (errors[i].code == e) return errors[i].name;
  return "cudaErrorUnknown";
}

API const char *cudaGetErrorString(int e) {
  for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++)
    if (errors[i].code == e) return errors[i].text;
  return "unknown error";
}

API int cudaGetLastError(void) {
  int e = last_error;
  last_error = E_OK;
  return e;
}

API int cudaDeviceGetAttribute(int *value, int attr, int device) {
  if (!value) return fail(E_INVALID_VALUE);
  int e = usable();
  if (e) return fail(e);
  if (device < 0 || device >= env_ll("FAKE_CUDA_DEVICES", 1)) return fail(E_INVALID_DEVICE);
  switch (attr) {
    case 16: *value = 132; return E_OK; /* cudaDevAttrMultiProcessorCount */
    case 75: *value = 9; return E_OK;   /* cudaDevAttrComputeCapabilityMajor */
    case 76: *value = 0; return E_OK;   /* ...Minor */
  }
  return fail(E_INVALID_VALUE);
}

API int cudaMalloc(void **p, size_t n) {
  if (!p) return fail(E_INVALID_VALUE);
  int e = usable();
  if (e) return fail(e);
  pthread_mutex_lock(&mu);
  long long nth = ++st.malloc_calls;
  region *r = NULL;
  if (nth != env_ll("FAKE_CUDA_FAIL_MALLOC", 0) && (r = calloc(1, sizeof *r)) &&
      !(r->p = aligned_alloc(256, (n + 255) / 256 * 256))) {
    free(r);
    r = NULL;
  }
  if (!r) {
    st.failed_mallocs++;
    pthread_mutex_unlock(&mu);
    *p = NULL;
    return fail(E_MEMORY_ALLOCATION);
  }
  memset(r->p, 0xdd, n); /* "device garbage" */
  r->n = n;
  r->device = cur_device;
  r->next = dev_regions;
  dev_regions = r;
  st.mallocs++;
  st.malloc_bytes += (long long)n;
  st.live_device_allocs++;
  st.live_device_bytes += (long long)n;
  pthread_mutex_unlock(&mu);
  *p = r->p;
  return E_OK;
}

/* Unlink and free the region of `list` starting at p: 1, or 0 if none. */
static int drop(region **list, void *p, long long *live, long long *live_bytes) {
  for (region **rp = list; *rp; rp = &(*rp)->next) {
    if ((*rp)->p != p) continue;
    region *r = *rp;
    *rp = r->next;
    (*live)--;
    if (live_bytes) *live_bytes -= (long long)r->n;
    free(r->p);
    free(r);
    return 1;
  }
  return 0;
}

API int cudaFree(void *p) {
  int e = usable();
  if (e) return fail(e);
  if (!p) return E_OK; /* initialises the context, as the real one does */
  pthread_mutex_lock(&mu);
  run_all(); /* cudaFree waits for the device */
  int ok = drop(&dev_regions, p, &st.live_device_allocs, &st.live_device_bytes);
  int rc = E_OK;
  if (ok) st.frees++;
  else
    rc = bad_pointer("cudaFree(%p): not a pointer from cudaMalloc%s", p,
                     find_any(pinned_regions, p) ? " (it is pinned host memory)" : "");
  pthread_mutex_unlock(&mu);
  return rc;
}

API int cudaHostAlloc(void **p, size_t n, unsigned flags) {
  if (!p) return fail(E_INVALID_VALUE);
  int e = usable();
  if (e) return fail(e);
  pthread_mutex_lock(&mu);
  long long nth = ++st.hostalloc_calls;
  region *r = NULL;
  if (nth != env_ll("FAKE_CUDA_FAIL_HOSTALLOC", 0) && n && (r = calloc(1, sizeof *r)) &&
      !(r->p = aligned_alloc(4096, (n + 4095) / 4096 * 4096))) {
    free(r);
    r = NULL;
  }
  if (!r) {
    st.failed_pinned++;
    pthread_mutex_unlock(&mu);
    *p = NULL;
    return fail(E_MEMORY_ALLOCATION);
  }
  r->n = n;
  r->device = cur_device;
  r->next = pinned_regions;
  pinned_regions = r;
  st.pinned_allocs++;
  if (flags & 1) st.pinned_portable++; /* cudaHostAllocPortable */
  st.pinned_bytes += (long long)n;
  st.live_pinned++;
  pthread_mutex_unlock(&mu);
  *p = r->p;
  return E_OK;
}

API int cudaMallocHost(void **p, size_t n) { return cudaHostAlloc(p, n, 0); }

API int cudaFreeHost(void *p) {
  int e = usable();
  if (e) return fail(e);
  if (!p) return E_OK;
  pthread_mutex_lock(&mu);
  run_all();
  int ok = drop(&pinned_regions, p, &st.live_pinned, NULL);
  int rc = E_OK;
  if (ok) st.pinned_frees++;
  else
    rc = bad_pointer("cudaFreeHost(%p): not a pointer from cudaHostAlloc%s", p,
                     find_any(dev_regions, p) ? " (it is device memory)" : "");
  pthread_mutex_unlock(&mu);
  return rc;
}

API int cudaMemcpyAsync(void *dst, const void *src, size_t n, int kind, void *stream_h) {
  int e = usable();
  if (e) return fail(e);
  if (kind != 1 && kind != 2) return fail(E_INVALID_MEMCPY_DIRECTION);
  if (!n) return E_OK;
  if (!dst || !src) return fail(E_INVALID_VALUE);
  pthread_mutex_lock(&mu);
  stream *s = find_stream(stream_h);
  int rc = E_OK;
  const void *dev = kind == 1 ? dst : src, *host = kind == 1 ? src : dst;
  const char *what = kind == 1 ? "host to device" : "device to host";
  if (!s) {
    rc = fail(E_INVALID_RESOURCE_HANDLE);
  } else if (!find(dev_regions, dev, n)) {
    rc = bad_pointer("cudaMemcpyAsync(%s, %zu bytes): the device side %p is not inside a device allocation%s",
                     what, n, dev, find_any(dev_regions, dev) ? " (it runs past its end)" : "");
  } else if (find_any(dev_regions, host)) {
    rc = bad_pointer("cudaMemcpyAsync(%s, %zu bytes): the host side %p is device memory", what, n, host);
  } else {
    op *o = calloc(1, sizeof *o);
    if (!o) {
      rc = fail(E_MEMORY_ALLOCATION);
    } else {
      *o = (op){kind, dst, src, n, NULL};
      if (s->tail) s->tail->next = o;
      else s->head = o;
      s->tail = o;
      st.pending_ops++;
      if (!find(pinned_regions, host, n)) st.pageable_copies++;
      if (kind == 1) {
        st.h2d_copies++;
        st.h2d_bytes += (long long)n;
      } else {
        st.d2h_copies++;
        st.d2h_bytes += (long long)n;
      }
      if (env_ll("FAKE_CUDA_IMMEDIATE", 0)) run_ops(s, 0);
    }
  }
  pthread_mutex_unlock(&mu);
  return rc;
}

API int cudaStreamCreateWithFlags(void **out, unsigned flags) {
  if (!out) return fail(E_INVALID_VALUE);
  int e = usable();
  if (e) return fail(e);
  stream *s = calloc(1, sizeof *s);
  if (!s) return fail(E_MEMORY_ALLOCATION);
  s->device = cur_device;
  s->flags = flags;
  pthread_mutex_lock(&mu);
  s->next = streams;
  streams = s;
  st.streams_created++;
  if (flags & 1) st.streams_nonblocking++;
  st.live_streams++;
  pthread_mutex_unlock(&mu);
  *out = s;
  return E_OK;
}

API int cudaStreamCreate(void **out) { return cudaStreamCreateWithFlags(out, 0); }

API int cudaStreamSynchronize(void *h) {
  int e = usable();
  if (e) return fail(e);
  pthread_mutex_lock(&mu);
  stream *s = find_stream(h);
  if (s) {
    run_ops(s, 0);
    st.stream_syncs++;
  }
  pthread_mutex_unlock(&mu);
  return s ? E_OK : fail(E_INVALID_RESOURCE_HANDLE);
}

API int cudaStreamDestroy(void *h) {
  int e = usable();
  if (e) return fail(e);
  pthread_mutex_lock(&mu);
  stream *s = NULL;
  for (stream **sp = &streams; *sp; sp = &(*sp)->next)
    if (*sp == h) {
      s = *sp;
      *sp = s->next;
      break;
    }
  if (s) {
    run_ops(s, 1);
    st.streams_destroyed++;
    st.live_streams--;
  }
  pthread_mutex_unlock(&mu);
  if (!s) return fail(E_INVALID_RESOURCE_HANDLE);
  free(s);
  return E_OK;
}

/* ------------------------------------------------------- for the tests */

static char stats_text[2048];

API const char *fake_cuda_stats(void) {
  pthread_mutex_lock(&mu);
  size_t n = 0;
#define F(name)                                                                                  \
  if (n < sizeof stats_text)                                                                     \
    n += (size_t)snprintf(stats_text + n, sizeof stats_text - n, "%s" #name "=%lld", n ? " " : "", st.name);
  STATS(F)
#undef F
  pthread_mutex_unlock(&mu);
  return stats_text;
}

API long long fake_cuda_stat(const char *name) {
  long long v = -1;
  pthread_mutex_lock(&mu);
#define F(n) \
  if (name && !strcmp(name, #n)) v = st.n;
  STATS(F)
#undef F
  pthread_mutex_unlock(&mu);
  return v;
}

API void fake_cuda_reset_stats(void) {
  pthread_mutex_lock(&mu);
  long long keep[] = {st.live_device_allocs, st.live_device_bytes, st.live_pinned, st.live_streams,
                      st.pending_ops};
  memset(&st, 0, sizeof st);
  st.live_device_allocs = keep[0];
  st.live_device_bytes = keep[1];
  st.live_pinned = keep[2];
  st.live_streams = keep[3];
  st.pending_ops = keep[4];
  problem[0] = 0;
  pthread_mutex_unlock(&mu);
}

API const char *fake_cuda_last_problem(void) { return problem; }

__attribute__((destructor)) static void write_stats(void) {
  const char *path = getenv("FAKE_CUDA_STATS");
  if (!path || !*path) return;
  FILE *f = fopen(path, "w");
  if (!f) return;
  fprintf(f, "%s\n", fake_cuda_stats());
  fclose(f);
}
