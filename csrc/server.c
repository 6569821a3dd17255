/*
 * The page server: native "lazyshare-pages" threads (one event loop each,
 * loop.c over epoll; one per CPU unless configured, at most 8) in each owning
 * process, a ZeroMQ ROUTER peer (ZMTP 3.0, see zmtp.h) on an ipc:// socket
 * file. Loop 0 accepts and deals connections out in turn; a connection is then
 * served by its loop's thread alone. Python's threads (GIL released) call the
 * ls_server_* functions: start/stop, and the segment table under seg_lock.
 *
 *   Python (any thread, GIL released)       page-server loops (loop.c)
 *   ls_server_export   --+                   accept: same uid only (SO_PEERCRED)
 *   ls_server_unexport --+-- seg table --+-> INSTALL: bounds-check, UFFDIO_COPY from
 *                        |   (seg_lock)  |   the pinned buffer into the consumer
 *                        |               |   (its userfaultfd, given by OP_UFFD)
 *                        |               +-> READ: reply from the pinned buffer
 *                        |               |   itself (sendmsg, no copy)
 *   freed ids <----------+---------------+-> HOLD/RELEASE: holders per connection;
 *   (eventfd wakes Python's reaper)          a closed connection drops its holds
 *
 * Segments live in malloc'd nodes (stable addresses), found by id in a hash
 * table (O(1): a segment is only ever looked up by its id). A node is freed
 * only when it is neither exported, held, nor being sent ("busy": a reply
 * still streaming from its memory); then its id is queued for Python, which
 * drops its pin. So no byte is read from a buffer Python may have let go.
 * Holds are counted per connection (one entry per consumer process, however
 * many mappings it holds), so HOLD and RELEASE cost O(consumers), not
 * O(mappings).
 *
 * A segment may have a page cache (cache.c, ls_server_cache): a memfd that
 * consumers on this host map privately. An INSTALL with LS_INSTALL_CACHED
 * copies into the cache instead of the consumer and wakes the consumer; the
 * cache is destroyed with its segment, after seg_lock is released (see
 * seg_unlock), since unmapping and closing many cached pages takes a while.
 *
 * A request is never trusted: a frame that is not one 56-byte message gets
 * -EPROTO, an unknown or released segment -ENOENT, a range outside the
 * (page-padded) segment -ERANGE, a read over LS_MAX_READ -EINVAL. Bytes past the
 * segment's end in its last page are zeros, never the owner's other memory. A
 * peer that breaks the framing is disconnected; others are not affected, and a
 * slow reader only ever fills its own socket (its remaining reply waits on
 * EPOLLOUT while the others are served).
 */
#include "internal.h"
#include "cache.h"
#include "loop.h"
#include "zmtp.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

struct holder {
    uint64_t conn;  /* connection id */
    uint64_t count; /* mappings it holds */
};

struct seg {
    struct ls_hnode h; /* key: the id's first 8 bytes (random) */
    uint8_t id[LS_ID_BYTES];
    const uint8_t *addr;
    uint64_t len;
    int exported;
    int anon;   /* untouched pages are known zeros (see ls_server_export) */
    int busy;   /* replies streaming from it */
    int nholders;             /* mappings held, all connections together */
    int nconns, capconns;
    struct holder *holders;   /* one entry per connection holding it */
    struct ls_cache *cache;   /* its page cache (ls_server_cache), NULL if none */
    int snaps;                /* snapshots open (ls_server_snap_begin): consumers not mapping
                                 the cache are served through it (the memory may change) */
};

/* A run of payload bytes: the owner's memory, or zeros (src NULL). */
struct span {
    const uint8_t *src;
    uint64_t len;
};

/* One event loop ("lazyshare-pages" thread). Each connection belongs to one
 * loop for its whole life, so its requests are served in order; loop 0 also
 * accepts, handing connections out in turn, so that installs for different
 * consumers run on different CPUs. */
struct loop {
    pthread_t thread;
    struct ls_loop ev;    /* loop.c: epoll and the spin */
    struct ls_io stop_io; /* stop_fd, registered in every loop */
    int stopping;         /* set by stop_io's callback */
    uint8_t *bounce;      /* one page, for installs of pages mixing bytes and zeros */
};

struct conn {
    uint64_t id;
    int fd;
    struct loop *loop;
    struct ls_io io; /* fd in loop->ev */
    int uffd;       /* the consumer's userfaultfd (OP_UFFD), -1 if none */
    int pending_fd; /* an fd received but not yet claimed by an OP_UFFD request */
    struct conn *prev, *next; /* all connections, for a forked child to close */
    int greeted;  /* peer greeting and READY received */
    int bad_multipart;
    uint8_t rx[4096];
    size_t rxlen;
    size_t rxoff; /* conn_parse: bytes of rx already taken */
    uint8_t tx[256]; /* reply headers; the payload streams from the segment */
    size_t txoff, txlen;
    struct seg *dseg; /* payload source (busy-referenced), NULL if none */
    struct span *spans; /* the payload still to send, in order */
    int nspans, capspans, cur;
    struct span *spans2; /* swapped in for a demand install served inside another */
    int nspans2, capspans2;
    int nested;
    uint8_t *vbuf; /* bytes read back from a segment's cache (see via_cache) */
    size_t vcap;
};

static pthread_mutex_t seg_lock = PTHREAD_MUTEX_INITIALIZER;
static struct ls_htab segs; /* under seg_lock */
static struct ls_cache *dead_caches; /* under seg_lock: freed segments' caches, destroyed by seg_unlock */
static uint8_t *freed; /* ids freed but not yet popped by Python */
static int nfreed, capfreed;
static int freed_fd = -1;

#define MAX_LOOPS 8
static struct loop loops[MAX_LOOPS];
static int nloops;
static int server_running;
static int stop_fd = -1, listen_fd = -1;
static struct ls_io listen_io; /* listen_fd, in loop 0 */
static int spare_fd = -1; /* /dev/null, given up to refuse a connection when out of fds */
static char listen_path[108];
static uint64_t next_conn_id = 1;
static const uint8_t zeros[4096];
static int pagemap_fd = -1;
static pthread_mutex_t conns_lock = PTHREAD_MUTEX_INITIALIZER;
static struct conn *conns; /* every connection (a forked child closes them) */

static uint64_t seg_key(const uint8_t *id)
{
    uint64_t k;
    memcpy(&k, id, sizeof k);
    return k;
}

/* Release seg_lock, then destroy the caches of segments freed meanwhile:
 * unmapping a view and closing a memfd of many cached pages takes a while, and
 * no loop should wait for it to look a segment up. */
static void seg_unlock(void)
{
    struct ls_cache *d = dead_caches;
    dead_caches = NULL;
    pthread_mutex_unlock(&seg_lock);
    while (d) {
        struct ls_cache *next = d->dead_next;
        ls_cache_free(d);
        d = next;
    }
}

/* seg_lock held. */
static struct seg *seg_find(const uint8_t *id)
{
    for (struct ls_hnode *e = ls_htab_find(&segs, seg_key(id)); e; e = ls_htab_next(e))
        if (!memcmp(((struct seg *)e)->id, id, LS_ID_BYTES)) /* h is the first member */
            return (struct seg *)e;
    return NULL;
}

/* seg_lock held: the mappings connection conn holds of s change by delta
 * (+1 or -1; -1 of nothing is ignored). 0, or -ENOMEM. */
static int seg_hold(struct seg *s, uint64_t conn, int delta)
{
    for (int i = 0; i < s->nconns; i++) {
        struct holder *h = &s->holders[i];
        if (h->conn != conn)
            continue;
        h->count += (uint64_t)(int64_t)delta;
        s->nholders += delta;
        if (!h->count)
            *h = s->holders[--s->nconns];
        return 0;
    }
    if (delta < 0)
        return 0;
    if (s->nconns == s->capconns) {
        int cap = s->capconns ? s->capconns * 2 : 4;
        struct holder *p = realloc(s->holders, (size_t)cap * sizeof *p);
        if (!p)
            return -ENOMEM;
        s->holders = p;
        s->capconns = cap;
    }
    s->holders[s->nconns++] = (struct holder){conn, 1};
    s->nholders++;
    return 0;
}

