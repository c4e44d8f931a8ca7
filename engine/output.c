/* The output of a child, read on the loop (see output.h): pipes, capture, lines delivered to
 * on_line as tasks, flow control. rr.proc and rr.systemd's m:run() share it. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/epoll.h>

#include "output.h"

#define BOX_MT "rr.output"
#define TOKEN_MT "rr.output.call"
#define LINE_MAX_BYTES (64 * 1024)  /* longer lines are delivered in pieces of this size */
#define READ_CHUNK (64 * 1024)
#define READS_PER_EVENT 4           /* then let other sources have a turn */
#define FINAL_READS 64              /* bound the drain at the end (a grandchild may keep writing) */
#define CALLS_HIGH 4096             /* callback tasks pending: stop reading (the writer blocks) */
#define CALLS_LOW 1024              /* ... and read again below this */
#define CB_LINE 1                   /* the box's user values */
#define CB_EXTRA 2

/* The userdata standing for an output in Lua. */
struct RrOutputBox {
        RrOutput *output; /* NULL once the output is freed */
};

/* A callback task's token: the call counts as pending until the token is closed. */
typedef struct Token {
        bool done;
        int which; /* CB_LINE or CB_EXTRA */
} Token;

static lua_State *main_L; /* loop callbacks run Lua on the main thread only */
static int boxes_ref = LUA_NOREF; /* weak table: lightuserdata box -> its userdata */

/* ---- flow control and completion ---- */

/* With too many callbacks pending, stop reading both pipes (the writer then blocks on a full
 * pipe) instead of queueing tasks without bound. */
static void set_reading(RrOutput *o, bool on) {
        o->paused = !on;
        if (o->out.source)
                (void) sd_event_source_set_enabled(o->out.source, on ? SD_EVENT_ON : SD_EVENT_OFF);
        if (o->err.source)
                (void) sd_event_source_set_enabled(o->err.source, on ? SD_EVENT_ON : SD_EVENT_OFF);
}

static void progress(RrOutput *o) {
        if (o->progress)
                o->progress(o);
}

/* Both pipes done and every callback returned. */
bool rr_output_idle(const RrOutput *o) {
        return o->out.eof && o->err.eof && o->pending == 0;
}

/* ---- callback tasks ---- */

/* __close of a token: the call it stands for is over (returned, raised, or its task was
 * canceled). Idempotent. */
static int token_close(lua_State *L) {
        Token *t = luaL_checkudata(L, 1, TOKEN_MT);
        RrOutputBox *b;

        if (t->done)
                return 0;
        t->done = true;
        lua_getiuservalue(L, 1, 1);
        b = lua_touserdata(L, -1);
        if (b && b->output) {
                RrOutput *o = b->output;
                o->pending--;
                if (o->paused && o->pending <= CALLS_LOW)
                        set_reading(o, true);
                progress(o);
        }
        return 0;
}

/* trampoline's continuation after the callback waited: nothing is left to do. */
static int trampoline_k(lua_State *L, int status, lua_KContext ctx) {
        (void) L;
        (void) status;
        (void) ctx;
        return 0;
}

/* The body of a callback task: calls the box's callback with the task's arguments. Upvalue 1 is
 * the token, whose user value is the box (kept alive by the task), whose user value is the
 * callback. The token is to-be-closed, so the call counts as done however it ends (the task's
 * own error handling, with the callback's traceback, is untouched), and lua_callk lets the
 * callback wait. */
static int trampoline(lua_State *L) {
        int n = lua_gettop(L);                 /* args... */
        Token *t;

        luaL_checkstack(L, n + 3, NULL);
        lua_pushvalue(L, lua_upvalueindex(1)); /* args... token */
        lua_toclose(L, n + 1);
        t = lua_touserdata(L, n + 1);
        lua_getiuservalue(L, n + 1, 1);        /* args... token box */
        lua_getiuservalue(L, -1, t->which);    /* args... token box fn */
        for (int i = 1; i <= n; i++)
                lua_pushvalue(L, i);           /* args... token box fn args... */
        lua_callk(L, n, 0, 0, trampoline_k);
        return 0;
}

