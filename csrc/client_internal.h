/*
 * The consumer side of the native core (the fault handler): what its files
 * share (not parsed by cffi).
 *
 *   client.c  the fault loop, regions and their tables, in-flight requests,
 *             commands from Python threads, budget eviction, write-protect
 *             faults, deadlines, the watchdog and the public ls_client_*
 *   conn.c    the connections to owners: set-up state machine, ZMTP framing,
 *             socket I/O, the peer table
 *   source.c  the page sources (INSTALL, READ, the eager pull)
 *
 * Everything declared here is used by the fault-handler thread
 * ("lazyshare-fault") only, unless its comment says otherwise.
 */
#ifndef LAZYSHARE_CLIENT_INTERNAL_H
#define LAZYSHARE_CLIENT_INTERNAL_H

#include "internal.h"
#include "loop.h"


#define MAX_PEERS 64
#define EAGER_INFLIGHT 8 /* eager requests on the wire per region */

/*
 * A connection is set up without ever blocking the handler thread, as a state
 * machine the event loop drives:
 *   P_CONNECTING  non-blocking connect in progress (EPOLLOUT), or retried each
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
    struct ls_io io;     /* its registration in the handler's loop (conn.c) */
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
    uint64_t max_pages; /* its largest read-ahead window: client_max_pages, or
                           client_link_max_pages for an owner across a link */
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
    int cached;            /* maps the segment's page cache (MAP_PRIVATE of the owner's memfd):
                              INSTALLs fill the cache; never write-protected, never dropped */
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

/* ---- client.c ---- */
/* Set by ls_client_start before the handler thread starts, then read-only. */
extern int client_uffd;           /* the userfaultfd; -1 on the eager rung */
extern int client_direct_wanted;  /* !ls_client_config.wire */
extern uint64_t client_max_pages; /* largest request, in pages */
extern uint64_t client_link_max_pages; /* largest read-ahead window across a link */

/* The attach of r is over (status 0 or -errno): its caller wakes. */
void attach_finish(struct region *r, int status);
/* p is ready: the attaches that waited for it send their HOLDs. */
void attach_peer_ready(struct peer *p);
/* p's set-up failed: the attaches waiting on it fail with status. */
void attach_peer_failed(struct peer *p, int status);
/* p's connection broke: free the detached regions that waited only for its answers. */
void dying_peer_lost(struct peer *p);
/* Request pages [page, page+n) of r, which none requested yet. */
void request_run(struct region *r, uint64_t page, uint64_t n, uint64_t fault_ns);
/* Fetched pages of a write-protected region count against the budget. */
void account_fetched(struct region *r, uint64_t page, uint64_t npages);
/* A reply from p (and its payload, has_data): to its attach or its source. */
void on_reply(struct peer *p, const struct ls_rep *rep, const uint8_t *data, uint64_t datalen, int has_data);

/* ---- conn.c ---- */
/* The connection to an owner, open or being set up (0 or -errno). */
int peer_get(const char *endpoint, int pid, uint64_t deadline, struct peer **out);
/* Drop a reference; the last one closes the connection. */
void peer_put(struct peer *p);
void peer_close(struct peer *p);
/* Queue a request (and write what the socket takes): 0 or -errno. An INSTALL
 * carries dst (and flags), other ops ignore them. */
int send_req(struct peer *p, uint16_t op, const uint8_t *seg, uint64_t tag, uint64_t offset, uint64_t length,
             uint64_t dst, uint32_t flags);
/* Fail the set-ups that ran out of time. */
void conn_check_deadlines(uint64_t now);
/* The earliest set-up deadline (ns), UINT64_MAX if none. */
uint64_t conn_next_deadline(void);
/* Retry the connects that found the owner's backlog full (they have no event
 * to wait for): how many still wait for room. */
int conn_retry_connects(void);
/* Forget every connection without touching it (a forked child; or before the
 * handler starts); connections are registered in loop l from then on. */
void conn_reset(struct ls_loop *l);

/* ---- source.c ---- */
/* Which source serves r's requests. */
const struct page_source *source_for(const struct region *r);

#endif
