/* rr.systemd: unit jobs. u:start(), u:stop(), u:restart(), ... queue a job (StartUnit & co),
 * wait for its JobRemoved signal (the match is in place since the connection opened, so a job
 * that ends at once is not missed), then read the unit's Result, so that the answer says why.
 *
 * A job systemd still runs is never abandoned without a way back to it. When the caller's
 * timeout passes:
 *   - a stop job is escalated: every process of the unit gets SIGKILL (KillUnit, whom "all")
 *     and the wait goes on, `grace` seconds more, for the job's real end (systemd's own
 *     TimeoutStopSec= bounds it too), which is then reported with the escalation;
 *   - any other job (and a stop job still running after the grace) ends the wait with
 *     nil, message, "ETIMEDOUT", job path: the job's result is kept on the manager when it
 *     comes, and u:wait_job(job path) waits for it (or returns it at once). */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "systemd-internal.h"

#define ERR_TIMEDOUT "ETIMEDOUT"
#define SD_JOB "org.freedesktop.systemd1.Job"
#define SD_JOB_PREFIX "/org/freedesktop/systemd1/job/"
#define ESCALATION "SIGKILL"

/* How long a stop job may still run after the SIGKILL before the wait ends with ETIMEDOUT. The
 * processes die at once; what can remain is ExecStopPost= or a process that cannot die (in an
 * uninterruptible sleep), which systemd itself gives up on after TimeoutStopSec=. */
#define DEFAULT_GRACE 10.0

/* The method calls of a job op (SdOp.calls). */
enum {
        CALL_MAIN,  /* the job method (StartUnit & co), then the unit's Result */
        CALL_CHECK, /* u:wait_job(): is the job there, and of which type? */
        CALL_KILL,  /* the escalation's KillUnit */
};

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

/* systemd's job modes (the mode argument of StartUnit & co). */
static const char *const job_modes[] = {
        "replace", "fail", "isolate", "ignore-dependencies", "ignore-requirements", "flush",
        "replace-irreversibly", "triggering", "restart-dependencies",
};

/* Job options: { timeout = seconds, grace = seconds }. */
typedef struct JobOpts {
        double timeout; /* -1: as long as the job takes */
        double grace;   /* stop jobs: how long after the SIGKILL */
} JobOpts;