typedef struct CallArgs {
        RrOutput *output;
        int which;
        int (*push_args)(lua_State *L, void *ctx);
        void *ctx;
} CallArgs;

/* deliver()'s Lua part, in protected mode (a memory error must not unwind through sd-event): the
 * box at 1, a CallArgs at 2. */
static int deliver_protected(lua_State *L) {
        const CallArgs *a = lua_touserdata(L, 2);
        Token *t;
        int n;

        lua_settop(L, 1);                      /* box */
        t = lua_newuserdatauv(L, sizeof *t, 1); /* box token */
        t->done = false;
        t->which = a->which;
        luaL_setmetatable(L, TOKEN_MT);
        lua_insert(L, -2);                     /* token box */
        lua_setiuservalue(L, -2, 1);           /* token */
        lua_pushcclosure(L, trampoline, 1);    /* fn */
        n = a->push_args(L, a->ctx);           /* fn args... */
        if (rr_task_spawn(L, n) < 0)
                return luaL_error(L, "cannot start a task");
        a->output->pending++;
        return 0;
}

/* Start the task that calls the box's callback `which`. Runs inside a loop callback, on the main
 * thread; a call that cannot be made (out of memory) is dropped. */
static void deliver(RrOutput *o, int which, int (*push_args)(lua_State *L, void *ctx), void *ctx) {
        lua_State *L = main_L;
        CallArgs a = { o, which, push_args, ctx };

        if (!o->box || !lua_checkstack(L, 8))
                return;
        /* Look the box up before allocating anything: once it is on the stack, a garbage
         * collection step cannot finalize it under us. */
        lua_rawgeti(L, LUA_REGISTRYINDEX, boxes_ref);
        lua_rawgetp(L, -1, o->box); /* boxes box */
        lua_remove(L, -2);
        if (lua_isnil(L, -1)) {
                lua_pop(L, 1); /* being finalized: nobody to tell */
                return;
        }
        lua_pushcfunction(L, deliver_protected); /* box f */
        lua_insert(L, -2);                       /* f box */
        lua_pushlightuserdata(L, &a);            /* f box a */
        if (lua_pcall(L, 2, 0, 0) != LUA_OK) {
                fprintf(stderr, "rrengine: %s: callback dropped: %s\n", o->name, lua_tostring(L, -1));
                lua_pop(L, 1);
        }
}

typedef struct Line {
        const char *stream;
        const char *s;
        size_t len;
} Line;

/* on_line's arguments: stream, line. */
static int push_line(lua_State *L, void *ctx) {
        const Line *l = ctx;
        lua_pushstring(L, l->stream);
        lua_pushlstring(L, l->s, l->len);
        return 2;
}

static void deliver_line(RrStream *st, const char *s, size_t len) {
        Line l = { st->name, s, len };
        deliver(st->output, CB_LINE, push_line, &l);
}

/* Starts the task that calls the box's second callback. */
void rr_output_call(RrOutput *o, int (*push_args)(lua_State *L, void *ctx), void *ctx) {
        deliver(o, CB_EXTRA, push_args, ctx);
}

/* ---- reading ---- */

/* Split data into lines for on_line; a line longer than LINE_MAX_BYTES goes in pieces. */
static void stream_lines(RrStream *st, const char *buf, size_t n) {
        while (n > 0) {
                const char *nl = memchr(buf, '\n', n);
                size_t take = nl ? (size_t) (nl - buf) : n;

                while (take > 0) {
                        size_t c;
                        if (st->line_len == LINE_MAX_BYTES) {
                                deliver_line(st, st->line, st->line_len);
                                st->line_len = 0;
                        }
                        c = LINE_MAX_BYTES - st->line_len;
                        if (c > take)
                                c = take;
                        memcpy(st->line + st->line_len, buf, c);
                        st->line_len += c;
                        buf += c;
                        n -= c;
                        take -= c;
                }
                if (nl) {
                        deliver_line(st, st->line, st->line_len);
                        st->line_len = 0;
                        buf++;
                        n--;
                }
        }
}

