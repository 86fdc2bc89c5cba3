/* codec.c: Python objects <-> msgpack bodies with out-of-band arrays. */
#include "em_py.h"

#include <stdarg.h>

em_py_state em_py;

#define EM__PATH_MAX 64

typedef struct {
  em_payload *p;
  em_py_keep *keep;
  const char *root;
  int depth;
  PyObject *path_key[EM__PATH_MAX]; /* borrowed; NULL = index */
  Py_ssize_t path_idx[EM__PATH_MAX];
  bool failed_here; /* the innermost failure already set the error */
} em__enc;

/* ------------------------------------------------------------ errors */

PyObject *em_py_raise(int code, const char *fmt, ...) {
  char msg[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  PyObject *cls = em_py.exc_for_code ? PyDict_GetItemString(em_py.exc_for_code, em_errname(code)) : NULL;
  if (!cls) cls = PyExc_RuntimeError;
  /* the instance carries the core's code and its name (e.code == -3,
   * e.name == "ETIMEDOUT"), so callers can tell apart errors of one class */
  PyObject *exc = PyObject_CallFunction(cls, "s", msg);
  if (!exc) { /* a class that takes other arguments */
    PyErr_Clear();
    PyErr_SetString(PyExc_RuntimeError, msg);
    return NULL;
  }
  PyObject *c = PyLong_FromLong(code), *n = PyUnicode_FromString(em_errname(code));
  if (!c || !n || PyObject_SetAttrString(exc, "code", c) < 0 || PyObject_SetAttrString(exc, "name", n) < 0) {
    PyErr_Clear(); /* a class without settable attributes still raises, without them */
  }
  Py_XDECREF(c);
  Py_XDECREF(n);
  PyErr_SetObject(cls, exc);
  Py_DECREF(exc);
  return NULL;
}

static PyObject *em__path_str(em__enc *e) {
  PyObject *s = PyUnicode_FromString(e->root);
  for (int i = 0; s && i < e->depth && i < EM__PATH_MAX; i++) {
    PyObject *part = e->path_key[i] ? PyUnicode_FromFormat("[%R]", e->path_key[i])
                                    : PyUnicode_FromFormat("[%zd]", e->path_idx[i]);
    if (!part) {
      Py_CLEAR(s);
      break;
    }
    PyObject *n = PyUnicode_Concat(s, part);
    Py_DECREF(part);
    Py_DECREF(s);
    s = n;
  }
  return s;
}

static int em__enc_fail(em__enc *e, PyObject *obj, const char *why) {
  PyObject *path = em__path_str(e);
  if (!path) return -1;
  /* keep a cause raised by a helper (e.g. the dtype check) in the message */
  PyObject *cause = NULL;
  if (PyErr_Occurred()) {
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    cause = v ? PyObject_Str(v) : NULL;
    Py_XDECREF(t);
    Py_XDECREF(v);
    Py_XDECREF(tb);
    PyErr_Clear();
  }
  if (cause)
    PyErr_Format(em_py.encode_error, "cannot encode %U (type %s): %s: %U", path, Py_TYPE(obj)->tp_name, why, cause);
  else
    PyErr_Format(em_py.encode_error, "cannot encode %U (type %s): %s", path, Py_TYPE(obj)->tp_name, why);
  Py_XDECREF(cause);
  Py_DECREF(path);
  return -1;
}

/* ------------------------------------------------------------ encode */

/* A writer call failed (out of memory, or a size the wire cannot hold). */
static int em__enc_put_failed(em__enc *e, PyObject *o, int rc) {
  if (rc == EM_ENOMEM) {
    PyErr_NoMemory();
    return -1;
  }
  return em__enc_fail(e, o, rc == EM_ETOOBIG ? "too large for one message value (4 GiB)" : em_strerror(rc));
}

static inline int em__enc_put(em__enc *e, PyObject *o, int rc) { return rc ? em__enc_put_failed(e, o, rc) : 0; }

static int em__enc_value(em__enc *e, PyObject *o);

static int em__keep_view(em_py_keep *k, Py_buffer *v) {
  if (k->n == k->cap) {
    int cap = k->cap ? k->cap * 2 : 4;
    Py_buffer *nv = PyMem_Realloc(k->views, (size_t)cap * sizeof *nv);
    if (!nv) return -1;
    k->views = nv;
    k->cap = cap;
  }
  k->views[k->n++] = *v;
  return 0;
}

void em_py_keep_release(em_py_keep *k) {
  for (int i = 0; i < k->n; i++) PyBuffer_Release(&k->views[i]);
  k->n = 0;
}

/* ------------------------------------------------------------ numpy fast paths
 *
 * The extension is built without numpy's headers (one build for every
 * numpy); arrays go through Python-level calls (arr.dtype, arr.shape, the
 * buffer protocol, numpy.ndarray(...)), which cost far more than the bytes
 * of a small array. For exact numpy.ndarray objects two shortcuts, both
 * checked once against those calls before they are used (em__np_init):
 *
 *  - encode reads the array object's leading fields (data, nd, dimensions,
 *    descr, flags: numpy's PyArrayObject_fields, the same layout in 1.x and
 *    2.x, which numpy's own PyArray_DATA/NDIM/DIMS/DESCR/FLAGS read) and
 *    takes the wire string and item size from a cache keyed by the dtype
 *    object (filled by the general path);
 *  - decode makes the array with PyArray_NewFromDescr + PyArray_SetBaseObject
 *    from numpy's C-API table (the _ARRAY_API capsule; slots 94 and 282,
 *    unchanged from numpy 1.7 to 2.x, as builds against numpy 2's headers
 *    that run on numpy 1.x rely on).
 *
 * Anything else (subclasses, non-contiguous arrays, dtypes not seen yet, an
 * ABI version other than numpy 1.x's or 2.x's, a failed check) takes the
 * general path, so values, errors and messages are those of the general
 * path. GIL held throughout, which guards the state and the caches. */

typedef struct {
  PyObject_HEAD
  char *data;
  int nd;
  Py_ssize_t *dimensions;
  Py_ssize_t *strides;
  PyObject *base;
  PyObject *descr;
  int flags;
} em__np_fields;

#define EM__NPY_C_CONTIGUOUS 0x0001
#define EM__NPY_ALIGNED 0x0100
#define EM__NPY_WRITEABLE 0x0400
#define EM__NPY_CARRAY (EM__NPY_C_CONTIGUOUS | EM__NPY_ALIGNED | EM__NPY_WRITEABLE)

typedef PyObject *(*em__np_new_fn)(PyTypeObject *, PyObject *, int, const Py_ssize_t *, const Py_ssize_t *,
                                   void *, int, PyObject *);
typedef int (*em__np_setbase_fn)(PyObject *, PyObject *);
typedef unsigned int (*em__np_version_fn)(void);

static struct {
  PyObject *for_type; /* the ndarray type the state below was set up for */
  bool enc;           /* the field layout checked, and no releasebuffer to skip */
  bool dec;           /* the C-API table checked */
  em__np_new_fn new_from_descr;
  em__np_setbase_fn set_base;
} em__np;

#define EM__ENC_DTYPE_SLOTS 32
static struct {
  PyObject *descr; /* strong reference, so the address is never reused */
  uint32_t itemsize;
  char wire[EM_DTYPE_MAX + 1];
} em__enc_dtypes[EM__ENC_DTYPE_SLOTS];
static int em__enc_ndtypes;

/* Checked in Python: the fast decode path's array against the one
 * numpy.ndarray(shape, dtype=, buffer=, offset=) makes, and the fields the
 * fast encode path reads against the attributes. */
static const char em__np_check_src[] =
    "def sig(a, buf):\n"
    "    f = a.flags\n"
    "    return (type(a), a.shape, a.strides, a.dtype, a.dtype.str, a.__array_interface__['data'][0],\n"
    "            f.c_contiguous, f.f_contiguous, f.owndata, f.writeable, f.aligned, a.base is buf)\n"
    "def samples(np):\n"
    "    buf = bytearray(256)\n"
    "    out = []\n"
    "    for shape, dt, off in (((2, 3), '<i2', 8), ((5,), '|u1', 3), ((), '<f8', 16), ((2, 0, 4), '<f4', 0),\n"
    "                           ((4, 2), '>u4', 64), ((3,), '<c16', 1)):\n"
    "        out.append((buf, off, np.dtype(dt), shape, np.ndarray(shape, dtype=np.dtype(dt), buffer=buf,\n"
    "                                                              offset=off)))\n"
    "    return out\n"
    "def layouts(np):\n"
    "    a = np.arange(24, dtype=np.int32).reshape(2, 3, 4)\n"
    "    out = [a, a[:, ::2], a[1], np.zeros(()), np.zeros((0, 3)), np.ones(7, '>f8')]\n"
    "    return [(x, x.ndim, x.shape, x.dtype, x.__array_interface__['data'][0], x.flags.c_contiguous)\n"
    "            for x in out]\n";

static PyObject *em__np_call(PyObject *ns, const char *fn, PyObject *arg1, PyObject *arg2) {
  PyObject *f = PyDict_GetItemString(ns, fn); /* borrowed */
  if (!f) return NULL;
  return arg2 ? PyObject_CallFunctionObjArgs(f, arg1, arg2, NULL) : PyObject_CallOneArg(f, arg1);
}

/* The fast decode path's check: its arrays equal numpy.ndarray(...)'s. */
static bool em__np_check_dec(PyObject *ns, PyObject *np) {
  PyObject *smp = em__np_call(ns, "samples", np, NULL);
  if (!smp || !PyList_Check(smp)) {
    Py_XDECREF(smp);
    return false;
  }
  bool ok = true;
  for (Py_ssize_t i = 0; ok && i < PyList_GET_SIZE(smp); i++) {
    PyObject *buf, *off, *dt, *shape, *slow;
    ok = PyArg_ParseTuple(PyList_GET_ITEM(smp, i), "OOOOO", &buf, &off, &dt, &shape, &slow) && PyTuple_Check(shape) &&
         PyTuple_GET_SIZE(shape) <= EM_ARRAY_MAX_NDIM && PyByteArray_Check(buf);
    if (!ok) break;
    Py_ssize_t dims[EM_ARRAY_MAX_NDIM];
    int nd = (int)PyTuple_GET_SIZE(shape);
    for (int j = 0; j < nd; j++) dims[j] = PyLong_AsSsize_t(PyTuple_GET_ITEM(shape, j));
    Py_ssize_t o = PyLong_AsSsize_t(off);
    if (PyErr_Occurred()) {
      ok = false;
      break;
    }
    Py_INCREF(dt); /* stolen */
    PyObject *fast = em__np.new_from_descr((PyTypeObject *)em__np.for_type, dt, nd, dims, NULL,
                                           PyByteArray_AS_STRING(buf) + o, EM__NPY_CARRAY, NULL);
    if (!fast) {
      ok = false;
      break;
    }
    Py_INCREF(buf); /* stolen */
    if (em__np.set_base(fast, buf) < 0) {
      Py_DECREF(fast);
      ok = false;
      break;
    }
    PyObject *a = em__np_call(ns, "sig", fast, buf), *b = em__np_call(ns, "sig", slow, buf);
    ok = a && b && PyObject_RichCompareBool(a, b, Py_EQ) == 1;
    Py_XDECREF(a);
    Py_XDECREF(b);
    Py_DECREF(fast);
  }
  Py_DECREF(smp);
  return ok;
}

/* The fast encode path's check: the fields it reads agree with ndim, shape,
 * dtype, the data address and the contiguity flag. */
static bool em__np_check_enc(PyObject *ns, PyObject *np) {
  PyBufferProcs *procs = ((PyTypeObject *)em__np.for_type)->tp_as_buffer;
  if (!procs || !procs->bf_getbuffer || procs->bf_releasebuffer) return false;
  PyObject *lay = em__np_call(ns, "layouts", np, NULL);
  if (!lay || !PyList_Check(lay)) {
    Py_XDECREF(lay);
    return false;
  }
  bool ok = true;
  for (Py_ssize_t i = 0; ok && i < PyList_GET_SIZE(lay); i++) {
    PyObject *x, *shape, *dt, *addr;
    int ndim, contig;
    ok = PyArg_ParseTuple(PyList_GET_ITEM(lay, i), "OiOOOp", &x, &ndim, &shape, &dt, &addr, &contig) &&
         Py_TYPE(x) == (PyTypeObject *)em__np.for_type && PyTuple_Check(shape);
    if (!ok) break;
    em__np_fields *f = (em__np_fields *)x;
    ok = f->nd == ndim && PyTuple_GET_SIZE(shape) == ndim && f->descr == dt &&
         (uintptr_t)f->data == (uintptr_t)PyLong_AsVoidPtr(addr) && !!(f->flags & EM__NPY_C_CONTIGUOUS) == contig;
    for (int j = 0; ok && j < ndim; j++) ok = f->dimensions[j] == PyLong_AsSsize_t(PyTuple_GET_ITEM(shape, j));
    if (PyErr_Occurred()) ok = false;
  }
  Py_DECREF(lay);
  return ok;
}

static void em__np_init(void) {
  PyObject *t, *v, *tb;
  PyErr_Fetch(&t, &v, &tb);
  Py_XDECREF(em__np.for_type);
  memset(&em__np, 0, sizeof em__np);
  for (int i = 0; i < em__enc_ndtypes; i++) Py_CLEAR(em__enc_dtypes[i].descr);
  em__enc_ndtypes = 0;
  Py_INCREF(em_py.ndarray_type);
  em__np.for_type = em_py.ndarray_type;
  PyObject *np = PyImport_ImportModule("numpy");
  PyObject *mu = np ? PyImport_ImportModule("numpy._core._multiarray_umath") : NULL;
  if (np && !mu && PyErr_ExceptionMatches(PyExc_ModuleNotFoundError)) { /* numpy 1.x */
    PyErr_Clear();
    mu = PyImport_ImportModule("numpy.core._multiarray_umath");
  }
  PyObject *cap = mu ? PyObject_GetAttrString(mu, "_ARRAY_API") : NULL;
  PyObject *ns = PyDict_New();
  PyObject *dtype_type = np ? PyObject_GetAttrString(np, "dtype") : NULL;
  PyObject *r = ns && PyDict_SetItemString(ns, "__builtins__", PyEval_GetBuiltins()) == 0
                    ? PyRun_String(em__np_check_src, Py_file_input, ns, ns)
                    : NULL;
  if (r && cap && PyCapsule_CheckExact(cap) && dtype_type) {
    void **api = PyCapsule_GetPointer(cap, NULL);
    unsigned int abi = api ? ((em__np_version_fn)api[0])() : 0;
    /* numpy 1.x (ABI 0x01000009) or 2.x (0x02000000); slot 2 is
     * PyArray_Type, slot 3 PyArrayDescr_Type: the table is the one these
     * slot numbers are for */
    if (api && abi >= 0x01000009 && abi <= 0x02000000 && api[2] == (void *)em_py.ndarray_type &&
        api[3] == (void *)dtype_type && sizeof(Py_ssize_t) == sizeof(void *)) {
      em__np.new_from_descr = (em__np_new_fn)api[94];
      em__np.set_base = (em__np_setbase_fn)api[282];
      em__np.dec = em__np.new_from_descr && em__np.set_base && em__np_check_dec(ns, np);
    }
  }
  if (r) em__np.enc = em__np_check_enc(ns, np);
  Py_XDECREF(r);
  Py_XDECREF(dtype_type);
  Py_XDECREF(ns);
  Py_XDECREF(cap);
  Py_XDECREF(mu);
  Py_XDECREF(np);
  PyErr_Clear();
  PyErr_Restore(t, v, tb);
}

static inline void em__np_ready(void) {
  if (em__np.for_type != em_py.ndarray_type) em__np_init();
}

/* After the general path encoded arr (exact ndarray, its own buffer): its
 * dtype object, wire string and item size for the fast path. */
static void em__enc_dtype_remember(PyObject *arr, const char *dts, Py_ssize_t itemsize) {
  if (em__enc_ndtypes >= EM__ENC_DTYPE_SLOTS || strlen(dts) > EM_DTYPE_MAX || itemsize <= 0 ||
      itemsize > UINT32_MAX)
    return;
  PyObject *descr = ((em__np_fields *)arr)->descr;
  for (int i = 0; i < em__enc_ndtypes; i++)
    if (em__enc_dtypes[i].descr == descr) return;
  Py_INCREF(descr);
  em__enc_dtypes[em__enc_ndtypes].descr = descr;
  em__enc_dtypes[em__enc_ndtypes].itemsize = (uint32_t)itemsize;
  strcpy(em__enc_dtypes[em__enc_ndtypes].wire, dts);
  em__enc_ndtypes++;
}

/* 1 done, 0 not applicable (take the general path), -1 error set. */
static int em__enc_array_fast(em__enc *e, PyObject *arr) {
  em__np_fields *f = (em__np_fields *)arr;
  if (!(f->flags & EM__NPY_C_CONTIGUOUS) || f->nd < 0 || f->nd > EM_ARRAY_MAX_NDIM) return 0;
  int i = 0;
  while (i < em__enc_ndtypes && em__enc_dtypes[i].descr != f->descr) i++;
  if (i == em__enc_ndtypes) return 0;
  uint64_t shape[EM_ARRAY_MAX_NDIM];
  uint64_t n = em__enc_dtypes[i].itemsize;
  for (int j = 0; j < f->nd; j++) {
    shape[j] = (uint64_t)f->dimensions[j];
    n *= shape[j]; /* numpy keeps the array's byte size within Py_ssize_t */
  }
  int rc = em_put_ndarray(e->p, em__enc_dtypes[i].wire, (uint32_t)f->nd, shape, f->data, (size_t)n);
  if (rc) return em__enc_fail(e, arr, rc == EM_EINVAL ? "array size disagrees with dtype and shape" : "out of memory");
  /* what PyObject_GetBuffer would keep: a reference to the array (numpy
   * has no releasebuffer, checked in em__np_init) */
  Py_buffer view = {0};
  view.buf = f->data;
  Py_INCREF(arr);
  view.obj = arr;
  view.len = (Py_ssize_t)n;
  view.readonly = 1;
  view.itemsize = (Py_ssize_t)em__enc_dtypes[i].itemsize;
  view.ndim = 1;
  if (em__keep_view(e->keep, &view)) {
    Py_DECREF(arr);
    PyErr_NoMemory();
    return -1;
  }
  return 1;
}

static int em__enc_array_as(em__enc *e, PyObject *arr, int is_scalar, const char *dts);

static int em__enc_array(em__enc *e, PyObject *arr, int is_scalar) {
  if (!is_scalar && Py_TYPE(arr) == (PyTypeObject *)em_py.ndarray_type) {
    em__np_ready();
    if (em__np.enc) {
      int r = em__enc_array_fast(e, arr);
      if (r) return r < 0 ? -1 : 0;
    }
  }
  PyObject *dtype = PyObject_GetAttrString(arr, "dtype");
  if (!dtype) return em__enc_fail(e, arr, "no dtype");
  /* dtype -> wire string; the helper fills em_py.dtype_cache */
  PyObject *wire = PyDict_GetItemWithError(em_py.dtype_cache, dtype);
  if (wire) {
    Py_INCREF(wire);
  } else if (!PyErr_Occurred()) {
    wire = PyObject_CallOneArg(em_py.dtype_wire, dtype);
  }
  if (!wire) {
    Py_DECREF(dtype);
    return em__enc_fail(e, arr, "unsupported array dtype");
  }
  Py_DECREF(dtype);
  const char *dts = PyUnicode_AsUTF8(wire);
  int r = dts ? em__enc_array_as(e, arr, is_scalar, dts) : -1;
  Py_DECREF(wire);
  return r;
}

static int em__enc_array_as(em__enc *e, PyObject *arr, int is_scalar, const char *dts) {
  uint64_t shape[EM_ARRAY_MAX_NDIM];
  uint32_t ndim = 0;
  if (!is_scalar) {
    PyObject *shp = PyObject_GetAttrString(arr, "shape");
    if (!shp || !PyTuple_Check(shp)) {
      Py_XDECREF(shp);
      return em__enc_fail(e, arr, "no shape");
    }
    Py_ssize_t nd = PyTuple_GET_SIZE(shp);
    if (nd > EM_ARRAY_MAX_NDIM) {
      Py_DECREF(shp);
      return em__enc_fail(e, arr, "more than 32 dimensions");
    }
    for (Py_ssize_t i = 0; i < nd; i++) shape[i] = (uint64_t)PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(shp, i));
    ndim = (uint32_t)nd;
    Py_DECREF(shp);
  }
  Py_buffer view;
  if (PyObject_GetBuffer(arr, &view, PyBUF_C_CONTIGUOUS) != 0) {
    /* non-contiguous, or a dtype the buffer protocol lacks (datetime):
     * a flat uint8 view of a contiguous copy */
    PyErr_Clear();
    PyObject *flat = PyObject_CallOneArg(em_py.contiguous, arr);
    if (!flat) return em__enc_fail(e, arr, "cannot make the array contiguous");
    int r = PyObject_GetBuffer(flat, &view, PyBUF_C_CONTIGUOUS);
    Py_DECREF(flat); /* the view holds its own reference */
    if (r) return em__enc_fail(e, arr, "array exposes no buffer");
  }
  int rc = is_scalar ? em_put_scalar(e->p, dts, view.buf, (size_t)view.len)
                     : em_put_ndarray(e->p, dts, ndim, shape, view.buf, (size_t)view.len);
  if (rc) {
    PyBuffer_Release(&view);
    return em__enc_fail(e, arr, rc == EM_EINVAL ? "array size disagrees with dtype and shape" : "out of memory");
  }
  if (!is_scalar && view.obj == arr && Py_TYPE(arr) == (PyTypeObject *)em_py.ndarray_type && em__np.enc) {
    /* the array's own buffer: its dtype can take the fast path next time */
    uint64_t count = 1;
    for (uint32_t i = 0; i < ndim; i++) count *= shape[i];
    if (count && view.itemsize > 0 && (uint64_t)view.len == count * (uint64_t)view.itemsize)
      em__enc_dtype_remember(arr, dts, view.itemsize);
  }
  if (em__keep_view(e->keep, &view)) {
    PyBuffer_Release(&view);
    PyErr_NoMemory();
    return -1;
  }
  return 0;
}

