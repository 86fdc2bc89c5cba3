/* device.c: edgeml._core.DeviceArray, the arrays a GPU inference worker
 * hands a handler (in device memory; torch and cupy take them without a
 * copy through __dlpack__ or __cuda_array_interface__), and
 * em_py_device_view, which reads a handler's device outputs (cupy arrays,
 * torch CUDA tensors, numba arrays) so the worker can copy them back.
 *
 * Nothing here touches the memory or calls CUDA: a DeviceArray is a pointer
 * with a shape, a dtype, a device and an owner that keeps the memory alive;
 * the worker has synchronised the stream the data was produced on before
 * it hands an array out, so a consumer needs no event. See em_device.h and
 * docs/cuda.md "Device arrays in Python". GIL held throughout, except in
 * the DLPack deleter, which takes it (a consumer may free a tensor from any
 * thread). */
#include "em_device.h"

#include <limits.h>

/* ------------------------------------------------------------ dtypes */

static char em__native_order(void) {
  const uint16_t one = 1;
  return *(const uint8_t *)&one ? '<' : '>';
}

/* A numpy typestr ("<f4", "|b1", "=i8", "u2") as the normalised dtype.str
 * (norm: "<f4", "|u1"), its DLPack type and item size. 0, or -1 with a
 * TypeError. */
static int em__dtype_parse(const char *s, char norm[8], DLDataType *dl, size_t *itemsize) {
  const char *p = s;
  char order = 0;
  if (*p == '<' || *p == '>' || *p == '|' || *p == '=') order = *p++;
  char kind = *p ? *p++ : 0;
  char *end = NULL;
  long size = (*p >= '0' && *p <= '9') ? strtol(p, &end, 10) : -1;
  if (size < 0 || !end || *end) goto unsupported;
  uint8_t code;
  switch (kind) {
  case 'b':
    code = kDLBool;
    if (size != 1) goto unsupported;
    break;
  case 'i':
  case 'u':
    code = kind == 'i' ? kDLInt : kDLUInt;
    if (size != 1 && size != 2 && size != 4 && size != 8) goto unsupported;
    break;
  case 'f':
    code = kDLFloat;
    if (size != 2 && size != 4 && size != 8) goto unsupported;
    break;
  case 'c':
    code = kDLComplex;
    if (size != 8 && size != 16) goto unsupported;
    break;
  default:
    goto unsupported;
  }
  const char native = em__native_order();
  if (size > 1) {
    if (order == '=' || order == 0) order = native;
    if (order == '|') goto unsupported;
    if (order != native) {
      PyErr_Format(PyExc_TypeError, "device array dtype %s is not in the host's byte order (%s-endian)", s,
                   native == '<' ? "little" : "big");
      return -1;
    }
  }
  norm[0] = size > 1 ? native : '|'; /* size is at most 16 here */
  norm[1] = kind;
  if (size >= 10) {
    norm[2] = (char)('0' + size / 10);
    norm[3] = (char)('0' + size % 10);
    norm[4] = 0;
  } else {
    norm[2] = (char)('0' + size);
    norm[3] = 0;
  }
  dl->code = code;
  dl->bits = (uint8_t)(size * 8);
  dl->lanes = 1;
  *itemsize = (size_t)size;
  return 0;
unsupported:
  PyErr_Format(PyExc_TypeError,
               "unsupported device array dtype %s (bool, int, uint, float and complex ones are: b1 i1-i8 "
               "u1-u8 f2 f4 f8 c8 c16)",
               s);
  return -1;
}

/* A DLPack type as a normalised dtype.str; 0, or -1 with a TypeError. */
static int em__dtype_from_dl(DLDataType t, char norm[8], size_t *itemsize) {
  static const char kinds[] = {[kDLInt] = 'i', [kDLUInt] = 'u', [kDLFloat] = 'f', [kDLComplex] = 'c', [kDLBool] = 'b'};
  char kind = t.code < sizeof kinds ? kinds[t.code] : 0;
  if (!kind || t.lanes != 1 || t.bits % 8) {
    PyErr_Format(PyExc_TypeError, "unsupported device output dtype (DLPack code %d, %d bits, %d lanes)", (int)t.code,
                 (int)t.bits, (int)t.lanes);
    return -1;
  }
  char s[8];
  snprintf(s, sizeof s, "%c%c%d", em__native_order(), kind, t.bits / 8);
  DLDataType dl;
  return em__dtype_parse(s, norm, &dl, itemsize);
}

/* prod(shape) * itemsize into *nbytes; 0, or -1 with a ValueError (a
 * negative dimension, too many, or an overflow). */
