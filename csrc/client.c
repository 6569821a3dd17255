/*
 * The fault handler: one native thread ("lazyshare-fault") per attaching process.
 *
 *   Python (any thread, GIL released)          fault-handler thread (owns everything below)
 *   ls_client_attach: mmap + UFFDIO_REGISTER    an epoll loop (loop.h) over uffd, the command
 *                                               eventfd, one ZMTP DEALER connection per owner
 *     -> CMD_ATTACH, waits on its cond   ---->  HOLD round trip; region joins the table
 *   ls_client_detach -> CMD_DETACH       ---->  UFFDIO_UNREGISTER, munmap, RELEASE
 *   a thread touches a missing page  --kernel-> uffd_msg -> INSTALL request(s); the
 *                                               owner UFFDIO_COPYs into this process
 *                                               through the userfaultfd handed to it on
 *                                               connecting (which wakes the thread), then
 *                                               replies. READ instead (owner without an
 *                                               fd, LAZYSHARE_DATA_PATH=wire): the payload
 *                                               comes in the reply -> UFFDIO_COPY here.
 *
 * This file owns the fault loop (client_main), the regions and their tables,
 * the in-flight requests, the commands from Python threads, budget eviction,
 * write-protect faults, deadlines, the watchdog and the public ls_client_*
 * functions. The connections to owners are conn.c's, the page sources
 * source.c's (shared declarations: client_internal.h). Threads: the fault
 * loop and everything it calls run on "lazyshare-fault"; the public ls_client_*
 * functions on the calling Python thread (they reach the handler through the
 * command queue, and read the region tree under tree_lock); watch_main is the
 * watchdog thread ("lazyshare-watch").
 *
 * Connecting to an owner never blocks this thread: connect, the ZMTP greeting
 * and READY and the userfaultfd offer are steps of a per-peer state machine
 * that this loop drives (P_CONNECTING -> P_GREETING -> P_OFFER -> P_READY, see
 * struct peer in client_internal.h, and conn.c). An attach whose owner is not
 * ready yet waits on that peer until it is (then its HOLDs go out) or its
 * deadline passes; faults on other owners' regions are served meanwhile.
 *
 * Only this thread touches the regions, the in-flight table and the sockets;
 * Python threads reach it through the command queue (cmd_lock). A region is
 * unmapped by this thread only, after it is removed from the tables, so a late
 * reply can never be copied into memory that was reused for something else.
 *
 * No per-attach, per-fault or per-reply cost grows with the number of live
 * regions or requests:
 *   regions by id       hash table (region ids are pure keys: detach, HOLD
 *                       replies, the budget's FIFO)
 *   regions by address  ordered tree (glibc's tsearch, a red-black tree): a
 *                       fault gives an address *inside* a region, a
 *                       containing-range lookup that a hash cannot answer;
 *                       O(log n). Python threads ask it too
 *                       (ls_client_overlaps), so changes take tree_lock.
 *   requests by tag     hash table; also one list in tag order (= send order:
 *                       the oldest is its head, overdue ones are found from
 *                       there) and one list per region (a fault on a page
 *                       already requested looks only at its region's requests)
 *   attaching, dying    lists of the regions in those states: deadlines and
 *                       unmapping look at nothing else
 *
 * Read-ahead (as CRIU's lazy-pages and the kernel's readahead; the policy is
 * csrc/readahead.c, pure functions): a region keeps a window that starts at
 * min_block, doubles while faults move forward within two windows of the last
 * one, and falls back to min_block on a random fault; a sequential fault also
 * requests the next window ahead. Every page is requested
 * once: a bitmap marks pages requested, the in-flight table dedupes faults on
 * pages still on the wire.
 *
 * A fault that cannot be served (owner gone, segment released under a mapping,
 * no reply within fault_timeout) is fatal for the process (ls_fatal): the
 * faulting thread must never resume on zeros, and a hang is worse than an error.
 */
#include "client_internal.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <search.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

enum { CMD_ATTACH, CMD_DETACH };

struct cmd {
    int kind;
    struct region **regions; /* ATTACH: one attach call's */
    uint32_t nregions;
    char endpoint[256];      /* ATTACH: resolved to a peer by the handler thread */
    int pid;                 /* ATTACH: the owner */
    uint64_t region_id;      /* DETACH */
    struct cmd *next;
};

/* ---- shared with Python threads (cmd_lock) ---- */
static pthread_mutex_t cmd_lock = PTHREAD_MUTEX_INITIALIZER;
static struct cmd *cmd_head, *cmd_tail;
static int cmd_fd = -1;
static int client_running;
static int client_mode = -1;
int client_uffd = -1;
static _Atomic uint64_t next_region_id = 1;
static pthread_t client_thread;

/* ---- the region tree: written by the handler thread, read by any under tree_lock ---- */
static pthread_mutex_t tree_lock = PTHREAD_MUTEX_INITIALIZER;
static void *region_tree;

/* ---- the handler thread's own ---- */
static struct ls_htab region_ids;
static size_t nregions;
static struct region *attaching, *dying;
static struct ls_htab infl_tags;
static struct inflight *infl_oldest, *infl_newest, *infl_spare;
static int ninfl;
static _Atomic uint64_t next_tag = 1; /* written by the handler only; read by ls_client_sync */
static _Atomic uint64_t oldest_tag = 1; /* published: every request below it is answered */
static uint64_t min_pages = 4;
uint64_t client_max_pages = 1024;
/* Across a link the bytes are the time, and a sequential run that stops
 * leaves up to two windows of read-ahead on the wire: a smaller window there
 * (its round trip is still small next to a window's transfer). */
uint64_t client_link_max_pages = 1024;
static uint64_t fault_timeout_ns = 60ull * 1000000000ull;
static uint64_t spin_ns; /* ls_client_config.spin_us; 0 disables */
int client_direct_wanted = 1; /* !ls_client_config.wire */
/* The handler's event loop (loop.h): the userfaultfd, the command eventfd and
 * each owner connection (conn.c) are registered in it. */
static struct ls_loop client_loop = {.ep = -1};
static struct ls_io cmd_io, uffd_io;
/* For the watchdog: the handler's loop count and how many requests it has on
 * the wire, published each iteration. */
static _Atomic uint64_t budget; /* bytes of fetched pages to keep; 0: no limit */
static uint64_t resident_total;  /* handler thread: sum of regions' resident */

/* Installed blocks, oldest first: what the budget drops when it is exceeded. */
struct block {
    uint64_t region, page, npages;
};
static struct block *fifo;
static size_t fifo_head, fifo_len, fifo_cap;

static _Atomic uint64_t heartbeat;
static _Atomic int inflight_published;
static pthread_t watch_thread;
/* Stops a watchdog whose handler failed to start (watch_lock). */
static pthread_mutex_t watch_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t watch_cond; /* CLOCK_MONOTONIC, set up by ls_client_start */
static int watch_stop;

