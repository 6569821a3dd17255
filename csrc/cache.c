/*
 * The owner's page caches (see ls_server_cache in lazyshare.h): one memfd per
 * cached segment, shared by every consumer on this host, each mapping it
 * MAP_PRIVATE. The owner fills it through a MAP_SHARED view registered MISSING
 * with this process's own "cache" userfaultfd (opened once, lazily): a
 * UFFDIO_COPY into a shmem mapping allocates a page, copies into it and only
 * then inserts it into the memfd, so a consumer sees a page whole or not at
 * all, and two fills of the same page race harmlessly (the second gets
 * EEXIST). Nothing ever reads or writes the view itself.
 *
 * Threads: ls_cache_new/free from whoever creates or frees the segment (under
 * the server's seg_lock or just after it); fills from the page-server loops,
 * concurrently (the kernel serialises them per page); the list of caches
 * (for a forked child to close their memfds) under cache_lock.
 */
#include "cache.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/userfaultfd.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;
static struct ls_cache *caches; /* under cache_lock */
static int cache_uffd = -1;     /* set under cache_lock before any cache exists; then read freely */
static pid_t forgot_in;         /* the process whose after-fork reset ran (see cache_forget) */

/* The cache userfaultfd, opened at the first cache: the full rung, else the
 * user-mode-only one (only UFFDIO_COPY goes through it: no fault is ever
 * handled, so the rung does not matter). */
static int cache_uffd_get(void)
{
    pthread_mutex_lock(&cache_lock);
    if (cache_uffd < 0) {
        int fd = ls_uffd_open(LS_MODE_UFFD);
        if (fd < 0)
            fd = ls_uffd_open(LS_MODE_UFFD_USER);
        if (fd >= 0)
            cache_uffd = fd;
        else if (fd != -EMFILE && fd != -ENFILE && fd != -ENOMEM)
            fd = -EOPNOTSUPP; /* EPERM, ENOSYS...: no userfaultfd for this process */
        pthread_mutex_unlock(&cache_lock);
        return fd;
    }
    int fd = cache_uffd;
    pthread_mutex_unlock(&cache_lock);
    return fd;
}

int ls_cache_new(uint64_t len, struct ls_cache **out)
{
    *out = NULL;
    if (!len || len % ls_page_size() || len > (uint64_t)INT64_MAX)
        return -EINVAL;
    int uffd = cache_uffd_get();
    if (uffd < 0)
        return uffd;
    struct ls_cache *c = calloc(1, sizeof *c);
    if (!c)
        return -ENOMEM;
    int rc = 0, registered = 0;
    c->view = MAP_FAILED;
    c->len = len;
    c->fd = -1;
    pthread_rwlock_init(&c->lock, NULL);
    if (!(c->kept = calloc((len / ls_page_size() + 7) / 8, 1))) {
        free(c);
        return -ENOMEM;
    }
    /* Sealed against resizing: a consumer (same uid) opening it by /proc
     * cannot truncate it under the others. Holes can still be punched. */
    c->fd = memfd_create("lazyshare-cache", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (c->fd < 0)
        goto fail;
    if (ftruncate(c->fd, (off_t)len) < 0 || fcntl(c->fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) < 0)
        goto fail;
    c->view = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, c->fd, 0);
    if (c->view == MAP_FAILED)
        goto fail;
    /* A forked child gets no view: it could not fill it (its copy would not be
     * registered) and must never fault on it. */
    if (madvise(c->view, len, MADV_DONTFORK) < 0)
        goto fail;
    struct uffdio_register reg = {
        .range = {.start = (uintptr_t)c->view, .len = len},
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) {
        rc = errno == EINVAL ? -EOPNOTSUPP : -errno; /* EINVAL: no MISSING on shmem here */
        goto fail_rc;
    }
    registered = 1;
    if (!(reg.ioctls & (1ull << _UFFDIO_COPY))) {
        rc = -EOPNOTSUPP;
        goto fail_rc;
    }
    struct stat st;
    if (fstat(c->fd, &st) < 0)
        goto fail;
    c->ino = (uint64_t)st.st_ino;
    pthread_mutex_lock(&cache_lock);
    c->next = caches;
    if (caches)
        caches->prev = c;
    caches = c;
    pthread_mutex_unlock(&cache_lock);
    CTR_ADD(caches_live, 1);
    *out = c;
    return 0;

fail:
    rc = -errno;
fail_rc:
    if (registered) {
        struct uffdio_range rg = {.start = (uintptr_t)c->view, .len = len};
        ioctl(uffd, UFFDIO_UNREGISTER, &rg);
    }
    if (c->view != MAP_FAILED)
        munmap(c->view, len);
    if (c->fd >= 0)
        close(c->fd);
    free(c->kept);
    free(c);
    return rc;
}