/* Keep output for res.stdout / res.stderr, up to max_capture bytes (the rest is dropped and
 * marked truncated). */
static void stream_capture(RrStream *st, const char *buf, size_t n) {
        size_t room = st->output->max_capture - st->capture_len;

        if (n > room) {
                n = room;
                st->truncated = true;
        }
        if (n == 0)
                return;
        if (st->capture_len + n > st->capture_size) {
                size_t size = st->capture_size ? st->capture_size : 4096;
                char *q;
                while (size < st->capture_len + n)
                        size *= 2;
                if (size > st->output->max_capture)
                        size = st->output->max_capture;
                q = realloc(st->capture, size);
                if (!q) {
                        st->truncated = true;
                        return;
                }
                st->capture = q;
                st->capture_size = size;
        }
        memcpy(st->capture + st->capture_len, buf, n);
        st->capture_len += n;
}

/* The pipe is done (end of file, an error, or abandoned at the end): close it, flush the last
 * unterminated line. */
static void stream_eof(RrStream *st) {
        if (st->eof)
                return;
        st->eof = true;
        st->source = sd_event_source_disable_unref(st->source);
        if (st->fd >= 0)
                close(st->fd);
        st->fd = -1;
        if (st->line_len > 0) {
                deliver_line(st, st->line, st->line_len);
                st->line_len = 0;
        }
        free(st->line);
        st->line = NULL;
}

/* Read up to max_reads chunks; true when the pipe has nothing more right now (or is done). With
 * on_line, and unless draining, a read takes no more bytes than there is room for callbacks
 * below CALLS_HIGH: each line needs a byte, so one read never queues more than that (a 64 KiB
 * chunk of short lines queued ten thousand tasks at once). */
static bool stream_read(RrStream *st, int max_reads) {
        char buf[READ_CHUNK];
        RrOutput *o = st->output;

        for (int i = 0; i < max_reads && !st->eof; i++) {
                size_t want = sizeof buf;
                ssize_t n;

                if (o->on_line && !o->draining) {
                        size_t room = o->pending < CALLS_HIGH ? CALLS_HIGH - o->pending : 0;
                        if (room == 0)
                                return false;
                        if (room < want)
                                want = room;
                }
                n = read(st->fd, buf, want);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN)
                                return true;
                        stream_eof(st); /* EIO and friends: treat as the end */
                        return true;
                }
                if (n == 0) {
                        stream_eof(st);
                        return true;
                }
                if (o->capture)
                        stream_capture(st, buf, (size_t) n);
                if (o->on_line)
                        stream_lines(st, buf, (size_t) n);
        }
        return st->eof;
}

/* A pipe is readable: read a few chunks (bounded, so that other sources get their turn), pause
 * reading when too many callbacks are pending. */
static int stream_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        RrStream *st = userdata;
        RrOutput *o = st->output;

        (void) s;
        (void) fd;
        (void) revents;
        for (int i = 0; i < READS_PER_EVENT && o->pending < CALLS_HIGH; i++)
                if (stream_read(st, 1))
                        break;
        if (o->pending >= CALLS_HIGH && !o->draining)
                set_reading(o, false);
        progress(o);
        return 0;
}

/* The writers are gone: read what is in the pipes now (a dying process closes its files before
 * it is reported), then close them. */
void rr_output_drain(RrOutput *o) {
        o->draining = true;
        stream_read(&o->out, FINAL_READS);
        stream_eof(&o->out);
        stream_read(&o->err, FINAL_READS);
        stream_eof(&o->err);
}