static int em__nbytes(int ndim, const int64_t *shape, size_t itemsize, size_t *nbytes, const char *what) {
  if (ndim < 0 || ndim > EM_ARRAY_MAX_NDIM) {
    PyErr_Format(PyExc_ValueError, "%s has %d dimensions (at most %d)", what, ndim, EM_ARRAY_MAX_NDIM);
    return -1;
  }
  size_t n = itemsize;
  int overflow = 0;
  for (int i = 0; i < ndim; i++) {
    if (shape[i] < 0) {
      PyErr_Format(PyExc_ValueError, "%s has a negative dimension (%lld)", what, (long long)shape[i]);
      return -1;
    }
    if (__builtin_mul_overflow(n, (uint64_t)shape[i], &n)) overflow = 1;
  }
  if (overflow) {
    for (int i = 0; i < ndim; i++)
      if (shape[i] == 0) overflow = 0; /* empty after all */
    if (overflow) {
      PyErr_Format(PyExc_ValueError, "%s is larger than the address space", what);
      return -1;
    }
    n = 0;
  }
  *nbytes = n;
  return 0;
}

/* strides (in units of `unit`: bytes or elements) describe a C-contiguous
 * array: numpy's rule (dimensions of length 1 may have any stride, and an
 * empty array is contiguous). */
static int em__c_contiguous(int ndim, const int64_t *shape, const int64_t *strides, int64_t unit) {
  for (int i = 0; i < ndim; i++)
    if (shape[i] == 0) return 1;
  int64_t expect = unit;
  for (int i = ndim - 1; i >= 0; i--) {
    if (shape[i] != 1 && strides[i] != expect) return 0;
    expect *= shape[i];
  }
  return 1;
}

/* ------------------------------------------------------------ DeviceArray */

typedef struct {
  PyObject_HEAD
  void *ptr;
  size_t nbytes;
  char dtype[8];
  DLDataType dl;
  int ndim;
  int64_t shape[EM_ARRAY_MAX_NDIM];
  int device_type, device_id;
  uintptr_t stream;
  int readonly;
  PyObject *owner;  /* may be NULL */
  Py_buffer view;   /* _wrap's buffer (its obj is the owner), when has_view */
  int has_view;
  PyObject *weakrefs;
} em__devarr;

PyObject *em_py_device_array_new(void *ptr, size_t nbytes, const char *dtype, int ndim, const int64_t *shape,
                                 int device_type, int device_id, PyObject *owner, uintptr_t stream) {
  char norm[8];
  DLDataType dl;
  size_t itemsize, want;
  if (!dtype) {
    PyErr_SetString(PyExc_TypeError, "device array without a dtype");
    return NULL;
  }
  if (em__dtype_parse(dtype, norm, &dl, &itemsize) < 0) return NULL;
  if (ndim > 0 && !shape) {
    PyErr_SetString(PyExc_ValueError, "device array without a shape");
    return NULL;
  }
  if (em__nbytes(ndim, shape, itemsize, &want, "device array") < 0) return NULL;
  if (want != nbytes) {
    PyErr_Format(PyExc_ValueError, "device array of %zu bytes for a shape and dtype %s of %zu bytes (C-contiguous)",
                 nbytes, norm, want);
    return NULL;
  }
  if (device_type != kDLCPU && device_type != kDLCUDA) {
    PyErr_Format(PyExc_ValueError, "device array on device type %d (kDLCPU 1 or kDLCUDA 2)", device_type);
    return NULL;
  }
  if (device_id < 0) {
    PyErr_Format(PyExc_ValueError, "device array on device id %d", device_id);
    return NULL;
  }
  if (!ptr && nbytes) {
    PyErr_SetString(PyExc_ValueError, "device array of a NULL pointer");
    return NULL;
  }
  em__devarr *a = PyObject_GC_New(em__devarr, &em_py_device_array_type);
  if (!a) return NULL;
  a->ptr = ptr;
  a->nbytes = nbytes;
  memcpy(a->dtype, norm, sizeof norm);
  a->dl = dl;
  a->ndim = ndim;
  memset(a->shape, 0, sizeof a->shape);
  for (int i = 0; i < ndim; i++) a->shape[i] = shape[i];
  a->device_type = device_type;
  a->device_id = device_id;
  a->stream = stream;
  a->readonly = 0;
  Py_XINCREF(owner);
  a->owner = owner;
  memset(&a->view, 0, sizeof a->view);
  a->has_view = 0;
  a->weakrefs = NULL;
  PyObject_GC_Track((PyObject *)a);
  return (PyObject *)a;
}

static int em__devarr_traverse(PyObject *self, visitproc visit, void *arg) {
  em__devarr *a = (em__devarr *)self;
  Py_VISIT(a->owner);
  if (a->has_view) Py_VISIT(a->view.obj);
  return 0;
}

static int em__devarr_clear(PyObject *self) {
  em__devarr *a = (em__devarr *)self;
  Py_CLEAR(a->owner);
  if (a->has_view) {
    a->has_view = 0;
    PyBuffer_Release(&a->view);
  }
  return 0;
}

static void em__devarr_dealloc(PyObject *self) {
  em__devarr *a = (em__devarr *)self;
  PyObject_GC_UnTrack(self);
  if (a->weakrefs) PyObject_ClearWeakRefs(self);
  em__devarr_clear(self);
  PyObject_GC_Del(self);
}