static int em__enc_seq(em__enc *e, PyObject *seq, int tag) {
  /* seq is a list or tuple */
  Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject **items = PySequence_Fast_ITEMS(seq);
  if ((uint64_t)n + (tag ? 1 : 0) > UINT32_MAX) return em__enc_fail(e, seq, "too long");
  if (e->depth > EM_READER_DEPTH - 2) return em__enc_fail(e, seq, "nested deeper than 30 levels");
  int rc = tag == EM_EXT_TUPLE_TAG ? em_put_tuple(e->p, (uint32_t)n)
           : tag == EM_EXT_SET_TAG ? em_put_set(e->p, (uint32_t)n)
                                   : em_put_list(e->p, (uint32_t)n);
  if (rc) return em__enc_put_failed(e, seq, rc);
  for (Py_ssize_t i = 0; i < n; i++) {
    e->path_key[e->depth] = NULL;
    e->path_idx[e->depth] = i;
    e->depth++;
    int r = em__enc_value(e, items[i]);
    e->depth--;
    if (r) return -1;
  }
  return 0;
}

static int em__enc_dict_items(em__enc *e, PyObject *owner, PyObject *d) {
  Py_ssize_t n = PyDict_GET_SIZE(d);
  if ((uint64_t)n > UINT32_MAX) return em__enc_fail(e, owner, "too many keys");
  if (e->depth > EM_READER_DEPTH - 2) return em__enc_fail(e, owner, "nested deeper than 30 levels");
  int rc = em_put_map(e->p, (uint32_t)n);
  if (rc) return em__enc_put_failed(e, owner, rc);
  Py_ssize_t pos = 0;
  PyObject *k, *v;
  while (PyDict_Next(d, &pos, &k, &v)) {
    if (PyUnicode_CheckExact(k)) {
      Py_ssize_t kl;
      const char *ks = PyUnicode_AsUTF8AndSize(k, &kl);
      if (!ks) return -1;
      if ((rc = em_put_str(e->p, ks, (size_t)kl))) return em__enc_put_failed(e, k, rc);
    } else if (PyUnicode_Check(k) || PyLong_Check(k) || PyFloat_Check(k) || PyBytes_Check(k) ||
               k == Py_None || PyTuple_Check(k)) {
      if (em__enc_value(e, k)) return -1;
    } else {
      e->path_key[e->depth] = k;
      e->depth++;
      int r = em__enc_fail(e, k, "dict key of an unsupported type (use str, int, float, bytes, tuple)");
      e->depth--;
      return r;
    }
    e->path_key[e->depth] = k;
    e->depth++;
    int r = em__enc_value(e, v);
    e->depth--;
    if (r) return -1;
  }
  return 0;
}

