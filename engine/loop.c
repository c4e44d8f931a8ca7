/* rr.loop: the one sd-event loop, and Lua coroutines as tasks on it.
 *
 * Tasks never run from inside an sd-event callback: a callback only completes an op, which puts
 * the waiting task on the ready queue; the scheduler resumes ready tasks between two
 * sd_event_run() turns. That keeps Lua out of sd-event's dispatch (sd_event_run() is not
 * reentrant) and lets a task block the loop in a nested turn when it cannot yield. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "rr.h"

#define TASK_MT "rr.task"

typedef enum {
        TASK_READY,
        TASK_RUNNING,
        TASK_WAITING,
        TASK_DONE,
        TASK_FAILED,
        TASK_CANCELED,
} TaskState;

static const char *const task_state_names[] = {
        [TASK_READY] = "ready",     [TASK_RUNNING] = "running", [TASK_WAITING] = "waiting",
        [TASK_DONE] = "done",       [TASK_FAILED] = "failed",   [TASK_CANCELED] = "canceled",
};

typedef struct JoinOp JoinOp;
typedef struct JoinNode JoinNode;

typedef struct RrTask {
        lua_State *co;      /* the coroutine; NULL once finished (results are in uservalue 2) */
        int ref;            /* registry ref keeping the userdata alive until it finishes */
        TaskState state;
        int nargs;          /* arguments on co's stack for the first resume */
        RrOp *op;           /* the op it waits on, while WAITING */
        bool cancel;        /* raise "canceled" at the next wait point */
        bool queued;
        bool error_seen;    /* someone received its error (a join), or it was printed */
        unsigned id;
        struct RrTask *next; /* ready queue */
        JoinNode *joiners;
        /* Limits (task:deadline(), task:max_instructions()): see "Bounded tasks" below. */
        double deadline;                 /* rr_now() by which it must have finished; 0: none */
        double deadline_secs;            /* the seconds it was given, for the message */
        sd_event_source *deadline_timer; /* ends it at the deadline while it waits */
        lua_Integer max_instructions;    /* 0: none */
        lua_Integer instructions_left;   /* until max_instructions is reached */
        int hook_count;                  /* instructions between two count events */
        int limit_hit;                   /* TaskLimit: the limit that ends it */
        bool cancel_raised;              /* the count hook raised "canceled" (once is enough) */
        bool preempted;                  /* it yielded so that a pending stop signal is read */
} RrTask;

typedef enum {
        LIMIT_NONE,
        LIMIT_DEADLINE,
        LIMIT_INSTRUCTIONS,
} TaskLimit;

/* The code rr.wait() returns third for a task that a limit ended. */
static const char *const limit_codes[] = {
        [LIMIT_DEADLINE] = "ETIMEDOUT",
        [LIMIT_INSTRUCTIONS] = "ELIMIT",
};

struct JoinNode {
        JoinNode *next;
        JoinOp *join;
        RrTask *task;
        int ref; /* keeps the task userdata alive while joined */
};

struct JoinOp {
        RrOp op;
        int n;
        int remaining;
        bool as_list; /* rr.wait{...}: one table of results */
        bool any;     /* rr.wait_any: done at the first task that finishes */
        JoinNode nodes[];
};

typedef struct SleepOp {
        RrOp op;
        sd_event_source *source;
} SleepOp;

static struct {
        sd_event *event;
        lua_State *L; /* main thread */
        RrTask *ready_head, *ready_tail;
        RrTask *current;
        unsigned live;
        unsigned next_id;
        unsigned interrupts;
        int interrupt_unhandled; /* a signal no Lua handler took (its number): cancel the top-level wait */
        int quit_signal;         /* the last SIGTERM/SIGHUP, handled or not (the REPL quits on it) */
        int handlers_ref;        /* table of Lua signal handlers */
        bool exit_requested;     /* os.exit() from a task: unwind to the top, then exit */
        bool shutting_down;      /* rr_loop_shutdown() runs: canceled tasks may unwind */
        int exit_code;
        double next_signal_check; /* rr_now() after which a bounded task looks for stop signals */
        bool stop_pending;        /* what it saw then */
        unsigned call_events;     /* of bounded tasks' hooks, to look at the clock on some only */
        RrTask *limit_error_task; /* the task its hook ended, with limit_error_ref (see task_hook) */
        int limit_error_ref;
        sd_event_source *sigint, *sigterm, *sighup;
} S = { .handlers_ref = LUA_NOREF, .limit_error_ref = LUA_NOREF };

sd_event *rr_loop_event(void) {
        return S.event;
}

double rr_now(void) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

uint64_t rr_deadline_usec(double secs) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (uint64_t) ts.tv_sec * 1000000u + (uint64_t) ts.tv_nsec / 1000u + (uint64_t) (secs * 1e6);
}

unsigned rr_interrupts(void) {
        return S.interrupts;
}

int rr_push_fail(lua_State *L, int errnum, const char *fmt, ...) {
        va_list ap;
        char buf[1024];

        va_start(ap, fmt);
        vsnprintf(buf, sizeof buf, fmt, ap);
        va_end(ap);
        lua_pushnil(L);
        lua_pushstring(L, buf);
        if (errnum > 0) {
                const char *name = strerrorname_np(errnum);
                lua_pushstring(L, name ? name : "EUNKNOWN");
                return 3;
        }
        return 2;
}

static void ready_push(RrTask *t) {
        if (t->queued)
                return;
        t->queued = true;
        t->next = NULL;
        if (S.ready_tail)
                S.ready_tail->next = t;
        else
                S.ready_head = t;
        S.ready_tail = t;
}

static RrTask *ready_pop(void) {
        RrTask *t = S.ready_head;
        if (!t)
                return NULL;
        S.ready_head = t->next;
        if (!S.ready_head)
                S.ready_tail = NULL;
        t->next = NULL;
        t->queued = false;
        return t;
}

/* Take t out of the ready queue (a task that finishes without running: cancelled before it
 * started). Its ref is about to go, so the queue must not keep a pointer the collector frees. */
