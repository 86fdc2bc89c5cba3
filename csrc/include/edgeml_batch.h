/* edgeml_batch.h: dynamic batching for C inference servers (the C peer of
 * edgeml/batching.py; docs/batching.md "From C"). Include edgeml.h (it
 * includes this), or this header alone (it includes edgeml.h).
 *
 * A batcher serves one batched interface. A server's handler takes each
 * request of that interface with em_server_defer and hands the em_pending
 * to em_batcher_submit (on the loop thread, which goes on at once). The
 * batcher's worker threads take the queued requests in arrival order,
 * stack those whose payloads have the same form along a new leading axis,
 * call the batch function once, split its one result and answer each
 * caller with em_pending_reply, as Python's InferenceServer does:
 *
 *   payload                     in the batch (n requests)
 *   an ndarray, shape S, dtype D one stacked array (n, *S) of dtype D, in
 *                               one C-contiguous buffer (em_batch_array,
 *                               key NULL)
 *   a map with str keys         per key: an ndarray value stacked as above
 *                               (same keys, dtypes and shapes in every
 *                               request of the batch; key order may
 *                               differ), any other value one per caller
 *                               (em_batch_value)
 *   anything else               refused at submit: an ERROR reply
 *                               edgeml.InvalidArgumentError naming the
 *                               interface (also a map with a non-str or a
 *                               repeated key, and a numpy scalar)
 *
 *   result (what fn wrote)      each caller i gets
 *   an ndarray, leading axis n  row i (a 1-d array gives numpy scalars)
 *   a list or tuple of n values value i
 *   a map                       per entry: its row / value i when the
 *                               value is one of the two above, else the
 *                               whole value (sent to every caller)
 *   anything else               an ERROR ValueError (every caller)
 *
 * A batch runs as soon as max_batch_size requests are queued, or when the
 * oldest has waited max_delay_ns (0: a free worker takes what is queued,
 * so batches form under load). Requests of another form wait for batches
 * of their own (oldest first). Callers whose connection has closed
 * (em_pending_alive 0) are dropped before their batch runs, and not
 * computed.
 *
 * Conventions as edgeml.h: EM_OK or a negative EM_E* code; ns times. */
#ifndef EDGEML_BATCH_H
#define EDGEML_BATCH_H

#include "edgeml.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct em_batcher em_batcher;
typedef struct em_batch em_batch; /* one batch, valid during the fn call */

/* The batch function. Runs on a worker thread (several at once with
 * workers > 1, each on its own batch). Read the batch with em_batch_*;
 * write exactly ONE value into `out` (an empty payload owned by the
 * batcher) and return EM_MSG_REPLY; the value is then split (see above).
 * Or em_payload_begin_error(out, ...) and return EM_MSG_ERROR: that error
 * reaches every caller of the batch. Any other return (a negative EM_E*
 * code), or a result that failed to build or is incomplete, sends every
 * caller a RuntimeError naming the interface and the code. `out` may
 * borrow the batch's memory (stacked arrays, the requests' arrays) and
 * memory of fn's own (free it from em_payload_on_release(out, ...), which
 * runs on this thread once the replies are built): the result is copied
 * before fn's batch is freed. With max_batch_size 1 there is no stacking
 * or splitting: fn gets each request alone (em_batch_kind
 * EM_BATCH_SINGLE, em_batch_value(b, NULL, 0, ...) its payload, which may
 * be any value) and its result is that caller's reply as it is. */
typedef int (*em_batch_fn)(void *ud, const em_batch *b, em_payload *out);

/* Memory for stacked arrays: alloc(ud, bytes) returns `bytes` (> 0) of
 * memory aligned to at least 64 bytes, or NULL (the batch then fails with
 * a MemoryError to its callers); free(ud, ptr) gives it back. Called on
 * worker threads (several at once with workers > 1). Each worker keeps
 * its buffers from batch to batch (one per stacked key, sized for
 * max_batch_size rows the first time, grown when a larger form comes) and
 * frees them when it ends (em_batcher_stop), so alloc is rare: a GPU
 * server may give page-locked memory: hooks that wrap em_cuda_host_alloc
 * / em_cuda_host_free of its em_cuda (alloc_ud = the em_cuda; copies to
 * the device from it are asynchronous; docs/batching.md "From C"). */
typedef void *(*em_batch_alloc_fn)(void *ud, size_t bytes);
typedef void (*em_batch_free_fn)(void *ud, void *ptr);

typedef struct em_batcher_opts {
  const char *name;          /* the interface's name, for error messages
                                (copied); NULL = "batched" */
  uint32_t max_batch_size;   /* >= 1 (1: no batching, see em_batch_fn) */
  uint64_t max_delay_ns;     /* how long the oldest request may wait for
                                a fuller batch; 0 = none */
  uint32_t workers;          /* worker threads, >= 1 */
  em_batch_fn fn;            /* required */
  void *ud;                  /* fn's */
  em_batch_alloc_fn alloc;   /* NULL (with free NULL) = aligned_alloc/free */
  em_batch_free_fn free;
  void *alloc_ud;
  em_log_fn log;             /* reply failures (debug) and stop; NULL = none */
  void *log_ud;
} em_batcher_opts;

/* Defaults: name NULL, max_batch_size 8, max_delay_ns 0, workers 1, no fn,
 * the default allocator, no log. */
EM_API void em_batcher_opts_init(em_batcher_opts *o);

