/* rr.socket: stream sockets on the loop, for the few peers that speak a line protocol over a
 * socket (a load balancer's admin API: HAProxy's runtime API on its stats socket).
 *
 * A connection is a non-blocking, close-on-exec socket (unix-domain, or TCP to a numeric
 * address: no name resolution, getaddrinfo() would block the loop). Every call first tries to
 * finish at once (a line already buffered, a write the kernel takes whole); otherwise it becomes
 * an RrOp with an sd-event io source and a time source for its deadline, and the caller waits in
 * rr_op_await(). Bytes read are kept in the connection's buffer, so a line read leaves what
 * followed it for the next call. One operation at a time per connection: a second one while the
 * first waits is a misuse (two tasks would interleave lines).
 *
 * The handle is created closed before anything is acquired (liolib style); __gc, __close and
 * c:close() are the same idempotent function. Closing a connection another task waits on ends
 * that wait with ECANCELED. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "rr.h"

#define CONN_MT "rr.socket.conn"

#define DEFAULT_TIMEOUT 10.0
#define MAX_TIMEOUT 86400.0
#define DEFAULT_MAX_LINE (64 * 1024)
#define DEFAULT_MAX_ALL (1024 * 1024)
#define MAX_MAX (1L << 30)
#define READ_CHUNK (16 * 1024)

typedef struct Conn Conn;

typedef enum OpKind {
        OP_CONNECT,
        OP_WRITE,
        OP_READ_LINE,
        OP_READ_ALL,
} OpKind;

/* One operation waiting on the loop. Owned by its RrOp: release() frees it. */
typedef struct SockOp {
        RrOp op;
        Conn *conn; /* NULL once the connection was closed under it */
        OpKind kind;
        sd_event_source *io, *timer;
        char *data; /* OP_WRITE: what is left to send (a copy) */
        size_t len, off;
        size_t total; /* OP_WRITE: the whole write, for messages */
        size_t max;   /* reads: the cap */
        double timeout;
        int err;      /* positive errno of the failure, 0 while fine */
        int handle_idx; /* OP_CONNECT: stack index of the handle push() returns */
} SockOp;

struct Conn {
        int fd;           /* -1 once closed */
        char peer[sizeof(((struct sockaddr_un *) 0)->sun_path) + 64]; /* "unix:/path", "127.0.0.1:80" */
        char *buf;        /* bytes read and not yet returned */
        size_t len, cap;
        bool eof;         /* the peer ended its side */
        int read_err;     /* a read error, reported once the bytes before it were returned */
        double timeout;   /* default for every operation */
        SockOp *op;       /* the operation in flight */
};

typedef struct Box {
        Conn *conn;
} Box;

/* ---- connections ---- */

/* Stop op's event sources. */
static void op_stop(SockOp *o) {
        o->io = sd_event_source_disable_unref(o->io);
        o->timer = sd_event_source_disable_unref(o->timer);
}

/* The operation is over (done or failed: o->err says which). */
static void op_finish(SockOp *o, int err) {
        if (err && !o->err)
                o->err = err;
        op_stop(o);
        rr_op_complete(&o->op);
}

/* Close c's socket; the Conn stays (a closed handle). */
static void conn_close_fd(Conn *c) {
        if (c->fd >= 0)
                close(c->fd);
        c->fd = -1;
}

/* Close c and free it; an operation still waiting on it ends with ECANCELED. */
static void conn_free(Conn *c) {
        if (!c)
                return;
        if (c->op) {
                SockOp *o = c->op;
                c->op = NULL;
                o->conn = NULL;
                op_finish(o, ECANCELED);
        }
        conn_close_fd(c);
        free(c->buf);
        free(c);
}

/* Make room for n more bytes in c's buffer. 0 or -ENOMEM. */
static int conn_reserve(Conn *c, size_t n) {
        size_t cap;
        char *p;

        if (c->len + n <= c->cap)
                return 0;
        cap = c->cap ? c->cap : READ_CHUNK;
        while (cap < c->len + n)
                cap *= 2;
        p = realloc(c->buf, cap);
        if (!p)
                return -ENOMEM;
        c->buf = p;
        c->cap = cap;
        return 0;
}

