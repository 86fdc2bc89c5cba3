/* edgeml.h: the one public header of libedgeml, the C core of edgeml.
 *
 * libedgeml moves messages between edge devices and GPU machines: a server
 * (libuv, one loop thread that also runs the handlers) answers requests from
 * clients (plain blocking sockets, the calling thread does its own I/O).
 * Message bodies are msgpack (msgpack-c); numpy-style arrays travel out of
 * band as raw, 64-byte aligned blobs after the body (see docs/protocol.md).
 *
 * Conventions (the same for every declaration below):
 *  - Functions return 0 (EM_OK) or a negative code from EM_ERRORS.
 *  - Time is uint64_t nanoseconds; a timeout of EM_FOREVER never expires.
 *  - "Owns" means "must free": each declaration says who owns each pointer
 *    before and after the call, on success and on failure.
 *  - Thread safety is stated per function. Nothing here keeps a pointer to
 *    caller memory past the call unless it says so.
 */
#ifndef EDGEML_H
#define EDGEML_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EM_VERSION_STRING "0.1.0"
#define EM_PROTOCOL_VERSION 1
#define EM_FOREVER UINT64_MAX
#define EM_DEFAULT_MAX_MESSAGE_BYTES (1ull << 30) /* max_message_bytes 0 = this */

/* Every function of the library is declared with EM_API; nothing else is
 * exported from libedgeml.so (it is built with -fvisibility=hidden). */
#if defined(__GNUC__) || defined(__clang__)
#define EM_API __attribute__((visibility("default")))
#else
#define EM_API
#endif

/* ---------------------------------------------------------------- errors */

/* The one table of error codes. The Python extension builds its exception
 * map from it (edgeml/errors.py), so add codes here only. */
#define EM_ERRORS(X)                                                        \
  X(OK, 0, "success")                                                       \
  X(EINVAL, -1, "invalid argument")                                         \
  X(ENOMEM, -2, "out of memory")                                            \
  X(ETIMEDOUT, -3, "timed out")                                             \
  X(ECONNREFUSED, -4, "connection refused")                                 \
  X(ECONNCLOSED, -5, "connection closed")                                   \
  X(EPROTO, -6, "protocol error")                                           \
  X(ETOOBIG, -7, "message exceeds the size limit")                          \
  X(EADDRINUSE, -8, "address already in use")                               \
  X(ECLOSED, -9, "closed")                                                  \
  X(ERESOLVE, -10, "cannot resolve host")                                   \
  X(EIO, -11, "I/O error")                                                  \
  X(EVERSION, -12, "protocol version mismatch")                             \
  X(EHANDSHAKE, -13, "handshake rejected")                                  \
  X(EREMOTE, -14, "the remote handler failed")                              \
  X(EENCODE, -15, "payload cannot be encoded")                              \
  X(EDECODE, -16, "payload cannot be decoded")                              \
  X(EINTR, -17, "interrupted")                                              \
  X(EFORKED, -18, "opened in another process (before a fork)")             \
  X(ENODEV, -19, "no usable device (runtime library, device or driver)")    \
  X(ECUDA, -20, "the CUDA runtime failed")

typedef enum em_err {
#define EM__ERR_ENUM(name, code, msg) EM_##name = code,
  EM_ERRORS(EM__ERR_ENUM)
#undef EM__ERR_ENUM
} em_err;

/* Text of a code: "timed out"; its name: "ETIMEDOUT". Never NULL. Any thread. */
EM_API const char *em_strerror(int code);
EM_API const char *em_errname(int code);

/* Current wall clock (CLOCK_REALTIME) and monotonic clock, in ns. */
EM_API uint64_t em_now_ns(void);
EM_API uint64_t em_mono_ns(void);

/* -------------------------------------------------------------- messages */

/* Message types (one byte in the frame header). */
enum em_msg_type {
  EM_MSG_HELLO = 1,   /* handshake, both directions */
  EM_MSG_OK = 2,      /* acknowledgement without a payload */
  EM_MSG_ERROR = 3,   /* reply: the request failed; body is an error map */
  EM_MSG_DATA = 4,    /* reserved for trainer data */
  EM_MSG_MODEL = 5,   /* reserved for model upload (edgeml bench) */
  EM_MSG_PROCESS = 6, /* reserved: process one input (edgeml bench) */
  EM_MSG_OUTPUT = 7,  /* reserved: output of PROCESS */
  EM_MSG_STATS = 8,   /* reserved: target statistics */
  EM_MSG_PING = 9,
  EM_MSG_PONG = 10,
  EM_MSG_PUBLISH = 11,  /* server -> subscriber: a broadcast value; req_id
                           is its version (1, 2, ...), body the payload */
  EM_MSG_REQUEST = 12,  /* body: [method (str), payload] */
  EM_MSG_REPLY = 13,    /* body: payload */
  EM_MSG_SUBSCRIBE = 14, /* subscriber -> server: "send me the next value
                            newer than version req_id"; body nil */
  EM_MSG_AUTH = 15       /* client -> server in the handshake: the token
                            proof, {"proof": bin 32} (docs/protocol.md) */
};