static inline int bit_get(const uint8_t *b, uint64_t i) { return (b[i >> 3] >> (i & 7)) & 1; }
static inline void bit_set(uint8_t *b, uint64_t i) { b[i >> 3] |= (uint8_t)(1u << (i & 7)); }

static void waiter_done(struct waiter *w, int *status_out, int status)
{
    pthread_mutex_lock(&w->lock);
    if (status < 0 && !w->status)
        w->status = status;
    *status_out = status;
    if (--w->pending == 0)
        pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

static struct region *region_by_id(uint64_t id)
{
    return (struct region *)ls_htab_find(&region_ids, id); /* h is the first member */
}

/* Regions never overlap (each is its own mapping), so "overlaps" orders them:
 * a key range compares equal to the one region it meets. */
static int range_cmp(const void *a, const void *b)
{
    const struct region *x = a, *y = b;
    if (x->base + x->maplen <= y->base)
        return -1;
    if (x->base >= y->base + y->maplen)
        return 1;
    return 0;
}

static struct region *region_by_addr(uintptr_t a)
{
    struct region key = {.base = a, .maplen = 1};
    void *n = tfind(&key, &region_tree, range_cmp); /* the handler thread is the only writer */
    return n ? *(struct region **)n : NULL;
}

/* Enter r in the id table and the address tree: 0 or -ENOMEM. */
static int region_index(struct region *r)
{
    r->h.key = r->id;
    if (ls_htab_insert(&region_ids, &r->h) < 0)
        return -ENOMEM;
    r->in_ids = 1;
    pthread_mutex_lock(&tree_lock);
    void *n = tsearch(r, &region_tree, range_cmp);
    pthread_mutex_unlock(&tree_lock);
    if (!n)
        return -ENOMEM;
    if (*(struct region **)n != r)
        return -EEXIST; /* an overlapping region: cannot happen while mappings are distinct */
    r->in_tree = 1;
    nregions++;
    return 0;
}

static void region_unindex(struct region *r)
{
    if (r->in_ids)
        ls_htab_remove(&region_ids, &r->h);
    if (r->in_tree) {
        pthread_mutex_lock(&tree_lock);
        tdelete(r, &region_tree, range_cmp);
        pthread_mutex_unlock(&tree_lock);
        nregions--;
    }
    r->in_ids = r->in_tree = 0;
}

static void attaching_add(struct region *r)
{
    r->aprev = NULL;
    r->anext = attaching;
    if (attaching)
        attaching->aprev = r;
    attaching = r;
}

static void attaching_remove(struct region *r)
{
    if (r->aprev)
        r->aprev->anext = r->anext;
    else if (attaching == r)
        attaching = r->anext;
    if (r->anext)
        r->anext->aprev = r->aprev;
    r->aprev = r->anext = NULL;
}

static void dying_add(struct region *r)
{
    r->dprev = NULL;
    r->dnext = dying;
    if (dying)
        dying->dprev = r;
    dying = r;
}

static void dying_remove(struct region *r)
{
    if (r->dprev)
        r->dprev->dnext = r->dnext;
    else if (dying == r)
        dying = r->dnext;
    if (r->dnext)
        r->dnext->dprev = r->dprev;
    r->dprev = r->dnext = NULL;
}


/* The region's request covering page, if one is on the wire (a few at most:
 * the demand block and the read-ahead behind it). */
static struct inflight *infl_find_page(const struct region *r, uint64_t page)
{
    for (struct inflight *f = r->ihead; f; f = f->rnext)
        if (page >= f->page && page < f->page + f->npages)
            return f;
    return NULL;
}

static struct inflight *infl_find_tag(uint64_t tag)
{
    return (struct inflight *)ls_htab_find(&infl_tags, tag); /* h is the first member */
}

static void infl_remove(struct inflight *f)
{
    ls_htab_remove(&infl_tags, &f->h);
    if (f->prev)
        f->prev->next = f->next;
    else
        infl_oldest = f->next;
    if (f->next)
        f->next->prev = f->prev;
    else
        infl_newest = f->prev;
    struct region *r = f->region;
    if (f->rprev)
        f->rprev->rnext = f->rnext;
    else
        r->ihead = f->rnext;
    if (f->rnext)
        f->rnext->rprev = f->rprev;
    r->inflight--;
    ninfl--;
    peer_put(f->peer);
    f->next = infl_spare; /* kept for the next request: no malloc per request */
    infl_spare = f;
}


void request_run(struct region *r, uint64_t page, uint64_t n, uint64_t fault_ns)
{
    struct inflight *f = infl_spare;
    if (f)
        infl_spare = f->next;
    else if (!(f = malloc(sizeof *f)))
        ls_fatal("out of memory for in-flight requests");
    uint64_t tag = next_tag++;
    *f = (struct inflight){
        .h = {.key = tag}, .tag = tag, .region = r, .page = page, .npages = n,
        .fault = fault_ns, .nfaults = fault_ns ? 1 : 0, .peer = r->peer, .src = source_for(r),
    };
    int rc = f->src->request(f);
    if (rc < 0)
        ls_fatal("cannot send a page request to %s: errno %d", r->peer->endpoint, -rc);
    f->sent = ls_now_ns();
    for (uint64_t i = page; i < page + n; i++)
        bit_set(r->requested, i);
    if (ls_htab_insert(&infl_tags, &f->h) < 0)
        ls_fatal("out of memory for in-flight requests");
    f->prev = infl_newest; /* tags only grow: the list stays in tag order */
    if (infl_newest)
        infl_newest->next = f;
    else
        infl_oldest = f;
    infl_newest = f;
    f->rnext = r->ihead;
    if (r->ihead)
        r->ihead->rprev = f;
    r->ihead = f;
    ninfl++;
    r->peer->refs++;
    r->inflight++;
    CTR_ADD(requests, 1);
}

/*
 * A cached region: mark the pages of [from, to) that map already (cached by
 * another consumer, or present here) as requested, so that read-ahead asks only
 * for the cache's holes (the owner would skip the others, but its reply would
 * count them as fetched). A page punched from the cache later faults and is
 * fetched again (refetch_punched). keep_first: from carries a fault; it is
 * requested whatever mincore says (its reply wakes the faulting thread).
 */
static void skip_cached(struct region *r, uint64_t from, uint64_t to, int keep_first)
{
    const uint64_t ps = ls_page_size();
    unsigned char vec[512];
    for (uint64_t p = from + (keep_first ? 1 : 0); p < to;) {
        uint64_t n = to - p > sizeof vec ? sizeof vec : to - p;
        if (mincore((void *)(r->base + p * ps), n * ps, vec) < 0)
            return; /* cannot tell: request them all, as for anonymous memory */
        for (uint64_t i = 0; i < n; i++)
            if (vec[i] & 1)
                bit_set(r->requested, p + i);
        p += n;
    }
}

/* Request every not-yet-requested page of [from, to), in runs of at most
 * client_max_pages; the first run, if it starts at from, carries the fault. */
static void request_range(struct region *r, uint64_t from, uint64_t to, uint64_t fault_ns)
{
    if (to > r->npages)
        to = r->npages;
    if (r->cached && from < to)
        skip_cached(r, from, to, fault_ns != 0);
    uint64_t start, n;
    for (uint64_t p = from; ls_readahead_next_run(r->requested, p, to, client_max_pages, &start, &n); p = start + n)
        request_run(r, start, n, start == from ? fault_ns : 0);
}

static void wake_page(uintptr_t addr)
{
    const uint64_t ps = ls_page_size();
    struct uffdio_range rg = {.start = addr & ~(ps - 1), .len = ps};
    ioctl(client_uffd, UFFDIO_WAKE, &rg); /* ENOENT: the range was unregistered meanwhile */
}

/* A cached region: whether page reads without a fault now (its pte is
 * present, or the memfd has the page). */
static int page_mapped(const struct region *r, uint64_t page)
{
    const uint64_t ps = ls_page_size();
    unsigned char v = 0;
    if (mincore((void *)(r->base + page * ps), ps, &v) < 0)
        return 1; /* cannot tell: wake, as for any page already installed */
    return v & 1;
}

/*
 * A cached region faulted on a page requested and answered before, which
 * neither its pte nor the memfd has: the owner punched it out of the cache
 * (ls_server_cache_punch) while this region mapped it. Waking would fault again
 * at once, forever; fetch it again instead, with the pages of the demand block
 * that went the same way (answered, not in flight, not mapped).
 */
static void refetch_punched(struct region *r, const struct ls_readahead_plan *plan, uint64_t now)
{
    const uint64_t ps = ls_page_size();
    uint64_t n = plan->to - plan->from;
    unsigned char vec[256];
    if (n > sizeof vec)
        n = sizeof vec;
    if (mincore((void *)(r->base + plan->from * ps), n * ps, vec) < 0) {
        n = 1; /* cannot tell for the block: the faulting page alone, found missing above */
        vec[0] = 0;
    }
    for (uint64_t i = 0; i < n; i++) {
        uint64_t pg = plan->from + i;
        if (!(vec[i] & 1) && bit_get(r->requested, pg) && !infl_find_page(r, pg))
            r->requested[pg >> 3] &= (uint8_t)~(1u << (pg & 7));
    }
    request_range(r, plan->from, plan->from + n, now);
}

static void on_fault(uintptr_t addr, uint64_t now)
{
    CTR_ADD(faults, 1);
    struct region *r = region_by_addr(addr);
    if (!r || r->state != R_ACTIVE) {
        wake_page(addr);
        return;
    }
    const uint64_t ps = ls_page_size();
    uint64_t page = (addr - r->base) / ps;

    struct ls_readahead_plan plan;
    ls_readahead_fault(&r->ra, page, r->npages, (uint32_t)min_pages, (uint32_t)r->max_pages, &plan);
    if (bit_get(r->requested, page)) {
        struct inflight *f = infl_find_page(r, page);
        if (f) {
            if (!f->fault)
                f->fault = now;
            f->nfaults++;
        } else if (r->cached && !page_mapped(r, page)) {
            refetch_punched(r, &plan, now);
        } else {
            wake_page(addr); /* installed after the fault was queued */
        }
    } else {
        request_range(r, plan.from, plan.to, now);
    }
    if (plan.sequential)
        request_range(r, plan.ahead_from, plan.ahead_to, 0);
}


/* Unlink, unmap and free a detached region (its range may be reused from now on). */
static void region_free(struct region *r)
{
    region_unindex(r); /* before munmap: no lookup may find a range that is gone */
    dying_remove(r);
    munmap((void *)r->base, r->maplen);
    /* Replies still on the wire find no request and are dropped. */
    while (r->ihead)
        infl_remove(r->ihead);
    if (r->peer)
        peer_put(r->peer);
    resident_total -= r->resident; /* its blocks in the FIFO are skipped when reached */
    free(r->dirty);
    free(r->requested);
    free(r);
}

static void region_destroy(struct region *r, int tell_owner)
{
    if (client_mode != LS_MODE_EAGER) {
        struct uffdio_range rg = {.start = r->base, .len = r->maplen};
        if (ioctl(client_uffd, UFFDIO_UNREGISTER, &rg) < 0 && errno != EINVAL && errno != ENOENT)
            ls_fatal("UFFDIO_UNREGISTER failed: errno %d", errno);
    }
    if (tell_owner && r->peer && r->hold_sent)
        send_req(r->peer, LS_OP_RELEASE, r->seg, 0, 0, 0, 0, 0);
    for (struct inflight *f = r->ihead; f; f = f->rnext)
        f->dying = 1;
    resident_total -= r->resident;
    r->resident = 0;
    r->state = R_DYING;
    dying_add(r);
    CTR_SUB(regions_attached, 1);
}

/* End of a loop iteration: unmap detached regions (see R_DYING). */
static void reap_dying(void)
{
    for (struct region *r = dying, *next; r; r = next) {
        next = r->dnext;
        if (!r->inflight || !r->peer || !r->peer->direct)
            region_free(r); /* late READ payloads are dropped, never copied */
    }
}

void attach_finish(struct region *r, int status)
{
    struct waiter *w = r->waiter;
    int *out = r->status_out;
    r->waiter = NULL;
    r->status_out = NULL;
    attaching_remove(r);
    if (status < 0) {
        /* The region dies here (the caller unmaps nothing). The owner is told
         * unless it refused the hold: after a timeout its HOLD may still land. */
        region_destroy(r, status == -ETIMEDOUT || r->state != R_HOLDING);
    }
    waiter_done(w, out, status); /* the caller may free its side from here on */
}

static void fifo_push(uint64_t region, uint64_t page, uint64_t npages)
{
    if (fifo_len == fifo_cap) {
        size_t cap = fifo_cap ? fifo_cap * 2 : 256;
        struct block *b = malloc(cap * sizeof *b);
        if (!b)
            return; /* not tracked: never dropped, which is safe */
        for (size_t i = 0; i < fifo_len; i++)
            b[i] = fifo[(fifo_head + i) % fifo_cap];
        free(fifo);
        fifo = b;
        fifo_head = 0;
        fifo_cap = cap;
    }
    fifo[(fifo_head + fifo_len++) % fifo_cap] = (struct block){region, page, npages};
}

/*
 * The memory budget: while fetched pages exceed it, drop the oldest installed
 * blocks' clean pages (MADV_DONTNEED makes them missing again: touched later,
 * they are fetched again). Pages this process wrote are never dropped: they
 * are registered write-protected, and the first write to each is a WP fault
 * that marks it dirty before it is let through. A write racing with the drop
 * is safe: it waits in its WP fault, the page goes, the retried write faults it
 * in again and marks it then.
 */
static void enforce_budget(void)
{
    const uint64_t ps = ls_page_size();
    uint64_t limit = atomic_load_explicit(&budget, memory_order_relaxed);
    while (limit && resident_total > limit && fifo_len) {
        struct block b = fifo[fifo_head];
        fifo_head = (fifo_head + 1) % fifo_cap;
        fifo_len--;
        struct region *r = region_by_id(b.region);
        if (!r || r->state != R_ACTIVE || r->cached)
            continue; /* a cached region's pages are the cache's: never dropped (never queued either) */
        uint64_t dropped = 0;
        for (uint64_t pg = b.page; pg < b.page + b.npages;) {
            while (pg < b.page + b.npages && bit_get(r->dirty, pg))
                pg++;
            uint64_t start = pg;
            while (pg < b.page + b.npages && !bit_get(r->dirty, pg))
                pg++;
            if (pg > start && !madvise((void *)(r->base + start * ps), (pg - start) * ps, MADV_DONTNEED)) {
                for (uint64_t i = start; i < pg; i++)
                    r->requested[i >> 3] &= (uint8_t)~(1u << (i & 7));
                dropped += (pg - start) * ps;
            }
        }
        uint64_t gone = b.npages * ps > r->resident ? r->resident : b.npages * ps;
        r->resident -= gone; /* written pages leave the account too: they are the task's own */
        resident_total -= gone;
        CTR_ADD(bytes_dropped, dropped);
    }
}

static void on_write_protect_fault(uintptr_t addr)
{
    const uint64_t ps = ls_page_size();
    struct region *r = region_by_addr(addr);
    if (!r || !r->wp) {
        wake_page(addr);
        return;
    }
    uint64_t page = (addr - r->base) / ps;
    bit_set(r->dirty, page);
    struct uffdio_writeprotect wp = {.range = {.start = r->base + page * ps, .len = ps}, .mode = 0};
    if (ioctl(client_uffd, UFFDIO_WRITEPROTECT, &wp) < 0 && errno != ENOENT)
        ls_fatal("UFFDIO_WRITEPROTECT failed: errno %d", errno); /* it also wakes the writer */
}

void account_fetched(struct region *r, uint64_t page, uint64_t npages)
{
    if (!r->wp)
        return; /* not droppable (no write-protect here, or a cached region): not counted */
    const uint64_t ps = ls_page_size();
    r->resident += npages * ps;
    resident_total += npages * ps;
    fifo_push(r->id, page, npages);
    enforce_budget();
}


static void on_hold_reply(const struct ls_rep *rep)
{
    struct region *r = region_by_id(rep->tag);
    if (!r || r->state != R_HOLDING)
        return;
    if (rep->status) {
        attach_finish(r, rep->status);
        return;
    }
    if (rep->seglen != r->seglen) {
        attach_finish(r, -EBADMSG);
        return;
    }
    if (client_mode == LS_MODE_EAGER) {
        r->state = R_EAGER;
        source_for(r)->pull(r); /* the wire source: no userfaultfd on this rung */
        if (!r->inflight) { /* nothing to fetch (empty, or all plain) */
            r->state = R_ACTIVE;
            attach_finish(r, 0);
        }
    } else {
        r->state = R_ACTIVE;
        attach_finish(r, 0);
    }
}

/* A reply: a HOLD's goes to its attach; a page request's back to the source
 * that sent it (after the request leaves the in-flight table). */
void on_reply(struct peer *p, const struct ls_rep *rep, const uint8_t *data, uint64_t datalen, int has_data)
{
    if (rep->op == LS_OP_HOLD) {
        on_hold_reply(rep);
        return;
    }
    if (rep->op != LS_OP_READ && rep->op != LS_OP_INSTALL)
        return; /* RELEASE/PING acknowledgements */
    struct inflight *f = infl_find_tag(rep->tag);
    if (!f || f->peer != p)
        return; /* its region was freed */
    const struct page_source *src = f->src;
    struct fetch done = {
        .region = f->region, .page = f->page, .npages = f->npages,
        .fault = f->fault, .nfaults = f->nfaults, .dontwake = f->dontwake,
    };
    infl_remove(f);
    if (rep->op != src->op)
        ls_fatal("a %s reply to a %s request from %s", rep->op == LS_OP_READ ? "READ" : "INSTALL", src->name,
                 p->endpoint);
    src->complete(p, &done, rep, data, datalen, has_data);
}

void attach_peer_ready(struct peer *p)
{
    for (struct region *r = attaching, *next; r; r = next) {
        next = r->anext;
        if (r->peer != p || r->hold_sent)
            continue;
        r->hold_sent = 1;
        int e = send_req(p, LS_OP_HOLD, r->seg, r->id, 0, 0, 0, 0);
        if (e < 0)
            attach_finish(r, e);
    }
}

void attach_peer_failed(struct peer *p, int status)
{
    for (struct region *r = attaching, *next; r; r = next) {
        next = r->anext;
        if (r->peer == p)
            attach_finish(r, status);
    }
}

void dying_peer_lost(struct peer *p)
{
    for (struct region *r = dying, *next; r; r = next) {
        next = r->dnext;
        if (r->peer == p)
            region_free(r);
    }
}


static void handle_commands(void)
{
    ls_eventfd_drain(cmd_fd);
    for (;;) {
        pthread_mutex_lock(&cmd_lock);
        struct cmd *c = cmd_head;
        if (c) {
            cmd_head = c->next;
            if (!cmd_head)
                cmd_tail = NULL;
        }
        pthread_mutex_unlock(&cmd_lock);
        if (!c)
            return;
        if (c->kind == CMD_ATTACH) {
            struct peer *p = NULL;
            int rc = peer_get(c->endpoint, c->pid, c->nregions ? c->regions[0]->deadline : 0, &p);
            if (rc < 0)
                rc = rc == -ESRCH || !ls_pid_alive(c->pid) ? -ESRCH : rc;
            for (uint32_t i = 0; i < c->nregions; i++) {
                struct region *r = c->regions[i];
                attaching_add(r);
                CTR_ADD(regions_attached, 1);
                int e = rc < 0 ? rc : region_index(r);
                if (e < 0) {
                    r->peer = NULL;
                    attach_finish(r, e);
                    continue;
                }
                r->peer = p;
                p->refs++;
                if (p->state != P_READY)
                    continue; /* queued: peer_ready sends its HOLD */
                r->hold_sent = 1;
                e = send_req(p, LS_OP_HOLD, r->seg, r->id, 0, 0, 0, 0);
                if (e < 0)
                    attach_finish(r, e);
            }
            if (p && p->state != P_FREE && !p->refs)
                peer_close(p); /* opened for regions that all failed */
            free(c->regions);
        } else {
            struct region *r = region_by_id(c->region_id);
            if (r && r->state != R_DYING)
                region_destroy(r, 1);
        }
        free(c);
    }
}

static void check_deadlines(uint64_t now)
{
    conn_check_deadlines(now);
    for (struct region *r = attaching, *next; r; r = next) {
        next = r->anext;
        if (now > r->deadline) {
            int alive = ls_pid_alive(r->peer->pid);
            attach_finish(r, alive ? -ETIMEDOUT : -ESRCH);
        }
    }
    /* Oldest first: the first request younger than 200 ms ends the walk. */
    for (struct inflight *f = infl_oldest; f; f = f->next) {
        uint64_t age = now - f->sent;
        if (age < 200000000ull)
            break;
        if (f->dying)
            continue; /* nobody waits: its peer's loss or answer frees it */
        struct peer *p = f->peer;
        if (now - p->last_check > 200000000ull) {
            p->last_check = now;
            if (!ls_pid_alive(p->pid))
                ls_fatal("the owner of a lazily mapped array (pid %d) exited; its pages can no longer "
                         "be fetched",
                         p->pid);
        }
        if (age > fault_timeout_ns)
            ls_fatal("no reply from the owner (pid %d, %s) for %llu s; giving up on its pages", p->pid,
                     p->endpoint, (unsigned long long)(age / 1000000000ull));
    }
}

/* The userfaultfd has messages: faults and write-protect faults. */
static void on_uffd_ready(int fd, uint32_t events, void *arg)
{
    (void)events, (void)arg;
    struct uffd_msg msgs[64];
    uint64_t now = ls_now_ns();
    for (;;) {
        ssize_t got = read(fd, msgs, sizeof msgs);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                ls_fatal("read(userfaultfd) failed: errno %d", errno);
            break;
        }
        for (size_t i = 0; i < (size_t)got / sizeof msgs[0]; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            if (msgs[i].arg.pagefault.flags & UFFD_PAGEFAULT_FLAG_WP)
                on_write_protect_fault((uintptr_t)msgs[i].arg.pagefault.address);
            else
                on_fault((uintptr_t)msgs[i].arg.pagefault.address, now);
        }
        if ((size_t)got < sizeof msgs)
            break;
    }
}