/* ---- life cycle ---- */

static void stream_init(RrStream *st, RrOutput *o, const char *name) {
        memset(st, 0, sizeof *st);
        st->output = o;
        st->name = name;
        st->fd = -1;
}

/* An output not yet connected to pipes. */
void rr_output_init(RrOutput *o, const char *name, bool capture, size_t max_capture,
                    void (*progress_cb)(RrOutput *o)) {
        memset(o, 0, sizeof *o);
        stream_init(&o->out, o, "stdout");
        stream_init(&o->err, o, "stderr");
        o->name = name;
        o->capture = capture;
        o->max_capture = max_capture;
        o->progress = progress_cb;
}

/* A pipe whose parent end (*parent) is non-blocking; both ends close-on-exec. */
static int make_pipe(int *parent, int *child) {
        int fds[2];

        if (pipe2(fds, O_CLOEXEC) < 0)
                return -errno;
        *parent = fds[0];
        *child = fds[1];
        if (fcntl(*parent, F_SETFL, O_NONBLOCK) < 0)
                return -errno;
        return 0;
}

/* Makes the two pipes (see output.h). On failure nothing is left open for the caller. */
int rr_output_pipes(RrOutput *o, int *out_child, int *err_child) {
        int r;

        *out_child = *err_child = -1;
        r = make_pipe(&o->out.fd, out_child);
        if (r >= 0)
                r = make_pipe(&o->err.fd, err_child);
        if (r < 0) {
                if (*out_child >= 0)
                        close(*out_child);
                if (*err_child >= 0)
                        close(*err_child);
                *out_child = *err_child = -1;
        }
        return r;
}

/* Starts reading both pipes on the loop. */
int rr_output_watch(RrOutput *o) {
        sd_event *e = rr_loop_event();
        int r;

        r = sd_event_add_io(e, &o->out.source, o->out.fd, EPOLLIN, stream_io, &o->out);
        if (r < 0)
                return r;
        return sd_event_add_io(e, &o->err.source, o->err.fd, EPOLLIN, stream_io, &o->err);
}

static void stream_free(RrStream *st) {
        st->source = sd_event_source_disable_unref(st->source);
        if (st->fd >= 0)
                close(st->fd);
        st->fd = -1;
        free(st->capture);
        st->capture = NULL;
        free(st->line);
        st->line = NULL;
}

/* Closes the pipes, frees the buffers, unties the box. Idempotent. */
void rr_output_free(RrOutput *o) {
        stream_free(&o->out);
        stream_free(&o->err);
        if (o->box) {
                o->box->output = NULL;
                o->box = NULL;
        }
}

/* ---- Lua ---- */

/* __gc of a box: its output (if any) no longer has it. */
static int box_gc(lua_State *L) {
        RrOutputBox *b = luaL_checkudata(L, 1, BOX_MT);

        if (b->output) {
                b->output->box = NULL;
                b->output = NULL;
        }
        return 0;
}

/* Pushes a new box holding the callbacks (see output.h). */
void rr_output_new_box(lua_State *L, int on_line_idx, int extra_idx) {
        RrOutputBox *b;

        on_line_idx = on_line_idx ? lua_absindex(L, on_line_idx) : 0;
        extra_idx = extra_idx ? lua_absindex(L, extra_idx) : 0;
        b = lua_newuserdatauv(L, sizeof *b, 2);
        b->output = NULL;
        luaL_setmetatable(L, BOX_MT);
        if (on_line_idx) {
                lua_pushvalue(L, on_line_idx);
                lua_setiuservalue(L, -2, CB_LINE);
        }
        if (extra_idx) {
                lua_pushvalue(L, extra_idx);
                lua_setiuservalue(L, -2, CB_EXTRA);
        }
        /* Registered now, where an allocation may raise: attaching must not. */
        lua_rawgeti(L, LUA_REGISTRYINDEX, boxes_ref);
        lua_pushvalue(L, -2);
        lua_rawsetp(L, -2, b);
        lua_pop(L, 1);
}

