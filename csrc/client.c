/*
 * The fault handler: one native thread ("lazyshare-fault") per attaching process.
 *
 *   Python (any thread, GIL released)          fault-handler thread (owns everything below)
 *   ls_client_attach: mmap + UFFDIO_REGISTER    poll(uffd, command eventfd, one ZMTP DEALER
 *                                               connection per owner, see zmtp.h)
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
 * Connecting to an owner never blocks this thread: connect, the ZMTP greeting
 * and READY and the userfaultfd offer are steps of a per-peer state machine
 * that this loop drives (P_CONNECTING -> P_GREETING -> P_OFFER -> P_READY, see
 * struct peer). An attach whose owner is not ready yet waits on that peer
 * until it is (then its HOLDs go out) or its deadline passes; faults on other
 * owners' regions are served meanwhile.
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
#include "internal.h"
#include "zmtp.h"

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
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_PEERS 64
#define EAGER_INFLIGHT 8 /* eager requests on the wire per region */

/*
 * A connection is set up without ever blocking the handler thread, as a state
 * machine the poll loop drives:
 *   P_CONNECTING  non-blocking connect in progress (POLLOUT), or retried each
 *                 iteration while the owner's listen backlog is full (EAGAIN)
 *   P_GREETING    our greeting and READY sent (from tx); reading the owner's
 *   P_OFFER       our userfaultfd offered (OP_UFFD); reading the answer
 *   P_READY       requests flow; attaches queued on the peer send their HOLDs
 * An attach that finds its peer not ready waits on it (its regions are indexed
 * and counted, their HOLDs not sent); the peer's deadline is the latest of its
 * waiting attaches'. A set-up that fails or runs out of time fails those
 * attaches (-ESRCH: nobody listens; -ETIMEDOUT: accepted but never answered;
 * -EPROTO ...) and leaves the slot P_FAILED (never reused) until the last of
 * them lets go of it.
 */
enum { P_FREE, P_CONNECTING, P_GREETING, P_OFFER, P_READY, P_FAILED };

struct peer {
    char endpoint[256];
    int pid;
    int state;           /* P_*; P_FREE: slot free */
    int fd;              /* -1 when P_FREE or P_FAILED */
    int refs;            /* regions and in-flight requests using it */
    uint64_t deadline;   /* set-up deadline, ns (not P_READY) */
    int connect_again;   /* P_CONNECTING: connect() said EAGAIN, try again */
    int greeted;         /* P_GREETING: the owner's greeting was read */
    int offer_sent;      /* P_OFFER: the OP_UFFD request left (else waiting for room) */
    uint64_t last_check; /* last liveness check of pid, ns */
    /* requests not yet written (the socket was full) */
    uint8_t *tx;
    size_t txlen, txcap;
    /* reply being received: small frames in rx; a payload straight into stage */
    uint8_t rx[4096];
    size_t rxlen;
    int have_rep;        /* rep holds a header whose payload frame comes next */
    struct ls_rep rep;
    uint8_t *stage;      /* page-aligned, LS_MAX_READ bytes: UFFDIO_COPY's source */
    uint64_t dlen, dgot; /* payload length and bytes received; dlen 0: none pending */
    int direct;          /* the owner holds our userfaultfd: INSTALL instead of READ */
};

/* One attach call: its regions' HOLDs are all sent at once; the caller wakes
 * when the last one is answered. */
struct waiter {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    uint32_t pending; /* regions not answered yet */
    int status;       /* the first error */
};

struct inflight;

/* R_DYING: detached (unregistered, the owner told). It is unmapped at the end
 * of a loop iteration, after the progress that ls_client_sync waits for is
 * published (freeing the pages of a big mapping takes milliseconds), and, if
 * the owner may still be installing into it, only once every request for it
 * is answered: until then the range stays mapped, so no late install can land
 * in a new mapping (it finds nothing registered and fails). */
enum { R_HOLDING, R_EAGER, R_ACTIVE, R_DYING };

struct region {
    struct ls_hnode h; /* key: id */
    uint64_t id;
    uintptr_t base;
    uint64_t maplen; /* page-rounded */
    uint64_t segoff; /* the segment's byte mapped at base (page-aligned) */
    uint64_t seglen;
    uint64_t npages;
    uint8_t seg[LS_ID_BYTES];
    struct peer *peer;
    uint8_t *requested; /* bitmap, one bit per page */
    int state;
    int hold_sent;         /* its HOLD left (its peer was ready); else queued on the peer */
    struct waiter *waiter; /* attach in progress */
    int *status_out;       /* while attaching: where the caller reads its outcome */
    uint64_t deadline;     /* attach deadline, ns */
    uint64_t timeout;      /* attach timeout, ns: eager progress pushes the deadline */
    struct ls_readahead ra; /* csrc/readahead.c */
    uint64_t eager_next;   /* next page to request in eager mode */
    int wp;                /* registered write-protect too: clean pages can be dropped */
    uint8_t *dirty;        /* with wp: pages this process wrote (never dropped) */
    uint64_t resident;     /* bytes installed from payload and not dropped */
    int inflight;
    struct inflight *ihead;       /* its requests on the wire */
    struct region *aprev, *anext; /* the attaching list (waiter set) */
    struct region *dprev, *dnext; /* the dying list (R_DYING) */
    int in_ids, in_tree;
};