/* seg_lock held: free s if nothing needs it any more. Returns 1 if freed. */
static int seg_maybe_free(struct seg *s, int notify)
{
    if (s->exported || s->nholders || s->busy)
        return 0;
    if (notify) {
        if (nfreed == capfreed) {
            int cap = capfreed ? capfreed * 2 : 64;
            uint8_t *p = realloc(freed, (size_t)cap * LS_ID_BYTES);
            if (!p)
                return 0; /* keep it: a pin held longer beats a pin dropped early */
            freed = p;
            capfreed = cap;
        }
        memcpy(freed + (size_t)nfreed++ * LS_ID_BYTES, s->id, LS_ID_BYTES);
    }
    ls_htab_remove(&segs, &s->h);
    if (s->cache) { /* nobody fills it any more (not busy): destroyed by seg_unlock */
        s->cache->dead_next = dead_caches;
        dead_caches = s->cache;
    }
    free(s->holders);
    free(s);
    CTR_SUB(segments_exported, 1);
    return 1;
}

/* Drop a reference taken with busy++ (under seg_lock) by a request that
 * used the segment without the lock; frees it if that was the last thing
 * keeping it. */
static void seg_unbusy(struct seg *s)
{
    pthread_mutex_lock(&seg_lock);
    s->busy--;
    int f = seg_maybe_free(s, 1);
    seg_unlock();
    if (f)
        ls_eventfd_signal(freed_fd);
}

/*
 * PROCMAP_QUERY (Linux 6.11+, linux/fs.h): ask /proc/self/maps for the VMA
 * covering an address (or the next one) in O(log n), instead of reading and
 * parsing the whole map (0.7 ms with 350 mappings, 52 ms with 30,000). Defined
 * here for headers older than the kernel.
 */
struct ls_procmap_query {
    uint64_t size;
    uint64_t query_flags;
    uint64_t query_addr;
    uint64_t vma_start;
    uint64_t vma_end;
    uint64_t vma_flags;
    uint64_t vma_page_size;
    uint64_t vma_offset;
    uint64_t inode;
    uint32_t dev_major;
    uint32_t dev_minor;
    uint32_t vma_name_size;
    uint32_t build_id_size;
    uint64_t vma_name_addr;
    uint64_t build_id_addr;
};
_Static_assert(sizeof(struct ls_procmap_query) == 104, "struct procmap_query layout");
#define LS_PROCMAP_QUERY _IOWR('f', 17, struct ls_procmap_query)
#define LS_PROCMAP_VMA_SHARED 0x08
#define LS_PROCMAP_COVERING_OR_NEXT_VMA 0x10

static pthread_mutex_t maps_lock = PTHREAD_MUTEX_INITIALIZER;
static int maps_fd = -1; /* /proc/self/maps of this process (reopened after fork) */

int ls_vma_anon(uint64_t addr, uint64_t len)
{
    if (!len)
        return 0;
    if (addr + len < addr)
        return -EOVERFLOW;
    int rc = 1;
    /* One query at a time: the ioctl's locking state lives with the open file. */
    pthread_mutex_lock(&maps_lock);
    if (maps_fd < 0 && (maps_fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC)) < 0) {
        rc = -errno;
        goto out;
    }
    for (uint64_t cur = addr, end = addr + len; cur < end;) {
        char name[128];
        struct ls_procmap_query q = {
            .size = sizeof q,
            .query_flags = LS_PROCMAP_COVERING_OR_NEXT_VMA,
            .query_addr = cur,
            .vma_name_size = sizeof name,
            .vma_name_addr = (uintptr_t)name,
        };
        if (ioctl(maps_fd, LS_PROCMAP_QUERY, &q) < 0) {
            if (errno == EINTR)
                continue;
            /* ENOENT: nothing mapped at or after cur; ENAMETOOLONG: a long name, a file's */
            rc = errno == ENOENT || errno == ENAMETOOLONG ? 0 : -errno;
            break;
        }
        if (q.vma_start > cur || q.vma_end <= cur) { /* a gap (or a nonsensical answer) */
            rc = 0;
            break;
        }
        if ((q.vma_flags & LS_PROCMAP_VMA_SHARED) || q.inode || q.dev_major || q.dev_minor) {
            rc = 0; /* shared or file-backed: an absent page is not a zero page */
            break;
        }
        name[sizeof name - 1] = 0;
        if (q.vma_name_size > 1 && strcmp(name, "[heap]") && strcmp(name, "[stack]") && strncmp(name, "[anon:", 6)) {
            rc = 0; /* [vdso], [vvar] and other special mappings */
            break;
        }
        cur = q.vma_end;
    }
out:
    pthread_mutex_unlock(&maps_lock);
    return rc;
}

int ls_server_export(const uint8_t *id, uint64_t addr, uint64_t len, int anon)
{
    if (!len)
        return -EINVAL;
    int rc = 0;
    pthread_mutex_lock(&seg_lock);
    if (seg_find(id)) {
        rc = -EEXIST;
        goto out;
    }
    struct seg *s = calloc(1, sizeof *s);
    if (!s) {
        rc = -ENOMEM;
        goto out;
    }
    memcpy(s->id, id, LS_ID_BYTES);
    s->h.key = seg_key(id);
    s->addr = (const uint8_t *)(uintptr_t)addr;
    s->len = len;
    s->exported = 1;
    s->anon = anon && pagemap_fd >= 0;
    if (ls_htab_insert(&segs, &s->h) < 0) {
        free(s);
        rc = -ENOMEM;
        goto out;
    }
    CTR_ADD(segments_exported, 1);
out:
    seg_unlock();
    return rc;
}

int ls_server_unexport(const uint8_t *id)
{
    int rc;
    pthread_mutex_lock(&seg_lock);
    struct seg *s = seg_find(id);
    if (!s || !s->exported) {
        rc = -ENOENT;
    } else {
        s->exported = 0;
        rc = seg_maybe_free(s, 0); /* 1: Python drops the pin now; 0: later, via freed */
    }
    seg_unlock();
    return rc;
}

int ls_server_holders(const uint8_t *id)
{
    pthread_mutex_lock(&seg_lock);
    struct seg *s = seg_find(id);
    int n = s ? s->nholders : -ENOENT;
    seg_unlock();
    return n;
}

int ls_server_pop_freed(uint8_t *ids, int max)
{
    if (freed_fd >= 0)
        ls_eventfd_drain(freed_fd);
    pthread_mutex_lock(&seg_lock);
    int n = nfreed < max ? nfreed : max;
    if (n > 0) {
        memcpy(ids, freed, (size_t)n * LS_ID_BYTES);
        memmove(freed, freed + (size_t)n * LS_ID_BYTES, (size_t)(nfreed - n) * LS_ID_BYTES);
        nfreed -= n;
    } else {
        n = 0; /* max <= 0, or nothing freed (freed may still be NULL) */
    }
    seg_unlock();
    return n;
}

int ls_server_freed_fd(void)
{
    return freed_fd;
}

/* ---- the server thread ---- */

struct drop_conn {
    uint64_t conn;
    int freed_any;
};

/* seg_lock held: ls_htab_each callback, may free e (and only e). */
static void drop_conn_holds(struct ls_hnode *e, void *arg)
{
    struct drop_conn *d = arg;
    struct seg *s = (struct seg *)e;
    for (int i = 0; i < s->nconns; i++)
        if (s->holders[i].conn == d->conn) {
            s->nholders -= (int)s->holders[i].count;
            s->holders[i] = s->holders[--s->nconns];
            break;
        }
    d->freed_any |= seg_maybe_free(s, 1);
}

static void conn_close(struct conn *c)
{
    int freed_any = 0;
    pthread_mutex_lock(&seg_lock);
    if (c->dseg) {
        c->dseg->busy--;
        freed_any |= seg_maybe_free(c->dseg, 1);
        c->dseg = NULL;
    }
    /* The peer's mappings die with its connection (a killed worker too): one
     * pass over the segments, once per connection's life. */
    struct drop_conn d = {c->id, 0};
    ls_htab_each(&segs, drop_conn_holds, &d);
    freed_any |= d.freed_any;
    seg_unlock();
    if (freed_any)
        ls_eventfd_signal(freed_fd);
    ls_loop_del(&c->io); /* a no-op if it never joined its loop */
    pthread_mutex_lock(&conns_lock);
    close(c->fd);
    if (c->uffd >= 0)
        close(c->uffd);
    if (c->pending_fd >= 0)
        close(c->pending_fd);
    if (c->prev)
        c->prev->next = c->next;
    else
        conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    pthread_mutex_unlock(&conns_lock);
    free(c->spans);
    free(c->spans2);
    free(c->vbuf);
    free(c);
}

