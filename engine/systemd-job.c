/* rr.systemd: unit jobs. u:start(), u:stop(), u:restart(), ... queue a job (StartUnit & co),
 * wait for its JobRemoved signal (the match is in place since the connection opened, so a job
 * that ends at once is not missed), then read the unit's Result, so that the answer says why. */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>

#include "systemd-internal.h"

#define ERR_WAIT_TIMEOUT "wait-timeout"

/* ---- ops: unit jobs (start, stop, restart, reload, ...) ---- */

typedef struct JobVerb {
        const char *lua;    /* the unit method, u:<lua>([mode][, opts]) */
        const char *verb;   /* for messages, as systemctl names it */
        const char *method; /* the Manager method */
} JobVerb;

/* Every job a unit handle can queue; each is a method of rr.systemd.unit (see add_job_methods). */
static const JobVerb job_verbs[] = {
        { "start", "start", "StartUnit" },
        { "stop", "stop", "StopUnit" },
        { "restart", "restart", "RestartUnit" },
        { "reload", "reload", "ReloadUnit" },
        { "reload_or_restart", "reload-or-restart", "ReloadOrRestartUnit" },
        { "try_restart", "try-restart", "TryRestartUnit" },
        { "try_reload_or_restart", "try-reload-or-restart", "ReloadOrTryRestartUnit" },
};

static const char *const job_modes[] = {
        "replace", "fail", "isolate", "ignore-dependencies", "ignore-requirements", "flush",
        "replace-irreversibly", "triggering", "restart-dependencies",
};

typedef struct JobOp {
        SdOp base;
        const JobVerb *verb;
        char *name, *path;
        const UnitType *type;
        double timeout;
        char *job;         /* the job's object path, once queued */
        char *job_result;  /* from its JobRemoved signal */
        char *unit_result; /* the unit's Result, read after the job ended */
} JobOp;

/* The explanation of `key` in a table of { key, explanation } pairs, or NULL. */
static const char *explained(const char *const (*table)[2], size_t n, const char *key) {
        for (size_t i = 0; i < n; i++)
                if (streq(key, table[i][0]))
                        return table[i][1];
        return NULL;
}

/* Why a job ended so, for the message (as systemctl explains it), or NULL. */
static const char *job_result_explained(const char *result) {
        static const char *const table[][2] = {
                { "canceled", "the job was canceled (a later job replaced it, or it was canceled by hand)" },
                { "timeout", "the job timed out (JobTimeoutSec=)" },
                { "dependency", "a dependency failed" },
                { "invalid", "the unit is not active, it cannot reload" },
                { "skipped", "the job did not apply to the unit's state" },
                { "assert", "an Assert...= condition failed" },
                { "unsupported", "the operation or unit type is not supported on this system" },
                { "collected", "the queued job was garbage-collected" },
                { "once", "the unit can be started only once" },
        };
        return explained(table, ELEMENTSOF(table), result);
}

/* What a unit's Result means, for the message, or NULL. */
static const char *unit_result_explained(const char *result) {
        static const char *const table[][2] = {
                { "exit-code", "a process exited with a non-zero status" },
                { "signal", "a process was killed by a signal" },
                { "core-dump", "a process dumped core" },
                { "timeout", "a timeout was exceeded" },
                { "watchdog", "the watchdog ping was missed" },
                { "start-limit-hit", "start request repeated too quickly: the unit hit its start limit "
                                     "(StartLimitBurst=, StartLimitIntervalSec=); reset_failed() allows starts again" },
                { "resources", "a resource was missing or a system call failed (e.g. an EnvironmentFile=)" },
                { "protocol", "the service did not take the steps its unit configuration requires" },
                { "oom-kill", "the OOM killer killed a process" },
                { "exec-condition", "ExecCondition= failed" },
        };
        return explained(table, ELEMENTSOF(table), result);
}

/* true, "done", unit_result | nil, message, job_result, unit_result. */
static int job_push(lua_State *L, SdOp *o) {
        JobOp *j = (JobOp *) o;
        const char *explained;
        luaL_Buffer b;

        if (streq(j->job_result, "done")) {
                lua_pushboolean(L, 1);
                lua_pushstring(L, j->job_result);
                lua_pushstring(L, j->unit_result); /* nil when unknown */
                return 3;
        }
        lua_pushnil(L);
        luaL_buffinit(L, &b);
        lua_pushfstring(L, "%s of %s failed: %s", j->verb->verb, j->name, j->job_result);
        luaL_addvalue(&b);
        explained = job_result_explained(j->job_result);
        if (explained) {
                luaL_addstring(&b, ", ");
                luaL_addstring(&b, explained);
        }
        if (j->unit_result) {
                luaL_addstring(&b, " (unit result: ");
                luaL_addstring(&b, j->unit_result);
                explained = unit_result_explained(j->unit_result);
                if (explained) {
                        luaL_addstring(&b, ", ");
                        luaL_addstring(&b, explained);
                }
                luaL_addchar(&b, ')');
        }
        luaL_pushresult(&b);
        lua_pushstring(L, j->job_result);
        lua_pushstring(L, j->unit_result); /* nil when unknown */
        return 4;
}

/* Frees a JobOp's own fields. */
static void job_done(SdOp *o) {
        JobOp *j = (JobOp *) o;
        free(j->name);
        free(j->path);
        free(j->job);
        free(j->job_result);
        free(j->unit_result);
}

/* The unit's Result after its job ended: the op is complete. */
static int job_unit_result_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        JobOp *j = userdata;
        const char *result;

        (void) ret_error;
        sdop_take_call(&j->base, reply);
        /* Best effort: without it the job's own result still says what happened. */
        if (!bus_reply_error(reply) && sd_bus_message_read(reply, "v", "s", &result) >= 0)
                j->unit_result = strdup(result);
        sdop_finish(&j->base);
        return 0;
}