static PyObject *em__shape_tuple(int ndim, const int64_t *shape) {
  PyObject *t = PyTuple_New(ndim);
  for (int i = 0; t && i < ndim; i++) {
    PyObject *d = PyLong_FromLongLong((long long)shape[i]);
    if (!d) {
      Py_CLEAR(t);
      break;
    }
    PyTuple_SET_ITEM(t, i, d);
  }
  return t;
}

static PyObject *em__devarr_repr(PyObject *self) {
  em__devarr *a = (em__devarr *)self;
  PyObject *shape = em__shape_tuple(a->ndim, a->shape);
  if (!shape) return NULL;
  PyObject *r = PyUnicode_FromFormat("DeviceArray(shape=%R, dtype='%s', device=(%d, %d), ptr=%p)", shape, a->dtype,
                                     a->device_type, a->device_id, a->ptr);
  Py_DECREF(shape);
  return r;
}

static PyObject *em__devarr_get_shape(PyObject *self, void *c) {
  em__devarr *a = (em__devarr *)self;
  return em__shape_tuple(a->ndim, a->shape);
}
static PyObject *em__devarr_get_dtype(PyObject *self, void *c) {
  return PyUnicode_FromString(((em__devarr *)self)->dtype);
}
static PyObject *em__devarr_get_nbytes(PyObject *self, void *c) {
  return PyLong_FromSize_t(((em__devarr *)self)->nbytes);
}
static PyObject *em__devarr_get_ndim(PyObject *self, void *c) { return PyLong_FromLong(((em__devarr *)self)->ndim); }
static PyObject *em__devarr_get_device(PyObject *self, void *c) {
  em__devarr *a = (em__devarr *)self;
  return Py_BuildValue("(ii)", a->device_type, a->device_id);
}
static PyObject *em__devarr_get_ptr(PyObject *self, void *c) {
  return PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)((em__devarr *)self)->ptr);
}
static PyObject *em__devarr_get_stream(PyObject *self, void *c) {
  return PyLong_FromUnsignedLongLong((unsigned long long)((em__devarr *)self)->stream);
}
static PyObject *em__devarr_get_readonly(PyObject *self, void *c) {
  return PyBool_FromLong(((em__devarr *)self)->readonly);
}

/* CUDA Array Interface version 3; an AttributeError for host arrays, so
 * hasattr() is False and a consumer does not take host memory for device
 * memory. */
static PyObject *em__devarr_get_cai(PyObject *self, void *c) {
  em__devarr *a = (em__devarr *)self;
  if (a->device_type != kDLCUDA) {
    PyErr_Format(PyExc_AttributeError,
                 "a host DeviceArray (device type %d) has no __cuda_array_interface__; use __dlpack__",
                 a->device_type);
    return NULL;
  }
  PyObject *shape = em__shape_tuple(a->ndim, a->shape);
  if (!shape) return NULL;
  /* stream: where the data is ready (the worker synchronised it); 1 names
   * the legacy default stream, as 0 is not allowed */
  unsigned long long stream = a->stream ? (unsigned long long)a->stream : 1ULL;
  PyObject *d = Py_BuildValue("{s:i,s:N,s:s,s:(KO),s:O,s:K}", "version", 3, "shape", shape, "typestr", a->dtype,
                              "data", (unsigned long long)(uintptr_t)a->ptr, a->readonly ? Py_True : Py_False,
                              "strides", Py_None, "stream", stream);
  return d;
}

static PyObject *em__devarr_dlpack_device(PyObject *self, PyObject *unused) {
  em__devarr *a = (em__devarr *)self;
  return Py_BuildValue("(ii)", a->device_type, a->device_id);
}

/* One DLPack export: the managed tensor (either form), the array it keeps
 * alive, and its shape and strides. */
typedef struct {
  DLManagedTensor m;
  DLManagedTensorVersioned v;
  PyObject *arr; /* a strong reference to the DeviceArray */
  int64_t dims[]; /* shape[ndim], strides[ndim] */
} em__export;

static void em__export_free(em__export *e) {
  /* a consumer may delete from any thread, with or without the GIL; at
   * interpreter exit the reference is left (the memory goes with the
   * process) */
#if PY_VERSION_HEX >= 0x030D0000
  int finalizing = Py_IsFinalizing();
#else
  int finalizing = _Py_IsFinalizing();
#endif
  if (Py_IsInitialized() && !finalizing) {
    PyGILState_STATE g = PyGILState_Ensure();
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *exc = PyErr_GetRaisedException();
    Py_XDECREF(e->arr);
    PyErr_SetRaisedException(exc);
#else
    PyObject *et, *ev, *tb;
    PyErr_Fetch(&et, &ev, &tb);
    Py_XDECREF(e->arr);
    PyErr_Restore(et, ev, tb);
#endif
    PyGILState_Release(g);
  }
  free(e);
}

static void em__export_deleter(DLManagedTensor *self) { em__export_free((em__export *)self->manager_ctx); }
static void em__export_deleter_v(DLManagedTensorVersioned *self) {
  em__export_free((em__export *)self->manager_ctx);
}

