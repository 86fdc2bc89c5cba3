/* em_base.h: internal foundations shared by every layer: pooled buffers,
 * clocks, little-endian helpers, logging. Includes nothing but the public
 * header and libc. */
#ifndef EM_BASE_H
#define EM_BASE_H

#include "edgeml.h"

#include <msgpack.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <string.h>

#define EM__ALIGN_UP(x, a) (((x) + ((a)-1)) & ~((uint64_t)(a)-1))
#define EM__MIN(a, b) ((a) < (b) ? (a) : (b))
#define EM__MAX(a, b) ((a) > (b) ? (a) : (b))
#define EM__DEFAULT_MAX_MESSAGE ((uint64_t)EM_DEFAULT_MAX_MESSAGE_BYTES)

/* Little-endian loads and stores at any alignment: one memcpy (a single
 * move) on little-endian hosts, a byte swap on big-endian ones. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define EM__LE16(x) __builtin_bswap16(x)
#define EM__LE32(x) __builtin_bswap32(x)
#define EM__LE64(x) __builtin_bswap64(x)
#else
#define EM__LE16(x) (x)
#define EM__LE32(x) (x)
#define EM__LE64(x) (x)
#endif
static inline void em__put_u16(uint8_t *p, uint16_t v) { v = EM__LE16(v); memcpy(p, &v, 2); }
static inline void em__put_u32(uint8_t *p, uint32_t v) { v = EM__LE32(v); memcpy(p, &v, 4); }
static inline void em__put_u64(uint8_t *p, uint64_t v) { v = EM__LE64(v); memcpy(p, &v, 8); }
static inline uint16_t em__get_u16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return EM__LE16(v); }
static inline uint32_t em__get_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return EM__LE32(v); }
static inline uint64_t em__get_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return EM__LE64(v); }

/* ---- pooled buffers (pool.c)
 * Memory for received frames. Fresh pages cost ~10 us per 4 KiB here, so
 * freed buffers go back to per-size-class free lists and are reused. A
 * buffer holds a reference to its pool; the pool lives until the last
 * buffer and the last owner have released it. Thread-safe. */
typedef struct em_pool em_pool;

struct em_buf {
  atomic_int refs;
  int klass;          /* size class index, -1 = unpooled */
  bool from_arena;    /* data came from the pool's arena (see below) */
  size_t cap_bytes;
  em_pool *pool;      /* owned reference */
  uint8_t *data;      /* 64-byte aligned, cap_bytes long */
  em_buf *next_free;  /* guarded by pool->mu while on a free list */
};

em_pool *em__pool_new(size_t max_cached_bytes);
void em__pool_retain(em_pool *p);
void em__pool_release(em_pool *p);
/* A buffer of at least `size` bytes, refs = 1; NULL when out of memory. */
em_buf *em__buf_alloc(em_pool *p, size_t size);

/* An arena: memory the pool carves buffers from before it uses ordinary
 * memory (e.g. one pinned CUDA allocation, cuda/cuda.c). alloc returns
 * `bytes` (a multiple of 4 KiB) 64-byte aligned, or NULL when the arena
 * cannot hold them; free gives them back; destroy (may be NULL) runs once,
 * when the pool's last reference goes (after every buffer is released).
 * All three may be called from any thread, concurrently (the arena locks
 * itself), never with the pool's mutex held.
 * In a pool with an arena, em__buf_alloc tries the arena first; when it is
 * full it falls back to the pool's ordinary path (free lists, then fresh
 * memory) and counts that in fallback_allocs, so a full arena never fails
 * an allocation. Arena buffers go back to the arena when released (they
 * never sit on the free lists, so the arena's memory is never stranded in
 * one size class); ordinary buffers follow max_cached_bytes as usual. */
typedef struct em_pool_arena {
  void *(*alloc)(void *ud, size_t bytes);
  void (*free)(void *ud, void *data, size_t bytes);
  void (*destroy)(void *ud);
  void *ud;
} em_pool_arena;
/* A pool over `arena` (copied). The pool owns arena->ud from here on: it
 * calls destroy when it goes. NULL when out of memory (destroy not run). */
em_pool *em__pool_new_arena(size_t max_cached_bytes, const em_pool_arena *arena);
typedef struct em_pool_counts {
  uint64_t arena_allocs;    /* buffers carved from the arena */
  uint64_t fallback_allocs; /* buffers of ordinary memory because the arena was full */
  uint64_t arena_bufs_out;  /* arena buffers not yet released */
} em_pool_counts;
void em__pool_counts(em_pool *p, em_pool_counts *out); /* zeros without an arena */
/* The pool's arena (its callbacks and ud), or NULL for a pool without one. */
const em_pool_arena *em__pool_arena(const em_pool *p);

/* ---- payloads (the public em_payload is opaque; wire/payload.c, value.c)
 * Internal code may build one on the stack with em_payload_init and write
 * msgpack with `pk` directly; the em_put_* writers also track containers
 * (need[] = values still owed at each open level) so that an incomplete
 * body is refused at the send. */
struct em_payload {
  msgpack_sbuffer sbuf; /* header space + body + blob table */
  msgpack_packer pk;
  em_blob *blobs;
  uint32_t nblobs, blobs_cap;
  void (*release)(void *ctx);
  void *release_ctx;
  int err;        /* first em_put_* error, sticky until reset */
  int depth;      /* open containers */
  uint32_t roots; /* top-level values written with em_put_* */
  bool heap;      /* from em_payload_new */
  uint64_t need[EM_READER_DEPTH + 2];
};
int em_payload_init(em_payload *p);     /* EM_OK or ENOMEM */
void em_payload_destroy(em_payload *p); /* runs release if pending */
int em_payload_pack_array(em_payload *p, const char *dtype, uint32_t ndim, const uint64_t *shape,
                          const void *data, size_t len_bytes, int is_scalar);
/* EM_OK, or the reason a payload must not be sent (EENCODE). */
int em__payload_ready(const em_payload *p);

/* ---- misc (clock.c) */
uint64_t em__random_u64(void); /* never 0 */
/* The fork generation: changes in a child process after fork(). An object
 * records it at open; em__forked_since(gen) is then true in a child,
 * where the object must not lock its mutexes or use its socket. The first
 * call registers the pthread_atfork handler. Any thread. */
unsigned em__fork_gen(void);
bool em__forked_since(unsigned gen);
/* em_mono_ns() + timeout_ns, or EM_FOREVER when that would overflow (a
 * timeout of centuries is no limit). */
uint64_t em__deadline(uint64_t timeout_ns);

/* ---- SHA-256, HMAC-SHA256, constant-time compare, random (sha256.c) */
typedef struct em_sha256 {
  uint32_t h[8];
  uint64_t len;
  uint8_t buf[64];
  size_t fill;
} em_sha256;
void em_sha256_init(em_sha256 *s);
void em_sha256_update(em_sha256 *s, const void *data, size_t n);
void em_sha256_final(em_sha256 *s, uint8_t out[32]);
/* HMAC-SHA256(key, p1 || p2 || p3); a part may be NULL with length 0 */
void em_hmac_sha256(const void *key, size_t key_len, const void *p1, size_t n1, const void *p2, size_t n2,
                    const void *p3, size_t n3, uint8_t out[32]);
int em_ct_equal(const void *a, const void *b, size_t n); /* 1 if equal; time independent of content */
int em_random_bytes(void *out, size_t n);               /* getrandom; EM_OK or EM_EIO */

/* ---- logging */
void em__log_stderr(void *ud, int level, const char *msg);

#endif
