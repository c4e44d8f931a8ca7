/* rr.http: HTTP(S) requests on the engine's loop, many at once through one curl multi handle.
 *
 * curl's multi socket API is driven by sd-event the way curl's docs/examples/ephiperfifo.c and
 * multi-uv.c drive it: CURLMOPT_SOCKETFUNCTION keeps one sd-event io source per socket (found
 * again through curl_multi_assign), CURLMOPT_TIMERFUNCTION arms one sd-event time source, and
 * after every curl_multi_socket_action() the finished transfers are drained from
 * curl_multi_info_read() and their ops completed. A request is an RrOp; CURLOPT_PRIVATE maps its
 * easy handle back to it. No Lua runs inside a curl callback: callbacks only copy bytes and
 * complete ops, the loop resumes the waiting tasks afterwards.
 *
 * The multi handle is created at the first request and lives until lua_close(), which
 * finalizes the module's state sentinel (see http_state_gc()). */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <curl/curl.h>

#include "rr.h"

#define STATE_MT "rr.http.state"
#define STATE_KEY "rr.http.state" /* registry field holding the sentinel */

#define DEFAULT_TIMEOUT 10.0         /* seconds, whole request */
#define DEFAULT_CONNECT_TIMEOUT 5.0  /* seconds, capped by the request timeout */
#define DEFAULT_MAX_BODY (64 * 1024) /* body bytes kept */
#define MAX_MAX_BODY (1L << 30)
#define MAX_TIMEOUT 86400.0
#define MAX_REDIRECTS 5L
#define MAX_HEAD (64 * 1024) /* response header bytes kept; more are dropped */

#ifdef RR_VERSION
#define USER_AGENT "rrengine/" RR_VERSION
#else
#define USER_AGENT "rrengine"
#endif

typedef struct Request Request;
typedef struct Sock Sock;

/* One transfer. Owned by its op: release() frees it, whether it finished or not. */
struct Request {
        RrOp op;
        CURL *easy;               /* NULL once finished (or detached at shutdown) */
        bool in_multi;            /* easy was added to H.multi and is on H.requests */
        struct curl_slist *hdrs;  /* request headers */
        Request *prev, *next;     /* H.requests, while easy is in the multi */

        /* options */
        size_t max_body;
        char *expect;             /* expect_body, or NULL */
        char *host;               /* for "could not resolve host" */

        /* response */
        char *body;
        size_t body_len, body_cap;
        bool truncated;
        char *head;               /* header lines of the last response (after a redirect) */
        size_t head_len, head_cap;
        char errbuf[CURL_ERROR_SIZE];

        /* outcome, filled when curl reports the transfer done */
        CURLcode result;
        long status;
        long os_errno;            /* errno of a failed connect */
        bool connected;           /* the connection (TCP, and TLS for https) was completed */
        char *effective_url;
        double started, duration;
};

/* One socket curl asked us to watch. */
struct Sock {
        sd_event_source *source;
        curl_socket_t fd;
        Sock *prev, *next;
};

/* The process's one HTTP client. */
static struct {
        bool global_init;
        CURLM *multi;
        sd_event_source *timer;
        Request *requests;
        Sock *socks;
        unsigned n_requests, n_socks;
} H;

/* Take r off H.requests. */
static void list_unlink_request(Request *r) {
        if (r->prev)
                r->prev->next = r->next;
        else if (H.requests == r)
                H.requests = r->next;
        if (r->next)
                r->next->prev = r->prev;
        r->prev = r->next = NULL;
}

/* Take r's easy handle out of the multi and free it; r itself stays (its op owns it). */
static void request_detach(Request *r) {
        if (!r->easy)
                return;
        if (r->in_multi) {
                list_unlink_request(r);
                H.n_requests--;
                curl_multi_remove_handle(H.multi, r->easy); /* before the cleanup, always */
                r->in_multi = false;
        }
        curl_easy_cleanup(r->easy);
        r->easy = NULL;
}

/* Free r and everything it holds, removing its transfer first if still in flight. */
static void request_free(Request *r) {
        if (!r)
                return;
        request_detach(r);
        curl_slist_free_all(r->hdrs);
        free(r->expect);
        free(r->host);
        free(r->body);
        free(r->head);
        free(r->effective_url);
        free(r);
}

/* ---- curl's sockets and timer on sd-event ---- */

