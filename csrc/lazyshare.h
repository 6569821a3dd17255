/*
 * lazyshare native core: the public declarations (parsed by cffi's cdef, so
 * only plain declarations and integer #defines live here).
 *
 * Every function returns 0 (or a count) on success and -errno on failure; the
 * one Python module that loads this library (lazyshare/handler.py) turns the
 * errno into a typed exception. No function here calls the Python C API, and
 * the threads this library starts never do.
 *
 *   owner (exporting) side                consumer (attaching) side
 *   ls_server_start   -> "lazyshare-pages" ls_client_start  -> "lazyshare-fault"
 *   ls_server_export / unexport           ls_client_attach / detach
 *   ls_server_pop_freed                   ls_client_materialize
 */

#define LS_MODE_UFFD 0      /* userfaultfd handling user and kernel faults */
#define LS_MODE_UFFD_USER 1 /* UFFD_USER_MODE_ONLY: kernel accesses get EFAULT */
#define LS_MODE_EAGER 2     /* no userfaultfd: whole segments pulled on attach */

#define LS_ID_BYTES 16

/* The page protocol (layouts in internal.h, described in lazyshare/transport.py,
 * which reads these values from the compiled module instead of copying them). */
#define LS_MAGIC 0x31535A4Cu /* "LZS1" little-endian */
#define LS_VERSION 1
#define LS_OP_READ 1
#define LS_OP_HOLD 2
#define LS_OP_RELEASE 3
#define LS_OP_PING 4
#define LS_OP_INSTALL 5 /* READ, but the owner installs the pages itself */
#define LS_OP_UFFD 6    /* carries the consumer's userfaultfd (SCM_RIGHTS) */
#define LS_REP_ZERO 1   /* reply flag: the range reads as zeros, no payload */
#define LS_INSTALL_WP 1       /* INSTALL flag: UFFDIO_COPY_MODE_WP, the consumer tracks writes */
#define LS_INSTALL_DONTWAKE 2 /* INSTALL flag: nobody waits yet (read-ahead), skip the wake-up */
#define LS_INSTALL_CACHED 4   /* INSTALL flag: dst maps the segment's page cache (MAP_PRIVATE of
                                 its memfd): fill the cache, then wake dst (no copy into dst) */
#define LS_MAX_READ 8388608   /* largest READ answered (8 MiB): bounds one request's copy */
#define LS_REQ_BYTES 56
#define LS_REQ_INSTALL_BYTES 64
#define LS_REP_BYTES 48
#define LS_HIST_BUCKETS 32

struct ls_probe {
    int mode;          /* best rung available (LS_MODE_*) */
    int err_devnode;   /* errno of /dev/userfaultfd (0: worked) */
    int err_syscall;   /* errno of userfaultfd(2) with kernel faults */
    int err_usermode;  /* errno of userfaultfd(UFFD_USER_MODE_ONLY) */
};

struct ls_stats {
    /* consumer */
    uint64_t faults;           /* page-fault messages handled */
    uint64_t requests;         /* page requests sent (READ or INSTALL) */
    uint64_t installs;         /* of them, answered by the owner installing the pages itself */
    uint64_t bytes_fetched;    /* bytes of the owner's memory installed here */
    uint64_t bytes_zero;       /* bytes installed as zero pages without payload */
    uint64_t regions_attached; /* live attached regions */
    uint64_t eexist;           /* pages found already present */
    uint64_t bytes_dropped;    /* clean fetched bytes dropped to keep within the budget */
    uint64_t hist[LS_HIST_BUCKETS]; /* fault service time, bucket i: [2^i, 2^(i+1)) us */
    /* owner */
    uint64_t requests_served;
    uint64_t bytes_served;
    uint64_t errors_served;    /* error replies (bad request, unknown segment, ...) */
    uint64_t segments_exported;/* live exported segments */
    uint64_t cache_bytes_filled; /* owner: bytes copied into page caches */
    uint64_t caches_live;        /* owner: page caches alive */
    uint64_t cache_attaches;     /* consumer: regions that map a page cache */
    uint64_t cache_fallbacks;    /* consumer: regions that could not map one (anonymous instead) */
    uint64_t snap_bytes_preserved; /* owner: bytes copied into caches before the parent overwrote them */
    uint64_t snap_faults;          /* owner: the parent's writes that waited on a synchronous tracker */
};

