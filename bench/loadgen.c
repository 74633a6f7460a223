/*
 * loadgen - a small epoll load generator for line-oriented TCP echo servers.
 *
 * Modes
 *   echo     C connections, each doing ping-pong: send one S-byte message that
 *            ends in '\n', read exactly the expected reply, verify every byte,
 *            send the next message, ... for D seconds.
 *   connect  C concurrent loops of: connect, (read a greeting), send one
 *            message, read and verify the whole reply, close.
 *
 * The expected reply is  PREFIX + MESSAGE + SUFFIX  (both empty by default, so
 * a plain echo server is expected to return the message unchanged).  Every
 * message carries the connection id and a per-connection counter, so a server
 * that answers with stale or foreign bytes is caught as a mismatch.
 *
 * Each thread (-t) owns an epoll instance and a share of the connections; all
 * sockets are non-blocking and driven by level-triggered epoll.  Results are
 * printed as one JSON object on stdout; diagnostics go to stderr.
 *
 * Build: see build.sh (gcc -O2 -Wall -pthread).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------------ */
/* Error kinds, in the order they are printed.                              */

enum err_kind { E_REFUSED, E_RESET, E_TIMEOUT, E_TRUNCATED, E_MISMATCH, E_OTHER, E_KINDS };
static const char *const err_names[E_KINDS] = {
    "refused", "reset", "timeout", "truncated", "mismatch", "other",
};

/* ------------------------------------------------------------------------ */
/* Latency histogram.
 *
 * Log-linear buckets (the HdrHistogram idea): values below 128 us get one
 * bucket per microsecond; above that every power-of-two range is split into
 * 64 equal buckets, so any recorded value is known to within 1/64 (~1.6 %).
 * 2048 buckets reach past 2^36 us (~19 hours), far more than we need.      */

#define H_SUB_BITS 6
#define H_SUB (1u << H_SUB_BITS) /* 64 sub-buckets per power of two */
#define H_BUCKETS 2048

struct histogram {
    uint64_t count[H_BUCKETS];
    uint64_t total;
    uint64_t sum_us;
    uint64_t max_us;
};

static unsigned h_index(uint64_t v)
{
    if (v < 2 * H_SUB)
        return (unsigned)v;
    unsigned msb = 63 - (unsigned)__builtin_clzll(v);
    unsigned shift = msb - H_SUB_BITS; /* v >> shift lies in [64, 127] */
    unsigned idx = (shift + 1) * H_SUB + (unsigned)((v >> shift) - H_SUB);
    return idx < H_BUCKETS ? idx : H_BUCKETS - 1;
}

/* Smallest value that falls in bucket idx. */
static uint64_t h_lower(unsigned idx)
{
    if (idx < 2 * H_SUB)
        return idx;
    unsigned shift = idx / H_SUB - 1;
    return (uint64_t)(idx % H_SUB + H_SUB) << shift;
}

/* Middle of bucket idx: what we report for a percentile that lands there. */
static uint64_t h_mid(unsigned idx)
{
    if (idx < 2 * H_SUB)
        return idx;
    unsigned shift = idx / H_SUB - 1;
    return h_lower(idx) + (((uint64_t)1 << shift) >> 1);
}

static void h_record(struct histogram *h, uint64_t us)
{
    h->count[h_index(us)]++;
    h->total++;
    h->sum_us += us;
    if (us > h->max_us)
        h->max_us = us;
}

static void h_merge(struct histogram *dst, const struct histogram *src)
{
    for (unsigned i = 0; i < H_BUCKETS; i++)
        dst->count[i] += src->count[i];
    dst->total += src->total;
    dst->sum_us += src->sum_us;
    if (src->max_us > dst->max_us)
        dst->max_us = src->max_us;
}

/* Value at quantile q (0 < q <= 1); 0 for an empty histogram. */
static uint64_t h_quantile(const struct histogram *h, double q)
{
    if (h->total == 0)
        return 0;
    uint64_t rank = (uint64_t)(q * (double)h->total + 0.5);
    if (rank < 1)
        rank = 1;
    uint64_t seen = 0;
    for (unsigned i = 0; i < H_BUCKETS; i++) {
        seen += h->count[i];
        if (seen >= rank) {
            uint64_t v = h_mid(i);
            return v < h->max_us ? v : h->max_us;
        }
    }
    return h->max_us;
}