/* Stop watching a socket: its io source goes, the socket itself is curl's. */
static void sock_free(Sock *s) {
        if (!s)
                return;
        sd_event_source_disable_unref(s->source);
        if (s->prev)
                s->prev->next = s->next;
        else if (H.socks == s)
                H.socks = s->next;
        if (s->next)
                s->next->prev = s->prev;
        H.n_socks--;
        free(s);
}

/* Hand every finished transfer back to its op; called after each curl_multi_socket_action(). */
static void check_multi_info(void) {
        CURLMsg *msg;
        int left;

        while ((msg = curl_multi_info_read(H.multi, &left))) {
                Request *r;
                curl_off_t connect_us = 0;
                char *url = NULL, *priv = NULL;

                if (msg->msg != CURLMSG_DONE)
                        continue;
                curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &priv);
                r = (Request *) priv;
                if (!r)
                        continue;
                r->result = msg->data.result; /* read before the handle goes: msg dies with it */
                r->duration = rr_now() - r->started;
                curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &r->status);
                curl_easy_getinfo(r->easy, CURLINFO_OS_ERRNO, &r->os_errno);
                if (curl_easy_getinfo(r->easy, CURLINFO_CONNECT_TIME_T, &connect_us) == CURLE_OK)
                        r->connected = connect_us > 0;
                if (curl_easy_getinfo(r->easy, CURLINFO_EFFECTIVE_URL, &url) == CURLE_OK && url)
                        r->effective_url = strdup(url); /* NULL on OOM: push() falls back */
                /* The connection goes back to the multi's cache; the easy handle is done. */
                request_detach(r);
                rr_op_complete(&r->op);
        }
}

/* Tell curl what happened on fd (or that its timer fired), then collect finished transfers. */
static void socket_action(curl_socket_t fd, int events) {
        int running;
        CURLMcode mc;

        mc = curl_multi_socket_action(H.multi, fd, events, &running);
        if (mc != CURLM_OK)
                fprintf(stderr, "rrengine: curl_multi_socket_action failed: %s\n", curl_multi_strerror(mc));
        check_multi_info();
}

/* sd-event: a socket curl watches is ready. */
static int on_io(sd_event_source *src, int fd, uint32_t revents, void *userdata) {
        int action = 0;

        (void) src;
        (void) userdata;
        if (revents & (EPOLLIN | EPOLLHUP))
                action |= CURL_CSELECT_IN;
        if (revents & EPOLLOUT)
                action |= CURL_CSELECT_OUT;
        if (revents & EPOLLERR)
                action |= CURL_CSELECT_ERR;
        /* May free this very source (CURL_POLL_REMOVE); sd-event allows that while dispatching. */
        socket_action(fd, action);
        return 0;
}

/* sd-event: curl's timeout is due. */
static int on_timer(sd_event_source *src, uint64_t usec, void *userdata) {
        (void) src;
        (void) usec;
        (void) userdata;
        socket_action(CURL_SOCKET_TIMEOUT, 0);
        return 0;
}

/* CURLMOPT_SOCKETFUNCTION: watch fd for what curl wants, or stop watching it. */
static int curl_socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp) {
        Sock *s = socketp;
        uint32_t events = 0;
        int r;

        (void) easy;
        (void) userp;
        if (what == CURL_POLL_REMOVE) {
                if (s) {
                        curl_multi_assign(H.multi, fd, NULL);
                        sock_free(s);
                }
                return 0;
        }
        if (what & CURL_POLL_IN)
                events |= EPOLLIN;
        if (what & CURL_POLL_OUT)
                events |= EPOLLOUT;

        if (!s) {
                /* A socket curl never told us it closed cannot still be registered under a reused
                 * number: drop such a stale entry first (sd-event would say EEXIST). */
                for (Sock *o = H.socks; o; o = o->next)
                        if (o->fd == fd) {
                                sock_free(o);
                                break;
                        }
                s = calloc(1, sizeof *s);
                if (!s)
                        return -1;
                s->fd = fd;
                r = sd_event_add_io(rr_loop_event(), &s->source, fd, events, on_io, NULL);
                if (r < 0) {
                        fprintf(stderr, "rrengine: Failed to watch a curl socket: %s\n", strerror(-r));
                        free(s);
                        return -1;
                }
                s->next = H.socks;
                if (H.socks)
                        H.socks->prev = s;
                H.socks = s;
                H.n_socks++;
                curl_multi_assign(H.multi, fd, s);
        } else if (events) {
                r = sd_event_source_set_io_events(s->source, events);
                if (r < 0)
                        return -1;
        }
        /* CURL_POLL_NONE (no events) pauses the source rather than removing it. */
        r = sd_event_source_set_enabled(s->source, events ? SD_EVENT_ON : SD_EVENT_OFF);
        return r < 0 ? -1 : 0;
}

