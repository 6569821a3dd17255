/*
 * lazyshare native core, owner side: write tracking of ranges of this
 * process's own memory (the building block of live snapshots: which pages of
 * an exported array did the parent write since a point in time, and, on the
 * full rung, what did they hold before).
 *
 * Owns: the process's two tracking userfaultfds, an fd of /proc/self/pagemap
 * for PAGEMAP_SCAN, and the sorted table of tracked ranges, all behind one
 * mutex (lk); and the snapshot thread ("lazyshare-snap"), started with the
 * first synchronous range. Called from any Python thread (cffi releases the
 * GIL); nothing here blocks on another process. A forked child forgets all of
 * it (pthread_atfork, and the core's ls_on_fork_child registry): its copy of
 * the memory is not registered.
 *
 * Asynchronous ranges (ls_track_add; tfd: UFFD_FEATURE_WP_ASYNC |
 * UFFD_FEATURE_WP_UNPOPULATED, Linux 6.7+; never read): a write to a protected
 * page (from user mode, or from the kernel: read(2) into the buffer) takes a
 * minor fault that the kernel resolves at once by unprotecting the page (the
 * writer never waits, never gets EFAULT, on either uffd rung); PAGEMAP_SCAN
 * reports unprotected pages as PAGE_IS_WRITTEN and, with PM_SCAN_WP_MATCHING,
 * protects them again in the same walk, so no write between report and
 * re-protection is lost. PM_SCAN_CHECK_WPASYNC makes the scan fail (EPERM)
 * where the memory is no longer registered (mremap moved it, it was unmapped
 * and mapped again): the range is then "lost" (-ENXIO).
 *
 * Synchronous ranges (ls_track_add_sync; sfd: UFFD_FEATURE_WP_UNPOPULATED |
 * UFFD_FEATURE_EVENT_REMOVE, full rung only): a write to a protected page
 * waits for the snapshot thread, which copies the block into the snapshots
 * open on the range (ls_track_snap_add), marks it written and unprotects it;
 * see SNAP_BLOCK below. A range can be registered with one userfaultfd only,
 * so a range is one kind or the other for its whole life: switching between
 * them would leave the memory unprotected for a moment, and a write then would
 * be lost without a trace (this kernel has no soft-dirty bit to catch it).
 */
#include "internal.h"

#include "cache.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* ---- kernel uAPI newer than some headers (checked at run time) ---- */
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13) /* Linux 6.4 */
#endif
#ifndef UFFD_FEATURE_WP_ASYNC
#define UFFD_FEATURE_WP_ASYNC (1 << 15) /* Linux 6.7 */
#endif

#define TRACK_FEATURES ((uint64_t)(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED))
#define KBUF 512 /* regions per PAGEMAP_SCAN call */

/* Synchronous tracking (ls_track_add_sync): a write to a protected page of a
 * sync range waits for the snapshot thread, which preserves the page's 2 MiB
 * block in every snapshot open on the range, then unprotects the block and
 * marks it written. Blocks are aligned on absolute addresses (so THP mappings
 * stay whole) and clipped to the range. */
#define SNAP_BLOCK ((uint64_t)2 << 20)
#define SNAP_SPAN 16 /* blocks unprotected at once while no snapshot is open */

/* A snapshot open on a sync range: a page cache (of the segment based at
 * base, clen bytes) that must keep each block's bytes as they were before the
 * first write to it after ls_track_snap_add. */
struct snapdst {
    struct ls_cache *c;
    uint64_t base, clen;
    uint8_t *preserved; /* a bit per block: its old bytes are in the cache */
    int broken;         /* a block could not be preserved, or pages were discarded */
    struct snapdst *next;
};

struct trange {
    uint64_t start, end;
    int lost; /* the memory is no longer (all) registered: report -ENXIO */
    int sync; /* registered with sfd (ls_track_add_sync), not with tfd */
    uint64_t b0;    /* sync: address of block 0 (start rounded down to SNAP_BLOCK) */
    size_t nblk;    /* sync: blocks */
    uint8_t *dirty; /* sync: a bit per block, written since its last report */
    struct snapdst *dsts; /* sync: open snapshots */
};