static void on_cmd_ready(int fd, uint32_t events, void *arg)
{
    (void)fd, (void)events, (void)arg;
    handle_commands();
}

/* How long the loop may sleep: until the nearest deadline check_deadlines
 * acts on (an attach's or a set-up's; a request turning 200 ms old, and every
 * 100 ms while one is older: liveness and fault_timeout), 10 ms while a
 * connect waits to be retried, no limit if nothing is pending. */
static int loop_timeout(uint64_t now, int retrying)
{
    if (retrying)
        return 10;
    uint64_t d = conn_next_deadline();
    for (struct region *r = attaching; r; r = r->anext)
        if (r->deadline < d)
            d = r->deadline;
    if (infl_oldest) {
        uint64_t due = infl_oldest->sent + 200000000ull;
        if (due < now + 100000000ull)
            due = now + 100000000ull;
        if (due < d)
            d = due;
    }
    if (d == UINT64_MAX)
        return -1;
    if (d <= now)
        return 0;
    uint64_t ms = (d - now + 999999) / 1000000 + 1; /* just past it: check_deadlines tests now > deadline */
    return ms > 100 ? 100 : (int)ms;
}

static void *client_main(void *arg)
{
    (void)arg;
    ls_block_signals();
    pthread_setname_np(pthread_self(), "lazyshare-fault");
    int retrying = 0;
    uint64_t last_event = 0; /* ns of the last iteration that had events */
    for (;;) {
        /* The loop spins briefly before sleeping after activity (spin_ns): on
         * an idle VM each sleep/wake-up costs tens of microseconds, as much as
         * the fault itself. While requests are in flight a reply is due: spin
         * too. Bounded, so an idle handler sleeps. Either way the spin lasts
         * spin_ns from now. */
        uint64_t now = ls_now_ns();
        if (spin_ns && (ninfl || now - last_event < spin_ns))
            ls_loop_touch(&client_loop);
        int n = ls_loop_run_once(&client_loop, loop_timeout(now, retrying));
        if (n < 0)
            ls_fatal("epoll_wait failed in the fault handler: errno %d", -n);
        if (n > 0)
            last_event = ls_now_ns();
        retrying = conn_retry_connects();
        check_deadlines(ls_now_ns());
        /* Reap first: a detached region freed here takes its requests with
         * it (READ path), and what is published must be what the next sleep
         * waits for -- a stale count would have the watchdog see requests on
         * the wire while the loop sleeps without a timeout. */
        reap_dying();
        atomic_store_explicit(&inflight_published, ninfl, memory_order_relaxed);
        uint64_t oldest = infl_oldest ? infl_oldest->tag : atomic_load_explicit(&next_tag, memory_order_relaxed);
        atomic_store_explicit(&oldest_tag, oldest, memory_order_release);
        atomic_fetch_add_explicit(&heartbeat, 1, memory_order_relaxed);
    }
    return NULL;
}