/* An unconsumed capsule frees its tensor (a consumer renames the capsule
 * "used_dltensor" / "used_dltensor_versioned" and calls the deleter itself). */
static void em__capsule_destructor(PyObject *cap) {
  if (PyCapsule_IsValid(cap, "dltensor")) {
    DLManagedTensor *m = PyCapsule_GetPointer(cap, "dltensor");
    if (m && m->deleter) m->deleter(m);
  } else if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
    DLManagedTensorVersioned *v = PyCapsule_GetPointer(cap, "dltensor_versioned");
    if (v && v->deleter) v->deleter(v);
  }
}

/* __dlpack__(stream=None, *, max_version=None, dl_device=None, copy=None).
 * stream: the consumer's stream (None, -1, 1, 2 or a handle; not 0 for
 * CUDA; None or -1 for host arrays). No event is recorded: the producer has
 * synchronised the stream the data was ready on before handing it out. */
static PyObject *em__devarr_dlpack(PyObject *self, PyObject *args, PyObject *kw) {
  em__devarr *a = (em__devarr *)self;
  static char *kwlist[] = {"stream", "max_version", "dl_device", "copy", NULL};
  PyObject *stream = Py_None, *max_version = Py_None, *dl_device = Py_None, *copy = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "|O$OOO:__dlpack__", kwlist, &stream, &max_version, &dl_device, &copy))
    return NULL;
  if (stream != Py_None) {
    if (!PyLong_Check(stream)) {
      PyErr_Format(PyExc_TypeError, "__dlpack__ stream must be None or an int, not %.100s", Py_TYPE(stream)->tp_name);
      return NULL;
    }
    long long s = PyLong_AsLongLong(stream);
    if (s == -1 && PyErr_Occurred()) {
      PyErr_Clear(); /* a handle above LLONG_MAX */
      s = LLONG_MAX;
    }
    if (a->device_type == kDLCPU && s != -1) {
      PyErr_Format(PyExc_ValueError, "__dlpack__ of a host array takes stream=None, not %R", stream);
      return NULL;
    }
    if (a->device_type == kDLCUDA && (s == 0 || s < -1)) {
      PyErr_Format(PyExc_ValueError, "__dlpack__ stream %R is not a CUDA stream (None, -1, 1, 2 or a handle)", stream);
      return NULL;
    }
  }
  int versioned = 0;
  if (max_version != Py_None) {
    if (!PyTuple_Check(max_version) || PyTuple_GET_SIZE(max_version) != 2) {
      PyErr_SetString(PyExc_TypeError, "__dlpack__ max_version must be None or a (major, minor) tuple");
      return NULL;
    }
    long major = PyLong_AsLong(PyTuple_GET_ITEM(max_version, 0));
    if (major == -1 && PyErr_Occurred()) return NULL;
    versioned = major >= 1;
  }
  if (dl_device != Py_None) {
    int dt, di;
    if (!PyTuple_Check(dl_device) || !PyArg_ParseTuple(dl_device, "ii", &dt, &di)) {
      if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "__dlpack__ dl_device must be None or a (device_type, device_id) tuple");
      }
      return NULL;
    }
    if (dt != a->device_type || di != a->device_id) {
      PyErr_Format(PyExc_BufferError, "DeviceArray on device (%d, %d) cannot be exported to device (%d, %d)",
                   a->device_type, a->device_id, dt, di);
      return NULL;
    }
  }
  if (copy != Py_None) {
    int c = PyObject_IsTrue(copy);
    if (c < 0) return NULL;
    if (c) {
      PyErr_SetString(PyExc_BufferError, "DeviceArray.__dlpack__ cannot copy (copy=True)");
      return NULL;
    }
  }
  em__export *e = malloc(sizeof *e + 2 * (size_t)(a->ndim ? a->ndim : 1) * sizeof(int64_t));
  if (!e) return PyErr_NoMemory();
  int64_t *shape = e->dims, *strides = e->dims + (a->ndim ? a->ndim : 1);
  int64_t st = 1;
  for (int i = a->ndim - 1; i >= 0; i--) {
    shape[i] = a->shape[i];
    strides[i] = st;
    st *= a->shape[i] ? a->shape[i] : 1;
  }
  DLTensor t = {
      .data = a->ptr,
      .device = {.device_type = (DLDeviceType)a->device_type, .device_id = a->device_id},
      .ndim = a->ndim,
      .dtype = a->dl,
      .shape = shape,
      .strides = strides,
      .byte_offset = 0,
  };
  memset(&e->m, 0, sizeof e->m);
  memset(&e->v, 0, sizeof e->v);
  Py_INCREF(self);
  e->arr = self;
  PyObject *cap;
  if (versioned) {
    e->v.version.major = 1;
    e->v.version.minor = 0;
    e->v.manager_ctx = e;
    e->v.deleter = em__export_deleter_v;
    e->v.flags = a->readonly ? DLPACK_FLAG_BITMASK_READ_ONLY : 0;
    e->v.dl_tensor = t;
    cap = PyCapsule_New(&e->v, "dltensor_versioned", em__capsule_destructor);
  } else {
    e->m.dl_tensor = t;
    e->m.manager_ctx = e;
    e->m.deleter = em__export_deleter;
    cap = PyCapsule_New(&e->m, "dltensor", em__capsule_destructor);
  }
  if (!cap) {
    Py_DECREF(self);
    free(e);
    return NULL;
  }
  return cap;
}

