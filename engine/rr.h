/* rrengine core: what every primitive module needs from the loop and the task scheduler.
 *
 * One sd-event loop owns everything that waits. A task is a Lua coroutine. A primitive that
 * waits (a unit job, an HTTP request, a child process, a timer) describes its pending work as an
 * RrOp and ends with `return rr_op_await(L, &x->op);`:
 *   - called from a task, the task yields and is resumed once rr_op_complete() was called;
 *   - called outside a task (script top level, REPL, a spec), the loop runs until the op completes.
 * Either way the op's push() then puts the results on the caller's stack and release() frees it.
 * If the caller is cancelled (task:cancel(), or Ctrl-C at the top level) before completion,
 * release() is called on the still-pending op: it must stop the event source / transfer / job
 * wait and free everything, and must not call rr_op_complete() afterwards. */
#pragma once

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/types.h>
#include <unistd.h>

#include <lauxlib.h>
#include <lua.h>
#include <systemd/sd-event.h>

#define _cleanup_(f) __attribute__((cleanup(f)))
#define ELEMENTSOF(x) (sizeof(x) / sizeof((x)[0]))

static inline void freep(void *p) {
        free(*(void **) p);
}

static inline void closep(int *fd) {
        if (*fd >= 0)
                close(*fd);
}

typedef struct RrOp RrOp;
struct RrOp {
        /* Filled by the module before rr_op_await(). */
        int (*push)(lua_State *L, RrOp *op); /* push the results on L; return how many */
        void (*release)(RrOp *op);           /* cancel what is still pending, then free op */

        /* Engine-private. */
        struct RrTask *task; /* the task waiting, NULL when the caller blocks the loop */
        bool done;
};

/* The one loop (never NULL once the engine started). */
sd_event *rr_loop_event(void);

/* Suspend the caller until rr_op_complete(op); see the top of this file. On a start-up failure
 * a primitive must not call this: it frees its op and returns nil, err itself.
 * In a task this leaves the calling C function without returning (lua_yieldk): no _cleanup_
 * variable or other resource owned by that function may be live across it, and its Lua
 * arguments must be read (and checked) before the op is created. */
int rr_op_await(lua_State *L, RrOp *op);

/* Would rr_op_await() raise "canceled" at once here (a cancelled task, or an exit under way)?
 * A primitive with a side effect (a unit job, a process, a request) checks this before starting
 * it: in a cancelled task the result is never seen, so a StopUnit sent anyway would stop a unit
 * nobody starts again (a flow cancelled at shutdown). Raises "canceled" itself when raise is set. */
bool rr_canceled(lua_State *L, bool raise);

/* The operation finished (successfully or not: push() reports which). Safe to call from any
 * loop callback; the waiting task is resumed from the scheduler, never from inside the callback. */
void rr_op_complete(RrOp *op);

/* Start a task running the function at the top of L's stack below nargs arguments; pops the
 * function and its arguments in every case. Used to deliver callbacks (output lines, signals) as
 * tasks so they may wait themselves: never raises (safe inside an sd-event callback). Tasks start
 * in FIFO order on the next scheduler turn. Returns 0 or -ENOMEM. */
int rr_task_spawn(lua_State *L, int nargs);

/* Seconds on CLOCK_MONOTONIC, as a double. */
double rr_now(void);

/* The CLOCK_MONOTONIC time in µs `secs` from now, for sd_event_add_time(). Not
 * sd_event_add_time_relative(): that counts from the loop's last wake-up, stale after Lua ran. */
uint64_t rr_deadline_usec(double secs);

/* Number of stop signals (SIGINT/SIGTERM/SIGHUP) received so far. */
unsigned rr_interrupts(void);

/* Push `nil, message` (and the errno name when errnum > 0) and return the count: the shape of
 * every expected failure. */
int rr_push_fail(lua_State *L, int errnum, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Helpers shared by modules (util.c). */

/* mkdir -p: create path and its missing parents with mode (minus the umask). An existing
 * directory (or a symlink to one) is fine; anything else in the way is -ENOTDIR. Returns 0 or a
 * negative errno. */
int rr_mkdir_p(const char *path, mode_t mode);

/* A permission mode at idx: an integer (420, tonumber("644", 8)) or an octal string ("0644",
 * "644"), since Lua has no octal literals and 0644 in Lua is decimal 644. -1 when not a mode
 * (never raises). */
long long rr_to_mode(lua_State *L, int idx);

/* A name that need not be NUL-terminated (a Lua string borrowed from the stack). */
typedef struct RrName {
        const char *s;
        size_t len;
} RrName;

/* qsort() comparator for RrName: bytewise, a prefix first. */
int rr_name_cmp(const void *a, const void *b);

/* Module openers (each file is one Lua module). */
int luaopen_rr_loop(lua_State *L);
int luaopen_rr_systemd(lua_State *L);
int luaopen_rr_http(lua_State *L);
int luaopen_rr_proc(lua_State *L);
int luaopen_rr_log(lua_State *L);
int luaopen_rr_fs(lua_State *L);
int luaopen_rr_socket(lua_State *L);

/* Engine life cycle, for main.c. */
/* Creates the loop; SIGPIPE is ignored from here on (a closed stdout makes writes fail with
 * EPIPE), SIGCHLD and the stop signals SIGINT/SIGTERM/SIGHUP are blocked and arrive through the
 * loop. */
int rr_loop_init(lua_State *L);
/* Run until every task has finished (or, after an interrupt without a Lua signal handler,
 * until every task was cancelled; or until a task asked to exit). */
void rr_loop_drain(lua_State *L);
/* Cancel every task and release pending ops; call before lua_close(). */
void rr_loop_shutdown(lua_State *L);
void rr_loop_free(void);
/* Run turns until *stop, an interrupt no Lua handler took, or an exit request (the REPL waits
 * for input so). */
int rr_loop_run_until(const bool *stop);
/* The stop signal (SIGINT/SIGTERM/SIGHUP) that no Lua handler took and no wait consumed yet, or
 * 0. Clears it. */
int rr_loop_take_interrupt(void);
/* The last SIGTERM or SIGHUP received, whether a Lua handler took it or not, or 0. Clears it.
 * Ctrl-C only cancels a REPL line; these end the REPL. */
int rr_loop_take_quit_signal(void);

/* os.exit(code) called where the engine cannot exit at once (inside a task, or any coroutine:
 * lua_close() must not run under a live coroutine). Records the code; from then on no task is
 * resumed and every top-level wait raises, so control unwinds to main(), which shuts down
 * (every task cancelled, <close> handlers run) and exits with the code. The caller then raises
 * to unwind its own coroutine. The first code wins. */
void rr_loop_request_exit(int code);
/* Was an exit requested? Stores its code. */
bool rr_loop_exit_requested(int *code);