static pthread_mutex_t lk = PTHREAD_MUTEX_INITIALIZER;
static int want_mode = LS_TRACK_AUTO; /* rung asked for by ls_track_set_mode */
static int tfd = -1;                  /* the tracking userfaultfd, or -1 */
static int tmode = -1;                /* its rung (LS_MODE_UFFD, LS_MODE_UFFD_USER) */
static int pmfd = -1;                 /* /proc/self/pagemap */
static struct trange *rs;             /* tracked ranges, sorted by start, disjoint */
static size_t nrs, caprs;
static struct ls_page_region kbuf[KBUF];
static pid_t forgot_in; /* the child in which track_forget last ran */
static int sfd = -1;    /* the synchronous tracking userfaultfd (full rung; served by the
                           snapshot thread from its opening on), or -1 */

/* ---- opening ---- */

static int open_full_rung(void)
{
    int fd = -ENOSYS;
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev >= 0) {
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        if (fd < 0)
            fd = -errno;
        close(dev);
        if (fd >= 0)
            return fd;
    }
#ifdef SYS_userfaultfd
    fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0)
        fd = -errno;
#endif
    return fd;
}

static int open_user_rung(void)
{
#ifdef SYS_userfaultfd
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
    return fd < 0 ? -errno : fd;
#else
    return -ENOSYS;
#endif
}

/* The feature handshake: -EINVAL from a kernel older than 6.7 (it refuses
 * features it does not know). */
static int handshake(int fd)
{
    struct uffdio_api api = {.api = UFFD_API, .features = TRACK_FEATURES};
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return -errno;
    if ((api.features & TRACK_FEATURES) != TRACK_FEATURES)
        return -EINVAL;
    if (!(api.ioctls & (1ULL << _UFFDIO_REGISTER)))
        return -EOPNOTSUPP;
    return 0;
}

static int open_rung(int mode)
{
    int fd = mode == LS_MODE_UFFD ? open_full_rung() : open_user_rung();
    if (fd < 0)
        return fd;
    int rc = handshake(fd);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    return fd;
}

static long pm_scan(uint64_t start, uint64_t end, uint64_t flags, uint64_t mask, struct ls_page_region *vec,
                    uint64_t vec_len)
{
    struct ls_pm_scan_arg a = {
        .size = sizeof a,
        .flags = flags,
        .start = start,
        .end = end,
        .vec = (uintptr_t)vec,
        .vec_len = vec_len,
        .category_mask = mask,
        .return_mask = mask,
    };
    for (;;) {
        long n = ioctl(pmfd, PAGEMAP_SCAN, &a);
        if (n >= 0)
            return n;
        if (errno != EINTR) /* EINTR: only a fatal signal interrupts the walk */
            return -errno;
    }
}

static void close_locked(void)
{
    if (tfd >= 0)
        close(tfd);
    if (pmfd >= 0)
        close(pmfd);
    tfd = pmfd = tmode = -1;
}

/* Open the tracking userfaultfd and pagemap if not yet: 0 or -errno. */
static int open_locked(void)
{
    if (tfd >= 0)
        return 0;
    int fd, mode;
    if (want_mode == LS_TRACK_AUTO) {
        mode = LS_MODE_UFFD;
        fd = open_rung(mode);
        if (fd < 0) { /* no privilege for the full rung: user-mode-only tracks just as well */
            mode = LS_MODE_UFFD_USER;
            fd = open_rung(mode);
        }
    } else {
        mode = want_mode;
        fd = open_rung(mode);
    }
    if (fd < 0)
        return fd;
    int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (pm < 0) {
        int e = -errno;
        close(fd);
        return e;
    }
    tfd = fd;
    tmode = mode;
    pmfd = pm;
    /* PAGEMAP_SCAN over an empty range: ENOTTY before Linux 6.7. */
    long n = pm_scan(0, 0, 0, PAGE_IS_WRITTEN, NULL, 0);
    if (n < 0) {
        close_locked();
        return n == -ENOTTY ? -ENOSYS : (int)n;
    }
    return 0;
}

