/* core.c: the edgeml._core module: Client and Server over libedgeml.
 * Private; the public classes live in edgeml/ (inference.py, ...). */
#include "em_py.h"
#include "em_device.h"

#include <structmember.h>

/* A timeout in seconds from Python as the core takes it: < 0 (the Python
 * layer's None) and +inf are EM_FOREVER, as is anything beyond what a
 * uint64_t of nanoseconds holds; NaN is a ValueError. Returns -1 with the
 * error set. */
static int em__py_timeout(double t, const char *what, uint64_t *out) {
  if (isnan(t)) {
    PyErr_Format(PyExc_ValueError, "%s must be a number of seconds or None, got nan", what);
    return -1;
  }
  if (t < 0 || t * 1e9 >= 1.8e19) *out = EM_FOREVER;
  else *out = (uint64_t)(t * 1e9);
  return 0;
}

/* ================================================================ Client */

typedef struct {
  PyObject_HEAD
  em_client *c;
  /* Threads inside a call with the GIL released, and a client closed while
   * they were: the last of them frees it (so close() never frees memory a
   * call is using). Both GIL-protected. */
  int inflight;
  em_client *dying;
  /* What open was given, to open afresh in a child process after fork(). */
  char *host;
  int port;
  em_client_opts open_opts; /* service and token are copies we own */
  char where[300]; /* "host:port" for messages */
  /* One payload kept between calls so a call does not allocate its buffers;
   * a call made while another thread's call uses it builds its own.
   * spare_busy is read and written with the GIL held. */
  em_payload *spare;
  int spare_busy;
} em__pyclient;

static int em__check_interrupt(void *ud) {
  (void)ud;
  PyGILState_STATE g = PyGILState_Ensure();
  int r = PyErr_CheckSignals(); /* leaves KeyboardInterrupt set on -1 */
  PyGILState_Release(g);
  return r < 0;
}

/* The arguments Client and Subscriber share: (host, port, service=None,
 * connect_timeout=0.0, max_message_bytes=0, token=None). Fills *o (service,
 * token and host point into the argument objects, valid during init; the
 * core copies them) and `where`. */
static int em__dial_args(PyObject *args, PyObject *kw, const char **host, int *port, em_client_opts *o,
                         char *where, size_t where_len) {
  static char *kwlist[] = {"host", "port", "service", "connect_timeout", "max_message_bytes", "token", NULL};
  const char *service = NULL, *token = NULL;
  double connect_timeout = 0;
  unsigned long long max_bytes = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "si|zdKz", kwlist, host, port, &service, &connect_timeout, &max_bytes,
                                   &token))
    return -1;
  if (*port < 0 || *port > 65535) {
    PyErr_Format(PyExc_ValueError, "port must be in 0..65535, got %d", *port);
    return -1;
  }
  snprintf(where, where_len, strchr(*host, ':') ? "[%s]:%d" : "%s:%d", *host, *port);
  memset(o, 0, sizeof *o);
  uint64_t ct = 0;
  if (connect_timeout > 0 && em__py_timeout(connect_timeout, "connect_timeout", &ct)) return -1;
  if (isnan(connect_timeout)) return em__py_timeout(connect_timeout, "connect_timeout", &ct);
  o->connect_timeout_ns = ct;
  o->max_message_bytes = max_bytes;
  o->service = service;
  o->token = token;
  return 0;
}

static char *em__strdup_or_null(const char *s) { return s ? strdup(s) : NULL; }

static void em__client_forget_args(em__pyclient *c) {
  free(c->host);
  free((char *)c->open_opts.service);
  if (c->open_opts.token) {
    memset((char *)c->open_opts.token, 0, strlen(c->open_opts.token));
    free((char *)c->open_opts.token);
  }
  c->host = NULL;
  memset(&c->open_opts, 0, sizeof c->open_opts);
}

/* In a child process after fork(): the inherited connection is the
 * parent's (its replies, its request ids), so leave it to the parent and
 * open a new one with the same arguments. GIL held (a one-off). */
static int em__client_reopen(em__pyclient *c) {
  em_client_close(c->c); /* in the child: closes our copy of the fd only */
  c->c = NULL;
  c->inflight = 0;  /* the parent's threads: they do not exist here */
  c->dying = NULL;  /* the parent's to free */
  if (!c->host) return em_py_raise(EM_ECLOSED, "client for %s is closed", c->where) ? -1 : -1;
  em_client_opts o = c->open_opts;
  char why[300] = "";
  o.errbuf = why;
  o.errbuf_len = sizeof why;
  int rc = em_client_open(&c->c, c->host, (uint16_t)c->port, &o);
  if (rc) {
    if (!PyErr_Occurred())
      em_py_raise(rc, "cannot connect to edgeml server at %s (a new connection for this process after fork): %s",
                  c->where, why[0] ? why : em_strerror(rc));
    return -1;
  }
  return 0;
}

static int em__client_init(PyObject *self, PyObject *args, PyObject *kw) {
  em__pyclient *c = (em__pyclient *)self;
  const char *host;
  int port;
  em_client_opts o;
  if (c->c || c->dying || c->inflight) {
    PyErr_SetString(PyExc_RuntimeError, "Client.__init__ called twice");
    return -1;
  }
  if (em__dial_args(args, kw, &host, &port, &o, c->where, sizeof c->where)) return -1;
  if (!c->spare) c->spare = em_payload_new(); /* NULL: each call builds its own */
  o.check_interrupt = em__check_interrupt;
  char why[300] = "";
  o.errbuf = why;
  o.errbuf_len = sizeof why;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = em_client_open(&c->c, host, (uint16_t)port, &o);
  Py_END_ALLOW_THREADS
  if (rc) {
    if (PyErr_Occurred()) return -1;
    em_py_raise(rc, "cannot connect to edgeml server at %s: %s", c->where, why[0] ? why : em_strerror(rc));
    return -1;
  }
  em__client_forget_args(c);
  c->host = strdup(host);
  c->port = port;
  c->open_opts = o;
  c->open_opts.errbuf = NULL;
  c->open_opts.errbuf_len = 0;
  c->open_opts.service = em__strdup_or_null(o.service);
  c->open_opts.token = em__strdup_or_null(o.token);
  return 0;
}

static void em__client_dealloc(PyObject *self) {
  em__pyclient *c = (em__pyclient *)self;
  em__client_forget_args(c);
  if (c->c) {
    em_client *cc = c->c;
    c->c = NULL;
    Py_BEGIN_ALLOW_THREADS
    em_client_close(cc);
    Py_END_ALLOW_THREADS
  }
  em_payload_free(c->spare);
  c->spare = NULL;
  Py_TYPE(self)->tp_free(self);
}

/* A thread that used the client with the GIL released is back (GIL held):
 * if the client was closed meanwhile and this was the last such thread,
 * free it now. */
static void em__client_leave(em__pyclient *c) {
  if (--c->inflight == 0 && c->dying) {
    em_client *d = c->dying;
    c->dying = NULL;
    Py_BEGIN_ALLOW_THREADS
    em_client_close(d);
    Py_END_ALLOW_THREADS
  }
}