struct inflight {
    struct ls_hnode h; /* key: tag */
    uint64_t tag;
    struct region *region;
    uint64_t page, npages;
    uint64_t sent;   /* ns */
    uint64_t fault;  /* ns of the oldest fault waiting on it, 0 if none */
    int nfaults;
    int dontwake;    /* an INSTALL sent with LS_INSTALL_DONTWAKE */
    int dying;       /* its region was detached: nobody waits for it */
    struct peer *peer;
    const struct page_source *src; /* what it was asked of: its reply goes back there */
    struct inflight *prev, *next;   /* every request, oldest first */
    struct inflight *rprev, *rnext; /* its region's */
};

/*
 * Page sources (as the page_read interface of CRIU's lazy-pages daemon): the
 * fault loop asks a source for a range of a region and later hands it the
 * reply; the source puts the pages in place. Two today:
 *   install_source  INSTALL: the owner UFFDIO_COPYs through the userfaultfd we
 *                   handed it (wakes the faulting thread itself); the reply
 *                   only confirms and counts
 *   wire_source     READ: the payload follows the reply, installed here with
 *                   UFFDIO_COPY / UFFDIO_ZEROPAGE, or memcpy'd on the eager rung
 * A source for a remote (TCP) owner would be a third, not a branch in each of
 * these functions.
 */
struct fetch { /* a request taken off the in-flight table, its reply in hand */
    struct region *region;
    uint64_t page, npages;
    uint64_t fault; /* ns of the oldest fault waiting on it, 0 if none */
    int nfaults;
    int dontwake;
};

struct page_source {
    const char *name;
    uint16_t op; /* the op its requests carry and its replies echo */
    /* Send f's request (pages [f->page, f->page+f->npages) of f->region;
     * f->fault says whether a thread waits): 0 or -errno. */
    int (*request)(struct inflight *f);
    /* f's reply (and its payload, has_data): put the pages in place. */
    void (*complete)(struct peer *p, const struct fetch *f, const struct ls_rep *rep, const uint8_t *data,
                     uint64_t datalen, int has_data);
    /* Eager rung (no userfaultfd): keep pulling r's pages into plain memory;
     * NULL if the source cannot fill memory that is not registered. */
    void (*pull)(struct region *r);
};
static const struct page_source install_source, wire_source;

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
static int uffd = -1;
static _Atomic uint64_t next_region_id = 1;
static pthread_t client_thread;

/* ---- the region tree: written by the handler thread, read by any under tree_lock ---- */
static pthread_mutex_t tree_lock = PTHREAD_MUTEX_INITIALIZER;
static void *region_tree;

/* ---- the handler thread's own ---- */
static struct ls_htab region_ids;
static size_t nregions;
static struct region *attaching, *dying;
static struct peer peers[MAX_PEERS];
static struct ls_htab infl_tags;
static struct inflight *infl_oldest, *infl_newest, *infl_spare;
static int ninfl;
static _Atomic uint64_t next_tag = 1; /* written by the handler only; read by ls_client_sync */
static _Atomic uint64_t oldest_tag = 1; /* published: every request below it is answered */
static uint64_t min_pages = 4, max_pages = 1024;
static uint64_t fault_timeout_ns = 60ull * 1000000000ull;
static uint64_t spin_ns; /* ls_client_config.spin_us; 0 disables */
static int direct_wanted = 1;    /* !ls_client_config.wire */
static uint64_t last_activity;
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

static void peer_close(struct peer *p)
{
    if (p->fd >= 0)
        close(p->fd);
    p->fd = -1;
    free(p->tx);
    free(p->stage);
    p->tx = p->stage = NULL;
    p->txlen = p->txcap = p->rxlen = 0;
    p->state = P_FREE;
}

/* Append n bytes to the peer's send buffer: 0 or -ENOMEM. */
static int tx_append(struct peer *p, const uint8_t *b, size_t n)
{
    if (p->txlen + n > p->txcap) {
        size_t cap = p->txcap ? p->txcap : 4096;
        while (cap < p->txlen + n)
            cap *= 2;
        uint8_t *nb = realloc(p->tx, cap);
        if (!nb)
            return -ENOMEM;
        p->tx = nb;
        p->txcap = cap;
    }
    memcpy(p->tx + p->txlen, b, n);
    p->txlen += n;
    return 0;
}

static int peer_addr(const struct peer *p, struct sockaddr_un *sa)
{
    *sa = (struct sockaddr_un){.sun_family = AF_UNIX};
    if (strncmp(p->endpoint, "ipc://", 6) || strlen(p->endpoint + 6) >= sizeof sa->sun_path)
        return -EINVAL;
    strcpy(sa->sun_path, p->endpoint + 6);
    return 0;
}

/* An owner that is not there: no socket file, or nobody listening on it. */
static int connect_errno(int e)
{
    return e == ENOENT || e == ECONNREFUSED ? -ESRCH : -e;
}

static int peer_flush(struct peer *p);

/* One non-blocking connect attempt: connected (-> P_GREETING), in progress
 * (POLLOUT tells), the listener's backlog full (EAGAIN on a Unix socket:
 * tried again on the next loop iteration), or -errno. */
static int peer_try_connect(struct peer *p)
{
    struct sockaddr_un sa;
    int rc = peer_addr(p, &sa);
    if (rc < 0)
        return rc;
    p->connect_again = 0;
    if (connect(p->fd, (struct sockaddr *)&sa, sizeof sa) == 0) {
        p->state = P_GREETING;
        return peer_flush(p); /* our greeting: the owner answers with its own */
    }
    if (errno == EAGAIN)
        p->connect_again = 1;
    else if (errno != EINPROGRESS && errno != EINTR) /* EINTR: it goes on asynchronously */
        return connect_errno(errno);
    return 0;
}

