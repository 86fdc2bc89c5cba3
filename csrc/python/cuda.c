/* cuda.c: edgeml._core.Cuda, CudaStream and PinnedBuffer: the CUDA layer
 * of the C core (edgeml_cuda.h) for edgeml's GPU inference workers
 * (edgeml/_cuda.py). A Cuda is an opened device with a pinned pool made
 * once; a worker owns a CudaStream, assembles each batch in PinnedBuffers
 * from that pool, copies it to the device once (to_device: a DeviceArray
 * torch and cupy take without a copy) and copies device outputs back
 * through pinned memory (to_host). */
#include "em_device.h"

typedef struct {
  PyObject_HEAD
  em_cuda *c;
  em_pool *pinned; /* made once at open */
  size_t pinned_bytes;
  int device;
} em__pycuda;

typedef struct {
  PyObject_HEAD
  em__pycuda *cuda; /* owned reference */
  em_cuda_stream *s;
} em__pystream;

typedef struct {
  PyObject_HEAD
  em_buf *buf; /* from the pinned pool (or ordinary memory when it was full) */
  Py_ssize_t len;
  int exports;
} em__pypinned;

typedef struct {
  PyObject_HEAD
  em__pycuda *cuda; /* owned reference */
  void *ptr;        /* device memory, freed with the object */
} em__pydevbuf;

static PyTypeObject em__cuda_type, em__stream_type, em__pinned_type, em__devbuf_type;

static PyObject *em__cuda_fail(int rc, const char *what) {
  const char *why = em_cuda_why();
  return em_py_raise(rc, "%s: %s", what, why && why[0] ? why : em_strerror(rc));
}

/* ------------------------------------------------------------ Cuda */

/* Cuda(device=0, pinned_bytes=64 MiB) */
static int em__cuda_init(PyObject *self, PyObject *args, PyObject *kw) {
  em__pycuda *c = (em__pycuda *)self;
  static char *kwlist[] = {"device", "pinned_bytes", NULL};
  int device = 0;
  unsigned long long pinned = 64ull << 20;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "|iK", kwlist, &device, &pinned)) return -1;
  if (c->c) {
    PyErr_SetString(PyExc_RuntimeError, "Cuda.__init__ called twice");
    return -1;
  }
  char why[EM_CUDA_WHY_BYTES];
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = em_cuda_open(&c->c, device, why, sizeof why);
  Py_END_ALLOW_THREADS
  if (rc) {
    em_py_raise(rc, "cannot use CUDA device %d: %s", device, why);
    return -1;
  }
  c->device = device;
  Py_BEGIN_ALLOW_THREADS
  rc = em_cuda_pinned_pool(c->c, (size_t)pinned, &c->pinned);
  Py_END_ALLOW_THREADS
  if (rc) {
    em__cuda_fail(rc, "cannot allocate the pinned pool");
    em_cuda_close(c->c);
    c->c = NULL;
    return -1;
  }
  c->pinned_bytes = (size_t)pinned;
  return 0;
}

static void em__cuda_dealloc(PyObject *self) {
  em__pycuda *c = (em__pycuda *)self;
  if (c->pinned) em_cuda_pool_release(c->pinned);
  if (c->c) em_cuda_close(c->c);
  Py_TYPE(self)->tp_free(self);
}

static PyObject *em__cuda_info(PyObject *self, PyObject *unused) {
  em__pycuda *c = (em__pycuda *)self;
  em_cuda_device_info i;
  memset(&i, 0, sizeof i);
  em_cuda_info(c->c, &i);
  return Py_BuildValue("{sisisisis(ii)sisssK}", "device", i.device, "device_count", i.device_count,
                       "runtime_version", i.runtime_version, "driver_version", i.driver_version,
                       "compute_capability", i.cc_major, i.cc_minor, "multiprocessors", i.multiprocessors,
                       "library", i.library, "pinned_bytes", (unsigned long long)c->pinned_bytes);
}

static PyObject *em__cuda_stream(PyObject *self, PyObject *unused) {
  em__pycuda *c = (em__pycuda *)self;
  em__pystream *s = PyObject_New(em__pystream, &em__stream_type);
  if (!s) return NULL;
  s->s = NULL;
  Py_INCREF(c);
  s->cuda = c;
  int rc = em_cuda_stream_new(c->c, &s->s);
  if (rc) {
    Py_DECREF(s);
    return em__cuda_fail(rc, "cannot create a CUDA stream");
  }
  return (PyObject *)s;
}