/* ------------------------------------------------------------------------ */
/* Configuration (set once by main, read-only afterwards).                  */

enum mode { MODE_ECHO, MODE_CONNECT };

static struct {
    enum mode mode;
    struct sockaddr_storage addr;
    socklen_t addrlen;
    const char *host;
    int port;
    int connections;
    int threads;
    size_t size;         /* message size in bytes, '\n' included */
    double seconds;      /* length of the run */
    uint64_t max_ops;    /* stop after this many completed ops (0: no cap) */
    size_t greeting;     /* bytes to read and discard after connect */
    char *prefix;        /* expected reply = prefix + message + suffix */
    size_t prefix_len;
    char *suffix;
    size_t suffix_len;
    uint64_t timeout_ns; /* per connect / per reply */
    uint64_t backoff_ns; /* pause before reconnecting after an error */
} cfg;

/* ------------------------------------------------------------------------ */
/* Connections and threads.                                                 */

enum cstate {
    ST_BACKOFF,    /* no socket; reconnect at retry_at */
    ST_CONNECTING, /* non-blocking connect in progress */
    ST_GREETING,   /* connected, reading the greeting */
    ST_EXCHANGE,   /* message being sent and/or reply being read */
    ST_DONE,       /* run is over for this connection */
};

struct conn {
    int fd;
    unsigned id;        /* global connection slot number, goes into messages */
    enum cstate state;
    uint64_t seq;       /* messages started on this slot */
    char *msg;          /* current message, cfg.size bytes */
    size_t sent;        /* bytes of msg written so far */
    size_t got;         /* bytes of greeting or reply read so far */
    bool want_out;      /* EPOLLOUT currently in the interest set */
    uint64_t t_conn;    /* when connect() was called */
    uint64_t t_msg;     /* when the current message was started */
    uint64_t deadline;  /* timeout for the current step (0: none) */
    uint64_t retry_at;  /* for ST_BACKOFF */
};

struct worker {
    pthread_t tid;
    int epfd;
    struct conn *conns;
    int nconns;
    uint64_t max_ops;   /* this thread's share of cfg.max_ops (0: no cap) */
    uint64_t t_end;     /* completions after this instant are not counted */
    bool stop;          /* op cap reached */
    /* results */
    struct histogram hist;
    uint64_t ops;       /* completed messages (echo) or connections (connect) */
    uint64_t connects;  /* successful TCP connects */
    uint64_t bytes_out, bytes_in;
    uint64_t errors[E_KINDS];
    int other_errno;    /* last errno counted as "other", for the report */
    char rbuf[65536];
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static size_t reply_len(void)
{
    return cfg.prefix_len + cfg.size + cfg.suffix_len;
}

/* Map an errno from connect/read/write to an error kind. */
static enum err_kind classify(int err)
{
    switch (err) {
    case ECONNREFUSED:
        return E_REFUSED;
    case ECONNRESET:
    case EPIPE: /* we wrote after the peer reset / closed the connection */
    case ECONNABORTED:
        return E_RESET;
    case ETIMEDOUT:
        return E_TIMEOUT;
    default:
        return E_OTHER;
    }
}

/* Fill c->msg with a fresh message: "<id>:<seq>:" followed by letters whose
 * phase depends on seq, and a final '\n'.  Tiny sizes keep what fits. */
static void make_message(struct conn *c)
{
    char head[48];
    int hl = snprintf(head, sizeof head, "%u:%llu:", c->id, (unsigned long long)c->seq);
    size_t body = cfg.size - 1;
    size_t n = (size_t)hl < body ? (size_t)hl : body;
    memcpy(c->msg, head, n);
    for (size_t i = n; i < body; i++)
        c->msg[i] = (char)('a' + (i + c->seq) % 26);
    c->msg[body] = '\n';
}

/* Compare len received bytes with the expected reply starting at offset off.
 * The expected reply is three segments (prefix, message, suffix), so compare
 * each overlapping part with memcmp.  Returns true if they all match. */
static bool verify(const struct conn *c, size_t off, const char *data, size_t len)
{
    const char *seg[3] = {cfg.prefix, c->msg, cfg.suffix};
    size_t seglen[3] = {cfg.prefix_len, cfg.size, cfg.suffix_len};
    size_t base = 0;
    for (int s = 0; s < 3 && len > 0; s++) {
        size_t end = base + seglen[s];
        if (off < end) {
            size_t n = end - off < len ? end - off : len;
            if (memcmp(seg[s] + (off - base), data, n) != 0)
                return false;
            off += n;
            data += n;
            len -= n;
        }
        base = end;
    }
    return len == 0; /* leftover bytes go past the expected reply */
}

static void set_interest(struct worker *w, struct conn *c, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(w->epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
        perror("epoll_ctl(MOD)");
        exit(3);
    }
}

static void close_conn(struct conn *c)
{
    if (c->fd >= 0) {
        close(c->fd); /* also removes it from the epoll set */
        c->fd = -1;
    }
    c->want_out = false;
    c->deadline = 0;
}

/* Count an error, drop the socket and schedule a reconnect. */
static void fail(struct worker *w, struct conn *c, enum err_kind kind, int err)
{
    w->errors[kind]++;
    if (kind == E_OTHER && err)
        w->other_errno = err;
    close_conn(c);
    c->state = ST_BACKOFF;
    c->retry_at = now_ns() + cfg.backoff_ns;
}

static void start_connect(struct worker *w, struct conn *c);
static void start_message(struct worker *w, struct conn *c, uint64_t now);

/* Write as much of the current message as the socket takes.  If it does
 * not take everything, ask epoll for EPOLLOUT; drop that again when done. */
static void pump_send(struct worker *w, struct conn *c)
{
    while (c->sent < cfg.size) {
        ssize_t n = send(c->fd, c->msg + c->sent, cfg.size - c->sent, MSG_NOSIGNAL);
        if (n > 0) {
            c->sent += (size_t)n;
            w->bytes_out += (uint64_t)n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!c->want_out) {
                c->want_out = true;
                set_interest(w, c, EPOLLIN | EPOLLOUT);
            }
            return;
        }
        int err = errno;
        fail(w, c, classify(err), err);
        return;
    }
    if (c->want_out) {
        c->want_out = false;
        set_interest(w, c, EPOLLIN);
    }
}

