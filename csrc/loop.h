/*
 * A small fd-callback event loop over epoll, in the manner of redis's ae.c or
 * libuv's core (much smaller): no timers, no thread of its own. Whichever
 * thread calls ls_loop_run_once runs the loop: the page server's
 * "lazyshare-pages" threads (csrc/server.c), one loop each, and the fault
 * handler's "lazyshare-fault" thread (csrc/client.c).
 *
 *   struct ls_loop L;            ls_loop_init(&L, spin_ns)
 *   struct ls_io io;             ls_io_init(&io, fd, on_ready, arg)
 *                                ls_loop_add(&L, &io, EPOLLIN)
 *   for (;;)                     ls_loop_run_once(&L, timeout_ms)
 *       -> on_ready(fd, events, arg) for each ready fd
 *
 * Registrations are intrusive: the caller owns each struct ls_io (embedded in
 * its connection, say) and keeps it alive while registered, so registering
 * allocates nothing and one fd may be registered in several loops (one ls_io
 * per loop). Level-triggered: a callback that leaves data unread is called
 * again on the next iteration. The events a callback receives are epoll's
 * (EPOLLIN, EPOLLOUT, EPOLLRDHUP, and EPOLLERR/EPOLLHUP, which are always
 * reported).
 *
 * During dispatch a callback may add, modify or remove any registration of its
 * loop, its own included, and free a removed ls_io at once: removing one whose
 * event is still due in the current batch drops that event, so no callback runs
 * for an fd after its removal. Remove before closing the fd (epoll forgets a
 * closed fd only once every duplicate of it is closed).
 *
 * Threads: ls_loop_run_once, ls_loop_mod and ls_loop_del only on the thread
 * running the loop (or while no thread runs it). ls_loop_add also from another
 * thread, for an fd the loop thread does not know yet (the page server's loop 0
 * hands accepted connections to the other loops this way): everything the
 * adding thread wrote to the ls_io and its arg before the call is visible to
 * the callback. A callback must not call ls_loop_run_once.
 *
 * Spinning: with spin_ns > 0, ls_loop_run_once polls (epoll_wait with a zero
 * timeout) for up to spin_ns after the last iteration that had events, before
 * it sleeps: the next request of a faulting reader follows within
 * microseconds, and a sleep/wake-up on an idle VM costs tens of them.
 * ls_loop_touch counts as such activity (a consumer with requests in flight
 * calls it to spin while it waits for their replies).
 *
 * For the consumer (csrc/client.c): one thread owning a userfaultfd, an eventfd
 * for commands and the owner connections registers each of them (a
 * userfaultfd opened O_NONBLOCK reports EPOLLIN when faults are queued; an
 * eventfd EPOLLIN when its counter is non-zero), calls ls_loop_run_once with
 * the timeout its deadlines need (returns 0 on timeout), and does its
 * per-iteration work after each call. After fork() the child shares the
 * parent's epoll instance: it must only ls_loop_close the loop it inherited
 * (ls_loop_mod/del there would change the parent's registrations), then
 * ls_loop_init a new one.
 *
 * Functions return 0 (or a count) or -errno, as the rest of the core does.
 */
#ifndef LAZYSHARE_LOOP_H
#define LAZYSHARE_LOOP_H

#include <stdint.h>
#include <sys/epoll.h>

#define LS_LOOP_BATCH 64 /* events taken per epoll_wait */

typedef void (*ls_io_fn)(int fd, uint32_t events, void *arg);

struct ls_loop;

/* One registration. Fields are the loop's; set them with ls_io_init. */
struct ls_io {
    int fd;
    uint32_t events;      /* as last added or modified */
    ls_io_fn fn;
    void *arg;
    struct ls_loop *loop; /* NULL while not registered */
};

struct ls_loop {
    int ep;                  /* the epoll fd, -1 if none */
    uint64_t spin_ns;
    uint64_t last_activity;  /* ns (CLOCK_MONOTONIC) */
    int nev, cur;            /* the batch being dispatched, and where */
    struct epoll_event evs[LS_LOOP_BATCH];
};

/* 0 or -errno (epoll_create1). On failure l->ep is -1 and ls_loop_close is a no-op. */
int ls_loop_init(struct ls_loop *l, uint64_t spin_ns);
/* Close the epoll fd. Registered fds stay open (they are the caller's); their
 * ls_io are simply forgotten. Also the way for a forked child to drop an
 * inherited loop. */
void ls_loop_close(struct ls_loop *l);

void ls_io_init(struct ls_io *io, int fd, ls_io_fn fn, void *arg);
/* Register io->fd for events (EPOLLIN, EPOLLOUT, ...). -EEXIST if io is
 * registered already; other -errno from epoll_ctl (io stays unregistered). */
int ls_loop_add(struct ls_loop *l, struct ls_io *io, uint32_t events);
/* Wait for other events instead. No syscall if they are the same. -ENOENT if
 * io is not registered. */
int ls_loop_mod(struct ls_io *io, uint32_t events);
/* Unregister io (a no-op if it is not registered): its callback is not called
 * again, not even for an event of the batch being dispatched. */
void ls_loop_del(struct ls_io *io);

/* Wait up to timeout_ms (-1: no limit, 0: do not wait) for events, after
 * spinning if there was activity within spin_ns, and dispatch them. The
 * number of events dispatched (0: timed out or interrupted by a signal), or
 * -errno if epoll_wait failed otherwise. */
int ls_loop_run_once(struct ls_loop *l, int timeout_ms);
/* Count now as activity: the next ls_loop_run_once spins first. */
void ls_loop_touch(struct ls_loop *l);

#endif
