/* em_net.h: bytes on sockets. Blocking-style helpers for the client (the
 * calling thread does its own I/O) and the libuv listener for servers (one
 * loop thread owns every handle; only em__listener_stop crosses threads). */
#ifndef EM_NET_H
#define EM_NET_H

#include "../wire/em_wire.h"

/* ---- client side: non-blocking fds driven with poll() and deadlines
 * (em_mono_ns clock, EM_FOREVER = none). EINTR is retried. */
int em__dial(const char *host, uint16_t port, uint64_t deadline_ns, int *fd_out);
/* Write every byte of iov (modified in place). ETIMEDOUT, ECONNCLOSED, EIO. */
int em__writev_all(int fd, struct iovec *iov, int n, uint64_t deadline_ns);
/* Read into the reader until it yields a frame. 1 + *out, or a negative
 * code (ETIMEDOUT leaves the reader mid-frame, resumable). */
int em__read_frame(int fd, em__reader *r, uint64_t deadline_ns, em_msg **out, const char **why);

/* ---- server side: the libuv listener */
typedef struct em__listener em__listener;
typedef struct em__conn em__conn;

typedef struct em__listener_cbs {
  void *ud;
  /* A whole frame arrived on c. m is owned by the callee. Loop thread. */
  void (*on_frame)(void *ud, em__conn *c, em_msg *m);
  /* Called every tick_ns; non-zero stops the listener. May be NULL. */
  int (*on_tick)(void *ud);
  uint64_t tick_ns;
  /* Runs on the loop thread after em__listener_wake (several wakes may
   * arrive as one call). May be NULL. */
  void (*on_wake)(void *ud);
  em_log_fn log;
  void *log_ud;
  /* Budget for bytes held in frames still being received, all connections
   * together (see em__budget); 0 = em__default_pending_bytes(). */
  uint64_t max_pending_bytes;
  /* Runs once on the loop thread when the listener begins to stop (stop,
   * a tick's non-zero return, or close without run), before it stops
   * reading and closes the connections: frames sent from here still go
   * out (they drain like other queued writes). May be NULL. */
  void (*on_stop)(void *ud);
} em__listener_cbs;
/* The default budget: an eighth of physical memory, at least 256 MiB. */
uint64_t em__default_pending_bytes(void);

int em__listener_open(em__listener **out, const char *host, uint16_t port, em_pool *pool,
                      uint64_t max_frame, const em__listener_cbs *cbs);
uint16_t em__listener_port(const em__listener *l);
int em__listener_run(em__listener *l);      /* blocks; EM_OK or EM_EINTR (tick) */
void em__listener_stop(em__listener *l);    /* any thread */
/* Have on_wake called on the loop thread soon (any thread; before run, the
 * call happens once run starts). */
void em__listener_wake(em__listener *l);
/* Call fn for every open connection (loop thread). */
void em__listener_foreach(em__listener *l, void (*fn)(void *ud, em__conn *c), void *ud);
int em__listener_wait(em__listener *l, uint64_t timeout_ns);
bool em__listener_on_loop_thread(const em__listener *l);
void em__listener_close(em__listener *l);   /* after run returned */
/* In a child process after fork(): close the inherited descriptors (the
 * listening socket, connections, the loop's) and nothing else. */
void em__listener_close_fds_in_child(em__listener *l);
void em__listener_counts(const em__listener *l, uint64_t *open, uint64_t *total, uint64_t *proto_errors);
/* Bytes now held in unfinished frames, and how many times a connection's
 * reading was paused because its next frame did not fit the budget. */
void em__listener_memory(const em__listener *l, uint64_t *pending_bytes, uint64_t *limit, uint64_t *paused);

/* Send a frame built from p on c (loop thread). The payload's contents are
 * taken over when the write cannot finish at once (p is then re-inited);
 * p's release runs when its blobs are no longer needed, in every case. */
int em__conn_send(em__conn *c, em_payload *p, uint8_t type, uint64_t req_id, const uint64_t ts_ns[4]);
/* Send a finished frame held in b (len bytes) on c (loop thread). b is
 * retained until the write completes; the caller keeps its reference. */
int em__conn_send_buf(em__conn *c, em_buf *b, size_t len);
/* Close c after its queued writes, logging why (NULL = quietly). */
void em__conn_close(em__conn *c, int level, const char *why);
int *em__conn_state(em__conn *c);          /* one int for the layer above */
uint8_t *em__conn_scratch(em__conn *c);    /* 32 bytes for the layer above */
/* Frames on a new connection may be at most EM__HANDSHAKE_MAX_FRAME bytes
 * (no peer can make the server allocate more before it has handshaken and
 * authenticated); open_up raises the limit to the listener's max_frame. */
#define EM__HANDSHAKE_MAX_FRAME (64u * 1024u)
void em__conn_open_up(em__conn *c);
uint64_t em__conn_age_ns(const em__conn *c); /* since accept */
/* True when c is in the middle of a frame, is being read (not paused by
 * the server), and has not advanced it by EM__PROGRESS_BYTES within
 * timeout_ns: a peer trickling a frame to hold a connection (loop thread). */
#define EM__PROGRESS_BYTES (64u * 1024u)
bool em__conn_stalled(const em__conn *c, uint64_t now_mono, uint64_t timeout_ns);
/* The loop was busy (a long handler) for gap_ns: bytes may have waited in
 * the kernel unread, so that time does not count against any peer. */
void em__listener_forgive(em__listener *l, uint64_t gap_ns);
bool em__conn_closing(const em__conn *c);  /* em__conn_close was called */
/* Broadcast state of a connection, for the layer above (loop thread). */
typedef struct em__conn_sub {
  bool subscribed;  /* sent SUBSCRIBE at least once (em__conn_set_subscribed) */
  bool waiting;     /* a SUBSCRIBE is not answered yet */
  uint64_t have;    /* the version it said it has */
} em__conn_sub;
em__conn_sub *em__conn_sub_state(em__conn *c);
void em__conn_set_subscribed(em__conn *c);       /* counts it once */
uint64_t em__listener_subscribers(const em__listener *l); /* any thread */
const char *em__conn_peer(const em__conn *c);

/* A counted reference to a connection that other threads may hold (a
 * deferred reply): `open` turns false, on the loop thread, as soon as the
 * connection starts closing (nothing more can be sent on it); `c` is the
 * connection, read and cleared on the loop thread only (NULL once freed). */
typedef struct em__conn_ref {
  atomic_int refs;
  atomic_bool open;
  em__conn *c;
  uint64_t id; /* unique per listener, from 1: for logs */
} em__conn_ref;
/* A new reference to c (loop thread; created with c's first one). NULL
 * when out of memory. */
em__conn_ref *em__conn_ref_get(em__conn *c);
void em__conn_ref_release(em__conn_ref *r); /* any thread; NULL ok */
/* Deferred requests of c (taken for a later reply, loop thread): they
 * count toward its pipelining like queued replies do. Above
 * EM__MAX_DEFERRED requests or EM__MAX_DEFERRED_BYTES of their frames, c
 * is not read until some are answered; n and bytes are signed (add on
 * defer, subtract on reply/drop, which resumes reading). Not called from
 * inside on_frame with a negative n. */
#define EM__MAX_DEFERRED 4096
#define EM__MAX_DEFERRED_BYTES (64ull << 20)
void em__conn_defer_add(em__conn *c, int n, int64_t bytes);
void em__log(const em__listener_cbs *cbs, int level, const char *fmt, ...);

#endif
