/*
 * The fault handler's page sources (as the page_read interface of CRIU's
 * lazy-pages daemon; struct page_source in client_internal.h): the fault loop
 * (client.c) asks a source for a range of a region and later hands it the
 * reply; the source puts the pages in place.
 *   install_source  INSTALL: the owner UFFDIO_COPYs through the userfaultfd we
 *                   handed it; the reply confirms, counts, wakes late faults
 *   wire_source     READ: the payload (received into the peer's staging
 *                   buffer by conn.c) is installed here with UFFDIO_COPY /
 *                   UFFDIO_ZEROPAGE, or memcpy'd on the eager rung, whose
 *                   pull (eager_pump) it also drives
 *
 * Runs on the fault-handler thread ("lazyshare-fault") only.
 */
#include "client_internal.h"

#include <linux/userfaultfd.h>
#include <string.h>
#include <sys/ioctl.h>

/* Install [off, off+len) of r from src, or as zero pages (src NULL).
 * wake 0: nobody is known to wait (a prefetched block): skip the wake-up walk.
 * A thread that faulted on it meanwhile is woken when its message is read
 * (on_fault finds the page installed and wakes it). */
static int install(struct region *r, uint64_t off, const uint8_t *src, uint64_t len, int wake)
{
    uint64_t eexist = 0;
    int rc = ls_uffd_fill(client_uffd, r->base + off, src, len, src && r->wp, !wake, &eexist);
    CTR_ADD(eexist, eexist);
    return rc;
}

/* Eager rung: no userfaultfd, the region is ordinary memory filled by memcpy. */
static void eager_pump(struct region *r)
{
    while (r->inflight < EAGER_INFLIGHT && r->eager_next < r->npages) {
        uint64_t start, n; /* the pages not requested (plain ones are marked so) */
        if (!ls_readahead_next_run(r->requested, r->eager_next, r->npages, client_max_pages, &start, &n)) {
            r->eager_next = r->npages;
            break;
        }
        request_run(r, start, n, 0);
        r->eager_next = start + n;
    }
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
    /* A cached region: the owner fills the segment's cache and wakes us (a
     * range of zeros it installs as zero pages here, leaving the cache's hole). */
    uint32_t flags = (r->wp ? LS_INSTALL_WP : 0) | (f->dontwake ? LS_INSTALL_DONTWAKE : 0) |
                     (r->cached ? LS_INSTALL_CACHED : 0);
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
        ioctl(client_uffd, UFFDIO_WAKE, &rg);
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


/* Which source serves r's requests: the owner installs (it holds our
 * userfaultfd) into regions faulting lazily; anything else comes as payload. */
const struct page_source *source_for(const struct region *r)
{
    return r->peer->direct && r->state == R_ACTIVE ? &install_source : &wire_source;
}