/* CURLMOPT_TIMERFUNCTION: -1 disarms; 0 means "soon", from the loop, never from in here. */
static int curl_timer_cb(CURLM *multi, long timeout_ms, void *userp) {
        struct timespec ts;
        uint64_t now;
        int r;

        (void) multi;
        (void) userp;
        if (timeout_ms < 0)
                return sd_event_source_set_enabled(H.timer, SD_EVENT_OFF) < 0 ? -1 : 0;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        now = (uint64_t) ts.tv_sec * 1000000u + (uint64_t) ts.tv_nsec / 1000u;
        r = sd_event_source_set_time(H.timer, now + (uint64_t) timeout_ms * 1000u);
        if (r >= 0)
                r = sd_event_source_set_enabled(H.timer, SD_EVENT_ONESHOT);
        return r < 0 ? -1 : 0;
}

/* Free the multi handle and everything attached to it. Requests still pending are detached:
 * their ops keep the (now inert) Request until release(). */
static void state_free(void) {
        while (H.requests)
                request_detach(H.requests);
        if (H.multi)
                curl_multi_cleanup(H.multi); /* may report CURL_POLL_REMOVE for cached connections */
        H.multi = NULL;
        while (H.socks)
                sock_free(H.socks);
        H.timer = sd_event_source_disable_unref(H.timer);
        if (H.global_init)
                curl_global_cleanup();
        H.global_init = false;
}

/* Creates the multi handle at first use. Returns 0 or a negative errno. */
static int state_init(void) {
        int r;

        if (H.multi)
                return 0;
        if (!H.global_init) {
                if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
                        return -EIO;
                H.global_init = true;
        }
        if (!H.timer) {
                /* 1 µs accuracy: curl's timeouts are often "0 ms, run me again soon", and sd-event's
                 * default slack would add a millisecond to every request (measured by make bench). */
                r = sd_event_add_time(rr_loop_event(), &H.timer, CLOCK_MONOTONIC, UINT64_MAX, 1, on_timer, NULL);
                if (r < 0)
                        return r;
                (void) sd_event_source_set_description(H.timer, "curl-timer");
                r = sd_event_source_set_enabled(H.timer, SD_EVENT_OFF);
                if (r < 0)
                        return r;
        }
        H.multi = curl_multi_init();
        if (!H.multi)
                return -ENOMEM;
        if (curl_multi_setopt(H.multi, CURLMOPT_SOCKETFUNCTION, curl_socket_cb) != CURLM_OK ||
            curl_multi_setopt(H.multi, CURLMOPT_TIMERFUNCTION, curl_timer_cb) != CURLM_OK) {
                curl_multi_cleanup(H.multi);
                H.multi = NULL;
                return -EIO;
        }
        return 0;
}

/* __gc of the module's sentinel: lua_close() frees the multi handle through it. */
static int http_state_gc(lua_State *L) {
        (void) L;
        state_free();
        return 0;
}

/* ---- one transfer ---- */

/* CURLOPT_WRITEFUNCTION: keep up to max_body bytes; past that, mark truncated and stop the
 * transfer (returning less than given makes curl end it with CURLE_WRITE_ERROR). */
static size_t on_body(char *data, size_t size, size_t nmemb, void *userdata) {
        Request *r = userdata;
        size_t n = size * nmemb, room = r->max_body - r->body_len, take = n < room ? n : room;

        if (take > 0) {
                if (r->body_len + take > r->body_cap) {
                        size_t cap = r->body_cap ? r->body_cap : 4096;
                        char *p;
                        while (cap < r->body_len + take)
                                cap *= 2;
                        if (cap > r->max_body)
                                cap = r->max_body;
                        p = realloc(r->body, cap);
                        if (!p)
                                return 0; /* CURLE_WRITE_ERROR, not truncated: reported as such */
                        r->body = p;
                        r->body_cap = cap;
                }
                memcpy(r->body + r->body_len, data, take);
                r->body_len += take;
        }
        if (take < n) {
                r->truncated = true;
                return 0;
        }
        return n;
}