static void ready_remove(RrTask *t) {
        RrTask *prev = NULL;

        if (!t->queued)
                return;
        for (RrTask *i = S.ready_head; i; prev = i, i = i->next)
                if (i == t) {
                        if (prev)
                                prev->next = t->next;
                        else
                                S.ready_head = t->next;
                        if (S.ready_tail == t)
                                S.ready_tail = prev;
                        break;
                }
        t->next = NULL;
        t->queued = false;
}

void rr_op_complete(RrOp *op) {
        if (op->done)
                return;
        op->done = true;
        if (op->task)
                ready_push(op->task);
}

static bool task_finished(const RrTask *t) {
        return t->state >= TASK_DONE;
}

/* Pushes the task userdata (alive: it holds its own ref until it finishes). */
static void push_task(lua_State *L, RrTask *t) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, t->ref);
}

/* Slots task_finish() needs on the main thread: its stack is that of whichever C function runs
 * the loop now (rr.wait{...} at the top level may have filled it), so room is made before a task
 * is resumed or finished, where a failure leaves no task half-finished. Not an error raised on
 * the main thread: it may not be the running one. */
#define TASK_FINISH_SLOTS 10

static bool finish_room(void) {
        return lua_checkstack(S.L, TASK_FINISH_SLOTS);
}

/* Finish a task whose coroutine returned or raised; the outcome (nres values or the error
 * value) is at the top of co. Stores it in uservalue 2, wakes joiners, drops the coroutine.
 * The caller made TASK_FINISH_SLOTS of room on the main thread (finish_room()). */
static void task_finish(RrTask *t, TaskState state, int nres) {
        lua_State *L = S.L;
        lua_State *co = t->co;

        /* The results go into their table on co, which holds them: the main thread has room for a
         * few values, not for any number a task may return. */
        if (state == TASK_DONE && !lua_checkstack(co, 2)) {
                lua_settop(co, 0);
                lua_pushfstring(co, "task returned too many values (%d)", nres);
                state = TASK_FAILED;
        }
        push_task(L, t); /* ud */
        if (state == TASK_DONE) {
                lua_createtable(co, nres, 1);           /* co: v1..vn results */
                lua_insert(co, -1 - nres);              /* co: results v1..vn */
                for (int i = nres; i >= 1; i--)
                        lua_rawseti(co, -1 - i, i);     /* the table is below the i values left */
                lua_pushinteger(co, nres);
                lua_setfield(co, -2, "n");
                lua_xmove(co, L, 1);                    /* ud results */
        } else {
                lua_createtable(L, 1, 1); /* ud results */
                /* The error value is at co's top. A string gets the coroutine's traceback. */
                if (lua_type(co, -1) == LUA_TSTRING) {
                        const char *msg = lua_tostring(co, -1);
                        if (state == TASK_CANCELED)
                                lua_pushstring(L, msg);
                        else
                                luaL_traceback(L, co, msg, 0);
                } else
                        lua_xmove(co, L, 1);
                lua_rawseti(L, -2, 1);
                lua_pushinteger(L, 1);
                lua_setfield(L, -2, "n");
        }
        lua_setiuservalue(L, -2, 2); /* ud */

        if (state != TASK_DONE)
                lua_resetthread(co); /* closes pending to-be-closed variables */
        lua_pushnil(L);
        lua_setiuservalue(L, -2, 1); /* the coroutine can go */
        t->co = NULL;
        t->state = state;

        for (JoinNode *j = t->joiners, *next; j; j = next) {
                next = j->next;
                j->next = NULL;
                j->task = NULL; /* unlinked; the node still holds its ref for push() */
                if (--j->join->remaining == 0 || j->join->any)
                        rr_op_complete(&j->join->op);
        }
        if (t->joiners)
                t->error_seen = true;
        t->joiners = NULL;

        if (state == TASK_FAILED && !t->error_seen) {
                /* Nobody is waiting for it now: say it at once instead of losing it. */
                lua_getiuservalue(L, -1, 2);
                lua_rawgeti(L, -1, 1);
                fprintf(stderr, "rrengine: task %u failed: %s\n", t->id, luaL_tolstring(L, -1, NULL));
                lua_pop(L, 3);
                t->error_seen = true;
        }
        lua_pop(L, 1);

        S.live--;
        ready_remove(t);
        luaL_unref(L, LUA_REGISTRYINDEX, t->ref);
        t->ref = LUA_NOREF; /* the userdata may be collected from here on: do not touch t */
}

/* ---- Bounded tasks: task:deadline(seconds), task:max_instructions(n) ----
 *
 * A task that never waits (a hook in `while true do end`) never gives the loop a turn: no timer
 * fires, no signal is read. So a bounded task's coroutine (and those it creates) gets a hook,
 * called every HOOK_COUNT VM instructions and on function calls (one instruction can be a long
 * C call: a loop of slow string.find calls runs few instructions). While that task runs, it:
 *   - past a limit, yields the coroutine out to task_resume(), which ends the task as failed
 *     without resuming it: no pcall in the task catches that (its <close> variables still run).
 *     Where it cannot yield (in a C call such as a table.sort comparator, or in a coroutine of
 *     the task's own) it raises the message, and the next hook back in the task's code ends it;
 *   - with the task cancelled, raises "canceled" once, as a wait would;
 *   - with a stop signal pending (blocked, read by the loop), yields so that the loop reads it
 *     and the handlers' tasks run before this one goes on.
 * Only count events may yield: a call event that sees one of these makes the next instruction a
 * count event. A waiting bounded task is ended by a timer. No hook interrupts one C call that
 * never returns (a pathological string.find pattern). Cost: with a count hook Lua 5.4's VM
 * traps on every instruction (lvm.c `trap`), about twice the time of a plain CPU loop. */

#define HOOK_COUNT 1000             /* VM instructions between two count events */
#define HOOK_MASK (LUA_MASKCOUNT | LUA_MASKCALL)
#define SIGNAL_CHECK_INTERVAL 0.005 /* seconds between two sigpending() calls */
#define CALL_CHECK_EVERY 8          /* call events between two looks at the clock */

/* Has the task hit one of its limits (now, or earlier)? */
static bool task_limit_hit(RrTask *t, double now) {
        if (t->limit_hit == LIMIT_NONE && t->deadline > 0 && now >= t->deadline)
                t->limit_hit = LIMIT_DEADLINE;
        return t->limit_hit != LIMIT_NONE;
}