/* Open the socket and start connecting; our greeting and READY wait in tx. */
static int peer_open(struct peer *p)
{
    struct sockaddr_un sa;
    int rc = peer_addr(p, &sa);
    if (rc < 0)
        return rc;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -errno;
    p->fd = fd;
    p->state = P_CONNECTING;
    uint8_t hello[ZMTP_GREETING + 64];
    zmtp_greeting(hello, 0);
    size_t n = ZMTP_GREETING + zmtp_ready(hello + ZMTP_GREETING, 64, "DEALER");
    rc = tx_append(p, hello, n);
    return rc < 0 ? rc : peer_try_connect(p);
}

/* The connection to an owner: an open one (ready or still being set up), or
 * a new one started without blocking; the handshake goes on in the loop
 * (peer_advance), and attaches wait on the peer until it is ready or its
 * deadline (the latest of theirs) passes. */
static int peer_get(const char *endpoint, int pid, uint64_t deadline, struct peer **out)
{
    struct peer *free_slot = NULL;
    for (int i = 0; i < MAX_PEERS; i++) {
        struct peer *p = &peers[i];
        if (p->state != P_FREE && p->state != P_FAILED && !strcmp(p->endpoint, endpoint)) {
            if (p->state != P_READY && deadline > p->deadline)
                p->deadline = deadline;
            *out = p;
            return 0;
        }
        if (p->state == P_FREE && !free_slot)
            free_slot = p;
    }
    if (!free_slot)
        return -EMFILE;
    memset(free_slot, 0, sizeof *free_slot);
    free_slot->fd = -1;
    snprintf(free_slot->endpoint, sizeof free_slot->endpoint, "%s", endpoint);
    free_slot->pid = pid;
    free_slot->deadline = deadline;
    int rc = peer_open(free_slot);
    if (rc < 0) {
        peer_close(free_slot);
        return rc;
    }
    *out = free_slot;
    return 0;
}

static void peer_put(struct peer *p)
{
    if (--p->refs == 0)
        peer_close(p);
}

static int peer_flush(struct peer *p)
{
    size_t off = 0;
    while (off < p->txlen) {
        ssize_t w = write(p->fd, p->tx + off, p->txlen - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN)
            break;
        if (w <= 0)
            return -errno;
        off += (size_t)w;
    }
    memmove(p->tx, p->tx + off, p->txlen - off);
    p->txlen -= off;
    return 0;
}

