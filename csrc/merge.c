/*
 * lazyshare native core: shared output arrays (lazyshare/output.py).
 *
 *   consumer (worker), after a task:   ls_written_pages: the pages of a lazy
 *                                       region this process wrote (the candidates
 *                                       it sends back with the task's result);
 *                                       those whose twin is zeros and that hold
 *                                       few non-zero words, as a mask and those
 *                                       words (struct ls_sparse)
 *   owner (parent), per result:        ls_merge_apply / ls_merge_sparse: the
 *                                       bytes of those pages that differ from the
 *                                       call's twin, applied to the parent's
 *                                       array; conflicts found
 *
 * The twin of a page is its bytes before the first merge into it (of the calls
 * running on the array), kept in a sparse anonymous mapping while they run. Byte-level multiple-writer merge
 * (twin and diff): a byte a task changed relative to the twin is applied,
 * unless an earlier task of the call changed it to another value (the array
 * differs from both), which is a conflict.
 *
 * Called from Python with the GIL released; no Python API.
 */
#include "internal.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef PAGE_IS_FILE
#define PAGE_IS_FILE (1 << 4)
#endif

static int page_is_zero(const uint8_t *p, uint64_t ps)
{
    const uint64_t *w = (const uint64_t *)p;
    uint64_t acc = 0;
    for (uint64_t i = 0; i < ps / 8; i++)
        acc |= w[i];
    return !acc;
}

/* Append [s, e) to the n runs of out (merged with the last if contiguous). */
static int emit(uint64_t *out, uint32_t *n, uint32_t max, uint64_t s, uint64_t e)
{
    if (e <= s)
        return 0;
    if (*n && out[2 * *n - 1] == s) {
        out[2 * *n - 1] = e;
        return 0;
    }
    if (*n == max)
        return -E2BIG;
    out[2 * *n] = s;
    out[2 * *n + 1] = e;
    (*n)++;
    return 0;
}

/* A page whose twin is zeros, p (ps bytes), into sp if it holds at most a
 * quarter of non-zero words (and sp has room): 0 if it holds none, 1 if
 * stored sparse, 2 if it goes whole. The words are written as they are read
 * (a store the next non-zero word overwrites when this one is zero), so one
 * pass reads the page; a page dense from its start costs its first three
 * blocks of 64 words. */
static int sparse_page(const uint8_t *p, uint64_t ps, struct ls_sparse *sp)
{
    const uint64_t nw = ps / 8, limit = nw / 4;
    if (!sp || sp->npages == sp->max_pages || sp->max_words - sp->nwords < nw)
        return page_is_zero(p, ps) ? 0 : 2;
    const uint64_t *w = (const uint64_t *)p;
    uint64_t *dst = sp->words + sp->nwords, *mask = sp->masks + sp->npages * (nw / 64);
    uint64_t k = 0;
    for (uint64_t i = 0; i < nw; i += 64) {
        uint64_t m = 0;
        for (unsigned j = 0; j < 64; j++) {
            uint64_t x = w[i + j], nz = x != 0;
            dst[k] = x;
            m |= nz << j;
            k += nz;
        }
        mask[i / 64] = m;
        if (k > limit)
            return 2;
    }
    if (!k)
        return 0;
    sp->pages[sp->npages] = (uintptr_t)p;
    sp->counts[sp->npages] = (uint32_t)k;
    sp->npages++;
    sp->nwords += k;
    return 1;
}

/* [s, e), written, less the pages lying in zeros (sorted address pairs) that
 * hold only zeros (their twin is zeros: they changed nothing) or go in sp. */
static int emit_written(uint64_t *out, uint32_t *n, uint32_t max, uint64_t s, uint64_t e, const uint64_t *zeros,
                        uint32_t nzeros, uint64_t ps, struct ls_sparse *sp)
{
    for (uint32_t z = 0; z < nzeros && s < e; z++) {
        uint64_t z0 = zeros[2 * z], z1 = zeros[2 * z + 1];
        if (z1 <= s || z0 >= e)
            continue;
        if (z0 > s) {
            int rc = emit(out, n, max, s, z0);
            if (rc)
                return rc;
            s = z0;
        }
        uint64_t stop = z1 < e ? z1 : e;
        for (; s < stop; s += ps)
            if (sparse_page((const uint8_t *)(uintptr_t)s, ps, sp) == 2) {
                int rc = emit(out, n, max, s, s + ps);
                if (rc)
                    return rc;
            }
    }
    return emit(out, n, max, s, e);
}

