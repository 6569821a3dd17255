/* A probe for a worker-side page bank (see page_bank.py): how long a worker
 * takes to fill eight fresh 64 MiB blocks of a shared output, as a task of a
 * contiguous fill does today (each block a fresh private mapping, each page
 * faulted in and zeroed by the kernel), against the same fills served from a
 * bank: the pages of the previous block, zeroed again in user space and moved
 * into the faulting 2 MiB block with UFFDIO_MOVE (Linux 6.8+) by a handler
 * thread, then moved back into the bank after the fill.
 *
 *     cc -O2 -pthread benchmarks/_page_bank.c -o page_bank && ./page_bank bank|fresh
 *
 * Prints one line: the mode and the seconds for the eight fills. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef UFFD_FEATURE_MOVE
struct uffdio_move {
    uint64_t dst, src, len, mode;
    int64_t move;
};
#define UFFDIO_MOVE _IOWR(UFFDIO, 0x05, struct uffdio_move)
#define UFFD_FEATURE_MOVE (1 << 10)
#endif

#define BLOCK (64ul << 20) /* what one task fills */
#define CHUNK (2ul << 20)  /* what one fault takes from the bank */
#define TASKS 8

static int uffd;
static char *bank;
static _Atomic size_t bank_next; /* the bank's next full chunk */

static void die(const char *what)
{
    fprintf(stderr, "page_bank: %s: %s\n", what, strerror(errno));
    exit(1);
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static char *aligned_map(size_t n)
{
    char *p = mmap(NULL, n + CHUNK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        die("mmap");
    return (char *)(((uintptr_t)p + CHUNK - 1) & ~(CHUNK - 1));
}

static void reg(char *p, size_t n)
{
    struct uffdio_register r = {.range = {(uint64_t)(uintptr_t)p, n}, .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(uffd, UFFDIO_REGISTER, &r))
        die("UFFDIO_REGISTER");
}

static void *handler(void *arg)
{
    (void)arg;
    for (;;) {
        struct pollfd p = {uffd, POLLIN, 0};
        if (poll(&p, 1, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        struct uffd_msg m;
        ssize_t r = read(uffd, &m, sizeof m);
        if (r < 0 && (errno == EAGAIN || errno == EINTR))
            continue;
        if (r != sizeof m)
            die("read uffd");
        if (m.event != UFFD_EVENT_PAGEFAULT)
            continue;
        uint64_t at = m.arg.pagefault.address & ~(uint64_t)(CHUNK - 1);
        size_t off = bank_next;
        if (off + CHUNK > BLOCK) {
            fprintf(stderr, "page_bank: the bank ran dry\n");
            exit(1);
        }
        bank_next = off + CHUNK;
        memset(bank + off, 0, CHUNK); /* the previous task's data */
        struct uffdio_move mv = {.dst = at, .src = (uint64_t)(uintptr_t)(bank + off), .len = CHUNK};
        if (ioctl(uffd, UFFDIO_MOVE, &mv)) {
            if (errno != EEXIST)
                die("UFFDIO_MOVE into the block");
            /* part of the block was there already (a repeated fault): a failed
             * move wakes nobody, so wake the faulting thread; a page still
             * missing faults again and takes the next chunk */
            struct uffdio_range rg = {.start = at, .len = CHUNK};
            if (ioctl(uffd, UFFDIO_WAKE, &rg))
                die("UFFDIO_WAKE");
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int use_bank = argc > 1 && !strcmp(argv[1], "bank");
    if (use_bank) {
        uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
        if (uffd < 0)
            die("userfaultfd");
        struct uffdio_api api = {.api = UFFD_API, .features = UFFD_FEATURE_MOVE};
        if (ioctl(uffd, UFFDIO_API, &api))
            die("UFFDIO_API (UFFD_FEATURE_MOVE)");
        bank = aligned_map(BLOCK);
        if (madvise(bank, BLOCK, MADV_NOHUGEPAGE))
            die("madvise");
        memset(bank, 1, BLOCK); /* filled once, as by a first task */
        reg(bank, BLOCK);       /* UFFDIO_MOVE's destination must be registered */
        pthread_t th;
        if (pthread_create(&th, NULL, handler, NULL))
            die("pthread_create");
    }
    double t = now();
    for (int k = 0; k < TASKS; k++) {
        char *block = aligned_map(BLOCK);
        if (use_bank)
            reg(block, BLOCK);
        double *d = (double *)block;
        for (size_t i = 0; i < BLOCK / sizeof *d; i++)
            d[i] = k + 1.0;
        if (use_bank) { /* the block's pages go back into the bank */
            struct uffdio_move mv = {.dst = (uint64_t)(uintptr_t)bank, .src = (uint64_t)(uintptr_t)block, .len = BLOCK};
            if (ioctl(uffd, UFFDIO_MOVE, &mv))
                die("UFFDIO_MOVE into the bank");
            bank_next = 0;
        }
        if (munmap(block, BLOCK))
            die("munmap");
    }
    printf("%s %.4f\n", use_bank ? "bank" : "fresh", now() - t);
    return 0;
}