/* A shape argument (a sequence of ints) into shape; its length, or -1
 * with an exception. */
static int em__shape_arg(PyObject *shape_obj, int64_t shape[EM_ARRAY_MAX_NDIM]) {
  PyObject *fast = PySequence_Fast(shape_obj, "a device array shape must be a sequence of ints");
  if (!fast) return -1;
  Py_ssize_t nd = PySequence_Fast_GET_SIZE(fast);
  if (nd > EM_ARRAY_MAX_NDIM) {
    Py_DECREF(fast);
    PyErr_Format(PyExc_ValueError, "device array has %zd dimensions (at most %d)", nd, EM_ARRAY_MAX_NDIM);
    return -1;
  }
  for (Py_ssize_t i = 0; i < nd; i++) {
    long long d = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
    if (d == -1 && PyErr_Occurred()) {
      Py_DECREF(fast);
      return -1;
    }
    shape[i] = d;
  }
  Py_DECREF(fast);
  return (int)nd;
}

/* DeviceArray._wrap(obj, dtype, shape, device_type=1, device_id=0,
 * stream=0): a DeviceArray over obj's C-contiguous buffer (for tests; a
 * device_type 2 one is host memory labelled CUDA, for checking
 * __cuda_array_interface__, never for a real consumer). */
static PyObject *em__devarr_wrap(PyObject *unused, PyObject *args, PyObject *kw) {
  static char *kwlist[] = {"obj", "dtype", "shape", "device_type", "device_id", "stream", NULL};
  PyObject *obj, *shape_obj;
  const char *dtype;
  int device_type = kDLCPU, device_id = 0;
  unsigned long long stream = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "OsO|iiK:_wrap", kwlist, &obj, &dtype, &shape_obj, &device_type,
                                   &device_id, &stream))
    return NULL;
  int64_t shape[EM_ARRAY_MAX_NDIM];
  int nd = em__shape_arg(shape_obj, shape);
  if (nd < 0) return NULL;
  Py_buffer view;
  if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS) < 0) return NULL;
  PyObject *r = em_py_device_array_new(view.buf, (size_t)view.len, dtype, nd, shape, device_type, device_id,
                                       NULL, (uintptr_t)stream);
  if (!r) {
    PyBuffer_Release(&view);
    return NULL;
  }
  em__devarr *a = (em__devarr *)r;
  a->view = view; /* its obj (a reference to obj) owns the memory */
  a->has_view = 1;
  a->readonly = view.readonly;
  return r;
}

/* DeviceArray._from_ptr(ptr, dtype, shape, device_type=2, device_id=0,
 * owner=None, stream=0): em_py_device_array_new from Python (tests: a
 * DeviceArray over memory torch or cupy allocated, kept by owner). */
static PyObject *em__devarr_from_ptr(PyObject *unused, PyObject *args, PyObject *kw) {
  static char *kwlist[] = {"ptr", "dtype", "shape", "device_type", "device_id", "owner", "stream", NULL};
  unsigned long long ptr, stream = 0;
  PyObject *shape_obj, *owner = Py_None;
  const char *dtype;
  int device_type = kDLCUDA, device_id = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "KsO|iiOK:_from_ptr", kwlist, &ptr, &dtype, &shape_obj, &device_type,
                                   &device_id, &owner, &stream))
    return NULL;
  int64_t shape[EM_ARRAY_MAX_NDIM];
  int nd = em__shape_arg(shape_obj, shape);
  if (nd < 0) return NULL;
  char norm[8];
  DLDataType dl;
  size_t itemsize, nbytes;
  if (em__dtype_parse(dtype, norm, &dl, &itemsize) < 0 || em__nbytes(nd, shape, itemsize, &nbytes, "device array") < 0)
    return NULL;
  return em_py_device_array_new((void *)(uintptr_t)ptr, nbytes, dtype, nd, shape, device_type, device_id,
                                owner == Py_None ? NULL : owner, (uintptr_t)stream);
}

static PyGetSetDef em__devarr_getset[] = {
    {"shape", em__devarr_get_shape, NULL, "the shape (tuple of int)", NULL},
    {"dtype", em__devarr_get_dtype, NULL, "numpy dtype.str, e.g. '<f4'", NULL},
    {"nbytes", em__devarr_get_nbytes, NULL, "size in bytes", NULL},
    {"ndim", em__devarr_get_ndim, NULL, "number of dimensions", NULL},
    {"device", em__devarr_get_device, NULL, "(device_type, device_id): DLPack's kDLCPU 1 or kDLCUDA 2", NULL},
    {"ptr", em__devarr_get_ptr, NULL, "the data's address (int)", NULL},
    {"stream", em__devarr_get_stream, NULL,
     "the CUDA stream the data was produced on (0 = legacy default), already synchronised", NULL},
    {"readonly", em__devarr_get_readonly, NULL, "whether consumers must not write", NULL},
    {"__cuda_array_interface__", em__devarr_get_cai, NULL,
     "CUDA Array Interface v3 (CUDA arrays only; AttributeError for host ones)", NULL},
    {NULL}};