/* msgpack ext types used in bodies. */
enum em_ext_type {
  EM_EXT_ARRAY = 1,     /* out-of-band array; see em_array */
  EM_EXT_TUPLE_TAG = 2, /* first element of a msgpack array that is a tuple */
  EM_EXT_SET_TAG = 3    /* first element of a msgpack array that is a set */
};

#define EM_FRAME_HEADER_BYTES 64
#define EM_BLOB_ALIGN 64
#define EM_ARRAY_MAX_NDIM 32
#define EM_DTYPE_MAX 15

typedef struct em_blob {
  const void *data; /* borrowed; see the owner of the containing struct */
  size_t len_bytes;
} em_blob;

typedef struct em_buf em_buf; /* pooled, ref-counted, 64-byte aligned memory */

/* A received message. Owns one em_buf that holds the whole frame; body and
 * blobs point into it. Free with em_msg_free (any thread). */
typedef struct em_msg {
  uint8_t type;
  uint16_t flags;
  uint64_t req_id;
  uint64_t ts_ns[4]; /* sender timestamps, see docs/protocol.md */
  const uint8_t *body;
  size_t body_len;
  uint32_t nblobs;
  em_blob *blobs;      /* nblobs entries, owned by the message */
  em_buf *buf;         /* owned reference to the frame memory */
  size_t frame_bytes;  /* whole frame, header included */
} em_msg;

EM_API void em_msg_free(em_msg *m);

/* Retain/release the frame memory of a message separately from the message,
 * e.g. to keep arrays that view it alive. Any thread. */
EM_API em_buf *em_buf_retain(em_buf *b);
EM_API void em_buf_release(em_buf *b);
EM_API uint8_t *em_buf_data(em_buf *b);
EM_API size_t em_buf_size(em_buf *b);

/* An array decoded from an EM_EXT_ARRAY ext: a view into a message blob. */
typedef struct em_array {
  char dtype[EM_DTYPE_MAX + 1]; /* numpy dtype.str, e.g. "<f4", "|u1" */
  uint32_t ndim;
  uint64_t shape[EM_ARRAY_MAX_NDIM];
  uint32_t itemsize;
  int is_scalar;      /* sent as a numpy scalar, not an ndarray */
  uint32_t blob;      /* index into the message's blobs */
  const void *data;   /* points into the message; lives as long as its buf */
  size_t len_bytes;
} em_array;

/* ---------------------------------------------------------------- values
 *
 * Reading a received body. Two ways, over the same checks (nesting <= 32,
 * every declared length fits in the bytes that remain, a decode-cost bound
 * against bodies that would expand into huge object trees, no trailing
 * bytes), so a lying body is EM_EDECODE, never a crash or a huge
 * allocation:
 *
 *  - em_msg_value + em_value_get/at/em_iter: random access for programs.
 *    em_msg_value checks the whole body once; the navigation below it then
 *    cannot fail on a malformed body.
 *  - em_reader: one pass, in pre-order (a container, then its elements),
 *    checking as it goes; what language bindings use to build their own
 *    objects straight from the bytes (edgeml's Python decoder does).
 *
 * An em_value points into its message: it is valid while the message is
 * (em_msg_free ends it). Strings are not NUL-terminated (use len, or
 * em_value_cstr). Tuples and sets are msgpack arrays tagged by their first
 * element (docs/protocol.md); values report them as EM_T_TUPLE/EM_T_SET
 * with the tag already skipped. Out-of-band numpy arrays are EM_T_NDARRAY;
 * em_value_ndarray gives their dtype, shape and data (zero-copy).
 * No value function allocates; all are thread-safe on distinct values (a
 * message may be read by several threads at once). */

typedef enum em_type {
  EM_T_NIL = 1,
  EM_T_BOOL,    /* as.b: 0 or 1 */
  EM_T_INT,     /* as.i: any integer that fits int64_t */
  EM_T_UINT,    /* as.u: an integer above INT64_MAX */
  EM_T_FLOAT,   /* as.f (float32 on the wire is widened) */
  EM_T_STR,     /* as.str, len bytes of UTF-8 (not checked here) */
  EM_T_BIN,     /* as.bin, len bytes */
  EM_T_LIST,    /* len elements */
  EM_T_TUPLE,   /* len elements */
  EM_T_SET,     /* len elements */
  EM_T_MAP,     /* len key/value pairs */
  EM_T_NDARRAY, /* see em_value_ndarray */
  EM_T_EXT      /* another msgpack ext: ext_type, as.bin, len */
} em_type;

/* Name of a type ("map", "ndarray"); never NULL. */
EM_API const char *em_type_name(int type);

typedef struct em_value {
  em_type type;
  uint32_t len;
  union {
    int b;
    int64_t i;
    uint64_t u;
    double f;
    const char *str;
    const uint8_t *bin;
  } as;
  int8_t ext_type;
  /* private: where the value's elements (or ext data) lie */
  const em_msg *_msg;
  const uint8_t *_p, *_end;
} em_value;

/* The whole body of `m` as a value, after checking all of it.
 * EM_OK, or EM_EDECODE (the body is malformed). */
EM_API int em_msg_value(const em_msg *m, em_value *out);