/* Call fn(arg, start, end) for each run of pages of [pos, end) that PAGEMAP_SCAN
 * reports with these categories, in order, until fn returns non-zero: 0 (every
 * run seen), fn's value, -ENOTTY (no PAGEMAP_SCAN), -errno. */
static int scan_pages(uint64_t pos, uint64_t end, uint64_t inverted, uint64_t mask, uint64_t anyof,
                      int (*fn)(void *, uint64_t, uint64_t), void *arg)
{
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    struct ls_page_region v[64];
    int rc = 0;
    while (pos < end && !rc) {
        struct ls_pm_scan_arg a = {
            .size = sizeof a,
            .start = pos,
            .end = end,
            .vec = (uintptr_t)v,
            .vec_len = 64,
            .category_inverted = inverted,
            .category_mask = mask,
            .category_anyof_mask = anyof,
            .return_mask = mask | anyof,
        };
        long k = ioctl(fd, PAGEMAP_SCAN, &a);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0) {
            rc = errno == EINVAL ? -ENOTTY : -errno;
            break;
        }
        for (long i = 0; i < k && !rc; i++)
            rc = fn(arg, v[i].start, v[i].end);
        /* walk_end is unreliable past a full vector: go on from the last region */
        if (k < 64)
            break;
        pos = v[k - 1].end;
    }
    close(fd);
    return rc;
}

struct written {
    uint64_t *out;
    uint32_t n, max, nzeros;
    const uint64_t *zeros;
    struct ls_sparse *sp;
};

static int on_written(void *arg, uint64_t s, uint64_t e)
{
    struct written *w = arg;
    return emit_written(w->out, &w->n, w->max, s, e, w->zeros, w->nzeros, ls_page_size(), w->sp);
}

int64_t ls_written_pages(uint64_t addr, uint64_t len, const uint64_t *zeros, uint32_t nzeros, uint64_t *out,
                         uint32_t max, struct ls_sparse *sparse)
{
    const uint64_t ps = ls_page_size();
    if (addr % ps || len % ps || !max || ps % 512)
        return -EINVAL;
    if (sparse)
        sparse->npages = sparse->nwords = 0;
    for (uint32_t z = 0; z < nzeros; z++)
        if (zeros[2 * z] % ps || zeros[2 * z + 1] % ps || (z && zeros[2 * z] < zeros[2 * z - 1]))
            return -EINVAL;
    /* Written: an anonymous page (a copy-on-write of a cached file page, or a
     * page filled by UFFDIO_COPY) or one swapped out; never the zero page. */
    struct written w = {.out = out, .max = max, .zeros = zeros, .nzeros = nzeros, .sp = sparse};
    int rc = scan_pages(addr, addr + len, PAGE_IS_FILE | PAGE_IS_PFNZERO, PAGE_IS_FILE | PAGE_IS_PFNZERO,
                        PAGE_IS_PRESENT | PAGE_IS_SWAPPED, on_written, &w);
    return rc ? rc : (int64_t)w.n;
}

void ls_sparse_clear(const uint64_t *pages, const uint64_t *masks, uint64_t npages)
{
    const uint64_t per = ls_page_size() / 512;
    for (uint64_t i = 0; i < npages; i++) {
        uint64_t *w = (uint64_t *)(uintptr_t)pages[i];
        for (uint64_t b = 0; b < per; b++)
            for (uint64_t x = masks[i * per + b]; x; x &= x - 1)
                w[b * 64 + (uint64_t)__builtin_ctzll(x)] = 0;
    }
}

#define HUGE (2ULL << 20)

struct ls_merge {
    uint64_t len;   /* segment bytes */
    uint64_t npages;
    uint8_t *twin;  /* sparse, npages * ps */
    uint8_t *have;  /* bit per page: twin made */
    uint8_t *zero;  /* bit per page: its twin is zeros (never written when exported): no copy kept */
    uint8_t *pop;   /* bit per page whose twin is zeros: faulted in by populate_zeros already */
};

