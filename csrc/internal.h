/* lazyshare native core: what the .c files share (not parsed by cffi). */
#ifndef LAZYSHARE_INTERNAL_H
#define LAZYSHARE_INTERNAL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdatomic.h>
#include <pthread.h>

#include "lazyshare.h"

/* ---- the page protocol: its constants are in lazyshare.h (read by
 * lazyshare/transport.py from the compiled module); the layouts here ---- */
/*
 * Two data paths. READ: the payload follows the reply as a second frame and
 * the consumer's handler installs it (socket buffer -> staging -> page: three
 * copies per byte). INSTALL: the consumer handed its userfaultfd to the owner
 * once (OP_UFFD, the fd riding on the request as SCM_RIGHTS, as CRIU's
 * lazy-pages daemon and Firecracker's handlers receive theirs), and the owner
 * UFFDIO_COPYs the range from its own memory straight into the consumer's
 * mapping at `dst`: one copy per byte, and the faulting thread wakes without
 * waiting for the consumer's handler. The request and reply still travel as
 * ZeroMQ messages; an INSTALL request is the 56-byte request plus `dst`.
 */
struct ls_req {
    uint32_t magic;
    uint16_t version;
    uint16_t op;
    uint32_t pid;
    uint32_t flags; /* INSTALL: LS_INSTALL_*; 0 otherwise */
    uint64_t tag;
    uint64_t offset;
    uint64_t length;
    uint8_t seg[LS_ID_BYTES];
} __attribute__((packed));

struct ls_rep {
    uint32_t magic;
    uint16_t version;
    uint16_t op;
    int32_t status;
    uint32_t flags; /* LS_REP_ZERO: the range reads as zeros; no payload follows */
    uint64_t tag;
    uint64_t offset;
    uint64_t length;
    uint64_t seglen; /* INSTALL: the bytes copied (the rest were mapped as zero pages) */
} __attribute__((packed));

struct ls_req_install {
    struct ls_req rq;
    uint64_t dst; /* page-aligned address in the consumer */
} __attribute__((packed));

_Static_assert(sizeof(struct ls_req) == LS_REQ_BYTES, "request layout");
_Static_assert(sizeof(struct ls_req_install) == LS_REQ_INSTALL_BYTES, "install request layout");
_Static_assert(sizeof(struct ls_rep) == LS_REP_BYTES, "reply layout");
_Static_assert(LS_MAX_READ == (8u << 20), "LS_MAX_READ");

/* ---- counters (relaxed atomics: read by ls_get_stats from any thread) ---- */
struct ls_counters {
    _Atomic uint64_t faults, requests, installs, bytes_fetched, bytes_zero, regions_attached, eexist, bytes_dropped;
    _Atomic uint64_t hist[LS_HIST_BUCKETS];
    _Atomic uint64_t requests_served, bytes_served, errors_served, segments_exported;
    _Atomic uint64_t cache_bytes_filled, caches_live, cache_attaches, cache_fallbacks;
    _Atomic uint64_t snap_bytes_preserved, snap_faults;
};
extern struct ls_counters ls_ctr;
#define CTR_ADD(field, n) atomic_fetch_add_explicit(&ls_ctr.field, (n), memory_order_relaxed)
#define CTR_SUB(field, n) atomic_fetch_sub_explicit(&ls_ctr.field, (n), memory_order_relaxed)

uint64_t ls_now_ns(void);
void ls_hist_add(uint64_t ns);
size_t ls_page_size(void);
int ls_pid_alive(int pid);
void ls_block_signals(void);
int ls_eventfd_signal(int fd);
void ls_eventfd_drain(int fd);
/* A fault can no longer be served: say why on stderr and die with SIGBUS
 * (a blocked thread must never resume on a page of zeros). */
__attribute__((noreturn, format(printf, 1, 2))) void ls_fatal(const char *fmt, ...);

/* PAGEMAP_SCAN (linux/fs.h, Linux 6.7): struct pm_scan_arg and struct
 * page_region under our own names, so that they never clash with a header that
 * has them; used by track.c and server.c (checked at run time: ENOTTY before). */
#ifndef PAGE_IS_WPALLOWED
#define PAGE_IS_WPALLOWED (1 << 0)
#endif
#ifndef PAGE_IS_WRITTEN
#define PAGE_IS_WRITTEN (1 << 1)
#endif
#ifndef PAGE_IS_PRESENT
#define PAGE_IS_PRESENT (1 << 2)
#endif
#ifndef PAGE_IS_SWAPPED
#define PAGE_IS_SWAPPED (1 << 3)
#endif
#ifndef PAGE_IS_PFNZERO
#define PAGE_IS_PFNZERO (1 << 5)
#endif
#ifndef PM_SCAN_WP_MATCHING
#define PM_SCAN_WP_MATCHING (1 << 0)
#endif
#ifndef PM_SCAN_CHECK_WPASYNC
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#endif
struct ls_page_region {
    uint64_t start, end, categories;
};
struct ls_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
_Static_assert(sizeof(struct ls_pm_scan_arg) == 96, "struct pm_scan_arg layout");
#ifndef PAGEMAP_SCAN
#define PAGEMAP_SCAN _IOWR('f', 16, struct ls_pm_scan_arg)
#endif

int ls_uffd_open(int mode);
/* UFFDIO_COPY (src) or UFFDIO_ZEROPAGE (src NULL) of [dst, dst+len) through a
 * userfaultfd (this process's or a consumer's), surviving partial copies, pages
 * already present (skipped and woken; counted in *eexist if not NULL) and
 * layout changes (EAGAIN). 0, or -errno (the mapping or process is gone...). */
int ls_uffd_fill(int fd, uint64_t dst, const uint8_t *src, uint64_t len, int wp, int dontwake, uint64_t *eexist);
/*
 * An intrusive chained hash table keyed by a 64-bit integer (O(1) per lookup,
 * insert and remove; the caller embeds a struct ls_hnode and compares any
 * further key bytes itself). Used where the key is an id: regions and
 * in-flight requests in the consumer, segments in the owner. It doubles when
 * the load passes 1; if that allocation fails it keeps its size (longer
 * chains, still correct). Not locked: each table has one owner (or lock).
 */
struct ls_hnode {
    struct ls_hnode *next;
    uint64_t key;
};
struct ls_htab {
    struct ls_hnode **b;
    size_t n;
    unsigned bits; /* 2^bits buckets; 0: none yet */
};
/* 0, or -ENOMEM if the table has no buckets and cannot get any. */
int ls_htab_insert(struct ls_htab *t, struct ls_hnode *e);
/* The first entry with this key, then the next one with it, or NULL. */
struct ls_hnode *ls_htab_find(const struct ls_htab *t, uint64_t key);
struct ls_hnode *ls_htab_next(const struct ls_hnode *e);
void ls_htab_remove(struct ls_htab *t, struct ls_hnode *e);
/* Call fn on every entry (fn may remove that entry, and only that one). */
void ls_htab_each(struct ls_htab *t, void (*fn)(struct ls_hnode *, void *), void *arg);

/* After fork, ls_reset_after_fork (called by Python in the child) runs every
 * function registered here, in order, once each: a side of the core resets
 * its own state (its threads are gone; forget their state without touching
 * it). Register from a constructor or before starting threads. Registering a
 * function twice is a no-op. 0, or -ENOSPC past 8 functions. */
int ls_on_fork_child(void (*fn)(void));

#endif
