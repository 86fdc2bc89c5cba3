/* frame.c: frame header, blob table, and the incremental frame reader. */
#include "em_wire.h"

#include <stdlib.h>

int em__hdr_parse(const uint8_t *p, uint64_t max_frame, em__hdr *h, const char **why) {
  if (p[0] != EM__MAGIC0 || p[1] != EM__MAGIC1 || p[2] != EM__MAGIC2 || p[3] != EM__MAGIC3) {
    *why = "bad magic (not an edgeml peer)";
    return EM_EPROTO;
  }
  h->version = p[4];
  if (h->version != EM_PROTOCOL_VERSION) {
    *why = "unsupported protocol version";
    return EM_EVERSION;
  }
  h->type = p[5];
  h->flags = em__get_u16(p + 6);
  h->req_id = em__get_u64(p + 8);
  h->body_len = em__get_u32(p + 16);
  h->nblobs = em__get_u32(p + 20);
  h->frame_len = em__get_u64(p + 24);
  for (int i = 0; i < 4; i++) h->ts_ns[i] = em__get_u64(p + 32 + 8 * i);
  if (h->type == 0) {
    *why = "message type 0";
    return EM_EPROTO;
  }
  if (h->nblobs > EM__MAX_BLOBS) {
    *why = "too many blobs";
    return EM_EPROTO;
  }
  if (h->frame_len > max_frame) {
    *why = "declared frame length exceeds max_message_bytes";
    return EM_ETOOBIG;
  }
  /* body and table must fit (all in 64-bit: body_len < 2^32, nblobs < 2^17) */
  uint64_t min_len = EM__ALIGN_UP((uint64_t)EM_FRAME_HEADER_BYTES + h->body_len, 8) + 8ull * h->nblobs;
  if (h->frame_len < min_len) {
    *why = "declared frame length too small for its body and blob table";
    return EM_EPROTO;
  }
  return EM_OK;
}

void em__hdr_write(uint8_t *p, const em__hdr *h) {
  p[0] = EM__MAGIC0; p[1] = EM__MAGIC1; p[2] = EM__MAGIC2; p[3] = EM__MAGIC3;
  p[4] = EM_PROTOCOL_VERSION;
  p[5] = h->type;
  em__put_u16(p + 6, h->flags);
  em__put_u64(p + 8, h->req_id);
  em__put_u32(p + 16, h->body_len);
  em__put_u32(p + 20, h->nblobs);
  em__put_u64(p + 24, h->frame_len);
  for (int i = 0; i < 4; i++) em__put_u64(p + 32 + 8 * i, h->ts_ns[i]);
}

int em__frame_finish(em_buf *buf, const em__hdr *h, em_msg **out, const char **why) {
  const uint8_t *base = buf->data;
  uint64_t off = EM__ALIGN_UP((uint64_t)EM_FRAME_HEADER_BYTES + h->body_len, 8);
  const uint8_t *table = base + off;
  off += 8ull * h->nblobs;
  em_msg *m = malloc(sizeof *m + (size_t)h->nblobs * sizeof(em_blob));
  if (!m) {
    *why = "out of memory";
    return EM_ENOMEM;
  }
  m->blobs = (em_blob *)(m + 1);
  for (uint32_t i = 0; i < h->nblobs; i++) {
    uint64_t len = em__get_u64(table + 8ull * i);
    off = EM__ALIGN_UP(off, EM_BLOB_ALIGN);
    if (len > h->frame_len || off > h->frame_len - len) {
      free(m);
      *why = "blob table overruns the frame";
      return EM_EPROTO;
    }
    m->blobs[i].data = base + off;
    m->blobs[i].len_bytes = (size_t)len;
    off += len;
  }
  if (off != h->frame_len) {
    free(m);
    *why = "frame length disagrees with its blob table";
    return EM_EPROTO;
  }
  m->type = h->type;
  m->flags = h->flags;
  m->req_id = h->req_id;
  memcpy(m->ts_ns, h->ts_ns, sizeof m->ts_ns);
  m->body = base + EM_FRAME_HEADER_BYTES;
  m->body_len = h->body_len;
  m->nblobs = h->nblobs;
  m->buf = buf;
  m->frame_bytes = (size_t)h->frame_len;
  *out = m;
  return EM_OK;
}