/* A REQUEST's body [method, payload]: both as values (method is EM_T_STR).
 * EM_OK, or EM_EDECODE (malformed, or not [str, value]). */
EM_API int em_msg_request(const em_msg *m, em_value *method, em_value *payload);

/* An ERROR message's "type: message" (e.g. "ValueError: bad frame"),
 * NUL-terminated and cut to `cap`. Returns EM_OK, or EM_EDECODE when `m`
 * is not a readable error map (buf then says so). */
EM_API int em_msg_error(const em_msg *m, char *buf, size_t cap);

/* The value of key `key` (a str key) in map `map`: 1 and *out when found,
 * 0 when absent, EM_EINVAL when `map` is not a map. */
EM_API int em_value_get(const em_value *map, const char *key, em_value *out);

/* Element i of a list, tuple or set: EM_OK, or EM_EINVAL (not one, or i
 * out of range). O(i): use em_iter to walk. */
EM_API int em_value_at(const em_value *seq, uint32_t i, em_value *out);

typedef struct em_iter {
  /* private */
  const em_msg *_msg;
  const uint8_t *_p, *_end;
  uint64_t _left;
} em_iter;

/* Walk a list, tuple, set or map (for a map: key, value, key, value...).
 * em_iter_next returns 1 and *out, or 0 at the end (also for a value that
 * is not a container). */
EM_API void em_iter_init(em_iter *it, const em_value *container);
EM_API int em_iter_next(em_iter *it, em_value *out);

/* The array behind an EM_T_NDARRAY value (data points into the message).
 * EM_OK, EM_EINVAL (not an ndarray), EM_EDECODE (its header is malformed,
 * names no blob, or disagrees with the blob's size). */
EM_API int em_value_ndarray(const em_value *v, em_array *out);

/* Scalars with conversion: an INT/UINT as int64_t (EM_EINVAL if out of
 * range), as uint64_t (EM_EINVAL if negative), as double (INT, UINT and
 * FLOAT), a BOOL. EM_OK or EM_EINVAL (another type). */
EM_API int em_value_int(const em_value *v, int64_t *out);
EM_API int em_value_uint(const em_value *v, uint64_t *out);
EM_API int em_value_double(const em_value *v, double *out);
EM_API int em_value_bool(const em_value *v, int *out);

/* 1 when v is the string s, else 0. */
EM_API int em_value_is(const em_value *v, const char *s);

/* Copy a STR into buf, NUL-terminated: EM_OK, EM_EINVAL (not a str, or it
 * holds a NUL byte), EM_ETOOBIG (does not fit in cap, buf gets the
 * truncated prefix). */
EM_API int em_value_cstr(const em_value *v, char *buf, size_t cap);

/* One pass over a body in pre-order. After em_read returns a container of
 * len n, the next n reads (2n for a map: key, value...) are its elements.
 * Every read is checked; at the first error the reader stops and
 * em_reader_why says why. */
#define EM_READER_DEPTH 32
typedef struct em_reader {
  /* private */
  const em_msg *_msg;
  const uint8_t *_p, *_end;
  uint64_t _cost, _limit;
  const char *_why;
  int _depth;
  uint64_t _left[EM_READER_DEPTH + 1];
} em_reader;

/* Start reading m's body (its one top-level value). Any thread. */
EM_API void em_reader_init(em_reader *r, const em_msg *m);
/* The next value: EM_OK, or EM_EDECODE (malformed, or nothing is left). */
EM_API int em_read(em_reader *r, em_value *out);
/* em_read that also fills *arr when the value is an EM_T_NDARRAY (the
 * array header is parsed once, for the check and for the caller; *arr is
 * untouched for other values). */
EM_API int em_read_array(em_reader *r, em_value *out, em_array *arr);
/* Skip the next value and everything inside it: EM_OK or EM_EDECODE. */
EM_API int em_read_skip(em_reader *r);
/* EM_OK when the whole body has been read and nothing follows it, else
 * EM_EDECODE ("trailing bytes" or "body truncated"). */
EM_API int em_reader_finish(em_reader *r);
/* Why the last call failed (a static string), or NULL. */
EM_API const char *em_reader_why(const em_reader *r);

/* ------------------------------------------------------ outgoing payloads
 *
 * An em_payload is a message body being built (msgpack with out-of-band
 * arrays) plus the room for the frame header. Write exactly one top-level
 * value (a request: em_payload_begin_request, then one value). Containers
 * declare their size and are followed by that many values (2x for a map:
 * key, value, ...). Arrays are borrowed, never copied: their memory must
 * stay valid until the message is sent (a client call: until the call
 * returns; a server reply: until the release callback runs).
 *
 * Every em_put_* returns EM_OK or an error code, and the first error also
 * sticks: a send of a payload that failed to build, or whose containers
 * are not complete, fails with EM_EENCODE without sending anything, so a
 * program may check once, at the send.
 * One thread builds a payload at a time. */
typedef struct em_payload em_payload;

/* A new empty payload (owned by the caller: em_payload_free), NULL when out
 * of memory. Reuse one with em_payload_reset: its memory is kept. */