static int em__enc_int(em__enc *e, PyObject *o) {
  int overflow = 0;
  long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
  if (overflow > 0) {
    unsigned long long u = PyLong_AsUnsignedLongLong(o);
    if (u == (unsigned long long)-1 && PyErr_Occurred()) {
      PyErr_Clear();
      return em__enc_fail(e, o, "integer outside the 64-bit range");
    }
    return em__enc_put(e, o, em_put_uint(e->p, u));
  }
  if (overflow < 0) return em__enc_fail(e, o, "integer outside the 64-bit range");
  if (v == -1 && PyErr_Occurred()) return -1;
  return em__enc_put(e, o, em_put_int(e->p, v));
}

static int em__enc_value(em__enc *e, PyObject *o) {
  PyTypeObject *t = Py_TYPE(o);
  if (t == &PyUnicode_Type) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(o, &n);
    if (!s) return em__enc_fail(e, o, "string is not valid unicode");
    return em__enc_put(e, o, em_put_str(e->p, s, (size_t)n));
  }
  if (o == Py_None) return em__enc_put(e, o, em_put_nil(e->p));
  if (o == Py_True) return em__enc_put(e, o, em_put_bool(e->p, 1));
  if (o == Py_False) return em__enc_put(e, o, em_put_bool(e->p, 0));
  if (t == &PyLong_Type) return em__enc_int(e, o);
  if (t == &PyFloat_Type) return em__enc_put(e, o, em_put_double(e->p, PyFloat_AS_DOUBLE(o)));
  if (t == &PyDict_Type) return em__enc_dict_items(e, o, o);
  if (t == &PyList_Type) return em__enc_seq(e, o, 0);
  if (t == &PyTuple_Type) return em__enc_seq(e, o, EM_EXT_TUPLE_TAG);
  if (t == &PyBytes_Type)
    return em__enc_put(e, o, em_put_bin(e->p, PyBytes_AS_STRING(o), (size_t)PyBytes_GET_SIZE(o)));
  if (em_py.ndarray_type && PyObject_TypeCheck(o, (PyTypeObject *)em_py.ndarray_type)) return em__enc_array(e, o, 0);
  /* subclasses and the rest */
  if (em_py.generic_type && PyObject_TypeCheck(o, (PyTypeObject *)em_py.generic_type)) return em__enc_array(e, o, 1);
  if (PyBool_Check(o)) return em__enc_put(e, o, em_put_bool(e->p, o == Py_True));
  if (PyLong_Check(o)) return em__enc_int(e, o);
  if (PyFloat_Check(o)) return em__enc_put(e, o, em_put_double(e->p, PyFloat_AsDouble(o)));
  if (PyUnicode_Check(o)) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(o, &n);
    if (!s) return em__enc_fail(e, o, "string is not valid unicode");
    return em__enc_put(e, o, em_put_str(e->p, s, (size_t)n));
  }
  if (PyDict_Check(o)) return em__enc_dict_items(e, o, o);
  if (PyList_Check(o)) return em__enc_seq(e, o, 0);
  if (PyTuple_Check(o)) return em__enc_seq(e, o, EM_EXT_TUPLE_TAG);
  if (PyBytes_Check(o))
    return em__enc_put(e, o, em_put_bin(e->p, PyBytes_AS_STRING(o), (size_t)PyBytes_GET_SIZE(o)));
  if (PyByteArray_Check(o))
    return em__enc_put(e, o, em_put_bin(e->p, PyByteArray_AS_STRING(o), (size_t)PyByteArray_GET_SIZE(o)));
  if (PyAnySet_Check(o)) {
    PyObject *l = PySequence_List(o);
    if (!l) return -1;
    int r = em__enc_seq(e, l, EM_EXT_SET_TAG);
    Py_DECREF(l);
    return r;
  }
  if (PyMemoryView_Check(o)) {
    PyObject *b = PyBytes_FromObject(o);
    if (!b) return em__enc_fail(e, o, "memoryview cannot be read");
    int r = em__enc_put(e, o, em_put_bin(e->p, PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b)));
    Py_DECREF(b);
    return r;
  }
  /* Mappings (flax FrozenDict, MappingProxy, ...) travel as dicts. */
  if (PyMapping_Check(o) && PyObject_HasAttrString(o, "items") && PyObject_HasAttrString(o, "keys")) {
    PyObject *d = PyDict_New();
    if (!d) return -1;
    if (PyDict_Update(d, o) != 0 && PyDict_MergeFromSeq2(d, o, 1) != 0) {
      Py_DECREF(d);
      return em__enc_fail(e, o, "mapping cannot be iterated");
    }
    int r = em__enc_dict_items(e, o, d);
    Py_DECREF(d);
    return r;
  }
  /* torch tensors, jax arrays, anything with __array__/__dlpack__/buffer */
  PyObject *arr = PyObject_CallOneArg(em_py.as_array, o);
  if (!arr) return em__enc_fail(e, o, "conversion to an array failed");
  if (arr != Py_None) {
    int r = em__enc_array(e, arr, 0);
    Py_DECREF(arr);
    return r;
  }
  Py_DECREF(arr);
  return em__enc_fail(e, o, "not a type edgeml can send (dicts, lists, tuples, sets, str, bytes, "
                            "int, float, bool, None and arrays are)");
}

