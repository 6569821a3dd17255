/*
 * lazyshare native core, shared by both sides: the userfaultfd capability
 * probe and open, ls_uffd_fill (UFFDIO_COPY/ZEROPAGE through any
 * userfaultfd), counters and stats, the hash table, the after-fork registry,
 * and small helpers (clock, eventfds, signals, ls_fatal). No thread of its
 * own: called from Python's threads and from the native ones ("lazyshare-pages",
 * "lazyshare-fault"); nothing here keeps state besides the counters (atomics)
 * and the after-fork registry (its own lock).
 */
#include "internal.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif
#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

struct ls_counters ls_ctr;

/* Open a userfaultfd at one rung; -errno if this process may not. */
static int uffd_open_devnode(void)
{
    int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
    if (dev < 0)
        return -errno;
    int fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
    int e = errno;
    close(dev);
    return fd < 0 ? -e : fd;
}

static int uffd_open_syscall(int flags)
{
#ifdef SYS_userfaultfd
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | flags);
    return fd < 0 ? -errno : fd;
#else
    (void)flags;
    return -ENOSYS;
#endif
}

static int uffd_handshake(int fd)
{
    struct uffdio_api api = {.api = UFFD_API, .features = 0};
    if (ioctl(fd, UFFDIO_API, &api) < 0)
        return -errno;
    if (!(api.ioctls & (1ULL << _UFFDIO_REGISTER)))
        return -EOPNOTSUPP;
    return 0;
}

/* Shared by ls_probe and the handler: a ready userfaultfd at `mode`. */
int ls_uffd_open(int mode)
{
    int fd;
    if (mode == LS_MODE_UFFD) {
        fd = uffd_open_devnode();
        if (fd < 0)
            fd = uffd_open_syscall(0);
    } else if (mode == LS_MODE_UFFD_USER) {
        fd = uffd_open_syscall(UFFD_USER_MODE_ONLY);
    } else {
        return -EINVAL;
    }
    if (fd < 0)
        return fd;
    int rc = uffd_handshake(fd);
    if (rc < 0) {
        close(fd);
        return rc;
    }
    return fd;
}

int ls_probe(struct ls_probe *out)
{
    int fd;
    memset(out, 0, sizeof(*out));
    out->mode = LS_MODE_EAGER;

    fd = uffd_open_devnode();
    if (fd >= 0) {
        out->err_devnode = -uffd_handshake(fd);
        close(fd);
    } else {
        out->err_devnode = -fd;
    }
    fd = uffd_open_syscall(0);
    if (fd >= 0) {
        out->err_syscall = -uffd_handshake(fd);
        close(fd);
    } else {
        out->err_syscall = -fd;
    }
    fd = uffd_open_syscall(UFFD_USER_MODE_ONLY);
    if (fd >= 0) {
        out->err_usermode = -uffd_handshake(fd);
        close(fd);
    } else {
        out->err_usermode = -fd;
    }
    if (!out->err_devnode || !out->err_syscall)
        out->mode = LS_MODE_UFFD;
    else if (!out->err_usermode)
        out->mode = LS_MODE_UFFD_USER;
    return 0;
}

void ls_get_stats(struct ls_stats *s)
{
#define LD(f) atomic_load_explicit(&ls_ctr.f, memory_order_relaxed)
    s->faults = LD(faults);
    s->requests = LD(requests);
    s->installs = LD(installs);
    s->bytes_fetched = LD(bytes_fetched);
    s->bytes_zero = LD(bytes_zero);
    s->regions_attached = LD(regions_attached);
    s->eexist = LD(eexist);
    s->bytes_dropped = LD(bytes_dropped);
    for (int i = 0; i < LS_HIST_BUCKETS; i++)
        s->hist[i] = LD(hist[i]);
    s->requests_served = LD(requests_served);
    s->bytes_served = LD(bytes_served);
    s->errors_served = LD(errors_served);
    s->segments_exported = LD(segments_exported);
    s->cache_bytes_filled = LD(cache_bytes_filled);
    s->snap_bytes_preserved = LD(snap_bytes_preserved);
    s->snap_faults = LD(snap_faults);
    s->caches_live = LD(caches_live);
    s->cache_attaches = LD(cache_attaches);
    s->cache_fallbacks = LD(cache_fallbacks);
#undef LD
}