typedef struct JobOp {
        SdOp base;
        char *verb;          /* "start", "stop", ... for messages ("job" until u:wait_job() knows) */
        bool stop;           /* a stop job: escalated at the timeout */
        char *name, *id, *path;
        const UnitType *type;
        JobOpts opts;
        char *job;           /* the job's object path, once known */
        char *job_result;    /* from its JobRemoved signal (or kept on the manager) */
        bool ended;          /* job_result is final: the unit's Result is read, then done */
        char *unit_result;   /* the unit's Result, read after the job ended */
        bool escalated;      /* the timeout passed: every process of the unit got SIGKILL */
        char *kill_error;    /* ... and KillUnit failed so */
        bool timed_out;      /* the wait ended with systemd still running the job */
        bool gone;           /* u:wait_job(): the job ended before, its result unknown */
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

/* What the escalation adds to a message, into b. */
static void add_escalation(luaL_Buffer *b, const JobOp *j) {
        if (!j->escalated)
                return;
        lua_pushfstring(b->L, "; not stopped within %f s, every process of the unit got SIGKILL", j->opts.timeout);
        luaL_addvalue(b);
        if (j->kill_error) {
                luaL_addstring(b, " (which failed: ");
                luaL_addstring(b, j->kill_error);
                luaL_addchar(b, ')');
        }
}

/* The last value of every answer after an escalation: "SIGKILL". Returns how many it pushed. */
static int push_escalation(lua_State *L, const JobOp *j) {
        if (!j->escalated)
                return 0;
        lua_pushliteral(L, ESCALATION);
        return 1;
}

/* nil, "... not done within N s ...", "ETIMEDOUT", job path[, "SIGKILL"] */
static int push_timed_out(lua_State *L, JobOp *j) {
        luaL_Buffer b;

        lua_pushnil(L);
        luaL_buffinit(L, &b);
        if (!j->job) {
                lua_pushfstring(L, "%s of %s: the manager did not answer within %f s", j->verb, j->name,
                                j->opts.timeout);
                luaL_addvalue(&b);
        } else {
                lua_pushfstring(L, "%s of %s: not done within %f s", j->verb, j->name, j->opts.timeout);
                luaL_addvalue(&b);
                if (j->escalated) {
                        lua_pushfstring(L, ", nor %f s after SIGKILL to every process of the unit", j->opts.grace);
                        luaL_addvalue(&b);
                        if (j->kill_error) {
                                luaL_addstring(&b, " (which failed: ");
                                luaL_addstring(&b, j->kill_error);
                                luaL_addchar(&b, ')');
                        }
                }
                luaL_addstring(&b, "; systemd is still running the job ");
                luaL_addstring(&b, j->job);
        }
        luaL_pushresult(&b);
        lua_pushliteral(L, ERR_TIMEDOUT);
        lua_pushstring(L, j->job); /* nil when the manager never said */
        return 4 + push_escalation(L, j);
}

/* true, "done", unit_result[, "SIGKILL"]
 * | nil, message, job_result, unit_result[, "SIGKILL"]     the job ended otherwise
 * | nil, message, "ETIMEDOUT", job path[, "SIGKILL"]       systemd still runs it
 * | nil, message, "ENOENT"                                 u:wait_job(): gone, result unknown */
static int job_push(lua_State *L, SdOp *o) {
        JobOp *j = (JobOp *) o;
        const char *explained;
        luaL_Buffer b;

        if (j->gone)
                return rr_push_fail(L, ENOENT, "%s: job %s is gone: it ended before the wait, and its result was not kept",
                                    j->name, j->job);
        if (j->timed_out)
                return push_timed_out(L, j);
        if (streq(j->job_result, "done")) {
                lua_pushboolean(L, 1);
                lua_pushstring(L, j->job_result);
                lua_pushstring(L, j->unit_result); /* nil when unknown */
                return 3 + push_escalation(L, j);
        }
        lua_pushnil(L);
        luaL_buffinit(L, &b);
        lua_pushfstring(L, "%s of %s failed: %s", j->verb, j->name, j->job_result);
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
        add_escalation(&b, j);
        luaL_pushresult(&b);
        lua_pushstring(L, j->job_result);
        lua_pushstring(L, j->unit_result); /* nil when unknown */
        return 4 + push_escalation(L, j);
}

/* Frees a JobOp's own fields. */
static void job_done(SdOp *o) {
        JobOp *j = (JobOp *) o;
        free(j->verb);
        free(j->name);
        free(j->id);
        free(j->path);
        free(j->job);
        free(j->job_result);
        free(j->unit_result);
        free(j->kill_error);
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

/* The job's result is known: read why the unit is where it is (exit-code, start-limit-hit, ...),
 * then the op is complete. Idempotent. */
static void job_ended(JobOp *j) {
        int r;

        if (j->ended)
                return;
        j->ended = true;
        if (!j->type || !j->type->has_result) {
                sdop_finish(&j->base);
                return;
        }
        /* A start, restart or reload that ended "done" left the unit running with Result=success
         * (systemd resets it when the unit starts): no round trip to ask. A stop is asked: how
         * the processes ended (signal, exit-code) is the news. */
        if (!j->stop && j->job_result && streq(j->job_result, "done")) {
                j->unit_result = strdup("success");
                if (!j->unit_result) {
                        sdop_fail(&j->base, NULL, "out of memory");
                        return;
                }
                sdop_finish(&j->base);
                return;
        }
        r = sdop_call(&j->base, CALL_MAIN, job_unit_result_reply, 0, j->path, DBUS_PROPERTIES, "Get", "ss",
                      j->type->iface, "Result");
        if (r < 0)
                sdop_finish(&j->base);
}

/* A JobRemoved signal: ours when the job path is the one the manager gave us. */
static void job_removed(SdOp *o, const char *job, const char *result) {
        JobOp *j = (JobOp *) o;

        if (!j->job || j->job_result || !streq(j->job, job))
                return;
        j->job_result = strdup(result);
        if (!j->job_result) {
                sdop_fail(o, NULL, "out of memory");
                return;
        }
        job_ended(j);
}

/* KillUnit answered: only a failure matters, for the message. */
static int job_kill_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        JobOp *j = userdata;
        const sd_bus_error *e;

        (void) ret_error;
        sdop_take_call(&j->base, reply);
        e = bus_reply_error(reply);
        if (e && !j->kill_error)
                j->kill_error = strdup(bus_error_text(e)); /* out of memory: the message says less */
        return 0;
}

/* Stop waiting while systemd still runs the job: its result is kept on the manager for
 * u:wait_job(), and the caller gets the job's path. */
static void job_give_up(JobOp *j) {
        if (j->job && manager_keep_job(j->base.m, j->job, j->verb) < 0) {
                sdop_fail(&j->base, NULL, "out of memory");
                return;
        }
        j->timed_out = true;
        sdop_finish(&j->base);
}

/* The deadline passed (opts.timeout, or after an escalation the grace): escalate a stop job
 * once, else give up. */
static void job_timeout(SdOp *o) {
        JobOp *j = (JobOp *) o;
        int r;

        if (j->ended)
                return; /* the unit's Result is on its way */
        if (j->job_result) {
                job_ended(j); /* u:wait_job() of a kept result whose check has not answered yet */
                return;
        }
        if (j->stop && !j->escalated) {
                j->escalated = true;
                /* Sent after the StopUnit on the same connection, so the manager has the job first. */
                r = sdop_call(o, CALL_KILL, job_kill_reply, 0, SD_OBJECT, SD_MANAGER, "KillUnit", "ssi", j->id, "all",
                              (int32_t) SIGKILL);
                if (r < 0)
                        j->kill_error = strdup(strerror(-r));
                if (sdop_set_timeout(o, j->opts.grace) >= 0)
                        return;
        }
        job_give_up(j);
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
                sdop_fail(&j->base, e->name, "%s of %s failed: %s", j->verb, j->name, bus_error_text(e));
                return 0;
        }
        r = sd_bus_message_read(reply, "o", &job);
        if (r < 0) {
                sdop_fail(&j->base, ERR_PARSE, "%s of %s: bad reply: %s", j->verb, j->name, strerror(-r));
                return 0;
        }
        /* Its JobRemoved cannot have come yet: the manager replies before the job can run. */
        j->job = strdup(job);
        if (!j->job)
                sdop_fail(&j->base, NULL, "out of memory");
        return 0;
}