/* Ties o to the box at idx. */
int rr_output_attach(lua_State *L, int idx, RrOutput *o) {
        RrOutputBox *b = luaL_testudata(L, idx, BOX_MT);

        if (!b)
                return -EINVAL;
        o->on_line = lua_getiuservalue(L, idx, CB_LINE) == LUA_TFUNCTION;
        lua_pop(L, 1);
        if (o->on_line) {
                o->out.line = malloc(LINE_MAX_BYTES);
                o->err.line = malloc(LINE_MAX_BYTES);
                if (!o->out.line || !o->err.line)
                        return -ENOMEM;
        }
        b->output = o;
        o->box = b;
        return 0;
}

/* Push what was captured of a stream ("" without capture). */
static void push_capture(lua_State *L, const RrStream *st) {
        lua_pushlstring(L, st->capture ? st->capture : "", st->capture_len);
}

/* stdout, stderr and truncated into the table on top. */
void rr_output_push(lua_State *L, const RrOutput *o) {
        luaL_checkstack(L, 3, NULL);
        push_capture(L, &o->out);
        lua_setfield(L, -2, "stdout");
        push_capture(L, &o->err);
        lua_setfield(L, -2, "stderr");
        lua_createtable(L, 0, 2);
        lua_pushboolean(L, o->out.truncated);
        lua_setfield(L, -2, "stdout");
        lua_pushboolean(L, o->err.truncated);
        lua_setfield(L, -2, "stderr");
        lua_setfield(L, -2, "truncated");
}

/* Metatables, the weak table of boxes, the main thread. */
void rr_output_open(lua_State *L) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
        main_L = lua_tothread(L, -1);
        lua_pop(L, 1);
        if (boxes_ref == LUA_NOREF) {
                lua_newtable(L);
                lua_createtable(L, 0, 1);
                lua_pushliteral(L, "v");
                lua_setfield(L, -2, "__mode");
                lua_setmetatable(L, -2);
                boxes_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        }
        if (luaL_newmetatable(L, TOKEN_MT)) {
                lua_pushcfunction(L, token_close);
                lua_setfield(L, -2, "__close");
        }
        lua_pop(L, 1);
        if (luaL_newmetatable(L, BOX_MT)) {
                lua_pushcfunction(L, box_gc);
                lua_setfield(L, -2, "__gc");
        }
        lua_pop(L, 1);
}

void rr_output_check_opts(lua_State *L, int idx, bool *capture, size_t *max_capture, double *timeout,
                          double *kill_grace) {
        if (lua_getfield(L, idx, "capture") != LUA_TNIL)
                *capture = lua_toboolean(L, -1);
        lua_pop(L, 1);

        if (lua_getfield(L, idx, "max_capture") != LUA_TNIL) {
                lua_Integer m = lua_tointeger(L, -1);
                if (!lua_isinteger(L, -1) || m < 0)
                        luaL_error(L, "bad option 'max_capture' (non-negative integer expected)");
                *max_capture = (size_t) m;
        }
        lua_pop(L, 1);

        if (lua_getfield(L, idx, "timeout") != LUA_TNIL) {
                *timeout = lua_tonumber(L, -1);
                if (!lua_isnumber(L, -1) || !(*timeout > 0 && *timeout < 1e9))
                        luaL_error(L, "bad option 'timeout' (positive number of seconds expected)");
        }
        lua_pop(L, 1);

        if (lua_getfield(L, idx, "kill_grace") != LUA_TNIL) {
                *kill_grace = lua_tonumber(L, -1);
                if (!lua_isnumber(L, -1) || !(*kill_grace >= 0 && *kill_grace < 1e9))
                        luaL_error(L, "bad option 'kill_grace' (non-negative number of seconds expected)");
        }
        lua_pop(L, 1);
}