static void range_free(struct trange *t)
{
    free(t->dirty);
    for (struct snapdst *d = t->dsts, *n; d; d = n) {
        n = d->next;
        free(d->preserved);
        free(d);
    }
    t->dirty = NULL;
    t->dsts = NULL;
}

/* ---- forgetting in a forked child ---- */

static void track_forget(void)
{
    /* The child's copy of the memory is not registered (no UFFD_EVENT_FORK):
     * it tracks nothing. The parent's uffd and pagemap fds are dropped here
     * (the parent keeps its own). */
    close_locked();
    for (size_t i = 0; i < nrs; i++)
        range_free(&rs[i]);
    free(rs);
    rs = NULL;
    nrs = caprs = 0;
    if (sfd >= 0)
        close(sfd); /* the parent's; the snapshot thread is not the child's */
    sfd = -1;
    forgot_in = getpid();
    pthread_mutex_init(&lk, NULL);
}

static void atfork_prepare(void)
{
    pthread_mutex_lock(&lk); /* the table is consistent at fork */
}

static void atfork_parent(void)
{
    pthread_mutex_unlock(&lk);
}

static void reset_after_fork(void)
{
    if (forgot_in != getpid()) /* pthread_atfork's child handler did not run (a raw clone) */
        track_forget();
}

__attribute__((constructor)) static void track_register_fork_reset(void)
{
    pthread_atfork(atfork_prepare, atfork_parent, track_forget);
    ls_on_fork_child(reset_after_fork);
}

/* ---- the table ---- */