EM_API em_payload *em_payload_new(void);
EM_API void em_payload_free(em_payload *p); /* runs release if pending; NULL ok */
EM_API void em_payload_reset(em_payload *p); /* empty it; runs release */
/* The sticky error (EM_OK while the payload is fine). */
EM_API int em_payload_error(const em_payload *p);
/* Called once, on the thread that finishes sending, when the borrowed
 * arrays are no longer read (after the write completed or failed, or at
 * reset/free if never sent). */
EM_API void em_payload_on_release(em_payload *p, void (*fn)(void *ctx), void *ctx);

EM_API int em_put_nil(em_payload *p);
EM_API int em_put_bool(em_payload *p, int v);
EM_API int em_put_int(em_payload *p, int64_t v);
EM_API int em_put_uint(em_payload *p, uint64_t v);
EM_API int em_put_double(em_payload *p, double v);
EM_API int em_put_str(em_payload *p, const char *s, size_t len);
EM_API int em_put_cstr(em_payload *p, const char *s); /* NUL-terminated */
EM_API int em_put_bin(em_payload *p, const void *data, size_t len);
EM_API int em_put_list(em_payload *p, uint32_t n);  /* then n values */
EM_API int em_put_tuple(em_payload *p, uint32_t n); /* then n values */
EM_API int em_put_set(em_payload *p, uint32_t n);   /* then n values */
EM_API int em_put_map(em_payload *p, uint32_t n);   /* then n key, value pairs */
/* A numpy array: dtype a numpy dtype.str ("<f4", "|u1", "<i8"...), data
 * C-contiguous, len_bytes = item size x product of shape (EM_EINVAL
 * otherwise). Borrowed, see above. ndim 0 is a 0-d array. */
EM_API int em_put_ndarray(em_payload *p, const char *dtype, uint32_t ndim, const uint64_t *shape,
                          const void *data, size_t len_bytes);
/* A numpy scalar (np.float32(1.5) arrives in Python as that type); data
 * is one item of dtype, copied-by-reference like an array. */
EM_API int em_put_scalar(em_payload *p, const char *dtype, const void *data, size_t len_bytes);
/* A copy of a received value (its arrays stay borrowed from their
 * message: keep the message alive until this payload is sent). */
EM_API int em_put_value(em_payload *p, const em_value *v);

/* Start the body of a REQUEST: [method, payload]; then write one value. */
EM_API int em_payload_begin_request(em_payload *p, const char *method, size_t method_len);
/* Reset p and start an error body {"type", "message", "traceback", ...}
 * with `extra` more key/value pairs to follow (write them next). `type`
 * names the exception ("edgeml.InvalidKeyError", "ValueError"; Python
 * callers get that class when it is an edgeml one, else RemoteError);
 * traceback may be NULL. A handler that wrote one returns EM_MSG_ERROR. */
EM_API int em_payload_begin_error(em_payload *p, const char *type, const char *message, const char *traceback,
                                  uint32_t extra);

/* A whole frame in memory (for files, tests and test vectors): *out is
 * malloc'd (free() it), *len its size; all timestamps are zero.
 * EM_OK, EM_EENCODE (p failed to build or is incomplete), ENOMEM, ETOOBIG. */
EM_API int em_frame_encode(em_payload *p, uint8_t type, uint64_t req_id, uint8_t **out, size_t *len);
/* Parse exactly one frame of `len` bytes, with every check a receiver
 * makes (max_bytes 0 = 1 GiB). On EM_OK *out is owned by the caller
 * (em_msg_free); on error *why (may be NULL) gets a reason (static, or
 * per thread until the next call).
 * Errors: EPROTO, EVERSION, ETOOBIG, ENOMEM. The body is not decoded. */
EM_API int em_frame_decode(const void *data, size_t len, uint64_t max_bytes, em_msg **out, const char **why);

/* ---------------------------------------------------------------- client */

typedef struct em_client em_client;

typedef struct em_client_opts {
  uint64_t connect_timeout_ns;   /* total time to keep retrying a refused
                                    connect at open; 0 = one attempt */
  uint64_t max_message_bytes;    /* largest frame accepted; 0 = default 1 GiB */
  const char *service;           /* server service to expect ("inference"),
                                    NULL = any */
  /* Called on the calling thread when a wait is interrupted by a signal;
   * non-zero makes the call fail with EM_EINTR. May be NULL. */
  int (*check_interrupt)(void *ud);
  void *interrupt_ud;
  /* If set, em_client_open writes why it failed here (e.g. the server's
   * reason for refusing the handshake), NUL-terminated. */
  char *errbuf;
  size_t errbuf_len;
  /* Shared secret for the handshake's challenge-response (docs/security.md);
   * NULL or "" = none. Copied at open. A client with a token refuses a
   * server without one, and the other way round. */
  const char *token;
} em_client_opts;

/* Fill o with the defaults (every field zero/NULL: the defaults above).
 * Start from this so fields added later get their defaults. */
EM_API void em_client_opts_init(em_client_opts *o);