/*
 * The watchdog ("lazyshare-watch"): the handler gives up on an owner that does
 * not answer, but nothing inside it can notice that it is itself wedged (stopped,
 * stuck in a syscall, deadlocked): faulting threads would then wait forever. As
 * Firecracker pairs its handler with one, this thread checks twice a second that
 * the handler's loop still turns whenever work is waiting for it -- faults
 * queued on the userfaultfd, requests on the wire, commands -- and makes a
 * freeze longer than the fault timeout fatal.
 */
static void *watch_main(void *arg)
{
    (void)arg;
    ls_block_signals();
    pthread_setname_np(pthread_self(), "lazyshare-watch");
    uint64_t seen = atomic_load(&heartbeat), since = ls_now_ns();
    pthread_mutex_lock(&watch_lock);
    while (!watch_stop) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts); /* cannot fail with this clock */
        ts.tv_nsec += 500000000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        int rc = pthread_cond_timedwait(&watch_cond, &watch_lock, &ts);
        if (watch_stop || rc != ETIMEDOUT)
            continue; /* told to stop (a failed start), or woken early */
        pthread_mutex_unlock(&watch_lock);
        uint64_t hb = atomic_load_explicit(&heartbeat, memory_order_relaxed), now = ls_now_ns();
        if (hb != seen) {
            seen = hb;
            since = now;
            pthread_mutex_lock(&watch_lock);
            continue;
        }
        struct pollfd pf = {.fd = client_uffd, .events = POLLIN};
        pthread_mutex_lock(&cmd_lock);
        int cmds = cmd_head != NULL;
        pthread_mutex_unlock(&cmd_lock);
        int infl = atomic_load_explicit(&inflight_published, memory_order_relaxed);
        int faults = client_uffd >= 0 && poll(&pf, 1, 0) > 0 ? pf.revents : 0;
        if (!cmds && !infl && !faults)
            since = now; /* idle, not wedged */
        else if (now - since > fault_timeout_ns)
            ls_fatal("the fault-handler thread has not run for %llu s while work waits for it "
                     "(%s%s%s); giving up rather than leaving page faults blocked",
                     (unsigned long long)((now - since) / 1000000000ull), cmds ? "commands " : "",
                     infl ? "requests on the wire " : "",
                     faults & POLLIN ? "faults queued" : faults ? "userfaultfd error" : "");
        pthread_mutex_lock(&watch_lock);
    }
    pthread_mutex_unlock(&watch_lock);
    return NULL;
}

