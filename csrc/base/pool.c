/* pool.c: size-classed, ref-counted pool of 64-byte aligned buffers.
 *
 * Classes are powers of two from 4 KiB to 256 MiB; a larger request gets
 * unpooled memory. A released buffer goes back to its class's free list
 * unless the pool already caches max_cached_bytes, in which case it is
 * freed. Each buffer holds a pool reference, so buffers may outlive the
 * server or client that made them (numpy arrays viewing them, say).
 * A pool may also have an arena (em__pool_new_arena, em_base.h): buffers
 * are carved from it first, ordinary memory is the fallback when it is
 * full. */
#include "em_base.h"

#include <stdlib.h>

#define EM__POOL_MIN_SHIFT 12
#define EM__POOL_CLASSES 17 /* 4 KiB .. 256 MiB */

struct em_pool {
  atomic_int refs;
  pthread_mutex_t mu;
  em_buf *free_list[EM__POOL_CLASSES]; /* guarded by mu */
  size_t cached_bytes;                 /* guarded by mu */
  size_t max_cached_bytes;
  bool has_arena;
  em_pool_arena arena; /* when has_arena; see em_base.h */
  atomic_uint_fast64_t arena_allocs, fallback_allocs, arena_bufs_out;
};

em_pool *em__pool_new(size_t max_cached_bytes) {
  em_pool *p = calloc(1, sizeof *p);
  if (!p) return NULL;
  atomic_init(&p->refs, 1);
  pthread_mutex_init(&p->mu, NULL);
  p->max_cached_bytes = max_cached_bytes;
  return p;
}

em_pool *em__pool_new_arena(size_t max_cached_bytes, const em_pool_arena *arena) {
  em_pool *p = em__pool_new(max_cached_bytes);
  if (!p) return NULL;
  p->has_arena = true;
  p->arena = *arena;
  return p;
}

const em_pool_arena *em__pool_arena(const em_pool *p) { return p->has_arena ? &p->arena : NULL; }

void em__pool_counts(em_pool *p, em_pool_counts *out) {
  out->arena_allocs = atomic_load(&p->arena_allocs);
  out->fallback_allocs = atomic_load(&p->fallback_allocs);
  out->arena_bufs_out = atomic_load(&p->arena_bufs_out);
}

void em__pool_retain(em_pool *p) { atomic_fetch_add(&p->refs, 1); }

static void em__buf_destroy(em_buf *b) {
  if (b->from_arena) {
    b->pool->arena.free(b->pool->arena.ud, b->data, b->cap_bytes);
    atomic_fetch_sub(&b->pool->arena_bufs_out, 1);
  } else {
    free(b->data);
  }
  free(b);
}

void em__pool_release(em_pool *p) {
  if (atomic_fetch_sub(&p->refs, 1) != 1) return;
  for (int k = 0; k < EM__POOL_CLASSES; k++) {
    em_buf *b = p->free_list[k];
    while (b) {
      em_buf *n = b->next_free;
      em__buf_destroy(b);
      b = n;
    }
  }
  pthread_mutex_destroy(&p->mu);
  if (p->has_arena && p->arena.destroy) p->arena.destroy(p->arena.ud);
  free(p);
}

static int em__size_class(size_t size) {
  size_t c = (size_t)1 << EM__POOL_MIN_SHIFT;
  for (int k = 0; k < EM__POOL_CLASSES; k++, c <<= 1)
    if (size <= c) return k;
  return -1;
}

static size_t em__class_cap(int k, size_t size) {
  return k >= 0 ? ((size_t)1 << (EM__POOL_MIN_SHIFT + k)) : EM__ALIGN_UP(size, 4096);
}

/* A buffer carved from the arena, or NULL when it is full (or size is
 * absurd, or out of memory for the em_buf itself). */
static em_buf *em__arena_buf(em_pool *p, int k, size_t size) {
  if (size > SIZE_MAX - 4096) return NULL;
  size_t cap = em__class_cap(k, size);
  em_buf *b = calloc(1, sizeof *b);
  if (!b) return NULL;
  b->data = p->arena.alloc(p->arena.ud, cap);
  if (!b->data) {
    free(b);
    return NULL;
  }
  b->cap_bytes = cap;
  b->klass = k;
  b->from_arena = true;
  atomic_fetch_add(&p->arena_allocs, 1);
  atomic_fetch_add(&p->arena_bufs_out, 1);
  return b;
}

em_buf *em__buf_alloc(em_pool *p, size_t size) {
  int k = em__size_class(size);
  em_buf *b = NULL;
  if (p->has_arena && (b = em__arena_buf(p, k, size))) goto got;
  if (k >= 0) {
    pthread_mutex_lock(&p->mu);
    b = p->free_list[k];
    if (b) {
      p->free_list[k] = b->next_free;
      p->cached_bytes -= b->cap_bytes;
    }
    pthread_mutex_unlock(&p->mu);
  }
  if (!b) {
    size_t cap = em__class_cap(k, size);
    b = calloc(1, sizeof *b);
    if (!b) return NULL;
    b->data = aligned_alloc(EM_BLOB_ALIGN, cap);
    if (!b->data) {
      free(b);
      return NULL;
    }
    b->cap_bytes = cap;
    b->klass = k;
  }
  if (p->has_arena) atomic_fetch_add(&p->fallback_allocs, 1);
got:
  atomic_init(&b->refs, 1);
  b->next_free = NULL;
  b->pool = p;
  em__pool_retain(p);
  return b;
}

em_buf *em_buf_retain(em_buf *b) {
  atomic_fetch_add(&b->refs, 1);
  return b;
}

void em_buf_release(em_buf *b) {
  if (!b || atomic_fetch_sub(&b->refs, 1) != 1) return;
  em_pool *p = b->pool;
  bool keep = false;
  if (b->klass >= 0 && !b->from_arena) {
    pthread_mutex_lock(&p->mu);
    if (p->cached_bytes + b->cap_bytes <= p->max_cached_bytes) {
      b->next_free = p->free_list[b->klass];
      p->free_list[b->klass] = b;
      p->cached_bytes += b->cap_bytes;
      keep = true;
    }
    pthread_mutex_unlock(&p->mu);
  }
  if (!keep) em__buf_destroy(b);
  em__pool_release(p);
}

uint8_t *em_buf_data(em_buf *b) { return b->data; }
size_t em_buf_size(em_buf *b) { return b->cap_bytes; }
