/*
 * Read-ahead policy of the fault handler (as CRIU's lazy-pages and the
 * kernel's readahead): pure functions over a region's small state, no I/O and
 * no globals, so that tests/test_readahead.py drives them directly. Called by
 * the fault-handler thread ("lazyshare-fault", csrc/client.c) for each fault;
 * declared in lazyshare.h.
 *
 * The window starts at min_pages, doubles (up to max_pages) while faults move
 * forward within two windows of the last one, and falls back to min_pages on
 * any other (random, backward) fault. A fault asks for [page, page+window);
 * a sequential one also for the next window ahead. Nothing past the region's
 * end; pages already requested are skipped (ls_readahead_next_run).
 */
#include "internal.h"

void ls_readahead_init(struct ls_readahead *ra, uint32_t min_pages)
{
    *ra = (struct ls_readahead){.window = min_pages};
}

void ls_readahead_fault(struct ls_readahead *ra, uint64_t page, uint64_t npages, uint32_t min_pages,
                        uint32_t max_pages, struct ls_readahead_plan *out)
{
    int seq = ra->have_last && page >= ra->last && page <= ra->last + 2 * (uint64_t)ra->window;
    if (seq) {
        uint64_t w = (uint64_t)ra->window * 2;
        ra->window = (uint32_t)(w > max_pages ? max_pages : w);
    } else {
        ra->window = min_pages;
    }
    ra->last = page;
    ra->have_last = 1;
    uint64_t end = page + ra->window, end2 = end + ra->window;
    if (end > npages)
        end = npages;
    if (end2 > npages)
        end2 = npages;
    out->sequential = seq;
    out->from = page < npages ? page : npages;
    out->to = end;
    out->ahead_from = seq ? end : 0;
    out->ahead_to = seq ? end2 : 0;
}

static inline int bit_get(const uint8_t *b, uint64_t i) { return (b[i >> 3] >> (i & 7)) & 1; }

int ls_readahead_next_run(const uint8_t *requested, uint64_t from, uint64_t to, uint64_t max_run,
                          uint64_t *start, uint64_t *n)
{
    uint64_t p = from;
    while (p < to && bit_get(requested, p))
        p++;
    uint64_t s = p;
    while (p < to && !bit_get(requested, p) && p - s < max_run)
        p++;
    *start = s;
    *n = p - s;
    return p > s;
}