/* Tests: make the next start fail to create one of its threads. */
static int inject_which, inject_err;

void ls_client_test_fail_thread(int which, int err)
{
    inject_which = which;
    inject_err = err;
}

static int start_thread(pthread_t *t, void *(*fn)(void *), int which)
{
    if (inject_which == which) {
        inject_which = 0;
        return inject_err;
    }
    return pthread_create(t, NULL, fn, NULL);
}

int ls_client_start(const struct ls_client_config *cfg)
{
    const int mode = cfg->mode;
    const uint32_t min_block = cfg->min_block, max_block = cfg->max_block;
    if (client_running)
        return mode == client_mode ? 0 : -EALREADY;
    const uint64_t ps = ls_page_size();
    if (min_block < ps || max_block < min_block || max_block > LS_MAX_READ)
        return -EINVAL;
    min_pages = min_block / ps;
    client_max_pages = max_block / ps;
    client_link_max_pages = cfg->link_max_block ? cfg->link_max_block / ps : client_max_pages;
    if (client_link_max_pages < min_pages)
        client_link_max_pages = min_pages;
    if (client_link_max_pages > client_max_pages)
        client_link_max_pages = client_max_pages;
    fault_timeout_ns = (uint64_t)cfg->fault_timeout_ms * 1000000ull;
    spin_ns = (uint64_t)cfg->spin_us * 1000ull;
    client_direct_wanted = !cfg->wire;
    if (mode != LS_MODE_EAGER) {
        int fd = ls_uffd_open(mode);
        if (fd < 0)
            return fd;
        client_uffd = fd;
    }
    int rc = 0;
    cmd_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (cmd_fd < 0) {
        rc = errno;
        goto close_fds;
    }
    /* Registered before the handler runs (no thread runs the loop yet). */
    if ((rc = -ls_loop_init(&client_loop, spin_ns)))
        goto close_fds;
    ls_io_init(&cmd_io, cmd_fd, on_cmd_ready, NULL);
    if ((rc = -ls_loop_add(&client_loop, &cmd_io, EPOLLIN)))
        goto close_fds;
    ls_io_init(&uffd_io, client_uffd, on_uffd_ready, NULL);
    if (client_uffd >= 0 && (rc = -ls_loop_add(&client_loop, &uffd_io, EPOLLIN)))
        goto close_fds; /* eager rung: no userfaultfd */
    pthread_condattr_t ca;
    if ((rc = pthread_condattr_init(&ca)))
        goto close_fds;
    if (!(rc = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC)))
        rc = pthread_cond_init(&watch_cond, &ca);
    pthread_condattr_destroy(&ca);
    if (rc)
        goto close_fds;
    conn_reset(&client_loop);
    client_mode = mode;
    /* The watchdog first: it can be stopped and joined if the handler then
     * fails to start, whereas the handler, once running, owns the fds. */
    watch_stop = 0;
    if ((rc = start_thread(&watch_thread, watch_main, LS_THREAD_WATCH)))
        goto destroy_cond;
    if ((rc = start_thread(&client_thread, client_main, LS_THREAD_FAULT))) {
        pthread_mutex_lock(&watch_lock);
        watch_stop = 1;
        pthread_cond_signal(&watch_cond);
        pthread_mutex_unlock(&watch_lock);
        pthread_join(watch_thread, NULL); /* fails only for a thread not joinable: it is */
        goto destroy_cond;
    }
    pthread_detach(watch_thread); /* fails only for a thread not joinable: it is */
    pthread_detach(client_thread);
    client_running = 1;
    return 0;