/* Write what is pending. 1: all sent, 0: socket full, -1: peer gone. */
static int conn_flush(struct conn *c)
{
    for (;;) {
        struct iovec iov[64];
        int n = 0;
        if (c->txoff < c->txlen)
            iov[n++] = (struct iovec){c->tx + c->txoff, c->txlen - c->txoff};
        for (int i = c->cur; i < c->nspans && n < 64; i++) {
            struct span *sp = &c->spans[i];
            if (sp->src) {
                iov[n++] = (struct iovec){(void *)sp->src, sp->len};
            } else { /* zeros, at most a page of them per iovec */
                uint64_t left = sp->len;
                while (left && n < 64) {
                    size_t k = left < sizeof zeros ? left : sizeof zeros;
                    iov[n++] = (struct iovec){(void *)zeros, k};
                    left -= k;
                }
                break; /* the offsets below assume whole spans before this one */
            }
        }
        if (!n)
            break;
        /* sendmsg, as writev, but a peer gone raises no SIGPIPE (blocked here,
         * it would stay pending on this thread). */
        struct msghdr m = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        ssize_t w = sendmsg(c->fd, &m, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return 0;
            return -1;
        }
        size_t left = (size_t)w;
        size_t t = c->txlen - c->txoff < left ? c->txlen - c->txoff : left;
        c->txoff += t;
        left -= t;
        while (left && c->cur < c->nspans) {
            struct span *sp = &c->spans[c->cur];
            t = sp->len < left ? sp->len : left;
            if (sp->src)
                sp->src += t;
            sp->len -= t;
            left -= t;
            if (!sp->len)
                c->cur++;
        }
    }
    c->txoff = c->txlen = 0;
    c->nspans = c->cur = 0;
    if (c->dseg) {
        seg_unbusy(c->dseg);
        c->dseg = NULL;
    }
    return 1;
}

static void tx_put(struct conn *c, const void *p, size_t n)
{
    memcpy(c->tx + c->txlen, p, n);
    c->txlen += n;
}

static int span_add(struct conn *c, const uint8_t *src, uint64_t len)
{
    if (!len)
        return 0;
    if (c->nspans) { /* merge with the previous run of the same kind */
        struct span *last = &c->spans[c->nspans - 1];
        if ((!src && !last->src) || (src && last->src && last->src + last->len == src)) {
            last->len += len;
            return 0;
        }
    }
    if (c->nspans == c->capspans) {
        int cap = c->capspans ? c->capspans * 2 : 16;
        struct span *p = realloc(c->spans, (size_t)cap * sizeof *p);
        if (!p)
            return -ENOMEM;
        c->spans = p;
        c->capspans = cap;
    }
    c->spans[c->nspans++] = (struct span){src, len};
    return 0;
}

#define URGENT_CHUNK (512u << 10) /* a read-ahead install lets demand in this often */

/*
 * While a snapshot is open on a segment (ls_server_snap_begin), its memory may
 * change under a request. Requests that fill the cache need nothing more: a
 * page is filled from the memory only while the memory still holds the
 * snapshot's bytes (track.c copies a block into the cache before the first
 * write to it; a fill racing that copy finds the page there and skips it).
 * Others -- consumers not mapping the cache, and payload replies -- read the
 * memory directly, except for the pages the cache keeps (ls_cache_is_kept),
 * read back from the memfd (pread: a hole reads as zeros and never waits);
 * both under the cache's read lock, so that no block is unprotected while a
 * copy out of it is under way. Only for whole-page segments (kept ones are).
 */
static int via_cache(const struct seg *s)
{
    return s->snaps > 0 && s->cache && s->len % ls_page_size() == 0;
}

static uint8_t *conn_vbuf(struct conn *c, size_t need)
{
    if (c->vcap < need) {
        uint8_t *b = realloc(c->vbuf, need);
        if (!b)
            return NULL;
        c->vbuf = b;
        c->vcap = need;
    }
    return c->vbuf;
}

static int pread_all(int fd, uint8_t *buf, uint64_t len, uint64_t off)
{
    for (uint64_t k = 0; k < len;) {
        ssize_t r = pread(fd, buf + k, len - k, (off_t)(off + k));
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return r < 0 ? -errno : -EIO;
        k += (uint64_t)r;
    }
    return 0;
}

/* The snapshot's bytes of [src, src+len) (whole pages of s's memory), one run
 * of pages kept or not kept at a time: fn(arg, o, from, n) with from the
 * memory itself, or buf holding the bytes read back from the cache. Under the
 * cache's read lock. */
static int snapshot_runs(const struct seg *s, const uint8_t *src, uint64_t len, uint8_t *buf,
                         int (*fn)(void *, uint64_t, const uint8_t *, uint64_t), void *arg)
{
    const uint64_t ps = ls_page_size();
    struct ls_cache *cc = s->cache;
    const uint64_t off = (uint64_t)(src - s->addr);
    int rc = 0;
    pthread_rwlock_rdlock(&cc->lock);
    for (uint64_t o = 0, j; o < len && !rc; o = j) {
        int kept = ls_cache_is_kept(cc, off + o);
        for (j = o + ps; j < len && ls_cache_is_kept(cc, off + j) == kept; j += ps)
            ;
        if (!kept)
            rc = fn(arg, o, src + o, j - o);
        else if (!(rc = pread_all(cc->fd, buf, j - o, off + o)))
            rc = fn(arg, o, buf, j - o);
    }
    pthread_rwlock_unlock(&cc->lock);
    return rc;
}

static int copy_run(void *arg, uint64_t o, const uint8_t *from, uint64_t n)
{
    memmove((uint8_t *)arg + o, from, n);
    return 0;
}

/*
 * The payload for [p, p+n) of a segment. For private anonymous memory, a page
 * absent from /proc/self/pagemap (neither present nor swapped) was never
 * written: its bytes are zeros and are sent from a static page, never read from
 * the owner's memory. Reading them would map the zero page there -- a huge zero
 * page under THP, marking up to 2 MiB "present" ahead of the reader, so that
 * every later window looked touched. Returns how many bytes were taken from the
 * owner's memory (0: the range is all zeros), or -ENOMEM.
 */
static _Atomic int scan_unsupported;

/*
 * build_payload by PAGEMAP_SCAN: one walk of the page table classifies the
 * range by runs, without reading the memory. Present pages are data, unless
 * they map the zero page (a read of a never-written page); absent ones are
 * zeros. Only a write-protected "swapped" page is read: the parent's write
 * tracking marks never-written pages (UFFD_FEATURE_WP_UNPOPULATED), and such
 * a marker looks like a page swapped out (an all-zero one goes as zeros).
 * -ENOTTY where the kernel has no PAGEMAP_SCAN (then build_payload reads
 * /proc/self/pagemap instead).
 */