/* The twin of a page whose twin is zeros. */
static const uint8_t zero_page[65536] __attribute__((aligned(4096)));

struct ls_merge *ls_merge_new(uint64_t seglen)
{
    const uint64_t ps = ls_page_size();
    if (!seglen || seglen > UINT64_MAX - ps)
        return NULL;
    struct ls_merge *m = calloc(1, sizeof *m);
    if (!m)
        return NULL;
    m->len = seglen;
    m->npages = (seglen + ps - 1) / ps;
    m->have = calloc((size_t)(m->npages + 7) / 8, 1);
    m->zero = calloc((size_t)(m->npages + 7) / 8, 1);
    m->pop = calloc((size_t)(m->npages + 7) / 8, 1);
    m->twin = mmap(NULL, m->npages * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (!m->have || !m->zero || !m->pop || m->twin == MAP_FAILED) {
        free(m->have);
        free(m->zero);
        free(m->pop);
        if (m->twin != MAP_FAILED)
            munmap(m->twin, m->npages * ps);
        free(m);
        return NULL;
    }
    return m;
}

void ls_merge_free(struct ls_merge *m)
{
    if (!m)
        return;
    munmap(m->twin, m->npages * ls_page_size());
    free(m->have);
    free(m->zero);
    free(m->pop);
    free(m);
}

static inline int bit(const uint8_t *b, uint64_t i) { return (b[i / 8] >> (i % 8)) & 1; }
static inline void set_bit(uint8_t *b, uint64_t i) { b[i / 8] |= (uint8_t)(1u << (i % 8)); }

struct zeros {
    struct ls_merge *m;
    uint64_t segaddr, *out;
    uint32_t n, max;
};

/* A run of never-written pages [s, e) (addresses): the segment's pages lying
 * wholly in it (the last one may be partial) get zeros for twin, unless they
 * have a twin of bytes already (a merge, then madvise); emitted as offsets. */
static int on_zeros(void *arg, uint64_t s, uint64_t e)
{
    struct zeros *z = arg;
    struct ls_merge *m = z->m;
    const uint64_t ps = ls_page_size();
    uint64_t a0 = s > z->segaddr ? s - z->segaddr : 0;
    uint64_t a1 = e - z->segaddr >= m->len ? m->len : e - z->segaddr;
    uint64_t p0 = (a0 + ps - 1) / ps, p1 = a1 == m->len ? m->npages : a1 / ps;
    for (uint64_t p = p0; p < p1;) {
        if (bit(m->have, p) && !bit(m->zero, p)) {
            p++;
            continue;
        }
        uint64_t q = p;
        for (; q < p1 && (!bit(m->have, q) || bit(m->zero, q)); q++) {
            set_bit(m->have, q);
            set_bit(m->zero, q);
        }
        if (emit(z->out, &z->n, z->max, p * ps, q * ps))
            return 1; /* full: the pages left are fetched (their twin is zeros: as exact) */
        p = q;
    }
    return 0;
}

/* Edge page p, not emitted by the scan, whose bytes are zeros (zeros): its
 * twin may be zeros if it has none yet, or zeros already. */
static int edge_is_zeros(struct ls_merge *m, uint64_t p, int zeros)
{
    return zeros && (!bit(m->have, p) || bit(m->zero, p));
}

int64_t ls_merge_zeros(struct ls_merge *m, uint64_t segaddr, uint64_t *out, uint32_t max)
{
    const uint64_t ps = ls_page_size();
    if (ps > sizeof zero_page || !max)
        return -EINVAL;
    /* Never written: neither present nor swapped, or mapping the zero page. */
    struct zeros z = {.m = m, .segaddr = segaddr, .out = out, .max = max};
    int rc = scan_pages(segaddr / ps * ps, (segaddr + m->len + ps - 1) / ps * ps, PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                        PAGE_IS_SWAPPED, PAGE_IS_PRESENT | PAGE_IS_PFNZERO, on_zeros, &z);
    if (rc < 0)
        return rc;
    /* The segment's first and last pages share memory pages with what lies
     * beside the array (malloc's header before a big array), written, so
     * never "never written": their twin is zeros too if the array's bytes
     * there are zeros (two pages read). Then a task writing all of the
     * array writes only pages whose twin is zeros. */
    const uint8_t *seg = (const uint8_t *)(uintptr_t)segaddr;
    uint64_t last = m->npages - 1, tail = m->len - last * ps;
    int first_ok = !(z.n && out[0] == 0) && !memcmp(seg, zero_page, last ? ps : tail);
    if (edge_is_zeros(m, 0, first_ok) && (z.n < max || (z.n && out[0] == ps))) {
        if (z.n && out[0] == ps) {
            out[0] = 0;
        } else {
            memmove(out + 2, out, 2 * (size_t)z.n * sizeof *out);
            out[0] = 0;
            out[1] = ps;
            z.n++;
        }
        set_bit(m->have, 0);
        set_bit(m->zero, 0);
    }
    int last_ok = !(z.n && out[2 * z.n - 1] > last * ps) && !memcmp(seg + last * ps, zero_page, tail);
    if (last && edge_is_zeros(m, last, last_ok) &&
        !emit(out, &z.n, max, last * ps, (last + 1) * ps)) {
        set_bit(m->have, last);
        set_bit(m->zero, last);
    }
    return (int64_t)z.n;
}

/* Make the twins of pages [p0, p1) that have none: runs of missing ones, read
 * from the snapshot of segment id (if it has one open) or from base. */
static void make_twins(struct ls_merge *m, const uint8_t *base, uint64_t p0, uint64_t p1)
{
    const uint64_t ps = ls_page_size();
    for (uint64_t p = p0; p < p1;) {
        if ((m->have[p / 8] >> (p % 8)) & 1) {
            p++;
            continue;
        }
        uint64_t q = p + 1;
        while (q < p1 && !((m->have[q / 8] >> (q % 8)) & 1))
            q++;
        uint64_t off = p * ps, n = (q * ps < m->len ? q * ps : m->len) - off;
        /* Whole 2 MiB blocks of twins at once: huge pages where the kernel
         * offers them (a failed madvise leaves small pages: no harm). */
        uint64_t h0 = (off + HUGE - 1) / HUGE * HUGE, h1 = (off + n) / HUGE * HUGE;
        if (h1 > h0)
            madvise(m->twin + h0, h1 - h0, MADV_HUGEPAGE);
        memcpy(m->twin + off, base + off, n);
        for (uint64_t k = p; k < q; k++)
            m->have[k / 8] |= (uint8_t)(1u << (k % 8));
        p = q;
    }
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

/* The pages of [p0, p1) whose twin is zeros were never written when the call
 * exported them: likely still absent. Fault them in writable in one call
 * before the merge writes them (a first read would map the zero page, and the
 * write then replace it: two faults and a TLB flush per page), once. Failure
 * (an older kernel) leaves the faults to the writes. */
static void populate_zeros(struct ls_merge *m, uint8_t *base, uint64_t p0, uint64_t p1)
{
    const uint64_t ps = ls_page_size();
    for (uint64_t p = p0; p < p1;) {
        if (!bit(m->zero, p) || bit(m->pop, p)) {
            p++;
            continue;
        }
        uint64_t q = p;
        for (; q < p1 && bit(m->zero, q) && !bit(m->pop, q); q++)
            set_bit(m->pop, q);
        uintptr_t a = (uintptr_t)(base + p * ps) / ps * ps;
        uintptr_t b = ((uintptr_t)(base + (q * ps < m->len ? q * ps : m->len)) + ps - 1) / ps * ps;
        madvise((void *)a, b - a, MADV_POPULATE_WRITE);
        p = q;
    }
}

static void note_conflict(uint64_t at, uint64_t n, uint64_t *conflict)
{
    if (!conflict[0] || at < conflict[1])
        conflict[1] = at;
    if (at + n > conflict[2])
        conflict[2] = at + n;
    conflict[0] += n;
}

/* One item of u bytes (the array's element, or a byte): s the task's, t the
 * twin's, d the array's. An item the task changed is taken whole, unless an
 * earlier writer changed it to another value: a conflict (taken if last). */
static uint64_t merge_item(uint8_t *d, const uint8_t *t, const uint8_t *s, unsigned u, int last, uint64_t at,
                           uint64_t *conflict)
{
    if (!memcmp(s, t, u) || !memcmp(s, d, u))
        return 0; /* unchanged by the task, or already these bytes */
    if (memcmp(d, t, u)) {
        /* The task may have read this page while a merge was writing it: an
         * item made of bytes of the two values it could see is no write of its own. */
        unsigned b = 0;
        while (b < u && (s[b] == t[b] || s[b] == d[b]))
            b++;
        if (b == u)
            return 0;
        note_conflict(at, u, conflict);
        if (!last)
            return 0;
    }
    uint64_t changed = 0;
    for (unsigned b = 0; b < u; b++)
        changed += d[b] != s[b];
    memcpy(d, s, u);
    return changed;
}

/* How many of the 8 bytes of x are not zero (no __builtin_popcount: it is a
 * libgcc call without -mpopcnt). */
static inline uint64_t nonzero_bytes(uint64_t x)
{
    x |= x >> 4;
    x |= x >> 2;
    x |= x >> 1;
    return ((x & 0x0101010101010101ULL) * 0x0101010101010101ULL) >> 56;
}

static inline uint64_t popcount64(uint64_t x)
{
    x -= (x >> 1) & 0x5555555555555555ULL;
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
    return (x * 0x0101010101010101ULL) >> 56;
}

/* Merge src over dst (n bytes, one page at most, segment offset at) against
 * twin t, a word at a time: a word the task left as the twin is skipped, one
 * nobody else changed is taken whole; only words both changed go item by
 * item (u bytes, dividing 8; pieces start on an item boundary). */
static uint64_t merge_piece(uint8_t *dst, const uint8_t *t, const uint8_t *src, uint64_t n, unsigned u,
                            int last, uint64_t at, uint64_t *conflict)
{
    if (!memcmp(src, t, n))
        return 0; /* the task changed nothing here */
    uint64_t changed = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t ws, wt, wd;
        memcpy(&ws, src + i, 8);
        memcpy(&wt, t + i, 8);
        if (ws == wt)
            continue;
        memcpy(&wd, dst + i, 8);
        if (wd == wt) { /* nobody else changed this word: the task's, whole */
            changed += nonzero_bytes(ws ^ wt);
            memcpy(dst + i, &ws, 8);
            continue;
        }
        if (wd == ws)
            continue; /* already these bytes */
        for (unsigned b = 0; b < 8; b += u)
            changed += merge_item(dst + i + b, t + i + b, src + i + b, u, last, at + i + b, conflict);
    }
    for (; i < n; i += u) {
        unsigned k = n - i < u ? (unsigned)(n - i) : u;
        changed += merge_item(dst + i, t + i, src + i, k, last, at + i, conflict);
    }
    return changed;
}

/* One word of a page whose twin is zeros: ws the task's, at d in
 * the array, segment offset at. */
static uint64_t merge_word_zero(uint8_t *d, uint64_t ws, unsigned u, int last, uint64_t at, uint64_t *conflict)
{
    uint64_t wd;
    memcpy(&wd, d, 8);
    if (!wd) { /* nobody else changed it: the task's, whole */
        memcpy(d, &ws, 8);
        return nonzero_bytes(ws);
    }
    if (wd == ws)
        return 0;
    uint8_t s[8];
    memcpy(s, &ws, 8);
    uint64_t changed = 0;
    for (unsigned b = 0; b < 8; b += u)
        changed += merge_item(d + b, zero_page, s + b, u, last, at + b, conflict);
    return changed;
}

/* merge_piece for a page whose twin is zeros, 64 bytes at a time where it
 * can: a block the task left as zeros is skipped, one the array still holds
 * as zeros takes the task's bytes whole (a copy the compiler can vectorize);
 * only blocks that both changed go word by word. */
static uint64_t merge_piece_zero(uint8_t *dst, const uint8_t *src, uint64_t n, unsigned u, int last, uint64_t at,
                                 uint64_t *conflict)
{
    uint64_t changed = 0, i = 0;
    for (; i + 64 <= n; i += 64) {
        uint64_t s[8], d[8], os = 0, od = 0;
        memcpy(s, src + i, 64);
        memcpy(d, dst + i, 64);
        for (unsigned j = 0; j < 8; j++) {
            os |= s[j];
            od |= d[j];
        }
        if (!os)
            continue;
        if (!od) {
            memcpy(dst + i, s, 64);
            uint64_t flags = 0; /* per byte lane: how many of the 8 words have it non-zero */
            for (unsigned j = 0; j < 8; j++) {
                uint64_t x = s[j] | (s[j] >> 4);
                x |= x >> 2;
                x |= x >> 1;
                flags += x & 0x0101010101010101ULL;
            }
            changed += (flags * 0x0101010101010101ULL) >> 56;
            continue;
        }
        for (unsigned j = 0; j < 8; j++)
            changed += merge_word_zero(dst + i + 8 * j, s[j], u, last, at + i + 8 * j, conflict);
    }
    for (; i + 8 <= n; i += 8) {
        uint64_t ws;
        memcpy(&ws, src + i, 8);
        changed += merge_word_zero(dst + i, ws, u, last, at + i, conflict);
    }
    for (; i < n; i += u) {
        unsigned k = n - i < u ? (unsigned)(n - i) : u;
        changed += merge_item(dst + i, zero_page, src + i, k, last, at + i, conflict);
    }
    return changed;
}

int64_t ls_merge_apply(struct ls_merge *m, uint8_t *base, const uint64_t *runs, uint32_t nruns, const uint8_t *src,
                       unsigned unit, int last, uint64_t *conflict)
{
    const uint64_t ps = ls_page_size();
    if (unit != 1 && unit != 2 && unit != 4 && unit != 8)
        unit = 1;
    uint64_t changed = 0, at = 0;
    for (uint32_t r = 0; r < nruns; r++) {
        uint64_t off = runs[2 * r], n = runs[2 * r + 1];
        if (off > m->len || n > m->len - off)
            return -ERANGE;
        if (!n)
            continue;
        make_twins(m, base, off / ps, (off + n + ps - 1) / ps);
        populate_zeros(m, base, off / ps, (off + n + ps - 1) / ps);
        for (uint64_t o = off; o < off + n;) {
            uint64_t e = (o / ps + 1) * ps;
            if (e > off + n)
                e = off + n;
            const uint8_t *s = src + at + (o - off);
            if (bit(m->zero, o / ps))
                changed += merge_piece_zero(base + o, s, e - o, unit, last, o, conflict);
            else
                changed += merge_piece(base + o, m->twin + o, s, e - o, unit, last, o, conflict);
            o = e;
        }
        at += n;
    }
    return (int64_t)changed;
}

int64_t ls_merge_sparse(struct ls_merge *m, uint8_t *base, const uint64_t *pages, uint64_t npages,
                        const uint64_t *masks, const uint64_t *words, uint64_t nwords, unsigned unit, int last,
                        uint64_t *conflict)
{
    const uint64_t ps = ls_page_size(), per = ps / 512;
    if (unit != 1 && unit != 2 && unit != 4 && unit != 8)
        unit = 1;
    /* Checked whole first: a task is merged all or nothing. */
    uint64_t bits = 0;
    for (uint64_t i = 0; i < npages; i++) {
        if (pages[i] % ps || pages[i] > m->len || ps > m->len - pages[i])
            return -ERANGE;
        if (!bit(m->zero, pages[i] / ps))
            return -EPROTO;
        for (uint64_t b = 0; b < per; b++)
            bits += popcount64(masks[i * per + b]);
    }
    if (bits != nwords)
        return -EPROTO;
    uint64_t changed = 0, k = 0;
    for (uint64_t i = 0; i < npages;) {
        /* a run of consecutive pages: populated in one call */
        uint64_t j = i + 1;
        while (j < npages && pages[j] == pages[j - 1] + ps)
            j++;
        populate_zeros(m, base, pages[i] / ps, pages[j - 1] / ps + 1);
        for (; i < j; i++) {
            uint8_t *page = base + pages[i];
            for (uint64_t b = 0; b < per; b++) {
                for (uint64_t x = masks[i * per + b]; x; x &= x - 1) {
                    uint64_t o = (b * 64 + (uint64_t)__builtin_ctzll(x)) * 8, ws = words[k++];
                    changed += merge_word_zero(page + o, ws, unit, last, pages[i] + o, conflict);
                }
            }
        }
    }
    return (int64_t)changed;
}