static PyMethodDef em__devarr_methods[] = {
    {"__dlpack__", (PyCFunction)(void (*)(void))em__devarr_dlpack, METH_VARARGS | METH_KEYWORDS,
     "__dlpack__(stream=None, *, max_version=None, dl_device=None, copy=None): a DLPack capsule, no copy"},
    {"__dlpack_device__", em__devarr_dlpack_device, METH_NOARGS, "(device_type, device_id)"},
    {"_from_ptr", (PyCFunction)(void (*)(void))em__devarr_from_ptr, METH_VARARGS | METH_KEYWORDS | METH_STATIC,
     "_from_ptr(ptr, dtype, shape, device_type=2, device_id=0, owner=None, stream=0): a DeviceArray over ptr "
     "(tests)"},
    {"_wrap", (PyCFunction)(void (*)(void))em__devarr_wrap, METH_VARARGS | METH_KEYWORDS | METH_STATIC,
     "_wrap(obj, dtype, shape, device_type=1, device_id=0, stream=0): a DeviceArray over obj's buffer (tests)"},
    {NULL}};

PyTypeObject em_py_device_array_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "edgeml._core.DeviceArray",
    .tp_basicsize = sizeof(em__devarr),
    .tp_dealloc = em__devarr_dealloc,
    .tp_repr = em__devarr_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "An array in device (or host) memory that edgeml does not copy: take it with torch.from_dlpack, "
              "cupy.from_dlpack / cupy.asarray (__cuda_array_interface__) or numpy.from_dlpack (host ones). "
              "Valid while the handler runs, unless an export keeps it.",
    .tp_traverse = em__devarr_traverse,
    .tp_clear = em__devarr_clear,
    .tp_weaklistoffset = offsetof(em__devarr, weakrefs),
    .tp_methods = em__devarr_methods,
    .tp_getset = em__devarr_getset,
};

/* ------------------------------------------------------------ reading outputs */

void em_py_device_view_release(em_py_device_view_t *v) {
  if (!v) return;
  DLManagedTensor *m = v->managed;
  v->managed = NULL;
  if (m && m->deleter) m->deleter(m);
  Py_CLEAR(v->keep);
}

/* Fill out from an object's __cuda_array_interface__ dict. */
static int em__view_cai(PyObject *o, PyObject *cai, em_py_device_view_t *out) {
  if (!PyDict_Check(cai)) {
    PyErr_Format(PyExc_ValueError, "__cuda_array_interface__ of %.100s is not a dict", Py_TYPE(o)->tp_name);
    return -1;
  }
  PyObject *shape = PyDict_GetItemString(cai, "shape"), *typestr = PyDict_GetItemString(cai, "typestr"),
           *data = PyDict_GetItemString(cai, "data"), *strides = PyDict_GetItemString(cai, "strides"),
           *mask = PyDict_GetItemString(cai, "mask"), *stream = PyDict_GetItemString(cai, "stream");
  if (!shape || !PyTuple_Check(shape) || !typestr || !PyUnicode_Check(typestr) || !data || !PyTuple_Check(data) ||
      PyTuple_GET_SIZE(data) < 1) {
    PyErr_Format(PyExc_ValueError,
                 "__cuda_array_interface__ of %.100s lacks shape (tuple), typestr (str) or data ((ptr, readonly))",
                 Py_TYPE(o)->tp_name);
    return -1;
  }
  if (mask && mask != Py_None) {
    PyErr_SetString(PyExc_TypeError, "masked device outputs are not supported");
    return -1;
  }
  const char *ts = PyUnicode_AsUTF8(typestr);
  if (!ts) return -1;
  DLDataType dl;
  size_t itemsize;
  if (em__dtype_parse(ts, out->dtype, &dl, &itemsize) < 0) return -1;
  Py_ssize_t nd = PyTuple_GET_SIZE(shape);
  if (nd > EM_ARRAY_MAX_NDIM) {
    PyErr_Format(PyExc_ValueError, "device output has %zd dimensions (at most %d)", nd, EM_ARRAY_MAX_NDIM);
    return -1;
  }
  out->ndim = (int)nd;
  for (Py_ssize_t i = 0; i < nd; i++) {
    long long d = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, i));
    if (d == -1 && PyErr_Occurred()) return -1;
    out->shape[i] = d;
  }
  if (em__nbytes(out->ndim, out->shape, itemsize, &out->nbytes, "device output") < 0) return -1;
  if (strides && strides != Py_None) {
    int64_t st[EM_ARRAY_MAX_NDIM];
    if (!PyTuple_Check(strides) || PyTuple_GET_SIZE(strides) != nd) {
      PyErr_SetString(PyExc_ValueError, "__cuda_array_interface__ strides must be None or a tuple of ndim ints");
      return -1;
    }
    for (Py_ssize_t i = 0; i < nd; i++) {
      long long s = PyLong_AsLongLong(PyTuple_GET_ITEM(strides, i));
      if (s == -1 && PyErr_Occurred()) return -1;
      st[i] = s;
    }
    if (!em__c_contiguous(out->ndim, out->shape, st, (int64_t)itemsize)) {
      PyErr_SetString(PyExc_TypeError, "device output must be C-contiguous");
      return -1;
    }
  }
  unsigned long long p = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(data, 0));
  if (p == (unsigned long long)-1 && PyErr_Occurred()) return -1;
  if (!p && out->nbytes) {
    PyErr_SetString(PyExc_ValueError, "device output of a NULL pointer");
    return -1;
  }
  out->ptr = (void *)(uintptr_t)p;
  out->stream = 0;
  if (stream && stream != Py_None) {
    unsigned long long s = PyLong_AsUnsignedLongLong(stream);
    if (s == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    if (!s) {
      PyErr_SetString(PyExc_ValueError, "__cuda_array_interface__ stream 0 is not allowed (1: legacy default)");
      return -1;
    }
    out->stream = (uintptr_t)s;
  }
  out->device_type = kDLCUDA;
  out->device_id = -1;
  PyObject *dev = PyObject_GetAttrString(o, "__dlpack_device__");
  if (!dev) {
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
    PyErr_Clear();
  } else {
    PyObject *r = PyObject_CallNoArgs(dev);
    Py_DECREF(dev);
    if (!r) return -1;
    int dt, di;
    int ok = PyTuple_Check(r) && PyArg_ParseTuple(r, "ii", &dt, &di);
    Py_DECREF(r);
    if (!ok) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "__dlpack_device__ must return (device_type, id)");
      return -1;
    }
    if (dt == kDLCUDA || dt == kDLCUDAHost || dt == kDLCUDAManaged) out->device_type = dt;
    out->device_id = di;
  }
  Py_INCREF(o);
  out->keep = o;
  return 1;
}

