/*
 * Links between hosts: the page protocol over TCP, inside TLS 1.3 with both
 * ends authenticated by one CA (or, only when asked for explicitly, in
 * plaintext). The handler and the page server still speak ZMTP over a Unix
 * socket; a link relays that byte stream, so the fault path, the framing and
 * the server are the ones every local consumer uses.
 *
 *   consumer host                                   owner host
 *   fault handler --unix--> link "connect" ==TLS==> link "serve" --unix--> page server
 *   (lazyshare-fault)       (lazyshare-link)        (lazyshare-link)       (lazyshare-pages)
 *
 * Each side has one accepting thread and one thread per connection; a
 * connection is one consumer process's connection to one owner (there are as
 * many as processes attach, not as many as pages), so a thread each is cheap
 * and each stays simple: one poll loop over two non-blocking sockets.
 *
 * OpenSSL is not linked: ls_tls_load dlopens the libraries Python's own ssl
 * module loaded (lazyshare/link.py finds them), so building needs no headers
 * and the TLS stack is the interpreter's. The few declarations used are
 * below; their ABI is OpenSSL 1.1.1 and 3.x's.
 *
 * A link never leaves a consumer hanging: TCP_USER_TIMEOUT and keepalive end a
 * silent link within timeout_ms (plus one keepalive interval), and a broken or
 * refused link closes the Unix side, which the handler reports as the loss of
 * its owner (see peer_lost). Native threads only; no Python.
 */
#include "internal.h"

#include <arpa/inet.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* ---- OpenSSL, loaded at run time ---- */

typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_method_st SSL_METHOD;

#define X_SSL_ERROR_WANT_READ 2
#define X_SSL_ERROR_WANT_WRITE 3
#define X_SSL_ERROR_SYSCALL 5
#define X_SSL_ERROR_ZERO_RETURN 6
#define X_SSL_VERIFY_PEER 0x01
#define X_SSL_VERIFY_FAIL_IF_NO_PEER_CERT 0x02
#define X_SSL_CTRL_MODE 33
#define X_SSL_CTRL_SET_MIN_PROTO_VERSION 123
#define X_SSL_MODE_ENABLE_PARTIAL_WRITE 0x1L
#define X_SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER 0x2L
#define X_TLS1_3_VERSION 0x0304
#define X_SSL_FILETYPE_PEM 1
#define X_SSL_OP_IGNORE_UNEXPECTED_EOF (1ull << 7) /* OpenSSL 3; 1.1.1 reports such an end as SYSCALL, errno 0 */

static struct {
    int loaded;
    const SSL_METHOD *(*TLS_server_method)(void);
    const SSL_METHOD *(*TLS_client_method)(void);
    SSL_CTX *(*SSL_CTX_new)(const SSL_METHOD *);
    void (*SSL_CTX_free)(SSL_CTX *);
    long (*SSL_CTX_ctrl)(SSL_CTX *, int, long, void *);
    int (*SSL_CTX_use_certificate_chain_file)(SSL_CTX *, const char *);
    int (*SSL_CTX_use_PrivateKey_file)(SSL_CTX *, const char *, int);
    int (*SSL_CTX_check_private_key)(const SSL_CTX *);
    int (*SSL_CTX_load_verify_locations)(SSL_CTX *, const char *, const char *);
    void (*SSL_CTX_set_verify)(SSL_CTX *, int, void *);
    SSL *(*SSL_new)(SSL_CTX *);
    void (*SSL_free)(SSL *);
    int (*SSL_set_fd)(SSL *, int);
    int (*SSL_accept)(SSL *);
    int (*SSL_connect)(SSL *);
    int (*SSL_read)(SSL *, void *, int);
    int (*SSL_write)(SSL *, const void *, int);
    int (*SSL_get_error)(const SSL *, int);
    int (*SSL_shutdown)(SSL *);
    long (*SSL_ctrl)(SSL *, int, long, void *);
    long (*SSL_get_verify_result)(const SSL *);
    const char *(*X509_verify_cert_error_string)(long);
    unsigned long (*ERR_get_error)(void);
    void (*ERR_clear_error)(void);
    void (*ERR_error_string_n)(unsigned long, char *, size_t);
    uint64_t (*SSL_CTX_set_options)(SSL_CTX *, uint64_t); /* OpenSSL 3 only (a macro before) */
} ossl;
static pthread_mutex_t ossl_lock = PTHREAD_MUTEX_INITIALIZER;