/* Index of the first range whose end is above addr. */
static size_t first_above(uint64_t addr)
{
    size_t lo = 0, hi = nrs;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (rs[mid].end <= addr)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* The tracked range containing all of [addr, end), or NULL. */
static struct trange *find_covering(uint64_t addr, uint64_t end)
{
    size_t i = first_above(addr);
    if (i < nrs && rs[i].start <= addr && end <= rs[i].end)
        return &rs[i];
    return NULL;
}

static int check_range(uint64_t addr, uint64_t len)
{
    const uint64_t ps = ls_page_size();
    if (!len || addr % ps || len % ps)
        return -EINVAL;
    if (addr + len < addr)
        return -EOVERFLOW;
    return 0;
}

/*
 * Whether [start, end) is all mapped, private, anonymous, not KSM-mergeable
 * and not registered with any userfaultfd: 0, -ENOMEM (a gap), -EOPNOTSUPP
 * (file-backed, shared, hugetlb, special or mergeable), -EBUSY (registered),
 * or -errno of reading /proc/self/smaps. smaps is read only up to the last
 * VMA of the range (each record costs a walk of that VMA's page table).
 */
static int vma_check(uint64_t start, uint64_t end)
{
    FILE *f = fopen("/proc/self/smaps", "re");
    if (!f)
        return -errno;
    char *line = NULL;
    size_t cap = 0;
    int rc = -ENOMEM, in = 0;
    uint64_t cur = start, vend = 0;
    while (getline(&line, &cap, f) > 0) {
        unsigned long s, e, inode;
        char perms[8];
        unsigned dmaj, dmin;
        int off = 0;
        if (sscanf(line, "%lx-%lx %7s %*x %x:%x %lu %n", &s, &e, perms, &dmaj, &dmin, &inode, &off) == 6) {
            if (in) /* the previous VMA had no VmFlags line */
                break;
            if (e <= cur)
                continue;
            if (s > cur) { /* a gap */
                rc = -ENOMEM;
                break;
            }
            const char *name = line + off;
            int anon = perms[3] == 'p' && !inode && !dmaj && !dmin &&
                       (*name == '\n' || *name == 0 || !strncmp(name, "[heap]", 6) || !strncmp(name, "[stack]", 7) ||
                        !strncmp(name, "[anon:", 6));
            if (!anon) {
                rc = -EOPNOTSUPP;
                break;
            }
            in = 1;
            vend = e;
            continue;
        }
        if (!in || strncmp(line, "VmFlags:", 8))
            continue;
        in = 0;
        rc = 0;
        for (char *t = strtok(line + 8, " \n"); t; t = strtok(NULL, " \n")) {
            if (!strcmp(t, "mg") || !strcmp(t, "sh") || !strcmp(t, "ht") || !strcmp(t, "io") || !strcmp(t, "pf"))
                rc = -EOPNOTSUPP; /* mergeable (KSM), shared, hugetlb, I/O or PFN mapping */
            else if (rc == 0 && (!strcmp(t, "ui") || !strcmp(t, "uw") || !strcmp(t, "um")))
                rc = -EBUSY; /* already registered with a userfaultfd (an attached region) */
        }
        if (rc)
            break;
        cur = vend;
        if (cur >= end)
            break;
        rc = -ENOMEM; /* more of the range to see */
    }
    if (rc == -ENOMEM && ferror(f))
        rc = -EIO;
    free(line);
    fclose(f);
    return rc;
}

/* Unprotect and unregister whatever of [start, end) is still registered with
 * the tracking uffd (the pages PAGEMAP_SCAN calls WPALLOWED: async-WP VMAs,
 * and this uffd is the process's only async one). Memory already unmapped or
 * mapped anew is left alone. 0 or the first -errno. */
static int unregister_ours(uint64_t start, uint64_t end)
{
    int rc = 0;
    for (uint64_t cur = start; cur < end;) {
        long n = pm_scan(cur, end, 0, PAGE_IS_WPALLOWED, kbuf, KBUF);
        if (n < 0)
            return n;
        for (long i = 0; i < n; i++) {
            struct uffdio_writeprotect wp = {.range = {.start = kbuf[i].start, .len = kbuf[i].end - kbuf[i].start}};
            if (ioctl(tfd, UFFDIO_WRITEPROTECT, &wp) < 0 && errno != ENOENT && !rc)
                rc = -errno;
            struct uffdio_range r = {.start = kbuf[i].start, .len = kbuf[i].end - kbuf[i].start};
            if (ioctl(tfd, UFFDIO_UNREGISTER, &r) < 0 && errno != EINVAL && !rc)
                rc = -errno; /* EINVAL: nothing mapped there any more */
        }
        if (n < KBUF)
            break;
        cur = kbuf[n - 1].end;
    }
    return rc;
}

static void table_del(size_t i)
{
    range_free(&rs[i]);
    memmove(&rs[i], &rs[i + 1], (nrs - i - 1) * sizeof *rs);
    nrs--;
}


/* ---- synchronous tracking: the snapshot thread ---- */

#define BIT(m, i) ((m)[(i) / 8] & (1u << ((i) % 8)))
#define SETBIT(m, i) ((m)[(i) / 8] |= (uint8_t)(1u << ((i) % 8)))
#define CLRBIT(m, i) ((m)[(i) / 8] &= (uint8_t)~(1u << ((i) % 8)))

/* Block i of sync range t: [*lo, *hi). */
static void block_span(const struct trange *t, size_t i, uint64_t *lo, uint64_t *hi)
{
    uint64_t a = t->b0 + i * SNAP_BLOCK, b = a + SNAP_BLOCK;
    *lo = a < t->start ? t->start : a;
    *hi = b > t->end ? t->end : b;
}

static int sync_protect(uint64_t lo, uint64_t hi, int on)
{
    struct uffdio_writeprotect wp = {.range = {.start = lo, .len = hi - lo}, .mode = on ? UFFDIO_WRITEPROTECT_MODE_WP : 0};
    return ioctl(sfd, UFFDIO_WRITEPROTECT, &wp) < 0 ? -errno : 0;
}

/* Unprotect and unregister a range (of either kind) from its userfaultfd:
 * what of it is still mapped. */
static int range_unregister(const struct trange *t)
{
    if (!t->sync)
        return tfd >= 0 ? unregister_ours(t->start, t->end) : 0;
    int rc = sync_protect(t->start, t->end, 0); /* wakes any writer waiting on it */
    if (rc == -ENOENT || rc == -EINVAL)
        rc = 0; /* unmapped meanwhile */
    struct uffdio_range r = {.start = t->start, .len = t->end - t->start};
    if (ioctl(sfd, UFFDIO_UNREGISTER, &r) < 0 && errno != EINVAL && !rc)
        rc = -errno;
    return rc;
}

/* A write faulted at addr (lk held): preserve its block in each open
 * snapshot that lacks it, mark it written, unprotect it (waking the writer).
 * The writer waits meanwhile, so the bytes copied are the old ones. Failing
 * to preserve never stops the writer: the snapshot is marked broken. */
static void on_write(uint64_t addr)
{
    const uint64_t ps = ls_page_size();
    uint64_t pg = addr / ps * ps;
    struct trange *t = find_covering(pg, pg + ps);
    if (!t || !t->sync) { /* no longer ours (removed: unregistering woke it); wake it anyway */
        struct uffdio_range w = {.start = pg, .len = ps};
        ioctl(sfd, UFFDIO_WAKE, &w);
        return;
    }
    size_t i = (size_t)((pg - t->b0) / SNAP_BLOCK);
    uint64_t lo, hi;
    block_span(t, i, &lo, &hi);
    for (struct snapdst *d = t->dsts; d; d = d->next) {
        if (BIT(d->preserved, i))
            continue;
        uint64_t a = lo < d->base ? d->base : lo, b = hi > d->base + d->clen ? d->base + d->clen : hi;
        if (a < b) {
            int rc = ls_cache_keep(d->c, a - d->base, (const uint8_t *)(uintptr_t)a, b - a);
            if (rc)
                d->broken = 1;
            else
                CTR_ADD(snap_bytes_preserved, b - a);
        }
        SETBIT(d->preserved, i);
    }
    /* No snapshot open (between calls): nothing to copy, so let the writer
     * have SNAP_SPAN blocks at once (a whole-array overwrite then waits 32
     * times per GiB, not 512). Which of their pages changed is told later by
     * comparing them with the cache (ls_cache_refresh), not by this bit. */
    size_t i0 = i, i1 = i + 1;
    if (!t->dsts) {
        const uint64_t first = t->b0 / SNAP_BLOCK;                  /* block 0, counted from address 0 */
        const uint64_t span = (first + i) / SNAP_SPAN * SNAP_SPAN; /* the span's first block, likewise */
        i0 = span > first ? (size_t)(span - first) : 0;
        i1 = (size_t)(span + SNAP_SPAN - first) < t->nblk ? (size_t)(span + SNAP_SPAN - first) : t->nblk;
        uint64_t ignore;
        block_span(t, i0, &lo, &ignore);
        block_span(t, i1 - 1, &ignore, &hi);
    }
    for (size_t k = i0; k < i1; k++)
        SETBIT(t->dirty, k);
    CTR_ADD(snap_faults, 1);
    int rc = sync_protect(lo, hi, 0);
    if (rc) { /* the block's layout changed under us: wake the writer at least */
        struct uffdio_range w = {.start = pg, .len = ps};
        ioctl(sfd, UFFDIO_WAKE, &w);
    }
}

/* madvise(MADV_DONTNEED / MADV_REMOVE) of [start, end) is about to discard
 * pages (lk held): they read differently now without a write. Mark their
 * blocks written; open snapshots cannot keep what was not cached yet. */
static void on_remove(uint64_t start, uint64_t end)
{
    for (size_t k = first_above(start); k < nrs && rs[k].start < end; k++) {
        struct trange *t = &rs[k];
        if (!t->sync)
            continue;
        uint64_t a = start < t->start ? t->start : start, b = end > t->end ? t->end : end;
        for (size_t i = (size_t)((a - t->b0) / SNAP_BLOCK); i < t->nblk && t->b0 + i * SNAP_BLOCK < b; i++)
            SETBIT(t->dirty, i);
        for (struct snapdst *d = t->dsts; d; d = d->next)
            d->broken = 1;
    }
}

static void *snap_thread(void *arg)
{
    int fd = (int)(intptr_t)arg;
    ls_block_signals();
    struct uffd_msg m[32];
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            ls_fatal("lazyshare: the snapshot thread cannot poll its userfaultfd: %s", strerror(errno));
        }
        if (p.revents & (POLLERR | POLLNVAL))
            return NULL; /* closed: a forked child's copy, never the parent's */
        /* Read under the lock: a madvise waits only until its REMOVE event
         * is read, so a scan after it returns must find the event handled. */
        pthread_mutex_lock(&lk);
        ssize_t n = read(fd, m, sizeof m);
        if (n < 0) {
            int e = errno;
            pthread_mutex_unlock(&lk);
            if (e == EAGAIN || e == EINTR)
                continue;
            ls_fatal("lazyshare: the snapshot thread cannot read its userfaultfd: %s", strerror(e));
        }
        for (size_t k = 0; k < (size_t)n / sizeof m[0]; k++) {
            if (m[k].event == UFFD_EVENT_PAGEFAULT)
                on_write(m[k].arg.pagefault.address);
            else if (m[k].event == UFFD_EVENT_REMOVE)
                on_remove(m[k].arg.remove.start, m[k].arg.remove.end);
        }
        pthread_mutex_unlock(&lk);
    }
}