/* Connect to host:port and do the handshake. On success *out is owned by the
 * caller (em_client_close). On failure *out is NULL. Blocks. Any thread.
 * Errors: ERESOLVE, ECONNREFUSED, ETIMEDOUT, EHANDSHAKE, EVERSION, EIO. */
EM_API int em_client_open(em_client **out, const char *host, uint16_t port,
                   const em_client_opts *opts);

/* Send one frame of `type` with body `p` and wait for its reply.
 * Thread-safe: calls from several threads are multiplexed on the connection
 * by request id; the calling thread does its own I/O (no handoff when it is
 * the only call in flight). Blocks up to timeout_ns.
 * Only replies that can answer `type` are accepted: REPLY or ERROR for a
 * REQUEST, PONG for a PING, REPLY, OK or ERROR for other types; any other
 * frame (a PUBLISH, a HELLO, an OK to a REQUEST...) closes the connection
 * and fails the calls on it with EPROTO.
 * On EM_OK *reply is a REPLY/OK/PONG message owned by the caller; on
 * EM_EREMOTE it is the ERROR message (its body is a map with "type",
 * "message", "traceback"); on any other code *reply is NULL.
 * `p` stays the caller's; its blobs are no longer read when this returns.
 * A broken connection is re-dialled at the next call; a refused connect
 * (a server restarting) is retried with backoff for up to connect_timeout
 * within the call's timeout. A request is never re-sent by the library.
 * Errors: ETIMEDOUT, ECONNCLOSED, ECONNREFUSED, EPROTO, ETOOBIG, ECLOSED. */
EM_API int em_client_request(em_client *c, uint8_t type, em_payload *p,
                      uint64_t timeout_ns, em_msg **reply);

/* The handshake body the server sent (msgpack), valid until close. */
EM_API const uint8_t *em_client_server_hello(em_client *c, size_t *len);

/* Close the connection; calls in flight fail with ECLOSED, and the memory
 * is freed only after every thread inside a call (or queued to start one)
 * has returned. Safe once; the client must not be used after it returns
 * and no new call may begin once it has begun. Any thread except one
 * inside a call on this client.
 * After fork(): in the child every call returns EFORKED without touching
 * the connection (the parent's), shutdown does nothing and close only
 * closes the child's copy of the descriptor; open a new client there. */
EM_API void em_client_close(em_client *c);

/* Make in-flight and future calls fail with ECLOSED without freeing. */
EM_API void em_client_shutdown(em_client *c);

/* 1 in a child process after fork() of the process that opened c. */
EM_API int em_client_forked(const em_client *c);

/* ---------------------------------------------------------------- timing
 *
 * Every frame carries its send time and every reply the server's receive,
 * handler-start, handler-end and send times (docs/protocol.md, "Timing"), so
 * each call gives the four NTP timestamps. The client turns them into
 * per-call stages and keeps running statistics; see docs/timing.md.
 *
 *   t0 client starts writing the request     (client clock)
 *   t1 server has read the whole request     (server clock)
 *   t2 handler starts    t3 handler ends     (server clock)
 *   t4 server starts writing the reply       (server clock)
 *   t5 client has read the whole reply       (client clock)
 *
 * offset = server clock - client clock. Estimated per call as
 * ((t1 - t0) + (t4 - t5)) / 2 with delay (t5 - t0) - (t4 - t1); the client
 * uses the offset of the lowest-delay sample (calls and pings) of the last
 * 30 s (NTP's minimum-delay filter). That estimate is
 * exact only if the path is symmetric: its error is at most half the delay
 * of the sample it came from, plus half the up/down asymmetry. A client
 * opened with clocks declared synchronised uses offset 0 instead. */

enum {
  EM_STAGE_RTT,      /* t5 - t0 */
  EM_STAGE_UPLOAD,   /* t1 - offset - t0: request one-way, transfer included */
  EM_STAGE_QUEUE,    /* t2 - t1 */
  EM_STAGE_HANDLER,  /* t3 - t2 */
  EM_STAGE_REPLY,    /* t4 - t3: server encodes and queues the reply */
  EM_STAGE_DOWNLOAD, /* t5 - (t4 - offset): reply one-way */
  EM_STAGE_ENCODE,   /* client-side, recorded by the binding (em_client_note) */
  EM_STAGE_DECODE,   /* client-side, recorded by the binding */
  EM_STAGE_BYTES_UP,   /* request frame bytes */
  EM_STAGE_BYTES_DOWN, /* reply frame bytes */
  EM_STAGE_COUNT
};
EM_API extern const char *const em_stage_names[EM_STAGE_COUNT];

typedef struct em_call_timing {
  uint64_t t[6];          /* t0..t5 above, ns since the Unix epoch */
  int64_t offset_ns;      /* server - client clock used for the one-way stages */
  uint64_t offset_err_ns; /* bound on its error if the path is symmetric */
  int synchronized;       /* 1: clocks declared synchronised (offset 0) */
  int64_t stage[EM_STAGE_COUNT]; /* ns (bytes for the BYTES stages); one-way
                                    stages may be < 0 when the offset is off */
} em_call_timing;