int ls_tls_load(const char *libcrypto, const char *libssl, char *err, size_t errlen)
{
    int rc = 0;
    pthread_mutex_lock(&ossl_lock);
    if (ossl.loaded)
        goto out;
    void *c = dlopen(libcrypto, RTLD_NOW | RTLD_GLOBAL);
    void *s = c ? dlopen(libssl, RTLD_NOW | RTLD_GLOBAL) : NULL;
    if (!s) {
        snprintf(err, errlen, "cannot load OpenSSL: %s", dlerror());
        rc = -ENOENT;
        goto out;
    }
#define SYM(lib, name)                                                                                        \
    do {                                                                                                       \
        *(void **)&ossl.name = dlsym(lib, #name);                                                              \
        if (!ossl.name) {                                                                                      \
            snprintf(err, errlen, "OpenSSL (%s) has no %s", libssl, #name);                                    \
            rc = -ENOSYS;                                                                                      \
            goto out;                                                                                          \
        }                                                                                                      \
    } while (0)
    SYM(s, TLS_server_method);
    SYM(s, TLS_client_method);
    SYM(s, SSL_CTX_new);
    SYM(s, SSL_CTX_free);
    SYM(s, SSL_CTX_ctrl);
    SYM(s, SSL_CTX_use_certificate_chain_file);
    SYM(s, SSL_CTX_use_PrivateKey_file);
    SYM(s, SSL_CTX_check_private_key);
    SYM(s, SSL_CTX_load_verify_locations);
    SYM(s, SSL_CTX_set_verify);
    SYM(s, SSL_new);
    SYM(s, SSL_free);
    SYM(s, SSL_set_fd);
    SYM(s, SSL_accept);
    SYM(s, SSL_connect);
    SYM(s, SSL_read);
    SYM(s, SSL_write);
    SYM(s, SSL_get_error);
    SYM(s, SSL_shutdown);
    SYM(s, SSL_ctrl);
    SYM(s, SSL_get_verify_result);
    SYM(c, X509_verify_cert_error_string);
    SYM(c, ERR_get_error);
    SYM(c, ERR_clear_error);
    SYM(c, ERR_error_string_n);
#undef SYM
    *(void **)&ossl.SSL_CTX_set_options = dlsym(s, "SSL_CTX_set_options");
    ossl.loaded = 1;
out:
    pthread_mutex_unlock(&ossl_lock);
    return rc;
}

/* OpenSSL's reason for the last failure on this thread, after `what`. */
static void tls_reason(char *err, size_t errlen, const char *what, SSL *ssl)
{
    char buf[256] = "";
    unsigned long e, last = 0;
    while ((e = ossl.ERR_get_error()))
        last = e;
    if (last)
        ossl.ERR_error_string_n(last, buf, sizeof buf);
    long v = ssl ? ossl.SSL_get_verify_result(ssl) : 0;
    if (v)
        snprintf(err, errlen, "%s: %s (%s)", what, buf[0] ? buf : "failed", ossl.X509_verify_cert_error_string(v));
    else
        snprintf(err, errlen, "%s: %s", what, buf[0] ? buf : (errno ? strerror(errno) : "the peer closed the connection"));
}

/* A TLS 1.3-only context that presents cert/key and demands a peer
 * certificate signed by ca: NULL on failure (err says why). */
static SSL_CTX *tls_context(int server, const struct ls_link_config *cfg, char *err, size_t errlen)
{
    ossl.ERR_clear_error();
    SSL_CTX *ctx = ossl.SSL_CTX_new(server ? ossl.TLS_server_method() : ossl.TLS_client_method());
    if (!ctx) {
        tls_reason(err, errlen, "creating a TLS context", NULL);
        return NULL;
    }
    const char *what = "requiring TLS 1.3";
    if (ossl.SSL_CTX_ctrl(ctx, X_SSL_CTRL_SET_MIN_PROTO_VERSION, X_TLS1_3_VERSION, NULL) != 1)
        goto fail;
    what = "loading the certificate";
    if (ossl.SSL_CTX_use_certificate_chain_file(ctx, cfg->cert_file) != 1)
        goto fail;
    what = "loading the private key";
    if (ossl.SSL_CTX_use_PrivateKey_file(ctx, cfg->key_file, X_SSL_FILETYPE_PEM) != 1 ||
        ossl.SSL_CTX_check_private_key(ctx) != 1)
        goto fail;
    what = "loading the CA";
    if (ossl.SSL_CTX_load_verify_locations(ctx, cfg->ca_file, NULL) != 1)
        goto fail;
    /* Peers are authenticated by the cluster's CA alone, as Dask's own TLS
     * comms do (its certificates name no hosts). */
    ossl.SSL_CTX_set_verify(ctx, X_SSL_VERIFY_PEER | X_SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    /* A peer process that exits closes without close_notify: an end of
     * stream, not an error. The page protocol frames every message, so a cut
     * short reply is still detected by the handler. */
    if (ossl.SSL_CTX_set_options)
        ossl.SSL_CTX_set_options(ctx, X_SSL_OP_IGNORE_UNEXPECTED_EOF);
    ossl.SSL_CTX_ctrl(ctx, X_SSL_CTRL_MODE, X_SSL_MODE_ENABLE_PARTIAL_WRITE | X_SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER,
                      NULL);
    return ctx;
fail:
    tls_reason(err, errlen, what, NULL);
    ossl.SSL_CTX_free(ctx);
    return NULL;
}

/* ---- links ---- */

#define MAX_LINKS 64
#define BUF_BYTES (1u << 20)

struct link {
    int used;
    int server;           /* 1: "serve" (owner side), 0: "connect" (consumer side) */
    int lfd;              /* listening socket */
    atomic_int stopping;
    atomic_int threads;   /* its threads still running (accepting one included) */
    SSL_CTX *ctx;         /* NULL: plaintext */
    uint32_t timeout_ms;
    char target[108];     /* serve: the page server's socket path */
    char host[256];       /* connect: the owner's address */
    int port;
    struct ls_link_stats st; /* atomics by hand: __atomic builtins */
};

static struct link links[MAX_LINKS];
static pthread_mutex_t links_lock = PTHREAD_MUTEX_INITIALIZER;

static void count(uint64_t *c, uint64_t n)
{
    __atomic_fetch_add(c, n, __ATOMIC_RELAXED);
}

static int set_nonblock(int fd, int on)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0 || fcntl(fd, F_SETFL, on ? fl | O_NONBLOCK : fl & ~O_NONBLOCK) < 0)
        return -errno;
    return 0;
}

/* Bound every blocking step of a TCP socket and end a silent link: 0 or -errno. */
static int tcp_tune(int fd, uint32_t timeout_ms)
{
    int one = 1, intvl = 1, cnt = 3;
    int idle = timeout_ms >= 8000 ? (int)(timeout_ms / 4000) : 1; /* whole seconds, at least 1 */
    unsigned int uto = timeout_ms;
    struct timeval tv = {.tv_sec = timeout_ms / 1000, .tv_usec = (timeout_ms % 1000) * 1000};
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt) < 0 ||
        setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &uto, sizeof uto) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0)
        return -errno;
    return 0;
}