/* Turn an ERROR reply into a dict for edgeml.errors to raise from. */
static PyObject *em__error_reply(em__pyclient *c, em_msg *m) {
  PyObject *body = em_py_decode(m, NULL);
  if (!body) return NULL;
  if (!PyDict_Check(body)) {
    Py_DECREF(body);
    return em_py_raise(EM_EPROTO, "%s sent a malformed error reply", c->where);
  }
  return body;
}

/* (t0..t5), offset_ns, offset_err_ns, synchronized, (stage values) */
static PyObject *em__timing_tuple(const em_call_timing *t) {
  PyObject *ts = PyTuple_New(6), *st = PyTuple_New(EM_STAGE_COUNT);
  if (!ts || !st) goto fail;
  for (int i = 0; i < 6; i++) {
    PyObject *v = PyLong_FromUnsignedLongLong(t->t[i]);
    if (!v) goto fail;
    PyTuple_SET_ITEM(ts, i, v);
  }
  for (int i = 0; i < EM_STAGE_COUNT; i++) {
    PyObject *v = PyLong_FromLongLong(t->stage[i]);
    if (!v) goto fail;
    PyTuple_SET_ITEM(st, i, v);
  }
  return Py_BuildValue("(NLKON)", ts, (long long)t->offset_ns, (unsigned long long)t->offset_err_ns,
                       t->synchronized ? Py_True : Py_False, st);
fail:
  Py_XDECREF(ts);
  Py_XDECREF(st);
  return NULL;
}

/* call(method: str, payload, timeout: float[, type: int[, timed: bool]])
 * -> (ok, value) or, with timed, (ok, value, timing) (see
 * em__timing_tuple). ok=True: value is the reply payload; ok=False: value
 * is the error map. Positional only; the arguments are parsed by hand (the
 * hot path of every call), accepting what PyArg_ParseTuple("s#Od|ip") did. */
static PyObject *em__client_call(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
  em__pyclient *c = (em__pyclient *)self;
  const char *method;
  Py_ssize_t method_len;
  PyObject *payload;
  double timeout;
  int type = EM_MSG_REQUEST, timed = 0;
  if (nargs < 3 || nargs > 5) {
    PyErr_Format(PyExc_TypeError, "call() takes from 3 to 5 positional arguments (%zd given)", nargs);
    return NULL;
  }
  if (!PyUnicode_Check(args[0])) {
    PyErr_Format(PyExc_TypeError, "interface name must be a str, got %.50s", Py_TYPE(args[0])->tp_name);
    return NULL;
  }
  if (!(method = PyUnicode_AsUTF8AndSize(args[0], &method_len))) return NULL;
  payload = args[1];
  timeout = PyFloat_CheckExact(args[2]) ? PyFloat_AS_DOUBLE(args[2]) : PyFloat_AsDouble(args[2]);
  if (timeout == -1.0 && PyErr_Occurred()) return NULL;
  if (nargs > 3) {
    long t = PyLong_AsLong(args[3]);
    if (t == -1 && PyErr_Occurred()) return NULL;
    if (t < INT_MIN || t > INT_MAX) {
      PyErr_SetString(PyExc_OverflowError, "call() argument 4 (type) is out of range");
      return NULL;
    }
    type = (int)t;
  }
  if (nargs > 4 && (timed = PyObject_IsTrue(args[4])) < 0) return NULL;
  if (!c->c) return em_py_raise(EM_ECLOSED, "client for %s is closed", c->where);
  uint64_t tmo;
  if (em__py_timeout(timeout, "timeout", &tmo)) return NULL;
  if (em_client_forked(c->c) && em__client_reopen(c)) return NULL;
  em_payload *pp;
  if (c->spare && !c->spare_busy) {
    pp = c->spare;
    c->spare_busy = 1;
  } else if (!(pp = em_payload_new())) {
    return PyErr_NoMemory();
  }
  em_payload *const p = pp;
  em_py_keep keep = {0};
  PyObject *result = NULL;
  em_client *cc;
  int64_t enc_ns = 0;
  if (type == EM_MSG_REQUEST) {
    uint64_t t_enc = em_mono_ns();
    em_payload_begin_request(p, method, (size_t)method_len);
    if (em_py_encode(p, &keep, payload, "payload") != 0) goto done;
    enc_ns = (int64_t)(em_mono_ns() - t_enc);
  } else {
    em_put_nil(p);
  }
  /* taken only now: encoding may run Python code (__array__, ...) that lets
   * another thread close the client */
  if (!(cc = c->c)) {
    em_py_raise(EM_ECLOSED, "client for %s is closed", c->where);
    goto done;
  }
  em_msg *reply = NULL;
  em_call_timing timing;
  int rc;
  c->inflight++;
  Py_BEGIN_ALLOW_THREADS
  rc = em_client_request_timed(cc, (uint8_t)type, p, tmo, &reply, &timing);
  Py_END_ALLOW_THREADS
  em_py_keep_release(&keep);
  if (rc == EM_OK || rc == EM_EREMOTE) {
    uint64_t t_dec = em_mono_ns();
    PyObject *v = rc == EM_OK ? em_py_decode(reply, NULL) : em__error_reply(c, reply);
    if (v && type == EM_MSG_REQUEST) {
      timing.stage[EM_STAGE_ENCODE] = enc_ns;
      timing.stage[EM_STAGE_DECODE] = (int64_t)(em_mono_ns() - t_dec);
      em_client_note(cc, EM_STAGE_ENCODE, enc_ns);
      em_client_note(cc, EM_STAGE_DECODE, timing.stage[EM_STAGE_DECODE]);
    }
    if (v && timed) {
      PyObject *t = em__timing_tuple(&timing);
      result = t ? PyTuple_Pack(3, rc == EM_OK ? Py_True : Py_False, v, t) : NULL;
      Py_XDECREF(t);
      Py_DECREF(v);
    } else if (v) {
      result = PyTuple_Pack(2, rc == EM_OK ? Py_True : Py_False, v);
      Py_DECREF(v);
    }
  } else if (rc == EM_EINTR && PyErr_Occurred()) {
    /* KeyboardInterrupt (or another signal handler's exception) */
  } else if (rc == EM_ECLOSED) {
    em_py_raise(rc, "call '%s' to %s: the client was closed", method, c->where);
  } else if (rc == EM_ETIMEDOUT) {
    em_py_raise(rc, "no reply from %s to '%s' within %.3g s", c->where, method, timeout);
  } else if (rc == EM_ETOOBIG) {
    em_py_raise(rc, "call '%s' to %s: a message exceeds max_message_bytes (the server's limit for requests, this client's for replies)", method, c->where);
  } else {
    em_py_raise(rc, "call '%s' to %s failed: %s", method, c->where, em_strerror(rc));
  }
  em__client_leave(c); /* after the notes: cc lives while we are in flight */
  em_msg_free(reply);
done:
  em_py_keep_release(&keep);
  PyMem_Free(keep.views);
  if (p == c->spare) {
    em_payload_reset(p); /* keeps at most 256 KiB of its buffer (payload.c) */
    c->spare_busy = 0;
  } else {
    em_payload_free(p);
  }
  return result;
}

