/* em_cuda.h: internals of the CUDA layer (cuda.c). The CUDA runtime is
 * dlopen'ed (never linked) and called through the function pointers below,
 * declared with plain C types: no CUDA header is needed to build.
 *
 * The ABI facts used, from the CUDA runtime API (stable since CUDA 4):
 *  - cudaError_t, cudaMemcpyKind and cudaDeviceAttr are C enums (int);
 *    cudaStream_t is a pointer.
 *  - error codes (EM__CU_*): cudaSuccess 0, cudaErrorInvalidValue 1,
 *    cudaErrorMemoryAllocation 2, cudaErrorInsufficientDriver 35,
 *    cudaErrorNoDevice 100, cudaErrorInvalidDevice 101;
 *  - cudaMemcpyKind: cudaMemcpyHostToDevice 1, cudaMemcpyDeviceToHost 2;
 *  - cudaStreamNonBlocking 1, cudaHostAllocPortable 1;
 *  - cudaDeviceAttr: cudaDevAttrMultiProcessorCount 16,
 *    cudaDevAttrComputeCapabilityMajor 75, ...Minor 76;
 *  - versions are 1000 * major + 10 * minor (12020 = 12.2). */
#ifndef EM_CUDA_H
#define EM_CUDA_H

#include "../base/em_base.h"
#include "edgeml_cuda.h"

enum {
  EM__CU_SUCCESS = 0,
  EM__CU_INVALID_VALUE = 1,
  EM__CU_MEMORY_ALLOCATION = 2,
  EM__CU_INSUFFICIENT_DRIVER = 35,
  EM__CU_NO_DEVICE = 100,
  EM__CU_INVALID_DEVICE = 101,
};
enum { EM__CU_H2D = 1, EM__CU_D2H = 2 };
enum { EM__CU_STREAM_NON_BLOCKING = 1, EM__CU_HOST_ALLOC_PORTABLE = 1 };
enum { EM__CU_ATTR_SM_COUNT = 16, EM__CU_ATTR_CC_MAJOR = 75, EM__CU_ATTR_CC_MINOR = 76 };

/* The runtime calls used, one pointer each (dlsym'ed by name: "cuda" +
 * the field name, e.g. cudaGetDeviceCount). */
typedef struct em__cudart {
  int (*GetDeviceCount)(int *count);
  int (*SetDevice)(int device);
  int (*GetDevice)(int *device);
  int (*DriverGetVersion)(int *version);
  int (*RuntimeGetVersion)(int *version);
  const char *(*GetErrorString)(int err);
  const char *(*GetErrorName)(int err);
  int (*GetLastError)(void);
  int (*DeviceGetAttribute)(int *value, int attr, int device);
  int (*Malloc)(void **p, size_t bytes);
  int (*Free)(void *p);
  int (*HostAlloc)(void **p, size_t bytes, unsigned flags);
  int (*FreeHost)(void *p);
  int (*MemcpyAsync)(void *dst, const void *src, size_t bytes, int kind, void *stream);
  int (*StreamCreateWithFlags)(void **stream, unsigned flags);
  int (*StreamDestroy)(void *stream);
  int (*StreamSynchronize)(void *stream);
} em__cudart;

/* A device of a loaded runtime. Ref-counted: the caller's handle, each
 * stream and each pinned pool hold one reference; the last frees it (the
 * library stays loaded: see edgeml_cuda.h). Immutable after open, so any
 * thread may use it. */
struct em_cuda {
  atomic_int refs;
  void *dl; /* dlopen handle, never closed */
  em__cudart rt;
  int device, device_count;
  int runtime_version, driver_version;
  char library[256];
};

struct em_cuda_stream {
  em_cuda *c; /* owned reference */
  void *h;    /* cudaStream_t */
};

em_cuda *em__cuda_retain(em_cuda *c);
void em__cuda_release(em_cuda *c);
/* Record "<what>: <cudaGetErrorName>: <cudaGetErrorString>" as this
 * thread's why (em_cuda_why), clear the runtime's last error, and return
 * EM_ENOMEM for cudaErrorMemoryAllocation, else EM_ECUDA. */
int em__cuda_fail(const em_cuda *c, int cuda_err, const char *what_fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Make c's device current on the calling thread: EM_OK or em__cuda_fail. */
int em__cuda_use(const em_cuda *c);

#endif