/* Drop the first n bytes of the buffer. */
static void conn_consume(Conn *c, size_t n) {
        memmove(c->buf, c->buf + n, c->len - n);
        c->len -= n;
}

/* Read what the kernel has, until EAGAIN, end of file, an error (kept in read_err: the bytes
 * before it are still due to the caller) or `limit` bytes buffered in all. */
static void conn_fill(Conn *c, size_t limit) {
        while (!c->eof && !c->read_err && c->len < limit) {
                ssize_t n;
                if (conn_reserve(c, READ_CHUNK) < 0) {
                        c->read_err = ENOMEM;
                        return;
                }
                n = recv(c->fd, c->buf + c->len, READ_CHUNK, 0);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno != EAGAIN)
                                c->read_err = errno;
                        return;
                }
                if (n == 0)
                        c->eof = true;
                c->len += (size_t) n;
        }
}

/* Can a read of this kind be answered now (a result or a failure)? */
static bool read_ready(const Conn *c, OpKind kind, size_t max) {
        if (c->eof || c->read_err)
                return true;
        if (kind == OP_READ_LINE)
                return c->len >= max || (c->len > 0 && memchr(c->buf, '\n', c->len) != NULL);
        return c->len > max;
}

/* The bytes to read ahead for a read: a line longer than max fails, and so does more than max
 * bytes until end of file. */
static size_t read_limit(OpKind kind, size_t max) {
        return kind == OP_READ_ALL ? max + 1 : max;
}

/* Pushes the answer to a read that read_ready() accepted, or to one that failed with err
 * (ETIMEDOUT): a line / everything, or nil, message, code. Consumes what it returns. */
static int push_read(lua_State *L, Conn *c, OpKind kind, size_t max, int err) {
        const char *nl = kind == OP_READ_LINE && c->len > 0 ? memchr(c->buf, '\n', c->len) : NULL;

        if (kind == OP_READ_LINE && nl) {
                size_t n = (size_t) (nl - c->buf) + 1, keep = n - 1;
                if (keep > max)
                        return rr_push_fail(L, EMSGSIZE, "a line from %s is longer than %zu bytes", c->peer, max);
                if (keep > 0 && c->buf[keep - 1] == '\r')
                        keep--;
                lua_pushlstring(L, c->buf, keep);
                conn_consume(c, n);
                return 1;
        }
        if (kind == OP_READ_LINE && c->len >= max)
                return rr_push_fail(L, EMSGSIZE, "a line from %s is longer than %zu bytes", c->peer, max);
        if (kind == OP_READ_ALL && c->len > max)
                return rr_push_fail(L, EMSGSIZE, "more than %zu bytes from %s", max, c->peer);
        if (err == ETIMEDOUT)
                return rr_push_fail(L, err, "timed out reading from %s", c->peer);
        if (err || c->read_err) {
                err = err ? err : c->read_err;
                return rr_push_fail(L, err, "cannot read from %s: %s", c->peer, strerror(err));
        }
        if (kind == OP_READ_LINE && c->len == 0) {
                lua_pushnil(L);
                lua_pushfstring(L, "connection closed by %s", c->peer);
                lua_pushliteral(L, "EOF");
                return 3;
        }
        /* read_all at end of file, or the last line without its newline (as io.read("l")). */
        lua_pushlstring(L, c->buf ? c->buf : "", c->len);
        c->len = 0;
        return 1;
}

/* ---- the operation on the loop ---- */