destroy_cond:
    pthread_cond_destroy(&watch_cond);
    client_mode = -1;
close_fds:
    ls_loop_close(&client_loop); /* before the fds it watches are closed */
    if (cmd_fd >= 0)
        close(cmd_fd);
    if (client_uffd >= 0)
        close(client_uffd);
    cmd_fd = client_uffd = -1;
    return -rc;
}

/* Whether a registration of a region offers what its sources need:
 * UFFDIO_COPY (payloads) and UFFDIO_ZEROPAGE (zero ranges). A private mapping
 * of a memfd reports both, as anonymous memory does (checked on Linux 6.18). */
static int reg_usable(const struct uffdio_register *reg)
{
    return (reg->ioctls & (1ULL << _UFFDIO_COPY)) && (reg->ioctls & (1ULL << _UFFDIO_ZEROPAGE));
}

/*
 * Map bytes [off, off+maplen) of the segment's page cache privately and
 * register them MISSING: the memfd (fd a->cache_fd in owner_pid, opened by
 * /proc and checked by inode and size) supplies the pages cached already; a
 * hole faults like a missing anonymous page. Never write-protected: the budget
 * must not drop its pages (MADV_DONTNEED on a private file mapping would
 * discard this process's own writes too; the cached pages are the owner's
 * memfd's, not this process's). Registering shmem needs no feature requested
 * at UFFDIO_API (UFFD_FEATURE_MISSING_SHMEM is only reported). The mapping, or
 * MAP_FAILED (nothing left behind: the caller maps anonymous memory instead).
 */
static void *map_cache(const struct ls_attach *a, int owner_pid, uint64_t off, uint64_t maplen)
{
    char path[64];
    if (a->cache_fd < 0 || owner_pid <= 0 || off > (uint64_t)INT64_MAX - maplen)
        return MAP_FAILED;
    snprintf(path, sizeof path, "/proc/%d/fd/%d", owner_pid, (int)a->cache_fd);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return MAP_FAILED;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        close(fd);
        return MAP_FAILED;
    }
    if (!S_ISREG(st.st_mode) || (uint64_t)st.st_ino != a->cache_ino || st.st_size < 0 ||
        (uint64_t)st.st_size < off + maplen) {
        close(fd); /* not the cache named (another file took that fd number), or too short */
        return MAP_FAILED;
    }
    void *base = mmap(NULL, maplen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, (off_t)off);
    close(fd); /* the mapping keeps the memfd */
    if (base == MAP_FAILED)
        return MAP_FAILED;
    if (madvise(base, maplen, MADV_DONTFORK) < 0) { /* see region_new */
        munmap(base, maplen);
        return MAP_FAILED;
    }
    struct uffdio_register reg = {
        .range = {.start = (uintptr_t)base, .len = maplen},
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(client_uffd, UFFDIO_REGISTER, &reg) < 0) {
        munmap(base, maplen);
        return MAP_FAILED;
    }
    if (!reg_usable(&reg)) {
        struct uffdio_range rg = {.start = (uintptr_t)base, .len = maplen};
        ioctl(client_uffd, UFFDIO_UNREGISTER, &rg); /* ours and registered: cannot fail */
        munmap(base, maplen);
        return MAP_FAILED;
    }
    return base;
}