/* Open sfd and start the snapshot thread if not yet (lk held): 0 or -errno.
 * Only on the full rung: a synchronous write-protect fault taken in kernel
 * mode (read(2) into the buffer) fails with EFAULT on the user-mode-only one. */
static int open_sync_locked(void)
{
    if (sfd >= 0)
        return 0;
    if (want_mode == LS_MODE_UFFD_USER)
        return -EPERM;
    int fd = open_full_rung();
    if (fd < 0)
        return fd;
    const uint64_t feat = UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_EVENT_REMOVE;
    struct uffdio_api api = {.api = UFFD_API, .features = feat};
    int rc = 0;
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        rc = -errno;
    else if ((api.features & feat) != feat)
        rc = -EINVAL;
    pthread_t th;
    pthread_attr_t at;
    if (!rc && (rc = -pthread_attr_init(&at)) == 0) {
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        rc = -pthread_create(&th, &at, snap_thread, (void *)(intptr_t)fd);
        pthread_attr_destroy(&at);
    }
    if (rc) {
        close(fd);
        return rc;
    }
    pthread_setname_np(th, "lazyshare-snap");
    sfd = fd;
    return 0;
}

/* ---- the API (lazyshare.h) ---- */

int ls_track_set_mode(int mode)
{
    if (mode != LS_TRACK_AUTO && mode != LS_MODE_UFFD && mode != LS_MODE_UFFD_USER)
        return -EINVAL;
    int rc = 0;
    pthread_mutex_lock(&lk);
    if (tfd >= 0 && mode != want_mode) {
        if (nrs)
            rc = -EBUSY;
        else
            close_locked(); /* reopened at the new rung when next needed */
    }
    if (!rc)
        want_mode = mode;
    pthread_mutex_unlock(&lk);
    return rc;
}

