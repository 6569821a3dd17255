/*
 * The fault handler's connections to owners: one ZMTP DEALER connection per
 * owner (see zmtp.h) over its ipc:// endpoint's Unix socket, in a fixed peer
 * table. Owns the set-up state machine (connect, greeting and READY, the
 * userfaultfd offer: see P_* in client_internal.h), the framing of requests
 * and replies, the socket reads and writes and each peer's send buffer.
 * Replies are handed to client.c (on_reply), which routes them.
 *
 * Runs on the fault-handler thread ("lazyshare-fault") only, and never blocks
 * it: every socket is non-blocking.
 */
#include "client_internal.h"
#include "zmtp.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static struct peer peers[MAX_PEERS];
static int peers_used;         /* slots [0, peers_used) have been used: the rest are free */
static struct ls_loop *loop;   /* the handler's event loop (conn_reset) */

static void peer_io(int fd, uint32_t events, void *arg);

/* What the loop should tell about p: a connect in progress its end (EPOLLOUT),
 * then replies (EPOLLIN), and room while requests wait in tx. Nothing while a
 * connect must be retried: an unconnected socket reports EPOLLHUP. */
static uint32_t peer_events(const struct peer *p)
{
    if (p->fd < 0 || p->state == P_FREE || p->state == P_FAILED || (p->state == P_CONNECTING && p->connect_again))
        return 0;
    if (p->state == P_CONNECTING)
        return EPOLLOUT;
    if (p->txlen || (p->state == P_OFFER && !p->offer_sent))
        return EPOLLIN | EPOLLOUT;
    return EPOLLIN;
}

/* Keep p's registration in step with peer_events (no syscall if unchanged):
 * 0 or -errno (the caller fails or loses the peer). */
static int peer_watch(struct peer *p)
{
    uint32_t ev = peer_events(p);
    if (!ev) {
        ls_loop_del(&p->io);
        return 0;
    }
    if (p->io.loop)
        return ls_loop_mod(&p->io, ev);
    ls_io_init(&p->io, p->fd, peer_io, p);
    return ls_loop_add(loop, &p->io, ev);
}

void peer_close(struct peer *p)
{
    ls_loop_del(&p->io); /* before close: epoll forgets an fd only once every copy is closed */
    if (p->fd >= 0)
        close(p->fd);
    p->fd = -1;
    free(p->tx);
    free(p->stage);
    p->tx = p->stage = NULL;
    p->txlen = p->txcap = p->rxlen = 0;
    p->state = P_FREE;
}

/* Append n bytes to the peer's send buffer: 0 or -ENOMEM. */
static int tx_append(struct peer *p, const uint8_t *b, size_t n)
{
    if (p->txlen + n > p->txcap) {
        size_t cap = p->txcap ? p->txcap : 4096;
        while (cap < p->txlen + n)
            cap *= 2;
        uint8_t *nb = realloc(p->tx, cap);
        if (!nb)
            return -ENOMEM;
        p->tx = nb;
        p->txcap = cap;
    }
    memcpy(p->tx + p->txlen, b, n);
    p->txlen += n;
    return 0;
}

static int peer_addr(const struct peer *p, struct sockaddr_un *sa)
{
    *sa = (struct sockaddr_un){.sun_family = AF_UNIX};
    if (strncmp(p->endpoint, "ipc://", 6) || strlen(p->endpoint + 6) >= sizeof sa->sun_path)
        return -EINVAL;
    strcpy(sa->sun_path, p->endpoint + 6);
    return 0;
}

/* An owner that is not there: no socket file, or nobody listening on it. */
static int connect_errno(int e)
{
    return e == ENOENT || e == ECONNREFUSED ? -ESRCH : -e;
}

static int peer_flush(struct peer *p);

/* One non-blocking connect attempt: connected (-> P_GREETING), in progress
 * (EPOLLOUT tells), the listener's backlog full (EAGAIN on a Unix socket:
 * tried again on the next loop iteration), or -errno. */
static int peer_try_connect(struct peer *p)
{
    struct sockaddr_un sa;
    int rc = peer_addr(p, &sa);
    if (rc < 0)
        return rc;
    p->connect_again = 0;
    if (connect(p->fd, (struct sockaddr *)&sa, sizeof sa) == 0) {
        p->state = P_GREETING;
        return peer_flush(p); /* our greeting: the owner answers with its own */
    }
    if (errno == EAGAIN)
        p->connect_again = 1;
    else if (errno != EINPROGRESS && errno != EINTR) /* EINTR: it goes on asynchronously */
        return connect_errno(errno);
    return 0;
}