/* Pushes on L the message of the limit the task hit. An instruction limit names the line that
 * was running in `where` (a coroutine of the task), as the error of a Lua hook would. */
static void push_limit_message(lua_State *L, RrTask *t, lua_State *where) {
        lua_Debug ar;

        if (t->limit_hit == LIMIT_DEADLINE) {
                char secs[32];
                snprintf(secs, sizeof secs, "%g", t->deadline_secs);
                lua_pushfstring(L, "timed out after %s s", secs);
                return;
        }
        if (where && lua_getstack(where, 0, &ar) && lua_getinfo(where, "Sl", &ar) && ar.currentline > 0)
                lua_pushfstring(L, "%s:%d: ", ar.short_src, ar.currentline);
        else
                lua_pushliteral(L, "");
        lua_pushfstring(L, "runs more than %I instructions (an endless loop?)", (LUAI_UACINT) t->max_instructions);
        lua_concat(L, 2);
}

static void task_limits_release(RrTask *t) {
        t->deadline_timer = sd_event_source_disable_unref(t->deadline_timer);
}

/* task_finish(), after releasing the limits; a task that failed after hitting one gets its code
 * (ETIMEDOUT, ELIMIT) as a second error value, so that rr.wait() tells it from other errors. */
static void task_finish_limited(RrTask *t, TaskState state, int nres) {
        lua_State *L = S.L;
        TaskLimit limit = t->limit_hit;

        task_limits_release(t);
        if (state != TASK_FAILED || limit == LIMIT_NONE) {
                task_finish(t, state, nres);
                return;
        }
        push_task(L, t); /* ud: task_finish() drops the task's own reference */
        task_finish(t, state, nres);
        lua_getiuservalue(L, -1, 2); /* ud results */
        if (S.limit_error_task == t) {
                lua_rawgeti(L, LUA_REGISTRYINDEX, S.limit_error_ref);
                lua_rawseti(L, -2, 1);
                luaL_unref(L, LUA_REGISTRYINDEX, S.limit_error_ref);
                S.limit_error_ref = LUA_NOREF;
                S.limit_error_task = NULL;
        }
        lua_pushstring(L, limit_codes[limit]);
        lua_rawseti(L, -2, 2);
        lua_pushinteger(L, 2);
        lua_setfield(L, -2, "n");
        lua_pop(L, 2);
}

/* Ends a task that hit a limit and is not running (it yielded, waits, or never started): its
 * op is released and it fails with the limit's message and a traceback of where it was. */
static void task_end_at_limit(RrTask *t) {
        lua_State *co = t->co;

        if (t->op) {
                RrOp *op = t->op;
                t->op = NULL;
                op->release(op);
        }
        if (lua_status(co) == LUA_OK && lua_gettop(co) == t->nargs + 1)
                lua_settop(co, 0); /* never started: nothing to trace */
        if (!lua_checkstack(co, 1))
                lua_resetthread(co); /* no room for the message: drop the stack (and its traceback) */
        push_limit_message(co, t, co); /* task_finish() takes the error from co's top */
        task_finish_limited(t, TASK_FAILED, 0);
}

/* Is a stop signal waiting to be read by the loop? sigpending() at most every
 * SIGNAL_CHECK_INTERVAL; a yes holds until a task gives way for it. */
static bool stop_signal_pending(double now) {
        sigset_t pending;

        if (now < S.next_signal_check)
                return S.stop_pending;
        S.next_signal_check = now + SIGNAL_CHECK_INTERVAL;
        S.stop_pending = sigpending(&pending) == 0 &&
                         (sigismember(&pending, SIGINT) == 1 || sigismember(&pending, SIGTERM) == 1 ||
                          sigismember(&pending, SIGHUP) == 1);
        return S.stop_pending;
}

/* The hook of a bounded task's coroutines (see above). */
static void task_hook(lua_State *L, lua_Debug *ar) {
        RrTask *t = S.current;
        bool own = t && L == t->co;
        double now;
        int count;

        if (!t || !t->co || (t->deadline <= 0 && t->max_instructions <= 0))
                return; /* a coroutine it created, run later by someone else */
        if (ar->event != LUA_HOOKCOUNT && ++S.call_events % CALL_CHECK_EVERY != 0)
                return;
        now = rr_now();
        if (ar->event != LUA_HOOKCOUNT) {
                if (task_limit_hit(t, now) || (t->cancel && !t->cancel_raised) ||
                    (own && lua_isyieldable(L) && stop_signal_pending(now)))
                        lua_sethook(L, task_hook, HOOK_MASK, 1); /* act at the next instruction */
                return;
        }
        count = lua_gethookcount(L);
        if (count != t->hook_count)
                lua_sethook(L, task_hook, HOOK_MASK, t->hook_count); /* a call event shortened it */
        if (t->max_instructions > 0 && (t->instructions_left -= count) <= 0 && t->limit_hit == LIMIT_NONE)
                t->limit_hit = LIMIT_INSTRUCTIONS;
        if (task_limit_hit(t, now)) {
                push_limit_message(L, t, L);
                if (own && lua_isyieldable(L)) {
                        /* The error with its traceback now: once yielded in a hook, a coroutine
                         * shows the previous instruction's line. task_finish_limited() uses it. */
                        luaL_traceback(L, L, lua_tostring(L, -1), 0);
                        luaL_unref(L, LUA_REGISTRYINDEX, S.limit_error_ref);
                        S.limit_error_ref = luaL_ref(L, LUA_REGISTRYINDEX);
                        S.limit_error_task = t;
                        lua_pop(L, 1);
                        lua_yield(L, 0); /* task_resume() ends it */
                        return;
                }
                /* Count events at every instruction from here: the error may be caught in the C
                 * call, and the first instruction back in the task's own code must end it. */
                lua_sethook(L, task_hook, HOOK_MASK, 1);
                lua_sethook(t->co, task_hook, HOOK_MASK, 1);
                lua_error(L);
        }
        if (t->cancel && !t->cancel_raised) {
                t->cancel_raised = true;
                lua_pushliteral(L, "canceled");
                lua_error(L);
        }
        if (own && lua_isyieldable(L) && stop_signal_pending(now)) {
                S.stop_pending = false; /* the loop reads it now */
                t->preempted = true;
                lua_yield(L, 0);
        }
}