uint64_t ls_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

void ls_hist_add(uint64_t ns)
{
    uint64_t us = ns / 1000;
    int b = 0;
    while (us > 1 && b < LS_HIST_BUCKETS - 1) {
        us >>= 1;
        b++;
    }
    CTR_ADD(hist[b], 1);
}

size_t ls_page_size(void)
{
    static size_t ps;
    if (!ps)
        ps = (size_t)sysconf(_SC_PAGESIZE);
    return ps;
}

int ls_pid_alive(int pid)
{
    if (pid <= 0)
        return 1;
    return kill(pid, 0) == 0 || errno != ESRCH;
}

void ls_block_signals(void)
{
    /* Python handles signals on its main thread; native threads take none. */
    sigset_t all;
    sigfillset(&all);
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGSEGV);
    sigdelset(&all, SIGFPE);
    sigdelset(&all, SIGILL);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
}

int ls_eventfd_signal(int fd)
{
    uint64_t one = 1;
    return write(fd, &one, sizeof one) == sizeof one ? 0 : -errno;
}

void ls_eventfd_drain(int fd)
{
    uint64_t v;
    while (read(fd, &v, sizeof v) == sizeof v)
        ;
}

void ls_fatal(const char *fmt, ...)
{
    char buf[768];
    int n = snprintf(buf, sizeof buf, "lazyshare: fatal (pid %d): ", (int)getpid());
    va_list ap;
    va_start(ap, fmt);
    int m = vsnprintf(buf + n, sizeof buf - (size_t)n - 2, fmt, ap);
    va_end(ap);
    size_t len = (size_t)n + (size_t)(m < 0 ? 0 : m);
    if (len > sizeof buf - 2)
        len = sizeof buf - 2;
    buf[len++] = '\n';
    ssize_t w = write(2, buf, len);
    (void)w;
    /* SIGBUS, as for a mapped file truncated under a reader: the memory the
     * process was promised cannot be provided. The installed handler (Python's
     * faulthandler dumps every thread's stack) gets the first go; if the
     * process survives it, the default action ends it. */
    sigset_t s;
    sigemptyset(&s);
    sigaddset(&s, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &s, NULL);
    /* To this thread: a process-wide signal could be picked up by a stopped or
     * traced thread (the very one that is wedged) and never acted upon. */
    pid_t tid = (pid_t)syscall(SYS_gettid);
    syscall(SYS_tgkill, getpid(), tid, SIGBUS);
    sleep(2);
    signal(SIGBUS, SIG_DFL);
    syscall(SYS_tgkill, getpid(), tid, SIGBUS);
    for (;;)
        pause();
}

/* ---- after fork: each side registers its own reset ---- */

#define MAX_FORK_HOOKS 8
static void (*fork_hooks[MAX_FORK_HOOKS])(void);
static _Atomic int nfork_hooks; /* slots below it are set (release/acquire) */
static pthread_mutex_t fork_hooks_lock = PTHREAD_MUTEX_INITIALIZER;

int ls_on_fork_child(void (*fn)(void))
{
    int rc = 0;
    pthread_mutex_lock(&fork_hooks_lock);
    int n = atomic_load_explicit(&nfork_hooks, memory_order_relaxed);
    for (int i = 0; i < n; i++)
        if (fork_hooks[i] == fn)
            goto out;
    if (n == MAX_FORK_HOOKS) {
        rc = -ENOSPC;
        goto out;
    }
    fork_hooks[n] = fn;
    atomic_store_explicit(&nfork_hooks, n + 1, memory_order_release);
out:
    pthread_mutex_unlock(&fork_hooks_lock);
    return rc;
}

void ls_reset_after_fork(void)
{
    /* The child has none of the parent's threads: forget their state without
     * touching it (locks may be held, sockets belong to the parent). No lock
     * taken here: a parent's thread may have held fork_hooks_lock at fork. */
    int n = atomic_load_explicit(&nfork_hooks, memory_order_acquire);
    for (int i = 0; i < n; i++)
        fork_hooks[i]();
}

