/* edgeml_cuda.h: the CUDA layer of libedgeml (included by edgeml.h;
 * include edgeml.h, not this). docs/cuda.md explains it at length.
 *
 * libedgeml is never linked against CUDA: the CUDA runtime (libcudart) is
 * found at run time with dlopen, so the same library runs on machines with
 * and without CUDA, and a program asks em_cuda_open whether it can use a
 * GPU. The runtime is looked for in this order, the first that loads wins:
 *   1. $EDGEML_CUDART, a path (or a name for the loader's search), if set;
 *   2. unless $EDGEML_CUDART_ONLY is set to a non-empty value other than
 *      "0": libcudart.so, libcudart.so.13, libcudart.so.12,
 *      libcudart.so.11 (the loader's search: LD_LIBRARY_PATH, the ld.so
 *      cache, ...).
 * A runtime once loaded stays loaded for the life of the process
 * (unloading libcudart is not safe); each em_cuda_open looks again, so a
 * change of $EDGEML_CUDART counts for the next open.
 *
 * Nothing here uses a CUDA type: device pointers and streams are void *
 * (a cudaStream_t, for kernels and libraries: em_cuda_stream_handle).
 *
 * The conventions of edgeml.h hold: 0 (EM_OK) or a negative EM_* code, and
 * ownership and threads are stated per call. The codes special to CUDA:
 *  - EM_ENODEV: no usable device: no runtime library, no device (or no
 *    driver), no such device, or a driver older than the runtime;
 *  - EM_ECUDA: the CUDA runtime failed a call (its cudaError name and
 *    text are in the why);
 *  - EM_ENOMEM: cudaErrorMemoryAllocation (the device, or pinned host
 *    memory, is full), or the host is out of memory.
 * Every failing call writes why it failed to a per-thread buffer read with
 * em_cuda_why(); em_cuda_open and em_cuda_device_count also write it to
 * the caller's buffer.
 *
 * Threads: an em_cuda handle is shared: every call that takes one may run
 * on any thread, concurrently. Calls that take a handle make its device
 * the calling thread's current CUDA device (cudaSetDevice), as a worker
 * thread that then launches kernels wants. A stream is used by one thread
 * at a time (one worker owns it; it may pass it to another). */
#ifndef EDGEML_CUDA_H
#define EDGEML_CUDA_H

#include "edgeml.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct em_cuda em_cuda;               /* a device of a loaded runtime */
typedef struct em_cuda_stream em_cuda_stream; /* a non-blocking CUDA stream */
typedef struct em_pool em_pool;               /* a pool of em_buf receive buffers */

/* A why buffer of this size holds any message of this layer. */
#define EM_CUDA_WHY_BYTES 512

/* Why the last failing em_cuda_* call on this thread failed, e.g.
 * "cudaMalloc(1048576 bytes): cudaErrorMemoryAllocation: out of memory";
 * "" if none has. Thread-local storage of the library: valid until the
 * next failing em_cuda_* call on the same thread. Never NULL. */
EM_API const char *em_cuda_why(void);

/* -------------------------------------------------------------- runtime */

/* Load the runtime (see the order above) and open device `device` (0 ..
 * count - 1). On success *out is owned by the caller (em_cuda_close).
 * On failure *out is NULL and `why` (may be NULL; cut to why_cap, always
 * NUL-terminated; EM_CUDA_WHY_BYTES fits all) says exactly what is
 * missing:
 *  EM_ENODEV "no CUDA runtime library (tried $EDGEML_CUDART=<path>,
 *            libcudart.so, libcudart.so.13, libcudart.so.12,
 *            libcudart.so.11: <dlerror of the last>)"
 *  EM_ENODEV "CUDA runtime library <path> lacks cudaMalloc (<dlerror>)"
 *  EM_ENODEV "no CUDA device (cudaGetDeviceCount: cudaErrorNoDevice: ...)"
 *            (with "; no CUDA driver is installed" when the driver
 *            version is 0, as on a machine without a GPU driver)
 *  EM_ENODEV "device 3 does not exist (2 devices)"
 *  EM_ENODEV "the driver (CUDA 11.4) is older than the runtime (CUDA 12.2)"
 *            (cudaErrorInsufficientDriver with a driver installed)
 *  EM_ECUDA  "cudaSetDevice(1): cudaErrorDevicesUnavailable: ..." and
 *            other runtime failures, with cudaGetErrorName and String
 *  EM_EINVAL (out is NULL, device < 0), EM_ENOMEM.
 * Blocks while the runtime initialises (can take a second on a GPU).
 * Any thread. */