int ls_track_mode(void)
{
    pthread_mutex_lock(&lk);
    int rc = open_locked();
    if (!rc)
        rc = tmode;
    pthread_mutex_unlock(&lk);
    return rc;
}

int ls_track_supported(void)
{
    int rc = ls_track_mode();
    return rc < 0 ? rc : 1;
}

static int track_add(uint64_t addr, uint64_t len, int sync)
{
    int rc = check_range(addr, len);
    if (rc)
        return rc;
    const uint64_t end = addr + len;
    pthread_mutex_lock(&lk);
    if ((rc = sync ? open_sync_locked() : open_locked()))
        goto out;
    /* Overlapping ranges: a live one refuses; lost ones are replaced. */
    size_t i = first_above(addr);
    for (size_t j = i; j < nrs && rs[j].start < end; j++)
        if (!rs[j].lost) {
            rc = -EEXIST;
            goto out;
        }
    while (i < nrs && rs[i].start < end) {
        range_unregister(&rs[i]);
        table_del(i);
    }
    if ((rc = vma_check(addr, end)))
        goto out;
    if (nrs == caprs) {
        size_t nc = caprs ? 2 * caprs : 16;
        struct trange *n = realloc(rs, nc * sizeof *n);
        if (!n) {
            rc = -ENOMEM;
            goto out;
        }
        rs = n;
        caprs = nc;
    }
    struct trange t = {.start = addr, .end = end, .sync = sync};
    if (sync) {
        t.b0 = addr / SNAP_BLOCK * SNAP_BLOCK;
        t.nblk = (size_t)((end - t.b0 + SNAP_BLOCK - 1) / SNAP_BLOCK);
        if (!(t.dirty = calloc((t.nblk + 7) / 8, 1))) {
            rc = -ENOMEM;
            goto out;
        }
    }
    const int fd = sync ? sfd : tfd;
    struct uffdio_register reg = {.range = {.start = addr, .len = len}, .mode = UFFDIO_REGISTER_MODE_WP};
    if (ioctl(fd, UFFDIO_REGISTER, &reg) < 0) {
        rc = -errno;
        free(t.dirty);
        goto out;
    }
    struct uffdio_writeprotect wp = {.range = {.start = addr, .len = len}, .mode = UFFDIO_WRITEPROTECT_MODE_WP};
    if (!(reg.ioctls & (1ULL << _UFFDIO_WRITEPROTECT)))
        rc = -EOPNOTSUPP;
    else if (ioctl(fd, UFFDIO_WRITEPROTECT, &wp) < 0)
        rc = -errno;
    if (rc) {
        struct uffdio_range r = {.start = addr, .len = len};
        ioctl(fd, UFFDIO_UNREGISTER, &r); /* undo; it worked a moment ago */
        free(t.dirty);
        goto out;
    }
    memmove(&rs[i + 1], &rs[i], (nrs - i) * sizeof *rs);
    rs[i] = t;
    nrs++;
out:
    pthread_mutex_unlock(&lk);
    return rc;
}