/* Which userfaultfd rungs this process can open (opens and closes them). */
int ls_probe(struct ls_probe *out);

/* ---- owner: the page server ---- */
/* What the page server runs with (lazyshare/settings.py reads the
 * environment; the native core never does). */
struct ls_server_config {
    uint32_t spin_us; /* poll this long after activity before sleeping; 0: sleep at once */
    uint32_t threads; /* event loops (at most 8); 0: one per CPU, at most 8 */
};
/* Serve this process's segments on endpoint ("ipc://" and a socket path; the
 * file is created, mode 0600, and must not exist): -EALREADY if running,
 * -EINVAL or -ENAMETOOLONG for the endpoint, other -errno of the setup (then
 * nothing of it is left: no socket file, thread or fd). */
int ls_server_start(const char *endpoint, const struct ls_server_config *cfg);
/* Stop the loops and remove the socket file (0 if not running). Connections
 * stay open until the process exits, and with them the holds of their peers. */
int ls_server_stop(void);
/* Whether [addr, addr+len) of this process lies entirely in private
 * anonymous memory (the heap, a stack, anonymous mappings, named or not), so
 * that a page absent from its page table reads as zeros: 1 yes, 0 no (a gap,
 * file-backed or shared memory), -ENOTTY/-EINVAL if this kernel has no
 * PROCMAP_QUERY (Linux < 6.11: parse /proc/self/maps instead), other -errno.
 * One ioctl per VMA of the range, each O(log n) in the mappings. */
int ls_vma_anon(uint64_t addr, uint64_t len);
/* anon: the memory is private anonymous memory, so a page the owner never
 * touched (absent from /proc/self/pagemap) reads as zeros and is answered as a
 * zero range without payload. Never set it for file-backed memory. */
int ls_server_export(const uint8_t *id, uint64_t addr, uint64_t len, int anon);
/*
 * A page cache for an exported segment, shared by every consumer on this host:
 * a memfd of the segment's length (pages rounded up), empty at first. A
 * consumer maps it MAP_PRIVATE (opening /proc/<owner pid>/fd/<fd>, checked by
 * inode), so pages already cached map without a request and a consumer's
 * writes stay its own (copy-on-write; the memfd never changes). A hole faults
 * as MISSING; the INSTALL request (LS_INSTALL_CACHED) makes the owner copy the
 * range from the segment into the memfd atomically (UFFDIO_COPY through a
 * shared view registered with the owner's own userfaultfd: a page is in the
 * cache whole or not at all) and wake the consumer. Never-written pages of an
 * anonymous segment stay holes (the consumer gets zero pages). The cache lives
 * as long as the segment (a consumer's mapping keeps the memfd's memory until
 * it is unmapped). *fd and *ino: what a consumer needs to map it. 0, -EEXIST
 * (it has one), -ENOENT, -EOPNOTSUPP (no userfaultfd here for shmem), -errno.
 */
int ls_server_cache(const uint8_t *id, int *fd, uint64_t *ino);
/* Drop the cached pages of n byte ranges (offset, length pairs in ranges[0..2n),
 * widened to whole pages) of a segment's cache: they are filled from the
 * segment's memory again when next touched. Call it only while no consumer
 * maps the cache for a call that must keep seeing the old bytes. The bytes
 * dropped (of pages that were cached), or -errno (-ENOENT: no such segment or
 * no cache). */
int64_t ls_server_cache_punch(const uint8_t *id, const uint64_t *ranges, uint32_t n);
/* Bytes resident in a segment's cache now (-ENOENT: none). */
int64_t ls_server_cache_resident(const uint8_t *id);
/* Of n byte ranges (offset, length pairs) of a segment, the cached pages whose
 * bytes in the range differ from the segment's memory now: punched if punch
 * (then fetched again when touched), counted either way (bytes). A page not
 * cached is neither (it is filled from the memory as it is when touched). Call
 * it with punch only while no consumer maps the cache for a call that must
 * keep seeing the old bytes. -ENOENT (no segment or cache), -ERANGE. */