void ls_cache_free(struct ls_cache *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&cache_lock);
    if (c->prev)
        c->prev->next = c->next;
    else
        caches = c->next;
    if (c->next)
        c->next->prev = c->prev;
    pthread_mutex_unlock(&cache_lock);
    /* munmap unregisters too; unregistering first says so (and fails
     * harmlessly if the uffd is somehow not ours any more). */
    struct uffdio_range rg = {.start = (uintptr_t)c->view, .len = c->len};
    ioctl(cache_uffd, UFFDIO_UNREGISTER, &rg);
    munmap(c->view, c->len);
    close(c->fd);
    pthread_rwlock_destroy(&c->lock);
    free(c->kept);
    free(c);
    CTR_SUB(caches_live, 1);
}

int ls_cache_fill(struct ls_cache *c, uint64_t off, const uint8_t *src, uint64_t len)
{
    const uint64_t ps = ls_page_size();
    if (off % ps || len % ps || off > c->len || len > c->len - off)
        return -EINVAL;
    const uint64_t end = off + len;
    uint64_t filled = 0;
    int rc = 0;
    /* Only the holes: a page already cached would cost a failed UFFDIO_COPY
     * (EEXIST) and a wake-up each, and consumers sharing a cache mostly ask
     * for pages the first one filled. mincore of the view answers from the
     * memfd's page cache, in time proportional to the range (lseek SEEK_HOLE
     * walks on to the next hole: 0.5 ms per call in a full 256 MiB memfd). A
     * page filled meanwhile still comes back as EEXIST and is skipped. */
    for (uint64_t pos = off; pos < end && !rc;) {
        unsigned char vec[512];
        uint64_t n = (end - pos) / ps < sizeof vec ? (end - pos) / ps : sizeof vec;
        if (mincore(c->view + pos, n * ps, vec) < 0)
            memset(vec, 0, n); /* unknown: try every page */
        for (uint64_t i = 0, j; i < n && !rc; i = j) {
            if (vec[i] & 1) {
                j = i + 1;
                continue;
            }
            for (j = i + 1; j < n && !(vec[j] & 1); j++)
                ;
            uint64_t from = pos + i * ps, run = (j - i) * ps, skipped = 0;
            rc = ls_uffd_fill(cache_uffd, (uintptr_t)c->view + from, src + (from - off), run, 0, 1, &skipped);
            if (!rc)
                filled += run - skipped * ps;
        }
        pos += n * ps;
    }
    CTR_ADD(cache_bytes_filled, filled);
    return rc;
}

int ls_cache_keep(struct ls_cache *c, uint64_t off, const uint8_t *src, uint64_t len)
{
    const uint64_t ps = ls_page_size();
    pthread_rwlock_wrlock(&c->lock);
    int rc = ls_cache_fill(c, off, src, len);
    if (!rc)
        for (uint64_t pg = off / ps; pg < (off + len) / ps; pg++)
            c->kept[pg / 8] |= (uint8_t)(1u << (pg % 8));
    pthread_rwlock_unlock(&c->lock);
    return rc;
}

void ls_cache_unkeep_all(struct ls_cache *c)
{
    pthread_rwlock_wrlock(&c->lock);
    memset(c->kept, 0, (c->len / ls_page_size() + 7) / 8);
    pthread_rwlock_unlock(&c->lock);
}

int64_t ls_cache_resident(struct ls_cache *c)
{
    struct stat st;
    if (fstat(c->fd, &st) < 0)
        return -errno;
    return (int64_t)st.st_blocks * 512;
}

int64_t ls_cache_punch(struct ls_cache *c, const uint64_t *ranges, uint32_t n)
{
    const uint64_t ps = ls_page_size();
    int64_t before = ls_cache_resident(c);
    if (before < 0)
        return before;
    pthread_rwlock_wrlock(&c->lock); /* a punched page is not kept any more */
    for (uint32_t i = 0; i < n; i++) {
        uint64_t off = ranges[2 * i], len = ranges[2 * i + 1];
        if (!len || off >= c->len)
            continue;
        uint64_t from = off / ps * ps;
        uint64_t to = len > c->len - off ? c->len : (off + len + ps - 1) / ps * ps;
        if (to > c->len)
            to = c->len;
        int r;
        do
            r = fallocate(c->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)from, (off_t)(to - from));
        while (r < 0 && errno == EINTR);
        if (r < 0) {
            int e = -errno;
            pthread_rwlock_unlock(&c->lock);
            return e;
        }
        for (uint64_t pg = from / ps; pg < to / ps; pg++)
            c->kept[pg / 8] &= (uint8_t)~(1u << (pg % 8));
    }
    pthread_rwlock_unlock(&c->lock);
    int64_t after = ls_cache_resident(c);
    if (after < 0)
        return after;
    return before > after ? before - after : 0; /* fills racing the punch may add pages */
}

