/* rr.loop's private header: what its files share.
 *
 *   loop.c         the scheduler: the ready queue, tasks as coroutines (spawn, resume, finish,
 *                  cancel), ops (rr_op_await), stop signals, the module and the engine life cycle
 *   loop-limits.c  bounded tasks: task:deadline() and task:max_instructions(), the count hook
 *                  that enforces them in code that never waits, the deadline timer for code that
 *                  does
 *   loop-wait.c    the waits of rr.loop itself: rr.wait / rr.wait_any (a JoinOp on tasks) and
 *                  rr.sleep (a timer op)
 *
 * Other modules see the loop through rr.h only. Each piece of the loop's state stays static in
 * the file that owns it; what is here is what another loop file cannot do without. */
#pragma once

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

typedef enum {
        LIMIT_NONE,
        LIMIT_DEADLINE,
        LIMIT_INSTRUCTIONS,
} TaskLimit;

/* A task waiting for this one to finish (loop-wait.c's: the scheduler only hands the list over). */
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
        /* Limits (task:deadline(), task:max_instructions()): see loop-limits.c. */
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

/* The scheduler's state that the other loop files read. Only loop.c writes it: L once, in
 * rr_loop_init(); current around every resume, in task_resume(). The rest of the scheduler's
 * state (the ready queue, signals, the exit request) is static in loop.c. */
typedef struct LoopShared {
        lua_State *L;    /* the main thread: loop-owned references and scratch slots live there */
        RrTask *current; /* the task running now; NULL at the top level */
} LoopShared;

extern LoopShared loop_shared;

static inline bool task_finished(const RrTask *t) {
        return t->state >= TASK_DONE;
}

/* Pushes the task userdata (alive: it holds its own ref until it finishes). */
static inline void push_task(lua_State *L, RrTask *t) {
        lua_rawgeti(L, LUA_REGISTRYINDEX, t->ref);
}

static inline RrTask *check_task(lua_State *L, int idx) {
        return luaL_checkudata(L, idx, TASK_MT);
}

/* loop.c: the scheduler. */

/* Queue the task to be resumed on the next scheduler turn (once, however often it is called). */
void ready_push(RrTask *t);
/* Finish a task whose coroutine returned or raised: store its outcome, wake its joiners. A task
 * with limits finishes through task_finish_limited() instead. */
void task_finish(RrTask *t, TaskState state, int nres);
/* Pushes ok, results... of a finished task (the userdata at ud_idx); returns the count. */
int push_outcome(lua_State *L, RrTask *t, int ud_idx);

/* loop-limits.c: bounded tasks. */

/* Has the task hit one of its limits (now, or earlier)? */
bool task_limit_hit(RrTask *t, double now);
/* Pushes on L the message of the limit the task hit. */
void push_limit_message(lua_State *L, RrTask *t, lua_State *where);
/* task_finish(), after releasing the limits; a task ended by one gets its code (ETIMEDOUT,
 * ELIMIT) as a second error value. Every task finishes through this. */
void task_finish_limited(RrTask *t, TaskState state, int nres);
/* Ends a task that hit a limit and is not running (it yielded, waits, or never started). */
void task_end_at_limit(RrTask *t);
/* A new task started by parent: it gets the parent's deadline, or no hook at all. Returns 0 or a
 * negative errno (the task then ends at once when resumed: it must not run unbounded). */
int task_limits_inherit(RrTask *t, const RrTask *parent);
int task_l_deadline(lua_State *L);
int task_l_max_instructions(lua_State *L);

/* loop-wait.c: rr.wait, rr.wait_any, rr.sleep. */

/* The task finished: complete the waits that were waiting for it. Returns whether there were
 * any (they received its outcome). */
bool task_wake_joiners(RrTask *t);
int loop_wait(lua_State *L);
int loop_wait_any(lua_State *L);
int loop_sleep(lua_State *L);