static void task_hook_install(RrTask *t) {
        int count = HOOK_COUNT;

        if (t->max_instructions > 0 && t->max_instructions < count)
                count = (int) t->max_instructions;
        t->hook_count = count;
        lua_sethook(t->co, task_hook, HOOK_MASK, count);
}

static int deadline_fired(sd_event_source *src, uint64_t usec, void *userdata) {
        RrTask *t = userdata;

        (void) src;
        (void) usec;
        if (task_finished(t))
                return 0;
        if (t->limit_hit == LIMIT_NONE)
                t->limit_hit = LIMIT_DEADLINE;
        /* task_resume() ends it; a task running a nested loop (it waits where it cannot yield)
         * sees it in rr_op_await(). */
        if (t->state == TASK_WAITING || t->state == TASK_READY)
                ready_push(t);
        return 0;
}

/* Makes `at` (rr_now() time; `secs` is how it is reported) the task's deadline, unless it already
 * has an earlier one. Returns 0 or a negative errno. */
static int task_set_deadline(RrTask *t, double at, double secs) {
        uint64_t usec = at > 0 ? (uint64_t) (at * 1e6) : 0;
        int r;

        if (t->deadline > 0 && t->deadline <= at)
                return 0;
        if (t->deadline_timer)
                r = sd_event_source_set_time(t->deadline_timer, usec);
        else
                r = sd_event_add_time(S.event, &t->deadline_timer, CLOCK_MONOTONIC, usec, 1000, deadline_fired, t);
        if (r < 0)
                return r;
        t->deadline = at;
        t->deadline_secs = secs;
        task_hook_install(t);
        return 0;
}

static void task_resume(RrTask *t) {
        RrTask *prev = S.current;
        lua_State *from = prev ? prev->co : S.L;
        int nargs = t->nargs, nres = 0, r;

        if (task_limit_hit(t, t->deadline > 0 ? rr_now() : 0)) {
                task_end_at_limit(t); /* out of time while it waited or was ready */
                return;
        }
        t->nargs = 0;
        t->state = TASK_RUNNING;
        S.current = t;
        r = lua_resume(t->co, from, nargs, &nres);
        S.current = prev;

        if (r == LUA_YIELD) {
                lua_pop(t->co, nres);
                if (t->limit_hit != LIMIT_NONE)
                        task_end_at_limit(t); /* its count hook, or a wait past the deadline, yielded */
                else if (t->op)
                        t->state = TASK_WAITING;
                else {
                        /* A plain coroutine.yield() inside a task: give the others a turn. */
                        t->state = TASK_READY;
                        if (t->preempted) {
                                /* Its count hook saw a stop signal: read it now, so that the
                                 * handlers' tasks are queued before this one. */
                                t->preempted = false;
                                (void) sd_event_run(S.event, 0);
                        }
                        ready_push(t);
                }
        } else if (r == LUA_OK)
                task_finish_limited(t, TASK_DONE, nres);
        else
                /* After an exit request every error is the unwinding it asked for, not a failure
                 * to report. */
                task_finish_limited(t, t->cancel || S.exit_requested ? TASK_CANCELED : TASK_FAILED, 0);
}

/* Nothing runs between an exit request and the shutdown that cancels every task: the caller of
 * os.exit() unwinds, then control goes back up to main(). */
static bool exit_pending(void) {
        return S.exit_requested && !S.shutting_down;
}

/* Resume the tasks that are ready now; those made ready meanwhile wait for the next turn, so a
 * task that keeps yielding cannot starve the loop. -ENOMEM when the main thread's stack cannot
 * grow (the queue is left as it was). */
static int run_ready(void) {
        RrTask *last = S.ready_tail;

        while (S.ready_head && !exit_pending()) {
                RrTask *t;
                bool was_last;

                if (!finish_room())
                        return -ENOMEM;
                t = ready_pop();
                was_last = t == last;
                if (t->state == TASK_READY || t->state == TASK_WAITING)
                        task_resume(t);
                if (was_last)
                        break;
        }
        return 0;
}

/* One turn: run what is ready, then wait for and dispatch one event (not when more work
 * is ready, or when the goal is reached: *stop, or with stop NULL, no task left). */
static int loop_turn(const bool *stop) {
        int r;

        r = run_ready();
        if (r < 0) {
                fprintf(stderr, "rrengine: no stack space to finish a task\n");
                return r;
        }
        if ((stop ? *stop : S.live == 0) || S.ready_head || exit_pending())
                return 0;
        r = sd_event_run(S.event, UINT64_MAX);
        if (r < 0) {
                fprintf(stderr, "rrengine: event loop failed: %s\n", strerror(-r));
                return r;
        }
        return 0;
}

static int push_trampoline(lua_State *L) {
        RrOp *op = lua_touserdata(L, 1);
        lua_remove(L, 1); /* the caller's values are at 1..n again, where push() expects them */
        return op->push(L, op);
}

/* Pushes the op's results and releases it, also when push() raises (out of memory, a stack
 * check): the error is re-raised after the release, so the op never leaks. push() runs in a
 * protected frame holding copies of the caller's values, so it may read its arguments (a unit
 * handle keeps the manager that is argument 1 of m:unit()). */
static int push_and_release(lua_State *L, RrOp *op) {
        int base = lua_gettop(L), r;

        if (!lua_checkstack(L, base + 2)) {
                op->release(op);
                return luaL_error(L, "out of Lua stack space");
        }
        lua_pushcfunction(L, push_trampoline);
        lua_pushlightuserdata(L, op);
        for (int i = 1; i <= base; i++)
                lua_pushvalue(L, i);
        r = lua_pcall(L, base + 1, LUA_MULTRET, 0);
        op->release(op);
        if (r != LUA_OK)
                return lua_error(L);
        return lua_gettop(L) - base;
}

static int await_continue(lua_State *L, int status, lua_KContext ctx) {
        RrTask *t = S.current;
        RrOp *op;

        (void) status;
        (void) ctx;
        op = t->op;
        t->op = NULL;
        if (!op)
                return luaL_error(L, "canceled"); /* the op was released by task_cancel() */
        return push_and_release(L, op);
}