/* Connect to host:port within timeout_ms: a blocking, tuned socket, or -errno. */
static int tcp_connect(const char *host, int port, uint32_t timeout_ms, char *err, size_t errlen)
{
    char svc[16];
    snprintf(svc, sizeof svc, "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM}, *res = NULL;
    int g = getaddrinfo(host, svc, &hints, &res);
    if (g) {
        snprintf(err, errlen, "cannot resolve %s: %s", host, gai_strerror(g));
        return -EHOSTUNREACH;
    }
    int rc = -EHOSTUNREACH;
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, a->ai_protocol);
        if (fd < 0) {
            rc = -errno;
            continue;
        }
        int c = connect(fd, a->ai_addr, a->ai_addrlen);
        if (c < 0 && errno == EINPROGRESS) {
            struct pollfd pf = {.fd = fd, .events = POLLOUT};
            int n;
            do
                n = poll(&pf, 1, (int)timeout_ms);
            while (n < 0 && errno == EINTR);
            int e = 0;
            socklen_t l = sizeof e;
            if (n == 0)
                e = ETIMEDOUT;
            else if (n < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &l) < 0)
                e = errno;
            c = e ? -1 : 0;
            errno = e;
        }
        if (c == 0 && (rc = tcp_tune(fd, timeout_ms)) == 0 && (rc = set_nonblock(fd, 0)) == 0) {
            freeaddrinfo(res);
            return fd;
        }
        rc = c < 0 ? -errno : rc;
        close(fd);
    }
    freeaddrinfo(res);
    snprintf(err, errlen, "cannot connect to %s:%d: %s", host, port, strerror(-rc));
    return rc;
}