/* CURLOPT_HEADERFUNCTION: keep the header lines of the last response only. */
static size_t on_header(char *data, size_t size, size_t nmemb, void *userdata) {
        Request *r = userdata;
        size_t n = size * nmemb;

        if (n >= 5 && memcmp(data, "HTTP/", 5) == 0) {
                r->head_len = 0; /* a new response (redirect, 100 Continue): forget the last one */
                return n;
        }
        if (r->head_len + n > MAX_HEAD)
                return n; /* dropped, not fatal */
        if (r->head_len + n > r->head_cap) {
                size_t cap = r->head_cap ? r->head_cap * 2 : 1024;
                char *p;
                while (cap < r->head_len + n)
                        cap *= 2;
                p = realloc(r->head, cap);
                if (!p)
                        return n;
                r->head = p;
                r->head_cap = cap;
        }
        memcpy(r->head + r->head_len, data, n);
        r->head_len += n;
        return n;
}

/* Whitespace around a header value (and the line end). */
static bool is_space(char c) {
        return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* Pushes the response headers as a table: lower-case names; repeated fields joined by ", ". */
static void push_headers(lua_State *L, const Request *r) {
        const char *p = r->head, *end = r->head + r->head_len;

        lua_newtable(L);
        while (p && p < end) {
                const char *eol = memchr(p, '\n', (size_t) (end - p));
                const char *line_end = eol ? eol : end, *colon, *v, *ve;
                char name[256];
                size_t nlen;

                colon = memchr(p, ':', (size_t) (line_end - p));
                if (!colon || colon == p || (size_t) (colon - p) >= sizeof name)
                        goto next; /* the blank line, obsolete folding, or junk */
                nlen = (size_t) (colon - p);
                for (size_t i = 0; i < nlen; i++) {
                        char c = p[i];
                        name[i] = c >= 'A' && c <= 'Z' ? (char) (c - 'A' + 'a') : c;
                }
                for (v = colon + 1; v < line_end && is_space(*v); v++)
                        ;
                for (ve = line_end; ve > v && is_space(ve[-1]); ve--)
                        ;
                lua_pushlstring(L, name, nlen);      /* hdrs name */
                lua_pushvalue(L, -1);                /* hdrs name name */
                lua_rawget(L, -3);                   /* hdrs name old */
                if (lua_isstring(L, -1)) {
                        lua_pushliteral(L, ", ");
                        lua_pushlstring(L, v, (size_t) (ve - v));
                        lua_concat(L, 3);            /* hdrs name old..", "..value */
                } else {
                        lua_pop(L, 1);
                        lua_pushlstring(L, v, (size_t) (ve - v)); /* hdrs name value */
                }
                lua_rawset(L, -3);                   /* hdrs */
        next:
                p = eol ? eol + 1 : end;
        }
}

/* The transfer was a success if curl finished it, or if we stopped it at max_body. */
static bool request_ok(const Request *r) {
        return r->result == CURLE_OK || (r->result == CURLE_WRITE_ERROR && r->truncated);
}

/* Pushes nil, message, code for a failed transfer; see docs/scripting.md, "rr.http", for the codes. */
static int request_push_failure(lua_State *L, const Request *r) {
        char code[32], secs[32];

        lua_pushnil(L);
        switch (r->result) {
        case CURLE_OPERATION_TIMEDOUT:
                /* Connected: the peer accepted and then did not answer in time (unhealthy).
                 * Not connected: nothing answered the connection attempt (resolve or SYN). */
                snprintf(secs, sizeof secs, "%.1f", r->duration);
                if (r->connected) {
                        lua_pushfstring(L, "timed out after %s s", secs);
                        lua_pushliteral(L, "timeout");
                } else {
                        lua_pushfstring(L, "connect timed out after %s s", secs);
                        lua_pushliteral(L, "connect_timeout");
                }
                return 3;
        case CURLE_COULDNT_CONNECT:
                if (r->os_errno == ECONNREFUSED) {
                        lua_pushliteral(L, "connection refused");
                        lua_pushliteral(L, "refused");
                } else {
                        lua_pushfstring(L, "could not connect: %s",
                                        r->os_errno > 0 ? strerror((int) r->os_errno)
                                        : r->errbuf[0] ? r->errbuf : curl_easy_strerror(r->result));
                        lua_pushliteral(L, "connect");
                }
                return 3;
        case CURLE_COULDNT_RESOLVE_HOST:
                lua_pushfstring(L, "could not resolve host %s", r->host ? r->host : "(unknown)");
                lua_pushliteral(L, "resolve");
                return 3;
        case CURLE_UNSUPPORTED_PROTOCOL:
                /* Only reachable through a redirect to another scheme: the effective URL is the
                 * refused target. */
                lua_pushfstring(L, "only http and https URLs are allowed: redirect to %s",
                                r->effective_url ? r->effective_url : "another scheme");
                lua_pushliteral(L, "protocol");
                return 3;
        default:
                if (r->errbuf[0])
                        lua_pushfstring(L, "%s: %s", curl_easy_strerror(r->result), r->errbuf);
                else
                        lua_pushstring(L, curl_easy_strerror(r->result));
                snprintf(code, sizeof code, "curl:%d", (int) r->result);
                lua_pushstring(L, code);
                return 3;
        }
}

/* RrOp.push: res, or nil, message, code. */
static int request_push(lua_State *L, RrOp *op) {
        Request *r = (Request *) op;

        if (!request_ok(r))
                return request_push_failure(L, r);
        lua_createtable(L, 0, 8);
        lua_pushinteger(L, r->status);
        lua_setfield(L, -2, "status");
        push_headers(L, r);
        lua_setfield(L, -2, "headers");
        lua_pushlstring(L, r->body ? r->body : "", r->body_len);
        lua_setfield(L, -2, "body");
        lua_pushboolean(L, r->truncated);
        lua_setfield(L, -2, "truncated");
        lua_pushnumber(L, r->duration);
        lua_setfield(L, -2, "duration");
        lua_pushstring(L, r->effective_url ? r->effective_url : "");
        lua_setfield(L, -2, "url");
        if (r->expect) {
                lua_pushboolean(L, r->expect[0] == '\0' ||
                                           (r->body_len > 0 && memmem(r->body, r->body_len, r->expect, strlen(r->expect))));
                lua_setfield(L, -2, "body_matches");
        }
        return 1;
}

/* RrOp.release: also for a request still in flight (its task was canceled). */
static void request_release(RrOp *op) {
        request_free((Request *) op);
}

/* ---- the Lua API ---- */

/* A request's parameters, read from Lua before anything is allocated (so a Lua error cannot
 * leak C memory). The strings point into values on the caller's stack. */
typedef struct {
        const char *url;
        const char *method;
        const char *body;
        size_t body_len;
        const char *expect;
        const char *proxy;
        double timeout, connect_timeout;
        lua_Integer max_body;
        bool follow;
        int headers_idx; /* stack index of the headers table, or 0 */
} Params;

/* A character allowed in an HTTP token (header name, method): RFC 9110's tchar. */
static bool is_tchar(unsigned char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
               (c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

/* Checks that the table at idx is a map of header names to string values. */
static void check_headers(lua_State *L, int idx) {
        lua_pushnil(L);
        while (lua_next(L, idx)) {
                size_t nlen, vlen;
                const char *name, *value;

                if (lua_type(L, -2) != LUA_TSTRING)
                        luaL_error(L, "headers: names must be strings");
                name = lua_tolstring(L, -2, &nlen);
                if (nlen == 0 || nlen > 200)
                        luaL_error(L, "headers: invalid name '%s'", name);
                for (size_t i = 0; i < nlen; i++)
                        if (!is_tchar((unsigned char) name[i]))
                                luaL_error(L, "headers: invalid name '%s'", name);
                if (lua_type(L, -1) != LUA_TSTRING)
                        luaL_error(L, "headers: value of '%s' must be a string", name);
                value = lua_tolstring(L, -1, &vlen);
                if (strcspn(value, "\r\n") != vlen)
                        luaL_error(L, "headers: value of '%s' contains a line break or NUL", name);
                lua_pop(L, 1);
        }
}

/* fmin() without libm. */
static double min_d(double a, double b) {
        return a < b ? a : b;
}

/* A duration option in seconds (> 0), or def when absent. */
static double opt_seconds(lua_State *L, int idx, const char *name, double def) {
        double v;

        lua_getfield(L, idx, name);
        if (lua_isnil(L, -1)) {
                lua_pop(L, 1);
                return def;
        }
        if (!lua_isnumber(L, -1))
                luaL_error(L, "option '%s' must be a number of seconds", name);
        v = lua_tonumber(L, -1);
        if (!(v > 0 && v <= MAX_TIMEOUT))
                luaL_error(L, "option '%s' must be > 0 and <= %d seconds", name, (int) MAX_TIMEOUT);
        lua_pop(L, 1);
        return v;
}

/* A string option, left on the stack (so the pointer stays valid); NULL when absent. */
static const char *opt_string(lua_State *L, int idx, const char *name, size_t *len) {
        lua_getfield(L, idx, name);
        if (lua_isnil(L, -1))
                return NULL;
        if (lua_type(L, -1) != LUA_TSTRING)
                luaL_error(L, "option '%s' must be a string", name);
        return lua_tolstring(L, -1, len);
}

/* Reads the options table at idx into p. for_request: the table is http.request's (url, method
 * and body are allowed there). Raises on misuse. Leaves values on the stack. */
static void read_params(lua_State *L, int idx, Params *p, bool for_request) {
        static const char *const common[] = { "timeout", "connect_timeout", "max_body", "headers",
                                              "follow_redirects", "expect_body", "proxy", NULL };
        static const char *const request_only[] = { "url", "method", "body", NULL };

        luaL_checkstack(L, 16, NULL);
        /* Unknown fields are typos ("timout"): say so instead of ignoring them. */
        lua_pushnil(L);
        while (lua_next(L, idx)) {
                const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
                bool known = false;
                for (int i = 0; k && common[i] && !known; i++)
                        known = strcmp(k, common[i]) == 0;
                for (int i = 0; k && for_request && request_only[i] && !known; i++)
                        known = strcmp(k, request_only[i]) == 0;
                if (!known)
                        luaL_error(L, "unknown option '%s'", k ? k : luaL_typename(L, -2));
                lua_pop(L, 1);
        }

        p->timeout = opt_seconds(L, idx, "timeout", DEFAULT_TIMEOUT);
        p->connect_timeout = opt_seconds(L, idx, "connect_timeout", min_d(p->timeout, DEFAULT_CONNECT_TIMEOUT));

        lua_getfield(L, idx, "max_body");
        if (lua_isnil(L, -1))
                p->max_body = DEFAULT_MAX_BODY;
        else {
                int isnum;
                p->max_body = lua_tointegerx(L, -1, &isnum);
                if (!isnum || p->max_body < 0 || p->max_body > MAX_MAX_BODY)
                        luaL_error(L, "option 'max_body' must be an integer from 0 to %d", (int) MAX_MAX_BODY);
        }
        lua_pop(L, 1);

        lua_getfield(L, idx, "follow_redirects");
        if (!lua_isnil(L, -1) && !lua_isboolean(L, -1))
                luaL_error(L, "option 'follow_redirects' must be a boolean");
        p->follow = lua_toboolean(L, -1);
        lua_pop(L, 1);

        lua_getfield(L, idx, "headers"); /* stays on the stack */
        if (lua_istable(L, -1)) {
                p->headers_idx = lua_gettop(L);
                check_headers(L, p->headers_idx);
        } else if (!lua_isnil(L, -1))
                luaL_error(L, "option 'headers' must be a table of name = value");

        p->expect = opt_string(L, idx, "expect_body", NULL);
        p->proxy = opt_string(L, idx, "proxy", NULL);
        if (for_request) {
                p->method = opt_string(L, idx, "method", NULL);
                p->body = opt_string(L, idx, "body", &p->body_len);
        }
}

/* Checks that url parses and is http or https. Returns true if so, with a copy of its host
 * name in *host; else false with why/code for the caller's `nil, "why: url", code`. */
static bool check_url(const char *url, char **host, const char **why, const char **code) {
        CURLU *u = curl_url();
        char *scheme = NULL;
        bool ok = false;

        *host = NULL;
        if (!u) {
                *why = "out of memory";
                *code = "ENOMEM";
                return false;
        }
        /* Any scheme parses, so that a wrong one is reported as such, not as a bad URL. */
        if (curl_url_set(u, CURLUPART_URL, url, CURLU_NON_SUPPORT_SCHEME) != CURLUE_OK ||
            curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK) {
                *why = "invalid URL";
                *code = "url";
        } else if (strcasecmp(scheme, "http") != 0 && strcasecmp(scheme, "https") != 0) {
                *why = "only http and https URLs are allowed";
                *code = "protocol";
        } else {
                char *h = NULL;
                if (curl_url_get(u, CURLUPART_HOST, &h, 0) == CURLUE_OK && h) {
                        *host = strdup(h);
                        curl_free(h);
                }
                ok = true;
        }
        curl_free(scheme);
        curl_url_cleanup(u);
        return ok;
}

/* Seconds to whole milliseconds, rounded up, at least 1 (0 would mean "no limit" to curl). */
static long to_ms(double secs) {
        double ms = secs * 1000.0;
        long whole = (long) ms;
        if ((double) whole < ms)
                whole++;
        return whole < 1 ? 1 : whole;
}


/* Builds the easy handle for p into r. Returns 0 or a negative errno. No Lua errors. */
static int request_setup(lua_State *L, Request *r, const Params *p) {
        const char *method = p->method ? p->method : "GET";
        CURL *e;
        bool ok = true;

        e = r->easy = curl_easy_init();
        if (!e)
                return -ENOMEM;

        if (p->headers_idx) {
                /* check_headers() validated every entry; nothing here raises. */
                lua_pushnil(L);
                while (lua_next(L, p->headers_idx)) {
                        size_t nlen, vlen;
                        const char *name = lua_tolstring(L, -2, &nlen), *value = lua_tolstring(L, -1, &vlen);
                        char *line;
                        struct curl_slist *l;
                        /* "Name;" is curl's way to send an empty header ("Name:" would remove it). */
                        int n = vlen ? asprintf(&line, "%s: %s", name, value) : asprintf(&line, "%s;", name);
                        if (n < 0) {
                                lua_pop(L, 2);
                                return -ENOMEM;
                        }
                        l = curl_slist_append(r->hdrs, line);
                        free(line);
                        if (!l) {
                                lua_pop(L, 2);
                                return -ENOMEM;
                        }
                        r->hdrs = l;
                        lua_pop(L, 1);
                }
        }

        ok = ok && curl_easy_setopt(e, CURLOPT_URL, p->url) == CURLE_OK;
        ok = ok && curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https") == CURLE_OK;
        ok = ok && curl_easy_setopt(e, CURLOPT_REDIR_PROTOCOLS_STR, "http,https") == CURLE_OK;
        ok = ok && curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L) == CURLE_OK;
        ok = ok && curl_easy_setopt(e, CURLOPT_PRIVATE, r) == CURLE_OK;
        ok = ok && curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf) == CURLE_OK;
        ok = ok && curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body) == CURLE_OK;
        ok = ok && curl_easy_setopt(e, CURLOPT_WRITEDATA, r) == CURLE_OK;
        ok = ok && curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header) == CURLE_OK;
        ok = ok && curl_easy_setopt(e, CURLOPT_HEADERDATA, r) == CURLE_OK;
        ok = ok && curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, to_ms(p->timeout)) == CURLE_OK;
        ok = ok && curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, to_ms(p->connect_timeout)) == CURLE_OK;
        ok = ok && curl_easy_setopt(e, CURLOPT_USERAGENT, USER_AGENT) == CURLE_OK;
        /* Proxies only when asked: probes go to local services, and an http_proxy variable
         * inherited from a CI job must not reroute them. "" ignores the environment. */
        ok = ok && curl_easy_setopt(e, CURLOPT_PROXY, p->proxy ? p->proxy : "") == CURLE_OK;
        ok = ok && curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, p->follow ? 1L : 0L) == CURLE_OK;
        ok = ok && curl_easy_setopt(e, CURLOPT_MAXREDIRS, MAX_REDIRECTS) == CURLE_OK;
        if (r->hdrs)
                ok = ok && curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->hdrs) == CURLE_OK;
        if (strcmp(method, "HEAD") == 0)
                ok = ok && curl_easy_setopt(e, CURLOPT_NOBODY, 1L) == CURLE_OK;
        else if (p->body || strcmp(method, "POST") == 0) {
                /* A body makes curl send a POST (an empty one for a POST without body, rather
                 * than curl's default of reading the body from stdin); other methods are named. */
                ok = ok && curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) p->body_len) == CURLE_OK;
                ok = ok && curl_easy_setopt(e, CURLOPT_COPYPOSTFIELDS, p->body ? p->body : "") == CURLE_OK;
                if (strcmp(method, "POST") != 0)
                        ok = ok && curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method) == CURLE_OK;
        } else if (strcmp(method, "GET") != 0)
                ok = ok && curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method) == CURLE_OK;
        if (!ok)
                return -ENOMEM; /* setopt fails only on OOM with these options */
        return 0;
}