int rr_op_await(lua_State *L, RrOp *op) {
        RrTask *t = S.current;

        op->done = false;
        op->task = NULL;
        if (t && t->co == L && lua_isyieldable(L)) {
                if (t->cancel) {
                        op->release(op);
                        return luaL_error(L, "canceled");
                }
                if (task_limit_hit(t, t->deadline > 0 ? rr_now() : 0)) {
                        op->release(op);
                        return lua_yield(L, 0); /* task_resume() ends it */
                }
                op->task = t;
                t->op = op;
                return lua_yieldk(L, 0, 0, await_continue);
        }

        /* Not a task (top level, REPL, spec, or a non-yieldable spot): run the loop here. */
        for (;;) {
                if (exit_pending()) {
                        /* A task called os.exit() (maybe the one waited for): unwind this caller
                         * too, up to main(). */
                        op->release(op);
                        return luaL_error(L, "exiting (os.exit(%d) in a task)", S.exit_code);
                }
                if (op->done)
                        break;
                if (S.interrupt_unhandled) {
                        S.interrupt_unhandled = 0;
                        op->release(op);
                        return luaL_error(L, "interrupted");
                }
                if (S.current && S.current->co && task_limit_hit(S.current, S.current->deadline > 0 ? rr_now() : 0)) {
                        /* A bounded task waiting where it cannot yield ran out of time. */
                        op->release(op);
                        push_limit_message(L, S.current, NULL);
                        return lua_error(L);
                }
                if (loop_turn(&op->done) < 0) {
                        op->release(op);
                        return luaL_error(L, "event loop failed");
                }
        }
        return push_and_release(L, op);
}

bool rr_canceled(lua_State *L, bool raise) {
        RrTask *t = S.current;
        bool limit = t && t->co == L && task_limit_hit(t, t->deadline > 0 ? rr_now() : 0);
        bool canceled = exit_pending() || (t && t->co == L && t->cancel) || limit;

        if (canceled && raise && limit && !exit_pending() && !t->cancel) {
                /* Past its deadline: no side effect it would never see (its next wait ends it). */
                push_limit_message(L, t, NULL);
                lua_error(L);
        }
        if (canceled && raise)
                luaL_error(L, exit_pending() ? "exiting (os.exit(%d) in a task)" : "canceled", S.exit_code);
        return canceled;
}

static RrTask *task_new(lua_State *L) {
        RrTask *t = lua_newuserdatauv(L, sizeof(RrTask), 2);
        memset(t, 0, sizeof *t);
        t->ref = LUA_NOREF;
        t->id = ++S.next_id;
        luaL_setmetatable(L, TASK_MT);
        return t;
}

/* Creates the task from the function and nargs arguments on top of L (popping them) and
 * queues it; the task userdata is left on L. */
static RrTask *task_spawn(lua_State *L, int nargs) {
        lua_State *co;
        RrTask *t;

        luaL_checktype(L, -1 - nargs, LUA_TFUNCTION);
        t = task_new(L);                /* fn args ud */
        co = lua_newthread(L);          /* fn args ud co */
        /* A new thread has LUA_MINSTACK slots: the arguments need theirs. */
        if (!lua_checkstack(co, nargs + 1))
                luaL_error(L, "too many arguments for a task (%d)", nargs);
        lua_setiuservalue(L, -2, 1);    /* fn args ud */
        lua_insert(L, -2 - nargs);      /* ud fn args */
        lua_xmove(L, co, nargs + 1);    /* ud */
        t->co = co;
        t->nargs = nargs;
        t->state = TASK_READY;
        lua_pushvalue(L, -1);
        t->ref = luaL_ref(L, LUA_REGISTRYINDEX);
        S.live++;
        ready_push(t);
        return t;
}

/* rr_task_spawn's work in protected mode: the function and its arguments are the whole stack. */
static int task_spawn_protected(lua_State *L) {
        task_spawn(L, lua_gettop(L) - 1);
        return 0;
}

int rr_task_spawn(lua_State *L, int nargs) {
        /* Callers run inside sd-event callbacks: a memory error must not unwind through
         * sd_event_run(), so the allocation happens under lua_pcall. */
        if (!lua_checkstack(L, 2)) {
                lua_pop(L, nargs + 1);
                return -ENOMEM;
        }
        lua_pushcfunction(L, task_spawn_protected); /* fn args cf */
        lua_insert(L, -2 - nargs);                  /* cf fn args */
        if (lua_pcall(L, nargs + 1, 0, 0) != LUA_OK) {
                lua_pop(L, 1); /* the error (out of memory) */
                return -ENOMEM;
        }
        return 0;
}

static RrTask *check_task(lua_State *L, int idx) {
        return luaL_checkudata(L, idx, TASK_MT);
}

/* rr.spawn(fn, ...) -> task. A task started by a task with a deadline has that deadline too:
 * nothing a bounded hook starts outlives it. */
static int loop_spawn(lua_State *L) {
        int nargs = lua_gettop(L) - 1;
        RrTask *parent = S.current, *t;
        int r;

        luaL_checktype(L, 1, LUA_TFUNCTION);
        t = task_spawn(L, nargs); /* ud */
        if (parent && parent->co && parent->deadline > 0) {
                r = task_set_deadline(t, parent->deadline, parent->deadline_secs);
                if (r < 0) {
                        t->limit_hit = LIMIT_DEADLINE; /* it must not run unbounded: it ends at once */
                        return luaL_error(L, "cannot add timer: %s", strerror(-r));
                }
        } else if (lua_gethook(t->co) == task_hook)
                lua_sethook(t->co, NULL, 0, 0); /* inherited from its creator, with nothing to bound */
        return 1;
}

/* Pushes ok, results... of a finished task; returns the count. */
static int push_outcome(lua_State *L, RrTask *t, int ud_idx) {
        int n;

        lua_pushboolean(L, t->state == TASK_DONE);
        lua_getiuservalue(L, ud_idx, 2);
        lua_getfield(L, -1, "n");
        n = (int) lua_tointeger(L, -1);
        lua_pop(L, 1);
        luaL_checkstack(L, n + 1, "too many results");
        for (int i = 1; i <= n; i++)
                lua_rawgeti(L, -i, i); /* the table sits below the i-1 values pushed so far */
        lua_remove(L, -1 - n);
        if (t->state == TASK_FAILED)
                t->error_seen = true;
        return n + 1;
}