typedef struct em_stage_stats {
  uint64_t count;
  double mean;
  /* p50/p90/p99 come from a log-linear histogram (32 buckets per power of
   * two): within 1.6% of the true order statistic. min and max are exact. */
  double p50, p90, p99, min, max;
} em_stage_stats;

typedef struct em_client_stats {
  uint64_t calls;          /* calls with a reply (REPLY, ERROR or PONG) */
  em_stage_stats stage[EM_STAGE_COUNT];
  int64_t offset_ns;       /* current estimate (0 if synchronized) */
  uint64_t offset_err_ns;  /* half the delay of the sample it came from */
  uint64_t offset_samples; /* seconds with samples in the filter window */
  uint64_t offset_age_ns;  /* since the chosen sample was taken */
  int synchronized;
} em_client_stats;

/* Declare the two hosts' clocks synchronised (PTP, or one host): one-way
 * stages then use offset 0 instead of the estimate. Any thread. */
EM_API void em_client_set_synchronized(em_client *c, int yes);

/* Like em_client_request; also fills *timing (may be NULL) when a reply
 * came. Every call's timing also feeds the client's statistics. */
EM_API int em_client_request_timed(em_client *c, uint8_t type, em_payload *p, uint64_t timeout_ns, em_msg **reply,
                            em_call_timing *timing);

/* Add a client-side stage sample (EM_STAGE_ENCODE/DECODE) to the stats. */
EM_API void em_client_note(em_client *c, int stage, int64_t value);

/* Running statistics since open or the last reset. Any thread. */
EM_API void em_client_get_stats(em_client *c, em_client_stats *st);
EM_API void em_client_reset_stats(em_client *c); /* keeps the clock estimate */

/* Nanoseconds since this client's last reply (or open). Any thread. */
EM_API uint64_t em_client_idle_ns(em_client *c);

/* ---------------------------------------------------------------- server */

typedef struct em_server em_server;

/* A request handler. Runs on the server's loop thread, one request at a
 * time. `req` is borrowed for the call (retain req->buf to keep its memory,
 * or take the whole request with em_server_defer).
 * Fill `reply` (already initialised, empty) and return EM_MSG_REPLY, or
 * EM_MSG_ERROR with an error map as body; or take the request with
 * em_server_defer and return EM_MSG_DEFER (`reply` is then not sent: the
 * answer comes through the em_pending). A handler that deferred and returns
 * EM_MSG_REPLY/ERROR anyway has that reply dropped (logged as an error);
 * EM_MSG_DEFER without em_server_defer closes the connection.
 * EM_EDECODE closes the connection
 * as a malformed body (counted in protocol_errors); any other return value
 * closes it too (use it for a request the handler cannot accept; a request
 * deferred before that is then answered with ECONNCLOSED). */
typedef int (*em_handler_fn)(void *ud, const em_msg *req, em_payload *reply);

/* Deferred replies: a handler takes a request, returns at once, and the
 * reply is sent later from any thread (e.g. a worker that ran a batch of
 * requests from many connections). A connection may have many requests
 * deferred at once (they count toward its pipelining: above 4096 of them,
 * or 64 MiB of their frames, it is not read until some are answered), and
 * its replies may come in any order (the client matches them by id).
 * Stop and close: the replies queued by em_pending_reply before the loop
 * begins to stop (em_server_stop, a tick) are written before
 * em_server_run returns; from then on em_pending_reply returns ECLOSED and
 * sends nothing, so answer (or drop) what is outstanding before stopping if
 * it must reach the callers (em_server_stats.deferred counts it). A
 * pending may outlive em_server_close: it holds a reference to what it
 * needs, freed with the last one (reply or drop every pending, also after
 * close). After fork(), in the child, em_pending_reply returns EFORKED and
 * em_pending_drop does nothing, both leaving p as it is (the parent's);
 * em_pending_alive is 0 there. */

/* A handler return value (not a message type): the reply comes later,
 * through the em_pending the handler took with em_server_defer. */
#define EM_MSG_DEFER 0x100
typedef struct em_pending em_pending;
/* Inside a handler (loop thread): take `req` for a later reply. The
 * request message stays valid (its memory is retained) until the pending
 * is answered or dropped. NULL when out of memory (then reply at once), or
 * when `req` is not the request of the handler call running now or was
 * deferred already. On success *p is owned by the caller, who must answer
 * it with em_pending_reply or free it with em_pending_drop. */
EM_API em_pending *em_server_defer(em_server *s, const em_msg *req);
/* The request (valid until reply/drop). Any thread. */
EM_API const em_msg *em_pending_request(const em_pending *p);
/* Send the reply (EM_MSG_REPLY or EM_MSG_ERROR with `reply` as built)
 * from any thread; frees p (also on error). The frame is built and copied
 * here, so `reply` and its borrowed arrays are the caller's again when
 * this returns (it is reset, empty and ready for reuse; its release hook
 * has run). The reply may borrow arrays from the request (they are read
 * before the request is freed). The loop thread writes it, one write per
 * reply, in the order of the em_pending_reply calls. EM_OK means handed to
 * the loop: a connection that closes before the write loses it, as it
 * would a reply sent at once. Several threads may reply at once.
 * Timestamps: t2 = when the request was deferred, t3 = this call (so the
 * client's HANDLER stage is the queue+batch time, and REPLY the copy).
 * Errors: ECONNCLOSED (the connection closed meanwhile: nothing sent),
 * ECLOSED (the server stopped), ENOMEM, ETOOBIG (over max_message_bytes),
 * EENCODE (reply failed to build or is incomplete), EINVAL (p or reply
 * NULL, or another type) (p freed in all cases); EFORKED (in a fork child:
 * nothing touched, p not freed). */
