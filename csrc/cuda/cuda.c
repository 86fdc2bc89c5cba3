/* cuda.c: the CUDA runtime found at run time (dlopen), streams, device and
 * pinned memory, and pinned pools of receive buffers. See edgeml_cuda.h
 * for the API and docs/cuda.md for the design. */
#include "em_cuda.h"

#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

/* ------------------------------------------------------------------ why */

static _Thread_local char tl_why[EM_CUDA_WHY_BYTES];

const char *em_cuda_why(void) { return tl_why; }

static void why_set(char *why, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void why_set(char *why, size_t cap, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(tl_why, sizeof tl_why, fmt, ap);
  va_end(ap);
  if (why && cap) snprintf(why, cap, "%s", tl_why);
}

static const char *cu_name(const em__cudart *rt, int e) {
  const char *s = rt->GetErrorName ? rt->GetErrorName(e) : NULL;
  return s ? s : "cudaErrorUnknown";
}
static const char *cu_text(const em__cudart *rt, int e) {
  const char *s = rt->GetErrorString ? rt->GetErrorString(e) : NULL;
  return s ? s : "unknown error";
}

int em__cuda_fail(const em_cuda *c, int cuda_err, const char *what_fmt, ...) {
  char what[256];
  va_list ap;
  va_start(ap, what_fmt);
  vsnprintf(what, sizeof what, what_fmt, ap);
  va_end(ap);
  snprintf(tl_why, sizeof tl_why, "%s: %s: %s", what, cu_name(&c->rt, cuda_err), cu_text(&c->rt, cuda_err));
  (void)c->rt.GetLastError(); /* a non-sticky error must not surface in the caller's next check */
  return cuda_err == EM__CU_MEMORY_ALLOCATION ? EM_ENOMEM : EM_ECUDA;
}

/* ------------------------------------------------------------- loading */

static const char *const fallback_names[] = {"libcudart.so", "libcudart.so.13", "libcudart.so.12",
                                              "libcudart.so.11"};

#define EM__CU_SYMS(X)                                                                       \
  X(GetDeviceCount) X(SetDevice) X(GetDevice) X(DriverGetVersion) X(RuntimeGetVersion)       \
  X(GetErrorString) X(GetErrorName) X(GetLastError) X(DeviceGetAttribute) X(Malloc) X(Free)  \
  X(HostAlloc) X(FreeHost) X(MemcpyAsync) X(StreamCreateWithFlags) X(StreamDestroy)          \
  X(StreamSynchronize)

static bool only_env_lib(void) {
  const char *s = getenv("EDGEML_CUDART_ONLY");
  return s && *s && strcmp(s, "0") != 0;
}

static void fmt_version(char *buf, size_t cap, int v) {
  snprintf(buf, cap, "CUDA %d.%d", v / 1000, (v % 1000) / 10);
}

/* Load the runtime into c (dl, rt, library). EM_OK or EM_ENODEV + why. */
static int cuda_load(em_cuda *c, char *why, size_t cap) {
  char tried[768] = "";
  size_t tl = 0;
  const char *err = "not tried";
  const char *env = getenv("EDGEML_CUDART");
  const char *names[1 + sizeof fallback_names / sizeof fallback_names[0]];
  size_t n = 0;
  if (env && *env) names[n++] = env;
  if (!only_env_lib())
    for (size_t i = 0; i < sizeof fallback_names / sizeof fallback_names[0]; i++) names[n++] = fallback_names[i];
  void *dl = NULL;
  const char *name = NULL;
  for (size_t i = 0; i < n && !dl; i++) {
    int w = snprintf(tried + tl, sizeof tried - tl, "%s%s%s", tl ? ", " : "",
                     names[i] == env ? "$EDGEML_CUDART=" : "", names[i]);
    if (w > 0) tl = EM__MIN(tl + (size_t)w, sizeof tried - 1);
    dlerror();
    dl = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (dl) name = names[i];
    else {
      const char *e = dlerror();
      err = e ? e : "dlopen failed";
    }
  }
  if (!dl) {
    if (n == 0)
      why_set(why, cap, "no CUDA runtime library (tried nothing: $EDGEML_CUDART_ONLY is set and $EDGEML_CUDART is not)");
    else
      why_set(why, cap, "no CUDA runtime library (tried %s: %s)", tried, err);
    return EM_ENODEV;
  }
  em__cudart *rt = &c->rt;
#define EM__CU_SYM(f)                                                                          \
  dlerror();                                                                                   \
  *(void **)&rt->f = dlsym(dl, "cuda" #f);                                                     \
  if (!rt->f) {                                                                                \
    const char *e = dlerror();                                                                 \
    why_set(why, cap, "CUDA runtime library %s lacks cuda" #f " (%s)", name, e ? e : "NULL"); \
    memset(rt, 0, sizeof *rt);                                                                 \
    dlclose(dl);                                                                               \
    return EM_ENODEV;                                                                          \
  }
  EM__CU_SYMS(EM__CU_SYM)
#undef EM__CU_SYM
  c->dl = dl;
  Dl_info info;
  const char *path = dladdr(*(void **)&rt->GetDeviceCount, &info) && info.dli_fname ? info.dli_fname : name;
  snprintf(c->library, sizeof c->library, "%s", path);
  return EM_OK;
}

/* Count the devices of the loaded runtime: EM_OK + *count > 0, or
 * EM_ENODEV + why (no device, no driver, an old driver). */
static int cuda_count(em_cuda *c, int *count, char *why, size_t cap) {
  em__cudart *rt = &c->rt;
  if (rt->RuntimeGetVersion(&c->runtime_version)) c->runtime_version = 0;
  if (rt->DriverGetVersion(&c->driver_version)) c->driver_version = 0;
  int n = 0;
  int e = rt->GetDeviceCount(&n);
  if (e) (void)rt->GetLastError();
  if (e == EM__CU_INSUFFICIENT_DRIVER && c->driver_version > 0) {
    char d[32], r[32];
    fmt_version(d, sizeof d, c->driver_version);
    fmt_version(r, sizeof r, c->runtime_version);
    why_set(why, cap, "the driver (%s) is older than the runtime (%s)", d, r);
    return EM_ENODEV;
  }
  if (e) {
    why_set(why, cap, "no CUDA device (cudaGetDeviceCount: %s: %s%s)", cu_name(rt, e), cu_text(rt, e),
            c->driver_version == 0 ? "; no CUDA driver is installed" : "");
    return EM_ENODEV;
  }
  if (n <= 0) {
    why_set(why, cap, "no CUDA device (cudaGetDeviceCount: 0 devices)");
    return EM_ENODEV;
  }
  *count = n;
  return EM_OK;
}

em_cuda *em__cuda_retain(em_cuda *c) {
  atomic_fetch_add(&c->refs, 1);
  return c;
}

void em__cuda_release(em_cuda *c) {
  if (c && atomic_fetch_sub(&c->refs, 1) == 1) free(c); /* c->dl stays loaded */
}

int em__cuda_use(const em_cuda *c) {
  int e = c->rt.SetDevice(c->device);
  return e ? em__cuda_fail(c, e, "cudaSetDevice(%d)", c->device) : EM_OK;
}

int em_cuda_open(em_cuda **out, int device, char *why, size_t why_cap) {
  if (why && why_cap) why[0] = 0;
  if (!out || device < 0) {
    if (out) *out = NULL;
    why_set(why, why_cap, "em_cuda_open: %s", out ? "device < 0" : "out is NULL");
    return EM_EINVAL;
  }
  *out = NULL;
  em_cuda *c = calloc(1, sizeof *c);
  if (!c) {
    why_set(why, why_cap, "em_cuda_open: out of memory");
    return EM_ENOMEM;
  }
  atomic_init(&c->refs, 1);
  c->device = device;
  int rc = cuda_load(c, why, why_cap);
  if (!rc) rc = cuda_count(c, &c->device_count, why, why_cap);
  if (!rc && device >= c->device_count) {
    why_set(why, why_cap, "device %d does not exist (%d device%s)", device, c->device_count,
            c->device_count == 1 ? "" : "s");
    rc = EM_ENODEV;
  }
  if (!rc && (rc = em__cuda_use(c)) && why && why_cap) snprintf(why, why_cap, "%s", tl_why);
  if (!rc) { /* create the context now, so its errors come from open */
    int e = c->rt.Free(NULL);
    if (e) {
      rc = em__cuda_fail(c, e, "cudaFree(NULL) (creating the context of device %d)", device);
      if (why && why_cap) snprintf(why, why_cap, "%s", tl_why);
    }
  }
  if (rc) {
    free(c);
    return rc;
  }
  *out = c;
  return EM_OK;
}

void em_cuda_close(em_cuda *c) { em__cuda_release(c); }

int em_cuda_device_count(char *why, size_t why_cap) {
  if (why && why_cap) why[0] = 0;
  em_cuda c;
  memset(&c, 0, sizeof c);
  int n = 0;
  if (cuda_load(&c, why, why_cap) || cuda_count(&c, &n, why, why_cap)) return 0;
  return n;
}

int em_cuda_info(em_cuda *c, em_cuda_device_info *out) {
  if (!c || !out) {
    why_set(NULL, 0, "em_cuda_info: NULL argument");
    return EM_EINVAL;
  }
  memset(out, 0, sizeof *out);
  out->device = c->device;
  out->device_count = c->device_count;
  out->runtime_version = c->runtime_version;
  out->driver_version = c->driver_version;
  snprintf(out->library, sizeof out->library, "%s", c->library);
  static const struct {
    int attr;
    const char *name;
    size_t off;
  } attrs[] = {
      {EM__CU_ATTR_CC_MAJOR, "cudaDevAttrComputeCapabilityMajor", offsetof(em_cuda_device_info, cc_major)},
      {EM__CU_ATTR_CC_MINOR, "cudaDevAttrComputeCapabilityMinor", offsetof(em_cuda_device_info, cc_minor)},
      {EM__CU_ATTR_SM_COUNT, "cudaDevAttrMultiProcessorCount", offsetof(em_cuda_device_info, multiprocessors)},
  };
  int rc = EM_OK;
  for (size_t i = 0; i < sizeof attrs / sizeof attrs[0]; i++) {
    int v = 0;
    int e = c->rt.DeviceGetAttribute(&v, attrs[i].attr, c->device);
    if (e) rc = em__cuda_fail(c, e, "cudaDeviceGetAttribute(%s, %d)", attrs[i].name, c->device);
    else memcpy((char *)out + attrs[i].off, &v, sizeof v);
  }
  return rc == EM_ENOMEM ? EM_ECUDA : rc;
}

/* -------------------------------------------------------------- streams */

int em_cuda_stream_new(em_cuda *c, em_cuda_stream **out) {
  if (out) *out = NULL;
  if (!c || !out) {
    why_set(NULL, 0, "em_cuda_stream_new: NULL argument");
    return EM_EINVAL;
  }
  em_cuda_stream *s = calloc(1, sizeof *s);
  if (!s) {
    why_set(NULL, 0, "em_cuda_stream_new: out of memory");
    return EM_ENOMEM;
  }
  int rc = em__cuda_use(c);
  if (!rc) {
    int e = c->rt.StreamCreateWithFlags(&s->h, EM__CU_STREAM_NON_BLOCKING);
    if (e) rc = em__cuda_fail(c, e, "cudaStreamCreateWithFlags(cudaStreamNonBlocking)");
  }
  if (rc) {
    free(s);
    return rc;
  }
  s->c = em__cuda_retain(c);
  *out = s;
  return EM_OK;
}

int em_cuda_stream_sync(em_cuda_stream *s) {
  if (!s) {
    why_set(NULL, 0, "em_cuda_stream_sync: NULL stream");
    return EM_EINVAL;
  }
  int e = s->c->rt.StreamSynchronize(s->h);
  return e ? em__cuda_fail(s->c, e, "cudaStreamSynchronize") : EM_OK;
}

void em_cuda_stream_free(em_cuda_stream *s) {
  if (!s) return;
  (void)em_cuda_stream_sync(s); /* a failure is in em_cuda_why */
  int e = s->c->rt.StreamDestroy(s->h);
  if (e) (void)em__cuda_fail(s->c, e, "cudaStreamDestroy");
  em__cuda_release(s->c);
  free(s);
}

void *em_cuda_stream_handle(em_cuda_stream *s) { return s ? s->h : NULL; }

/* --------------------------------------------------------------- memory */

int em_cuda_malloc(em_cuda *c, size_t bytes, void **out) {
  if (out) *out = NULL;
  if (!c || !out || !bytes) {
    why_set(NULL, 0, "em_cuda_malloc: %s", bytes ? "NULL argument" : "0 bytes");
    return EM_EINVAL;
  }
  int rc = em__cuda_use(c);
  if (rc) return rc;
  void *p = NULL;
  int e = c->rt.Malloc(&p, bytes);
  if (e) return em__cuda_fail(c, e, "cudaMalloc(%zu bytes) on device %d", bytes, c->device);
  *out = p;
  return EM_OK;
}

int em_cuda_free(em_cuda *c, void *p) {
  if (!p) return EM_OK;
  if (!c) {
    why_set(NULL, 0, "em_cuda_free: NULL handle");
    return EM_EINVAL;
  }
  int rc = em__cuda_use(c);
  if (rc) return rc;
  int e = c->rt.Free(p);
  return e ? em__cuda_fail(c, e, "cudaFree(%p) (not device memory of this runtime?)", p) : EM_OK;
}

int em_cuda_host_alloc(em_cuda *c, size_t bytes, void **out) {
  if (out) *out = NULL;
  if (!c || !out || !bytes) {
    why_set(NULL, 0, "em_cuda_host_alloc: %s", bytes ? "NULL argument" : "0 bytes");
    return EM_EINVAL;
  }
  int rc = em__cuda_use(c);
  if (rc) return rc;
  void *p = NULL;
  int e = c->rt.HostAlloc(&p, bytes, EM__CU_HOST_ALLOC_PORTABLE);
  if (e) return em__cuda_fail(c, e, "cudaHostAlloc(%zu bytes, cudaHostAllocPortable)", bytes);
  *out = p;
  return EM_OK;
}

int em_cuda_host_free(em_cuda *c, void *p) {
  if (!p) return EM_OK;
  if (!c) {
    why_set(NULL, 0, "em_cuda_host_free: NULL handle");
    return EM_EINVAL;
  }
  int rc = em__cuda_use(c);
  if (rc) return rc;
  int e = c->rt.FreeHost(p);
  return e ? em__cuda_fail(c, e, "cudaFreeHost(%p) (not pinned memory of this runtime?)", p) : EM_OK;
}

static int cuda_copy(em_cuda_stream *s, void *dst, const void *src, size_t bytes, int kind) {
  const char *k = kind == EM__CU_H2D ? "host to device" : "device to host";
  if (!s || ((!dst || !src) && bytes)) {
    why_set(NULL, 0, "cudaMemcpyAsync(%s): NULL argument", k);
    return EM_EINVAL;
  }
  if (!bytes) return EM_OK;
  int e = s->c->rt.MemcpyAsync(dst, src, bytes, kind, s->h);
  if (!e) return EM_OK;
  int rc = em__cuda_fail(s->c, e, "cudaMemcpyAsync(%s, %zu bytes, dst %p, src %p)", k, bytes, dst, src);
  return rc == EM_ENOMEM ? EM_ECUDA : rc;
}

int em_cuda_copy_h2d_async(em_cuda_stream *s, void *dev_dst, const void *host_src, size_t bytes) {
  return cuda_copy(s, dev_dst, host_src, bytes, EM__CU_H2D);
}

int em_cuda_copy_d2h_async(em_cuda_stream *s, void *host_dst, const void *dev_src, size_t bytes) {
  return cuda_copy(s, host_dst, dev_src, bytes, EM__CU_D2H);
}

/* ---------------------------------------------------------- pinned pool
 *
 * The arena of a pinned pool: one cudaHostAlloc block split into 4 KiB
 * pages, a bitmap of the pages in use (1 = used), first fit over runs of
 * free pages. Every size the pool asks for is a multiple of 4 KiB (its
 * classes are powers of two from 4 KiB; larger requests are rounded up to
 * 4 KiB), so nothing is lost to rounding; freeing clears the bits, so
 * neighbouring free runs merge by themselves. The bitmap is scanned a word
 * (64 pages, 256 KiB) at a time where it is all used or all free. */

#define EM__PAGE 4096u

typedef struct cuda_arena {
  em_cuda *c;        /* owned reference */
  void *block;       /* from cudaHostAlloc */
  uint8_t *base;     /* block, 64-byte aligned */
  size_t pages;
  uint64_t *bits;    /* ceil(pages / 64) words; bits past `pages` are set */
  pthread_mutex_t mu;
  size_t used, peak; /* bytes, guarded by mu */
} cuda_arena;

static void bits_set(uint64_t *bits, size_t from, size_t n, bool on) {
  for (size_t i = from; i < from + n;) {
    if (i % 64 == 0 && from + n - i >= 64) {
      bits[i / 64] = on ? ~(uint64_t)0 : 0;
      i += 64;
    } else {
      if (on) bits[i / 64] |= (uint64_t)1 << (i % 64);
      else bits[i / 64] &= ~((uint64_t)1 << (i % 64));
      i++;
    }
  }
}

static void *arena_alloc(void *ud, size_t bytes) {
  cuda_arena *a = ud;
  size_t need = bytes / EM__PAGE;
  if (!need || bytes % EM__PAGE || need > a->pages) return NULL;
  void *p = NULL;
  pthread_mutex_lock(&a->mu);
  size_t run = 0, start = 0;
  for (size_t i = 0; i < a->pages && run < need;) {
    uint64_t w = a->bits[i / 64];
    if (i % 64 == 0 && w == ~(uint64_t)0) {
      run = 0;
      i += 64;
    } else if (i % 64 == 0 && w == 0) {
      if (!run) start = i;
      run += 64;
      i += 64;
    } else {
      if (w >> (i % 64) & 1) run = 0;
      else if (!run++) start = i;
      i++;
    }
  }
  if (run >= need) {
    bits_set(a->bits, start, need, true);
    a->used += bytes;
    if (a->used > a->peak) a->peak = a->used;
    p = a->base + start * EM__PAGE;
  }
  pthread_mutex_unlock(&a->mu);
  return p;
}

static void arena_free(void *ud, void *data, size_t bytes) {
  cuda_arena *a = ud;
  pthread_mutex_lock(&a->mu);
  bits_set(a->bits, (size_t)((uint8_t *)data - a->base) / EM__PAGE, bytes / EM__PAGE, false);
  a->used -= bytes;
  pthread_mutex_unlock(&a->mu);
}

static void arena_destroy(void *ud) {
  cuda_arena *a = ud;
  if (a->block) {
    (void)em__cuda_use(a->c);
    int e = a->c->rt.FreeHost(a->block);
    if (e) (void)em__cuda_fail(a->c, e, "cudaFreeHost (the block of a pinned pool)");
  }
  em__cuda_release(a->c);
  pthread_mutex_destroy(&a->mu);
  free(a->bits);
  free(a);
}

int em_cuda_pinned_pool(em_cuda *c, size_t bytes, em_pool **out) {
  if (out) *out = NULL;
  if (!c || !out || !bytes || bytes > SIZE_MAX / 2) {
    why_set(NULL, 0, "em_cuda_pinned_pool: %s", !c || !out ? "NULL argument" : "bad size");
    return EM_EINVAL;
  }
  size_t total = EM__ALIGN_UP(bytes, EM__PAGE);
  cuda_arena *a = calloc(1, sizeof *a);
  if (!a) goto nomem;
  pthread_mutex_init(&a->mu, NULL);
  a->c = em__cuda_retain(c);
  int rc = em_cuda_host_alloc(c, total, &a->block);
  if (rc) {
    arena_destroy(a);
    return rc;
  }
  a->base = (uint8_t *)EM__ALIGN_UP((uintptr_t)a->block, EM_BLOB_ALIGN);
  a->pages = (total - (size_t)(a->base - (uint8_t *)a->block)) / EM__PAGE;
  size_t words = (a->pages + 63) / 64;
  a->bits = calloc(words ? words : 1, sizeof *a->bits);
  if (!a->bits) goto nomem;
  if (a->pages % 64) a->bits[words - 1] = ~(uint64_t)0 << (a->pages % 64);
  em_pool_arena ar = {arena_alloc, arena_free, arena_destroy, a};
  /* ordinary buffers (the block was full) are cached like any pool's */
  em_pool *p = em__pool_new_arena(EM__MIN(total, (size_t)64 << 20), &ar);
  if (!p) goto nomem;
  *out = p;
  return EM_OK;
nomem:
  if (a) arena_destroy(a);
  why_set(NULL, 0, "em_cuda_pinned_pool: out of memory");
  return EM_ENOMEM;
}

int em_cuda_pool_alloc(em_pool *p, size_t bytes, em_buf **out) {
  if (out) *out = NULL;
  if (!p || !out) {
    why_set(NULL, 0, "em_cuda_pool_alloc: NULL argument");
    return EM_EINVAL;
  }
  em_buf *b = em__buf_alloc(p, bytes);
  if (!b) {
    why_set(NULL, 0, "em_cuda_pool_alloc(%zu bytes): out of memory", bytes);
    return EM_ENOMEM;
  }
  *out = b;
  return EM_OK;
}

void em_cuda_pool_release(em_pool *p) {
  if (p) em__pool_release(p);
}

static cuda_arena *pool_arena(const em_pool *p) {
  const em_pool_arena *ar = p ? em__pool_arena(p) : NULL;
  return ar && ar->alloc == arena_alloc ? ar->ud : NULL;
}

int em_cuda_buf_pinned(const em_buf *b) { return b && b->from_arena && pool_arena(b->pool) ? 1 : 0; }

void em_cuda_pool_get_stats(em_pool *p, em_cuda_pool_stats *out) {
  memset(out, 0, sizeof *out);
  if (!p) return;
  em_pool_counts n;
  em__pool_counts(p, &n);
  out->pinned_allocs = n.arena_allocs;
  out->fallback_allocs = n.fallback_allocs;
  out->pinned_bufs_out = n.arena_bufs_out;
  cuda_arena *a = pool_arena(p);
  if (!a) return;
  pthread_mutex_lock(&a->mu);
  out->pinned_bytes = (uint64_t)a->pages * EM__PAGE;
  out->pinned_used_bytes = a->used;
  out->pinned_peak_bytes = a->peak;
  pthread_mutex_unlock(&a->mu);
}