int em_py_encode(em_payload *p, em_py_keep *keep, PyObject *obj, const char *root) {
  em__enc e;
  e.p = p;
  e.keep = keep;
  e.root = root;
  e.depth = 0;
  if (Py_EnterRecursiveCall(" while encoding an edgeml payload")) return -1;
  int r = em__enc_value(&e, obj);
  Py_LeaveRecursiveCall();
  return r ? -1 : 0;
}

/* ------------------------------------------------------------ decode */

typedef struct {
  const em_msg *m;
  PyObject *bufobj; /* FrameBuffer, made on the first array */
  em_reader r;
  em_array arr; /* the last array read */
} em__dec;

typedef struct {
  PyObject_HEAD
  em_buf *buf;
  Py_ssize_t len;
  int exports;
} em__framebuf;

static int em__framebuf_getbuffer(PyObject *self, Py_buffer *view, int flags) {
  em__framebuf *f = (em__framebuf *)self;
  return PyBuffer_FillInfo(view, self, em_buf_data(f->buf), f->len, 0, flags);
}

static void em__framebuf_dealloc(PyObject *self) {
  em__framebuf *f = (em__framebuf *)self;
  em_buf_release(f->buf); /* back to the pool, reused by the next frame */
  Py_TYPE(self)->tp_free(self);
}