int64_t ls_server_cache_refresh(const uint8_t *id, const uint64_t *ranges, uint32_t n, int punch);
/* Copy [off, off+len) of a segment (whole pages) into its cache now, where
 * not cached yet. 0 or -errno. */
int ls_server_cache_fill(const uint8_t *id, uint64_t off, uint64_t len);
/*
 * Snapshot as of now (full rung): while it is open, a write by this process
 * to [addr, addr+len) -- a range tracked with ls_track_add_sync, inside the
 * segment -- first copies the 2 MiB block it falls in into the segment's
 * cache (the writer waits for it), and consumers of the segment that do not
 * map the cache get their pages through it, so that every consumer reads the
 * bytes as they were when it opened. Several may be open on one range (one
 * per segment). 0, -ENOENT (no such segment, cache or sync range), -ERANGE.
 */
int ls_server_snap_begin(const uint8_t *id, uint64_t addr, uint64_t len);
/* Close it: 0 if it was kept whole, 1 if not (a block could not be copied,
 * or this process discarded pages of it with madvise), -ENOENT. */
int ls_server_snap_end(const uint8_t *id, uint64_t addr);
/* Shared output arrays (merge.c). Written pages whose twin is zeros and that
 * hold few non-zero words, as (page, mask, words) instead of whole pages:
 * ls_written_pages fills it (when not NULL) up to its capacities; a page that
 * does not fit goes in its runs. */
struct ls_sparse {
    uint64_t *pages;  /* their addresses */
    uint32_t *counts; /* non-zero words of each */
    uint64_t *masks;  /* a bit per 8-byte word of each (page size / 512 of them per page) */
    uint64_t *words;  /* the non-zero words, page after page */
    uint64_t npages, max_pages, nwords, max_words;
};
/* The pages of [addr, addr+len) (whole pages)
 * this process wrote: anonymous or swapped, not the zero page (a lazy region's
 * clean pages are its cache's file pages, or absent), less those holding only
 * zeros in the nzeros sorted (start, end) address pairs of zeros (pages whose
 * twin is zeros: ls_merge_zeros). Up to max (start, end) address pairs into
 * out; their count, -ENOTTY (no PAGEMAP_SCAN: take the whole range), -E2BIG,
 * -EINVAL, -errno. */
int64_t ls_written_pages(uint64_t addr, uint64_t len, const uint64_t *zeros, uint32_t nzeros, uint64_t *out,
                         uint32_t max, struct ls_sparse *sparse);
/* Zero the words that sparse pages (addresses and masks, as ls_written_pages
 * gave them) hold: the pages read as zeros again, as their twin. */
void ls_sparse_clear(const uint64_t *pages, const uint64_t *masks, uint64_t npages);
/* A call's merges into one segment of seglen bytes: the twins of the pages its
 * tasks wrote. NULL if out of memory. */
struct ls_merge;
struct ls_merge *ls_merge_new(uint64_t seglen);
void ls_merge_free(struct ls_merge *m);
/* Mark the pages of the segment at segaddr that were never written (absent,
 * or the zero page) and have no twin yet as having zeros for twin: up to max
 * (start, end) segment offsets of them and of those never written whose twin
 * is zeros already (whole pages; the last may pass the segment's end) into
 * out. Their count, -ENOTTY (no PAGEMAP_SCAN), -errno. */
int64_t ls_merge_zeros(struct ls_merge *m, uint64_t segaddr, uint64_t *out, uint32_t max);
/* Merge a task's pages into base (the segment's memory, seglen bytes): nruns
 * (offset, length) runs of the segment whose bytes follow each other in src.
 * An item (unit bytes: 1, 2, 4 or 8, the runs starting on item boundaries)
 * differing from its twin (base's bytes before the first merge into its page)
 * is applied whole, unless base already differs from both (an earlier
 * writer's value): then conflict[0] counts its bytes, conflict[1..2] widen to
 * cover it, and it is applied only if last. An item whose every byte is the
 * twin's or base's is taken for a read of a page a merge was writing, not a
 * write. The bytes changed, or -ERANGE. */
int64_t ls_merge_apply(struct ls_merge *m, uint8_t *base, const uint64_t *runs, uint32_t nruns, const uint8_t *src,
                       unsigned unit, int last, uint64_t *conflict);