static int unix_connect(const char *path)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path)
        return -ENAMETOOLONG;
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

/* The TLS handshake on a blocking, tuned socket (its timeouts bound it):
 * the session, or NULL (err says why). */
static SSL *tls_handshake(SSL_CTX *ctx, int fd, int server, char *err, size_t errlen)
{
    ossl.ERR_clear_error();
    SSL *ssl = ossl.SSL_new(ctx);
    if (!ssl) {
        tls_reason(err, errlen, "creating a TLS session", NULL);
        return NULL;
    }
    errno = 0;
    if (ossl.SSL_set_fd(ssl, fd) != 1 || (server ? ossl.SSL_accept(ssl) : ossl.SSL_connect(ssl)) != 1) {
        if (errno == EAGAIN)
            errno = ETIMEDOUT;
        tls_reason(err, errlen, "TLS handshake", ssl);
        ossl.SSL_free(ssl);
        return NULL;
    }
    return ssl;
}

/* ---- one connection: relay until either side ends ---- */

struct stream {
    int fd;
    SSL *ssl; /* NULL: plaintext */
};

/* Read up to n bytes: >0, 0 on end of stream, -EAGAIN (wants POLLIN),
 * -EWOULDBLOCK+1000 (a TLS read that wants POLLOUT), or -errno. */
#define WANTS_OUT (-100000)
static ssize_t s_read(struct stream *s, void *b, size_t n)
{
    if (!s->ssl) {
        ssize_t r;
        do
            r = read(s->fd, b, n);
        while (r < 0 && errno == EINTR);
        return r < 0 ? -errno : r;
    }
    errno = 0;
    int r = ossl.SSL_read(s->ssl, b, n > INT32_MAX ? INT32_MAX : (int)n);
    if (r > 0)
        return r;
    switch (ossl.SSL_get_error(s->ssl, r)) {
    case X_SSL_ERROR_WANT_READ:
        return -EAGAIN;
    case X_SSL_ERROR_WANT_WRITE:
        return WANTS_OUT;
    case X_SSL_ERROR_ZERO_RETURN:
        return 0;
    case X_SSL_ERROR_SYSCALL:
        return errno ? -errno : 0;
    default:
        return -EPROTO;
    }
}

/* Write up to n bytes: >0, -EAGAIN (wants POLLOUT), WANTS_IN for a TLS write
 * that wants POLLIN, or -errno. */
#define WANTS_IN (-100001)
static ssize_t s_write(struct stream *s, const void *b, size_t n)
{
    if (!s->ssl) {
        ssize_t w;
        do
            w = send(s->fd, b, n, MSG_NOSIGNAL);
        while (w < 0 && errno == EINTR);
        return w < 0 ? -errno : w;
    }
    errno = 0;
    int w = ossl.SSL_write(s->ssl, b, n > INT32_MAX ? INT32_MAX : (int)n);
    if (w > 0)
        return w;
    switch (ossl.SSL_get_error(s->ssl, w)) {
    case X_SSL_ERROR_WANT_WRITE:
        return -EAGAIN;
    case X_SSL_ERROR_WANT_READ:
        return WANTS_IN;
    case X_SSL_ERROR_SYSCALL:
        return errno ? -errno : -EPIPE;
    default:
        return -EPROTO;
    }
}

struct buf {
    uint8_t *b;
    size_t off, len; /* bytes held: [off, off+len) */
};

/* Move what can move from `from` to `to` through bf without blocking, adding
 * to *ev_from / *ev_to the poll events each side needs before it can move
 * more. Returns 1 if anything moved, 0 if not, -errno if a side broke; the
 * end of `from`'s stream sets *eof. */
