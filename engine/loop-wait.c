/* rr.loop: the waits of the loop itself, rr.wait / rr.wait_any on tasks and rr.sleep.
 *
 * Both are RrOps like any primitive's. A wait on tasks is one JoinOp with a node per task: the
 * node is on its task's list of joiners until the task finishes (task_finish() hands the list to
 * task_wake_joiners()) and keeps the task userdata referenced until the op is released, so that
 * push() reads the outcome of a task nobody else holds. */
#include <string.h>

#include "loop-internal.h"

typedef struct JoinOp JoinOp;

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

/* Called by task_finish(): each wait on the task counts it, and completes when it was the last
 * one it waited for, or for rr.wait_any the first. */
bool task_wake_joiners(RrTask *t) {
        bool any = t->joiners != NULL;

        for (JoinNode *j = t->joiners, *next; j; j = next) {
                next = j->next;
                j->next = NULL;
                j->task = NULL; /* unlinked; the node still holds its ref for push() */
                if (--j->join->remaining == 0 || j->join->any)
                        rr_op_complete(&j->join->op);
        }
        t->joiners = NULL;
        return any;
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
                luaL_unref(loop_shared.L, LUA_REGISTRYINDEX, node->ref);
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
                if (t == loop_shared.current && !task_finished(t))
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

int loop_wait(lua_State *L) {
        return join_tasks(L, false);
}

/* rr.wait_any(t1, ...) or rr.wait_any{...} -> the first task to finish, ok, results... */
int loop_wait_any(lua_State *L) {
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
int loop_sleep(lua_State *L) {
        double secs = luaL_checknumber(L, 1);
        SleepOp *s;
        int r;

        luaL_argcheck(L, secs >= 0 && secs < 1e9, 1, "seconds must be >= 0");
        s = calloc(1, sizeof *s);
        if (!s)
                return luaL_error(L, "out of memory");
        s->op.push = sleep_push;
        s->op.release = sleep_release;
        r = sd_event_add_time(rr_loop_event(), &s->source, CLOCK_MONOTONIC, rr_deadline_usec(secs), 1000,
                              sleep_fired, s);
        if (r < 0) {
                free(s);
                return luaL_error(L, "cannot add timer: %s", strerror(-r));
        }
        return rr_op_await(L, &s->op);
}
