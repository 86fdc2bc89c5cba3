/* gate.c: edgeml._core.Gate, a role's request rules and config check
 * (edgeml_roles.h "role gates") for the Python servers and clients:
 * EdgeServer and TrainerServer hand theirs to _core.Server, whose handler
 * asks it before decoding a request; EdgeClient and TrainerClient compare
 * their config with the server's HELLO through it. */
#include "em_py.h"

typedef struct {
  PyObject_HEAD
  em_gate *g;
} em__pygate;

em_gate *em_py_gate_get(PyObject *o) {
  return o && PyObject_TypeCheck(o, &em_py_gate_type) ? ((em__pygate *)o)->g : NULL;
}

/* A list of str (or None when none_ok) as a C array; *keys (PyMem) and the
 * strings (borrowed from the list's items, valid while `seq` is) */
static int em__gate_keys(PyObject *seq, const char ***keys, size_t *n, int none_ok, const char *what) {
  *keys = NULL;
  *n = 0;
  if (seq == Py_None && none_ok) return 1; /* none */
  PyObject *fast = PySequence_Fast(seq, what);
  if (!fast) return -1;
  Py_ssize_t len = PySequence_Fast_GET_SIZE(fast);
  const char **k = PyMem_Calloc((size_t)len + 1, sizeof *k);
  if (!k) {
    Py_DECREF(fast);
    PyErr_NoMemory();
    return -1;
  }
  for (Py_ssize_t i = 0; i < len; i++) {
    PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
    if (!PyUnicode_Check(item) || !(k[i] = PyUnicode_AsUTF8(item))) {
      if (!PyErr_Occurred()) PyErr_Format(PyExc_TypeError, "%s must hold str, got %R", what, item);
      PyMem_Free(k);
      Py_DECREF(fast);
      return -1;
    }
  }
  Py_DECREF(fast); /* the strings live in seq's items (lists/tuples the caller keeps) */
  *keys = k;
  *n = (size_t)len;
  return 0;
}

/* Gate(role, first, second, version, has_first, has_second):
 *   "edge":    first = action_keys, second = observation_keys (config order)
 *   "trainer": first = payload_keys or None (any), second = request_types */
static int em__gate_init(PyObject *self, PyObject *args, PyObject *kw) {
  em__pygate *g = (em__pygate *)self;
  static char *kwlist[] = {"role", "first", "second", "version", "has_first", "has_second", NULL};
  const char *role, *version;
  PyObject *first, *second;
  int has_first = 1, has_second = 1;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "sOOs|pp", kwlist, &role, &first, &second, &version, &has_first,
                                   &has_second))
    return -1;
  if (g->g) {
    PyErr_SetString(PyExc_RuntimeError, "Gate.__init__ called twice");
    return -1;
  }
  int trainer = strcmp(role, "trainer") == 0;
  if (!trainer && strcmp(role, "edge") != 0) {
    PyErr_Format(PyExc_ValueError, "no gate for the role %s (edge or trainer)", role);
    return -1;
  }
  const char **a = NULL, **b = NULL;
  size_t na = 0, nb = 0;
  int ra = em__gate_keys(first, &a, &na, trainer, trainer ? "payload_keys" : "action_keys");
  if (ra < 0) return -1;
  if (em__gate_keys(second, &b, &nb, 0, trainer ? "request_types" : "observation_keys") < 0) {
    PyMem_Free(a);
    return -1;
  }
  const char *why = NULL;
  int rc;
  if (trainer) {
    em_trainer_config c;
    em_trainer_config_init(&c);
    c.payload_keys = ra == 1 ? NULL : a;
    c.n_payload_keys = na;
    c.request_types = b;
    c.n_request_types = nb;
    c.version = version;
    rc = em_gate_open_trainer(&g->g, &c, &why);
  } else {
    em_edge_config c;
    em_edge_config_init(&c);
    c.action_keys = a;
    c.n_action_keys = na;
    c.observation_keys = b;
    c.n_observation_keys = nb;
    c.version = version;
    rc = em_gate_open_edge(&g->g, &c, &why);
  }
  PyMem_Free(a);
  PyMem_Free(b);
  if (rc) {
    if (rc == EM_ENOMEM) PyErr_NoMemory();
    else PyErr_Format(PyExc_ValueError, "invalid %s config: %s", role, why ? why : em_strerror(rc));
    return -1;
  }
  em_gate_set_handlers(g->g, has_first, has_second);
  return 0;
}

static void em__gate_dealloc(PyObject *self) {
  em__pygate *g = (em__pygate *)self;
  em_gate_close(g->g);
  g->g = NULL;
  Py_TYPE(self)->tp_free(self);
}

/* compat_diff(hello: bytes) -> str or None: how the config differs from
 * the one in a server's HELLO body (its "info" "compat"), None if it does
 * not. */
static PyObject *em__gate_compat_diff(PyObject *self, PyObject *arg) {
  em__pygate *g = (em__pygate *)self;
  Py_buffer b;
  if (!g->g) return em_py_raise(EM_ECLOSED, "gate is not initialised");
  if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE)) return NULL;
  em_msg *m = NULL;
  int rc = em_msg_from_body(b.buf, (size_t)b.len, &m);
  PyBuffer_Release(&b);
  if (rc) return PyErr_NoMemory();
  em_value hello, info;
  PyObject *out = NULL;
  if (em_msg_value(m, &hello) != EM_OK || hello.type != EM_T_MAP || em_value_get(&hello, "info", &info) != 1) {
    out = Py_NewRef(Py_None); /* no info: nothing to compare */
  } else {
    char text[4096];
    int n = em_gate_compat_diff(g->g, &info, text, sizeof text);
    if (n < 0) out = PyErr_NoMemory();
    else if (n == 0) out = Py_NewRef(Py_None);
    else out = PyUnicode_DecodeUTF8(text, (Py_ssize_t)strlen(text), "replace");
  }
  em_msg_free(m);
  return out;
}

static PyMethodDef em__gate_methods[] = {
    {"compat_diff", em__gate_compat_diff, METH_O,
     "compat_diff(hello_body) -> str | None: how this config differs from the server's"},
    {NULL, NULL, 0, NULL},
};

PyTypeObject em_py_gate_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "edgeml._core.Gate",
    .tp_basicsize = sizeof(em__pygate),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A role's request rules and config check (the C role layer's gate).",
    .tp_new = PyType_GenericNew,
    .tp_init = em__gate_init,
    .tp_dealloc = em__gate_dealloc,
    .tp_methods = em__gate_methods,
};