static int64_t build_payload_scan(struct conn *c, const uint8_t *p, uint64_t n)
{
    const uint64_t ps = ls_page_size();
    const uintptr_t lo = (uintptr_t)p, hi = lo + n;
    struct ls_page_region v[64];
    int64_t real = 0;
    uintptr_t pos = lo; /* the payload is built up to here */
    while (pos < hi) {
        struct ls_pm_scan_arg a = {
            .size = sizeof a,
            .start = pos / ps * ps,
            .end = (hi + ps - 1) / ps * ps,
            .vec = (uintptr_t)v,
            .vec_len = 64,
            .return_mask = PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO | PAGE_IS_WRITTEN,
        };
        long k = ioctl(pagemap_fd, PAGEMAP_SCAN, &a);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0) {
            if (errno == ENOTTY || errno == EINVAL)
                atomic_store(&scan_unsupported, 1);
            return -ENOTTY; /* the caller reads /proc/self/pagemap instead */
        }
        for (long i = 0; i < k; i++) {
            uintptr_t a0 = v[i].start < pos ? pos : v[i].start, a1 = v[i].end > hi ? hi : v[i].end;
            if (a0 >= a1)
                continue;
            if (a0 > pos && span_add(c, NULL, a0 - pos) < 0) /* not mapped: never happens in a segment */
                return -ENOMEM;
            uint64_t cat = v[i].categories;
            if ((cat & PAGE_IS_SWAPPED) && !(cat & PAGE_IS_WRITTEN)) {
                for (uintptr_t q = a0; q < a1;) { /* a marker or a protected page swapped out: look */
                    uintptr_t e = (q / ps + 1) * ps < a1 ? (q / ps + 1) * ps : a1;
                    int z = !memcmp((const void *)q, zeros, e - q);
                    if (span_add(c, z ? NULL : (const uint8_t *)q, e - q) < 0)
                        return -ENOMEM;
                    real += z ? 0 : (int64_t)(e - q);
                    q = e;
                }
            } else {
                int data = (cat & PAGE_IS_SWAPPED) || ((cat & PAGE_IS_PRESENT) && !(cat & PAGE_IS_PFNZERO));
                if (span_add(c, data ? (const uint8_t *)a0 : NULL, a1 - a0) < 0)
                    return -ENOMEM;
                real += data ? (int64_t)(a1 - a0) : 0;
            }
            pos = a1;
        }
        if (k < 64) { /* the walk reached the end: what it did not report is not mapped */
            if (pos < hi && span_add(c, NULL, hi - pos) < 0)
                return -ENOMEM;
            break;
        }
    }
    return real;
}

static int64_t build_payload(struct conn *c, const struct seg *s, const uint8_t *p, uint64_t n)
{
    if (!s->anon)
        return span_add(c, p, n) < 0 ? -ENOMEM : (int64_t)n;
    if (!atomic_load(&scan_unsupported)) {
        size_t mark = (size_t)c->nspans;
        int64_t r = build_payload_scan(c, p, n);
        if (r != -ENOTTY)
            return r;
        c->nspans = (int)mark; /* nothing of it kept: read /proc/self/pagemap instead */
    }
    const uint64_t ps = ls_page_size();
    uint64_t first = (uintptr_t)p / ps, last = ((uintptr_t)p + n - 1) / ps;
    uint64_t ent[512];
    int64_t real = 0;
    for (uint64_t pg = first; pg <= last;) {
        uint64_t k = last - pg + 1 < 512 ? last - pg + 1 : 512;
        if (pread(pagemap_fd, ent, k * 8, (off_t)(pg * 8)) != (ssize_t)(k * 8))
            for (uint64_t i = 0; i < k; i++)
                ent[i] = 1ull << 63; /* unknown: treat as written */
        for (uint64_t i = 0; i < k; i++) {
            uintptr_t lo = (uintptr_t)((pg + i) * ps), hi = lo + ps;
            if (lo < (uintptr_t)p)
                lo = (uintptr_t)p;
            if (hi > (uintptr_t)p + n)
                hi = (uintptr_t)p + n;
            int touched = (ent[i] & (3ull << 62)) != 0; /* bit 63 present, 62 swapped */
            /* A write-protected page (bit 57: the parent's write tracking)
             * that holds only zeros goes as zeros too. Tracking
             * (UFFD_FEATURE_WP_UNPOPULATED) marks the pages never written,
             * and pagemap shows that marker as a swapped page (without
             * CAP_SYS_ADMIN, exactly like a page swapped out): read it to
             * tell. A marker reads as zeros, and the zero page then mapped
             * under it (protection kept) shows as present, so present pages
             * are checked the same way (a non-zero page stops memcmp at its
             * first byte, usually). Untracked memory is never read here: an
             * absent page is zeros, and reading one would map a huge zero
             * page ahead of the reader. */
            if (touched && (ent[i] & (1ull << 57)) && hi - lo <= sizeof zeros &&
                !memcmp((const void *)lo, zeros, hi - lo))
                touched = 0;
            if (span_add(c, touched ? (const uint8_t *)lo : NULL, hi - lo) < 0)
                return -ENOMEM;
            if (touched)
                real += (int64_t)(hi - lo);
        }
        pg += k;
    }
    return real;
}

static void reply_header(struct conn *c, const struct ls_req *rq, int status, uint32_t flags, uint64_t length,
                         uint64_t seglen, int more)
{
    struct ls_rep rep = {
        .magic = LS_MAGIC,
        .version = LS_VERSION,
        .op = rq ? rq->op : 0,
        .status = status,
        .flags = flags,
        .tag = rq ? rq->tag : 0,
        .offset = rq ? rq->offset : 0,
        .length = length,
        .seglen = seglen,
    };
    uint8_t h[9];
    if (status)
        CTR_ADD(errors_served, 1);
    tx_put(c, h, zmtp_frame_header(h, more ? ZMTP_MORE : 0, sizeof rep));
    tx_put(c, &rep, sizeof rep);
}

/* Queue a reply: [header], or for a READ of s [header][payload]. With s, the
 * caller holds a busy reference on it (not seg_lock): a reply with payload
 * keeps it (c->dseg), until the payload is out. */
static void reply(struct conn *c, const struct ls_req *rq, int status, uint64_t seglen, struct seg *s,
                  uint64_t have, uint64_t length)
{
    uint32_t flags = 0;
    if (s) {
        int64_t real = have ? build_payload(c, s, s->addr + rq->offset, have) : 0;
        if (real > 0 && via_cache(s)) { /* the snapshot's bytes, copied now (see via_cache) */
            uint8_t *b = conn_vbuf(c, (size_t)have * 2);
            for (int i = 0; b && i < c->nspans && real > 0; i++) {
                struct span *sp = &c->spans[i];
                if (!sp->src)
                    continue;
                uint64_t o = (uint64_t)(sp->src - (s->addr + rq->offset));
                if (snapshot_runs(s, sp->src, sp->len, b + have, copy_run, b + o) < 0)
                    real = -ENOMEM;
                sp->src = b + o;
            }
            if (!b)
                real = -ENOMEM;
        }
        if (real < 0) {
            c->nspans = 0;
            status = -ENOMEM;
            s = NULL;
        } else if (real == 0) {
            c->nspans = 0; /* nothing to send: the consumer maps zero pages */
            flags = LS_REP_ZERO;
            CTR_ADD(requests_served, 1);
            s = NULL;
        } else if (span_add(c, NULL, length - have) < 0) { /* padding past the end */
            c->nspans = 0;
            status = -ENOMEM;
            s = NULL;
        }
    }
    reply_header(c, rq, status, flags, s || flags ? length : 0, seglen, s != NULL);
    if (s) {
        uint8_t h[9];
        tx_put(c, h, zmtp_frame_header(h, 0, length));
        c->dseg = s;
        c->cur = 0;
        CTR_ADD(requests_served, 1);
        CTR_ADD(bytes_served, length);
    }
}

static void serve_read(struct conn *c, const struct ls_req *rq)
{
    const uint64_t ps = ls_page_size();
    int status = 0;
    uint64_t seglen = 0, have = 0;
    pthread_mutex_lock(&seg_lock);
    struct seg *s = seg_find(rq->seg);
    if (!s) {
        status = -ENOENT;
    } else {
        seglen = s->len;
        uint64_t padded = (s->len + ps - 1) / ps * ps;
        if (!rq->length || rq->length > LS_MAX_READ) {
            status = -EINVAL;
        } else if (rq->offset >= padded || rq->length > padded - rq->offset) {
            status = -ERANGE;
        } else {
            have = rq->offset < s->len ? s->len - rq->offset : 0;
            if (have > rq->length)
                have = rq->length;
            s->busy++; /* its memory (and page map) is read below, without the lock */
        }
    }
    seg_unlock();
    if (status) {
        reply(c, rq, status, seglen, NULL, 0, 0);
        return;
    }
    reply(c, rq, 0, seglen, s, have, rq->length);
    if (c->dseg != s) /* no payload after all (zeros, or out of memory): drop the reference */
        seg_unbusy(s);
}

/* OP_UFFD: adopt the userfaultfd that came with the request. Anything else
 * (no fd, another kind of fd) is refused and closed. */
