/* em_wire.h: the frame format and the body codec helpers (pure functions
 * over memory, no I/O, no threads; the fuzz targets call these). The exact
 * layout is in docs/protocol.md. */
#ifndef EM_WIRE_H
#define EM_WIRE_H

#include "../base/em_base.h"

#include <sys/uio.h>

#define EM__MAGIC0 'E'
#define EM__MAGIC1 'D'
#define EM__MAGIC2 'G'
#define EM__MAGIC3 'M'
#define EM__MAX_BLOBS 65536u
#define EM__MAX_DEPTH 32 /* msgpack-c's unpacker stack (MSGPACK_EMBED_STACK_SIZE) */

typedef struct em__hdr {
  uint8_t version, type;
  uint16_t flags;
  uint64_t req_id;
  uint32_t body_len, nblobs;
  uint64_t frame_len;
  uint64_t ts_ns[4];
} em__hdr;

/* Parse and check the fixed header (EM_FRAME_HEADER_BYTES at p). Checks
 * magic, version, type != 0, blob count, and that frame_len can hold the
 * body and blob table and is <= max_frame. On error returns EPROTO,
 * EVERSION or ETOOBIG and points *why at a static reason. */
int em__hdr_parse(const uint8_t *p, uint64_t max_frame, em__hdr *h, const char **why);
void em__hdr_write(uint8_t *p, const em__hdr *h);

/* Build an em_msg from a complete frame in `buf` (takes the reference on
 * success; on failure the caller keeps it). Checks the blob table against
 * frame_len. */
int em__frame_finish(em_buf *buf, const em__hdr *h, em_msg **out, const char **why);

/* Finish a payload into a frame: write the header at the front of its
 * buffer, append the blob table and padding, and fill `iov` (capacity
 * 1 + 2 * nblobs) with the pieces to write in order. Returns the number of
 * iovecs; *frame_len receives the total size. Call once per payload. */
int em__payload_frame(em_payload *p, uint8_t type, uint16_t flags, uint64_t req_id,
                      const uint64_t ts_ns[4], struct iovec *iov, uint64_t *frame_len);
/* Patch timestamp i of a finished payload's header (before sending). */
void em__payload_set_ts(em_payload *p, int i, uint64_t ts_ns);
size_t em__payload_iov_cap(const em_payload *p);

/* Unpack a message body into a msgpack object tree allocated in `zone`
 * after em__body_check; EM_OK or EM_EDECODE. Internal (msgpack-c types). */
int em_msg_unpack(const em_msg *m, msgpack_zone *zone, msgpack_object *out);
/* If `o` is an EM_EXT_ARRAY ext, fill `a` (EM_OK), else EM_EINVAL, or
 * EM_EDECODE if malformed. */
int em_obj_array(const em_msg *m, const msgpack_object *o, em_array *a);
/* The value of str key `key` in map `o`, or NULL. */
const msgpack_object *em_obj_get(const msgpack_object *o, const char *key);
/* Decode-cost charges (see em__body_check); value.c's reader uses the same. */
#define EM__COST_ELEM 32u     /* msgpack_object + the parent's pointer */
#define EM__COST_MAP 112u     /* dict object; + EM__COST_KV per entry */
#define EM__COST_KV 96u       /* zone key/value pair + dict entry and index */
#define EM__COST_LIST 56u     /* list or tuple object */
#define EM__COST_STR 49u      /* + its length */
#define EM__COST_NUM 32u      /* int or float object */
#define EM__COST_ARRAY 256u   /* ndarray view + shape tuple */
/* Check a msgpack body (see em_msg_unpack). EM_OK or EM_EDECODE + reason.
 * Besides structure it bounds decode amplification: each element is
 * charged what decoding it is estimated to allocate (msgpack-c's object,
 * the Python object and its slot: ~100 bytes for an empty map from one
 * byte), and a body whose total exceeds max(EM__DECODE_FLOOR_BYTES,
 * EM__DECODE_RATIO x its length) is refused before anything is built. */
#define EM__DECODE_RATIO 16
#define EM__DECODE_FLOOR_BYTES (64u << 20)
#define EM__STR_(x) #x
#define EM__STR(x) EM__STR_(x)
static inline uint64_t em__decode_limit(size_t body_len) {
  return (uint64_t)EM__DECODE_RATIO * body_len > (uint64_t)EM__DECODE_FLOOR_BYTES
             ? (uint64_t)EM__DECODE_RATIO * body_len : (uint64_t)EM__DECODE_FLOOR_BYTES;
}

int em__body_check(const em_msg *m, const char **why);

/* Parse an array ext's data; checks it against the message's blobs. */
int em__array_parse(const em_msg *m, const uint8_t *data, size_t len, em_array *a, const char **why);

/* Incremental frame reader over a byte stream. Small frames are read into a
 * 64 KiB staging area and copied into a pooled buffer; the rest of a large
 * frame is read straight into its pooled buffer (region() points there).
 * After a large frame (> EM__READER_BIG_BYTES) the next read at a frame
 * boundary asks for the header alone, so a stream of large frames costs one
 * more read per frame instead of a staging copy of up to 64 KiB.
 * One thread at a time. */
#define EM__READER_BIG_BYTES (16 * 1024)

/* A budget for the bytes held in frames being received (allocated at their
 * header, freed when the whole frame is in or the reader is reset), shared
 * by the readers of one server. Frames up to EM__BUDGET_FREE_BYTES are not
 * counted. A frame that would take `held` over `limit` is not started
 * (em__reader_next returns EM__READER_WAIT) unless nothing is held, so one
 * frame of any allowed size always gets through. One thread (the loop);
 * `held` is atomic only so that stats can read it from another. */
#define EM__BUDGET_FREE_BYTES (64u * 1024u)
typedef struct em__budget {
  uint64_t limit;
  atomic_ullong held;
  uint64_t released; /* counts uncharges: a waiter may now fit */
} em__budget;
#define EM__READER_WAIT 2

typedef struct em__reader {
  em_pool *pool;
  uint64_t max_frame;
  uint8_t *stage;
  size_t stage_cap, stage_start, stage_end;
  em_buf *cur; /* frame being assembled, or NULL */
  size_t cur_have;
  em__hdr cur_hdr;
  bool big; /* the last frame was large: read the next header alone */
  em__budget *budget; /* NULL = none; set by the owner after init */
  uint32_t rcvtimeo_us; /* the SO_RCVTIMEO last set on the client socket it reads (sock.c) */
  uint64_t charged;   /* bytes of cur counted in budget */
} em__reader;

int em__reader_init(em__reader *r, em_pool *pool, uint64_t max_frame);
void em__reader_destroy(em__reader *r);
void em__reader_reset(em__reader *r);
/* Where the next bytes from the stream should go, and how many fit. */
void em__reader_region(em__reader *r, uint8_t **p, size_t *n);
void em__reader_commit(em__reader *r, size_t n);
/* 1 and *out when a whole frame is in, 0 when more bytes are needed,
 * EM__READER_WAIT when the next frame does not fit the budget (call again
 * once memory was released; nothing was consumed), or a negative code
 * (+ *why) when the stream is malformed (close it). */
int em__reader_next(em__reader *r, em_msg **out, const char **why);
/* True when part of a frame has been read but not all of it. */
bool em__reader_mid_frame(const em__reader *r);

#endif