/* Make a batcher and start its workers. On success *out is owned by the
 * caller (em_batcher_free); on failure *out is NULL. fn, ud and the
 * allocator must stay valid until em_batcher_free. Any thread.
 * Errors: EINVAL (opts NULL, fn NULL, max_batch_size or workers 0, or
 * alloc without free or free without alloc), ENOMEM (also: no thread). */
EM_API int em_batcher_new(em_batcher **out, const em_batcher_opts *opts);

/* Queue a deferred request (p from em_server_defer; the batcher owns p
 * from this call on, on success and on failure: it answers or drops it).
 * Reads the request (em_msg_request) and computes its form. EM_OK: queued.
 * Otherwise p has been answered already with an ERROR: EINVAL (p's
 * payload is not batchable: edgeml.InvalidArgumentError naming the
 * interface; or p NULL: nothing sent), EDECODE (the body is not [method,
 * payload]: edgeml.InvalidArgumentError), ECLOSED (em_batcher_stop has
 * begun: edgeml.ClosedError), ENOMEM (MemoryError). Any thread; usually
 * the server's handler on the loop thread, which then returns
 * EM_MSG_DEFER whatever this returned. Does not block on the workers. */
EM_API int em_batcher_submit(em_batcher *b, em_pending *p);

/* Stop: new submits are refused (ECLOSED above), what is queued runs at
 * once (in batches, without waiting for max_delay) and is answered, then
 * the workers end and are joined. Blocks until then. Call it while the
 * server still runs (its loop writes the replies): from another thread
 * before em_server_stop, or from a tick on the loop thread (the replies
 * are then written after the tick returns). Not from fn. Any number of
 * times; any thread but a worker. */
EM_API void em_batcher_stop(em_batcher *b);

/* Stop (as em_batcher_stop) and free. NULL is fine. */
EM_API void em_batcher_free(em_batcher *b);

typedef struct em_batcher_stats {
  uint64_t batches;        /* fn calls */
  uint64_t requests;       /* requests computed (in those batches) */
  uint64_t max_batch;      /* the largest batch */
  uint64_t errors;         /* batches whose callers got an error */
  uint64_t queued;         /* waiting now */
  uint64_t refused;        /* answered at submit with an error */
  uint64_t dropped;        /* callers gone before their batch ran */
  uint64_t queue_ns;       /* total wait of the computed requests (arrival
                              to batch start) */
  uint64_t run_ns;         /* total time in fn (and stacking, splitting) */
} em_batcher_stats;

/* Counters since em_batcher_new. Any thread (fn too). */
EM_API void em_batcher_get_stats(em_batcher *b, em_batcher_stats *st);

/* ------------------------------------------------------- reading a batch
 *
 * Everything below is valid during the fn call that got b, on that
 * thread: the stacked arrays' memory, the em_values (they point into the
 * requests) and the key strings. None allocates. */

enum em_batch_kind {
  EM_BATCH_ARRAY = 1,  /* every payload an ndarray of one dtype and shape */
  EM_BATCH_MAP = 2,    /* every payload a map with the same keys and arrays */
  EM_BATCH_SINGLE = 3  /* max_batch_size 1: one request, any payload */
};

/* n, the number of requests (>= 1). */
EM_API uint32_t em_batch_size(const em_batch *b);
/* EM_BATCH_ARRAY, EM_BATCH_MAP or EM_BATCH_SINGLE. */
EM_API int em_batch_kind(const em_batch *b);
/* The index of the worker running this batch (0 .. workers-1), e.g. to
 * pick that worker's CUDA stream. */
EM_API uint32_t em_batch_worker(const em_batch *b);
/* The batcher's name (opts.name, or "batched"). */
EM_API const char *em_batch_name(const em_batch *b);

/* The stacked array: key NULL for an EM_BATCH_ARRAY batch, else the
 * map key of an array entry. *out: dtype, ndim = 1 + the requests' ndim,
 * shape (n, *S), itemsize, data (C-contiguous, from the allocator: write
 * to it freely), len_bytes; blob 0, is_scalar 0. Row i (request i) lies
 * at data + i * len_bytes / n. EM_OK, or EINVAL (no such key, the key's
 * values are not arrays, key NULL for a map batch, or a SINGLE batch). */
EM_API int em_batch_array(const em_batch *b, const char *key, em_array *out);

/* Request i's value of map key `key` (any entry, arrays too: the
 * request's own array, unstacked), or with key NULL request i's whole
 * payload. EM_OK, or EINVAL (i >= n, no such key, or a key for a batch
 * that is not a map). */
EM_API int em_batch_value(const em_batch *b, const char *key, uint32_t i, em_value *out);

/* The map keys, sorted by bytes (0 for a batch that is not a map): key j
 * as *key (not NUL-terminated) and *len, *is_array 1 when its values are
 * stacked arrays (em_batch_array), 0 when they are per-caller values
 * (em_batch_value); each of key/len/is_array may be NULL. EM_OK or
 * EINVAL (j out of range). */
EM_API uint32_t em_batch_nkeys(const em_batch *b);
EM_API int em_batch_key(const em_batch *b, uint32_t j, const char **key, size_t *len, int *is_array);

/* Request i's message (for its timestamps or blobs). NULL when i >= n. */
EM_API const em_msg *em_batch_request(const em_batch *b, uint32_t i);

#ifdef __cplusplus
}
#endif

#endif /* EDGEML_BATCH_H */