/* The reply to the current message has fully arrived and matched. */
static void complete(struct worker *w, struct conn *c, uint64_t now)
{
    bool counted = now <= w->t_end && !w->stop;
    if (cfg.mode == MODE_ECHO) {
        if (counted) {
            h_record(&w->hist, (now - c->t_msg) / 1000);
            w->ops++;
        }
    } else {
        close_conn(c);
        if (counted) {
            /* whole connect + greeting + exchange + close */
            h_record(&w->hist, (now_ns() - c->t_conn) / 1000);
            w->ops++;
        }
    }
    if (w->max_ops && w->ops >= w->max_ops)
        w->stop = true;
    if (!counted || w->stop) {
        close_conn(c);
        c->state = ST_DONE;
        return;
    }
    if (cfg.mode == MODE_ECHO)
        start_message(w, c, now);
    else
        start_connect(w, c);
}

static void start_message(struct worker *w, struct conn *c, uint64_t now)
{
    c->seq++;
    make_message(c);
    c->sent = 0;
    c->got = 0;
    c->t_msg = now;
    c->deadline = now + cfg.timeout_ns;
    c->state = ST_EXCHANGE;
    pump_send(w, c);
}

/* The TCP handshake finished. */
static void on_connected(struct worker *w, struct conn *c, uint64_t now)
{
    w->connects++;
    if (c->want_out) {
        c->want_out = false;
        set_interest(w, c, EPOLLIN);
    }
    if (cfg.greeting > 0) {
        c->state = ST_GREETING;
        c->got = 0;
        c->deadline = now + cfg.timeout_ns;
    } else {
        start_message(w, c, now);
    }
}

