/* em_py.h: shared declarations of the CPython extension edgeml._core, the
 * only C that includes Python.h. */
#ifndef EM_PY_H
#define EM_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <edgeml.h> /* the public header only: the binding is a user of the library */

#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

/* Python objects the codec needs, set once by edgeml._codec at import. */
typedef struct em_py_state {
  PyObject *ndarray_type;  /* numpy.ndarray */
  PyObject *generic_type;  /* numpy.generic */
  PyObject *dtype_wire;    /* fn(dtype) -> str, raises TypeError if unsupported */
  PyObject *as_array;      /* fn(obj) -> ndarray or None (buffer/__array__/dlpack) */
  PyObject *contiguous;    /* fn(ndarray) -> flat contiguous uint8 view */
  PyObject *make_array;    /* fn(buf, offset, dtype_str, shape, scalar) -> array */
  PyObject *dtype_cache;   /* dict: dtype object -> wire str */
  PyObject *exc_for_code;  /* dict: em code name -> exception class */
  PyObject *encode_error;  /* edgeml.EncodeError */
  PyObject *decode_error;  /* edgeml.DecodeError */
} em_py_state;

extern em_py_state em_py;

/* Borrowed Python buffers that must outlive a send. */
typedef struct em_py_keep {
  Py_buffer *views;
  int n, cap;
} em_py_keep;

void em_py_keep_release(em_py_keep *k); /* GIL held */

/* Encode obj as one msgpack value into p; arrays become blobs whose views
 * are added to keep. On failure sets an EncodeError naming the key path and
 * returns -1 (p is then garbage; reset it). GIL held. */
int em_py_encode(em_payload *p, em_py_keep *keep, PyObject *obj, const char *root);

/* Decode a message body into a Python object; arrays view m's frame memory
 * (the message's buffer is retained by the arrays, not copied). If
 * `request_method` is non-NULL the body must be [method, payload]:
 * *request_method receives the method str and the payload is returned.
 * NULL + DecodeError on a bad body. GIL held. */
PyObject *em_py_decode(const em_msg *m, PyObject **request_method);
/* The same; on failure *malformed (may be NULL) is 1 when the body itself
 * is malformed (the reader refused it: the server closes such a
 * connection), 0 when it is well-formed but cannot become Python objects
 * (numpy refused an array, an unhashable key: an error reply). */
PyObject *em_py_decode_ex(const em_msg *m, PyObject **request_method, int *malformed);

/* Raise the exception mapped to an em code with a message. Returns NULL. */
PyObject *em_py_raise(int code, const char *fmt, ...);

extern PyTypeObject em_py_framebuf_type;

/* edgeml._core.Gate (gate.c); em_py_gate_get: its em_gate, or NULL when o
 * is not a Gate. */
extern PyTypeObject em_py_gate_type;

/* Cuda, CudaStream, PinnedBuffer, DeviceBuffer and cuda_device_count
 * (cuda.c) added to the module. 0, or -1 with an exception. */
int em_py_cuda_register(PyObject *module);
/* The pinned pool of a _core.Cuda, or NULL when o is not one. */
em_pool *em_py_cuda_pool(PyObject *o);
em_gate *em_py_gate_get(PyObject *o);

#endif
