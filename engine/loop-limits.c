/* rr.loop: bounded tasks, task:deadline(seconds) and task:max_instructions(n).
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
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "loop-internal.h"

#define HOOK_COUNT 1000             /* VM instructions between two count events */
#define HOOK_MASK (LUA_MASKCOUNT | LUA_MASKCALL)
#define SIGNAL_CHECK_INTERVAL 0.005 /* seconds between two sigpending() calls */
#define CALL_CHECK_EVERY 8          /* call events between two looks at the clock */

/* The code rr.wait() returns third for a task that a limit ended. */
static const char *const limit_codes[] = {
        [LIMIT_DEADLINE] = "ETIMEDOUT",
        [LIMIT_INSTRUCTIONS] = "ELIMIT",
};

/* The hooks' state, shared by every bounded task (one runs at a time). */
static struct {
        double next_signal_check; /* rr_now() after which a bounded task looks for stop signals */
        bool stop_pending;        /* what it saw then */
        unsigned call_events;     /* of bounded tasks' hooks, to look at the clock on some only */
        RrTask *limit_error_task; /* the task its hook ended, with limit_error_ref (see task_hook) */
        int limit_error_ref;
} S = { .limit_error_ref = LUA_NOREF };

/* Has the task hit one of its limits (now, or earlier)? */
bool task_limit_hit(RrTask *t, double now) {
        if (t->limit_hit == LIMIT_NONE && t->deadline > 0 && now >= t->deadline)
                t->limit_hit = LIMIT_DEADLINE;
        return t->limit_hit != LIMIT_NONE;
}

/* Pushes on L the message of the limit the task hit. An instruction limit names the line that
 * was running in `where` (a coroutine of the task), as the error of a Lua hook would. */
void push_limit_message(lua_State *L, RrTask *t, lua_State *where) {
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
void task_finish_limited(RrTask *t, TaskState state, int nres) {
        lua_State *L = loop_shared.L;
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
void task_end_at_limit(RrTask *t) {
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
        RrTask *t = loop_shared.current;
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
                r = sd_event_add_time(rr_loop_event(), &t->deadline_timer, CLOCK_MONOTONIC, usec, 1000,
                                      deadline_fired, t);
        if (r < 0)
                return r;
        t->deadline = at;
        t->deadline_secs = secs;
        task_hook_install(t);
        return 0;
}

/* task:deadline(seconds) -> task: it must finish within seconds from now, waiting or not, or it
 * fails with "timed out after N s" (code ETIMEDOUT). An earlier deadline stays. */
int task_l_deadline(lua_State *L) {
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
int task_l_max_instructions(lua_State *L) {
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

/* A task started by a task with a deadline has that deadline too: nothing a bounded hook starts
 * outlives it. */
int task_limits_inherit(RrTask *t, const RrTask *parent) {
        int r;

        if (parent && parent->co && parent->deadline > 0) {
                r = task_set_deadline(t, parent->deadline, parent->deadline_secs);
                if (r < 0) {
                        t->limit_hit = LIMIT_DEADLINE; /* it must not run unbounded: it ends at once */
                        return r;
                }
        } else if (lua_gethook(t->co) == task_hook)
                lua_sethook(t->co, NULL, 0, 0); /* inherited from its creator, with nothing to bound */
        return 0;
}
