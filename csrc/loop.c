/*
 * The fd-callback event loop (see loop.h): epoll, level-triggered, optional
 * spinning. Runs on whichever thread calls ls_loop_run_once (the page
 * server's "lazyshare-pages" threads, the "lazyshare-fault" thread). Depends on nothing else in the core,
 * so that it can be built and tested alone.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "loop.h"

#include <errno.h>
#include <stddef.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

int ls_loop_init(struct ls_loop *l, uint64_t spin_ns)
{
    l->spin_ns = spin_ns;
    l->last_activity = 0;
    l->nev = l->cur = 0;
    l->ep = epoll_create1(EPOLL_CLOEXEC);
    return l->ep < 0 ? -errno : 0;
}

void ls_loop_close(struct ls_loop *l)
{
    if (l->ep >= 0)
        close(l->ep);
    l->ep = -1;
    l->nev = l->cur = 0;
}

void ls_io_init(struct ls_io *io, int fd, ls_io_fn fn, void *arg)
{
    *io = (struct ls_io){.fd = fd, .fn = fn, .arg = arg};
}

int ls_loop_add(struct ls_loop *l, struct ls_io *io, uint32_t events)
{
    if (io->loop)
        return -EEXIST;
    io->events = events;
    io->loop = l; /* before the fd can be reported: the loop thread may see it at once */
    struct epoll_event ev = {.events = events, .data.ptr = io};
    if (epoll_ctl(l->ep, EPOLL_CTL_ADD, io->fd, &ev) < 0) {
        int e = errno;
        io->loop = NULL;
        return -e;
    }
    return 0;
}

int ls_loop_mod(struct ls_io *io, uint32_t events)
{
    if (!io->loop)
        return -ENOENT;
    if (io->events == events)
        return 0;
    struct epoll_event ev = {.events = events, .data.ptr = io};
    if (epoll_ctl(io->loop->ep, EPOLL_CTL_MOD, io->fd, &ev) < 0)
        return -errno;
    io->events = events;
    return 0;
}

void ls_loop_del(struct ls_io *io)
{
    struct ls_loop *l = io->loop;
    if (!l)
        return;
    /* ENOENT/EBADF (the fd already closed) leave nothing registered either. */
    epoll_ctl(l->ep, EPOLL_CTL_DEL, io->fd, NULL);
    /* epoll reports an fd at most once per batch: drop its event if still due. */
    for (int i = l->cur + 1; i < l->nev; i++)
        if (l->evs[i].data.ptr == io) {
            l->evs[i].data.ptr = NULL;
            break;
        }
    io->loop = NULL;
}

void ls_loop_touch(struct ls_loop *l)
{
    l->last_activity = now_ns();
}

int ls_loop_run_once(struct ls_loop *l, int timeout_ms)
{
    int n = 0;
    if (l->spin_ns && now_ns() - l->last_activity < l->spin_ns)
        while ((n = epoll_wait(l->ep, l->evs, LS_LOOP_BATCH, 0)) == 0 && now_ns() - l->last_activity < l->spin_ns)
            ;
    if (n <= 0)
        n = epoll_wait(l->ep, l->evs, LS_LOOP_BATCH, timeout_ms);
    if (n < 0)
        return errno == EINTR ? 0 : -errno;
    if (!n)
        return 0;
    l->last_activity = now_ns();
    l->nev = n;
    for (l->cur = 0; l->cur < l->nev; l->cur++) {
        struct ls_io *io = l->evs[l->cur].data.ptr;
        if (io) /* NULL: removed by an earlier callback of this batch */
            io->fn(io->fd, l->evs[l->cur].events, io->arg);
    }
    l->nev = l->cur = 0;
    return n;
}