/* stats() -> {"calls", "stages": {name: (count, mean, p50, p90, p99, min,
 * max)}, "offset_ns", "offset_err_ns", "offset_samples", "offset_age_ns",
 * "synchronized"} */
static PyObject *em__client_stats(PyObject *self, PyObject *unused) {
  em__pyclient *c = (em__pyclient *)self;
  if (!c->c) return em_py_raise(EM_ECLOSED, "client for %s is closed", c->where);
  em_client_stats st;
  em_client_get_stats(c->c, &st);
  PyObject *stages = PyDict_New();
  if (!stages) return NULL;
  for (int i = 0; i < EM_STAGE_COUNT; i++) {
    const em_stage_stats *x = &st.stage[i];
    PyObject *v = Py_BuildValue("(Kdddddd)", (unsigned long long)x->count, x->mean, x->p50, x->p90, x->p99, x->min,
                                x->max);
    if (!v || PyDict_SetItemString(stages, em_stage_names[i], v)) {
      Py_XDECREF(v);
      Py_DECREF(stages);
      return NULL;
    }
    Py_DECREF(v);
  }
  return Py_BuildValue("{sKsNsLsKsKsKsO}", "calls", (unsigned long long)st.calls, "stages", stages, "offset_ns",
                       (long long)st.offset_ns, "offset_err_ns", (unsigned long long)st.offset_err_ns,
                       "offset_samples", (unsigned long long)st.offset_samples, "offset_age_ns",
                       (unsigned long long)st.offset_age_ns, "synchronized", st.synchronized ? Py_True : Py_False);
}

static PyObject *em__client_reset_stats(PyObject *self, PyObject *unused) {
  em__pyclient *c = (em__pyclient *)self;
  if (c->c) em_client_reset_stats(c->c);
  Py_RETURN_NONE;
}

static PyObject *em__client_set_synchronized(PyObject *self, PyObject *arg) {
  em__pyclient *c = (em__pyclient *)self;
  int yes = PyObject_IsTrue(arg);
  if (yes < 0) return NULL;
  if (c->c) em_client_set_synchronized(c->c, yes);
  Py_RETURN_NONE;
}

static PyObject *em__client_idle(PyObject *self, PyObject *unused) {
  em__pyclient *c = (em__pyclient *)self;
  if (!c->c) return PyFloat_FromDouble(0);
  return PyFloat_FromDouble((double)em_client_idle_ns(c->c) / 1e9);
}

static PyObject *em__client_hello(PyObject *self, PyObject *unused) {
  em__pyclient *c = (em__pyclient *)self;
  if (!c->c) return em_py_raise(EM_ECLOSED, "client for %s is closed", c->where);
  size_t len;
  const uint8_t *h = em_client_server_hello(c->c, &len);
  return PyBytes_FromStringAndSize((const char *)h, (Py_ssize_t)len);
}

/* close(): calls in flight fail with ClosedError; the client is freed
 * now, or by the last of those calls when it returns. */
static PyObject *em__client_close(PyObject *self, PyObject *unused) {
  em__pyclient *c = (em__pyclient *)self;
  em_client *cc = c->c;
  if (cc && em_client_forked(cc)) { /* a fork child: the in-flight count is the parent's threads' */
    c->c = NULL;
    c->inflight = 0;
    c->dying = NULL;
    em_client_close(cc); /* closes this process's copy of the socket only */
  } else if (cc) {
    c->c = NULL;
    c->dying = cc;
    c->inflight++; /* the shutdown below is a use like a call */
    Py_BEGIN_ALLOW_THREADS
    em_client_shutdown(cc); /* wakes the calls in flight (may wait for a re-dial) */
    Py_END_ALLOW_THREADS
    em__client_leave(c);
  }
  Py_RETURN_NONE;
}

static PyObject *em__client_shutdown(PyObject *self, PyObject *unused) {
  em__pyclient *c = (em__pyclient *)self;
  em_client *cc = c->c;
  if (cc) {
    c->inflight++;
    Py_BEGIN_ALLOW_THREADS
    em_client_shutdown(cc);
    Py_END_ALLOW_THREADS
    em__client_leave(c);
  }
  Py_RETURN_NONE;
}

static PyMethodDef em__client_methods[] = {
    {"call", (PyCFunction)(void (*)(void))em__client_call, METH_FASTCALL,
     "call(method, payload, timeout[, type[, timed]]) -> (ok, value) or (ok, value, timing)"},
    {"stats", em__client_stats, METH_NOARGS, "running per-stage statistics and the clock-offset estimate"},
    {"reset_stats", em__client_reset_stats, METH_NOARGS, "clear the statistics (keeps the clock estimate)"},
    {"set_synchronized", em__client_set_synchronized, METH_O, "declare the clocks synchronised (offset 0)"},
    {"idle", em__client_idle, METH_NOARGS, "seconds since the last reply"},
    {"hello", em__client_hello, METH_NOARGS, "the server's handshake body (msgpack bytes)"},
    {"shutdown", em__client_shutdown, METH_NOARGS, "fail calls in flight with a ClosedError"},
    {"close", em__client_close, METH_NOARGS, "close the connection"},
    {NULL}};

static PyTypeObject em__client_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "edgeml._core.Client",
    .tp_basicsize = sizeof(em__pyclient),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Client(host, port, service=None, connect_timeout=0.0, max_message_bytes=0, token=None)",
    .tp_new = PyType_GenericNew,
    .tp_init = em__client_init,
    .tp_dealloc = em__client_dealloc,
    .tp_methods = em__client_methods,
};

/* ================================================================ Server */

typedef struct {
  PyObject_HEAD
  em_server *s;
  PyObject *dispatch;      /* fn(method, payload) -> reply payload */
  PyObject *routes;        /* dict method -> fn(payload), tried before dispatch, or NULL */
  PyObject *recv_cuda;     /* a _core.Cuda whose pinned pool receives requests, or NULL */
  PyObject *deferred;      /* dict method -> fn(pending, payload): queued, answered later; or NULL */
  PyObject *gate;          /* a _core.Gate (the role's request rules, checked in C before decoding), or NULL */
  PyObject *format_error;  /* fn(exc) -> dict for the ERROR reply */
  PyObject *log;           /* fn(level, msg) */
  PyThreadState *tstate;   /* the loop thread's, while run() runs */
  PyObject *pending;       /* exception that stopped run() (Ctrl-C) */
  /* replies whose write finished: their views are released the next
   * time this server holds the GIL (a handler, a tick, the end of run,
   * close), so the loop thread never takes the GIL just to release them */
  _Atomic(struct em__reply_keep *) released;
  int check_signals;
  int running;
  /* Threads in stop() or publish() with the GIL released, and a server
   * closed meanwhile (the serving thread's close after run returned): the
   * last of those threads frees it. GIL-protected. */
  int users;
  em_server *dying;
} em__pyserver;

typedef struct em__reply_keep {
  struct em__reply_keep *next;
  em__pyserver *srv;
  em_py_keep keep;
} em__reply_keep;

/* Runs when a reply's arrays are no longer needed (the loop thread, or the
 * thread that closes the server; no GIL): queue them, lock-free. */