static int join_push(lua_State *L, RrOp *op) {
        JoinOp *j = (JoinOp *) op;

        /* Room for one result per task plus the scratch slots below: callers may already have
         * used the whole stack (rr.wait{...} pushed every task of the list). */
        luaL_checkstack(L, j->n + 8, "too many tasks");

        if (j->any) {
                /* The first finished task in argument order, then its outcome. */
                for (int i = 0; i < j->n; i++) {
                        int top, n;
                        lua_rawgeti(L, LUA_REGISTRYINDEX, j->nodes[i].ref);
                        top = lua_gettop(L);
                        if (task_finished(check_task(L, top))) {
                                n = push_outcome(L, check_task(L, top), top);
                                return n + 1;
                        }
                        lua_pop(L, 1);
                }
                return 0; /* unreachable: completed only once a task finished */
        }

        if (j->n == 1 && !j->as_list) {
                lua_rawgeti(L, LUA_REGISTRYINDEX, j->nodes[0].ref);
                int n = push_outcome(L, check_task(L, -1), lua_gettop(L));
                lua_remove(L, -1 - n);
                return n;
        }
        if (j->as_list)
                lua_createtable(L, j->n, 0);
        for (int i = 0; i < j->n; i++) {
                int top, n;
                lua_rawgeti(L, LUA_REGISTRYINDEX, j->nodes[i].ref);
                top = lua_gettop(L);
                lua_createtable(L, 4, 1);
                n = push_outcome(L, check_task(L, top), top); /* ud tbl ok ... */
                for (int k = n; k >= 1; k--)
                        lua_rawseti(L, top + 1, k);
                lua_pushinteger(L, n);
                lua_setfield(L, top + 1, "n");
                lua_remove(L, top); /* ... tbl */
                if (j->as_list)
                        lua_rawseti(L, -2, i + 1);
        }
        return j->as_list ? 1 : j->n;
}

static void join_release(RrOp *op) {
        JoinOp *j = (JoinOp *) op;

        for (int i = 0; i < j->n; i++) {
                JoinNode *node = &j->nodes[i];
                if (node->task) {
                        /* Still linked: the task has not finished. */
                        for (JoinNode **p = &node->task->joiners; *p; p = &(*p)->next)
                                if (*p == node) {
                                        *p = node->next;
                                        break;
                                }
                }
                luaL_unref(S.L, LUA_REGISTRYINDEX, node->ref);
        }
        free(j);
}

/* rr.wait(t1, ...) -> ok, results... (one task) | one table.pack(ok, ...) per task
 * rr.wait{t1, ...} -> a list of table.pack(ok, ...) */
static int join_tasks(lua_State *L, bool any) {
        bool as_list = lua_istable(L, 1) && !luaL_testudata(L, 1, TASK_MT);
        int n, base;
        JoinOp *j;

        if (as_list) {
                n = (int) luaL_len(L, 1);
                luaL_checkstack(L, n, "too many tasks");
                for (int i = 1; i <= n; i++)
                        lua_geti(L, 1, i);
                base = 2;
        } else {
                n = lua_gettop(L);
                base = 1;
        }
        if (n == 0 && !as_list)
                return luaL_argerror(L, 1, "task expected");
        for (int i = 0; i < n; i++) {
                RrTask *t = check_task(L, base + i);
                if (t == S.current && !task_finished(t))
                        return luaL_error(L, "a task cannot wait for itself");
        }

        j = calloc(1, sizeof(JoinOp) + (size_t) n * sizeof(JoinNode));
        if (!j)
                return luaL_error(L, "out of memory");
        j->op.push = join_push;
        j->op.release = join_release;
        j->n = n;
        j->as_list = as_list && !any;
        j->any = any;
        for (int i = 0; i < n; i++) {
                RrTask *t = check_task(L, base + i);
                JoinNode *node = &j->nodes[i];
                lua_pushvalue(L, base + i);
                node->ref = luaL_ref(L, LUA_REGISTRYINDEX);
                node->join = j;
                if (!task_finished(t)) {
                        node->task = t;
                        node->next = t->joiners;
                        t->joiners = node;
                        j->remaining++;
                }
        }
        if (j->remaining == 0 || (any && j->remaining < n)) {
                int r = join_push(L, &j->op);
                join_release(&j->op);
                return r;
        }
        return rr_op_await(L, &j->op);
}

static int loop_wait(lua_State *L) {
        return join_tasks(L, false);
}

/* rr.wait_any(t1, ...) or rr.wait_any{...} -> the first task to finish, ok, results... */
static int loop_wait_any(lua_State *L) {
        return join_tasks(L, true);
}

static int sleep_push(lua_State *L, RrOp *op) {
        (void) L;
        (void) op;
        return 0;
}

static void sleep_release(RrOp *op) {
        SleepOp *s = (SleepOp *) op;
        sd_event_source_disable_unref(s->source);
        free(s);
}

static int sleep_fired(sd_event_source *src, uint64_t usec, void *userdata) {
        (void) src;
        (void) usec;
        rr_op_complete(userdata);
        return 0;
}

/* rr.sleep(seconds) */
static int loop_sleep(lua_State *L) {
        double secs = luaL_checknumber(L, 1);
        SleepOp *s;
        int r;

        luaL_argcheck(L, secs >= 0 && secs < 1e9, 1, "seconds must be >= 0");
        s = calloc(1, sizeof *s);
        if (!s)
                return luaL_error(L, "out of memory");
        s->op.push = sleep_push;
        s->op.release = sleep_release;
        r = sd_event_add_time(S.event, &s->source, CLOCK_MONOTONIC, rr_deadline_usec(secs), 1000, sleep_fired, s);
        if (r < 0) {
                free(s);
                return luaL_error(L, "cannot add timer: %s", strerror(-r));
        }
        return rr_op_await(L, &s->op);
}

/* rr.now() -> monotonic seconds */
static int loop_now(lua_State *L) {
        lua_pushnumber(L, rr_now());
        return 1;
}