/* Queue a request; an INSTALL carries dst (and flags), other ops ignore them. */
static int send_req(struct peer *p, uint16_t op, const uint8_t *seg, uint64_t tag, uint64_t offset,
                    uint64_t length, uint64_t dst, uint32_t flags)
{
    struct ls_req_install in = {
        .rq = {
            .magic = LS_MAGIC,
            .version = LS_VERSION,
            .op = op,
            .pid = (uint32_t)getpid(),
            .flags = op == LS_OP_INSTALL ? flags : 0,
            .tag = tag,
            .offset = offset,
            .length = length,
        },
        .dst = dst,
    };
    memcpy(in.rq.seg, seg, LS_ID_BYTES);
    size_t size = op == LS_OP_INSTALL ? sizeof in : sizeof in.rq;
    if (p->state != P_READY)
        return -ENOTCONN; /* nothing is sent before the handshake is over */
    if (p->txlen + 9 + size > p->txcap) {
        size_t cap = p->txcap ? p->txcap * 2 : 4096;
        uint8_t *b = realloc(p->tx, cap);
        if (!b)
            return -ENOMEM;
        p->tx = b;
        p->txcap = cap;
    }
    p->txlen += zmtp_frame_header(p->tx + p->txlen, 0, size);
    memcpy(p->tx + p->txlen, &in, size);
    p->txlen += size;
    /* Written now if the socket has room, else when poll says POLLOUT. */
    return peer_flush(p);
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

/* Which source serves r's requests: the owner installs (it holds our
 * userfaultfd) into regions faulting lazily; anything else comes as payload. */
static const struct page_source *source_for(const struct region *r)
{
    return r->peer->direct && r->state == R_ACTIVE ? &install_source : &wire_source;
}

/* Request pages [page, page+n) of r, which none requested yet. */
static void request_run(struct region *r, uint64_t page, uint64_t n, uint64_t fault_ns)
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

/* Request every not-yet-requested page of [from, to), in runs of at most
 * max_pages; the first run, if it starts at from, carries the fault. */
static void request_range(struct region *r, uint64_t from, uint64_t to, uint64_t fault_ns)
{
    if (to > r->npages)
        to = r->npages;
    uint64_t start, n;
    for (uint64_t p = from; ls_readahead_next_run(r->requested, p, to, max_pages, &start, &n); p = start + n)
        request_run(r, start, n, start == from ? fault_ns : 0);
}

static void wake_page(uintptr_t addr)
{
    const uint64_t ps = ls_page_size();
    struct uffdio_range rg = {.start = addr & ~(ps - 1), .len = ps};
    ioctl(uffd, UFFDIO_WAKE, &rg); /* ENOENT: the range was unregistered meanwhile */
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
    ls_readahead_fault(&r->ra, page, r->npages, (uint32_t)min_pages, (uint32_t)max_pages, &plan);
    if (bit_get(r->requested, page)) {
        struct inflight *f = infl_find_page(r, page);
        if (f) {
            if (!f->fault)
                f->fault = now;
            f->nfaults++;
        } else {
            wake_page(addr); /* installed after the fault was queued */
        }
    } else {
        request_range(r, plan.from, plan.to, now);
    }
    if (plan.sequential)
        request_range(r, plan.ahead_from, plan.ahead_to, 0);
}

/* Install [off, off+len) of r from src, or as zero pages (src NULL).
 * wake 0: nobody is known to wait (a prefetched block): skip the wake-up walk.
 * A thread that faulted on it meanwhile is woken when its message is read
 * (on_fault finds the page installed and wakes it). */
static int install(struct region *r, uint64_t off, const uint8_t *src, uint64_t len, int wake)
{
    uint64_t eexist = 0;
    int rc = ls_uffd_fill(uffd, r->base + off, src, len, src && r->wp, !wake, &eexist);
    CTR_ADD(eexist, eexist);
    return rc;
}

/* Eager rung: no userfaultfd, the region is ordinary memory filled by memcpy. */
static void eager_pump(struct region *r)
{
    while (r->inflight < EAGER_INFLIGHT && r->eager_next < r->npages) {
        uint64_t n = r->npages - r->eager_next;
        if (n > max_pages)
            n = max_pages;
        request_run(r, r->eager_next, n, 0);
        r->eager_next += n;
    }
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
        if (ioctl(uffd, UFFDIO_UNREGISTER, &rg) < 0 && errno != EINVAL && errno != ENOENT)
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

static void attach_finish(struct region *r, int status)
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
        if (!r || r->state != R_ACTIVE)
            continue;
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
    if (ioctl(uffd, UFFDIO_WRITEPROTECT, &wp) < 0 && errno != ENOENT)
        ls_fatal("UFFDIO_WRITEPROTECT failed: errno %d", errno); /* it also wakes the writer */
}

/* Fetched pages of a write-protected region count against the budget. */
static void account_fetched(struct region *r, uint64_t page, uint64_t npages)
{
    if (!r->wp)
        return;
    const uint64_t ps = ls_page_size();
    r->resident += npages * ps;
    resident_total += npages * ps;
    fifo_push(r->id, page, npages);
    enforce_budget();
}

static void record_latency(uint64_t fault_ns, int nfaults)
{
    if (!fault_ns)
        return;
    uint64_t dt = ls_now_ns() - fault_ns;
    for (int i = 0; i < nfaults; i++)
        ls_hist_add(dt);
}

/* ---- install_source: the owner copies through our userfaultfd ---- */

static int install_request(struct inflight *f)
{
    const uint64_t ps = ls_page_size();
    struct region *r = f->region;
    f->dontwake = !f->fault; /* read-ahead: nobody to wake yet */
    uint32_t flags = (r->wp ? LS_INSTALL_WP : 0) | (f->dontwake ? LS_INSTALL_DONTWAKE : 0);
    return send_req(r->peer, LS_OP_INSTALL, r->seg, f->tag, r->segoff + f->page * ps, f->npages * ps,
                    r->base + f->page * ps, flags);
}

static void install_complete(struct peer *p, const struct fetch *f, const struct ls_rep *rep,
                             const uint8_t *data, uint64_t datalen, int has_data)
{
    (void)p, (void)data, (void)datalen, (void)has_data;
    const uint64_t ps = ls_page_size();
    struct region *r = f->region;
    const uint64_t page = f->page, npages = f->npages;
    if (!rep->status && rep->seglen <= npages * ps) {
        /* Counted even for a region detached meanwhile: its reader may have
         * been woken by this very install, done its work and let go. */
        CTR_ADD(installs, 1);
        CTR_ADD(bytes_fetched, rep->seglen);
        CTR_ADD(bytes_zero, npages * ps - rep->seglen);
    }
    if (r->state == R_DYING)
        return; /* freed by reap_dying */
    if (rep->status)
        ls_fatal("the owner (pid %d, %s) could not install pages %llu-%llu of a segment of %llu "
                 "bytes: %s",
                 r->peer->pid, r->peer->endpoint, (unsigned long long)page,
                 (unsigned long long)(page + npages - 1), (unsigned long long)r->seglen,
                 rep->status == -ENOENT ? "the segment was released while this process still maps it"
                                        : strerror(-rep->status));
    if (rep->offset != r->segoff + page * ps || rep->length != npages * ps || rep->seglen > npages * ps)
        ls_fatal("malformed install reply from %s", r->peer->endpoint);
    if (f->dontwake && f->nfaults) { /* faults arrived after the read-ahead was asked for */
        struct uffdio_range rg = {.start = r->base + page * ps, .len = npages * ps};
        ioctl(uffd, UFFDIO_WAKE, &rg);
    }
    if (rep->seglen)
        account_fetched(r, page, npages);
    record_latency(f->fault, f->nfaults);
}

static const struct page_source install_source = {
    .name = "install",
    .op = LS_OP_INSTALL,
    .request = install_request,
    .complete = install_complete,
    .pull = NULL, /* it writes through a userfaultfd: no use for plain memory */
};

/* ---- wire_source: the payload follows the reply ---- */

static int wire_request(struct inflight *f)
{
    const uint64_t ps = ls_page_size();
    struct region *r = f->region;
    return send_req(r->peer, LS_OP_READ, r->seg, f->tag, r->segoff + f->page * ps, f->npages * ps, 0, 0);
}

/* Eager rung: progress on r; attached once every page arrived. */
static void eager_progress(struct region *r)
{
    r->deadline = ls_now_ns() + r->timeout; /* a big segment may take long: time progress */
    eager_pump(r);
    if (!r->inflight && r->eager_next >= r->npages) {
        r->state = R_ACTIVE;
        attach_finish(r, 0);
    }
}

static void wire_complete(struct peer *p, const struct fetch *f, const struct ls_rep *rep, const uint8_t *data,
                          uint64_t datalen, int has_data)
{
    (void)p;
    const uint64_t ps = ls_page_size();
    struct region *r = f->region;
    const uint64_t page = f->page, npages = f->npages;
    if (r->state == R_DYING)
        return; /* freed by reap_dying */
    if (!rep->status && (rep->flags & LS_REP_ZERO) && !has_data && rep->length == npages * ps &&
        rep->offset == r->segoff + page * ps) {
        CTR_ADD(bytes_zero, npages * ps);
        if (r->state == R_EAGER) { /* fresh anonymous memory is already zero */
            eager_progress(r);
            return;
        }
        int rc = install(r, page * ps, NULL, npages * ps, 1);
        if (rc < 0)
            ls_fatal("UFFDIO_ZEROPAGE failed: errno %d", -rc);
        record_latency(f->fault, f->nfaults);
        return;
    }
    if (rep->status)
        ls_fatal("the owner (pid %d, %s) refused pages %llu-%llu of segment of %llu bytes: %s",
                 r->peer->pid, r->peer->endpoint, (unsigned long long)page,
                 (unsigned long long)(page + npages - 1), (unsigned long long)r->seglen,
                 rep->status == -ENOENT ? "the segment was released while this process still maps it"
                                        : "error reply");
    if (!has_data || datalen != npages * ps || rep->offset != r->segoff + page * ps)
        ls_fatal("malformed page reply from %s", r->peer->endpoint);
    if (r->state == R_EAGER) {
        memcpy((uint8_t *)r->base + page * ps, data, npages * ps);
        CTR_ADD(bytes_fetched, npages * ps);
        eager_progress(r);
        return;
    }
    CTR_ADD(bytes_fetched, npages * ps); /* before the wake: a woken reader sees it */
    int rc = install(r, page * ps, data, npages * ps, f->nfaults > 0);
    if (rc < 0)
        ls_fatal("UFFDIO_COPY failed: errno %d", -rc);
    account_fetched(r, page, npages);
    record_latency(f->fault, f->nfaults);
}

static const struct page_source wire_source = {
    .name = "wire",
    .op = LS_OP_READ,
    .request = wire_request,
    .complete = wire_complete,
    .pull = eager_pump,
};

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
        if (!r->npages)
            attach_finish(r, 0);
    } else {
        r->state = R_ACTIVE;
        attach_finish(r, 0);
    }
}