static int pump(struct stream *from, struct stream *to, struct buf *bf, short *ev_from, short *ev_to, int *eof,
                uint64_t *moved)
{
    int progress = 0;
    for (;;) {
        int did = 0;
        if (!bf->len) {
            bf->off = 0;
        } else if (bf->off >= BUF_BYTES / 2) {
            /* Compact once half the buffer was written out: each byte moves
             * at most once. (Compacting whenever the buffer was full to the
             * end moved ~1 MiB per 16 KiB TLS record written.) */
            memmove(bf->b, bf->b + bf->off, bf->len);
            bf->off = 0;
        }
        size_t room = BUF_BYTES - bf->off - bf->len;
        if (!*eof && room) {
            ssize_t r = s_read(from, bf->b + bf->off + bf->len, room);
            if (r > 0) {
                bf->len += (size_t)r;
                did = 1;
            } else if (r == 0) {
                *eof = 1;
            } else if (r == -EAGAIN) {
                *ev_from |= POLLIN;
            } else if (r == WANTS_OUT) {
                *ev_from |= POLLOUT;
            } else {
                return (int)r;
            }
        }
        if (bf->len) {
            ssize_t w = s_write(to, bf->b + bf->off, bf->len);
            if (w > 0) {
                bf->off += (size_t)w;
                bf->len -= (size_t)w;
                *moved += (uint64_t)w;
                did = 1;
            } else if (w == -EAGAIN) {
                *ev_to |= POLLOUT;
            } else if (w == WANTS_IN) {
                *ev_to |= POLLIN;
            } else {
                return (int)w;
            }
        }
        if (!did)
            return progress;
        progress = 1;
    }
}

struct conn_arg {
    struct link *l;
    int fd;   /* the accepted socket */
};

/* One line on stderr: "lazyshare: link <peer>: <what>". */
static void conn_log(const char *peer, const char *what, const char *why)
{
    char buf[700];
    int n = snprintf(buf, sizeof buf - 1, "lazyshare: link %s: %s%s\n", peer, what, why);
    if (n < 0)
        return;
    if (n > (int)sizeof buf - 1) { /* cut short: still one line */
        n = (int)sizeof buf - 1;
        buf[n - 1] = '\n';
    }
    ssize_t w = write(2, buf, (size_t)n);
    (void)w;
}

/* "from a consumer at <its address>" (serve) or "to the owner at host:port". */
static void describe_peer(const struct link *l, int tcp_fd, char *out, size_t len)
{
    if (!l->server) {
        snprintf(out, len, "to the owner at %s:%d", l->host, l->port);
        return;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    char host[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (getpeername(tcp_fd, (struct sockaddr *)&ss, &sl) == 0) {
        if (ss.ss_family == AF_INET6) {
            inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, host, sizeof host);
            port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
        } else if (ss.ss_family == AF_INET) {
            inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, host, sizeof host);
            port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
        }
    }
    snprintf(out, len, "from a consumer at %s:%d (to %s:%d)", host, port, l->host, l->port);
}

static void relay(struct link *l, int unix_fd, int tcp_fd, SSL *ssl, const char *peer)
{
    struct stream u = {unix_fd, NULL}, t = {tcp_fd, ssl};
    struct buf up = {malloc(BUF_BYTES), 0, 0}, down = {malloc(BUF_BYTES), 0, 0};
    int ueof = 0, teof = 0, err = 0;
    if (!up.b || !down.b || set_nonblock(unix_fd, 1) < 0 || set_nonblock(tcp_fd, 1) < 0) {
        err = -ENOMEM;
        goto out;
    }
    while (!atomic_load(&l->stopping)) {
        short ue = 0, te = 0;
        uint64_t in = 0, out = 0;
        int a = pump(&u, &t, &up, &ue, &te, &ueof, &out);
        int b = a < 0 ? a : pump(&t, &u, &down, &te, &ue, &teof, &in);
        count(&l->st.bytes_out, out);
        count(&l->st.bytes_in, in);
        if (a < 0 || b < 0) {
            err = a < 0 ? a : b;
            break;
        }
        if ((ueof && !up.len) || (teof && !down.len))
            break; /* one side is done and everything it sent went through */
        if (a || b)
            continue;
        struct pollfd pf[2] = {{.fd = unix_fd, .events = ue}, {.fd = tcp_fd, .events = te}};
        int n = poll(pf, 2, 1000);
        if (n < 0 && errno != EINTR) {
            err = -errno;
            break;
        }
        for (int i = 0; i < 2; i++)
            if (n > 0 && (pf[i].revents & (POLLERR | POLLNVAL)) && !(pf[i].revents & POLLIN)) {
                int e = 0;
                socklen_t sl = sizeof e;
                getsockopt(pf[i].fd, SOL_SOCKET, SO_ERROR, &e, &sl);
                err = -(e ? e : ECONNRESET);
            }
        if (err)
            break;
    }
out:
    if (err && !atomic_load(&l->stopping)) {
        count(&l->st.broken, 1);
        /* A reset is the other process ending (its side says why, if it
         * has to); a link that goes silent is said here, where it shows. */
        if (err != -ECONNRESET && err != -EPIPE)
            conn_log(peer, "broke: ", strerror(-err));
    }
    if (ssl && !err)
        ossl.SSL_shutdown(ssl);
    free(up.b);
    free(down.b);
}