static void serve_uffd(struct conn *c, const struct ls_req *rq)
{
    int fd = c->pending_fd, status = 0;
    c->pending_fd = -1;
    char proc[64], link[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
    ssize_t n = fd < 0 ? -1 : readlink(proc, link, sizeof link - 1);
    if (n < 0 || (link[n] = 0, strcmp(link, "anon_inode:[userfaultfd]"))) {
        if (fd >= 0)
            close(fd);
        status = -EBADF;
    } else {
        if (c->uffd >= 0)
            close(c->uffd);
        c->uffd = fd;
    }
    reply(c, rq, status, 0, NULL, 0, 0);
}

static ssize_t conn_read(struct conn *c);
static int conn_flush(struct conn *c);
static void serve_install(struct conn *c, const struct ls_req_install *in);

/*
 * Demand before read-ahead: an INSTALL without LS_INSTALL_DONTWAKE has a thread
 * blocked on it. Take the first such request already in rx (after the bytes
 * conn_parse has taken, and before any command or multipart frame, across
 * which nothing is reordered) out of the stream. 1 if one was taken.
 */
static int take_demand(struct conn *c, struct ls_req_install *out)
{
    size_t off = c->rxoff;
    for (;;) {
        uint8_t flags;
        uint64_t len;
        size_t h = zmtp_parse_header(c->rx + off, c->rxlen - off, &flags, &len);
        if (!h || len > ZMTP_MAX_SMALL || c->rxlen - off - h < len || (flags & (ZMTP_COMMAND | ZMTP_MORE)) ||
            c->bad_multipart)
            return 0;
        if (len == sizeof *out) {
            memcpy(out, c->rx + off + h, sizeof *out);
            if (out->rq.magic == LS_MAGIC && out->rq.version == LS_VERSION && out->rq.op == LS_OP_INSTALL &&
                !(out->rq.flags & LS_INSTALL_DONTWAKE)) {
                memmove(c->rx + off, c->rx + off + h + len, c->rxlen - off - h - len);
                c->rxlen -= h + len;
                return 1;
            }
        }
        off += h + len;
    }
}

/* Between chunks of a read-ahead install: serve demand installs that arrived
 * meanwhile, each answered at once. Only while nothing else waits to be sent,
 * so that the replies queued here always fit tx. */
static void serve_urgent(struct conn *c)
{
    if (c->nested || c->txlen)
        return;
    if (c->rxlen < sizeof c->rx) {
        ssize_t r = conn_read(c);
        if (r > 0)
            c->rxlen += (size_t)r;
    }
    struct ls_req_install in;
    while (!c->txlen && take_demand(c, &in)) {
        struct span *sp = c->spans;
        int n = c->nspans, cap = c->capspans;
        c->spans = c->spans2;
        c->nspans = c->nspans2;
        c->capspans = c->capspans2;
        c->nested = 1;
        serve_install(c, &in);
        conn_flush(c); /* a broken peer is noticed by the next read */
        c->nested = 0;
        c->spans2 = c->spans;
        c->nspans2 = c->nspans;
        c->capspans2 = c->capspans;
        c->spans = sp;
        c->nspans = n;
        c->capspans = cap;
    }
}

static int remote_fill(int fd, uint64_t dst, const uint8_t *src, uint64_t len, uint32_t flags)
{
    return ls_uffd_fill(fd, dst, src, len, src && (flags & LS_INSTALL_WP), !!(flags & LS_INSTALL_DONTWAKE), NULL);
}

/* Whole pages [o, o+len) of an INSTALL (o: bytes into the request), from src
 * (NULL: zeros). Into the consumer's mapping; or, for a region mapping the
 * segment's cache, into the cache, then the consumer's waiting threads are
 * woken (they find the pages there: no copy into dst). Zeros of a cached
 * region are zero pages in the consumer's private mapping (UFFDIO_ZEROPAGE
 * works there and leaves the memfd's hole alone: no page spent on zeros). */
struct vrun {
    struct conn *c;
    const struct ls_req_install *in;
    uint64_t o;
};

static int install_vrun(void *arg, uint64_t o, const uint8_t *from, uint64_t n)
{
    struct vrun *v = arg;
    return remote_fill(v->c->uffd, v->in->dst + v->o + o, from, n, v->in->rq.flags);
}

static int install_run(struct conn *c, const struct ls_req_install *in, struct ls_cache *cache,
                       const struct seg *vseg, uint64_t o, const uint8_t *src, uint64_t len)
{
    const struct ls_req *rq = &in->rq;
    if (!cache && src && vseg) { /* not mapping the cache: the snapshot's bytes (see via_cache) */
        uint8_t *b = conn_vbuf(c, URGENT_CHUNK);
        int rc = b ? 0 : -ENOMEM;
        struct vrun v = {c, in, o};
        for (uint64_t k = 0; !rc && k < len; k += URGENT_CHUNK) {
            uint64_t piece = len - k < URGENT_CHUNK ? len - k : URGENT_CHUNK;
            v.o = o + k;
            rc = snapshot_runs(vseg, src + k, piece, b, install_vrun, &v);
        }
        return rc;
    }
    if (!cache || !src)
        return remote_fill(c->uffd, in->dst + o, src, len, rq->flags);
    int rc = ls_cache_fill(cache, rq->offset + o, src, len);
    if (rc || (rq->flags & LS_INSTALL_DONTWAKE))
        return rc; /* read-ahead: nobody waits; the pages map without a fault */
    struct uffdio_range w = {.start = in->dst + o, .len = len};
    return ioctl(c->uffd, UFFDIO_WAKE, &w) < 0 ? -errno : 0;
}

/*
 * INSTALL: the READ's payload, UFFDIO_COPYed by this thread from the owner's
 * memory into the consumer's mapping (at dst, through the consumer's
 * userfaultfd) instead of being sent. Never-written pages become zero pages;
 * a page mixing real bytes and zeros (the segment's last page, or a page of an
 * unaligned buffer straddling a written and an unwritten page) is assembled in
 * a bounce page first. The consumer's mm is only ever reached through its own
 * userfaultfd, and only ranges it registered there can be filled. With
 * LS_INSTALL_CACHED the bytes go into the segment's cache instead (see
 * install_run); a segment without one answers -EPROTO.
 */

static void serve_install(struct conn *c, const struct ls_req_install *in)
{
    const uint64_t ps = ls_page_size();
    const struct ls_req *rq = &in->rq;
    if (c->uffd < 0) {
        reply(c, rq, -EBADF, 0, NULL, 0, 0);
        return;
    }
    if (!rq->length || rq->length > LS_MAX_READ || rq->length % ps || rq->offset % ps || in->dst % ps ||
        in->dst + rq->length < in->dst) {
        reply(c, rq, -EINVAL, 0, NULL, 0, 0);
        return;
    }
    pthread_mutex_lock(&seg_lock);
    struct seg *s = seg_find(rq->seg);
    uint64_t seglen = s ? s->len : 0, padded = (seglen + ps - 1) / ps * ps;
    int status = 0;
    int64_t real = 0;
    struct ls_cache *cache = NULL; /* kept by the busy reference below */
    const struct seg *vseg = NULL; /* s, if served through its cache (via_cache) */
    if (!s)
        status = -ENOENT;
    else if (rq->offset >= padded || rq->length > padded - rq->offset)
        status = -ERANGE;
    else if ((rq->flags & LS_INSTALL_CACHED) && !(cache = s->cache))
        status = -EPROTO; /* the consumer maps a cache this segment does not have */
    if (!status) {
        uint64_t have = rq->offset < s->len ? s->len - rq->offset : 0;
        if (have > rq->length)
            have = rq->length;
        c->nspans = 0;
        real = have ? build_payload(c, s, s->addr + rq->offset, have) : 0;
        if (real < 0 || span_add(c, NULL, rq->length - have) < 0)
            status = -ENOMEM;
        else
            s->busy++; /* its memory is read below, without the lock */
        if (!cache && via_cache(s))
            vseg = s;
    }
    seg_unlock();
    if (status) {
        c->nspans = 0;
        reply(c, rq, status, seglen, NULL, 0, 0);
        return;
    }

    uint8_t *bounce = c->loop->bounce;
    uint64_t o = 0; /* bytes of the request filled; always a whole number of pages */
    int i = 0;
    while (!status && o < rq->length) {
        struct span *sp = &c->spans[i];
        if (sp->len >= ps) { /* whole pages of one kind, straight from the span */
            uint64_t run = sp->len / ps * ps;
            int prefetch = (rq->flags & LS_INSTALL_DONTWAKE) && !c->nested;
            if (prefetch && run > URGENT_CHUNK)
                run = URGENT_CHUNK; /* then look for demand installs that came meanwhile */
            status = install_run(c, in, cache, vseg, o, sp->src, run);
            if (prefetch && !status)
                serve_urgent(c);
            if (sp->src)
                sp->src += run;
            sp->len -= run;
            o += run;
        } else { /* less than a page left in this span: assemble one page */
            uint64_t got = 0;
            while (got < ps && i < c->nspans) {
                sp = &c->spans[i];
                uint64_t k = sp->len < ps - got ? sp->len : ps - got;
                if (sp->src) {
                    memcpy(bounce + got, sp->src, k);
                    sp->src += k;
                } else {
                    memset(bounce + got, 0, k);
                }
                sp->len -= k;
                got += k;
                if (!sp->len)
                    i++;
            }
            status = got == ps ? install_run(c, in, cache, NULL, o, bounce, ps) : -EPROTO;
            o += ps;
        }
        while (i < c->nspans && !c->spans[i].len)
            i++;
    }
    c->nspans = 0;
    seg_unbusy(s);
    if (!status) {
        CTR_ADD(requests_served, 1);
        CTR_ADD(bytes_served, (uint64_t)real);
    }
    /* The reply says how many bytes were copied; the rest were zero pages. */
    if (status)
        reply_header(c, rq, status, 0, 0, seglen, 0);
    else
        reply_header(c, rq, 0, real ? 0 : LS_REP_ZERO, rq->length, (uint64_t)real, 0);
}

static void serve_hold(struct conn *c, const struct ls_req *rq, int release)
{
    int status = 0, freed_now = 0;
    uint64_t seglen = 0;
    pthread_mutex_lock(&seg_lock);
    struct seg *s = seg_find(rq->seg);
    if (!s) {
        status = -ENOENT;
    } else if (release) {
        seglen = s->len;
        seg_hold(s, c->id, -1);
        freed_now = seg_maybe_free(s, 1);
    } else if (!s->exported) {
        status = -ENOENT; /* released: no new mappings */
    } else {
        seglen = s->len;
        status = seg_hold(s, c->id, 1);
    }
    seg_unlock();
    if (freed_now)
        ls_eventfd_signal(freed_fd);
    reply(c, rq, status, seglen, NULL, 0, 0);
}

static void serve_message(struct conn *c, const uint8_t *body, uint64_t len)
{
    struct ls_req rq;
    struct ls_req_install in;
    if (len != sizeof rq && len != sizeof in) {
        reply(c, NULL, -EPROTO, 0, NULL, 0, 0);
        return;
    }
    memcpy(&rq, body, sizeof rq);
    if (rq.magic != LS_MAGIC || rq.version != LS_VERSION || (len == sizeof in) != (rq.op == LS_OP_INSTALL)) {
        reply(c, &rq, -EPROTO, 0, NULL, 0, 0);
        return;
    }
    switch (rq.op) {
    case LS_OP_INSTALL:
        memcpy(&in, body, sizeof in);
        serve_install(c, &in);
        break;
    case LS_OP_UFFD:
        serve_uffd(c, &rq);
        break;
    case LS_OP_READ:
        serve_read(c, &rq);
        break;
    case LS_OP_HOLD:
        serve_hold(c, &rq, 0);
        break;
    case LS_OP_RELEASE:
        serve_hold(c, &rq, 1);
        break;
    case LS_OP_PING:
        reply(c, &rq, 0, 0, NULL, 0, 0);
        break;
    default:
        reply(c, &rq, -EPROTO, 0, NULL, 0, 0);
    }
}

/* Parse and serve what rx holds, one reply at a time. -1: drop the peer. */
static int conn_parse(struct conn *c)
{
    int rc = 0;
    c->rxoff = 0;
    if (!c->greeted) {
        if (c->rxlen < ZMTP_GREETING)
            return 0;
        if (zmtp_check_greeting(c->rx) < 0)
            return -1;
        c->rxoff = ZMTP_GREETING;
        c->greeted = 1; /* READY follows as the first command frame */
    }
    while (!c->txlen && !c->dseg) { /* the previous reply is out */
        struct ls_req_install demand;
        if (take_demand(c, &demand)) { /* a waiting thread goes first */
            serve_install(c, &demand);
            if (conn_flush(c) < 0)
                return -1;
            continue;
        }
        size_t off = c->rxoff;
        uint8_t flags;
        uint64_t len;
        size_t h = zmtp_parse_header(c->rx + off, c->rxlen - off, &flags, &len);
        if (!h)
            break;
        if (len > ZMTP_MAX_SMALL) { /* no request is that long: a broken or hostile peer */
            rc = -1;
            break;
        }
        if (c->rxlen - off - h < len)
            break;
        const uint8_t *body = c->rx + off + h;
        c->rxoff = off + h + len;
        if (flags & ZMTP_COMMAND)
            continue; /* READY (its properties need no answer), PING, ... */
        if (flags & ZMTP_MORE) {
            c->bad_multipart = 1; /* requests are single frames */
            continue;
        }
        if (c->bad_multipart) {
            c->bad_multipart = 0;
            reply(c, NULL, -EPROTO, 0, NULL, 0, 0);
        } else {
            serve_message(c, body, len);
        }
        if (conn_flush(c) < 0)
            return -1;
    }
    memmove(c->rx, c->rx + c->rxoff, c->rxlen - c->rxoff);
    c->rxlen -= c->rxoff;
    c->rxoff = 0;
    return rc;
}

/* read() into rx, keeping at most one fd passed with the bytes (SCM_RIGHTS):
 * an OP_UFFD request claims it. The kernel closes fds that do not fit the
 * control buffer; a second fd before the first is claimed is closed here. */
static ssize_t conn_read(struct conn *c)
{
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } ctl;
    struct iovec iov = {c->rx + c->rxlen, sizeof c->rx - c->rxlen};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = &ctl, .msg_controllen = sizeof ctl};
    ssize_t r = recvmsg(c->fd, &m, MSG_CMSG_CLOEXEC);
    if (r < 0)
        return r;
    for (struct cmsghdr *h = CMSG_FIRSTHDR(&m); h; h = CMSG_NXTHDR(&m, h)) {
        if (h->cmsg_level != SOL_SOCKET || h->cmsg_type != SCM_RIGHTS)
            continue;
        size_t nfd = (h->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t k = 0; k < nfd; k++) {
            int fd;
            memcpy(&fd, CMSG_DATA(h) + k * sizeof fd, sizeof fd);
            if (c->pending_fd < 0)
                c->pending_fd = fd;
            else
                close(fd);
        }
    }
    return r;
}