static void em__release_reply(void *ctx) {
  em__reply_keep *k = ctx;
  em__pyserver *s = k->srv;
  k->next = atomic_load(&s->released);
  while (!atomic_compare_exchange_weak(&s->released, &k->next, k)) {
  }
}

/* Release the views of replies already written. GIL held. */
static void em__drain_released(em__pyserver *s) {
  em__reply_keep *k = atomic_exchange(&s->released, NULL);
  while (k) {
    em__reply_keep *next = k->next;
    em_py_keep_release(&k->keep);
    PyMem_Free(k->keep.views);
    PyMem_Free(k);
    k = next;
  }
}

static void em__server_leave(em__pyserver *s) {
  if (--s->users == 0 && s->dying) {
    em_server *d = s->dying;
    s->dying = NULL;
    em_server_close(d);
    em__drain_released(s);
  }
}

/* Pack the error map of exception `v` (format_error(v), built in Python)
 * as the whole reply. Returns EM_MSG_ERROR. GIL held. */
static int em__pack_exc_value(em__pyserver *s, PyObject *v, em_payload *reply) {
  PyObject *info = PyObject_CallOneArg(s->format_error, v ? v : Py_None);
  em_payload_reset(reply);
  em_py_keep k = {0};
  if (!info || em_py_encode(reply, &k, info, "error") != 0) {
    PyErr_Clear();
    em_payload_begin_error(reply, "RuntimeError", "the handler failed and its error could not be reported", NULL, 0);
  }
  em_py_keep_release(&k);
  PyMem_Free(k.views);
  Py_XDECREF(info);
  return EM_MSG_ERROR;
}

static int em__pack_exception(em__pyserver *s, em_payload *reply) {
  /* called with an exception set; packs its error map */
  PyObject *t, *v, *tb;
  PyErr_Fetch(&t, &v, &tb);
  PyErr_NormalizeException(&t, &v, &tb);
  if (tb && v) PyException_SetTraceback(v, tb);
  int r = em__pack_exc_value(s, v, reply);
  Py_XDECREF(t);
  Py_XDECREF(v);
  Py_XDECREF(tb);
  return r;
}

/* ------------------------------------------------------------ Pending
 * A request whose reply comes later (edgeml.batching's workers): wraps an
 * em_pending; reply()/error() send the answer from any thread. */
typedef struct {
  PyObject_HEAD
  em_pending *p;     /* NULL once answered or dropped */
  em__pyserver *srv; /* owned reference: format_error */
} em__pypending;

static PyTypeObject em__pending_type;

/* Send `type` + `pl` for the pending (GIL released while it is handed to
 * the loop); p->p is NULL afterwards. Returns the core's code. */
static int em__pending_send(em__pypending *p, int type, em_payload *pl) {
  em_pending *pp = p->p;
  p->p = NULL;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = em_pending_reply(pp, type, pl);
  Py_END_ALLOW_THREADS
  return rc;
}

/* reply(value) -> bool: encode value and send it (an encode failure sends
 * the caller that EncodeError instead); False when the caller has gone or
 * the server stopped. */
static PyObject *em__pending_reply(PyObject *self, PyObject *value) {
  em__pypending *p = (em__pypending *)self;
  if (!p->p) return em_py_raise(EM_EINVAL, "this request was already answered");
  em_payload *pl = em_payload_new();
  if (!pl) return PyErr_NoMemory();
  em_py_keep keep = {0};
  int type = EM_MSG_REPLY;
  if (em_py_encode(pl, &keep, value, "reply") != 0) {
    em_py_keep_release(&keep);
    type = em__pack_exception(p->srv, pl);
  }
  int rc = em__pending_send(p, type, pl); /* the frame is copied: views may go */
  em_py_keep_release(&keep);
  PyMem_Free(keep.views);
  em_payload_free(pl);
  return PyBool_FromLong(rc == EM_OK);
}

/* error(exc) -> bool: send exc to the caller as an ERROR reply. */
static PyObject *em__pending_error(PyObject *self, PyObject *exc) {
  em__pypending *p = (em__pypending *)self;
  if (!p->p) return em_py_raise(EM_EINVAL, "this request was already answered");
  em_payload *pl = em_payload_new();
  if (!pl) return PyErr_NoMemory();
  em__pack_exc_value(p->srv, exc, pl);
  int rc = em__pending_send(p, EM_MSG_ERROR, pl);
  em_payload_free(pl);
  return PyBool_FromLong(rc == EM_OK);
}

/* drop(): forget it without an answer (its caller has gone). */
static PyObject *em__pending_drop(PyObject *self, PyObject *unused) {
  em__pypending *p = (em__pypending *)self;
  if (p->p) {
    em_pending_drop(p->p);
    p->p = NULL;
  }
  Py_RETURN_NONE;
}

static PyObject *em__pending_alive(PyObject *self, void *closure) {
  em__pypending *p = (em__pypending *)self;
  return PyBool_FromLong(p->p && em_pending_alive(p->p));
}

static void em__pending_dealloc(PyObject *self) {
  em__pypending *p = (em__pypending *)self;
  if (p->p) { /* never answered: tell the caller rather than let it wait for its timeout */
    em_payload *pl = em_payload_new();
    if (pl) {
      em_payload_begin_error(pl, "RuntimeError", "the server dropped this request: nothing answered it", NULL, 0);
      em__pending_send(p, EM_MSG_ERROR, pl);
      em_payload_free(pl);
    } else {
      em_pending_drop(p->p);
      p->p = NULL;
    }
  }
  Py_XDECREF((PyObject *)p->srv);
  Py_TYPE(self)->tp_free(self);
}