static void start_connect(struct worker *w, struct conn *c)
{
    uint64_t now = now_ns();
    c->t_conn = now;
    c->fd = socket(cfg.addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        int err = errno;
        fail(w, c, E_OTHER, err);
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);

    int rc = connect(c->fd, (struct sockaddr *)&cfg.addr, cfg.addrlen);
    int err = rc < 0 ? errno : 0;
    if (rc < 0 && err != EINPROGRESS && err != EINTR) {
        /* refused can be reported right away on loopback */
        fail(w, c, classify(err), err);
        return;
    }
    /* Wait for writability to learn the connect's outcome (unless it is
     * already connected, which loopback sometimes manages). */
    c->want_out = rc < 0;
    struct epoll_event ev = {.events = rc < 0 ? EPOLLOUT : EPOLLIN, .data.ptr = c};
    if (epoll_ctl(w->epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0) {
        perror("epoll_ctl(ADD)");
        exit(3);
    }
    if (rc == 0) {
        on_connected(w, c, now);
    } else {
        c->state = ST_CONNECTING;
        c->deadline = now + cfg.timeout_ns;
    }
}

/* Bytes arrived (or EOF / an error is pending) on a connected socket.
 * Returns true if the same exchange is still going on afterwards, false if
 * the connection failed or moved on (next message, new socket, done). */
static bool on_readable(struct worker *w, struct conn *c, uint64_t now)
{
    for (;;) {
        ssize_t n = recv(c->fd, w->rbuf, sizeof w->rbuf, 0);
        if (n == 0) {
            /* EOF while we still expect bytes: the reply was cut short */
            fail(w, c, E_TRUNCATED, 0);
            return false;
        }
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return true;
            int err = errno;
            fail(w, c, classify(err), err);
            return false;
        }
        w->bytes_in += (uint64_t)n;
        const char *p = w->rbuf;
        size_t len = (size_t)n;

        if (c->state == ST_GREETING) {
            size_t take = cfg.greeting - c->got < len ? cfg.greeting - c->got : len;
            c->got += take;
            p += take;
            len -= take;
            if (c->got < cfg.greeting)
                continue;
            if (len > 0) {
                /* bytes beyond the greeting before we said anything */
                fail(w, c, E_MISMATCH, 0);
                return false;
            }
            /* The first message starts now; keep reading (its reply may
             * already be on the way) unless the send failed. */
            start_message(w, c, now);
            if (c->state != ST_EXCHANGE)
                return false;
            continue;
        }

        /* ST_EXCHANGE: the reply may start arriving while we still send */
        if (!verify(c, c->got, p, len)) {
            fail(w, c, E_MISMATCH, 0);
            return false;
        }
        c->got += len;
        if (c->got == reply_len() && c->sent == cfg.size) {
            complete(w, c, now);
            return false; /* a new message (or socket) is in play */
        }
        if ((size_t)n < sizeof w->rbuf)
            return true; /* drained what was there; level-triggered epoll calls again */
    }
}