/* Open the socket and start connecting; our greeting and READY wait in tx. */
static int peer_open(struct peer *p)
{
    struct sockaddr_un sa;
    int rc = peer_addr(p, &sa);
    if (rc < 0)
        return rc;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -errno;
    p->fd = fd;
    p->state = P_CONNECTING;
    uint8_t hello[ZMTP_GREETING + 64];
    zmtp_greeting(hello, 0);
    size_t n = ZMTP_GREETING + zmtp_ready(hello + ZMTP_GREETING, 64, "DEALER");
    rc = tx_append(p, hello, n);
    if (!rc)
        rc = peer_try_connect(p);
    return rc < 0 ? rc : peer_watch(p);
}

/* The connection to an owner: an open one (ready or still being set up), or
 * a new one started without blocking; the handshake goes on in the loop
 * (peer_advance), and attaches wait on the peer until it is ready or its
 * deadline (the latest of theirs) passes. */
int peer_get(const char *endpoint, int pid, uint64_t deadline, struct peer **out)
{
    struct peer *free_slot = NULL;
    for (int i = 0; i < MAX_PEERS; i++) {
        struct peer *p = &peers[i];
        if (i >= peers_used && free_slot)
            break; /* none of the rest was ever used */
        if (p->state != P_FREE && p->state != P_FAILED && !strcmp(p->endpoint, endpoint)) {
            if (p->state != P_READY && deadline > p->deadline)
                p->deadline = deadline;
            *out = p;
            return 0;
        }
        if (p->state == P_FREE && !free_slot)
            free_slot = p;
    }
    if (!free_slot)
        return -EMFILE;
    if (free_slot - peers >= peers_used)
        peers_used = (int)(free_slot - peers) + 1;
    memset(free_slot, 0, sizeof *free_slot);
    free_slot->fd = -1;
    snprintf(free_slot->endpoint, sizeof free_slot->endpoint, "%s", endpoint);
    free_slot->pid = pid;
    free_slot->deadline = deadline;
    int rc = peer_open(free_slot);
    if (rc < 0) {
        peer_close(free_slot);
        return rc;
    }
    *out = free_slot;
    return 0;
}

void peer_put(struct peer *p)
{
    if (--p->refs == 0)
        peer_close(p);
}

static int peer_flush(struct peer *p)
{
    size_t off = 0;
    while (off < p->txlen) {
        ssize_t w = write(p->fd, p->tx + off, p->txlen - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && errno == EAGAIN)
            break;
        if (w <= 0)
            return -errno;
        off += (size_t)w;
    }
    memmove(p->tx, p->tx + off, p->txlen - off);
    p->txlen -= off;
    return peer_watch(p); /* EPOLLOUT while bytes wait */
}

int send_req(struct peer *p, uint16_t op, const uint8_t *seg, uint64_t tag, uint64_t offset, uint64_t length,
             uint64_t dst, uint32_t flags)
{
    struct ls_req_install in = {
        .rq = {
            .magic = LS_MAGIC,
            .version = LS_VERSION,
            .op = op,
            .pid = (uint32_t)getpid(),
            .flags = op == LS_OP_INSTALL ? flags : 0,
            .tag = tag,
            .offset = offset,
            .length = length,
        },
        .dst = dst,
    };
    memcpy(in.rq.seg, seg, LS_ID_BYTES);
    size_t size = op == LS_OP_INSTALL ? sizeof in : sizeof in.rq;
    if (p->state != P_READY)
        return -ENOTCONN; /* nothing is sent before the handshake is over */
    if (p->txlen + 9 + size > p->txcap) {
        size_t cap = p->txcap ? p->txcap * 2 : 4096;
        uint8_t *b = realloc(p->tx, cap);
        if (!b)
            return -ENOMEM;
        p->tx = b;
        p->txcap = cap;
    }
    p->txlen += zmtp_frame_header(p->tx + p->txlen, 0, size);
    memcpy(p->tx + p->txlen, &in, size);
    p->txlen += size;
    /* Written now if the socket has room, else when the loop says EPOLLOUT. */
    return peer_flush(p);
}