static PyMethodDef em__pending_methods[] = {
    {"reply", em__pending_reply, METH_O, "reply(value) -> bool: send the reply (False: the caller has gone)"},
    {"error", em__pending_error, METH_O, "error(exc) -> bool: send exc as the caller's error"},
    {"drop", em__pending_drop, METH_NOARGS, "forget the request without an answer"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef em__pending_getset[] = {
    {"alive", em__pending_alive, NULL, "True while the caller's connection is open and no answer was sent", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject em__pending_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "edgeml._core.Pending",
    .tp_basicsize = sizeof(em__pypending),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A request answered later, from any thread (reply, error).",
    .tp_dealloc = em__pending_dealloc,
    .tp_methods = em__pending_methods,
    .tp_getset = em__pending_getset,
};

static int em__handler(void *ud, const em_msg *req, em_payload *reply) {
  em__pyserver *s = ud;
  PyEval_RestoreThread(s->tstate);
  em__drain_released(s);
  int type = EM_MSG_REPLY;
  PyObject *method = NULL;
  /* the role's rules first, in C: a refused request is answered without
   * being decoded into Python objects */
  if (s->gate && em_gate_check(em_py_gate_get(s->gate), req, reply) == EM_MSG_ERROR) {
    type = EM_MSG_ERROR;
    goto out;
  }
  int malformed = 0;
  PyObject *payload = em_py_decode_ex(req, &method, &malformed);
  if (!payload && malformed) { /* one pass: the server did not check the body first (handler_checks_body) */
    PyErr_Clear();
    type = EM_EDECODE;
    goto out;
  }
  if (!payload) {
    type = em__pack_exception(s, reply);
    goto out;
  }
  PyObject *dfn = s->deferred ? PyDict_GetItemWithError(s->deferred, method) : NULL;
  em_pending *pend = dfn ? em_server_defer(s->s, req) : NULL;
  if (pend) { /* queued: dfn(pending, payload) hands it to the workers, which answer it */
    em__pypending *pp = PyObject_New(em__pypending, &em__pending_type);
    if (!pp) {
      em_pending_drop(pend);
      Py_DECREF(payload);
      Py_DECREF(method);
      type = em__pack_exception(s, reply);
      goto out;
    }
    pp->p = pend;
    Py_INCREF(s);
    pp->srv = s;
    Py_INCREF(dfn);
    PyObject *r = PyObject_CallFunctionObjArgs(dfn, (PyObject *)pp, payload, NULL);
    Py_DECREF(dfn);
    if (!r && pp->p) { /* the queue refused it: the caller gets the error */
      PyObject *t, *v, *tb;
      PyErr_Fetch(&t, &v, &tb);
      PyErr_NormalizeException(&t, &v, &tb);
      if (tb && v) PyException_SetTraceback(v, tb);
      PyObject *ok = em__pending_error((PyObject *)pp, v ? v : Py_None);
      Py_XDECREF(ok);
      PyErr_Clear();
      Py_XDECREF(t);
      Py_XDECREF(v);
      Py_XDECREF(tb);
    }
    PyErr_Clear();
    Py_XDECREF(r);
    Py_DECREF(pp);
    Py_DECREF(payload);
    Py_DECREF(method);
    type = EM_MSG_DEFER;
    goto out;
  }
  if (dfn) { /* no memory for the pending */
    Py_DECREF(payload);
    Py_DECREF(method);
    PyErr_NoMemory();
    type = em__pack_exception(s, reply);
    goto out;
  }
  PyObject *res, *fn = s->routes ? PyDict_GetItemWithError(s->routes, method) : NULL;
  if (fn) {
    Py_INCREF(fn); /* the dict may change while fn runs */
    res = PyObject_CallOneArg(fn, payload);
    Py_DECREF(fn);
  } else {
    res = PyErr_Occurred() ? NULL : PyObject_CallFunctionObjArgs(s->dispatch, method, payload, NULL);
  }
  Py_DECREF(payload);
  Py_DECREF(method);
  if (!res) {
    type = em__pack_exception(s, reply);
    goto out;
  }
  /* the views the reply borrows (arrays): a record is made only when
   * there are some, and released once the reply has been written */
  em_py_keep keep = {0};
  if (em_py_encode(reply, &keep, res, "reply") != 0) {
    em_py_keep_release(&keep);
    PyMem_Free(keep.views);
    Py_DECREF(res);
    type = em__pack_exception(s, reply);
    goto out;
  }
  Py_DECREF(res);
  if (keep.n) {
    em__reply_keep *k = PyMem_Calloc(1, sizeof *k);
    if (!k) {
      em_py_keep_release(&keep);
      PyMem_Free(keep.views);
      PyErr_NoMemory();
      type = em__pack_exception(s, reply);
      goto out;
    }
    k->keep = keep;
    k->srv = s;
    em_payload_on_release(reply, em__release_reply, k);
  } else {
    PyMem_Free(keep.views);
  }
out:
  s->tstate = PyEval_SaveThread();
  return type;
}

static int em__tick(void *ud) {
  em__pyserver *s = ud;
  if (!s->check_signals) return 0;
  PyEval_RestoreThread(s->tstate);
  em__drain_released(s);
  int stop = 0;
  if (PyErr_CheckSignals() < 0) {
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (tb && v) PyException_SetTraceback(v, tb);
    Py_XDECREF(t);
    Py_XDECREF(tb);
    Py_XSETREF(s->pending, v);
    stop = 1;
  }
  s->tstate = PyEval_SaveThread();
  return stop;
}

static void em__log_py(void *ud, int level, const char *msg) {
  em__pyserver *s = ud;
  PyGILState_STATE g = PyGILState_Ensure();
  if (s->log) {
    PyObject *r = PyObject_CallFunction(s->log, "is", level, msg);
    if (!r) PyErr_Clear();
    Py_XDECREF(r);
  }
  PyGILState_Release(g);
}

/* A server's timeout option: 0 (not given) = the core's default; inf =
 * practically never (a value the core's sums cannot overflow). */
static int em__server_timeout(double t, const char *what, uint64_t *out) {
  *out = 0;
  if (!(t > 0) && !isnan(t)) return 0;
  if (em__py_timeout(t, what, out)) return -1;
  if (*out == EM_FOREVER) *out = UINT64_MAX / 4;
  return 0;
}

static int em__server_init(PyObject *self, PyObject *args, PyObject *kw) {
  em__pyserver *s = (em__pyserver *)self;
  static char *kwlist[] = {"host", "port", "service", "dispatch", "format_error", "log",
                           "hello_info", "max_message_bytes", "routes", "token", "handshake_timeout",
                           "max_pending_bytes", "progress_timeout", "gate", "deferred", "recv_pool", NULL};
  const char *host, *service;
  int port;
  PyObject *dispatch, *format_error, *log;
  Py_buffer info = {0};
  unsigned long long max_bytes = 0, max_pending = 0;
  PyObject *routes = NULL;
  const char *token = NULL;
  double handshake_timeout = 0, progress_timeout = 0;
  PyObject *gate = NULL, *deferred = NULL, *recv = NULL;
  if (s->s) {
    PyErr_SetString(PyExc_RuntimeError, "Server.__init__ called twice");
    return -1;
  }
  if (!PyArg_ParseTupleAndKeywords(args, kw, "sisOOO|y*KOzdKdOOO", kwlist, &host, &port, &service, &dispatch,
                                   &format_error, &log, &info, &max_bytes, &routes, &token, &handshake_timeout,
                                   &max_pending, &progress_timeout, &gate, &deferred, &recv))
    return -1;
  if (recv == Py_None) recv = NULL;
  if (recv && !em_py_cuda_pool(recv)) {
    PyBuffer_Release(&info);
    PyErr_SetString(PyExc_TypeError, "recv_pool must be a _core.Cuda or None");
    return -1;
  }
  Py_XINCREF(recv);
  Py_XSETREF(s->recv_cuda, recv);
  if (deferred == Py_None) deferred = NULL;
  if (deferred && !PyDict_CheckExact(deferred)) {
    PyBuffer_Release(&info);
    PyErr_SetString(PyExc_TypeError, "deferred must be a dict or None");
    return -1;
  }
  Py_XINCREF(deferred);
  Py_XSETREF(s->deferred, deferred);
  if (gate == Py_None) gate = NULL;
  if (gate && !em_py_gate_get(gate)) {
    PyBuffer_Release(&info);
    PyErr_SetString(PyExc_TypeError, "gate must be a _core.Gate or None");
    return -1;
  }
  Py_XINCREF(gate);
  Py_XSETREF(s->gate, gate);
  if (routes == Py_None) routes = NULL;
  if (routes && !PyDict_CheckExact(routes)) {
    PyBuffer_Release(&info);
    PyErr_SetString(PyExc_TypeError, "routes must be a dict or None");
    return -1;
  }
  if (port < 0 || port > 65535) {
    PyBuffer_Release(&info);
    PyErr_Format(PyExc_ValueError, "port must be in 0..65535, got %d", port);
    return -1;
  }
  Py_INCREF(dispatch);
  Py_INCREF(format_error);
  Py_INCREF(log);
  s->dispatch = dispatch;
  Py_XINCREF(routes);
  Py_XSETREF(s->routes, routes);
  s->format_error = format_error;
  s->log = log;
  em_server_opts o;
  em_server_opts_init(&o);
  o.host = host;
  o.port = (uint16_t)port;
  o.service = service;
  o.hello_info = info.buf;
  o.hello_info_len = info.buf ? (size_t)info.len : 0;
  o.max_message_bytes = max_bytes;
  o.token = token;
  o.max_pending_bytes = max_pending;
  o.recv_pool = recv ? em_py_cuda_pool(recv) : NULL;
  if (em__server_timeout(handshake_timeout, "handshake_timeout", &o.handshake_timeout_ns) ||
      em__server_timeout(progress_timeout, "progress_timeout", &o.progress_timeout_ns)) {
    PyBuffer_Release(&info);
    return -1;
  }
  o.handler = dispatch == Py_None ? NULL : em__handler; /* None: broadcast only */
  o.handler_checks_body = 1; /* em__handler decodes with the checking reader: one pass */
  o.handler_ud = s;
  o.tick = em__tick;
  o.tick_ud = s;
  o.tick_ns = 100000000ull;
  o.log = em__log_py;
  o.log_ud = s;
  int rc = em_server_open(&s->s, &o);
  PyBuffer_Release(&info);
  if (rc) {
    if (rc == EM_EADDRINUSE)
      em_py_raise(rc, "cannot listen on %s:%d: the address is already in use", host, port);
    else
      em_py_raise(rc, "cannot listen on %s:%d: %s", host, port, em_strerror(rc));
    return -1;
  }
  return 0;
}

static PyObject *em__server_run(PyObject *self, PyObject *args) {
  em__pyserver *s = (em__pyserver *)self;
  int check_signals = 0;
  if (!PyArg_ParseTuple(args, "|p", &check_signals)) return NULL;
  if (!s->s) return em_py_raise(EM_ECLOSED, "server is closed");
  if (s->running) return em_py_raise(EM_EINVAL, "server is already running");
  s->running = 1;
  s->check_signals = check_signals;
  Py_INCREF(self); /* the loop uses us until run returns */
  s->tstate = PyEval_SaveThread();
  int rc = em_server_run(s->s);
  PyEval_RestoreThread(s->tstate);
  s->tstate = NULL;
  s->running = 2;
  em__drain_released(s);
  PyObject *pending = s->pending;
  s->pending = NULL;
  Py_DECREF(self);
  if (pending) {
    PyErr_SetObject((PyObject *)Py_TYPE(pending), pending);
    Py_DECREF(pending);
    return NULL;
  }
  if (rc && rc != EM_EINTR) return em_py_raise(rc, "server stopped: %s", em_strerror(rc));
  Py_RETURN_NONE;
}

static PyObject *em__server_stop(PyObject *self, PyObject *args) {
  em__pyserver *s = (em__pyserver *)self;
  double timeout = -1;
  if (!PyArg_ParseTuple(args, "|d", &timeout)) return NULL;
  if (!s->s) Py_RETURN_TRUE;
  uint64_t t;
  if (em__py_timeout(timeout, "timeout", &t)) return NULL;
  em_server_stop(s->s);
  if (em_server_on_loop_thread(s->s)) Py_RETURN_NONE; /* from a handler: run returns soon */
  int rc;
  em_server *ss = s->s;
  s->users++; /* the serving thread may close the server while we wait */
  Py_BEGIN_ALLOW_THREADS
  rc = em_server_wait(ss, t);
  Py_END_ALLOW_THREADS
  em__server_leave(s);
  return PyBool_FromLong(rc == EM_OK);
}

/* publish(obj) -> version: obj becomes the server's broadcast value. The
 * frame is copied (GIL released) so obj may change afterwards. */
static PyObject *em__server_publish(PyObject *self, PyObject *obj) {
  em__pyserver *s = (em__pyserver *)self;
  if (!s->s) return em_py_raise(EM_ECLOSED, "server is closed");
  em_payload *p = em_payload_new();
  if (!p) return PyErr_NoMemory();
  em_py_keep keep = {0};
  PyObject *result = NULL;
  if (em_py_encode(p, &keep, obj, "payload") == 0 && !s->s) {
    em_py_raise(EM_ECLOSED, "cannot publish: the server is closed"); /* closed while encoding */
  } else if (!PyErr_Occurred()) {
    uint64_t version = 0;
    int rc;
    em_server *ss = s->s;
    s->users++;
    Py_BEGIN_ALLOW_THREADS
    rc = em_server_publish(ss, p, &version);
    Py_END_ALLOW_THREADS
    em__server_leave(s);
    if (rc == EM_OK) result = PyLong_FromUnsignedLongLong(version);
    else if (rc == EM_ETOOBIG) em_py_raise(rc, "cannot publish: the value exceeds the server's max_message_bytes");
    else if (rc == EM_ECLOSED) em_py_raise(rc, "cannot publish: the server has stopped");
    else if (rc == EM_EFORKED) em_py_raise(rc, "cannot publish: the server runs in the parent process (fork)");
    else em_py_raise(rc, "cannot publish: %s", em_strerror(rc));
  }
  em_py_keep_release(&keep);
  PyMem_Free(keep.views);
  em_payload_free(p);
  return result;
}

/* forget_after_fork(): in a child process, drop this process's copies of
 * the server's sockets (freeing the port for the parent's successors) and
 * forget it; the parent's server is untouched. */
static PyObject *em__server_forget_after_fork(PyObject *self, PyObject *unused) {
  em__pyserver *s = (em__pyserver *)self;
  if (s->s && !em_server_forked(s->s)) Py_RETURN_NONE; /* the parent's own: nothing to forget */
  if (s->s) em_server_close(s->s); /* in a child it only closes descriptors */
  s->s = NULL;
  s->dying = NULL;
  s->users = 0;
  s->running = 2;
  Py_RETURN_NONE;
}

static PyObject *em__server_on_loop(PyObject *self, PyObject *unused) {
  em__pyserver *s = (em__pyserver *)self;
  return PyBool_FromLong(s->s && em_server_on_loop_thread(s->s));
}

static PyObject *em__server_stats(PyObject *self, PyObject *unused) {
  em__pyserver *s = (em__pyserver *)self;
  if (!s->s) return PyDict_New();
  em_server_stats st;
  em_server_get_stats(s->s, &st);
  return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsKsKsKsK}", "connections_open", st.connections_open, "connections_total",
                       st.connections_total, "requests", st.requests, "errors_sent", st.errors_sent,
                       "protocol_errors", st.protocol_errors, "auth_failures", st.auth_failures, "subscribers",
                       st.subscribers, "publishes", st.publishes, "publish_sends", st.publish_sends,
                       "pending_bytes", st.pending_bytes, "max_pending_bytes", st.max_pending_bytes,
                       "reads_paused", st.reads_paused, "stalled_closed", st.stalled_closed);
}

static void em__server_free(em__pyserver *s) {
  if (s->s && s->running != 1) {
    if (s->users > 0) { /* a stop() or publish() on another thread is still inside: it frees */
      s->dying = s->s;
    } else {
      em_server_close(s->s);
    }
    s->s = NULL;
  }
  em__drain_released(s);
}

static PyObject *em__server_close(PyObject *self, PyObject *unused) {
  em__pyserver *s = (em__pyserver *)self;
  if (s->running == 1) return em_py_raise(EM_EINVAL, "stop the server before closing it");
  em__server_free(s);
  Py_RETURN_NONE;
}

static PyObject *em__server_port(PyObject *self, void *closure) {
  em__pyserver *s = (em__pyserver *)self;
  if (!s->s) Py_RETURN_NONE;
  return PyLong_FromLong(em_server_port(s->s));
}

static void em__server_dealloc(PyObject *self) {
  em__pyserver *s = (em__pyserver *)self;
  em__server_free(s);
  Py_XDECREF(s->dispatch);
  Py_XDECREF(s->routes);
  Py_XDECREF(s->gate);
  Py_XDECREF(s->deferred);
  Py_XDECREF(s->recv_cuda);
  Py_XDECREF(s->format_error);
  Py_XDECREF(s->log);
  Py_XDECREF(s->pending);
  Py_TYPE(self)->tp_free(self);
}

static PyMethodDef em__server_methods[] = {
    {"run", em__server_run, METH_VARARGS, "run(check_signals=False): serve on this thread until stop()"},
    {"stop", em__server_stop, METH_VARARGS, "stop(timeout=-1) -> bool: stop and wait for run() to return"},
    {"stats", em__server_stats, METH_NOARGS, "counters"},
    {"on_loop_thread", em__server_on_loop, METH_NOARGS, "True when called from the serving thread"},
    {"forget_after_fork", em__server_forget_after_fork, METH_NOARGS,
     "in a fork child: close the inherited sockets and forget the server"},
    {"publish", em__server_publish, METH_O, "publish(obj) -> version: set the broadcast value"},
    {"close", em__server_close, METH_NOARGS, "free the server (after run returned)"},
    {NULL}};

static PyGetSetDef em__server_getset[] = {{"port", em__server_port, NULL, "bound port", NULL}, {NULL}};

static PyTypeObject em__server_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "edgeml._core.Server",
    .tp_basicsize = sizeof(em__pyserver),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Server(host, port, service, dispatch, format_error, log, hello_info=b'', max_message_bytes=0, routes=None, token=None, "
               "handshake_timeout=0.0)\n"
               "routes: a dict method -> fn(payload), looked up (live) before dispatch is called",
    .tp_new = PyType_GenericNew,
    .tp_init = em__server_init,
    .tp_dealloc = em__server_dealloc,
    .tp_methods = em__server_methods,
    .tp_getset = em__server_getset,
};

/* ============================================================ Subscriber */

typedef struct {
  PyObject_HEAD
  em_sub *sub;
  int busy; /* a next() is running (GIL-protected) */
  char where[300];
} em__pysub;

static int em__sub_init(PyObject *self, PyObject *args, PyObject *kw) {
  em__pysub *s = (em__pysub *)self;
  const char *host;
  int port;
  em_client_opts o;
  if (em__dial_args(args, kw, &host, &port, &o, s->where, sizeof s->where)) return -1;
  char why[300] = "";
  o.errbuf = why;
  o.errbuf_len = sizeof why;
  int rc;
  Py_BEGIN_ALLOW_THREADS
  rc = em_sub_open(&s->sub, host, (uint16_t)port, &o);
  Py_END_ALLOW_THREADS
  if (rc) {
    em_py_raise(rc, "cannot subscribe to broadcasts at %s: %s", s->where, why[0] ? why : em_strerror(rc));
    return -1;
  }
  return 0;
}

/* next(timeout) -> (version, payload, publish_ts_ns), or None on timeout. */
static PyObject *em__sub_next(PyObject *self, PyObject *args) {
  em__pysub *s = (em__pysub *)self;
  double timeout;
  if (!PyArg_ParseTuple(args, "d", &timeout)) return NULL;
  if (!s->sub) return em_py_raise(EM_ECLOSED, "subscription to %s is closed", s->where);
  if (s->busy) return em_py_raise(EM_EINVAL, "next() is already running on another thread");
  uint64_t tmo;
  if (em__py_timeout(timeout, "timeout", &tmo)) return NULL;
  em_msg *m = NULL;
  int rc;
  em_sub *sub = s->sub;
  s->busy = 1;
  Py_BEGIN_ALLOW_THREADS
  rc = em_sub_next(sub, tmo, &m);
  Py_END_ALLOW_THREADS
  s->busy = 0;
  if (rc == EM_ETIMEDOUT) Py_RETURN_NONE;
  if (rc) {
    if (rc == EM_ECONNCLOSED) return em_py_raise(rc, "lost the broadcast connection to %s", s->where);
    return em_py_raise(rc, "broadcast from %s: %s", s->where, em_strerror(rc));
  }
  PyObject *v = em_py_decode(m, NULL);
  PyObject *out = v ? Py_BuildValue("(KNK)", (unsigned long long)m->req_id, v, (unsigned long long)m->ts_ns[0]) : NULL;
  em_msg_free(m);
  return out;
}

static PyObject *em__sub_shutdown(PyObject *self, PyObject *unused) {
  em__pysub *s = (em__pysub *)self;
  if (s->sub) em_sub_shutdown(s->sub);
  Py_RETURN_NONE;
}

static PyObject *em__sub_close(PyObject *self, PyObject *unused) {
  em__pysub *s = (em__pysub *)self;
  if (s->busy) return em_py_raise(EM_EINVAL, "shutdown() and wait for next() to return before close()");
  if (s->sub) {
    em_sub_close(s->sub);
    s->sub = NULL;
  }
  Py_RETURN_NONE;
}

static PyObject *em__sub_connected(PyObject *self, void *closure) {
  em__pysub *s = (em__pysub *)self;
  return PyBool_FromLong(s->sub && em_sub_connected(s->sub));
}

static void em__sub_dealloc(PyObject *self) {
  em__pysub *s = (em__pysub *)self;
  if (s->sub) em_sub_close(s->sub); /* no next() can run: it holds a reference */
  Py_TYPE(self)->tp_free(self);
}

static PyMethodDef em__sub_methods[] = {
    {"next", em__sub_next, METH_VARARGS, "next(timeout) -> (version, payload, publish_ts_ns) or None"},
    {"shutdown", em__sub_shutdown, METH_NOARGS, "make a waiting next() return (ClosedError)"},
    {"close", em__sub_close, METH_NOARGS, "close the connection"},
    {NULL}};

static PyGetSetDef em__sub_getset[] = {{"connected", em__sub_connected, NULL, "has a live connection", NULL},
                                       {NULL}};

static PyTypeObject em__sub_type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "edgeml._core.Subscriber",
    .tp_basicsize = sizeof(em__pysub),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Subscriber(host, port, service=None, connect_timeout=0.0, max_message_bytes=0, token=None)",
    .tp_new = PyType_GenericNew,
    .tp_init = em__sub_init,
    .tp_dealloc = em__sub_dealloc,
    .tp_methods = em__sub_methods,
    .tp_getset = em__sub_getset,
};