static void link_put(struct link *l)
{
    if (atomic_fetch_sub(&l->threads, 1) != 1)
        return;
    pthread_mutex_lock(&links_lock);
    if (l->ctx)
        ossl.SSL_CTX_free(l->ctx);
    l->ctx = NULL;
    l->used = 0;
    pthread_mutex_unlock(&links_lock);
}

static void *conn_main(void *arg)
{
    struct conn_arg ca = *(struct conn_arg *)arg;
    free(arg);
    ls_block_signals();
    pthread_setname_np(pthread_self(), "lazyshare-link");
    struct link *l = ca.l;
    char err[512] = "", peer[400];
    int tcp = -1, ux = -1;
    SSL *ssl = NULL;
    if (l->server) {
        tcp = ca.fd;
        describe_peer(l, tcp, peer, sizeof peer);
        if (tcp_tune(tcp, l->timeout_ms) < 0 || set_nonblock(tcp, 0) < 0)
            goto out;
        if (l->ctx && !(ssl = tls_handshake(l->ctx, tcp, 1, err, sizeof err))) {
            count(&l->st.refused, 1);
            goto out;
        }
        if ((ux = unix_connect(l->target)) < 0)
            goto out;
    } else {
        ux = ca.fd;
        describe_peer(l, -1, peer, sizeof peer);
        if ((tcp = tcp_connect(l->host, l->port, l->timeout_ms, err, sizeof err)) < 0) {
            conn_log(peer, "", err);
            goto out;
        }
        if (l->ctx && !(ssl = tls_handshake(l->ctx, tcp, 0, err, sizeof err))) {
            count(&l->st.refused, 1);
            conn_log(peer, "refused: ", err);
            goto out;
        }
    }
    count(&l->st.accepted, 1);
    relay(l, ux, tcp, ssl, peer);
out:
    if (ssl)
        ossl.SSL_free(ssl);
    if (tcp >= 0)
        close(tcp);
    if (ux >= 0)
        close(ux);
    link_put(l);
    return NULL;
}

static void *accept_main(void *arg)
{
    struct link *l = arg;
    ls_block_signals();
    pthread_setname_np(pthread_self(), "lazyshare-link");
    while (!atomic_load(&l->stopping)) {
        int fd = accept4(l->lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE ||
                errno == ENOBUFS || errno == ENOMEM) {
                if (errno != EINTR && errno != ECONNABORTED)
                    usleep(10000); /* out of descriptors: let some close */
                continue;
            }
            break; /* shut down by ls_link_stop */
        }
        struct conn_arg *ca = malloc(sizeof *ca);
        pthread_t t;
        pthread_attr_t at;
        int ok = 0;
        if (ca && !pthread_attr_init(&at)) {
            pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
            pthread_attr_setstacksize(&at, 256 << 10);
            ca->l = l;
            ca->fd = fd;
            atomic_fetch_add(&l->threads, 1);
            ok = pthread_create(&t, &at, conn_main, ca) == 0;
            if (!ok)
                atomic_fetch_sub(&l->threads, 1);
            pthread_attr_destroy(&at);
        }
        if (!ok) {
            free(ca);
            close(fd);
        }
    }
    close(l->lfd);
    link_put(l);
    return NULL;
}