/* Common body of http.get and http.request; the options table is at idx (0: none). */
static int start_request(lua_State *L, const char *url, int idx, bool for_request) {
        rr_canceled(L, true); /* a cancelled task must not start a side effect it never sees */
        Params p = { 0 };
        Request *r;
        const char *why, *code;
        char *host = NULL;
        int e;

        p.url = url;
        if (idx)
                read_params(L, idx, &p, for_request);
        else {
                p.timeout = DEFAULT_TIMEOUT;
                p.connect_timeout = min_d(p.timeout, DEFAULT_CONNECT_TIMEOUT);
                p.max_body = DEFAULT_MAX_BODY;
        }
        if (for_request) {
                if (!p.method)
                        p.method = "GET";
                for (const char *c = p.method; *c; c++)
                        if (!is_tchar((unsigned char) *c) || (*c >= 'a' && *c <= 'z'))
                                return luaL_error(L, "option 'method' must be an upper-case HTTP method");
                if (!*p.method)
                        return luaL_error(L, "option 'method' must be an upper-case HTTP method");
                if (p.body && strcmp(p.method, "HEAD") == 0)
                        return luaL_error(L, "a HEAD request cannot have a body");
        }

        /* Expected failures from here on: a bad URL comes from configuration, not from code. */
        if (!check_url(url, &host, &why, &code))
                return lua_pushnil(L), lua_pushfstring(L, "%s: %s", why, url), lua_pushstring(L, code), 3;

        e = state_init();
        if (e < 0) {
                free(host);
                return rr_push_fail(L, -e, "cannot start HTTP client: %s", strerror(-e));
        }
        r = calloc(1, sizeof *r);
        if (!r) {
                free(host);
                return rr_push_fail(L, ENOMEM, "out of memory");
        }
        r->host = host;
        r->op.push = request_push;
        r->op.release = request_release;
        r->max_body = (size_t) p.max_body;
        if (p.expect && !(r->expect = strdup(p.expect))) {
                request_free(r);
                return rr_push_fail(L, ENOMEM, "out of memory");
        }
        e = request_setup(L, r, &p);
        if (e < 0) {
                request_free(r);
                return rr_push_fail(L, -e, "cannot set up the request: %s", strerror(-e));
        }
        r->started = rr_now();
        if (curl_multi_add_handle(H.multi, r->easy) != CURLM_OK) {
                request_free(r); /* not in_multi: only the easy handle is cleaned up */
                return rr_push_fail(L, EIO, "cannot start the transfer");
        }
        r->in_multi = true;
        r->next = H.requests;
        if (H.requests)
                H.requests->prev = r;
        H.requests = r;
        H.n_requests++;
        /* curl_multi_add_handle() armed the timer at 0: the loop starts the transfer. */
        return rr_op_await(L, &r->op);
}