/* ================================================================ module */

static PyObject *em__error_table(PyObject *m, PyObject *unused) {
  PyObject *l = PyList_New(0);
#define EM__ERR_ROW(name, code, msg)                            \
  {                                                             \
    PyObject *row = Py_BuildValue("(sis)", #name, code, msg);   \
    PyList_Append(l, row);                                      \
    Py_DECREF(row);                                             \
  }
  EM_ERRORS(EM__ERR_ROW)
#undef EM__ERR_ROW
  return l;
}

static PyObject *em__configure(PyObject *m, PyObject *args, PyObject *kw) {
  static char *kwlist[] = {"ndarray", "generic", "dtype_wire", "as_array", "contiguous", "make_array",
                           "dtype_cache", "exc_for_code", "encode_error", "decode_error", NULL};
  PyObject *v[10];
  if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOOOOO!O!OO", kwlist, &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                                   &PyDict_Type, &v[6], &PyDict_Type, &v[7], &v[8], &v[9]))
    return NULL;
  PyObject **slots[10] = {&em_py.ndarray_type, &em_py.generic_type, &em_py.dtype_wire, &em_py.as_array,
                          &em_py.contiguous, &em_py.make_array, &em_py.dtype_cache, &em_py.exc_for_code,
                          &em_py.encode_error, &em_py.decode_error};
  for (int i = 0; i < 10; i++) {
    Py_INCREF(v[i]);
    Py_XSETREF(*slots[i], v[i]);
  }
  Py_RETURN_NONE;
}

/* encode(obj) -> (body bytes, [blob memoryviews]) and decode_frame(bytes):
 * the codec without sockets, for tests and test vectors. */
static PyObject *em__encode_frame(PyObject *m, PyObject *args) {
  PyObject *obj;
  int type = EM_MSG_REPLY;
  unsigned long long req_id = 0;
  if (!PyArg_ParseTuple(args, "O|iK", &obj, &type, &req_id)) return NULL;
  em_payload *p = em_payload_new();
  if (!p) return PyErr_NoMemory();
  em_py_keep keep = {0};
  PyObject *out = NULL;
  if (em_py_encode(p, &keep, obj, "payload") == 0) {
    uint8_t *data;
    size_t len;
    int rc = em_frame_encode(p, (uint8_t)type, req_id, &data, &len);
    if (rc == EM_OK) {
      out = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)len);
      free(data);
    } else {
      em_py_raise(rc, "cannot frame the payload: %s", em_strerror(rc));
    }
  }
  em_py_keep_release(&keep);
  PyMem_Free(keep.views);
  em_payload_free(p);
  return out;
}