/* pinned(nbytes) -> PinnedBuffer (buffer protocol, writable) */
static PyObject *em__cuda_pinned(PyObject *self, PyObject *arg) {
  em__pycuda *c = (em__pycuda *)self;
  Py_ssize_t n = PyLong_AsSsize_t(arg);
  if (n < 0) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "nbytes must be >= 0");
    return NULL;
  }
  em__pypinned *p = PyObject_New(em__pypinned, &em__pinned_type);
  if (!p) return NULL;
  p->buf = NULL;
  p->len = n;
  p->exports = 0;
  int rc = em_cuda_pool_alloc(c->pinned, (size_t)(n ? n : 1), &p->buf);
  if (rc) {
    Py_DECREF(p);
    return rc == EM_ENOMEM ? PyErr_NoMemory() : em__cuda_fail(rc, "cannot allocate pinned memory");
  }
  return (PyObject *)p;
}

static PyObject *em__cuda_pool_stats(PyObject *self, PyObject *unused) {
  em__pycuda *c = (em__pycuda *)self;
  em_cuda_pool_stats ps;
  memset(&ps, 0, sizeof ps);
  em_cuda_pool_get_stats(c->pinned, &ps);
  return Py_BuildValue("{sKsKsKsKsK}", "pinned_bytes", (unsigned long long)ps.pinned_bytes, "pinned_used_bytes",
                       (unsigned long long)ps.pinned_used_bytes, "pinned_peak_bytes",
                       (unsigned long long)ps.pinned_peak_bytes, "pinned_allocs", (unsigned long long)ps.pinned_allocs,
                       "fallback_allocs", (unsigned long long)ps.fallback_allocs);
}