static PyBufferProcs em__framebuf_as_buffer = {em__framebuf_getbuffer, NULL};

PyTypeObject em_py_framebuf_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "edgeml._core.FrameBuffer",
    .tp_basicsize = sizeof(em__framebuf),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Memory of one received frame; arrays decoded from it view it.",
    .tp_dealloc = em__framebuf_dealloc,
    .tp_as_buffer = &em__framebuf_as_buffer,
};

static PyObject *em__dec_fail(const char *why) {
  if (!PyErr_Occurred()) PyErr_Format(em_py.decode_error, "cannot decode the message body: %s", why);
  return NULL;
}

/* A DecodeError for what the peer sent, in place of the pending exception
 * `kind` (e.g. UnicodeDecodeError), which becomes its __cause__. Any other
 * pending exception (MemoryError) is left as it is. */
static PyObject *em__dec_fail_from(PyObject *kind, const char *why) {
  if (!PyErr_ExceptionMatches(kind)) return NULL;
  PyObject *t, *v, *tb;
  PyErr_Fetch(&t, &v, &tb);
  PyErr_NormalizeException(&t, &v, &tb);
  PyErr_Format(em_py.decode_error, "cannot decode the message body: %s", why);
  PyObject *t2, *v2, *tb2;
  PyErr_Fetch(&t2, &v2, &tb2);
  PyErr_NormalizeException(&t2, &v2, &tb2);
  if (v2 && v) {
    Py_INCREF(v);
    PyException_SetCause(v2, v);
    PyException_SetContext(v2, v);
  }
  PyErr_Restore(t2, v2, tb2);
  Py_XDECREF(t);
  Py_XDECREF(v);
  Py_XDECREF(tb);
  return NULL;
}