/* Fill out from a consumed DLPack export (the view owns it on success). */
static int em__view_dl(DLManagedTensor *m, em_py_device_view_t *out) {
  const DLTensor *t = &m->dl_tensor;
  size_t itemsize;
  if (em__dtype_from_dl(t->dtype, out->dtype, &itemsize) < 0) return -1;
  if (t->ndim < 0 || t->ndim > EM_ARRAY_MAX_NDIM || (t->ndim && !t->shape)) {
    PyErr_Format(PyExc_ValueError, "device output has %d dimensions (at most %d)", (int)t->ndim, EM_ARRAY_MAX_NDIM);
    return -1;
  }
  out->ndim = t->ndim;
  for (int i = 0; i < t->ndim; i++) out->shape[i] = t->shape[i];
  if (em__nbytes(out->ndim, out->shape, itemsize, &out->nbytes, "device output") < 0) return -1;
  if (t->strides && !em__c_contiguous(out->ndim, out->shape, t->strides, 1)) {
    PyErr_SetString(PyExc_TypeError, "device output must be C-contiguous");
    return -1;
  }
  if (!t->data && out->nbytes) {
    PyErr_SetString(PyExc_ValueError, "device output of a NULL pointer");
    return -1;
  }
  out->ptr = (char *)t->data + t->byte_offset;
  out->device_type = t->device.device_type;
  out->device_id = t->device.device_id;
  out->stream = 0; /* the producer ordered it on the consumer's stream */
  return 1;
}

static void em__delete_keep_error(DLManagedTensor *m) {
  if (!m->deleter) return;
#if PY_VERSION_HEX >= 0x030C0000
  PyObject *exc = PyErr_GetRaisedException();
  m->deleter(m);
  PyErr_SetRaisedException(exc);
#else
  PyObject *et, *ev, *tb;
  PyErr_Fetch(&et, &ev, &tb);
  m->deleter(m);
  PyErr_Restore(et, ev, tb);
#endif
}