/* RrOp.push: the handle, true, a line or the bytes read; or nil, message, code. */
static int op_push(lua_State *L, RrOp *op) {
        SockOp *o = (SockOp *) op;
        Conn *c = o->conn;

        if (!c)
                return rr_push_fail(L, ECANCELED, "socket closed while waiting");
        switch (o->kind) {
        case OP_CONNECT:
                if (o->err == ETIMEDOUT)
                        return rr_push_fail(L, ETIMEDOUT, "cannot connect to %s: timed out after %g s", c->peer, o->timeout);
                if (o->err)
                        return rr_push_fail(L, o->err, "cannot connect to %s: %s", c->peer, strerror(o->err));
                lua_pushvalue(L, o->handle_idx);
                return 1;
        case OP_WRITE:
                if (o->err == ETIMEDOUT)
                        return rr_push_fail(L, ETIMEDOUT, "timed out writing to %s (%zu of %zu bytes left)", c->peer,
                                            o->len - o->off, o->total);
                if (o->err)
                        return rr_push_fail(L, o->err, "cannot write to %s: %s", c->peer, strerror(o->err));
                lua_pushboolean(L, true);
                return 1;
        default:
                return push_read(L, c, o->kind, o->max, o->err);
        }
}

/* RrOp.release: also for an op still pending (its task canceled, the top level interrupted). */
static void op_release(RrOp *op) {
        SockOp *o = (SockOp *) op;

        op_stop(o);
        if (o->conn) {
                if (o->conn->op == o)
                        o->conn->op = NULL;
                /* A connect abandoned half-way (its task canceled) or failed leaves nothing usable. */
                if (o->kind == OP_CONNECT && (o->err || !o->op.done))
                        conn_close_fd(o->conn);
        }
        free(o->data);
        free(o);
}

/* sd-event: the op's deadline passed. */
static int op_timeout(sd_event_source *s, uint64_t usec, void *userdata) {
        (void) s;
        (void) usec;
        op_finish(userdata, ETIMEDOUT);
        return 0;
}

/* send() the rest of a write; 0 when all is sent or EAGAIN, else a positive errno. MSG_NOSIGNAL:
 * a peer that went away gives EPIPE, never SIGPIPE. */
static int write_some(int fd, const char *data, size_t len, size_t *off) {
        while (*off < len) {
                ssize_t n = send(fd, data + *off, len - *off, MSG_NOSIGNAL);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN)
                                return 0;
                        return errno;
                }
                *off += (size_t) n;
        }
        return 0;
}

/* sd-event: the socket is ready for what the op waits for. */
static int op_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        SockOp *o = userdata;
        Conn *c = o->conn;
        int err = 0;
        socklen_t len = sizeof err;

        (void) s;
        (void) revents;
        switch (o->kind) {
        case OP_CONNECT:
                /* Writable: the connection attempt is over; SO_ERROR says how it ended. */
                if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
                        err = errno;
                op_finish(o, err);
                break;
        case OP_WRITE:
                err = write_some(fd, o->data, o->len, &o->off);
                if (err || o->off == o->len)
                        op_finish(o, err);
                break;
        default:
                conn_fill(c, read_limit(o->kind, o->max));
                if (read_ready(c, o->kind, o->max))
                        op_finish(o, 0);
                break;
        }
        return 0;
}

/* Start waiting for op on c's socket (events) with its deadline. 0 or a negative errno. */
static int op_start(SockOp *o, uint32_t events) {
        sd_event *e = rr_loop_event();
        int r;

        r = sd_event_add_io(e, &o->io, o->conn->fd, events, op_io, o);
        if (r < 0)
                return r;
        r = sd_event_add_time(e, &o->timer, CLOCK_MONOTONIC, rr_deadline_usec(o->timeout), 1000, op_timeout, o);
        if (r < 0) {
                op_stop(o);
                return r;
        }
        o->conn->op = o;
        return 0;
}

/* A new op on c (not yet watching anything), or NULL on out of memory. */
static SockOp *op_new(Conn *c, OpKind kind, double timeout) {
        SockOp *o = calloc(1, sizeof *o);
        if (!o)
                return NULL;
        o->op.push = op_push;
        o->op.release = op_release;
        o->conn = c;
        o->kind = kind;
        o->timeout = timeout;
        return o;
}

/* ---- arguments ---- */