/* Received arrays are built here with one call to numpy.ndarray(shape,
 * dtype=, buffer=, offset=); the dtype object for a wire string comes from a
 * small cache filled the first time numpy parses that string (in
 * edgeml._codec._make_array). GIL held throughout, which guards the cache. */
#define EM__DTYPE_SLOTS 32
static struct {
  char wire[EM_DTYPE_MAX + 1];
  PyObject *dtype;
  Py_ssize_t itemsize;
} em__dtypes[EM__DTYPE_SLOTS];
static int em__ndtypes;
static PyObject *em__ndarray_kwnames;

static void em__dtype_remember(const char *wire, PyObject *arr) {
  if (em__ndtypes >= EM__DTYPE_SLOTS || strlen(wire) > EM_DTYPE_MAX) return;
  PyObject *dt = PyObject_GetAttrString(arr, "dtype");
  PyObject *isz = dt ? PyObject_GetAttrString(dt, "itemsize") : NULL;
  Py_ssize_t itemsize = isz ? PyLong_AsSsize_t(isz) : -1;
  Py_XDECREF(isz);
  if (!dt || itemsize < 0) {
    Py_XDECREF(dt);
    PyErr_Clear();
    return;
  }
  strcpy(em__dtypes[em__ndtypes].wire, wire);
  em__dtypes[em__ndtypes].dtype = dt;
  em__dtypes[em__ndtypes].itemsize = itemsize;
  em__ndtypes++;
}