static PyMethodDef em__cuda_methods[] = {
    {"info", em__cuda_info, METH_NOARGS, "the device, the runtime and driver versions, the library"},
    {"stream", em__cuda_stream, METH_NOARGS, "a new non-blocking CUDA stream (one per worker)"},
    {"pinned", em__cuda_pinned, METH_O, "pinned(nbytes) -> PinnedBuffer from the pinned pool"},
    {"pool_stats", em__cuda_pool_stats, METH_NOARGS, "the pinned pool's counters"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject em__cuda_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "edgeml._core.Cuda",
    .tp_basicsize = sizeof(em__pycuda),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A CUDA device opened through the runtime found at run time (dlopen), with a pinned pool.",
    .tp_new = PyType_GenericNew,
    .tp_init = em__cuda_init,
    .tp_dealloc = em__cuda_dealloc,
    .tp_methods = em__cuda_methods,
};

/* ------------------------------------------------------------ PinnedBuffer */

static int em__pinned_getbuffer(PyObject *self, Py_buffer *view, int flags) {
  em__pypinned *p = (em__pypinned *)self;
  int r = PyBuffer_FillInfo(view, self, em_buf_data(p->buf), p->len, 0, flags);
  if (r == 0) p->exports++;
  return r;
}

static void em__pinned_releasebuffer(PyObject *self, Py_buffer *view) { ((em__pypinned *)self)->exports--; }

static void em__pinned_dealloc(PyObject *self) {
  em__pypinned *p = (em__pypinned *)self;
  em_buf_release(p->buf); /* back to the pinned pool */
  Py_TYPE(self)->tp_free(self);
}

static PyObject *em__pinned_is_pinned(PyObject *self, void *closure) {
  return PyBool_FromLong(em_cuda_buf_pinned(((em__pypinned *)self)->buf));
}

static PyBufferProcs em__pinned_as_buffer = {em__pinned_getbuffer, em__pinned_releasebuffer};
static PyGetSetDef em__pinned_getset[] = {
    {"pinned", em__pinned_is_pinned, NULL, "False when the pool was full and ordinary memory was used", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject em__pinned_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "edgeml._core.PinnedBuffer",
    .tp_basicsize = sizeof(em__pypinned),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Page-locked host memory from a Cuda's pinned pool (buffer protocol).",
    .tp_dealloc = em__pinned_dealloc,
    .tp_as_buffer = &em__pinned_as_buffer,
    .tp_getset = em__pinned_getset,
};

/* ------------------------------------------------------------ device memory */

static void em__devbuf_dealloc(PyObject *self) {
  em__pydevbuf *d = (em__pydevbuf *)self;
  if (d->ptr) em_cuda_free(d->cuda->c, d->ptr);
  Py_XDECREF(d->cuda);
  Py_TYPE(self)->tp_free(self);
}

static PyTypeObject em__devbuf_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "edgeml._core.DeviceBuffer",
    .tp_basicsize = sizeof(em__pydevbuf),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Device memory owned by the DeviceArrays that view it.",
    .tp_dealloc = em__devbuf_dealloc,
};

/* ------------------------------------------------------------ CudaStream */

static void em__stream_dealloc(PyObject *self) {
  em__pystream *s = (em__pystream *)self;
  if (s->s) em_cuda_stream_free(s->s);
  Py_XDECREF(s->cuda);
  Py_TYPE(self)->tp_free(self);
}

/* to_device(array) -> DeviceArray: one copy of a C-contiguous host array
 * (best: a view of a PinnedBuffer) into new device memory on this stream;
 * returns when the copy is done (the stream is synchronised). */
static PyObject *em__stream_to_device(PyObject *self, PyObject *arr) {
  em__pystream *s = (em__pystream *)self;
  PyObject *dtype = PyObject_GetAttrString(arr, "dtype");
  PyObject *dstr = dtype ? PyObject_GetAttrString(dtype, "str") : NULL;
  PyObject *shape = PyObject_GetAttrString(arr, "shape");
  Py_XDECREF(dtype);
  if (!dstr || !shape || !PyUnicode_Check(dstr) || !PyTuple_Check(shape)) {
    Py_XDECREF(dstr);
    Py_XDECREF(shape);
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "to_device takes a numpy array");
    return NULL;
  }
  int64_t dims[EM_ARRAY_MAX_NDIM];
  Py_ssize_t nd = PyTuple_GET_SIZE(shape);
  if (nd > EM_ARRAY_MAX_NDIM) {
    Py_DECREF(dstr);
    Py_DECREF(shape);
    PyErr_SetString(PyExc_ValueError, "more than 32 dimensions");
    return NULL;
  }
  for (Py_ssize_t i = 0; i < nd; i++) dims[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, i));
  Py_DECREF(shape);
  Py_buffer view;
  if (PyObject_GetBuffer(arr, &view, PyBUF_C_CONTIGUOUS)) {
    Py_DECREF(dstr);
    return NULL;
  }
  em__pydevbuf *d = PyObject_New(em__pydevbuf, &em__devbuf_type);
  PyObject *out = NULL;
  if (d) {
    d->ptr = NULL;
    Py_INCREF(s->cuda);
    d->cuda = s->cuda;
    int rc;
    size_t n = (size_t)view.len;
    Py_BEGIN_ALLOW_THREADS
    rc = em_cuda_malloc(s->cuda->c, n ? n : 1, &d->ptr);
    if (!rc && n) rc = em_cuda_copy_h2d_async(s->s, d->ptr, view.buf, n);
    if (!rc) rc = em_cuda_stream_sync(s->s);
    Py_END_ALLOW_THREADS
    if (rc) em__cuda_fail(rc, "cannot copy a batch to the device");
    else
      out = em_py_device_array_new(d->ptr, n, PyUnicode_AsUTF8(dstr), (int)nd, dims, 2, s->cuda->device,
                                   (PyObject *)d, (uintptr_t)em_cuda_stream_handle(s->s));
    Py_DECREF(d);
  }
  PyBuffer_Release(&view);
  Py_DECREF(dstr);
  return out;
}

/* to_host(obj) -> (PinnedBuffer, dtype str, shape tuple), or None when obj
 * is not a device array: one copy of a device output back through pinned
 * memory, ordered after the producer's stream; returns when it is done. */