/* u:wait_job(): the job's JobType answered. The job runs (its JobRemoved is awaited), or it is
 * gone: then its result was kept (an earlier wait timed out) or it is unknown. A JobRemoved that
 * came before this answer was seen first: one connection delivers in order. */
static int job_check_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        JobOp *j = userdata;
        const sd_bus_error *e;
        const char *type;

        (void) ret_error;
        sdop_take_call(&j->base, reply);
        if (j->ended)
                return 0;
        if (j->job_result) {
                job_ended(j);
                return 0;
        }
        e = bus_reply_error(reply);
        if (!e) {
                if (streq(j->verb, "job") && sd_bus_message_read(reply, "v", "s", &type) >= 0) {
                        char *verb = strdup(type);
                        if (verb) {
                                free(j->verb);
                                j->verb = verb;
                        }
                        j->stop = streq(type, "stop");
                }
                return 0;
        }
        if (sd_bus_error_has_name(e, SD_BUS_ERROR_UNKNOWN_OBJECT)) {
                j->gone = true;
                sdop_finish(&j->base);
        } else
                sdop_fail(&j->base, e->name, "%s: cannot look at job %s: %s", j->name, j->job, bus_error_text(e));
        return 0;
}

/* ---- Lua ---- */

/* Job options at idx: nil or { timeout = seconds, grace = seconds }. */
static JobOpts check_job_opts(lua_State *L, int idx) {
        JobOpts o = { .timeout = -1, .grace = DEFAULT_GRACE };

        if (lua_isnoneornil(L, idx))
                return o;
        luaL_checktype(L, idx, LUA_TTABLE);
        lua_pushnil(L);
        while (lua_next(L, idx)) {
                /* key value */
                const char *key = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : "";
                if (streq(key, "timeout"))
                        o.timeout = opt_timeout(L, lua_gettop(L));
                else if (streq(key, "grace")) {
                        o.grace = lua_type(L, -1) == LUA_TNUMBER ? lua_tonumber(L, -1) : -1;
                        luaL_argcheck(L, o.grace >= 0 && o.grace < 1e9, idx, "grace must be a number of seconds >= 0");
                } else
                        luaL_argerror(L, idx, lua_pushfstring(L, "unknown option '%s'", luaL_tolstring(L, -2, NULL)));
                lua_pop(L, 1);
        }
        return o;
}

/* A JobOp on u with its verb (raises on OOM). */
static JobOp *job_new(lua_State *L, Unit *u, const char *verb, JobOpts opts) {
        JobOp *j = sdop_new_or_raise(L, sizeof *j, &job_type, u->m);

        j->type = u->type;
        j->opts = opts;
        j->stop = streq(verb, "stop");
        j->verb = strdup(verb);
        j->name = strdup(u->name);
        j->id = strdup(u->id);
        j->path = strdup(u->path);
        if (!j->verb || !j->name || !j->id || !j->path) {
                sdop_raise_oom(L, &j->base);
                return NULL;
        }
        return j;
}