/* Level-triggered epoll: wait for either input or room for output, never both,
 * so a peer whose reply is stuck does not make the loop spin on its requests. */
static uint32_t conn_events(int out)
{
    return out ? EPOLLOUT : (EPOLLIN | EPOLLRDHUP);
}

/* The loop's callback for a connection (c->loop's thread only). */
static void on_conn(int fd, uint32_t events, void *arg)
{
    (void)fd;
    (void)events;
    struct conn *c = arg;
    int pending = c->txlen || c->dseg;
    if (pending) {
        int f = conn_flush(c);
        if (f < 0) {
            conn_close(c);
            return;
        }
        if (f == 0)
            return; /* still waiting for room (EPOLLOUT mode) */
        if (ls_loop_mod(&c->io, conn_events(0)) < 0) {
            conn_close(c);
            return;
        }
    }
    /* Requests may already be buffered from before the reply went out. */
    if (conn_parse(c) < 0) {
        conn_close(c);
        return;
    }
    while (!c->txlen && !c->dseg) {
        if (c->rxlen == sizeof c->rx) {
            conn_close(c); /* a full buffer that parses to nothing */
            return;
        }
        ssize_t r = conn_read(c);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno == EAGAIN)
            break;
        if (r <= 0) {
            conn_close(c);
            return;
        }
        c->rxlen += (size_t)r;
        if (conn_parse(c) < 0) {
            conn_close(c);
            return;
        }
    }
    if ((c->txlen || c->dseg) && ls_loop_mod(&c->io, conn_events(1)) < 0)
        conn_close(c); /* it would never be woken to send the rest */
}

/* Loop 0's callback for listen_fd: take every pending connection and hand
 * each to a loop in turn. */