/* rr.current() -> the running task, or nil at the top level */
static int loop_current(lua_State *L) {
        if (!S.current || S.current->ref == LUA_NOREF)
                lua_pushnil(L);
        else
                push_task(L, S.current);
        return 1;
}

/* rr.on_signal(fn): fn(signame) runs as a task on every SIGINT/SIGTERM/SIGHUP. With at least
 * one handler the engine itself does nothing on a signal: the plan decides. */
static int loop_on_signal(lua_State *L) {
        luaL_checktype(L, 1, LUA_TFUNCTION);
        lua_rawgeti(L, LUA_REGISTRYINDEX, S.handlers_ref);
        lua_pushvalue(L, 1);
        lua_pushboolean(L, 1);
        lua_rawset(L, -3); /* handlers[fn] = true */
        lua_pushvalue(L, 1);
        return 1;
}

/* rr.off_signal(fn): fn no longer runs on signals (a plan that ends hands them back). */
static int loop_off_signal(lua_State *L) {
        luaL_checktype(L, 1, LUA_TFUNCTION);
        lua_rawgeti(L, LUA_REGISTRYINDEX, S.handlers_ref);
        lua_pushvalue(L, 1);
        lua_pushnil(L);
        lua_rawset(L, -3);
        return 0;
}

/* rr.interrupts() -> how many SIGINT/SIGTERM/SIGHUP arrived */
static int loop_interrupts(lua_State *L) {
        lua_pushinteger(L, S.interrupts);
        return 1;
}

/* Returns -ENOMEM (nothing changed) when a task that never started cannot be finished: no
 * room on the main thread's stack. */
static int task_cancel(RrTask *t) {
        if (task_finished(t) || t->cancel)
                return 0;
        t->cancel = true;
        switch (t->state) {
        case TASK_WAITING:
                if (t->op) {
                        RrOp *op = t->op;
                        t->op = NULL;
                        op->release(op);
                }
                ready_push(t); /* await_continue raises "canceled" inside the task */
                break;
        case TASK_READY:
                if (lua_status(t->co) == LUA_OK && lua_gettop(t->co) == t->nargs + 1) {
                        /* Never started: it finishes as canceled without running. */
                        if (!finish_room()) {
                                t->cancel = false;
                                return -ENOMEM;
                        }
                        lua_settop(t->co, 0);
                        lua_pushliteral(t->co, "canceled");
                        task_finish_limited(t, TASK_CANCELED, 0);
                }
                /* else a yielded task: its next wait point raises */
                break;
        default:
                break; /* running: its next wait point raises */
        }
        return 0;
}

/* task:cancel() */
static int task_l_cancel(lua_State *L) {
        if (task_cancel(check_task(L, 1)) < 0)
                return luaL_error(L, "no stack space to cancel the task");
        return 0;
}

static int task_l_status(lua_State *L) {
        lua_pushstring(L, task_state_names[check_task(L, 1)->state]);
        return 1;
}

/* task:result() -> ok, results... of a finished task */
static int task_l_result(lua_State *L) {
        RrTask *t = check_task(L, 1);
        if (!task_finished(t))
                return luaL_error(L, "task %u has not finished (%s)", t->id, task_state_names[t->state]);
        return push_outcome(L, t, 1);
}

static int task_l_id(lua_State *L) {
        lua_pushinteger(L, check_task(L, 1)->id);
        return 1;
}

/* task:deadline(seconds) -> task: it must finish within seconds from now, waiting or not, or it
 * fails with "timed out after N s" (code ETIMEDOUT). An earlier deadline stays. */
static int task_l_deadline(lua_State *L) {
        RrTask *t = check_task(L, 1);
        double secs = luaL_checknumber(L, 2);
        int r;

        luaL_argcheck(L, secs >= 0 && secs < 1e9, 2, "seconds must be >= 0");
        if (!task_finished(t)) {
                r = task_set_deadline(t, rr_now() + secs, secs);
                if (r < 0)
                        return luaL_error(L, "cannot add timer: %s", strerror(-r));
        }
        lua_settop(L, 1);
        return 1;
}

/* task:max_instructions(n) -> task: from now on it fails with "runs more than n instructions
 * (an endless loop?)" (code ELIMIT) once it has run about n more Lua VM instructions. */
static int task_l_max_instructions(lua_State *L) {
        RrTask *t = check_task(L, 1);
        lua_Integer n = luaL_checkinteger(L, 2);

        luaL_argcheck(L, n > 0, 2, "instructions must be > 0");
        if (!task_finished(t)) {
                t->max_instructions = t->instructions_left = n;
                task_hook_install(t);
        }
        lua_settop(L, 1);
        return 1;
}

static int task_l_tostring(lua_State *L) {
        RrTask *t = check_task(L, 1);
        lua_pushfstring(L, "rr.task %d (%s)", (int) t->id, task_state_names[t->state]);
        return 1;
}

/* __close: leaving the scope of a task cancels it if it still runs. */
static int task_l_close(lua_State *L) {
        if (task_cancel(check_task(L, 1)) < 0)
                return luaL_error(L, "no stack space to cancel the task");
        return 0;
}

static const char *stop_signal_name(int signo) {
        switch (signo) {
        case SIGINT:
                return "SIGINT";
        case SIGTERM:
                return "SIGTERM";
        case SIGHUP:
                return "SIGHUP";
        default:
                return "SIGUNKNOWN";
        }
}

/* A stop signal: one task per Lua handler, handed the signal's name. With no handler, or when no
 * handler task could be started (out of memory), the signal interrupts the top level: it is
 * never lost. */
static int signal_fired(sd_event_source *src, const struct signalfd_siginfo *si, void *userdata) {
        lua_State *L = S.L;
        int signo = (int) si->ssi_signo, n = 0, failed = 0;

        (void) src;
        (void) userdata;
        S.interrupts++;
        if (signo != SIGINT)
                S.quit_signal = signo;
        if (lua_checkstack(L, 6)) {
                lua_rawgeti(L, LUA_REGISTRYINDEX, S.handlers_ref); /* handlers */
                lua_pushnil(L);                                    /* handlers nil */
                while (lua_next(L, -2)) {                          /* handlers fn true */
                        lua_pop(L, 1);                             /* handlers fn */
                        lua_pushvalue(L, -1);                      /* handlers fn fn */
                        lua_pushstring(L, stop_signal_name(signo)); /* handlers fn fn name */
                        /* Pops fn and name whatever happens, leaving the key for lua_next(). */
                        if (rr_task_spawn(L, 1) < 0)
                                failed++;
                        else
                                n++;
                }
                lua_pop(L, 1); /* handlers */
        }
        if (failed > 0)
                fprintf(stderr, "rrengine: %s: cannot start %d signal handler task(s): out of memory\n",
                        stop_signal_name(signo), failed);
        if (n == 0)
                S.interrupt_unhandled = signo;
        return 0;
}