/* A reply: a HOLD's goes to its attach; a page request's back to the source
 * that sent it (after the request leaves the in-flight table). */
static void on_reply(struct peer *p, const struct ls_rep *rep, const uint8_t *data, uint64_t datalen, int has_data)
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

/* The owner's connection broke: fatal if anything still needs it. */
static void peer_lost(struct peer *p, int err)
{
    /* Detached regions waiting only for this owner's last answers need none. */
    for (struct region *r = dying, *next; r; r = next) {
        next = r->dnext;
        if (r->peer == p)
            region_free(r);
    }
    if (p->state == P_FREE)
        return; /* that dropped the last reference: closed */
    if (p->refs)
        ls_fatal("lost the connection to the owner of a lazily mapped array (pid %d%s, %s): %s",
                 p->pid, ls_pid_alive(p->pid) ? "" : ", exited", p->endpoint, strerror(err));
    peer_close(p);
}

/* Read and dispatch what the owner sent: [header] or [header][payload] replies. */
static void drain_peer(struct peer *p)
{
    const uint64_t ps = ls_page_size();
    for (int budget = 0; budget < 4096 && p->state == P_READY; budget++) {
        if (p->dlen) { /* a payload streams straight into the staging buffer */
            ssize_t r = read(p->fd, p->stage + p->dgot, p->dlen - p->dgot);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0 && errno == EAGAIN)
                return;
            if (r <= 0) {
                peer_lost(p, r ? errno : ECONNRESET);
                return;
            }
            p->dgot += (uint64_t)r;
            if (p->dgot == p->dlen) {
                uint64_t n = p->dlen;
                p->dlen = p->dgot = 0;
                p->have_rep = 0;
                on_reply(p, &p->rep, p->stage, n, 1);
            }
            continue;
        }
        /* Parse complete small frames out of rx. */
        uint8_t flags;
        uint64_t len;
        size_t h = zmtp_parse_header(p->rx, p->rxlen, &flags, &len);
        if (h && (flags & ZMTP_COMMAND) && len <= ZMTP_MAX_SMALL && p->rxlen >= h + len) {
            memmove(p->rx, p->rx + h + len, p->rxlen - h - len); /* PING etc.: ignored */
            p->rxlen -= h + len;
            continue;
        }
        if (h && p->have_rep) { /* the payload frame */
            if (len > LS_MAX_READ || len % ps || (flags & (ZMTP_MORE | ZMTP_COMMAND)) || !p->stage)
                ls_fatal("malformed page payload from %s", p->endpoint);
            uint64_t inbuf = p->rxlen - h < len ? p->rxlen - h : len;
            memcpy(p->stage, p->rx + h, inbuf);
            memmove(p->rx, p->rx + h + inbuf, p->rxlen - h - inbuf);
            p->rxlen -= h + inbuf;
            p->dlen = len;
            p->dgot = inbuf;
            if (!len)
                ls_fatal("empty page payload from %s", p->endpoint);
            if (inbuf == len) {
                p->dlen = p->dgot = 0;
                p->have_rep = 0;
                on_reply(p, &p->rep, p->stage, len, 1);
            }
            continue;
        }
        if (h && p->rxlen >= h + len) { /* a reply header frame */
            if (len != sizeof(struct ls_rep) || (flags & ZMTP_COMMAND))
                ls_fatal("malformed reply header from %s", p->endpoint);
            memcpy(&p->rep, p->rx + h, sizeof p->rep);
            memmove(p->rx, p->rx + h + len, p->rxlen - h - len);
            p->rxlen -= h + len;
            if (p->rep.magic != LS_MAGIC || p->rep.version != LS_VERSION)
                ls_fatal("reply of another protocol from %s", p->endpoint);
            if (flags & ZMTP_MORE) {
                p->have_rep = 1;
            } else {
                struct ls_rep rep = p->rep;
                on_reply(p, &rep, NULL, 0, 0);
            }
            continue;
        }
        if (h && len > sizeof p->rx)
            ls_fatal("oversized frame from %s", p->endpoint);
        if (p->rxlen == sizeof p->rx)
            ls_fatal("unparseable stream from %s", p->endpoint);
        ssize_t r = read(p->fd, p->rx + p->rxlen, sizeof p->rx - p->rxlen);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno == EAGAIN)
            return;
        if (r <= 0) {
            peer_lost(p, r ? errno : ECONNRESET);
            return;
        }
        p->rxlen += (size_t)r;
    }
}