static int em__dtype_find(const char *wire) {
  for (int i = 0; i < em__ndtypes; i++)
    if (strcmp(em__dtypes[i].wire, wire) == 0) return i;
  return -1;
}

/* The array straight from numpy's C API (see em__np_init), when the dtype
 * is cached and the array is one the general path would make without a
 * complaint: the item size numpy has for the dtype is the one the reader
 * checked the blob size with (so the blob holds the whole array), and not 0
 * (numpy.ndarray() treats "S0"/"U0" specially). NULL without an exception
 * when not applicable. */
static PyObject *em__make_array_np(PyObject *buf, const em_array *a, Py_ssize_t off, int slot) {
  if (slot < 0 || !em__np.dec || em__dtypes[slot].itemsize <= 0 ||
      (uint64_t)em__dtypes[slot].itemsize != a->itemsize)
    return NULL;
  Py_ssize_t dims[EM_ARRAY_MAX_NDIM];
  for (uint32_t i = 0; i < a->ndim; i++) {
    /* an empty array may have other dimensions of any size; numpy's size
     * checks for those are left to the general path */
    if (a->len_bytes == 0 && a->shape[i] > INT32_MAX) return NULL;
    dims[i] = (Py_ssize_t)a->shape[i];
  }
  PyObject *dt = em__dtypes[slot].dtype;
  Py_INCREF(dt); /* stolen */
  PyObject *r = em__np.new_from_descr((PyTypeObject *)em_py.ndarray_type, dt, (int)a->ndim, dims, NULL,
                                      (char *)em_buf_data(((em__framebuf *)buf)->buf) + off, EM__NPY_CARRAY, NULL);
  if (!r) return NULL;
  Py_INCREF(buf); /* stolen */
  if (em__np.set_base(r, buf) < 0) {
    Py_DECREF(r);
    return NULL;
  }
  if (!a->is_scalar) return r;
  PyObject *empty = PyTuple_New(0);
  PyObject *v = empty ? PyObject_GetItem(r, empty) : NULL;
  Py_XDECREF(empty);
  Py_DECREF(r);
  return v;
}

/* NULL without an exception when the dtype is not cached. */
static PyObject *em__make_array_fast(PyObject *buf, Py_ssize_t off, int slot, PyObject *shape, int scalar) {
  if (slot < 0 || !em_py.ndarray_type) return NULL;
  PyObject *dt = em__dtypes[slot].dtype;
  if (!em__ndarray_kwnames) {
    em__ndarray_kwnames = Py_BuildValue("(sss)", "dtype", "buffer", "offset");
    if (!em__ndarray_kwnames) return NULL;
  }
  PyObject *offset = PyLong_FromSsize_t(off);
  if (!offset) return NULL;
  PyObject *argv[5] = {NULL, shape, dt, buf, offset};
  PyObject *a = PyObject_Vectorcall(em_py.ndarray_type, argv + 1, 1 | PY_VECTORCALL_ARGUMENTS_OFFSET,
                                    em__ndarray_kwnames);
  Py_DECREF(offset);
  if (!a || !scalar) return a;
  PyObject *empty = PyTuple_New(0);
  PyObject *v = empty ? PyObject_GetItem(a, empty) : NULL;
  Py_XDECREF(empty);
  Py_DECREF(a);
  return v;
}

static PyObject *em__dec_array(em__dec *d, const em_value *v) {
  const em_array *ap = &d->arr; /* parsed (and checked) by em_read_array, once */
  (void)v;
  if (!d->bufobj) {
    em__framebuf *f = PyObject_New(em__framebuf, &em_py_framebuf_type);
    if (!f) return NULL;
    f->buf = em_buf_retain(d->m->buf);
    f->len = (Py_ssize_t)d->m->frame_bytes;
    d->bufobj = (PyObject *)f;
  }
  Py_ssize_t off = (Py_ssize_t)((const uint8_t *)ap->data - em_buf_data(d->m->buf));
  int slot = em__dtype_find(ap->dtype);
  PyObject *r = NULL;
  if (slot >= 0 && em_py.ndarray_type) {
    em__np_ready();
    if ((r = em__make_array_np(d->bufobj, ap, off, slot))) return r;
    PyErr_Clear(); /* the general path says what is wrong, as it would have */
  }
  PyObject *shape = PyTuple_New(ap->ndim);
  if (!shape) return NULL;
  for (uint32_t i = 0; i < ap->ndim; i++) {
    PyObject *n = PyLong_FromUnsignedLongLong(ap->shape[i]);
    if (!n) {
      Py_DECREF(shape);
      return NULL;
    }
    PyTuple_SET_ITEM(shape, i, n);
  }
  r = em__make_array_fast(d->bufobj, off, slot, shape, ap->is_scalar);
  if (!r && !PyErr_Occurred()) { /* dtype not seen yet: numpy parses it */
    r = PyObject_CallFunction(em_py.make_array, "OnsOi", d->bufobj, off, ap->dtype, shape, ap->is_scalar);
    if (r && !ap->is_scalar) em__dtype_remember(ap->dtype, r);
  }
  Py_DECREF(shape);
  if (!r && PyErr_ExceptionMatches(PyExc_ValueError)) /* numpy refused the shape or dtype */
    em__dec_fail_from(PyExc_ValueError, "numpy cannot make this array (shape or dtype out of range)");
  return r;
}