/* Map and register the region for one ls_attach entry (in the caller's
 * thread): the segment's page cache if it names one, this rung faults lazily
 * and no budget is set (a budget needs pages it can drop: write-protected
 * anonymous memory); else, or if the cache cannot be mapped, anonymous memory. */
static int region_new(const struct ls_attach *a, int owner_pid, uint64_t timeout_ns, struct region **out)
{
    const uint64_t ps = ls_page_size();
    if (!a->seglen || !a->map_len || a->map_off >= a->seglen || a->map_len > a->seglen - a->map_off)
        return -EINVAL;
    uint64_t off = a->map_off / ps * ps, end = a->map_off + a->map_len;
    uint64_t maplen = (end - off + ps - 1) / ps * ps;
    if (maplen < end - off)
        return -EOVERFLOW;
    int want_cache = client_mode != LS_MODE_EAGER && a->cache_ino != 0 && !atomic_load(&budget);
    void *base = want_cache ? map_cache(a, owner_pid, off, maplen) : MAP_FAILED;
    int cached = base != MAP_FAILED;
    int want_wp = !cached && client_mode != LS_MODE_EAGER && atomic_load(&budget) > 0;
    if (!cached) {
        base = mmap(NULL, maplen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (base == MAP_FAILED)
            return -errno;
        /* A forked child never sees these pages: its registration would be gone and
         * it would read zeros; with DONTFORK the child's access faults loudly. */
        if (madvise(base, maplen, MADV_DONTFORK) < 0) {
            int e = errno;
            munmap(base, maplen);
            return -e;
        }
    }
    if (!cached && client_mode != LS_MODE_EAGER) {
        struct uffdio_register reg = {
            .range = {.start = (uintptr_t)base, .len = maplen},
            .mode = UFFDIO_REGISTER_MODE_MISSING | (want_wp ? UFFDIO_REGISTER_MODE_WP : 0),
        };
        int rc = ioctl(client_uffd, UFFDIO_REGISTER, &reg);
        if (rc < 0 && want_wp) { /* no write-protect here (kernel < 5.7): no dropping either */
            want_wp = 0;
            reg.mode = UFFDIO_REGISTER_MODE_MISSING;
            reg.ioctls = 0;
            rc = ioctl(client_uffd, UFFDIO_REGISTER, &reg);
        }
        if (rc < 0) {
            int e = errno;
            munmap(base, maplen);
            return -e;
        }
        if (!reg_usable(&reg)) {
            struct uffdio_range rg = {.start = (uintptr_t)base, .len = maplen};
            ioctl(client_uffd, UFFDIO_UNREGISTER, &rg);
            munmap(base, maplen);
            return -EOPNOTSUPP;
        }
    }
    struct region *r = calloc(1, sizeof *r);
    uint64_t npages = maplen / ps;
    uint8_t *bits = calloc((size_t)(npages + 7) / 8, 1);
    uint8_t *dirty = want_wp ? calloc((size_t)(npages + 7) / 8, 1) : NULL;
    if (!r || !bits || (want_wp && !dirty)) {
        free(r);
        free(bits);
        free(dirty);
        if (client_mode != LS_MODE_EAGER) {
            struct uffdio_range rg = {.start = (uintptr_t)base, .len = maplen};
            ioctl(client_uffd, UFFDIO_UNREGISTER, &rg);
        }
        munmap(base, maplen);
        return -ENOMEM;
    }
    /* A shared output's pages that were zeros when exported: plain memory,
     * never fetched (the task sees them as of submission, zeros). */
    for (uint32_t i = 0; !cached && i < a->nplain; i++) {
        uint64_t p0 = a->plain[2 * i] / ps * ps, p1 = (a->plain[2 * i + 1] + ps - 1) / ps * ps;
        p0 = p0 > off ? p0 - off : 0;
        p1 = p1 > off ? p1 - off : 0;
        if (p1 > maplen)
            p1 = maplen;
        if (p1 <= p0)
            continue;
        if (client_mode != LS_MODE_EAGER) {
            struct uffdio_range rg = {.start = (uintptr_t)base + p0, .len = p1 - p0};
            if (ioctl(client_uffd, UFFDIO_UNREGISTER, &rg) < 0)
                continue; /* (never: ours, registered) it stays lazy, which is as exact */
        }
        for (uint64_t p = p0 / ps; p < p1 / ps; p++)
            bit_set(bits, p);
    }
    r->id = atomic_fetch_add(&next_region_id, 1);
    r->base = (uintptr_t)base;
    r->maplen = maplen;
    r->segoff = off;
    r->seglen = a->seglen;
    r->npages = npages;
    r->max_pages = owner_pid > 0 ? client_max_pages : client_link_max_pages; /* 0: across a link */
    memcpy(r->seg, a->id, LS_ID_BYTES);
    r->requested = bits;
    r->dirty = dirty;
    r->wp = want_wp;
    r->cached = cached;
    if (cached)
        CTR_ADD(cache_attaches, 1);
    else if (want_cache)
        CTR_ADD(cache_fallbacks, 1); /* the region works without it */
    r->state = R_HOLDING;
    ls_readahead_init(&r->ra, (uint32_t)min_pages);
    r->timeout = timeout_ns;
    r->deadline = ls_now_ns() + timeout_ns;
    *out = r;
    return 0;
}

/* Undo region_new for a region the handler never saw. */
static void region_undo(struct region *r)
{
    if (client_mode != LS_MODE_EAGER) {
        struct uffdio_range rg = {.start = r->base, .len = r->maplen};
        ioctl(client_uffd, UFFDIO_UNREGISTER, &rg); /* EINVAL/ENOENT only: it is ours and registered */
    }
    munmap((void *)r->base, r->maplen);
    free(r->requested);
    free(r->dirty);
    free(r);
}

static void cmd_push(struct cmd *c)
{
    pthread_mutex_lock(&cmd_lock);
    if (cmd_tail)
        cmd_tail->next = c;
    else
        cmd_head = c;
    cmd_tail = c;
    pthread_mutex_unlock(&cmd_lock);
}

int ls_client_attach(const char *endpoint, int owner_pid, struct ls_attach *a, uint32_t n, uint32_t timeout_ms)
{
    if (!client_running)
        return -ENOTCONN;
    if (!n)
        return 0;
    struct cmd *c = calloc(1, sizeof *c);
    if (!c)
        return -ENOMEM;
    if (strlen(endpoint) >= sizeof c->endpoint) {
        free(c);
        return -ENAMETOOLONG;
    }
    struct region **rs = calloc(n, sizeof *rs);
    int *status = calloc(n, sizeof *status);
    struct cmd **undo = calloc(n, sizeof *undo); /* DETACH commands, ready for an error */
    int rc = rs && status && undo ? 0 : -ENOMEM;
    uint32_t made = 0, prepared = 0;
    for (; !rc && prepared < n; prepared++)
        if (!(undo[prepared] = calloc(1, sizeof **undo)))
            rc = -ENOMEM;
    for (; !rc && made < n; made++) {
        rc = region_new(&a[made], owner_pid, (uint64_t)timeout_ms * 1000000ull, &rs[made]);
        if (rc < 0)
            break;
    }
    if (rc < 0) {
        for (uint32_t i = 0; i < made; i++)
            region_undo(rs[i]);
        for (uint32_t i = 0; undo && i < prepared; i++)
            free(undo[i]);
        free(rs);
        free(status);
        free(undo);
        free(c);
        return rc;
    }
    struct waiter w = {.pending = n};
    pthread_mutex_init(&w.lock, NULL);
    pthread_cond_init(&w.cond, NULL);
    for (uint32_t i = 0; i < n; i++) {
        struct region *r = rs[i];
        r->waiter = &w;
        r->status_out = &status[i];
        status[i] = 1; /* not answered yet */
        a[i].addr = r->base;
        a[i].off = r->segoff;
        a[i].map_len = r->maplen;
        a[i].region = r->id;
        a[i].cached = r->cached;
    }
    /* The peer table belongs to the handler thread: the endpoint rides along
     * in the command and is resolved there. From here on the regions (and rs)
     * are the handler's. */
    c->kind = CMD_ATTACH;
    c->regions = rs;
    c->nregions = n;
    c->pid = owner_pid;
    memcpy(c->endpoint, endpoint, strlen(endpoint) + 1);
    cmd_push(c);
    ls_eventfd_signal(cmd_fd); /* fails only if the counter is full, which wakes the handler too */

    pthread_mutex_lock(&w.lock);
    while (w.pending)
        pthread_cond_wait(&w.cond, &w.lock);
    rc = w.status;
    pthread_mutex_unlock(&w.lock);
    pthread_cond_destroy(&w.cond);
    pthread_mutex_destroy(&w.lock);
    /* All or nothing: the regions that failed were destroyed by the handler;
     * the others are detached again. */
    int detached = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (rc < 0 && status[i] == 0) {
            undo[i]->kind = CMD_DETACH;
            undo[i]->region_id = a[i].region;
            cmd_push(undo[i]);
            detached = 1;
        } else {
            free(undo[i]);
        }
    }
    if (detached)
        ls_eventfd_signal(cmd_fd);
    free(undo);
    free(status);
    return rc;
}