int ls_track_add(uint64_t addr, uint64_t len)
{
    return track_add(addr, len, 0);
}

int ls_track_add_sync(uint64_t addr, uint64_t len)
{
    return track_add(addr, len, 1);
}

/* ls_track_dirty of a sync range (lk held): the written blocks. */
static int dirty_sync(struct trange *t, uint64_t addr, uint64_t end, uint64_t *out, uint32_t max_ranges,
                      int reprotect)
{
    uint32_t nout = 0;
    for (size_t i = (size_t)((addr - t->b0) / SNAP_BLOCK); i < t->nblk && nout < max_ranges; i++) {
        uint64_t lo, hi;
        block_span(t, i, &lo, &hi);
        if (lo >= end)
            break;
        if (!BIT(t->dirty, i))
            continue;
        if (reprotect) { /* protected first, then forgotten: a write in between is reported now */
            int rc = sync_protect(lo, hi, 1);
            if (rc) {
                t->lost = 1;
                return -ENXIO;
            }
            CLRBIT(t->dirty, i);
        }
        uint64_t a = lo < addr ? addr : lo, b = hi > end ? end : hi;
        if (nout && out[2 * nout - 1] == a) {
            out[2 * nout - 1] = b;
        } else {
            out[2 * nout] = a;
            out[2 * nout + 1] = b;
            nout++;
        }
    }
    return (int)nout;
}