static const luaL_Reg task_methods[] = {
        { "cancel", task_l_cancel },
        { "status", task_l_status },
        { "result", task_l_result },
        { "id", task_l_id },
        { "deadline", task_l_deadline },
        { "max_instructions", task_l_max_instructions },
        { NULL, NULL },
};

static const luaL_Reg task_meta[] = {
        { "__tostring", task_l_tostring },
        { "__close", task_l_close },
        { NULL, NULL },
};

static const luaL_Reg loop_functions[] = {
        { "spawn", loop_spawn },
        { "wait", loop_wait },
        { "wait_any", loop_wait_any },
        { "off_signal", loop_off_signal },
        { "sleep", loop_sleep },
        { "now", loop_now },
        { "current", loop_current },
        { "on_signal", loop_on_signal },
        { "interrupts", loop_interrupts },
        { NULL, NULL },
};

int luaopen_rr_loop(lua_State *L) {
        if (luaL_newmetatable(L, TASK_MT)) {
                luaL_setfuncs(L, task_meta, 0);
                luaL_newlib(L, task_methods);
                lua_setfield(L, -2, "__index");
        }
        lua_pop(L, 1);
        luaL_newlib(L, loop_functions);
        return 1;
}

int rr_loop_init(lua_State *L) {
        sigset_t mask;
        int r;

        /* A reader that went away (`rrengine ... | head`, a closed SSH session) must not kill the
         * engine half-way through a restart or a rollback: writes fail with EPIPE instead, which
         * print() ignores and io.write() returns as nil, err. rr.proc resets every disposition to
         * the default in children (POSIX_SPAWN_SETSIGDEF), so they still die of SIGPIPE. */
        if (sigaction(SIGPIPE, &(struct sigaction) { .sa_handler = SIG_IGN }, NULL) < 0)
                return -errno;

        /* Child exits and the three stop signals (SIGHUP: the terminal or the SSH session went
         * away) arrive through sd-event, so they must be blocked for the whole process; rr.proc
         * restores the mask in children before exec. */
        sigemptyset(&mask);
        sigaddset(&mask, SIGCHLD);
        sigaddset(&mask, SIGINT);
        sigaddset(&mask, SIGTERM);
        sigaddset(&mask, SIGHUP);
        if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0)
                return -errno;

        r = sd_event_new(&S.event);
        if (r < 0)
                return r;
        r = sd_event_add_signal(S.event, &S.sigint, SIGINT, signal_fired, NULL);
        if (r < 0)
                return r;
        r = sd_event_add_signal(S.event, &S.sigterm, SIGTERM, signal_fired, NULL);
        if (r < 0)
                return r;
        r = sd_event_add_signal(S.event, &S.sighup, SIGHUP, signal_fired, NULL);
        if (r < 0)
                return r;
        S.L = L;
        lua_newtable(L);
        S.handlers_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        return 0;
}

void rr_loop_drain(lua_State *L) {
        while (S.live > 0 && !exit_pending()) {
                if (S.interrupt_unhandled) {
                        int signo = S.interrupt_unhandled;
                        rr_loop_shutdown(L);
                        S.interrupt_unhandled = signo; /* main.c reads it for the exit code */
                        break;
                }
                if (loop_turn(NULL) < 0)
                        break;
        }
}

int rr_loop_take_interrupt(void) {
        int r = S.interrupt_unhandled;
        S.interrupt_unhandled = 0;
        return r;
}

int rr_loop_take_quit_signal(void) {
        int r = S.quit_signal;
        S.quit_signal = 0;
        return r;
}

void rr_loop_request_exit(int code) {
        if (!S.exit_requested) {
                S.exit_requested = true;
                S.exit_code = code;
        }
        /* Its next wait raises, should it catch the error that unwinds it. */
        if (S.current)
                S.current->cancel = true;
}

bool rr_loop_exit_requested(int *code) {
        if (S.exit_requested && code)
                *code = S.exit_code;
        return S.exit_requested;
}

int rr_loop_run_until(const bool *stop) {
        while (!*stop && !S.interrupt_unhandled && !exit_pending()) {
                int r = loop_turn(stop);
                if (r < 0)
                        return r;
        }
        return 0;
}

void rr_loop_shutdown(lua_State *L) {
        (void) L;
        S.shutting_down = true;
        /* Cancel everything, then let the canceled tasks unwind (their <close> handlers run). A
         * bounded number of turns: a task that swallows "canceled" in a loop must not hang us. */
        for (int round = 0; round < 100 && S.live > 0; round++) {
                lua_State *ML = S.L;
                int n = 0;
                lua_newtable(ML);
                /* Collect live tasks from the registry refs reachable through the ready queue and
                 * waiting states: walk the registry for rr.task userdata. */
                lua_pushnil(ML);
                while (lua_next(ML, LUA_REGISTRYINDEX)) {
                        RrTask *t = luaL_testudata(ML, -1, TASK_MT);
                        if (t && !task_finished(t)) {
                                lua_pushvalue(ML, -1);
                                lua_rawseti(ML, -4, ++n);
                        }
                        lua_pop(ML, 1);
                }
                for (int i = 1; i <= n; i++) {
                        lua_rawgeti(ML, -1, i);
                        (void) task_cancel(luaL_checkudata(ML, -1, TASK_MT));
                        lua_pop(ML, 1);
                }
                lua_pop(ML, 1);
                (void) run_ready();
        }
}

void rr_loop_free(void) {
        S.sigint = sd_event_source_disable_unref(S.sigint);
        S.sigterm = sd_event_source_disable_unref(S.sigterm);
        S.sighup = sd_event_source_disable_unref(S.sighup);
        S.event = sd_event_unref(S.event);
}