/* Short ASCII strings (dict keys, method names) recur in every message: the
 * str objects of the last ones seen, by a hash of their bytes, are reused
 * (str is immutable, and a reused one has its hash computed already, which
 * the dict insert and the route lookup need). GIL held. */
#define EM__STR_SLOTS 128
#define EM__STR_MAX 32
static PyObject *em__strs[EM__STR_SLOTS];

static PyObject *em__dec_str(const char *p, uint32_t n) {
  if (n == 0 || n > EM__STR_MAX) return PyUnicode_DecodeUTF8(p, n, NULL);
  uint32_t h = 2166136261u ^ n;
  for (uint32_t i = 0; i < n; i++) h = (h ^ (uint8_t)p[i]) * 16777619u;
  PyObject **slot = &em__strs[(h ^ (h >> 15)) & (EM__STR_SLOTS - 1)];
  PyObject *c = *slot;
  if (c && PyUnicode_GET_LENGTH(c) == (Py_ssize_t)n && memcmp(PyUnicode_DATA(c), p, n) == 0) {
    Py_INCREF(c);
    return c;
  }
  PyObject *s = PyUnicode_DecodeUTF8(p, n, NULL);
  if (s && PyUnicode_IS_COMPACT_ASCII(s)) { /* its data are the bytes, one per character */
    Py_INCREF(s);
    Py_XSETREF(*slot, s);
  }
  return s;
}

/* The next value of the body and everything inside it, straight from the
 * bytes (one pass: the reader checks each token as it goes). */
static PyObject *em__dec_next(em__dec *d) {
  em_value v;
  if (em_read_array(&d->r, &v, &d->arr) != EM_OK) return em__dec_fail(em_reader_why(&d->r));
  switch (v.type) {
    case EM_T_NIL: Py_RETURN_NONE;
    case EM_T_BOOL: return PyBool_FromLong(v.as.b);
    case EM_T_INT: return PyLong_FromLongLong(v.as.i);
    case EM_T_UINT: return PyLong_FromUnsignedLongLong(v.as.u);
    case EM_T_FLOAT: return PyFloat_FromDouble(v.as.f);
    case EM_T_STR: {
      PyObject *s = em__dec_str(v.as.str, v.len);
      return s ? s : em__dec_fail_from(PyExc_UnicodeDecodeError, "string is not valid UTF-8");
    }
    case EM_T_BIN: return PyBytes_FromStringAndSize((const char *)v.as.bin, v.len);
    case EM_T_LIST:
    case EM_T_TUPLE:
    case EM_T_SET: {
      uint32_t n = v.len;
      PyObject *seq = v.type == EM_T_TUPLE ? PyTuple_New(n) : PyList_New(n);
      if (!seq) return NULL;
      for (uint32_t i = 0; i < n; i++) {
        PyObject *e = em__dec_next(d);
        if (!e) {
          Py_DECREF(seq);
          return NULL;
        }
        if (v.type == EM_T_TUPLE) PyTuple_SET_ITEM(seq, i, e);
        else PyList_SET_ITEM(seq, i, e);
      }
      if (v.type == EM_T_SET) {
        PyObject *set = PySet_New(seq);
        Py_DECREF(seq);
        return set ? set : em__dec_fail_from(PyExc_TypeError, "set element is not hashable");
      }
      return seq;
    }
    case EM_T_MAP: {
      PyObject *dict = _PyDict_NewPresized(v.len);
      if (!dict) return NULL;
      for (uint32_t i = 0; i < v.len; i++) {
        PyObject *k = em__dec_next(d);
        PyObject *e = k ? em__dec_next(d) : NULL;
        int r = e ? PyDict_SetItem(dict, k, e) : -1;
        Py_XDECREF(k);
        Py_XDECREF(e);
        if (r) {
          Py_DECREF(dict);
          if (e && PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            return em__dec_fail("map key is not hashable");
          }
          return NULL;
        }
      }
      return dict;
    }
    case EM_T_NDARRAY: return em__dec_array(d, &v);
    default: return em__dec_fail("unknown ext type");
  }
}

PyObject *em_py_decode(const em_msg *m, PyObject **request_method) {
  return em_py_decode_ex(m, request_method, NULL);
}

PyObject *em_py_decode_ex(const em_msg *m, PyObject **request_method, int *malformed) {
  em__dec d;
  d.m = m;
  d.bufobj = NULL;
  em_reader_init(&d.r, m);
  PyObject *r = NULL;
  if (request_method) {
    em_value v;
    *request_method = NULL;
    if (em_read(&d.r, &v) != EM_OK) {
      r = em__dec_fail(em_reader_why(&d.r));
    } else if (v.type != EM_T_LIST || v.len != 2) {
      r = em__dec_fail("a request body must be [method, payload]");
    } else if (!(*request_method = em__dec_next(&d))) {
      r = NULL;
    } else if (!PyUnicode_Check(*request_method)) {
      Py_CLEAR(*request_method);
      r = em__dec_fail("a request body must be [method, payload]");
    } else {
      r = em__dec_next(&d);
    }
  } else {
    r = em__dec_next(&d);
  }
  if (r && em_reader_finish(&d.r) != EM_OK) {
    Py_CLEAR(r);
    em__dec_fail(em_reader_why(&d.r));
  }
  if (!r && request_method) Py_CLEAR(*request_method);
  if (malformed) *malformed = !r && em_reader_why(&d.r) != NULL; /* the bytes, not what they decode to */
  Py_XDECREF(d.bufobj);
  return r;
}