/* http.get(url [, opts]) -> res | nil, err, code */
static int http_get(lua_State *L) {
        const char *url;

        if (lua_type(L, 1) != LUA_TSTRING)
                return luaL_argerror(L, 1, "URL string expected");
        url = lua_tostring(L, 1);
        if (!lua_isnoneornil(L, 2))
                luaL_checktype(L, 2, LUA_TTABLE);
        return start_request(L, url, lua_istable(L, 2) ? 2 : 0, false);
}

/* http.request{url=, method=, body=, headers=, ...} -> res | nil, err, code */
static int http_request(lua_State *L) {
        const char *url;

        luaL_checktype(L, 1, LUA_TTABLE);
        lua_getfield(L, 1, "url");
        if (lua_type(L, -1) != LUA_TSTRING)
                return luaL_argerror(L, 1, "field 'url' must be a string");
        url = lua_tostring(L, -1); /* stays on the stack */
        return start_request(L, url, 1, true);
}

/* http.stats() -> { requests = transfers in flight, sockets = sockets watched } */
static int http_stats(lua_State *L) {
        lua_createtable(L, 0, 2);
        lua_pushinteger(L, H.n_requests);
        lua_setfield(L, -2, "requests");
        lua_pushinteger(L, H.n_socks);
        lua_setfield(L, -2, "sockets");
        return 1;
}

static const luaL_Reg http_functions[] = {
        { "get", http_get },
        { "request", http_request },
        { "stats", http_stats },
        { NULL, NULL },
};

int luaopen_rr_http(lua_State *L) {
        /* The sentinel whose __gc frees the multi handle at lua_close(); one per state. */
        if (lua_getfield(L, LUA_REGISTRYINDEX, STATE_KEY) == LUA_TNIL) {
                lua_newuserdatauv(L, 1, 0);
                if (luaL_newmetatable(L, STATE_MT)) {
                        lua_pushcfunction(L, http_state_gc);
                        lua_setfield(L, -2, "__gc");
                }
                lua_setmetatable(L, -2);
                lua_setfield(L, LUA_REGISTRYINDEX, STATE_KEY);
        }
        lua_pop(L, 1);
        luaL_newlib(L, http_functions);
        return 1;
}