/* The owner's connection broke: fatal if anything still needs it. */
static void peer_lost(struct peer *p, int err)
{
    /* Detached regions waiting only for this owner's last answers need none. */
    dying_peer_lost(p);
    if (p->state == P_FREE)
        return; /* that dropped the last reference: closed */
    if (p->refs)
        ls_fatal("lost the connection to the owner of a lazily mapped array (pid %d%s, %s): %s",
                 p->pid, ls_pid_alive(p->pid) ? "" : ", exited", p->endpoint, strerror(err));
    peer_close(p);
}

/* Read and dispatch what the owner sent: [header] or [header][payload] replies. */
static void drain_peer(struct peer *p)
{
    const uint64_t ps = ls_page_size();
    for (int budget = 0; budget < 4096 && p->state == P_READY; budget++) {
        if (p->dlen) { /* a payload streams straight into the staging buffer */
            ssize_t r = read(p->fd, p->stage + p->dgot, p->dlen - p->dgot);
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0 && errno == EAGAIN)
                return;
            if (r <= 0) {
                peer_lost(p, r ? errno : ECONNRESET);
                return;
            }
            p->dgot += (uint64_t)r;
            if (p->dgot == p->dlen) {
                uint64_t n = p->dlen;
                p->dlen = p->dgot = 0;
                p->have_rep = 0;
                on_reply(p, &p->rep, p->stage, n, 1);
            }
            continue;
        }
        /* Parse complete small frames out of rx. */
        uint8_t flags;
        uint64_t len;
        size_t h = zmtp_parse_header(p->rx, p->rxlen, &flags, &len);
        if (h && (flags & ZMTP_COMMAND) && len <= ZMTP_MAX_SMALL && p->rxlen >= h + len) {
            memmove(p->rx, p->rx + h + len, p->rxlen - h - len); /* PING etc.: ignored */
            p->rxlen -= h + len;
            continue;
        }
        if (h && p->have_rep) { /* the payload frame */
            if (len > LS_MAX_READ || len % ps || (flags & (ZMTP_MORE | ZMTP_COMMAND)) || !p->stage)
                ls_fatal("malformed page payload from %s", p->endpoint);
            uint64_t inbuf = p->rxlen - h < len ? p->rxlen - h : len;
            memcpy(p->stage, p->rx + h, inbuf);
            memmove(p->rx, p->rx + h + inbuf, p->rxlen - h - inbuf);
            p->rxlen -= h + inbuf;
            p->dlen = len;
            p->dgot = inbuf;
            if (!len)
                ls_fatal("empty page payload from %s", p->endpoint);
            if (inbuf == len) {
                p->dlen = p->dgot = 0;
                p->have_rep = 0;
                on_reply(p, &p->rep, p->stage, len, 1);
            }
            continue;
        }
        if (h && p->rxlen >= h + len) { /* a reply header frame */
            if (len != sizeof(struct ls_rep) || (flags & ZMTP_COMMAND))
                ls_fatal("malformed reply header from %s", p->endpoint);
            memcpy(&p->rep, p->rx + h, sizeof p->rep);
            memmove(p->rx, p->rx + h + len, p->rxlen - h - len);
            p->rxlen -= h + len;
            if (p->rep.magic != LS_MAGIC || p->rep.version != LS_VERSION)
                ls_fatal("reply of another protocol from %s", p->endpoint);
            if (flags & ZMTP_MORE) {
                p->have_rep = 1;
            } else {
                struct ls_rep rep = p->rep;
                on_reply(p, &rep, NULL, 0, 0);
            }
            continue;
        }
        if (h && len > sizeof p->rx)
            ls_fatal("oversized frame from %s", p->endpoint);
        if (p->rxlen == sizeof p->rx)
            ls_fatal("unparseable stream from %s", p->endpoint);
        ssize_t r = read(p->fd, p->rx + p->rxlen, sizeof p->rx - p->rxlen);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0 && errno == EAGAIN)
            return;
        if (r <= 0) {
            peer_lost(p, r ? errno : ECONNRESET);
            return;
        }
        p->rxlen += (size_t)r;
    }
}

/* ---- connection set-up (see P_*): every step returns at once ---- */