static PyObject *em__decode_frame(PyObject *m, PyObject *args) {
  Py_buffer b;
  unsigned long long max_bytes = 0;
  if (!PyArg_ParseTuple(args, "y*|K", &b, &max_bytes)) return NULL;
  em_msg *msg = NULL;
  const char *why = "truncated frame";
  PyObject *out = NULL;
  int rc = em_frame_decode(b.buf, (size_t)b.len, max_bytes, &msg, &why);
  if (rc == EM_OK) {
    PyObject *v = em_py_decode(msg, NULL);
    if (v)
      out = Py_BuildValue("{sisKsNsn}", "type", msg->type, "req_id", (unsigned long long)msg->req_id,
                          "payload", v, "frame_bytes", (Py_ssize_t)msg->frame_bytes);
    em_msg_free(msg);
  } else {
    em_py_raise(rc, "bad frame: %s", why);
  }
  PyBuffer_Release(&b);
  return out;
}

static PyMethodDef em__module_methods[] = {
    {"error_table", em__error_table, METH_NOARGS, "[(name, code, message)] of the C error table"},
    {"configure", (PyCFunction)(void (*)(void))em__configure, METH_VARARGS | METH_KEYWORDS, "set codec hooks"},
    {"encode_frame", em__encode_frame, METH_VARARGS, "encode_frame(obj, type=REPLY, req_id=0) -> bytes"},
    {"decode_frame", em__decode_frame, METH_VARARGS, "decode_frame(bytes, max_bytes) -> dict; exactly one frame"},
    {NULL}};