/* ---- connection set-up (see P_*): every step returns at once ---- */

/* Whether the owner runs as our uid: only such an owner is handed our
 * userfaultfd (it could ptrace us anyway); any other gets READ requests. */
static int peer_is_us(int fd)
{
    struct ucred cred;
    socklen_t len = sizeof cred;
    return getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0 && cred.uid == getuid();
}

/*
 * Hand our userfaultfd to the owner (OP_UFFD, the fd as SCM_RIGHTS): it then
 * installs pages into our mappings itself, one copy per byte. Sent once tx is
 * empty (the fd rides on the frame's first byte; what does not fit goes to tx).
 * Any refusal (an owner without the INSTALL path, a filter on fd passing)
 * leaves the peer on the READ path; only a broken connection is an error.
 */
static int offer_send(struct peer *p)
{
    struct ls_req rq = {.magic = LS_MAGIC, .version = LS_VERSION, .op = LS_OP_UFFD, .pid = (uint32_t)getpid()};
    uint8_t msg[9 + sizeof rq];
    size_t n = zmtp_frame_header(msg, 0, sizeof rq);
    memcpy(msg + n, &rq, sizeof rq);
    n += sizeof rq;
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct iovec iov = {msg, n};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = &ctl, .msg_controllen = sizeof ctl};
    struct cmsghdr *h = CMSG_FIRSTHDR(&m);
    h->cmsg_level = SOL_SOCKET;
    h->cmsg_type = SCM_RIGHTS;
    h->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(h), &uffd, sizeof uffd);
    ssize_t w;
    do
        w = sendmsg(p->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    while (w < 0 && errno == EINTR);
    if (w < 0)
        return errno == EAGAIN ? 0 : -errno; /* no room: POLLOUT brings us back */
    p->offer_sent = 1;
    return (size_t)w < n ? tx_append(p, msg + w, n - (size_t)w) : 0;
}

/* Consume what the handshake expects from rx: the owner's greeting, its READY
 * (its first command), then, if offered, the OP_UFFD answer (commands
 * skipped). Leaves the rest in rx for drain_peer. */
static int handshake_parse(struct peer *p)
{
    if (p->state == P_GREETING && !p->greeted) {
        if (p->rxlen < ZMTP_GREETING)
            return 0;
        if (zmtp_check_greeting(p->rx) < 0)
            return -EPROTO;
        memmove(p->rx, p->rx + ZMTP_GREETING, p->rxlen - ZMTP_GREETING);
        p->rxlen -= ZMTP_GREETING;
        p->greeted = 1;
    }
    while (p->state == P_GREETING || (p->state == P_OFFER && p->offer_sent)) {
        uint8_t flags;
        uint64_t len;
        size_t h = zmtp_parse_header(p->rx, p->rxlen, &flags, &len);
        if (h && len > ZMTP_MAX_SMALL)
            return -EPROTO;
        if (!h || p->rxlen < h + len)
            return 0;
        int command = (flags & ZMTP_COMMAND) != 0;
        struct ls_rep rep;
        if (!command && (p->state == P_GREETING || len != sizeof rep || (flags & ZMTP_MORE)))
            return -EPROTO;
        if (!command)
            memcpy(&rep, p->rx + h, sizeof rep);
        memmove(p->rx, p->rx + h + len, p->rxlen - h - len);
        p->rxlen -= h + len;
        if (p->state == P_GREETING) { /* READY: its properties need no answer */
            p->state = uffd >= 0 && direct_wanted && peer_is_us(p->fd) ? P_OFFER : P_READY;
        } else if (!command) {
            if (rep.magic != LS_MAGIC || rep.op != LS_OP_UFFD)
                return -EPROTO;
            p->direct = rep.status == 0;
            p->state = P_READY;
        }
    }
    return 0;
}

/* Read (without blocking) and parse until the handshake is over or the
 * socket is empty. */
static int handshake_read(struct peer *p)
{
    for (;;) {
        int rc = handshake_parse(p);
        if (rc < 0 || p->state == P_READY || (p->state == P_OFFER && !p->offer_sent))
            return rc;
        if (p->rxlen == sizeof p->rx)
            return -EPROTO; /* nothing the handshake expects is that long */
        ssize_t r = read(p->fd, p->rx + p->rxlen, sizeof p->rx - p->rxlen);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return errno == EAGAIN ? 0 : -errno;
        if (r == 0)
            return -ECONNRESET;
        p->rxlen += (size_t)r;
    }
}

/* The set-up failed or timed out: the attaches waiting on it fail (the
 * owner never saw their HOLDs); the slot is freed when the last lets go. */