/* A JobRemoved signal: ours when the job path is the one the manager gave us. */
static void job_removed(SdOp *o, const char *job, const char *result) {
        JobOp *j = (JobOp *) o;
        int r;

        if (!j->job || j->job_result || !streq(j->job, job))
                return;
        j->job_result = strdup(result);
        if (!j->job_result) {
                sdop_fail(o, NULL, "out of memory");
                return;
        }
        if (!j->type || !j->type->has_result) {
                sdop_finish(o);
                return;
        }
        /* Why the unit is where it is (exit-code, start-limit-hit, ...): read after the job ended. */
        r = sdop_call(o, 0, job_unit_result_reply, 0, j->path, DBUS_PROPERTIES, "Get", "ss", j->type->iface, "Result");
        if (r < 0)
                sdop_finish(o);
}

/* opts.timeout passed: stop waiting (the job goes on). */
static void job_timeout(SdOp *o) {
        JobOp *j = (JobOp *) o;
        sdop_fail(o, ERR_WAIT_TIMEOUT, "%s of %s: no result within %g s (the job goes on in systemd)", j->verb->verb,
                  j->name, j->timeout);
}

static const SdOpType job_type = {
        .push = job_push,
        .done = job_done,
        .job_removed = job_removed,
        .timeout = job_timeout,
};

/* StartUnit() & co answered with the job's path, or refused the job. */
static int job_method_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        JobOp *j = userdata;
        const sd_bus_error *e;
        const char *job;
        int r;

        (void) ret_error;
        sdop_take_call(&j->base, reply);
        e = bus_reply_error(reply);
        if (e) {
                sdop_fail(&j->base, e->name, "%s of %s failed: %s", j->verb->verb, j->name, bus_error_text(e));
                return 0;
        }
        r = sd_bus_message_read(reply, "o", &job);
        if (r < 0) {
                sdop_fail(&j->base, ERR_PARSE, "%s of %s: bad reply: %s", j->verb->verb, j->name, strerror(-r));
                return 0;
        }
        /* Its JobRemoved cannot have come yet: the manager replies before the job can run. */
        j->job = strdup(job);
        if (!j->job)
                sdop_fail(&j->base, NULL, "out of memory");
        return 0;
}

/* ---- Lua ---- */

/* Job options at idx: nil or { timeout = seconds }. */
static double check_job_opts(lua_State *L, int idx) {
        double timeout = -1;

        if (lua_isnoneornil(L, idx))
                return -1;
        luaL_checktype(L, idx, LUA_TTABLE);
        lua_pushnil(L);
        while (lua_next(L, idx)) {
                /* key value */
                if (lua_type(L, -2) != LUA_TSTRING || !streq(lua_tostring(L, -2), "timeout"))
                        return luaL_argerror(L, idx, lua_pushfstring(L, "unknown option '%s'", luaL_tolstring(L, -2, NULL)));
                timeout = opt_timeout(L, lua_gettop(L));
                lua_pop(L, 1);
        }
        return timeout;
}

/* u:<verb>([mode][, opts]) -> true, "done", unit_result
 *                           | nil, err, job_result, unit_result   (the job ended otherwise)
 *                           | nil, err, dbus_error_name           (the manager refused the job)
 * One closure per entry of job_verbs, its JobVerb as upvalue 1. */
static int unit_l_job(lua_State *L) {
        rr_canceled(L, true); /* a cancelled task must not start a side effect it never sees */
        const JobVerb *verb = lua_touserdata(L, lua_upvalueindex(1));
        Unit *u = check_unit(L, 1);
        const char *mode = "replace";
        double timeout;
        int opts = 3, r;
        bool known = false;
        JobOp *j;
        char what[512];

        if (lua_istable(L, 2))
                opts = 2;
        else
                mode = luaL_optstring(L, 2, "replace");
        for (size_t i = 0; i < ELEMENTSOF(job_modes); i++)
                known = known || streq(mode, job_modes[i]);
        if (!known)
                return luaL_argerror(L, 2, lua_pushfstring(L, "invalid job mode '%s'", mode));
        timeout = check_job_opts(L, opts);
        if (u->m->lost)
                return push_lost(L, u->m);

        j = sdop_new_or_raise(L, sizeof *j, &job_type, u->m);
        j->verb = verb;
        j->type = u->type;
        j->timeout = timeout;
        j->name = strdup(u->name);
        j->path = strdup(u->path);
        if (!j->name || !j->path)
                return sdop_raise_oom(L, &j->base);
        /* The JobRemoved match is in place since the connection opened: no job end can be missed. */
        r = sdop_call(&j->base, 0, job_method_reply, 0, SD_OBJECT, SD_MANAGER, verb->method, "ss", u->id, mode);
        if (r >= 0)
                r = sdop_set_timeout(&j->base, timeout);
        if (r < 0) {
                snprintf(what, sizeof what, "%s of %s failed", verb->verb, u->name);
                return sdop_abandon(L, &j->base, r, what);
        }
        return rr_op_await(L, &j->base.op);
}

/* Adds u:start(), u:stop(), ...: one unit_l_job closure per job verb, to the methods table on top. */
void add_job_methods(lua_State *L) {
        for (size_t i = 0; i < ELEMENTSOF(job_verbs); i++) {
                lua_pushlightuserdata(L, (void *) &job_verbs[i]); /* methods verb */
                lua_pushcclosure(L, unit_l_job, 1);               /* methods closure */
                lua_setfield(L, -2, job_verbs[i].lua);            /* methods */
        }
}