/* u:<verb>([mode][, opts]) -> see job_push(); or nil, err, dbus_error_name when the manager
 * refuses the job. One closure per entry of job_verbs, its JobVerb as upvalue 1. */
static int unit_l_job(lua_State *L) {
        rr_canceled(L, true); /* a cancelled task must not start a side effect it never sees */
        const JobVerb *verb = lua_touserdata(L, lua_upvalueindex(1));
        Unit *u = check_unit(L, 1);
        const char *mode = "replace";
        JobOpts opts;
        int where = 3, r;
        bool known = false;
        JobOp *j;
        char what[512];

        if (lua_istable(L, 2))
                where = 2;
        else
                mode = luaL_optstring(L, 2, "replace");
        for (size_t i = 0; i < ELEMENTSOF(job_modes); i++)
                known = known || streq(mode, job_modes[i]);
        if (!known)
                return luaL_argerror(L, 2, lua_pushfstring(L, "invalid job mode '%s'", mode));
        opts = check_job_opts(L, where);
        if (u->m->lost)
                return push_lost(L, u->m);

        j = job_new(L, u, verb->verb, opts);
        /* The JobRemoved match is in place since the connection opened: no job end can be missed. */
        r = sdop_call(&j->base, CALL_MAIN, job_method_reply, 0, SD_OBJECT, SD_MANAGER, verb->method, "ss", u->id, mode);
        if (r >= 0)
                r = sdop_set_timeout(&j->base, opts.timeout);
        if (r < 0) {
                snprintf(what, sizeof what, "%s of %s failed", verb->verb, u->name);
                return sdop_abandon(L, &j->base, r, what);
        }
        return rr_op_await(L, &j->base.op);
}

/* u:wait_job(job[, opts]) -> as the job methods: waits for a job of this unit, by the path an
 * earlier wait returned with ETIMEDOUT (or any job path, e.g. list_units()' job_path). */
static int unit_l_wait_job(lua_State *L) {
        Unit *u = check_unit(L, 1);
        const char *job = luaL_checkstring(L, 2);
        size_t n = strlen(SD_JOB_PREFIX);
        JobOpts opts = check_job_opts(L, 3);
        JobRecord *kept;
        JobOp *j;
        int r;

        luaL_argcheck(L, strncmp(job, SD_JOB_PREFIX, n) == 0 && job[n] && strspn(job + n, "0123456789") == strlen(job + n),
                      2, "not a job path (" SD_JOB_PREFIX "N)");
        if (u->m->lost)
                return push_lost(L, u->m);
        kept = manager_take_job(u->m, job);
        j = sdop_new(sizeof *j, &job_type, u->m);
        if (j) {
                j->type = u->type;
                j->opts = opts;
                j->verb = kept ? kept->verb : strdup("job");
                j->stop = kept && streq(kept->verb, "stop");
                j->job_result = kept ? kept->result : NULL;
                if (kept)
                        kept->verb = kept->result = NULL;
                j->job = strdup(job);
                j->name = strdup(u->name);
                j->id = strdup(u->id);
                j->path = strdup(u->path);
        }
        job_record_free(kept);
        if (!j)
                return luaL_error(L, "out of memory");
        if (!j->verb || !j->job || !j->name || !j->id || !j->path)
                return sdop_raise_oom(L, &j->base);
        r = sdop_call(&j->base, CALL_CHECK, job_check_reply, 0, job, DBUS_PROPERTIES, "Get", "ss", SD_JOB, "JobType");
        if (r >= 0)
                r = sdop_set_timeout(&j->base, opts.timeout);
        if (r < 0)
                return sdop_abandon(L, &j->base, r, "cannot wait for the job");
        return rr_op_await(L, &j->base.op);
}

/* Adds u:start(), u:stop(), ... (one unit_l_job closure per job verb) and u:wait_job() to the
 * methods table on top. */
void add_job_methods(lua_State *L) {
        for (size_t i = 0; i < ELEMENTSOF(job_verbs); i++) {
                lua_pushlightuserdata(L, (void *) &job_verbs[i]); /* methods verb */
                lua_pushcclosure(L, unit_l_job, 1);               /* methods closure */
                lua_setfield(L, -2, job_verbs[i].lua);            /* methods */
        }
        lua_pushcfunction(L, unit_l_wait_job);
        lua_setfield(L, -2, "wait_job");
}