static void on_event(struct worker *w, struct conn *c, uint32_t events, uint64_t now)
{
    if (c->state == ST_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
            err = errno;
        if (err) {
            fail(w, c, classify(err), err);
            return;
        }
        /* A pending failure that SO_ERROR did not show surfaces in recv. */
        on_connected(w, c, now);
        return;
    }
    if (c->state != ST_GREETING && c->state != ST_EXCHANGE)
        return;
    /* Read first: EPOLLHUP/EPOLLERR are reported through recv's result. */
    if ((events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && !on_readable(w, c, now))
        return;
    if ((events & EPOLLOUT) && c->state == ST_EXCHANGE && c->sent < cfg.size) {
        pump_send(w, c);
        /* Only a server that answers bytes it has not yet received gets here. */
        if (c->state == ST_EXCHANGE && c->sent == cfg.size && c->got == reply_len())
            complete(w, c, now);
    }
}

/* Timeouts and reconnects, checked every few milliseconds. */
static void scan(struct worker *w, uint64_t now)
{
    for (int i = 0; i < w->nconns; i++) {
        struct conn *c = &w->conns[i];
        if (c->state == ST_BACKOFF && now >= c->retry_at && !w->stop)
            start_connect(w, c);
        else if (c->deadline && now >= c->deadline && c->state != ST_BACKOFF &&
                 c->state != ST_DONE)
            fail(w, c, E_TIMEOUT, 0);
    }
}

#define SCAN_NS 5000000ull /* 5 ms */

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    uint64_t t0 = now_ns();
    w->t_end = t0 + (uint64_t)(cfg.seconds * 1e9);

    for (int i = 0; i < w->nconns; i++)
        start_connect(w, &w->conns[i]);

    struct epoll_event evs[256];
    uint64_t next_scan = t0 + SCAN_NS;
    for (;;) {
        uint64_t now = now_ns();
        if (now >= w->t_end || w->stop)
            break;
        uint64_t wait_ns = w->t_end - now < SCAN_NS ? w->t_end - now : SCAN_NS;
        int n = epoll_wait(w->epfd, evs, 256, (int)((wait_ns + 999999) / 1000000));
        if (n < 0 && errno != EINTR) {
            perror("epoll_wait");
            exit(3);
        }
        now = now_ns();
        for (int i = 0; i < n; i++)
            on_event(w, evs[i].data.ptr, evs[i].events, now);
        if (now >= next_scan) {
            scan(w, now);
            next_scan = now + SCAN_NS;
        }
    }
    /* Whatever is still in flight is not counted (neither success nor error). */
    for (int i = 0; i < w->nconns; i++)
        close_conn(&w->conns[i]);
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* Command line.                                                            */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: loadgen {echo|connect} -p PORT [options]\n"
            "  -H, --host HOST          server address (default 127.0.0.1)\n"
            "  -p, --port PORT          server port (required)\n"
            "  -c, --connections N      concurrent connections (default 50)\n"
            "  -s, --size BYTES         message size including the final '\\n' (default 64)\n"
            "  -d, --seconds SECS       length of the run (default 5)\n"
            "  -n, --max-ops N          stop after N messages/connections (default: no cap)\n"
            "  -t, --threads N          threads, each with its own epoll (default 1)\n"
            "      --greeting N         read and discard N bytes after connecting\n"
            "      --reply-prefix STR   expected reply = STR + message + SUFFIX\n"
            "      --reply-suffix STR   (both accept \\n \\r \\t \\\\ \\xHH escapes)\n"
            "      --timeout-ms MS      per connect and per reply (default 3000)\n"
            "      --backoff-ms MS      pause before reconnecting after an error (default 10)\n"
            "Prints one JSON object with the results on stdout.\n");
}

/* Decode \n \r \t \\ \xHH escapes in place; returns the decoded length. */
static size_t unescape(char *s)
{
    char *out = s;
    for (char *p = s; *p; p++) {
        if (*p != '\\' || !p[1]) {
            *out++ = *p;
            continue;
        }
        p++;
        switch (*p) {
        case 'n': *out++ = '\n'; break;
        case 'r': *out++ = '\r'; break;
        case 't': *out++ = '\t'; break;
        case '\\': *out++ = '\\'; break;
        case 'x': {
            char hex[3] = {0};
            int k = 0;
            while (k < 2 && p[1] && strchr("0123456789abcdefABCDEF", p[1]))
                hex[k++] = *++p;
            if (k == 0) {
                fprintf(stderr, "loadgen: bad \\x escape\n");
                exit(2);
            }
            *out++ = (char)strtol(hex, NULL, 16);
            break;
        }
        default:
            *out++ = '\\';
            *out++ = *p;
        }
    }
    *out = 0;
    return (size_t)(out - s);
}

static long long parse_int(const char *s, const char *what, long long min, long long max)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || end == s || v < min || v > max) {
        fprintf(stderr, "loadgen: bad %s: %s\n", what, s);
        exit(2);
    }
    return v;
}