EM_API int em_pending_reply(em_pending *p, int type, em_payload *reply);
/* Free without replying (the caller will get no answer: use only when its
 * connection is known closed, or at shutdown). Any thread. NULL ok. */
EM_API void em_pending_drop(em_pending *p);
/* 1 while the request's connection is still open (a worker may skip work
 * for callers that have gone). Any thread; approximate. */
EM_API int em_pending_alive(const em_pending *p);

/* Called on the loop thread every tick_ns while the server runs (e.g. to
 * check for signals); a non-zero return stops the server. */
typedef int (*em_tick_fn)(void *ud);

typedef void (*em_log_fn)(void *ud, int level, const char *msg);
enum { EM_LOG_DEBUG = 10, EM_LOG_INFO = 20, EM_LOG_WARNING = 30, EM_LOG_ERROR = 40 };

typedef struct em_server_opts {
  const char *host;            /* bind address, e.g. "0.0.0.0", "::" */
  uint16_t port;               /* 0 = any free port (see em_server_port) */
  const char *service;         /* service name sent in the handshake */
  const uint8_t *hello_info;   /* msgpack value added to the handshake reply */
  size_t hello_info_len;       /* (copied at open) */
  uint64_t max_message_bytes;  /* 0 = default 1 GiB */
  em_handler_fn handler;       /* NULL: a broadcast-only server (REQUEST is
                                  answered with an ERROR) */
  struct em_pool *recv_pool;   /* received frames are allocated from this
                                  pool (retained by the server), e.g. a
                                  pinned pool (em_cuda_pinned_pool) so that
                                  a GPU server's requests land in page-locked
                                  memory; NULL = the server's own pool */
  int handler_checks_body;     /* 1: the handler reads every request body
                                  with a checking reader (em_reader, or
                                  em_msg_value/em_msg_request) and returns
                                  EM_EDECODE for a malformed one, so the
                                  server does not check it first (one pass
                                  over the body instead of two). 0: bodies
                                  are checked before the handler runs. */
  void *handler_ud;
  em_tick_fn tick;             /* may be NULL */
  void *tick_ud;
  uint64_t tick_ns;
  em_log_fn log;               /* NULL = stderr */
  void *log_ud;
  const char *token;           /* shared secret clients must prove they know
                                  (challenge-response, never sent); NULL or
                                  "" = none. Copied at open. */
  uint64_t handshake_timeout_ns; /* close connections that have not finished
                                    the handshake after this; 0 = 10 s */
  uint64_t progress_timeout_ns; /* after the handshake, close a connection
                                   whose frame in progress has not advanced
                                   by 64 KiB (or completed) within this: a
                                   peer trickling bytes to hold memory and a
                                   connection. Connections idle between
                                   frames are not affected. 0 = 30 s */
  uint64_t max_pending_bytes;  /* memory budget for frames still being
                                  received, all connections together: a
                                  frame over 64 KiB that does not fit waits
                                  (its connection is not read) until memory
                                  frees; one frame always fits. 0 = an
                                  eighth of physical memory, at least 256
                                  MiB (docs/security.md) */
} em_server_opts;

/* Fill o with the defaults: host "0.0.0.0", port 0, service "edgeml", no
 * handler, no token, the timeouts and limits above. */
EM_API void em_server_opts_init(em_server_opts *o);

/* Create a server and bind and listen on host:port, so errors such as
 * EADDRINUSE come back here, synchronously. The first server of a process
 * sets SIGPIPE to ignored if it still has its default action (which would
 * kill the process when a reply is written to a peer that has gone; the
 * write fails with EPIPE instead and that connection closes). Clients send
 * with MSG_NOSIGNAL and change nothing. It accepts nothing until
 * em_server_run. *out is owned by the caller (em_server_close). Any thread. */
EM_API int em_server_open(em_server **out, const em_server_opts *opts);

/* The bound port (useful with port 0). */
EM_API uint16_t em_server_port(const em_server *s);

/* Run the server on the calling thread until em_server_stop (or a tick
 * returns non-zero). Handlers run on this thread. When it returns, the
 * listening socket and every connection are closed (the port is free), and
 * replies already computed have been handed to the kernel. Returns EM_OK,
 * or EM_EINTR when a tick stopped it. Call at most once per server. */
EM_API int em_server_run(em_server *s);

/* Ask the server to stop. Any thread, any number of times, async-signal
 * unsafe. Returns at once; em_server_wait waits for run to return. */
EM_API void em_server_stop(em_server *s);

/* Wait until em_server_run has returned (or was never called), up to
 * timeout_ns. EM_OK or EM_ETIMEDOUT. Any thread other than the loop's. */