int em_py_device_view_stream(PyObject *o, uintptr_t consumer_stream, em_py_device_view_t *out) {
  memset(out, 0, sizeof *out);
  /* the common host values, without attribute lookups */
  if (o == Py_None || PyBool_Check(o) || PyLong_CheckExact(o) || PyFloat_CheckExact(o) || PyUnicode_CheckExact(o) ||
      PyBytes_CheckExact(o) || PyDict_CheckExact(o) || PyList_CheckExact(o) || PyTuple_CheckExact(o) ||
      PyByteArray_CheckExact(o) || (em_py.ndarray_type && Py_TYPE(o) == (PyTypeObject *)em_py.ndarray_type) ||
      (em_py.generic_type && PyType_Check(em_py.generic_type) &&
       PyObject_TypeCheck(o, (PyTypeObject *)em_py.generic_type)))
    return 0;
  if (PyObject_TypeCheck(o, &em_py_device_array_type)) {
    em__devarr *a = (em__devarr *)o;
    if (a->device_type != kDLCUDA) return 0;
    out->ptr = a->ptr;
    out->nbytes = a->nbytes;
    memcpy(out->dtype, a->dtype, sizeof out->dtype);
    out->ndim = a->ndim;
    memcpy(out->shape, a->shape, sizeof out->shape);
    out->device_type = a->device_type;
    out->device_id = a->device_id;
    out->stream = a->stream ? a->stream : 1; /* as its __cuda_array_interface__ says */
    Py_INCREF(o);
    out->keep = o;
    return 1;
  }
  PyObject *cai = PyObject_GetAttrString(o, "__cuda_array_interface__");
  if (cai) {
    int r = em__view_cai(o, cai, out);
    Py_DECREF(cai);
    if (r < 0) em_py_device_view_release(out);
    return r;
  }
  if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
  PyErr_Clear();
  PyObject *devf = PyObject_GetAttrString(o, "__dlpack_device__");
  if (!devf) {
    if (!PyErr_ExceptionMatches(PyExc_AttributeError)) return -1;
    PyErr_Clear();
    return 0;
  }
  PyObject *dev = PyObject_CallNoArgs(devf);
  Py_DECREF(devf);
  if (!dev) return -1;
  int dt, di;
  int ok = PyTuple_Check(dev) && PyArg_ParseTuple(dev, "ii", &dt, &di);
  Py_DECREF(dev);
  if (!ok) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "__dlpack_device__ must return (device_type, id)");
    return -1;
  }
  if (dt != kDLCUDA && dt != kDLCUDAManaged) return 0; /* host memory (CPU, pinned): encoded as usual */
  PyObject *meth = PyObject_GetAttrString(o, "__dlpack__");
  if (!meth) return -1;
  PyObject *kw = consumer_stream ? Py_BuildValue("{s:K}", "stream", (unsigned long long)consumer_stream)
                                 : Py_BuildValue("{s:O}", "stream", Py_None);
  PyObject *empty = kw ? PyTuple_New(0) : NULL;
  PyObject *cap = empty ? PyObject_Call(meth, empty, kw) : NULL;
  Py_XDECREF(empty);
  Py_XDECREF(kw);
  Py_DECREF(meth);
  if (!cap) return -1;
  if (!PyCapsule_IsValid(cap, "dltensor")) {
    PyErr_Format(PyExc_TypeError, "__dlpack__ of %.100s did not return an unused \"dltensor\" capsule",
                 Py_TYPE(o)->tp_name);
    Py_DECREF(cap);
    return -1;
  }
  DLManagedTensor *m = PyCapsule_GetPointer(cap, "dltensor");
  if (!m || PyCapsule_SetName(cap, "used_dltensor") < 0) {
    Py_DECREF(cap);
    return -1;
  }
  Py_DECREF(cap); /* renamed: its destructor leaves m to us */
  if (em__view_dl(m, out) < 0) {
    em__delete_keep_error(m);
    return -1;
  }
  out->managed = m;
  Py_INCREF(o);
  out->keep = o;
  return 1;
}

int em_py_device_view(PyObject *o, em_py_device_view_t *out) { return em_py_device_view_stream(o, 0, out); }

/* _core._device_view(obj, stream=0) -> (ptr, dtype, shape, nbytes,
 * device_id, stream) or None: em_py_device_view_stream for tests (the view
 * is released before it returns). */
static PyObject *em__device_view_py(PyObject *mod, PyObject *args, PyObject *kw) {
  static char *kwlist[] = {"obj", "stream", NULL};
  PyObject *o;
  unsigned long long cs = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "O|K:_device_view", kwlist, &o, &cs)) return NULL;
  em_py_device_view_t v;
  int r = em_py_device_view_stream(o, (uintptr_t)cs, &v);
  if (r < 0) return NULL;
  if (r == 0) Py_RETURN_NONE;
  PyObject *shape = em__shape_tuple(v.ndim, v.shape);
  PyObject *t = shape ? Py_BuildValue("(KsNniK)", (unsigned long long)(uintptr_t)v.ptr, v.dtype, shape,
                                      (Py_ssize_t)v.nbytes, v.device_id, (unsigned long long)v.stream)
                      : NULL;
  em_py_device_view_release(&v);
  return t;
}

static PyMethodDef em__device_functions[] = {
    {"_device_view", (PyCFunction)(void (*)(void))em__device_view_py, METH_VARARGS | METH_KEYWORDS,
     "_device_view(obj, stream=0) -> (ptr, dtype, shape, nbytes, device_id, stream) or None (tests)"},
    {NULL}};

int em_py_device_register(PyObject *module) {
  if (PyType_Ready(&em_py_device_array_type) < 0) return -1;
  Py_INCREF(&em_py_device_array_type);
  if (PyModule_AddObject(module, "DeviceArray", (PyObject *)&em_py_device_array_type) < 0) {
    Py_DECREF(&em_py_device_array_type);
    return -1;
  }
  return PyModule_AddFunctions(module, em__device_functions);
}