static struct PyModuleDef em__module = {PyModuleDef_HEAD_INIT, "edgeml._core", "libedgeml bindings (private)", -1,
                                        em__module_methods};

PyMODINIT_FUNC PyInit__core(void) {
  if (PyType_Ready(&em__client_type) < 0 || PyType_Ready(&em__server_type) < 0 ||
      PyType_Ready(&em_py_framebuf_type) < 0 || PyType_Ready(&em__sub_type) < 0 || PyType_Ready(&em_py_gate_type) < 0 ||
      PyType_Ready(&em__pending_type) < 0)
    return NULL;
  PyObject *m = PyModule_Create(&em__module);
  if (!m) return NULL;
  Py_INCREF(&em__client_type);
  PyModule_AddObject(m, "Client", (PyObject *)&em__client_type);
  Py_INCREF(&em__server_type);
  PyModule_AddObject(m, "Server", (PyObject *)&em__server_type);
  Py_INCREF(&em__sub_type);
  PyModule_AddObject(m, "Subscriber", (PyObject *)&em__sub_type);
  Py_INCREF(&em_py_framebuf_type);
  PyModule_AddObject(m, "FrameBuffer", (PyObject *)&em_py_framebuf_type);
  Py_INCREF(&em_py_gate_type);
  PyModule_AddObject(m, "Gate", (PyObject *)&em_py_gate_type);
  Py_INCREF(&em__pending_type);
  PyModule_AddObject(m, "Pending", (PyObject *)&em__pending_type);
  if (em_py_device_register(m) < 0 || em_py_cuda_register(m) < 0) {
    Py_DECREF(m);
    return NULL;
  }
  PyModule_AddIntConstant(m, "PROTOCOL_VERSION", EM_PROTOCOL_VERSION);
  PyModule_AddIntConstant(m, "MSG_REQUEST", EM_MSG_REQUEST);
  PyModule_AddIntConstant(m, "MSG_REPLY", EM_MSG_REPLY);
  PyModule_AddIntConstant(m, "MSG_PING", EM_MSG_PING);
  PyModule_AddIntConstant(m, "MSG_HELLO", EM_MSG_HELLO);
  PyModule_AddIntConstant(m, "MSG_AUTH", EM_MSG_AUTH);
  PyModule_AddIntConstant(m, "MSG_OK", EM_MSG_OK);
  PyModule_AddIntConstant(m, "MSG_ERROR", EM_MSG_ERROR);
  PyModule_AddIntConstant(m, "DEFAULT_MAX_MESSAGE_BYTES", (long)EM_DEFAULT_MAX_MESSAGE_BYTES);
  PyModule_AddStringConstant(m, "VERSION", EM_VERSION_STRING);
  return m;
}