/* A free slot with ctx made per cfg: its index, or -errno (err says why). */
static int link_new(int server, const struct ls_link_config *cfg, char *err, size_t errlen)
{
    SSL_CTX *ctx = NULL;
    if (cfg->tls) {
        if (!ossl.loaded) {
            snprintf(err, errlen, "OpenSSL is not loaded (ls_tls_load)");
            return -ENOSYS;
        }
        if (!(ctx = tls_context(server, cfg, err, errlen)))
            return -EINVAL;
    }
    pthread_mutex_lock(&links_lock);
    int i = 0;
    while (i < MAX_LINKS && links[i].used)
        i++;
    if (i == MAX_LINKS) {
        pthread_mutex_unlock(&links_lock);
        if (ctx)
            ossl.SSL_CTX_free(ctx);
        snprintf(err, errlen, "too many links (%d)", MAX_LINKS);
        return -EMFILE;
    }
    struct link *l = &links[i];
    memset(l, 0, sizeof *l);
    l->used = 1;
    l->server = server;
    l->ctx = ctx;
    l->timeout_ms = cfg->timeout_ms ? cfg->timeout_ms : 10000;
    l->lfd = -1;
    pthread_mutex_unlock(&links_lock);
    return i;
}

static int link_start(struct link *l, char *err, size_t errlen)
{
    pthread_t t;
    atomic_store(&l->threads, 1);
    int e = pthread_create(&t, NULL, accept_main, l);
    if (e) {
        snprintf(err, errlen, "cannot start the link's thread: %s", strerror(e));
        close(l->lfd);
        atomic_store(&l->threads, 1);
        link_put(l);
        return -e;
    }
    pthread_detach(t);
    return 0;
}

int ls_link_serve(const char *host, int port, const char *target, const struct ls_link_config *cfg, int *port_out,
                  char *err, size_t errlen)
{
    if (strlen(target) >= sizeof links[0].target || strlen(host) >= sizeof links[0].host) {
        snprintf(err, errlen, "address too long");
        return -ENAMETOOLONG;
    }
    int id = link_new(1, cfg, err, errlen);
    if (id < 0)
        return id;
    struct link *l = &links[id];
    strcpy(l->target, target);
    strcpy(l->host, host);
    char svc[16];
    snprintf(svc, sizeof svc, "%d", port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE}, *res;
    int g = getaddrinfo(host[0] ? host : NULL, svc, &hints, &res);
    if (g) {
        snprintf(err, errlen, "cannot resolve %s: %s", host, gai_strerror(g));
        atomic_store(&l->threads, 1);
        link_put(l);
        return -EADDRNOTAVAIL;
    }
    int rc = -EADDRNOTAVAIL, fd = -1;
    for (struct addrinfo *a = res; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        int one = 1;
        if (fd >= 0 && (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
                        bind(fd, a->ai_addr, a->ai_addrlen) < 0 || listen(fd, 128) < 0)) {
            rc = -errno;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(res);
    if (fd < 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s", host, port, strerror(-rc));
        atomic_store(&l->threads, 1);
        link_put(l);
        return rc;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getsockname(fd, (struct sockaddr *)&ss, &sl) == 0)
        l->port = ntohs(ss.ss_family == AF_INET6 ? ((struct sockaddr_in6 *)&ss)->sin6_port
                                                  : ((struct sockaddr_in *)&ss)->sin_port);
    *port_out = l->port;
    l->lfd = fd;
    rc = link_start(l, err, errlen);
    return rc < 0 ? rc : id + 1;
}

int ls_link_connect(const char *path, const char *host, int port, const struct ls_link_config *cfg, char *err,
                    size_t errlen)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof sa.sun_path || strlen(host) >= sizeof links[0].host) {
        snprintf(err, errlen, "address too long");
        return -ENAMETOOLONG;
    }
    int id = link_new(0, cfg, err, errlen);
    if (id < 0)
        return id;
    struct link *l = &links[id];
    strcpy(l->host, host);
    l->port = port;
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 64) < 0) {
        int e = errno;
        snprintf(err, errlen, "cannot listen on %s: %s", path, strerror(e));
        if (fd >= 0)
            close(fd);
        atomic_store(&l->threads, 1);
        link_put(l);
        return -e;
    }
    l->lfd = fd;
    int rc = link_start(l, err, errlen);
    return rc < 0 ? rc : id + 1;
}