static void parse_args(int argc, char **argv)
{
    enum { O_GREETING = 256, O_PREFIX, O_SUFFIX, O_TIMEOUT, O_BACKOFF };
    static const struct option opts[] = {
        {"host", required_argument, 0, 'H'},
        {"port", required_argument, 0, 'p'},
        {"connections", required_argument, 0, 'c'},
        {"size", required_argument, 0, 's'},
        {"seconds", required_argument, 0, 'd'},
        {"max-ops", required_argument, 0, 'n'},
        {"threads", required_argument, 0, 't'},
        {"greeting", required_argument, 0, O_GREETING},
        {"reply-prefix", required_argument, 0, O_PREFIX},
        {"reply-suffix", required_argument, 0, O_SUFFIX},
        {"timeout-ms", required_argument, 0, O_TIMEOUT},
        {"backoff-ms", required_argument, 0, O_BACKOFF},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    cfg.host = "127.0.0.1";
    cfg.port = -1;
    cfg.connections = 50;
    cfg.threads = 1;
    cfg.size = 64;
    cfg.seconds = 5;
    cfg.prefix = "";
    cfg.suffix = "";
    cfg.timeout_ns = 3000ull * 1000000;
    cfg.backoff_ns = 10ull * 1000000;

    int o;
    while ((o = getopt_long(argc, argv, "H:p:c:s:d:n:t:h", opts, NULL)) != -1) {
        switch (o) {
        case 'H': cfg.host = optarg; break;
        case 'p': cfg.port = (int)parse_int(optarg, "port", 1, 65535); break;
        case 'c': cfg.connections = (int)parse_int(optarg, "connections", 1, 1000000); break;
        case 's': cfg.size = (size_t)parse_int(optarg, "size", 1, 64 << 20); break;
        case 'd': {
            char *end;
            cfg.seconds = strtod(optarg, &end);
            if (*end || cfg.seconds <= 0 || cfg.seconds > 86400) {
                fprintf(stderr, "loadgen: bad seconds: %s\n", optarg);
                exit(2);
            }
            break;
        }
        case 'n': cfg.max_ops = (uint64_t)parse_int(optarg, "max-ops", 0, 1LL << 62); break;
        case 't': cfg.threads = (int)parse_int(optarg, "threads", 1, 256); break;
        case O_GREETING: cfg.greeting = (size_t)parse_int(optarg, "greeting", 0, 1 << 30); break;
        case O_PREFIX:
            cfg.prefix = strdup(optarg);
            cfg.prefix_len = unescape(cfg.prefix);
            break;
        case O_SUFFIX:
            cfg.suffix = strdup(optarg);
            cfg.suffix_len = unescape(cfg.suffix);
            break;
        case O_TIMEOUT:
            cfg.timeout_ns = (uint64_t)parse_int(optarg, "timeout-ms", 1, 3600000) * 1000000;
            break;
        case O_BACKOFF:
            cfg.backoff_ns = (uint64_t)parse_int(optarg, "backoff-ms", 0, 3600000) * 1000000;
            break;
        case 'h': usage(stdout); exit(0);
        default: usage(stderr); exit(2);
        }
    }
    if (optind != argc - 1 || cfg.port < 0) {
        usage(stderr);
        exit(2);
    }
    if (strcmp(argv[optind], "echo") == 0)
        cfg.mode = MODE_ECHO;
    else if (strcmp(argv[optind], "connect") == 0)
        cfg.mode = MODE_CONNECT;
    else {
        fprintf(stderr, "loadgen: unknown mode %s\n", argv[optind]);
        exit(2);
    }
    if (cfg.threads > cfg.connections)
        cfg.threads = cfg.connections;

    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_flags = AI_NUMERICSERV};
    struct addrinfo *res;
    char portstr[16];
    snprintf(portstr, sizeof portstr, "%d", cfg.port);
    int rc = getaddrinfo(cfg.host, portstr, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "loadgen: %s: %s\n", cfg.host, gai_strerror(rc));
        exit(2);
    }
    memcpy(&cfg.addr, res->ai_addr, res->ai_addrlen);
    cfg.addrlen = res->ai_addrlen;
    freeaddrinfo(res);
}

/* Make room for one descriptor per connection plus some slack. */
static void raise_nofile(rlim_t need)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur >= need)
        return;
    rl.rlim_cur = need <= rl.rlim_max ? need : rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur < need)
        fprintf(stderr, "loadgen: warning: RLIMIT_NOFILE is %llu, %llu wanted\n",
                (unsigned long long)rl.rlim_cur, (unsigned long long)need);
}