EM_API int em_cuda_open(em_cuda **out, int device, char *why, size_t why_cap);

/* Drop the caller's handle. Streams and pinned pools made from it keep
 * what they need until they are freed, so they may outlive this call;
 * device memory (em_cuda_malloc) and pinned memory (em_cuda_host_alloc)
 * must be freed before it, with the handle. NULL ok. Any thread. */
EM_API void em_cuda_close(em_cuda *c);

/* The number of CUDA devices; 0 when there is no runtime, no driver, no
 * device or any error (not an error itself: why, may be NULL, then says
 * why, as em_cuda_open would). Loads the runtime as em_cuda_open does.
 * Any thread. */
EM_API int em_cuda_device_count(char *why, size_t why_cap);

typedef struct em_cuda_device_info {
  int device;          /* the id opened */
  int device_count;    /* devices the runtime sees */
  int runtime_version; /* 1000 * major + 10 * minor: 12020 = CUDA 12.2 */
  int driver_version;  /* the same; the newest CUDA the driver supports */
  int cc_major, cc_minor; /* compute capability (cudaDeviceGetAttribute) */
  int multiprocessors;
  char library[256];   /* the file the runtime was loaded from */
} em_cuda_device_info;

/* Fill *out about c's device. EM_OK, or EM_ECUDA (an attribute query
 * failed; the versions and library are filled anyway). Any thread. */
EM_API int em_cuda_info(em_cuda *c, em_cuda_device_info *out);

/* -------------------------------------------------------------- streams */

/* A new non-blocking stream on c's device (cudaStreamNonBlocking: it does
 * not synchronise with the legacy default stream). *out is owned by the
 * caller (em_cuda_stream_free) and holds what it needs of c (c may be
 * closed first). EM_OK, EM_ECUDA, EM_ENOMEM, EM_EINVAL. Any thread. */
EM_API int em_cuda_stream_new(em_cuda *c, em_cuda_stream **out);

/* Wait for the work queued on s, then destroy it. NULL ok. The thread
 * that owns s. */
EM_API void em_cuda_stream_free(em_cuda_stream *s);

/* Wait until every operation queued on s has completed. EM_OK, or
 * EM_ECUDA (an operation failed; why names it). The thread that owns s. */
EM_API int em_cuda_stream_sync(em_cuda_stream *s);

/* The cudaStream_t of s, to pass to kernels and libraries (borrowed; valid
 * until em_cuda_stream_free). */
EM_API void *em_cuda_stream_handle(em_cuda_stream *s);

/* --------------------------------------------------------------- memory */

/* `bytes` (> 0) of device memory on c's device (cudaMalloc). *out is owned
 * by the caller: em_cuda_free with the same c, before em_cuda_close.
 * EM_ENOMEM (the device is full), EM_ECUDA, EM_EINVAL. Any thread. */
EM_API int em_cuda_malloc(em_cuda *c, size_t bytes, void **out);

/* Free device memory from em_cuda_malloc (NULL ok: EM_OK). Waits for the
 * device's work (as cudaFree does). EM_ECUDA when p is not device memory
 * of this runtime (why says so; nothing is freed). Any thread. */
EM_API int em_cuda_free(em_cuda *c, void *p);

