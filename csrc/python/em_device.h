/* em_device.h: device arrays for the binding (device.c): the DLPack ABI,
 * edgeml._core.DeviceArray (arrays the GPU worker hands a handler, which
 * torch and cupy take without a copy) and the reader of a handler's device
 * outputs (cupy arrays, torch CUDA tensors, anything with
 * __cuda_array_interface__ or a CUDA __dlpack__). GIL held for all of it. */
#ifndef EM_DEVICE_H
#define EM_DEVICE_H

#include "em_py.h"

#include <stdint.h>

/* ------------------------------------------------------------ DLPack
 * The DLPack ABI (https://dmlc.github.io/dlpack/latest/c_api.html), written
 * out here as the spec lays it down (0.8 for the "dltensor" capsule, 1.0
 * for "dltensor_versioned"), so the binding needs no dlpack.h. When the real
 * dlpack.h came first its definitions (the same layout) are used. */
#if !defined(DLPACK_VERSION) && !defined(DLPACK_MAJOR_VERSION)
typedef enum {
  kDLCPU = 1,
  kDLCUDA = 2,
  kDLCUDAHost = 3,
  kDLOpenCL = 4,
  kDLVulkan = 7,
  kDLMetal = 8,
  kDLVPI = 9,
  kDLROCM = 10,
  kDLROCMHost = 11,
  kDLExtDev = 12,
  kDLCUDAManaged = 13,
  kDLOneAPI = 14,
  kDLWebGPU = 15,
  kDLHexagon = 16,
} DLDeviceType;

typedef struct {
  DLDeviceType device_type;
  int32_t device_id;
} DLDevice;

typedef enum {
  kDLInt = 0U,
  kDLUInt = 1U,
  kDLFloat = 2U,
  kDLOpaqueHandle = 3U,
  kDLBfloat = 4U,
  kDLComplex = 5U,
  kDLBool = 6U,
} DLDataTypeCode;

typedef struct {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
} DLDataType;

typedef struct {
  void *data;       /* data + byte_offset is the first element */
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t *shape;   /* ndim entries */
  int64_t *strides; /* in elements; NULL = C-contiguous */
  uint64_t byte_offset;
} DLTensor;

typedef struct DLManagedTensor {
  DLTensor dl_tensor;
  void *manager_ctx;
  void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

/* DLPack 1.0 ("dltensor_versioned" capsules) */
typedef struct {
  uint32_t major;
  uint32_t minor;
} DLPackVersion;

#define DLPACK_FLAG_BITMASK_READ_ONLY (1UL << 0UL)
#define DLPACK_FLAG_BITMASK_IS_COPIED (1UL << 1UL)

typedef struct DLManagedTensorVersioned {
  DLPackVersion version;
  void *manager_ctx;
  void (*deleter)(struct DLManagedTensorVersioned *self);
  uint64_t flags;
  DLTensor dl_tensor;
} DLManagedTensorVersioned;
#endif

/* ------------------------------------------------------------ DeviceArray
 * edgeml._core.DeviceArray: a C-contiguous array in device (or host) memory
 * it does not own. Its attributes: shape, dtype (numpy dtype.str), nbytes,
 * ndim, device (device_type, device_id), ptr, stream; __dlpack__,
 * __dlpack_device__, and __cuda_array_interface__ (CUDA ones only). */
extern PyTypeObject em_py_device_array_type;

/* A new DeviceArray over ptr (nbytes bytes, C-contiguous, dtype a numpy
 * dtype.str such as "<f4", "|u1", "|b1": kinds b i u f c, little-endian or
 * single-byte; "=" is read as "<"). device_type: kDLCPU (1) or kDLCUDA (2).
 * owner (may be NULL): a new reference is taken and released when the
 * array and every DLPack export of it are gone, so it can own the memory.
 * stream: the CUDA stream the data is ready on (0 = the legacy default
 * stream); the worker has synchronised it before handing the array out.
 * NULL with TypeError (dtype) or ValueError (shape/nbytes disagree, ndim
 * over EM_ARRAY_MAX_NDIM, bad device) on error. */
PyObject *em_py_device_array_new(void *ptr, size_t nbytes, const char *dtype, int ndim, const int64_t *shape,
                                 int device_type, int device_id, PyObject *owner, uintptr_t stream);

/* Readies DeviceArray and adds it, and the module functions of device.c
 * (_device_view), to the module. 0, or -1 with an exception. Called from
 * PyInit__core. */
int em_py_device_register(PyObject *module);

/* ------------------------------------------------------------ reading outputs */
typedef struct em_py_device_view {
  void *ptr;       /* the first element (byte_offset applied) */
  size_t nbytes;   /* prod(shape) * itemsize */
  char dtype[8];   /* numpy dtype.str, e.g. "<f4" */
  int ndim;
  int64_t shape[EM_ARRAY_MAX_NDIM];
  int device_type; /* kDLCUDA or kDLCUDAManaged */
  int device_id;   /* -1 when the object does not say (only __cuda_array_interface__,
                      no __dlpack_device__): the pointer's own device */
  uintptr_t stream; /* __cuda_array_interface__'s stream: the caller must order
                       its copy after it (1 = legacy default, 2 = per-thread
                       default, else a cudaStream_t); 0 = no wait needed (none
                       given, or a DLPack export already ordered on the
                       consumer's stream) */
  /* private */
  PyObject *keep;            /* the object, alive while the view is used */
  DLManagedTensor *managed;  /* a consumed DLPack export, deleted on release */
} em_py_device_view_t;

/* If o is a device array (a CUDA DeviceArray, an object with
 * __cuda_array_interface__, or one whose __dlpack_device__ is CUDA) fill
 * *out and return 1; the caller copies ptr..ptr+nbytes then calls
 * em_py_device_view_release. 0 when o is not a device array (a host
 * object: the caller encodes it as usual; *out is left empty and needs no
 * release). -1 with an exception: TypeError "device output must be
 * C-contiguous", TypeError for an unsupported dtype or a masked array,
 * ValueError for a malformed interface, or what the object raised.
 * consumer_stream is handed to a DLPack producer's __dlpack__(stream=...)
 * (0 = None, the legacy default stream) so the data is ready on it. */
int em_py_device_view_stream(PyObject *o, uintptr_t consumer_stream, em_py_device_view_t *out);
/* The same with consumer_stream 0. */
int em_py_device_view(PyObject *o, em_py_device_view_t *out);
/* Ends a view (deletes a consumed DLPack export, drops the reference);
 * idempotent, and a no-op on a zeroed view. */
void em_py_device_view_release(em_py_device_view_t *v);

#endif