/* The options table at idx (or none): timeout (seconds > 0) and, for reads, max (bytes). */
static void read_opts(lua_State *L, int idx, double *timeout, size_t *max, bool allow_max) {
        if (lua_isnoneornil(L, idx))
                return;
        luaL_checktype(L, idx, LUA_TTABLE);
        lua_pushnil(L);
        while (lua_next(L, idx)) {
                const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
                if (!k || !(strcmp(k, "timeout") == 0 || (allow_max && strcmp(k, "max") == 0)))
                        luaL_error(L, "unknown option '%s'", k ? k : luaL_typename(L, -2));
                lua_pop(L, 1);
        }
        lua_getfield(L, idx, "timeout");
        if (!lua_isnil(L, -1)) {
                double t = lua_tonumber(L, -1);
                if (!lua_isnumber(L, -1) || !(t > 0 && t <= MAX_TIMEOUT))
                        luaL_error(L, "option 'timeout' must be a number of seconds > 0 and <= %d", (int) MAX_TIMEOUT);
                *timeout = t;
        }
        lua_pop(L, 1);
        if (allow_max) {
                lua_getfield(L, idx, "max");
                if (!lua_isnil(L, -1)) {
                        int isnum;
                        lua_Integer m = lua_tointegerx(L, -1, &isnum);
                        if (!isnum || m < 1 || m > MAX_MAX)
                                luaL_error(L, "option 'max' must be an integer from 1 to %d", (int) MAX_MAX);
                        *max = (size_t) m;
                }
                lua_pop(L, 1);
        }
}

/* The handle at idx, open or closed. */
static Box *check_box(lua_State *L, int idx) {
        return luaL_checkudata(L, idx, CONN_MT);
}

/* The open connection at idx; raises when closed. */
static Conn *check_conn(lua_State *L, int idx) {
        Box *b = check_box(L, idx);
        if (!b->conn || b->conn->fd < 0)
                luaL_error(L, "attempt to use a closed socket");
        if (b->conn->op)
                luaL_error(L, "socket busy: another task is using it");
        return b->conn;
}

/* ---- connecting ---- */

/* Connect the new handle's socket (the handle at the top of L, its Conn already made) to sa.
 * Returns what the Lua function returns. */
