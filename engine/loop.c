/* rr.loop: the one sd-event loop, and Lua coroutines as tasks on it.
 *
 * Tasks never run from inside an sd-event callback: a callback only completes an op, which puts
 * the waiting task on the ready queue; the scheduler resumes ready tasks between two
 * sd_event_run() turns. That keeps Lua out of sd-event's dispatch (sd_event_run() is not
 * reentrant) and lets a task block the loop in a nested turn when it cannot yield.
 *
 * This file is the scheduler; bounded tasks are in loop-limits.c, rr.wait / rr.sleep in
 * loop-wait.c (loop-internal.h lists what they share). */
#define _GNU_SOURCE
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "loop-internal.h"

static const char *const task_state_names[] = {
        [TASK_READY] = "ready",     [TASK_RUNNING] = "running", [TASK_WAITING] = "waiting",
        [TASK_DONE] = "done",       [TASK_FAILED] = "failed",   [TASK_CANCELED] = "canceled",
};

LoopShared loop_shared;

/* The scheduler's own state; what the other loop files read of it is in loop_shared. */
static struct {
        sd_event *event;
        RrTask *ready_head, *ready_tail;
        unsigned live;
        unsigned next_id;
        unsigned interrupts;
        int interrupt_unhandled; /* a signal no Lua handler took (its number): cancel the top-level wait */
        int quit_signal;         /* the last SIGTERM/SIGHUP, handled or not (the REPL quits on it) */
        int handlers_ref;        /* table of Lua signal handlers */
        bool exit_requested;     /* os.exit() from a task: unwind to the top, then exit */
        bool shutting_down;      /* rr_loop_shutdown() runs: canceled tasks may unwind */
        int exit_code;
        sd_event_source *sigint, *sigterm, *sighup;
} S = { .handlers_ref = LUA_NOREF };

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

void ready_push(RrTask *t) {
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

/* Slots task_finish() needs on the main thread: its stack is that of whichever C function runs
 * the loop now (rr.wait{...} at the top level may have filled it), so room is made before a task
 * is resumed or finished, where a failure leaves no task half-finished. Not an error raised on
 * the main thread: it may not be the running one. */
#define TASK_FINISH_SLOTS 10

static bool finish_room(void) {
        return lua_checkstack(loop_shared.L, TASK_FINISH_SLOTS);
}

/* Finish a task whose coroutine returned or raised; the outcome (nres values or the error
 * value) is at the top of co. Stores it in uservalue 2, wakes joiners, drops the coroutine.
 * The caller made TASK_FINISH_SLOTS of room on the main thread (finish_room()). */
void task_finish(RrTask *t, TaskState state, int nres) {
        lua_State *L = loop_shared.L;
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

        if (task_wake_joiners(t))
                t->error_seen = true;

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

static void task_resume(RrTask *t) {
        RrTask *prev = loop_shared.current;
        lua_State *from = prev ? prev->co : loop_shared.L;
        int nargs = t->nargs, nres = 0, r;

        if (task_limit_hit(t, t->deadline > 0 ? rr_now() : 0)) {
                task_end_at_limit(t); /* out of time while it waited or was ready */
                return;
        }
        t->nargs = 0;
        t->state = TASK_RUNNING;
        loop_shared.current = t;
        r = lua_resume(t->co, from, nargs, &nres);
        loop_shared.current = prev;

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
        RrTask *t = loop_shared.current;
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
        RrTask *t = loop_shared.current;

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
                if (loop_shared.current && loop_shared.current->co &&
                    task_limit_hit(loop_shared.current, loop_shared.current->deadline > 0 ? rr_now() : 0)) {
                        /* A bounded task waiting where it cannot yield ran out of time. */
                        op->release(op);
                        push_limit_message(L, loop_shared.current, NULL);
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
        RrTask *t = loop_shared.current;
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

/* rr.spawn(fn, ...) -> task. A task started by a task with a deadline has that deadline too:
 * nothing a bounded hook starts outlives it. */
static int loop_spawn(lua_State *L) {
        int nargs = lua_gettop(L) - 1;
        RrTask *t;
        int r;

        luaL_checktype(L, 1, LUA_TFUNCTION);
        t = task_spawn(L, nargs); /* ud */
        r = task_limits_inherit(t, loop_shared.current);
        if (r < 0)
                return luaL_error(L, "cannot add timer: %s", strerror(-r));
        return 1;
}

/* Pushes ok, results... of a finished task; returns the count. */
int push_outcome(lua_State *L, RrTask *t, int ud_idx) {
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

/* rr.now() -> monotonic seconds */
static int loop_now(lua_State *L) {
        lua_pushnumber(L, rr_now());
        return 1;
}

/* rr.current() -> the running task, or nil at the top level */
static int loop_current(lua_State *L) {
        if (!loop_shared.current || loop_shared.current->ref == LUA_NOREF)
                lua_pushnil(L);
        else
                push_task(L, loop_shared.current);
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
        lua_State *L = loop_shared.L;
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
        loop_shared.L = L;
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
        if (loop_shared.current)
                loop_shared.current->cancel = true;
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
                lua_State *ML = loop_shared.L;
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