/* Whether the owner runs as our uid: only such an owner is handed our
 * userfaultfd (it could ptrace us anyway); any other gets READ requests. */
static int peer_is_us(int fd)
{
    struct ucred cred;
    socklen_t len = sizeof cred;
    return getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == 0 && cred.uid == getuid();
}

/*
 * Hand our userfaultfd to the owner (OP_UFFD, the fd as SCM_RIGHTS): it then
 * installs pages into our mappings itself, one copy per byte. Sent once tx is
 * empty (the fd rides on the frame's first byte; what does not fit goes to tx).
 * Any refusal (an owner without the INSTALL path, a filter on fd passing)
 * leaves the peer on the READ path; only a broken connection is an error.
 */
static int offer_send(struct peer *p)
{
    struct ls_req rq = {.magic = LS_MAGIC, .version = LS_VERSION, .op = LS_OP_UFFD, .pid = (uint32_t)getpid()};
    uint8_t msg[9 + sizeof rq];
    size_t n = zmtp_frame_header(msg, 0, sizeof rq);
    memcpy(msg + n, &rq, sizeof rq);
    n += sizeof rq;
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct iovec iov = {msg, n};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = &ctl, .msg_controllen = sizeof ctl};
    struct cmsghdr *h = CMSG_FIRSTHDR(&m);
    h->cmsg_level = SOL_SOCKET;
    h->cmsg_type = SCM_RIGHTS;
    h->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(h), &client_uffd, sizeof client_uffd);
    ssize_t w;
    do
        w = sendmsg(p->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    while (w < 0 && errno == EINTR);
    if (w < 0)
        return errno == EAGAIN ? 0 : -errno; /* no room: EPOLLOUT brings us back */
    p->offer_sent = 1;
    return (size_t)w < n ? tx_append(p, msg + w, n - (size_t)w) : 0;
}

/* Consume what the handshake expects from rx: the owner's greeting, its READY
 * (its first command), then, if offered, the OP_UFFD answer (commands
 * skipped). Leaves the rest in rx for drain_peer. */
static int handshake_parse(struct peer *p)
{
    if (p->state == P_GREETING && !p->greeted) {
        if (p->rxlen < ZMTP_GREETING)
            return 0;
        if (zmtp_check_greeting(p->rx) < 0)
            return -EPROTO;
        memmove(p->rx, p->rx + ZMTP_GREETING, p->rxlen - ZMTP_GREETING);
        p->rxlen -= ZMTP_GREETING;
        p->greeted = 1;
    }
    while (p->state == P_GREETING || (p->state == P_OFFER && p->offer_sent)) {
        uint8_t flags;
        uint64_t len;
        size_t h = zmtp_parse_header(p->rx, p->rxlen, &flags, &len);
        if (h && len > ZMTP_MAX_SMALL)
            return -EPROTO;
        if (!h || p->rxlen < h + len)
            return 0;
        int command = (flags & ZMTP_COMMAND) != 0;
        struct ls_rep rep;
        if (!command && (p->state == P_GREETING || len != sizeof rep || (flags & ZMTP_MORE)))
            return -EPROTO;
        if (!command)
            memcpy(&rep, p->rx + h, sizeof rep);
        memmove(p->rx, p->rx + h + len, p->rxlen - h - len);
        p->rxlen -= h + len;
        if (p->state == P_GREETING) { /* READY: its properties need no answer */
            p->state = client_uffd >= 0 && client_direct_wanted && peer_is_us(p->fd) ? P_OFFER : P_READY;
        } else if (!command) {
            if (rep.magic != LS_MAGIC || rep.op != LS_OP_UFFD)
                return -EPROTO;
            p->direct = rep.status == 0;
            p->state = P_READY;
        }
    }
    return 0;
}

/* Read (without blocking) and parse until the handshake is over or the
 * socket is empty. */
static int handshake_read(struct peer *p)
{
    for (;;) {
        int rc = handshake_parse(p);
        if (rc < 0 || p->state == P_READY || (p->state == P_OFFER && !p->offer_sent))
            return rc;
        if (p->rxlen == sizeof p->rx)
            return -EPROTO; /* nothing the handshake expects is that long */
        ssize_t r = read(p->fd, p->rx + p->rxlen, sizeof p->rx - p->rxlen);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return errno == EAGAIN ? 0 : -errno;
        if (r == 0)
            return -ECONNRESET;
        p->rxlen += (size_t)r;
    }
}