static int do_connect(lua_State *L, Conn *c, const struct sockaddr *sa, socklen_t salen) {
        int handle_idx = lua_gettop(L), r;
        SockOp *o;

        c->fd = socket(sa->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (c->fd < 0)
                return rr_push_fail(L, errno, "cannot connect to %s: %s", c->peer, strerror(errno));
        for (;;) {
                if (connect(c->fd, sa, salen) == 0)
                        return 1; /* the handle, at the top */
                if (errno != EINTR)
                        break;
        }
        /* A unix socket whose backlog is full says EAGAIN: nothing will tell when it has room,
         * so that is an answer (the peer is overloaded), not something to wait for. */
        if (errno != EINPROGRESS) {
                int err = errno;
                conn_close_fd(c);
                return rr_push_fail(L, err, "cannot connect to %s: %s", c->peer, strerror(err));
        }
        o = op_new(c, OP_CONNECT, c->timeout);
        if (!o) {
                conn_close_fd(c);
                return rr_push_fail(L, ENOMEM, "cannot connect to %s: out of memory", c->peer);
        }
        o->handle_idx = handle_idx;
        r = op_start(o, EPOLLOUT);
        if (r < 0) {
                free(o);
                conn_close_fd(c);
                return rr_push_fail(L, -r, "cannot connect to %s: cannot watch the socket: %s", c->peer, strerror(-r));
        }
        return rr_op_await(L, &o->op);
}

/* Pushes a new closed handle and gives it a Conn (raises on out of memory: nothing to leak). */
static Conn *new_handle(lua_State *L, double timeout) {
        Box *b = lua_newuserdatauv(L, sizeof *b, 0);
        b->conn = NULL;
        luaL_setmetatable(L, CONN_MT);
        b->conn = calloc(1, sizeof *b->conn);
        if (!b->conn)
                luaL_error(L, "out of memory");
        b->conn->fd = -1;
        b->conn->timeout = timeout;
        return b->conn;
}

/* socket.unix(path [, opts]) -> conn | nil, message, code */
static int socket_l_unix(lua_State *L) {
        size_t plen;
        const char *path = luaL_checklstring(L, 1, &plen);
        double timeout = DEFAULT_TIMEOUT;
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        Conn *c;

        if (plen == 0 || strlen(path) != plen)
                return luaL_argerror(L, 1, "socket path must be a non-empty string without NUL");
        read_opts(L, 2, &timeout, NULL, false);
        lua_settop(L, 2);
        rr_canceled(L, true); /* a cancelled task must not start a side effect it never sees */
        c = new_handle(L, timeout);
        snprintf(c->peer, sizeof c->peer, "unix:%s", path);
        if (plen >= sizeof sa.sun_path)
                return rr_push_fail(L, ENAMETOOLONG, "cannot connect to %s: the path is longer than %zu bytes",
                                    c->peer, sizeof sa.sun_path - 1);
        memcpy(sa.sun_path, path, plen + 1);
        return do_connect(L, c, (struct sockaddr *) &sa, sizeof sa);
}

/* socket.tcp(host, port [, opts]) -> conn | nil, message, code */
static int socket_l_tcp(lua_State *L) {
        const char *host = luaL_checkstring(L, 1);
        lua_Integer port = luaL_checkinteger(L, 2);
        double timeout = DEFAULT_TIMEOUT;
        union {
                struct sockaddr sa;
                struct sockaddr_in in4;
                struct sockaddr_in6 in6;
        } u = { 0 };
        socklen_t salen;
        Conn *c;

        luaL_argcheck(L, port >= 1 && port <= 65535, 2, "port must be from 1 to 65535");
        read_opts(L, 3, &timeout, NULL, false);
        lua_settop(L, 3);
        rr_canceled(L, true);
        if (strcmp(host, "localhost") == 0)
                host = "127.0.0.1"; /* the one name that needs no resolver */
        c = new_handle(L, timeout);
        if (inet_pton(AF_INET, host, &u.in4.sin_addr) == 1) {
                u.in4.sin_family = AF_INET;
                u.in4.sin_port = htons((uint16_t) port);
                salen = sizeof u.in4;
                snprintf(c->peer, sizeof c->peer, "%s:%d", host, (int) port);
        } else if (inet_pton(AF_INET6, host, &u.in6.sin6_addr) == 1) {
                u.in6.sin6_family = AF_INET6;
                u.in6.sin6_port = htons((uint16_t) port);
                salen = sizeof u.in6;
                snprintf(c->peer, sizeof c->peer, "[%s]:%d", host, (int) port);
        } else {
                snprintf(c->peer, sizeof c->peer, "%.100s:%d", host, (int) port);
                return rr_push_fail(L, EINVAL, "cannot connect to %s: not a numeric IP address (rr.socket does not resolve names)",
                                    c->peer);
        }
        return do_connect(L, c, &u.sa, salen);
}

/* ---- methods ---- */

/* c:write(data [, opts]) -> true | nil, message, code: all of data, or a failure */
static int conn_l_write(lua_State *L) {
        Conn *c = check_conn(L, 1);
        size_t len, off = 0;
        const char *data = luaL_checklstring(L, 2, &len);
        double timeout = c->timeout;
        SockOp *o;
        int err, r;

        read_opts(L, 3, &timeout, NULL, false);
        lua_settop(L, 3);
        rr_canceled(L, true);
        err = write_some(c->fd, data, len, &off);
        if (err)
                return rr_push_fail(L, err, "cannot write to %s: %s", c->peer, strerror(err));
        if (off == len) {
                lua_pushboolean(L, true);
                return 1;
        }
        o = op_new(c, OP_WRITE, timeout);
        if (!o || !(o->data = malloc(len - off))) {
                free(o);
                return rr_push_fail(L, ENOMEM, "cannot write to %s: out of memory", c->peer);
        }
        /* A copy: the loop sends it after this frame may be gone (the task canceled). */
        memcpy(o->data, data + off, len - off);
        o->len = len - off;
        o->total = len;
        r = op_start(o, EPOLLOUT);
        if (r < 0) {
                free(o->data);
                free(o);
                return rr_push_fail(L, -r, "cannot write to %s: cannot watch the socket: %s", c->peer, strerror(-r));
        }
        return rr_op_await(L, &o->op);
}

/* Common body of read_line and read_all. */
static int conn_read(lua_State *L, OpKind kind) {
        Conn *c = check_conn(L, 1);
        double timeout = c->timeout;
        size_t max = kind == OP_READ_LINE ? DEFAULT_MAX_LINE : DEFAULT_MAX_ALL;
        SockOp *o;
        int r;

        read_opts(L, 2, &timeout, &max, true);
        lua_settop(L, 2);
        /* What is already there first (a line read ahead by the last call), then the kernel. */
        if (!read_ready(c, kind, max))
                conn_fill(c, read_limit(kind, max));
        if (read_ready(c, kind, max))
                return push_read(L, c, kind, max, 0);
        o = op_new(c, kind, timeout);
        if (!o)
                return rr_push_fail(L, ENOMEM, "cannot read from %s: out of memory", c->peer);
        o->max = max;
        r = op_start(o, EPOLLIN);
        if (r < 0) {
                free(o);
                return rr_push_fail(L, -r, "cannot read from %s: cannot watch the socket: %s", c->peer, strerror(-r));
        }
        return rr_op_await(L, &o->op);
}

/* c:read_line([opts]) -> line | nil, message, code */
static int conn_l_read_line(lua_State *L) {
        return conn_read(L, OP_READ_LINE);
}

/* c:read_all([opts]) -> string | nil, message, code: everything until the peer closes */
static int conn_l_read_all(lua_State *L) {
        return conn_read(L, OP_READ_ALL);
}

/* c:shutdown() -> true | nil, message, code: no more writes (the peer reads end of file) */
static int conn_l_shutdown(lua_State *L) {
        Conn *c = check_conn(L, 1);

        if (shutdown(c->fd, SHUT_WR) < 0)
                return rr_push_fail(L, errno, "cannot shut down writes to %s: %s", c->peer, strerror(errno));
        lua_pushboolean(L, true);
        return 1;
}

/* c:peer() -> "unix:/path" | "127.0.0.1:80" */
static int conn_l_peer(lua_State *L) {
        Box *b = check_box(L, 1);
        if (!b->conn)
                return luaL_error(L, "attempt to use a closed socket");
        lua_pushstring(L, b->conn->peer);
        return 1;
}

/* __gc, __close and c:close(): idempotent. */
static int conn_l_close(lua_State *L) {
        Box *b = check_box(L, 1);
        Conn *c = b->conn;

        b->conn = NULL;
        conn_free(c);
        return 0;
}

/* __tostring: "rr.socket.conn unix:/path" or "rr.socket.conn (closed)". */
static int conn_l_tostring(lua_State *L) {
        Box *b = check_box(L, 1);

        if (!b->conn || b->conn->fd < 0)
                lua_pushliteral(L, "rr.socket.conn (closed)");
        else
                lua_pushfstring(L, "rr.socket.conn %s", b->conn->peer);
        return 1;
}

static const luaL_Reg conn_methods[] = {
        { "write", conn_l_write },
        { "read_line", conn_l_read_line },
        { "read_all", conn_l_read_all },
        { "shutdown", conn_l_shutdown },
        { "peer", conn_l_peer },
        { "close", conn_l_close },
        { NULL, NULL },
};

static const luaL_Reg conn_meta[] = {
        { "__gc", conn_l_close },
        { "__close", conn_l_close },
        { "__tostring", conn_l_tostring },
        { NULL, NULL },
};

static const luaL_Reg socket_functions[] = {
        { "unix", socket_l_unix },
        { "tcp", socket_l_tcp },
        { NULL, NULL },
};

/* require("rr.socket") */
int luaopen_rr_socket(lua_State *L) {
        if (luaL_newmetatable(L, CONN_MT)) {
                luaL_setfuncs(L, conn_meta, 0);
                luaL_newlib(L, conn_methods);
                lua_setfield(L, -2, "__index");
        }
        lua_pop(L, 1);
        luaL_newlib(L, socket_functions);
        return 1;
}