static PyObject *em__stream_to_host(PyObject *self, PyObject *obj) {
  em__pystream *s = (em__pystream *)self;
  em_py_device_view_t v;
  memset(&v, 0, sizeof v);
  int is = em_py_device_view_stream(obj, (uintptr_t)em_cuda_stream_handle(s->s), &v);
  if (is <= 0) {
    if (is < 0) return NULL;
    Py_RETURN_NONE;
  }
  PyObject *nb = PyLong_FromSize_t(v.nbytes);
  PyObject *pin = nb ? em__cuda_pinned((PyObject *)s->cuda, nb) : NULL;
  Py_XDECREF(nb);
  PyObject *out = NULL;
  if (pin) {
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    /* a DLPack producer ordered its work on our stream (we passed it);
     * a __cuda_array_interface__ producer's stream is not waited for (no
     * cross-stream wait in the layer yet): docs/cuda.md */
    if (v.nbytes) rc = em_cuda_copy_d2h_async(s->s, em_buf_data(((em__pypinned *)pin)->buf), v.ptr, v.nbytes);
    if (!rc) rc = em_cuda_stream_sync(s->s);
    Py_END_ALLOW_THREADS
    if (rc) {
      em__cuda_fail(rc, "cannot copy a device output back");
    } else {
      PyObject *shape = PyTuple_New(v.ndim);
      for (int i = 0; shape && i < v.ndim; i++) PyTuple_SET_ITEM(shape, i, PyLong_FromLongLong(v.shape[i]));
      if (shape) out = Py_BuildValue("(OsN)", pin, v.dtype, shape);
    }
    Py_DECREF(pin);
  }
  em_py_device_view_release(&v);
  return out;
}

static PyObject *em__stream_sync(PyObject *self, PyObject *unused) {
  em__pystream *s = (em__pystream *)self;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = em_cuda_stream_sync(s->s);
  Py_END_ALLOW_THREADS
  if (rc) return em__cuda_fail(rc, "cudaStreamSynchronize");
  Py_RETURN_NONE;
}

static PyObject *em__stream_handle(PyObject *self, void *closure) {
  return PyLong_FromVoidPtr(em_cuda_stream_handle(((em__pystream *)self)->s));
}

static PyMethodDef em__stream_methods[] = {
    {"to_device", em__stream_to_device, METH_O, "to_device(array) -> DeviceArray (one copy, synchronised)"},
    {"to_host", em__stream_to_host, METH_O,
     "to_host(obj) -> (PinnedBuffer, dtype, shape) or None (obj is not a device array)"},
    {"sync", em__stream_sync, METH_NOARGS, "wait for the stream's work"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef em__stream_getset[] = {
    {"handle", em__stream_handle, NULL, "the cudaStream_t, as an int (torch.cuda.ExternalStream takes it)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject em__stream_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "edgeml._core.CudaStream",
    .tp_basicsize = sizeof(em__pystream),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A worker's CUDA stream: copies of batches to and from the device.",
    .tp_dealloc = em__stream_dealloc,
    .tp_methods = em__stream_methods,
    .tp_getset = em__stream_getset,
};

/* cuda_device_count() -> (count, why) */
static PyObject *em__cuda_count(PyObject *m, PyObject *unused) {
  char why[EM_CUDA_WHY_BYTES] = "";
  int n;
  Py_BEGIN_ALLOW_THREADS
  n = em_cuda_device_count(why, sizeof why);
  Py_END_ALLOW_THREADS
  return Py_BuildValue("(is)", n, why);
}

static PyMethodDef em__cuda_module_methods[] = {
    {"cuda_device_count", em__cuda_count, METH_NOARGS, "cuda_device_count() -> (count, why none)"},
    {NULL, NULL, 0, NULL},
};

em_pool *em_py_cuda_pool(PyObject *o) {
  return o && PyObject_TypeCheck(o, &em__cuda_type) ? ((em__pycuda *)o)->pinned : NULL;
}

int em_py_cuda_register(PyObject *m) {
  PyTypeObject *types[] = {&em__cuda_type, &em__stream_type, &em__pinned_type, &em__devbuf_type};
  const char *names[] = {"Cuda", "CudaStream", "PinnedBuffer", "DeviceBuffer"};
  for (int i = 0; i < 4; i++) {
    if (PyType_Ready(types[i]) < 0) return -1;
    Py_INCREF(types[i]);
    if (PyModule_AddObject(m, names[i], (PyObject *)types[i]) < 0) {
      Py_DECREF(types[i]);
      return -1;
    }
  }
  return PyModule_AddFunctions(m, em__cuda_module_methods);
}