/* The same for npages pages given sparse (struct ls_sparse's form; pages are
 * segment offsets of whole pages whose twin is zeros): a word not in a page's
 * mask is zeros, as its twin. The bytes changed, -ERANGE, -EPROTO (a page
 * whose twin is not zeros, or masks and words that disagree). */
int64_t ls_merge_sparse(struct ls_merge *m, uint8_t *base, const uint64_t *pages, uint64_t npages,
                        const uint64_t *masks, const uint64_t *words, uint64_t nwords, unsigned unit, int last,
                        uint64_t *conflict);

/* Stop offering a segment: 1 if freed now, 0 if mappings still hold it (its
 * id comes out of ls_server_pop_freed when the last one is gone). A holder is
 * a connection: a process that dies releases what it held. */
int ls_server_unexport(const uint8_t *id);
/* Copy out (up to max) ids of segments freed since the last call. */
int ls_server_pop_freed(uint8_t *ids, int max);
/* An eventfd that becomes readable when a segment is freed (-1 before the
 * first start; the same fd for the process's life after it). */
int ls_server_freed_fd(void);
/* Mappings other processes hold of a segment, or -ENOENT. */
int ls_server_holders(const uint8_t *id);

/* ---- consumer: the fault handler ---- */
/* What the fault handler runs with. */
struct ls_client_config {
    int mode;                  /* LS_MODE_*: its userfaultfd is opened at this rung */
    uint32_t min_block;        /* first fetch of a random fault, bytes (>= a page) */
    uint32_t max_block;        /* largest read-ahead window, bytes */
    uint32_t fault_timeout_ms; /* a fault unanswered this long is fatal (SIGBUS) */
    uint32_t spin_us;          /* poll this long after activity before sleeping */
    int wire;                  /* 1: pages as reply payload (READ), never INSTALL */
    uint32_t link_max_block;   /* largest read-ahead window for an owner across a link
                                  (owner_pid 0), bytes; 0: max_block */
};
/* Start the handler thread "lazyshare-fault" (and its watchdog). */
int ls_client_start(const struct ls_client_config *cfg);
/* One region to attach: bytes [map_off, map_off+map_len) of a segment of
 * seglen bytes, widened to whole pages (read-ahead stays inside them). */
struct ls_attach {
    uint8_t id[LS_ID_BYTES]; /* in: the segment */
    uint64_t seglen;         /* in: its length, as the owner must confirm it */
    uint64_t map_off;        /* in */
    uint64_t map_len;        /* in: > 0; out: the bytes mapped at addr (whole pages) */
    uint64_t off;            /* out: the segment offset mapped at addr (map_off rounded down) */
    uint64_t addr;           /* out */
    uint64_t region;         /* out: for ls_client_detach */
    int32_t cache_fd;        /* in: the segment's page cache (ls_server_cache): its fd in the owner */
    uint64_t cache_ino;      /* in: its inode, checked before mapping it; 0: no cache */
    int32_t cached;          /* out: 1 if the region maps the cache, 0 if anonymous memory */
    const uint64_t *plain;   /* in: nplain (start, end) segment offsets, whole pages, that
                                were zeros when exported (a shared output's, ls_merge_zeros):
                                mapped as plain zero memory, never fetched (not with a cache) */
    uint32_t nplain;
};
/* Map n regions of segments served at endpoint by owner_pid; blocks until the
 * owner confirms every one (or timeout_ms passes); in eager mode until every
 * byte arrived. All or nothing: on an error none stays attached. */
int ls_client_attach(const char *endpoint, int owner_pid, struct ls_attach *a, uint32_t n, uint32_t timeout_ms);
/* Whether [addr, addr+len) overlaps a region attached here (1) or not (0):
 * O(log n) in the live regions. Any thread. */
int ls_client_overlaps(uint64_t addr, uint64_t len);
/* Keep at most this many bytes of fetched pages in this process (0: no limit):
 * older clean pages are dropped and fetched again if touched. Applies to
 * regions attached afterwards (they are registered write-protected, so that
 * pages written here are known and never dropped). */
int ls_client_set_budget(uint64_t bytes);
/* Asynchronous: the handler unregisters, unmaps and tells the owner. */
int ls_client_detach(uint64_t region);
/* Wait (at most timeout_ms) until every page request sent so far is answered
 * and counted: -ETIMEDOUT otherwise. */
