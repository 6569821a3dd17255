/*
 * lazyshare native core, owner side: dirty tracking of ranges of this
 * process's own memory (the building block of live snapshots: which pages of
 * an exported array did the parent write since a point in time).
 *
 * Owns: the process's one tracking userfaultfd (UFFD_FEATURE_WP_ASYNC |
 * UFFD_FEATURE_WP_UNPOPULATED, Linux 6.7+; never read: async write-protect
 * faults are resolved by the kernel, which only clears the page's uffd-wp bit),
 * an fd of /proc/self/pagemap for PAGEMAP_SCAN, and the sorted table of tracked
 * ranges. All of it behind one mutex. No thread of its own: called from any
 * Python thread (cffi releases the GIL); nothing here blocks on another
 * process. A forked child forgets all of it (pthread_atfork, and the core's
 * ls_on_fork_child registry): its copy of the memory is not registered.
 *
 * How a write is recorded: the range is registered with UFFDIO_REGISTER_MODE_WP
 * and write-protected. A write to a protected page (from user mode, or from
 * the kernel: read(2) into the buffer) takes a minor fault that the kernel
 * resolves at once by unprotecting the page (the writer never waits, never
 * gets EFAULT, on either uffd rung); PAGEMAP_SCAN reports unprotected pages as
 * PAGE_IS_WRITTEN and, with PM_SCAN_WP_MATCHING, protects them again in the
 * same walk, so no write between report and re-protection is lost.
 * PM_SCAN_CHECK_WPASYNC makes the scan fail (EPERM) where the memory is no
 * longer registered (mremap moved it, it was unmapped and mapped again): the
 * range is then "lost" (-ENXIO).
 */
#include "internal.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
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
#ifndef PAGE_IS_WPALLOWED
#define PAGE_IS_WPALLOWED (1 << 0)
#endif
#ifndef PAGE_IS_WRITTEN
#define PAGE_IS_WRITTEN (1 << 1)
#endif
#ifndef PM_SCAN_WP_MATCHING
#define PM_SCAN_WP_MATCHING (1 << 0)
#endif
#ifndef PM_SCAN_CHECK_WPASYNC
#define PM_SCAN_CHECK_WPASYNC (1 << 1)
#endif
/* struct pm_scan_arg and struct page_region of linux/fs.h (Linux 6.7), under
 * our own names so that they never clash with a header that has them. */
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

#define TRACK_FEATURES ((uint64_t)(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED))
#define KBUF 512 /* regions per PAGEMAP_SCAN call */

struct trange {
    uint64_t start, end;
    int lost; /* the memory is no longer (all) registered: report -ENXIO */
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

/* ---- forgetting in a forked child ---- */

static void track_forget(void)
{
    /* The child's copy of the memory is not registered (no UFFD_EVENT_FORK):
     * it tracks nothing. The parent's uffd and pagemap fds are dropped here
     * (the parent keeps its own). */
    close_locked();
    free(rs);
    rs = NULL;
    nrs = caprs = 0;
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
    memmove(&rs[i], &rs[i + 1], (nrs - i - 1) * sizeof *rs);
    nrs--;
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

int ls_track_add(uint64_t addr, uint64_t len)
{
    int rc = check_range(addr, len);
    if (rc)
        return rc;
    const uint64_t end = addr + len;
    pthread_mutex_lock(&lk);
    if ((rc = open_locked()))
        goto out;
    /* Overlapping ranges: a live one refuses; lost ones are replaced. */
    size_t i = first_above(addr);
    for (size_t j = i; j < nrs && rs[j].start < end; j++)
        if (!rs[j].lost) {
            rc = -EEXIST;
            goto out;
        }
    while (i < nrs && rs[i].start < end) {
        unregister_ours(rs[i].start, rs[i].end);
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
    struct uffdio_register reg = {.range = {.start = addr, .len = len}, .mode = UFFDIO_REGISTER_MODE_WP};
    if (ioctl(tfd, UFFDIO_REGISTER, &reg) < 0) {
        rc = -errno;
        goto out;
    }
    struct uffdio_writeprotect wp = {.range = {.start = addr, .len = len}, .mode = UFFDIO_WRITEPROTECT_MODE_WP};
    if (!(reg.ioctls & (1ULL << _UFFDIO_WRITEPROTECT)))
        rc = -EOPNOTSUPP;
    else if (ioctl(tfd, UFFDIO_WRITEPROTECT, &wp) < 0)
        rc = -errno;
    if (rc) {
        struct uffdio_range r = {.start = addr, .len = len};
        ioctl(tfd, UFFDIO_UNREGISTER, &r); /* undo; it worked a moment ago */
        goto out;
    }
    memmove(&rs[i + 1], &rs[i], (nrs - i) * sizeof *rs);
    rs[i] = (struct trange){.start = addr, .end = end, .lost = 0};
    nrs++;
out:
    pthread_mutex_unlock(&lk);
    return rc;
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
    if (!t || tfd < 0) {
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
    if (i >= nrs || rs[i].start != addr || rs[i].end != addr + len || tfd < 0) {
        rc = -ENOENT;
        goto out;
    }
    rc = unregister_ours(addr, addr + len);
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
