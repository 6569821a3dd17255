/* lazyshare native core: the owner's page caches of segments (cache.c), used
 * by the page server (server.c). Not parsed by cffi. */
#ifndef LAZYSHARE_CACHE_H
#define LAZYSHARE_CACHE_H

#include "internal.h"

/*
 * One segment's page cache: a memfd of len bytes (whole pages), and a
 * MAP_SHARED view of it registered MISSING with this process's "cache"
 * userfaultfd. The view is only ever the destination of UFFDIO_COPY (which
 * inserts each page into the memfd whole); nothing reads or writes it (a read
 * of a hole would wait forever for a fill nobody sends). Consumers map the
 * memfd MAP_PRIVATE by /proc/<pid>/fd/<fd>, checked by inode.
 */
struct ls_cache {
    int fd;          /* the memfd */
    uint8_t *view;   /* MAP_SHARED, MADV_DONTFORK: a forked child has no view */
    uint64_t len;    /* bytes, a multiple of the page size */
    uint64_t ino;
    struct ls_cache *prev, *next; /* every cache, for a forked child to close */
    struct ls_cache *dead_next;   /* server.c: destroyed once seg_lock is released */
    /* Snapshots: a bit per page, set when the page's bytes as of the open
     * snapshot are in the cache while the segment's memory may differ (its
     * block was copied before the parent's first write to it, or it is a page
     * the array shares with the heap, copied when the call began). Readers of
     * the segment's memory that bypass the cache hold lock for reading and
     * take kept pages from the cache; keeping a block holds it for writing, so
     * no such read of the memory is under way when the block is unprotected. */
    pthread_rwlock_t lock;
    uint8_t *kept;
};

/* A new empty cache of len bytes (a multiple of the page size). 0, or
 * -EOPNOTSUPP (no userfaultfd here, or none that fills shmem), -errno. */
int ls_cache_new(uint64_t len, struct ls_cache **out);
/* Unregister and unmap the view, close the memfd (consumers' mappings keep its
 * memory until they unmap it), free c. */
void ls_cache_free(struct ls_cache *c);
/* Copy [src, src+len) into the cache at off (both whole pages) without waking
 * anyone. Pages already cached are skipped (another consumer filled them).
 * Counts the bytes copied in cache_bytes_filled. 0, or -errno. Any thread. */
int ls_cache_fill(struct ls_cache *c, uint64_t off, const uint8_t *src, uint64_t len);
/* Bytes resident in the memfd now, or -errno. */
int64_t ls_cache_resident(struct ls_cache *c);
/* Drop the pages of n (offset, length) ranges, widened to whole pages and
 * clipped to the cache (the caller checked them against the segment). The
 * bytes dropped, or -errno. */
int64_t ls_cache_punch(struct ls_cache *c, const uint64_t *ranges, uint32_t n);
/* Of the bytes [src, src+len) of the segment's memory (cache offset off, any
 * alignment), those in pages resident in the cache that differ from it: their
 * pages are punched if punch, and counted either way (bytes of whole pages).
 * Reads only resident pages of the view (a hole would wait forever). The count,
 * or -errno. */
int64_t ls_cache_refresh(struct ls_cache *c, uint64_t off, const uint8_t *src, uint64_t len, int punch);

/* Copy [src, src+len) into the cache at off (whole pages, holes only, as
 * ls_cache_fill) and mark those pages kept, under the write lock. 0 or -errno. */
int ls_cache_keep(struct ls_cache *c, uint64_t off, const uint8_t *src, uint64_t len);
/* A new snapshot opens: no page is kept. */
void ls_cache_unkeep_all(struct ls_cache *c);
/* Whether the page at off is kept (read lock held). */
static inline int ls_cache_is_kept(const struct ls_cache *c, uint64_t off)
{
    uint64_t pg = off / ls_page_size();
    return (c->kept[pg / 8] >> (pg % 8)) & 1;
}

/* track.c: snapshots on a sync-tracked range (ls_track_add_sync) that starts
 * at addr. While one is open, the first write to each block of the range
 * copies the block's bytes into c first (cache offset = address - base, up to
 * clen) and the writer waits for it. The caller keeps c alive until
 * ls_track_snap_del. 0, -ENOENT (no such sync range), -ENOMEM. */
int ls_track_snap_add(uint64_t addr, struct ls_cache *c, uint64_t base, uint64_t clen);
/* Close it: 1 if the snapshot could not be kept whole (a block failed to copy,
 * or the process discarded pages of the range with madvise), 0 if it was,
 * -ENOENT if there is none (the range was removed meanwhile). */
int ls_track_snap_del(uint64_t addr, struct ls_cache *c);

#endif