int ls_client_sync(uint32_t timeout_ms);
/* Touch every page of [addr, addr+len) from this thread (user mode). */
int ls_client_materialize(uint64_t addr, uint64_t len);
/* Tests only: the next ls_client_start fails to create thread `which`
 * (LS_THREAD_*) as if pthread_create had returned err (0: no failure). */
#define LS_THREAD_FAULT 1
#define LS_THREAD_WATCH 2
void ls_client_test_fail_thread(int which, int err);

/* The read-ahead policy (csrc/readahead.c): pure functions over one region's
 * state, used by the fault handler for each fault, exposed for tests. */
struct ls_readahead {
    uint64_t last;      /* page of the last fault */
    uint32_t window;    /* pages */
    uint32_t have_last; /* a fault was seen */
};
struct ls_readahead_plan {
    uint64_t from, to;             /* the demand block [from, to): from is the faulting page */
    uint64_t ahead_from, ahead_to; /* the next window (sequential faults; else empty) */
    int sequential;
};
void ls_readahead_init(struct ls_readahead *ra, uint32_t min_pages);
/* A fault on page of a region of npages pages: update ra, say what to request
 * (clipped at the region's end; pages already requested are not known here). */
void ls_readahead_fault(struct ls_readahead *ra, uint64_t page, uint64_t npages, uint32_t min_pages,
                        uint32_t max_pages, struct ls_readahead_plan *out);
/* The first run of pages not yet requested in [from, to) of the bitmap
 * requested (one bit per page), at most max_run long: 1 with *start, *n; 0 if none. */
int ls_readahead_next_run(const uint8_t *requested, uint64_t from, uint64_t to, uint64_t max_run,
                          uint64_t *start, uint64_t *n);

void ls_get_stats(struct ls_stats *out);
void ls_reset_after_fork(void);

/* ---- owner: dirty tracking (csrc/track.c) ---- */
/*
 * Which pages of ranges of this process's own memory were written since a
 * point in time (UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN, Linux 6.7+). Writes
 * never wait and never fail: user-mode and kernel-mode (read(2) into the
 * buffer) writes are recorded on both uffd rungs. A page zapped by
 * MADV_DONTNEED is reported written. The first tracked 4 KiB write into a
 * transparent huge page splits its PMD mapping (random reads of it get
 * slower). A forked child tracks nothing (its calls answer -ENOENT; it may add
 * ranges of its own). Thread-safe (one mutex); any thread.
 */
#define LS_TRACK_AUTO -1 /* ls_track_set_mode: the full rung if allowed, else user-mode-only */
/* The rung of the tracking userfaultfd (LS_MODE_UFFD, LS_MODE_UFFD_USER or
 * LS_TRACK_AUTO, the default): takes effect when it is next opened; -EBUSY if
 * it is open at another rung and ranges are tracked, -EINVAL for other modes. */
int ls_track_set_mode(int mode);
/* Open the tracking userfaultfd if not yet: its rung (LS_MODE_*) or -errno. */
int ls_track_mode(void);
/* 1 if tracking works here (opens the tracking userfaultfd and keeps it), or
 * -errno: -EINVAL (UFFDIO_API refuses WP_ASYNC: Linux < 6.7), -ENOSYS (no
 * PAGEMAP_SCAN or no userfaultfd), -EPERM (this rung is not allowed). */
int ls_track_supported(void);
/* Start recording writes to [addr, addr+len): addr and len page-aligned
 * (-EINVAL otherwise: widening is the caller's choice, and then neighbours on
 * those pages are tracked too). The memory must be mapped (-ENOMEM), private
 * anonymous (heap, stack, anonymous mappings), neither shared, file-backed,
 * hugetlb nor KSM-mergeable (MADV_MERGEABLE: merging would drop the records)
 * (-EOPNOTSUPP), nor registered with another userfaultfd (-EBUSY). A range
 * overlapping a tracked one is refused (-EEXIST) unless that one was lost
 * (-ENXIO below): it is replaced. Costs ~10 ms per GiB (write-protecting). */