EM_API int em_server_wait(em_server *s, uint64_t timeout_ns);

/* 1 in a child process after fork() of the process that opened s. */
EM_API int em_server_forked(const em_server *s);

/* 1 while em_server_run runs on the calling thread. */
EM_API int em_server_on_loop_thread(const em_server *s);

/* Counters, for repr() and tests. Any thread (approximate while running). */
typedef struct em_server_stats {
  uint64_t connections_open;
  uint64_t connections_total;
  uint64_t requests;
  uint64_t errors_sent;
  uint64_t protocol_errors;
  uint64_t auth_failures;   /* handshakes refused for a wrong or missing token */
  uint64_t subscribers;     /* open connections that subscribed */
  uint64_t publishes;       /* values published (the current version) */
  uint64_t publish_sends;   /* PUBLISH frames written */
  uint64_t pending_bytes;   /* held now in frames still being received */
  uint64_t max_pending_bytes; /* the budget for them */
  uint64_t reads_paused;    /* times a connection waited for that budget */
  uint64_t stalled_closed;  /* connections closed by progress_timeout */
  uint64_t deferred;        /* pendings (em_server_defer) not yet answered or dropped */
} em_server_stats;
EM_API void em_server_get_stats(const em_server *s, em_server_stats *st);

/* Free the server. Requires that run has returned or never started; waits
 * for threads still returning from em_server_stop/wait/publish/get_stats
 * (none may enter after close has begun). In a child process after fork()
 * stop and wait do nothing (the loop thread is the parent's), publish
 * returns EFORKED, and close only closes the child's copies of the
 * server's sockets (so the port and the parent's connections are not held
 * by the child) and frees nothing. */
EM_API void em_server_close(em_server *s);

/* ------------------------------------------------------------- broadcast
 *
 * Any server also broadcasts: em_server_publish sets the server's current
 * value, and every subscribed connection gets it. Broadcasts keep the
 * latest value only (see docs/protocol.md, "Broadcast"): a subscriber asks
 * for one value at a time (SUBSCRIBE with the version it has) and gets the
 * newest value the server holds at that moment, never a backlog; one that
 * subscribes after a publish gets the current value at once. */

/* Publish the payload `p` (a whole body, e.g. one map) as the server's new
 * current value. The frame is built and copied once into memory the server
 * owns, so `p` and its borrowed blobs stay the caller's and may change as
 * soon as this returns. Subscribers waiting for a value are sent it by the
 * loop thread. Works before em_server_run (the value is then sent once the
 * server runs). *version_out (may be NULL) receives the value's version.
 * Any thread; does not block on the network. Errors: ENOMEM, ETOOBIG
 * (larger than the server's max_message_bytes), ECLOSED (run has returned). */
EM_API int em_server_publish(em_server *s, em_payload *p, uint64_t *version_out);

/* A subscription to a server's broadcasts: its own connection, no thread.
 * The thread that calls em_sub_next does the I/O. */
typedef struct em_sub em_sub;

/* Connect to host:port and handshake (opts as for em_client_open). On
 * success *out is owned by the caller (em_sub_close). Blocks. Any thread.
 * Errors: as em_client_open. */
EM_API int em_sub_open(em_sub **out, const char *host, uint16_t port, const em_client_opts *opts);

/* Wait up to timeout_ns for a value newer than the last one returned and
 * return it as a PUBLISH message (*out owned by the caller; its req_id is
 * the version). If the connection is lost, the next calls re-dial (waiting
 * between attempts 20 ms doubling to 1 s, jittered; docs/protocol.md
 * "Reconnecting") and resume; a server that
 * restarted is detected by its handshake and its values are taken from
 * version 1 again. A re-dial's handshake may take up to 500 ms past
 * timeout_ns (so it is not cut off at the end of a short call); it is
 * bounded by connect_timeout. After ETIMEDOUT the request for a value stays
 * outstanding, so call again promptly: a value pushed meanwhile is
 * returned by the next call as it was. One thread at a time.
 * Errors: ETIMEDOUT (nothing new yet), ECLOSED (em_sub_shutdown),
 * ECONNCLOSED (the connection was lost; call again to reconnect),
 * ECONNREFUSED/ERESOLVE/EHANDSHAKE (a re-dial failed), EPROTO, ETOOBIG,
 * EINTR (check_interrupt asked to stop). */
EM_API int em_sub_next(em_sub *s, uint64_t timeout_ns, em_msg **out);

/* 1 while the subscription has a working connection. Any thread. */
EM_API int em_sub_connected(const em_sub *s);

/* Make a waiting and every later em_sub_next fail with ECLOSED. Any
 * thread, any number of times. */
EM_API void em_sub_shutdown(em_sub *s);

/* Close and free; no em_sub_next may be running. */
EM_API void em_sub_close(em_sub *s);

#ifdef __cplusplus
}
#endif

/* The roles (Edge, Trainer, Inference servers and clients) on top of this. */
#include "edgeml_roles.h"
/* The CUDA layer (the runtime found at run time). */
#include "edgeml_cuda.h"
/* The dynamic batcher on deferred replies. */
#include "edgeml_batch.h"

#endif /* EDGEML_H */