int ls_link_probe(const char *host, int port, const struct ls_link_config *cfg, char *err, size_t errlen)
{
    SSL_CTX *ctx = NULL;
    if (cfg->tls) {
        if (!ossl.loaded) {
            snprintf(err, errlen, "OpenSSL is not loaded (ls_tls_load)");
            return -ENOSYS;
        }
        if (!(ctx = tls_context(0, cfg, err, errlen)))
            return -EINVAL;
    }
    uint32_t tmo = cfg->timeout_ms ? cfg->timeout_ms : 10000;
    int fd = tcp_connect(host, port, tmo, err, errlen);
    int rc = fd < 0 ? fd : 0;
    if (fd >= 0 && !ctx) {
        /* Plaintext: our greeting's first bytes (a TLS listener drops us at
         * once), then the page server's greeting. */
        static const uint8_t sig[10] = {0xff, 0, 0, 0, 0, 0, 0, 0, 1, 0x7f};
        uint8_t b[10];
        ssize_t r = send(fd, sig, sizeof sig, MSG_NOSIGNAL);
        if (r == (ssize_t)sizeof sig)
            r = recv(fd, b, sizeof b, MSG_WAITALL);
        if (r != (ssize_t)sizeof b || b[0] != 0xff || b[9] != 0x7f) {
            snprintf(err, errlen, "%s:%d refused the link: %s", host, port,
                     r < 0 ? strerror(errno) : "it closed the connection (does it require TLS?)");
            rc = r < 0 && errno == EAGAIN ? -ETIMEDOUT : -ECONNREFUSED;
        }
    }
    if (fd >= 0 && ctx) {
        char why[400];
        SSL *ssl = tls_handshake(ctx, fd, 0, why, sizeof why);
        if (!ssl) {
            snprintf(err, errlen, "%s:%d refused the link: %s", host, port, why);
            rc = -ECONNREFUSED;
        } else {
            /* TLS 1.3: the server's verdict on our certificate comes after
             * the handshake; one read tells (a refusal is an alert). */
            struct stream s = {fd, ssl};
            uint8_t b[64];
            struct pollfd pf = {.fd = fd, .events = POLLIN};
            set_nonblock(fd, 1);
            for (;;) {
                ssize_t r = s_read(&s, b, sizeof b);
                if (r > 0)
                    break; /* the page server's greeting: accepted */
                if (r == -EAGAIN && poll(&pf, 1, (int)tmo) > 0)
                    continue;
                tls_reason(why, sizeof why, "after the handshake", ssl);
                snprintf(err, errlen, "%s:%d refused the link: %s", host, port, r == -EAGAIN ? "no greeting in time" : why);
                rc = r == -EAGAIN ? -ETIMEDOUT : -ECONNREFUSED;
                break;
            }
            ossl.SSL_free(ssl);
        }
    }
    if (fd >= 0)
        close(fd);
    if (ctx)
        ossl.SSL_CTX_free(ctx);
    return rc;
}

int ls_link_stop(int id)
{
    if (id < 1 || id > MAX_LINKS)
        return -EINVAL;
    struct link *l = &links[id - 1];
    pthread_mutex_lock(&links_lock);
    int used = l->used && !atomic_load(&l->stopping);
    if (used) {
        atomic_store(&l->stopping, 1);
        shutdown(l->lfd, SHUT_RDWR); /* wakes accept(); connections see `stopping` within a second */
    }
    pthread_mutex_unlock(&links_lock);
    return used ? 0 : -ENOENT;
}

int ls_link_stats(int id, struct ls_link_stats *out)
{
    if (id < 1 || id > MAX_LINKS || !links[id - 1].used)
        return -ENOENT;
    struct link *l = &links[id - 1];
    out->accepted = __atomic_load_n(&l->st.accepted, __ATOMIC_RELAXED);
    out->refused = __atomic_load_n(&l->st.refused, __ATOMIC_RELAXED);
    out->bytes_in = __atomic_load_n(&l->st.bytes_in, __ATOMIC_RELAXED);
    out->bytes_out = __atomic_load_n(&l->st.bytes_out, __ATOMIC_RELAXED);
    out->broken = __atomic_load_n(&l->st.broken, __ATOMIC_RELAXED);
    return 0;
}