int ls_uffd_fill(int fd, uint64_t dst, const uint8_t *src, uint64_t len, int wp, int dontwake, uint64_t *eexist)
{
    const uint64_t ps = ls_page_size();
    uint64_t done = 0;
    int again = 0;
    while (done < len) {
        int64_t got;
        int rc;
        if (src) {
            struct uffdio_copy cp = {
                .dst = dst + done,
                .src = (uintptr_t)(src + done),
                .len = len - done,
                .mode = (wp ? UFFDIO_COPY_MODE_WP : 0) | (dontwake ? UFFDIO_COPY_MODE_DONTWAKE : 0),
            };
            rc = ioctl(fd, UFFDIO_COPY, &cp);
            got = cp.copy;
        } else {
            struct uffdio_zeropage z = {
                .range = {.start = dst + done, .len = len - done},
                .mode = dontwake ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0,
            };
            rc = ioctl(fd, UFFDIO_ZEROPAGE, &z);
            got = z.zeropage;
        }
        if (rc == 0)
            return 0;
        int e = errno;
        if (got > 0) { /* partial: that part is installed (and woken) */
            done += (uint64_t)got;
            continue;
        }
        if (e == EEXIST) { /* that page is already there: wake its waiters, skip it */
            struct uffdio_range rg = {.start = dst + done, .len = ps};
            ioctl(fd, UFFDIO_WAKE, &rg);
            if (eexist)
                (*eexist)++;
            done += ps;
            continue;
        }
        if (e == EAGAIN && ++again < 1000) /* the layout is changing: retry */
            continue;
        return -e; /* ENOENT/ESRCH/EFAULT: the mapping or the process is going away */
    }
    return 0;
}

/* ---- the hash table (see internal.h) ---- */

static size_t htab_slot(uint64_t key, unsigned bits)
{
    return (size_t)((key * 0x9E3779B97F4A7C15ull) >> (64 - bits)); /* Fibonacci hashing */
}

static void htab_grow(struct ls_htab *t, unsigned bits)
{
    struct ls_hnode **nb = calloc((size_t)1 << bits, sizeof *nb);
    if (!nb)
        return; /* keep the current buckets */
    if (t->b)
        for (size_t i = 0; i < (size_t)1 << t->bits; i++)
            for (struct ls_hnode *e = t->b[i], *next; e; e = next) {
                next = e->next;
                size_t j = htab_slot(e->key, bits);
                e->next = nb[j];
                nb[j] = e;
            }
    free(t->b);
    t->b = nb;
    t->bits = bits;
}

int ls_htab_insert(struct ls_htab *t, struct ls_hnode *e)
{
    if (!t->b)
        htab_grow(t, 6);
    if (!t->b)
        return -ENOMEM;
    if (t->n >= (size_t)1 << t->bits && t->bits < 40)
        htab_grow(t, t->bits + 1);
    size_t i = htab_slot(e->key, t->bits);
    e->next = t->b[i];
    t->b[i] = e;
    t->n++;
    return 0;
}

struct ls_hnode *ls_htab_find(const struct ls_htab *t, uint64_t key)
{
    if (!t->b)
        return NULL;
    struct ls_hnode *e = t->b[htab_slot(key, t->bits)];
    while (e && e->key != key)
        e = e->next;
    return e;
}

struct ls_hnode *ls_htab_next(const struct ls_hnode *e)
{
    struct ls_hnode *n = e->next;
    while (n && n->key != e->key)
        n = n->next;
    return n;
}

void ls_htab_remove(struct ls_htab *t, struct ls_hnode *e)
{
    if (!t->b)
        return;
    struct ls_hnode **pp = &t->b[htab_slot(e->key, t->bits)];
    while (*pp && *pp != e)
        pp = &(*pp)->next;
    if (*pp) {
        *pp = e->next;
        t->n--;
    }
}

void ls_htab_each(struct ls_htab *t, void (*fn)(struct ls_hnode *, void *), void *arg)
{
    if (!t->b)
        return;
    for (size_t i = 0; i < (size_t)1 << t->bits; i++)
        for (struct ls_hnode *e = t->b[i], *next; e; e = next) {
            next = e->next;
            fn(e, arg);
        }
}