static void on_accept(int lfd, uint32_t events, void *arg)
{
    (void)events;
    (void)arg;
    static const char peer_type[] = "ROUTER";
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if ((errno == EMFILE || errno == ENFILE) && spare_fd >= 0) {
                /* Out of descriptors: a connection left pending keeps the
                 * (level-triggered) listening socket ready and this loop
                 * spinning. Refuse it with the descriptor kept for that; the
                 * peer sees the connection closed. */
                close(spare_fd);
                fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
                if (fd >= 0)
                    close(fd);
                spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
                if (fd >= 0)
                    continue;
            }
            return; /* EAGAIN: all taken; anything else: tried again on the next wake-up */
        }
        struct ucred cred;
        socklen_t cl = sizeof cred;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) < 0 || cred.uid != getuid()) {
            close(fd); /* the 0700 directory already keeps others out; belt and braces */
            continue;
        }
        int sz = 4 << 20; /* capped by net.core.wmem_max; a failure leaves the default */
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
        struct conn *c = calloc(1, sizeof *c);
        if (!c) {
            close(fd);
            continue;
        }
        c->id = next_conn_id++;
        c->fd = fd;
        c->uffd = c->pending_fd = -1;
        c->loop = &loops[c->id % (uint64_t)nloops];
        ls_io_init(&c->io, fd, on_conn, c);
        pthread_mutex_lock(&conns_lock);
        c->next = conns;
        if (conns)
            conns->prev = c;
        conns = c;
        pthread_mutex_unlock(&conns_lock);
        uint8_t g[ZMTP_GREETING];
        zmtp_greeting(g, 1);
        tx_put(c, g, sizeof g);
        c->txlen += zmtp_ready(c->tx + c->txlen, sizeof c->tx - c->txlen, peer_type);
        /* Everything this thread does with c happens before it joins its
         * loop: from then on only that loop touches it. */
        int f = conn_flush(c);
        if (f < 0 || ls_loop_add(&c->loop->ev, &c->io, conn_events(f == 0)) < 0)
            conn_close(c);
    }
}

/* Every loop's callback for stop_fd (never drained: every loop sees it). */
static void on_stop(int fd, uint32_t events, void *arg)
{
    (void)fd;
    (void)events;
    ((struct loop *)arg)->stopping = 1;
}

static void *server_main(void *arg)
{
    struct loop *L = arg;
    ls_block_signals();
    pthread_setname_np(pthread_self(), "lazyshare-pages");
    /* epoll_wait fails only on a bad epoll fd or buffer (EINTR is 0): then
     * this loop's connections go unanswered and their consumers time out. */
    while (!L->stopping && ls_loop_run_once(&L->ev, -1) >= 0)
        ;
    return NULL;
}

/* Undo a start that failed part-way (or a stop): stop and join the loops
 * already running, then close what the start opened (a loop never reached has
 * no epoll fd, ev.ep -1). */
static void start_undo(int started)
{
    if (started)
        ls_eventfd_signal(stop_fd);
    for (int i = 0; i < started; i++)
        pthread_join(loops[i].thread, NULL);
    for (int i = 0; i < nloops; i++) {
        ls_loop_close(&loops[i].ev);
        free(loops[i].bounce);
        loops[i] = (struct loop){.ev.ep = -1};
    }
    nloops = 0;
    if (stop_fd >= 0)
        close(stop_fd);
    stop_fd = -1;
    if (spare_fd >= 0)
        close(spare_fd);
    spare_fd = -1;
}

int ls_server_start(const char *endpoint, const struct ls_server_config *cfg)
{
    if (server_running)
        return -EALREADY;
    if (strncmp(endpoint, "ipc://", 6))
        return -EINVAL;
    const char *path = endpoint + 6;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path)
        return -ENAMETOOLONG;
    strcpy(sa.sun_path, path);
    uint64_t spin_ns = (uint64_t)cfg->spin_us * 1000ull; /* 0: sleep at once */
    /* One loop per CPU unless configured, at most MAX_LOOPS. */
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    uint32_t want = cfg->threads ? cfg->threads : (uint32_t)(ncpu > 0 ? ncpu : 1);
    int n = want > MAX_LOOPS ? MAX_LOOPS : (int)want;

    int rc = 0, bound = 0, started = 0, opened_freed = 0, opened_pagemap = 0;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
        goto fail;
    bound = 1;
    if (chmod(path, 0600) < 0 || listen(fd, 128) < 0)
        goto fail;
    /* freed_fd and pagemap_fd outlive a stop (the reaper keeps the one, exports
     * read the other): opened once, by the first start that succeeds. */
    if (freed_fd < 0) {
        if ((freed_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0)
            goto fail;
        opened_freed = 1;
    }
    if (pagemap_fd < 0) {
        pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC); /* -1: no zero replies */
        opened_pagemap = pagemap_fd >= 0;
    }
    if ((stop_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) < 0)
        goto fail;
    if ((spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0) /* see on_accept */
        goto fail;
    for (int i = 0; i < MAX_LOOPS; i++)
        loops[i] = (struct loop){.ev.ep = -1};
    nloops = n;
    for (int i = 0; i < n; i++) {
        struct loop *L = &loops[i];
        void *b = NULL;
        if ((rc = ls_loop_init(&L->ev, spin_ns)) < 0)
            goto fail_rc;
        ls_io_init(&L->stop_io, stop_fd, on_stop, L);
        if ((rc = ls_loop_add(&L->ev, &L->stop_io, EPOLLIN)) < 0)
            goto fail_rc;
        if ((rc = -posix_memalign(&b, ls_page_size(), ls_page_size())))
            goto fail_rc;
        L->bounce = b;
    }
    listen_fd = fd;
    for (int i = 0; i < n; i++, started++)
        if ((rc = -pthread_create(&loops[i].thread, NULL, server_main, &loops[i])))
            goto fail_rc;
    /* Connections only once every loop runs: a failed start accepted none.
     * (Added from this thread while loop 0 waits: see loop.h.) */
    ls_io_init(&listen_io, fd, on_accept, NULL);
    if ((rc = ls_loop_add(&loops[0].ev, &listen_io, EPOLLIN)) < 0)
        goto fail_rc;
    snprintf(listen_path, sizeof listen_path, "%s", path);
    server_running = 1;
    return 0;

fail:
    rc = -errno;
fail_rc:
    start_undo(started);
    if (opened_pagemap) {
        close(pagemap_fd);
        pagemap_fd = -1;
    }
    if (opened_freed) {
        close(freed_fd);
        freed_fd = -1;
    }
    close(fd);
    if (bound)
        unlink(path);
    listen_fd = -1;
    return rc;
}

int ls_server_stop(void)
{
    if (!server_running)
        return 0;
    start_undo(nloops);
    /* Connections are left to the process's exit: peers see EOF then. */
    close(listen_fd);
    unlink(listen_path);
    listen_fd = -1;
    server_running = 0;
    return 0;
}

/* In a forked child (registered below with ls_on_fork_child): none of the
 * parent's loops runs here; forget the server without touching its state. */
static void server_reset_after_fork(void)
{
    pthread_mutex_init(&seg_lock, NULL);
    segs = (struct ls_htab){0};
    dead_caches = NULL; /* their memfds are closed by cache.c's own reset */
    freed = NULL;
    nfreed = capfreed = 0;
    server_running = 0;
    /* The parent's connections are not the child's: without this a consumer
     * would not see its owner go away, and consumers' userfaultfds would stay
     * referenced by a process that never serves them. */
    for (struct conn *c = conns; c; c = c->next) {
        close(c->fd);
        if (c->uffd >= 0)
            close(c->uffd);
        if (c->pending_fd >= 0)
            close(c->pending_fd);
    }
    conns = NULL;
    pthread_mutex_init(&conns_lock, NULL);
    for (int i = 0; i < nloops; i++) {
        ls_loop_close(&loops[i].ev); /* never ls_loop_del: the epoll instance is the parent's too */
        loops[i] = (struct loop){.ev.ep = -1};
    }
    nloops = 0;
    pthread_mutex_init(&maps_lock, NULL);
    int *fds[] = {&stop_fd, &freed_fd, &listen_fd, &pagemap_fd, &maps_fd, &spare_fd};
    for (size_t i = 0; i < sizeof fds / sizeof fds[0]; i++) {
        if (*fds[i] >= 0)
            close(*fds[i]);
        *fds[i] = -1;
    }
    atomic_store(&ls_ctr.segments_exported, 0);
}