/* `bytes` (> 0) of pinned (page-locked, portable) host memory, from which
 * copies are truly asynchronous. Owned by the caller: em_cuda_host_free
 * with the same c, before em_cuda_close. EM_ENOMEM, EM_ECUDA, EM_EINVAL.
 * Pinning is slow (milliseconds per MiB): allocate at start, or use a
 * pinned pool. Any thread. */
EM_API int em_cuda_host_alloc(em_cuda *c, size_t bytes, void **out);
EM_API int em_cuda_host_free(em_cuda *c, void *p); /* NULL ok; EM_ECUDA */

/* Queue a copy of `bytes` on s: host to device, device to host. They
 * return once it is queued (EM_OK), or EM_ECUDA (e.g. a pointer of the
 * wrong kind, out of range: why says so), EM_EINVAL (NULL). Until
 * em_cuda_stream_sync(s) returns, the source must not change and the
 * destination must not be read. Host memory should be pinned (a pinned
 * pool's buffer, em_cuda_host_alloc); from pageable memory the runtime
 * stages the copy and may return only when it is done. The thread that
 * owns s. */
EM_API int em_cuda_copy_h2d_async(em_cuda_stream *s, void *dev_dst, const void *host_src, size_t bytes);
EM_API int em_cuda_copy_d2h_async(em_cuda_stream *s, void *host_dst, const void *dev_src, size_t bytes);

/* ---------------------------------------------------------- pinned pool
 *
 * A pool of receive buffers in pinned memory: ONE pinned allocation of
 * `bytes` (rounded up to 4 KiB) made here, carved into em_buf buffers
 * that behave exactly like the library's other receive buffers: 64-byte
 * aligned, ref-counted (em_buf_retain/em_buf_release, any thread), each
 * keeping the pool alive. A buffer goes back to the pinned block when its
 * last reference is released. When the block cannot hold a request
 * (full, fragmented, or larger than the block), the buffer is made of
 * ordinary memory instead, rather than failing, and counted in
 * fallback_allocs (a sign to make the pool bigger); em_cuda_buf_pinned
 * tells them apart. The pinned block is freed when the pool's owner has
 * released it and the last buffer is released. */

/* Make a pinned pool of `bytes` (> 0) on c. *out is owned by the caller
 * (em_cuda_pool_release); it holds what it needs of c (c may be closed
 * first). EM_ENOMEM (the pinned allocation failed), EM_ECUDA, EM_EINVAL.
 * Any thread. */
EM_API int em_cuda_pinned_pool(em_cuda *c, size_t bytes, em_pool **out);

/* A buffer of at least `bytes` from pool p (any em_pool), refs = 1, owned
 * by the caller (em_buf_release). EM_OK, EM_ENOMEM (no memory at all),
 * EM_EINVAL. Any thread. */
EM_API int em_cuda_pool_alloc(em_pool *p, size_t bytes, em_buf **out);

/* Drop the caller's reference to p; buffers still out keep it alive.
 * NULL ok. Any thread. */
EM_API void em_cuda_pool_release(em_pool *p);

/* 1 when b's memory lies in a pinned pool's block, else 0. Any thread. */
EM_API int em_cuda_buf_pinned(const em_buf *b);

typedef struct em_cuda_pool_stats {
  uint64_t pinned_bytes;       /* the block's usable size; 0: not a pinned pool */
  uint64_t pinned_used_bytes;  /* in buffers now */
  uint64_t pinned_peak_bytes;  /* most ever in buffers at once */
  uint64_t pinned_allocs;      /* buffers carved from the block */
  uint64_t fallback_allocs;    /* buffers of ordinary memory: the block was full */
  uint64_t pinned_bufs_out;    /* pinned buffers not yet released */
} em_cuda_pool_stats;

/* Counters of p (approximate while other threads allocate). Any thread. */
EM_API void em_cuda_pool_get_stats(em_pool *p, em_cuda_pool_stats *out);

#ifdef __cplusplus
}
#endif

#endif /* EDGEML_CUDA_H */