void em_msg_free(em_msg *m) {
  if (!m) return;
  em_buf_release(m->buf);
  free(m);
}

/* ------------------------------------------------------------- reader */

#define EM__STAGE_BYTES (64 * 1024)

int em__reader_init(em__reader *r, em_pool *pool, uint64_t max_frame) {
  memset(r, 0, sizeof *r);
  r->stage = malloc(EM__STAGE_BYTES);
  if (!r->stage) return EM_ENOMEM;
  r->stage_cap = EM__STAGE_BYTES;
  r->pool = pool;
  em__pool_retain(pool);
  r->max_frame = max_frame;
  return EM_OK;
}

static void em__reader_uncharge(em__reader *r) {
  if (!r->charged) return;
  atomic_fetch_sub(&r->budget->held, r->charged);
  r->budget->released++;
  r->charged = 0;
}

void em__reader_reset(em__reader *r) {
  em__reader_uncharge(r);
  if (r->cur) em_buf_release(r->cur);
  r->cur = NULL;
  r->cur_have = 0;
  r->stage_start = r->stage_end = 0;
  r->big = false;
  r->rcvtimeo_us = 0; /* a new socket: its receive timeout is set at the first read */
}

void em__reader_destroy(em__reader *r) {
  if (!r->stage) return;
  em__reader_reset(r);
  free(r->stage);
  r->stage = NULL;
  em__pool_release(r->pool);
}

bool em__reader_mid_frame(const em__reader *r) {
  return r->cur != NULL || r->stage_end > r->stage_start;
}

void em__reader_region(em__reader *r, uint8_t **p, size_t *n) {
  if (r->cur) {
    *p = r->cur->data + r->cur_have;
    *n = (size_t)r->cur_hdr.frame_len - r->cur_have;
    return;
  }
  if (r->stage_start == r->stage_end) {
    r->stage_start = r->stage_end = 0;
  } else if (r->stage_cap - r->stage_end < EM_FRAME_HEADER_BYTES || r->stage_start > r->stage_cap / 2) {
    memmove(r->stage, r->stage + r->stage_start, r->stage_end - r->stage_start);
    r->stage_end -= r->stage_start;
    r->stage_start = 0;
  }
  *p = r->stage + r->stage_end;
  *n = r->stage_cap - r->stage_end;
  size_t avail = r->stage_end - r->stage_start;
  if (r->big && avail < EM_FRAME_HEADER_BYTES) *n = EM_FRAME_HEADER_BYTES - avail;
}

void em__reader_commit(em__reader *r, size_t n) {
  if (r->cur)
    r->cur_have += n;
  else
    r->stage_end += n;
}

int em__reader_next(em__reader *r, em_msg **out, const char **why) {
  int rc;
  if (!r->cur) {
    size_t avail = r->stage_end - r->stage_start;
    if (avail < EM_FRAME_HEADER_BYTES) return 0;
    rc = em__hdr_parse(r->stage + r->stage_start, r->max_frame, &r->cur_hdr, why);
    if (rc) return rc;
    uint64_t flen = r->cur_hdr.frame_len;
    if (r->budget && flen > EM__BUDGET_FREE_BYTES) {
      uint64_t held = atomic_load(&r->budget->held);
      if (held && held + flen > r->budget->limit) return EM__READER_WAIT;
      atomic_fetch_add(&r->budget->held, flen);
      r->charged = flen;
    }
    r->big = flen > EM__READER_BIG_BYTES;
    em_buf *b = em__buf_alloc(r->pool, (size_t)flen);
    if (!b) {
      em__reader_uncharge(r);
      *why = "out of memory for an incoming frame";
      return EM_ENOMEM;
    }
    size_t take = (size_t)EM__MIN((uint64_t)avail, r->cur_hdr.frame_len);
    memcpy(b->data, r->stage + r->stage_start, take);
    r->stage_start += take;
    r->cur = b;
    r->cur_have = take;
  }
  if (r->cur_have < r->cur_hdr.frame_len) return 0;
  em_buf *b = r->cur;
  r->cur = NULL;
  r->cur_have = 0;
  em__reader_uncharge(r); /* a whole frame: no longer "being received" */
  rc = em__frame_finish(b, &r->cur_hdr, out, why);
  if (rc) {
    em_buf_release(b);
    return rc;
  }
  return 1;
}