/* ls_cache_refresh: the runs of pages to punch, punched together at the end
 * (one lock and one count for all of them). */
struct runs {
    uint64_t *r; /* (offset, length) pairs */
    uint32_t n, cap;
};

static int runs_add(struct runs *rs, uint64_t pg, uint64_t ps)
{
    if (rs->n && rs->r[2 * rs->n - 2] + rs->r[2 * rs->n - 1] == pg) {
        rs->r[2 * rs->n - 1] += ps;
        return 0;
    }
    if (rs->n == rs->cap) {
        uint32_t cap = rs->cap ? rs->cap * 2 : 256;
        uint64_t *p = realloc(rs->r, (size_t)cap * 16);
        if (!p)
            return -ENOMEM;
        rs->r = p;
        rs->cap = cap;
    }
    rs->r[2 * rs->n] = pg;
    rs->r[2 * rs->n + 1] = ps;
    rs->n++;
    return 0;
}

int64_t ls_cache_refresh(struct ls_cache *c, uint64_t off, const uint8_t *src, uint64_t len, int punch)
{
    const uint64_t ps = ls_page_size();
    if (off > c->len || len > c->len - off)
        return -EINVAL;
    int64_t differ = 0, rc = 0;
    const uint64_t end = off + len;
    struct runs rs = {0};
    for (uint64_t pos = off / ps * ps; pos < end && !rc;) {
        unsigned char vec[512];
        uint64_t n = (end - pos + ps - 1) / ps < sizeof vec ? (end - pos + ps - 1) / ps : sizeof vec;
        if (mincore(c->view + pos, n * ps, vec) < 0) {
            rc = -errno;
            break;
        }
        for (uint64_t i = 0, j; i < n && !rc; i = j) {
            uint64_t pg = pos + i * ps;
            j = i + 1;
            if (vec[i] & 1) { /* resident: compare (the view reads it without a fill) */
                uint64_t a = pg < off ? off : pg, b = pg + ps > end ? end : pg + ps;
                if (memcmp(c->view + a, src + (a - off), b - a)) {
                    differ += (int64_t)ps;
                    if (punch)
                        rc = runs_add(&rs, pg, ps);
                }
                continue;
            }
            /* Not resident: holes (nothing stale), or pages swapped out, which
             * cannot be compared without reading them in: taken as differing. */
            for (; j < n && !(vec[j] & 1); j++)
                ;
            uint64_t run_end = pos + j * ps;
            off_t d = lseek(c->fd, (off_t)pg, SEEK_DATA);
            if (d < 0 && errno != ENXIO) {
                rc = -errno;
                break;
            }
            for (uint64_t q = d < 0 ? run_end : (uint64_t)d / ps * ps; q < run_end && !rc; q += ps) {
                differ += (int64_t)ps;
                if (punch)
                    rc = runs_add(&rs, q, ps);
            }
        }
        pos += n * ps;
    }
    if (!rc && rs.n) {
        int64_t k = ls_cache_punch(c, rs.r, rs.n);
        if (k < 0)
            rc = k;
    }
    free(rs.r);
    return rc < 0 ? rc : differ;
}

/* ---- after fork ---- */

/* In a forked child: the parent's caches are not the child's. Close their
 * memfds (a child holding them would keep the memory of caches the parent has
 * freed) and the cache userfaultfd; the views were never inherited
 * (MADV_DONTFORK). The nodes are left as they are (the server forgets the
 * segments that point to them). */
static void cache_forget(void)
{
    for (struct ls_cache *c = caches; c; c = c->next)
        if (c->fd >= 0)
            close(c->fd);
    caches = NULL;
    if (cache_uffd >= 0)
        close(cache_uffd);
    cache_uffd = -1;
    atomic_store(&ls_ctr.caches_live, 0);
    forgot_in = getpid();
    pthread_mutex_init(&cache_lock, NULL);
}

static void atfork_prepare(void)
{
    pthread_mutex_lock(&cache_lock); /* the list is consistent at fork */
}

static void atfork_parent(void)
{
    pthread_mutex_unlock(&cache_lock);
}

static void reset_after_fork(void)
{
    if (forgot_in != getpid()) /* pthread_atfork's child handler did not run (a raw clone) */
        cache_forget();
}

__attribute__((constructor)) static void cache_register_fork_reset(void)
{
    pthread_atfork(atfork_prepare, atfork_parent, cache_forget);
    ls_on_fork_child(reset_after_fork);
}