static void peer_fail(struct peer *p, int err)
{
    int status = err == -ESRCH || !ls_pid_alive(p->pid) ? -ESRCH : err;
    if (p->fd >= 0)
        close(p->fd);
    p->fd = -1;
    free(p->tx);
    free(p->stage);
    p->tx = p->stage = NULL;
    p->txlen = p->txcap = p->rxlen = 0;
    p->state = P_FAILED;
    for (struct region *r = attaching, *next; r; r = next) {
        next = r->anext;
        if (r->peer == p)
            attach_finish(r, status);
    }
    if (!p->refs)
        peer_close(p);
}

/* The handshake is over: a staging buffer for payloads (READ path), then the
 * HOLDs of the attaches that waited for it. */
static void peer_ready(struct peer *p)
{
    if (!p->direct) {
        void *stage;
        if (posix_memalign(&stage, ls_page_size(), LS_MAX_READ)) {
            peer_fail(p, -ENOMEM); /* no HOLD was sent yet */
            return;
        }
        p->stage = stage;
    }
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

/* One step of a peer's set-up, on poll's events for it (or, while connect
 * must be retried, every iteration). */
static void peer_advance(struct peer *p, short revents)
{
    int rc = 0;
    if (p->state == P_CONNECTING) {
        if (p->connect_again) {
            rc = peer_try_connect(p);
        } else if (revents) {
            int err = 0;
            socklen_t l = sizeof err;
            if (getsockopt(p->fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0)
                rc = -errno;
            else if (err)
                rc = connect_errno(err);
            else
                p->state = P_GREETING;
        }
        if (rc < 0 || p->state == P_CONNECTING)
            goto out;
        revents |= POLLIN; /* the owner may have answered already */
    }
    if (p->txlen && (rc = peer_flush(p)) < 0)
        goto out;
    if (revents & (POLLIN | POLLHUP | POLLERR))
        rc = handshake_read(p);
    if (!rc && p->state == P_OFFER && !p->offer_sent && !p->txlen) {
        rc = offer_send(p);
        if (!rc && p->offer_sent)
            rc = handshake_read(p);
    }
out:
    if (rc < 0)
        peer_fail(p, rc);
    else if (p->state == P_READY)
        peer_ready(p);
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
    for (int i = 0; i < MAX_PEERS; i++) {
        struct peer *p = &peers[i];
        if (p->state >= P_CONNECTING && p->state < P_READY && now > p->deadline)
            peer_fail(p, -ETIMEDOUT);
    }
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

static void *client_main(void *arg)
{
    (void)arg;
    ls_block_signals();
    pthread_setname_np(pthread_self(), "lazyshare-fault");
    struct pollfd fds[2 + MAX_PEERS];
    struct peer *who[MAX_PEERS];
    struct uffd_msg msgs[64];
    for (;;) {
        int n = 0, np = 0, retry = 0;
        fds[n++] = (struct pollfd){.fd = cmd_fd, .events = POLLIN};
        fds[n++] = (struct pollfd){.fd = uffd, .events = POLLIN}; /* -1 (eager): ignored */
        for (int i = 0; i < MAX_PEERS; i++) {
            struct peer *p = &peers[i];
            if (p->state == P_FREE || p->state == P_FAILED)
                continue;
            short ev = POLLIN;
            if (p->state == P_CONNECTING) {
                ev = p->connect_again ? 0 : POLLOUT; /* retried below, without an event */
                retry |= p->connect_again;
            } else if (p->txlen || (p->state == P_OFFER && !p->offer_sent)) {
                ev |= POLLOUT;
            }
            who[np++] = p;
            fds[n++] = (struct pollfd){.fd = p->connect_again ? -1 : p->fd, .events = ev};
        }
        int timeout = retry ? 10 : (ninfl || nregions) ? 100 : -1;
        /* Spin briefly before sleeping while a reply or the next fault is likely:
         * on an idle VM each sleep/wake-up costs tens of microseconds, as much as
         * the fault itself. Bounded, so an idle handler sleeps. */
        int ready = 0;
        if (spin_ns && (ninfl || ls_now_ns() - last_activity < spin_ns)) {
            uint64_t until = ls_now_ns() + spin_ns;
            do {
                ready = poll(fds, (nfds_t)n, 0);
            } while (!ready && ls_now_ns() < until);
        }
        if (!ready)
            ready = poll(fds, (nfds_t)n, timeout);
        if (ready < 0 && errno != EINTR)
            ls_fatal("poll failed in the fault handler: errno %d", errno);
        uint64_t now = ls_now_ns();
        if (ready > 0)
            last_activity = now;
        if (uffd >= 0 && fds[1].revents) {
            for (;;) {
                ssize_t got = read(uffd, msgs, sizeof msgs);
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
        for (int i = 0; i < np; i++) {
            struct peer *p = who[i];
            if (p->state >= P_CONNECTING && p->state < P_READY) {
                if (fds[2 + i].revents || p->connect_again)
                    peer_advance(p, fds[2 + i].revents);
                continue;
            }
            if (p->state != P_READY)
                continue;
            if ((fds[2 + i].revents & POLLOUT) && peer_flush(p) < 0) {
                peer_lost(p, errno);
                continue;
            }
            if (fds[2 + i].revents & (POLLIN | POLLHUP | POLLERR))
                drain_peer(p);
        }
        if (fds[0].revents)
            handle_commands();
        check_deadlines(ls_now_ns());
        atomic_store_explicit(&inflight_published, ninfl, memory_order_relaxed);
        uint64_t oldest = infl_oldest ? infl_oldest->tag : atomic_load_explicit(&next_tag, memory_order_relaxed);
        atomic_store_explicit(&oldest_tag, oldest, memory_order_release);
        reap_dying();
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
        struct pollfd pf = {.fd = uffd, .events = POLLIN};
        pthread_mutex_lock(&cmd_lock);
        int waiting = cmd_head != NULL;
        pthread_mutex_unlock(&cmd_lock);
        waiting |= atomic_load_explicit(&inflight_published, memory_order_relaxed) > 0;
        waiting |= uffd >= 0 && poll(&pf, 1, 0) > 0;
        if (!waiting)
            since = now; /* idle, not wedged */
        else if (now - since > fault_timeout_ns)
            ls_fatal("the fault-handler thread has not run for %llu s while page faults wait for it; "
                     "giving up rather than leaving them blocked",
                     (unsigned long long)((now - since) / 1000000000ull));
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
    max_pages = max_block / ps;
    fault_timeout_ns = (uint64_t)cfg->fault_timeout_ms * 1000000ull;
    spin_ns = (uint64_t)cfg->spin_us * 1000ull;
    direct_wanted = !cfg->wire;
    if (mode != LS_MODE_EAGER) {
        int fd = ls_uffd_open(mode);
        if (fd < 0)
            return fd;
        uffd = fd;
    }
    int rc = 0;
    cmd_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (cmd_fd < 0) {
        rc = errno;
        goto close_fds;
    }
    pthread_condattr_t ca;
    if ((rc = pthread_condattr_init(&ca)))
        goto close_fds;
    if (!(rc = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC)))
        rc = pthread_cond_init(&watch_cond, &ca);
    pthread_condattr_destroy(&ca);
    if (rc)
        goto close_fds;
    for (int i = 0; i < MAX_PEERS; i++)
        peers[i].fd = -1;
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
    if (cmd_fd >= 0)
        close(cmd_fd);
    if (uffd >= 0)
        close(uffd);
    cmd_fd = uffd = -1;
    return -rc;
}

/* Map and register the region for one ls_attach entry (in the caller's thread). */
static int region_new(const struct ls_attach *a, uint64_t timeout_ns, struct region **out)
{
    const uint64_t ps = ls_page_size();
    if (!a->seglen || !a->map_len || a->map_off >= a->seglen || a->map_len > a->seglen - a->map_off)
        return -EINVAL;
    uint64_t off = a->map_off / ps * ps, end = a->map_off + a->map_len;
    uint64_t maplen = (end - off + ps - 1) / ps * ps;
    if (maplen < end - off)
        return -EOVERFLOW;
    void *base = mmap(NULL, maplen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                      -1, 0);
    int want_wp = client_mode != LS_MODE_EAGER && atomic_load(&budget) > 0;
    if (base == MAP_FAILED)
        return -errno;
    /* A forked child never sees these pages: its registration would be gone and
     * it would read zeros; with DONTFORK the child's access faults loudly. */
    if (madvise(base, maplen, MADV_DONTFORK) < 0) {
        int e = errno;
        munmap(base, maplen);
        return -e;
    }
    if (client_mode != LS_MODE_EAGER) {
        struct uffdio_register reg = {
            .range = {.start = (uintptr_t)base, .len = maplen},
            .mode = UFFDIO_REGISTER_MODE_MISSING | (want_wp ? UFFDIO_REGISTER_MODE_WP : 0),
        };
        int rc = ioctl(uffd, UFFDIO_REGISTER, &reg);
        if (rc < 0 && want_wp) { /* no write-protect here (kernel < 5.7): no dropping either */
            want_wp = 0;
            reg.mode = UFFDIO_REGISTER_MODE_MISSING;
            reg.ioctls = 0;
            rc = ioctl(uffd, UFFDIO_REGISTER, &reg);
        }
        if (rc < 0) {
            int e = errno;
            munmap(base, maplen);
            return -e;
        }
        if (!(reg.ioctls & (1ULL << _UFFDIO_COPY)) || !(reg.ioctls & (1ULL << _UFFDIO_ZEROPAGE))) {
            struct uffdio_range rg = {.start = (uintptr_t)base, .len = maplen};
            ioctl(uffd, UFFDIO_UNREGISTER, &rg);
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
            ioctl(uffd, UFFDIO_UNREGISTER, &rg);
        }
        munmap(base, maplen);
        return -ENOMEM;
    }
    r->id = atomic_fetch_add(&next_region_id, 1);
    r->base = (uintptr_t)base;
    r->maplen = maplen;
    r->segoff = off;
    r->seglen = a->seglen;
    r->npages = npages;
    memcpy(r->seg, a->id, LS_ID_BYTES);
    r->requested = bits;
    r->dirty = dirty;
    r->wp = want_wp;
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
        ioctl(uffd, UFFDIO_UNREGISTER, &rg); /* EINVAL/ENOENT only: it is ours and registered */
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
        rc = region_new(&a[made], (uint64_t)timeout_ms * 1000000ull, &rs[made]);
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
    if (cmd_fd >= 0)
        close(cmd_fd);
    if (uffd >= 0)
        close(uffd);
    cmd_fd = uffd = -1;
    client_running = 0;
    client_mode = -1;
    /* The parent's tables are left as they are (their memory is the child's
     * copy, never reached again). */
    pthread_mutex_init(&tree_lock, NULL);
    region_tree = NULL;
    region_ids = (struct ls_htab){0};
    nregions = 0;
    attaching = dying = NULL;
    memset(peers, 0, sizeof peers);
    for (int i = 0; i < MAX_PEERS; i++)
        peers[i].fd = -1;
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