__attribute__((constructor)) static void server_register_fork_reset(void)
{
    ls_on_fork_child(server_reset_after_fork); /* a few users of eight slots: cannot fail */
}

int ls_server_cache(const uint8_t *id, int *fd, uint64_t *ino)
{
    const uint64_t ps = ls_page_size();
    *fd = -1;
    *ino = 0;
    int rc;
    /* Created under the lock (a handful of syscalls, once per segment): no
     * second cache can race it, and the segment cannot go meanwhile. */
    pthread_mutex_lock(&seg_lock);
    struct seg *s = seg_find(id);
    if (!s || !s->exported)
        rc = -ENOENT;
    else if (s->cache)
        rc = -EEXIST;
    else
        rc = ls_cache_new((s->len + ps - 1) / ps * ps, &s->cache);
    if (!rc) {
        *fd = s->cache->fd;
        *ino = s->cache->ino;
    }
    seg_unlock();
    return rc;
}

/* A segment with a cache, busy-referenced for use without the lock: the
 * lookup shared by the calls below. */
static struct seg *seg_get_cached(const uint8_t *id, int *rc)
{
    pthread_mutex_lock(&seg_lock);
    struct seg *s = seg_find(id);
    *rc = 0;
    if (!s || !s->cache)
        *rc = -ENOENT;
    else
        s->busy++;
    seg_unlock();
    return *rc ? NULL : s;
}

/* n (offset, length) ranges of s: 0 if all lie inside it, else -ERANGE. */
static int ranges_check(const struct seg *s, const uint64_t *r, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        if (r[2 * i] > s->len || r[2 * i + 1] > s->len - r[2 * i])
            return -ERANGE;
    return 0;
}

int64_t ls_server_cache_punch(const uint8_t *id, const uint64_t *ranges, uint32_t n)
{
    int rc;
    if (n && !ranges)
        return -EINVAL;
    struct seg *s = seg_get_cached(id, &rc); /* the cache stays while the holes are punched */
    if (!s)
        return rc;
    int64_t r = ranges_check(s, ranges, n);
    if (!r)
        r = ls_cache_punch(s->cache, ranges, n);
    seg_unbusy(s);
    return r;
}

int64_t ls_server_cache_resident(const uint8_t *id)
{
    pthread_mutex_lock(&seg_lock);
    struct seg *s = seg_find(id);
    int64_t rc = s && s->cache ? ls_cache_resident(s->cache) : -ENOENT;
    seg_unlock();
    return rc;
}

static int64_t refresh_ranges(struct ls_cache *c, const uint8_t *base, const uint64_t *r, uint32_t n, int punch)
{
    int64_t total = 0;
    for (uint32_t i = 0; i < n && total >= 0; i++) {
        int64_t k = r[2 * i + 1] ? ls_cache_refresh(c, r[2 * i], base + r[2 * i], r[2 * i + 1], punch) : 0;
        total = k < 0 ? k : total + k;
    }
    return total;
}

struct refresh_job {
    struct ls_cache *c;
    const uint8_t *base;
    const uint64_t *r;
    uint32_t n;
    int punch;
    int64_t out;
};

static void *refresh_main(void *arg)
{
    struct refresh_job *j = arg;
    ls_block_signals();
    j->out = refresh_ranges(j->c, j->base, j->r, j->n, j->punch);
    return NULL;
}

#define REFRESH_SPLIT ((uint64_t)64 << 20) /* compare this much or more on two threads */

int64_t ls_server_cache_refresh(const uint8_t *id, const uint64_t *ranges, uint32_t n, int punch)
{
    const uint64_t ps = ls_page_size();
    int rc;
    if (n && !ranges)
        return -EINVAL;
    struct seg *s = seg_get_cached(id, &rc);
    if (!s)
        return rc;
    if ((rc = ranges_check(s, ranges, n))) {
        seg_unbusy(s);
        return rc;
    }
    uint64_t bytes = 0;
    for (uint32_t i = 0; i < n; i++)
        bytes += ranges[2 * i + 1];
    /* Comparing is bound by memory reads: a large one goes faster on two
     * CPUs. The ranges are cut in two at a page boundary near the middle. */
    uint64_t *half = NULL;
    uint32_t na = n, nb = 0;
    if (bytes >= REFRESH_SPLIT && sysconf(_SC_NPROCESSORS_ONLN) > 1 && (half = malloc((size_t)(n + 1) * 16))) {
        uint64_t seen = 0;
        for (uint32_t i = 0; i < n; i++) {
            uint64_t off = ranges[2 * i], len = ranges[2 * i + 1];
            if (seen + len < bytes / 2) {
                seen += len;
                continue;
            }
            uint64_t mid = (off + (bytes / 2 - seen)) / ps * ps; /* cache offsets are page-aligned */
            if (mid <= off)
                mid = off;
            if (mid > off + len)
                mid = off + len;
            memcpy(half, ranges, (size_t)i * 16); /* part A: ranges before i, and [off, mid) */
            half[2 * i] = off;
            half[2 * i + 1] = mid - off;
            na = i + 1;
            uint64_t *b = malloc((size_t)(n - i) * 16);
            if (!b) {
                na = n;
                break;
            }
            b[0] = mid; /* part B: [mid, off+len), and the ranges after i */
            b[1] = off + len - mid;
            memcpy(b + 2, ranges + 2 * (i + 1), (size_t)(n - i - 1) * 16);
            nb = n - i;
            struct refresh_job j = {s->cache, s->addr, b, nb, punch, 0};
            pthread_t t;
            if (pthread_create(&t, NULL, refresh_main, &j) == 0) {
                int64_t ra = refresh_ranges(s->cache, s->addr, half, na, punch);
                pthread_join(t, NULL);
                free(b);
                free(half);
                seg_unbusy(s);
                return ra < 0 ? ra : j.out < 0 ? j.out : ra + j.out;
            }
            free(b);
            na = n;
            break;
        }
        free(half);
    }
    int64_t total = refresh_ranges(s->cache, s->addr, ranges, n, punch);
    seg_unbusy(s);
    return total;
}

int ls_server_cache_fill(const uint8_t *id, uint64_t off, uint64_t len)
{
    const uint64_t ps = ls_page_size();
    int rc;
    struct seg *s = seg_get_cached(id, &rc);
    if (!s)
        return rc;
    if (off % ps || len % ps || off > s->len || len > s->len - off)
        rc = -ERANGE;
    else if (len)
        rc = ls_cache_keep(s->cache, off, s->addr + off, len);
    seg_unbusy(s);
    return rc;
}

int ls_server_snap_begin(const uint8_t *id, uint64_t addr, uint64_t len)
{
    const uint64_t ps = ls_page_size();
    int rc;
    struct seg *s = seg_get_cached(id, &rc); /* busy until ls_server_snap_end */
    if (!s)
        return rc;
    uint64_t base = (uintptr_t)s->addr, clen = (s->len + ps - 1) / ps * ps;
    if (addr < base || len > clen || addr - base > clen - len)
        rc = -ERANGE;
    else {
        /* What an earlier snapshot kept is stale or equal to the memory now;
         * forgotten before this one can keep anything. */
        ls_cache_unkeep_all(s->cache);
        rc = ls_track_snap_add(addr, s->cache, base, clen);
    }
    if (!rc) {
        pthread_mutex_lock(&seg_lock);
        s->snaps++;
        seg_unlock();
        return 0;
    }
    seg_unbusy(s);
    return rc;
}

int ls_server_snap_end(const uint8_t *id, uint64_t addr)
{
    pthread_mutex_lock(&seg_lock);
    struct seg *s = seg_find(id);
    int ok = s && s->cache && s->snaps > 0;
    if (ok)
        s->snaps--;
    struct ls_cache *c = ok ? s->cache : NULL;
    seg_unlock();
    if (!ok)
        return -ENOENT;
    int rc = ls_track_snap_del(addr, c);
    seg_unbusy(s); /* the reference ls_server_snap_begin took */
    return rc == -ENOENT ? 0 : rc; /* the range went first (its array died): nothing more to tell */
}