int ls_track_add(uint64_t addr, uint64_t len);
/* ls_track_add, synchronously (full rung only: -EPERM on the user-mode-only
 * rung, where a kernel-mode write to a protected page would fail with EFAULT):
 * the first write to each 2 MiB block (aligned, clipped to the range) waits
 * for the "lazyshare-snap" thread, which copies the block into the open
 * snapshots (ls_server_snap_begin) and unprotects it. ls_track_dirty reports
 * written blocks, not pages; ls_server_cache_refresh tells the pages apart.
 * Only for whole pages of a buffer that is freed after ls_track_remove, never
 * before: the tracker itself (under its lock, and the snapshot thread) never
 * writes such a buffer, but memory handed out again by malloc could be
 * written there, and that write would wait forever. A MADV_DONTNEED of the
 * range marks its blocks written. */
int ls_track_add_sync(uint64_t addr, uint64_t len);
/* The page ranges of [addr, addr+len) (page-aligned, inside one tracked range,
 * -ENOENT otherwise) written since ls_track_add or the last scan with
 * reprotect=1 of those pages: (start, end) address pairs in out[0..2n), sorted,
 * merged where adjacent; returns n. reprotect=1 protects the reported pages
 * again in the same walk (a write racing the scan is reported now or next time,
 * never lost). n == max_ranges: there may be more; call again from
 * out[2n-1] (the last end), which may answer 0. -ENXIO: tracking was lost (the
 * memory was moved or resized by mremap / realloc, unmapped, or mapped anew):
 * treat all of it as written, then ls_track_add again (the lost range is
 * replaced) or ls_track_remove. -EINVAL: max_ranges 0 or above INT32_MAX. */
int ls_track_dirty(uint64_t addr, uint64_t len, uint64_t *out, uint32_t max_ranges, int reprotect);
/* Stop tracking the range added as exactly [addr, addr+len) (-ENOENT
 * otherwise): unprotect and unregister what of it is still mapped (the memory
 * may be gone already: fine). The range is forgotten even if that fails. */
int ls_track_remove(uint64_t addr, uint64_t len);
/* Ranges tracked now (lost ones included). */
int ls_track_count(void);

/* ---- links between hosts (link.c): the page protocol relayed over TCP, in
 * TLS 1.3 with both ends verified against one CA, or in plaintext if tls is 0
 * (only when the user asked for it). Every function fills err (a sentence) on
 * failure. ---- */
struct ls_link_config {
    int tls;               /* 1: TLS 1.3, mutual; 0: plaintext */
    const char *ca_file;   /* PEM: the CA that signs every peer's certificate */
    const char *cert_file; /* PEM: this end's certificate (chain) */
    const char *key_file;  /* PEM: its private key */
    uint32_t timeout_ms;   /* connect, handshake, and a silent link's end
                              (TCP_USER_TIMEOUT, keepalive); 0: 10 s */
};
struct ls_link_stats {
    uint64_t accepted; /* connections relayed */
    uint64_t refused;  /* handshakes that failed (a bad certificate, a plaintext peer) */
    uint64_t bytes_in; /* bytes from the TCP side to the Unix side */
    uint64_t bytes_out;
    uint64_t broken;   /* connections that ended in an error */
};
/* Load OpenSSL (the libraries Python's ssl module loaded): 0 or -errno. */
int ls_tls_load(const char *libcrypto, const char *libssl, char *err, size_t errlen);
/* Owner side: listen on host:port (port 0: any free one, *port_out tells);
 * each connection that authenticates is relayed to the page server's Unix
 * socket `target`. Returns the link's id (> 0) or -errno. */
int ls_link_serve(const char *host, int port, const char *target, const struct ls_link_config *cfg,
                  int *port_out, char *err, size_t errlen);
/* Consumer side: listen on the Unix socket `path`; each connection to it is
 * relayed to the owner's link at host:port. Returns the link's id or -errno. */
int ls_link_connect(const char *path, const char *host, int port, const struct ls_link_config *cfg, char *err,
                    size_t errlen);
/* Connect to host:port, authenticate both ways and wait for the page
 * server's greeting, then close: 0 or -errno (err says why). */
int ls_link_probe(const char *host, int port, const struct ls_link_config *cfg, char *err, size_t errlen);
/* Stop accepting; open connections end within a second. */
int ls_link_stop(int id);
int ls_link_stats(int id, struct ls_link_stats *out);