int ls_client_overlaps(uint64_t addr, uint64_t len)
{
    if (addr + len < addr)
        len = UINT64_MAX - addr;
    if (!len)
        return 0;
    struct region key = {.base = addr, .maplen = len};
    pthread_mutex_lock(&tree_lock);
    void *n = tfind(&key, &region_tree, range_cmp);
    pthread_mutex_unlock(&tree_lock);
    return n != NULL;
}

int ls_client_set_budget(uint64_t bytes)
{
    atomic_store(&budget, bytes);
    return 0;
}

int ls_client_detach(uint64_t region)
{
    if (!client_running)
        return -ENOTCONN;
    struct cmd *c = calloc(1, sizeof *c);
    if (!c)
        return -ENOMEM;
    c->kind = CMD_DETACH;
    c->region_id = region;
    cmd_push(c);
    return ls_eventfd_signal(cmd_fd);
}

/*
 * Wait (at most timeout_ms) until every request sent so far is answered. With
 * the INSTALL path a faulting thread is woken by the owner's UFFDIO_COPY,
 * before this process's handler has read the reply and counted its bytes;
 * readers of the counters call this first so that they see their own faults.
 */
int ls_client_sync(uint32_t timeout_ms)
{
    if (!client_running)
        return 0;
    uint64_t target = atomic_load(&next_tag);
    uint64_t until = ls_now_ns() + (uint64_t)timeout_ms * 1000000ull;
    while (atomic_load_explicit(&oldest_tag, memory_order_acquire) < target) {
        if (ls_now_ns() > until)
            return -ETIMEDOUT;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = 20000};
        nanosleep(&ts, NULL);
    }
    return 0;
}

int ls_client_materialize(uint64_t addr, uint64_t len)
{
    const uint64_t ps = ls_page_size();
    volatile const uint8_t *p = (volatile const uint8_t *)(uintptr_t)addr;
    uint64_t start = addr & ~(ps - 1);
    uint8_t sink = 0;
    for (uint64_t a = start; a < addr + len; a += ps)
        sink ^= p[a > addr ? a - addr : 0];
    (void)sink;
    return 0;
}

/* In a forked child (registered below with ls_on_fork_child): the handler
 * and watchdog threads are the parent's; forget their state without touching it. */
void ls_client_reset_after_fork(void)
{
    pthread_mutex_init(&cmd_lock, NULL);
    pthread_mutex_init(&watch_lock, NULL); /* the watchdog is not in the child; ls_client_start sets up its cond */
    cmd_head = cmd_tail = NULL;
    ls_loop_close(&client_loop); /* the parent's epoll instance: only closed, never changed */
    if (cmd_fd >= 0)
        close(cmd_fd);
    if (client_uffd >= 0)
        close(client_uffd);
    cmd_fd = client_uffd = -1;
    client_running = 0;
    client_mode = -1;
    /* The parent's tables are left as they are (their memory is the child's
     * copy, never reached again). */
    pthread_mutex_init(&tree_lock, NULL);
    region_tree = NULL;
    region_ids = (struct ls_htab){0};
    nregions = 0;
    attaching = dying = NULL;
    conn_reset(NULL);
    infl_tags = (struct ls_htab){0};
    infl_oldest = infl_newest = infl_spare = NULL;
    ninfl = 0;
    fifo = NULL;
    fifo_head = fifo_len = fifo_cap = 0;
    resident_total = 0;
    atomic_store(&ls_ctr.regions_attached, 0);
}

__attribute__((constructor)) static void client_register_fork_reset(void)
{
    ls_on_fork_child(ls_client_reset_after_fork); /* two users of eight slots: cannot fail */
}