/* The set-up failed or timed out: the attaches waiting on it fail (the
 * owner never saw their HOLDs); the slot is freed when the last lets go. */
static void peer_fail(struct peer *p, int err)
{
    int status = err == -ESRCH || !ls_pid_alive(p->pid) ? -ESRCH : err;
    ls_loop_del(&p->io);
    if (p->fd >= 0)
        close(p->fd);
    p->fd = -1;
    free(p->tx);
    free(p->stage);
    p->tx = p->stage = NULL;
    p->txlen = p->txcap = p->rxlen = 0;
    p->state = P_FAILED;
    attach_peer_failed(p, status);
    if (!p->refs)
        peer_close(p);
}

/* The handshake is over: a staging buffer for payloads (READ path), then the
 * HOLDs of the attaches that waited for it. */
static void peer_ready(struct peer *p)
{
    if (!p->direct) {
        void *stage;
        if (posix_memalign(&stage, ls_page_size(), LS_MAX_READ)) {
            peer_fail(p, -ENOMEM); /* no HOLD was sent yet */
            return;
        }
        p->stage = stage;
    }
    attach_peer_ready(p);
}

/* One step of a peer's set-up, on the loop's events for it (or, while connect
 * must be retried, every iteration). */
static void peer_advance(struct peer *p, uint32_t revents)
{
    int rc = 0;
    if (p->state == P_CONNECTING) {
        if (p->connect_again) {
            rc = peer_try_connect(p);
        } else if (revents) {
            int err = 0;
            socklen_t l = sizeof err;
            if (getsockopt(p->fd, SOL_SOCKET, SO_ERROR, &err, &l) < 0)
                rc = -errno;
            else if (err)
                rc = connect_errno(err);
            else
                p->state = P_GREETING;
        }
        if (rc < 0 || p->state == P_CONNECTING)
            goto out;
        revents |= EPOLLIN; /* the owner may have answered already */
    }
    if (p->txlen && (rc = peer_flush(p)) < 0)
        goto out;
    if (revents & (EPOLLIN | EPOLLHUP | EPOLLERR))
        rc = handshake_read(p);
    if (!rc && p->state == P_OFFER && !p->offer_sent && !p->txlen) {
        rc = offer_send(p);
        if (!rc && p->offer_sent)
            rc = handshake_read(p);
    }
out:
    if (!rc)
        rc = peer_watch(p);
    if (rc < 0)
        peer_fail(p, rc);
    else if (p->state == P_READY)
        peer_ready(p);
}


/* The loop's events for p: a step of its set-up, or its replies and the
 * requests waiting for room. */
static void peer_io(int fd, uint32_t events, void *arg)
{
    (void)fd;
    struct peer *p = arg;
    if (p->state >= P_CONNECTING && p->state < P_READY) {
        peer_advance(p, events);
        return;
    }
    if (p->state != P_READY)
        return;
    if ((events & EPOLLOUT) && peer_flush(p) < 0) {
        peer_lost(p, errno);
        return;
    }
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR))
        drain_peer(p);
}

int conn_retry_connects(void)
{
    int waiting = 0;
    for (int i = 0; i < peers_used; i++) {
        struct peer *p = &peers[i];
        if (p->state == P_CONNECTING && p->connect_again) {
            peer_advance(p, 0);
            waiting += p->state == P_CONNECTING && p->connect_again;
        }
    }
    return waiting;
}

void conn_check_deadlines(uint64_t now)
{
    for (int i = 0; i < peers_used; i++) {
        struct peer *p = &peers[i];
        if (p->state >= P_CONNECTING && p->state < P_READY && now > p->deadline)
            peer_fail(p, -ETIMEDOUT);
    }
}

uint64_t conn_next_deadline(void)
{
    uint64_t d = UINT64_MAX;
    for (int i = 0; i < peers_used; i++) {
        const struct peer *p = &peers[i];
        if (p->state >= P_CONNECTING && p->state < P_READY && p->deadline < d)
            d = p->deadline;
    }
    return d;
}

void conn_reset(struct ls_loop *l)
{
    memset(peers, 0, sizeof peers);
    for (int i = 0; i < MAX_PEERS; i++)
        peers[i].fd = -1;
    peers_used = 0;
    loop = l;
}