static void json_string(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

int main(int argc, char **argv)
{
    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN); /* belt and braces: sends use MSG_NOSIGNAL */
    raise_nofile((rlim_t)cfg.connections + 64);

    struct worker *ws = calloc((size_t)cfg.threads, sizeof *ws);
    struct conn *conns = calloc((size_t)cfg.connections, sizeof *conns);
    char *msgs = malloc((size_t)cfg.connections * cfg.size);
    if (!ws || !conns || !msgs) {
        fprintf(stderr, "loadgen: out of memory\n");
        return 3;
    }
    for (int i = 0; i < cfg.connections; i++) {
        conns[i].fd = -1;
        conns[i].id = (unsigned)i;
        conns[i].msg = msgs + (size_t)i * cfg.size;
    }

    /* Deal the connections (and the op cap) out to the threads. */
    int next = 0;
    for (int t = 0; t < cfg.threads; t++) {
        struct worker *w = &ws[t];
        int share = cfg.connections / cfg.threads + (t < cfg.connections % cfg.threads);
        w->conns = conns + next;
        w->nconns = share;
        next += share;
        if (cfg.max_ops) {
            w->max_ops = cfg.max_ops / (uint64_t)cfg.threads +
                         ((uint64_t)t < cfg.max_ops % (uint64_t)cfg.threads);
            if (w->max_ops == 0)
                w->max_ops = 1;
        }
        w->epfd = epoll_create1(EPOLL_CLOEXEC);
        if (w->epfd < 0) {
            perror("epoll_create1");
            return 3;
        }
    }

    uint64_t t0 = now_ns();
    for (int t = 0; t < cfg.threads; t++) {
        if (pthread_create(&ws[t].tid, NULL, worker_main, &ws[t]) != 0) {
            fprintf(stderr, "loadgen: pthread_create failed\n");
            return 3;
        }
    }
    for (int t = 0; t < cfg.threads; t++)
        pthread_join(ws[t].tid, NULL);
    double elapsed = (double)(now_ns() - t0) / 1e9;

    /* Merge the threads' results. */
    static struct histogram hist;
    uint64_t ops = 0, connects = 0, bytes_out = 0, bytes_in = 0, errors[E_KINDS] = {0};
    int other_errno = 0;
    bool capped = false;
    for (int t = 0; t < cfg.threads; t++) {
        struct worker *w = &ws[t];
        h_merge(&hist, &w->hist);
        ops += w->ops;
        connects += w->connects;
        bytes_out += w->bytes_out;
        bytes_in += w->bytes_in;
        for (int k = 0; k < E_KINDS; k++)
            errors[k] += w->errors[k];
        if (w->other_errno)
            other_errno = w->other_errno;
        capped |= w->stop;
    }
    uint64_t total_errors = 0;
    for (int k = 0; k < E_KINDS; k++)
        total_errors += errors[k];
    /* A capped run ends early: divide by the time it actually took. */
    double window = capped ? elapsed : cfg.seconds;

    printf("{\"mode\": \"%s\", \"host\": ", cfg.mode == MODE_ECHO ? "echo" : "connect");
    json_string(cfg.host);
    printf(", \"port\": %d, \"connections\": %d, \"threads\": %d, \"size\": %zu, "
           "\"seconds\": %.3f, \"elapsed_s\": %.3f, \"messages\": %llu, \"connects\": %llu, "
           "\"bytes_out\": %llu, \"bytes_in\": %llu, \"errors\": {",
           cfg.port, cfg.connections, cfg.threads, cfg.size, cfg.seconds, elapsed,
           (unsigned long long)ops, (unsigned long long)connects,
           (unsigned long long)bytes_out, (unsigned long long)bytes_in);
    for (int k = 0; k < E_KINDS; k++)
        printf("%s\"%s\": %llu", k ? ", " : "", err_names[k], (unsigned long long)errors[k]);
    printf("}, \"errors_total\": %llu, \"other_last\": ", (unsigned long long)total_errors);
    json_string(other_errno ? strerror(other_errno) : "");
    printf(", \"p50_us\": %llu, \"p90_us\": %llu, \"p99_us\": %llu, \"p999_us\": %llu, "
           "\"max_us\": %llu, \"mean_us\": %.1f, \"rate_per_s\": %.1f}\n",
           (unsigned long long)h_quantile(&hist, 0.50), (unsigned long long)h_quantile(&hist, 0.90),
           (unsigned long long)h_quantile(&hist, 0.99), (unsigned long long)h_quantile(&hist, 0.999),
           (unsigned long long)hist.max_us,
           hist.total ? (double)hist.sum_us / (double)hist.total : 0.0,
           window > 0 ? (double)ops / window : 0.0);
    for (int t = 0; t < cfg.threads; t++)
        close(ws[t].epfd);
    free(msgs);
    free(conns);
    free(ws);
    return 0;
}