int ls_track_dirty(uint64_t addr, uint64_t len, uint64_t *out, uint32_t max_ranges, int reprotect)
{
    int rc = check_range(addr, len);
    if (rc)
        return rc;
    if (!out || !max_ranges || max_ranges > INT32_MAX)
        return -EINVAL;
    const uint64_t end = addr + len;
    pthread_mutex_lock(&lk);
    struct trange *t = find_covering(addr, end);
    if (!t || (!t->sync && tfd < 0)) {
        rc = -ENOENT;
        goto out;
    }
    if (t->lost) {
        rc = -ENXIO;
        goto out;
    }
    /* A gap (munmap of part of it) is invisible to PAGEMAP_SCAN: msync says. */
    if (msync((void *)(uintptr_t)addr, len, MS_ASYNC) < 0) {
        if (errno == ENOMEM) {
            t->lost = 1;
            rc = -ENXIO;
        } else {
            rc = -errno;
        }
        goto out;
    }
    if (t->sync) {
        rc = dirty_sync(t, addr, end, out, max_ranges, reprotect);
        goto out;
    }
    const uint64_t flags = PM_SCAN_CHECK_WPASYNC | (reprotect ? PM_SCAN_WP_MATCHING : 0);
    uint32_t nout = 0;
    for (uint64_t cur = addr; cur < end && nout < max_ranges;) {
        uint64_t vec_len = max_ranges - nout < KBUF ? max_ranges - nout : KBUF;
        long n = pm_scan(cur, end, flags, PAGE_IS_WRITTEN, kbuf, vec_len);
        if (n < 0) {
            if (n == -EPERM) { /* part of it is not registered (async) any more */
                t->lost = 1;
                rc = -ENXIO;
            } else {
                rc = (int)n;
            }
            goto out;
        }
        for (long k = 0; k < n; k++) {
            if (nout && out[2 * nout - 1] == kbuf[k].start) {
                out[2 * nout - 1] = kbuf[k].end;
            } else {
                out[2 * nout] = kbuf[k].start;
                out[2 * nout + 1] = kbuf[k].end;
                nout++;
            }
        }
        /* Fewer than asked: the walk reached end. A full vector: go on from
         * the last region's end (walk_end is not to be trusted, see DESIGN.md). */
        if ((uint64_t)n < vec_len)
            break;
        cur = kbuf[n - 1].end;
    }
    rc = (int)nout;
out:
    pthread_mutex_unlock(&lk);
    return rc;
}

int ls_track_remove(uint64_t addr, uint64_t len)
{
    int rc = check_range(addr, len);
    if (rc)
        return rc;
    pthread_mutex_lock(&lk);
    size_t i = first_above(addr);
    if (i >= nrs || rs[i].start != addr || rs[i].end != addr + len || (!rs[i].sync && tfd < 0)) {
        rc = -ENOENT;
        goto out;
    }
    rc = range_unregister(&rs[i]);
    table_del(i); /* forgotten even on an error: it cannot be tracked honestly either way */
out:
    pthread_mutex_unlock(&lk);
    return rc;
}

int ls_track_count(void)
{
    pthread_mutex_lock(&lk);
    int n = (int)nrs;
    pthread_mutex_unlock(&lk);
    return n;
}

int ls_track_snap_add(uint64_t addr, struct ls_cache *c, uint64_t base, uint64_t clen)
{
    int rc = 0;
    pthread_mutex_lock(&lk);
    size_t i = first_above(addr);
    struct trange *t = i < nrs && rs[i].start == addr ? &rs[i] : NULL;
    struct snapdst *d = NULL;
    if (!t || !t->sync || t->lost)
        rc = -ENOENT;
    else if (!(d = calloc(1, sizeof *d)) || !(d->preserved = calloc((t->nblk + 7) / 8, 1)))
        rc = -ENOMEM;
    if (rc) {
        if (d)
            free(d);
    } else {
        *d = (struct snapdst){.c = c, .base = base, .clen = clen, .preserved = d->preserved, .next = t->dsts};
        t->dsts = d;
    }
    pthread_mutex_unlock(&lk);
    return rc;
}

int ls_track_snap_del(uint64_t addr, struct ls_cache *c)
{
    int rc = -ENOENT;
    pthread_mutex_lock(&lk);
    size_t i = first_above(addr);
    if (i < nrs && rs[i].start == addr && rs[i].sync) {
        for (struct snapdst **p = &rs[i].dsts; *p; p = &(*p)->next) {
            if ((*p)->c != c)
                continue;
            struct snapdst *d = *p;
            *p = d->next;
            rc = d->broken;
            free(d->preserved);
            free(d);
            break;
        }
    }
    pthread_mutex_unlock(&lk);
    return rc;
}
