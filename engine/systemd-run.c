/* rr.systemd: m:run(argv, opts), a command run as a transient service of the manager, what
 * `systemd-run --pipe --wait` does, on the engine's own connection.
 *
 * Why a unit and not a child process: rr.proc kills a command's process group, and a command
 * that calls setsid() (or double-forks into a new session) leaves it and outlives any timeout.
 * A unit's processes all live in its cgroup, whatever they do with sessions and groups; stopping
 * the unit (KillMode=control-group) ends every one of them, and the unit is inactive only once
 * its cgroup is empty.
 *
 * One StartTransientUnit call (job mode "fail") creates and starts the unit:
 *   - Type=exec, so that the start job ends once the program runs (or fails if it cannot);
 *   - ExecStart= the resolved program with argv, every "$" doubled (systemd would expand $VAR
 *     in argv; rrengine never goes through a shell, nor through systemd's expansion);
 *   - StandardOutputFileDescriptor= / StandardErrorFileDescriptor= the write ends of two pipes
 *     (passed over the bus), read by output.c as rr.proc reads a child's;
 *   - WorkingDirectory=, Environment= (the engine's environment merged with opts.env: a unit
 *     does not inherit the engine's), UnsetEnvironment=, UMask= (the engine's);
 *   - KillMode=control-group, TimeoutStopSec= the kill grace, RuntimeMaxSec= the timeout (so
 *     systemd itself ends the command at its deadline even if the engine dies), and
 *     CollectMode=inactive-or-failed (a failed run leaves no failed unit behind).
 *
 * Everything is driven by signals, never by polling. The unit's PropertiesChanged signals carry
 * its ActiveState and the service's MainPID, ExecMainPID, ExecMainCode, ExecMainStatus and
 * Result; the last of them is sent before the unit is collected. So the result is read from the
 * signals, and AddRef= is not needed to keep the unit around: the manager refuses it on its
 * private socket anyway (the connection rr.systemd uses first), where there is no bus name to
 * track. The run is over when the start job's JobRemoved came (and the stop job's, when one was
 * sent) and the unit is inactive or failed; then the pipes are drained (the manager keeps its
 * own copy of their write ends until it collects the unit, so end of file is not the signal)
 * and, once every on_line and on_start call returned, the caller wakes.
 *
 * Whether the program ran is told by the main process's exit status, not by the start job
 * alone (see run_never_started()).
 *
 * On the timeout, the unit is stopped (StopUnit: SIGTERM to its cgroup, SIGKILL after the grace)
 * and waited for. When the calling task is canceled (or the op is dropped for any other reason
 * before the end), a StopUnit is sent without waiting for its answer: release() cannot wait. */
#define _GNU_SOURCE
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "output.h"
#include "systemd-internal.h"

#define SD_SERVICE_IFACE "org.freedesktop.systemd1.Service"
#define DEFAULT_KILL_GRACE 2.0
#define DEFAULT_PREFIX "rrengine-run"
#define PREFIX_MAX 200
#define DESCRIPTION_MAX 200

extern char **environ;

enum { CALL_START, CALL_STOP };

typedef struct RunOp {
        SdOp base;
        RrOutput out;
        char *name;                 /* argv[0], for messages */
        char *unit, *path;          /* the unit's name and object path */
        char *start_job, *stop_job; /* job paths */
        char *start_result;         /* from the start job's JobRemoved */
        char *result;               /* the service's Result */
        char state[32];             /* its ActiveState, as the signals said */
        uint32_t main_pid, exec_main_pid;
        int32_t exec_code, exec_status; /* CLD_EXITED / CLD_KILLED / CLD_DUMPED, code or signal */
        double timeout, t0, duration;
        bool created;     /* StartTransientUnit went out and was not refused */
        bool on_start;    /* the caller gave an on_start */
        bool stop_sent, stop_ended, timed_out, ended;
} RunOp;

/* ---- checks of what the manager accepts ---- */

/* A variable name systemd accepts in Environment=: [A-Za-z_][A-Za-z0-9_]*. */
static bool env_name_valid(const char *s, size_t n) {
        if (n == 0 || (s[0] >= '0' && s[0] <= '9'))
                return false;
        for (size_t i = 0; i < n; i++)
                if (!((s[i] >= 'a' && s[i] <= 'z') || (s[i] >= 'A' && s[i] <= 'Z') || (s[i] >= '0' && s[i] <= '9') ||
                      s[i] == '_'))
                        return false;
        return true;
}

/* Is s valid UTF-8 as D-Bus and systemd take it: shortest forms, no surrogates, no
 * non-characters, nothing above U+10FFFF? */
static bool utf8_valid(const char *s, size_t n) {
        const unsigned char *p = (const unsigned char *) s, *end = p + n;

        while (p < end) {
                uint32_t c = *p;
                size_t len = c < 0x80 ? 1 : (c & 0xe0) == 0xc0 ? 2 : (c & 0xf0) == 0xe0 ? 3 : (c & 0xf8) == 0xf0 ? 4 : 0;
                if (len == 0 || (size_t) (end - p) < len)
                        return false;
                if (len > 1)
                        c &= 0x7f >> len;
                for (size_t i = 1; i < len; i++) {
                        if ((p[i] & 0xc0) != 0x80)
                                return false;
                        c = (c << 6) | (p[i] & 0x3f);
                }
                if ((len == 2 && c < 0x80) || (len == 3 && c < 0x800) || (len == 4 && c < 0x10000) || c > 0x10ffff ||
                    (c >= 0xd800 && c <= 0xdfff) || (c >= 0xfdd0 && c <= 0xfdef) || (c & 0xfffe) == 0xfffe)
                        return false;
                p += len;
        }
        return true;
}

/* What systemd sets for each unit itself: the engine's own values describe the engine's unit
 * (a notify socket, its invocation), never the command's. */
static bool env_unit_own(const char *s, size_t n) {
        static const char *const own[] = { "INVOCATION_ID", "JOURNAL_STREAM", "NOTIFY_SOCKET", "LISTEN_PID",
                                           "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID", "WATCHDOG_USEC",
                                           "SYSTEMD_EXEC_PID", "MAINPID", "MANAGERPID", "MONOTONIC_USEC" };
        for (size_t i = 0; i < ELEMENTSOF(own); i++)
                if (strlen(own[i]) == n && memcmp(own[i], s, n) == 0)
                        return true;
        return false;
}

/* ---- arguments ---- */

typedef struct RunArgs {
        int argv;          /* stack index of a table of the argv strings */
        int argc;
        const char *cwd;   /* NULL: the engine's */
        int assign, unset; /* stack indices of tables: NAME=value strings, names to unset */
        const char *path_env; /* PATH for the program lookup, NULL: the default */
        double timeout, kill_grace;
        bool capture;
        size_t max_capture;
        int on_line, on_start; /* stack indices of the callbacks, 0 without */
        const char *prefix;
} RunArgs;

static const char *const run_options[] = {
        "cwd", "env", "timeout", "kill_grace", "on_line", "on_start", "capture", "max_capture", "name_prefix", NULL,
};

/* The environment the unit gets, in two new tables on the stack (see RunArgs): the engine's
 * environment (without what systemd would refuse, and without systemd's own per-unit variables)
 * merged with opts.env at env_idx (0: none; NAME = false unsets). Raises on a bad opts.env. */
static void run_env(lua_State *L, int env_idx, RunArgs *a) {
        int na = 0, nu = 0;

        lua_newtable(L);
        a->assign = lua_gettop(L);
        lua_newtable(L);
        a->unset = lua_gettop(L);
        a->path_env = getenv("PATH");
        for (char **e = environ; *e; e++) {
                const char *eq = strchr(*e, '=');
                size_t n;
                if (!eq)
                        continue;
                n = (size_t) (eq - *e);
                if (!env_name_valid(*e, n) || !utf8_valid(eq + 1, strlen(eq + 1)) || env_unit_own(*e, n))
                        continue; /* systemd would refuse the whole unit for it */
                if (env_idx) {
                        lua_pushlstring(L, *e, n);
                        bool overridden = lua_rawget(L, env_idx) != LUA_TNIL;
                        lua_pop(L, 1);
                        if (overridden)
                                continue;
                }
                lua_pushstring(L, *e);
                lua_rawseti(L, a->assign, ++na);
        }
        if (!env_idx)
                return;
        lua_pushnil(L);
        while (lua_next(L, env_idx)) { /* key value */
                size_t klen, len;
                const char *k, *s;
                if (lua_type(L, -2) != LUA_TSTRING)
                        luaL_error(L, "bad option 'env' (names must be strings)");
                k = lua_tolstring(L, -2, &klen);
                if (!env_name_valid(k, klen))
                        luaL_error(L, "bad option 'env' (invalid variable name '%s': systemd takes [A-Za-z_][A-Za-z0-9_]*)", k);
                if (lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1)) {
                        lua_pushvalue(L, -2);
                        lua_rawseti(L, a->unset, ++nu);
                        if (streq(k, "PATH"))
                                a->path_env = NULL;
                        lua_pop(L, 1);
                        continue;
                }
                if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
                        luaL_error(L, "bad option 'env' (value of %s must be a string, a number or false)", k);
                lua_pushvalue(L, -2);
                lua_pushliteral(L, "=");
                lua_pushvalue(L, -3);
                lua_concat(L, 3); /* key value "k=v" */
                s = lua_tolstring(L, -1, &len);
                if (strlen(s) != len || !utf8_valid(s, len))
                        luaL_error(L, "bad option 'env' (value of %s contains a NUL byte or is not UTF-8)", k);
                if (streq(k, "PATH"))
                        a->path_env = s + klen + 1; /* anchored in the table below */
                lua_rawseti(L, a->assign, ++na);
                lua_pop(L, 1); /* key */
        }
}

/* Check argv (2) and opts (3); leaves anchors for every string it keeps on the stack. */
static void run_parse(lua_State *L, RunArgs *a) {
        int env_idx = 0;

        memset(a, 0, sizeof *a);
        a->capture = true;
        a->max_capture = RR_OUTPUT_DEFAULT_MAX_CAPTURE;
        a->kill_grace = DEFAULT_KILL_GRACE;
        a->prefix = DEFAULT_PREFIX;

        luaL_checktype(L, 2, LUA_TTABLE);
        a->argc = (int) luaL_len(L, 2);
        luaL_argcheck(L, a->argc > 0, 2, "argv must not be empty");
        luaL_argcheck(L, a->argc <= 100000, 2, "argv too long");
        if (lua_isnoneornil(L, 3)) {
                lua_settop(L, 2);
                lua_newtable(L);
        } else
                luaL_checktype(L, 3, LUA_TTABLE);
        lua_settop(L, 3);

        lua_createtable(L, a->argc, 0);
        a->argv = lua_gettop(L);
        for (int i = 1; i <= a->argc; i++) {
                size_t len;
                const char *s;
                int t = lua_geti(L, 2, i);
                if (t != LUA_TSTRING && t != LUA_TNUMBER)
                        luaL_error(L, "bad argument #2 (argv[%d] must be a string, got %s)", i, luaL_typename(L, -1));
                s = lua_tolstring(L, -1, &len); /* converts a number in place */
                if (strlen(s) != len)
                        luaL_error(L, "bad argument #2 (argv[%d] contains a NUL byte)", i);
                if (!utf8_valid(s, len))
                        luaL_error(L, "bad argument #2 (argv[%d] is not UTF-8: D-Bus carries only UTF-8)", i);
                lua_rawseti(L, a->argv, i);
        }

        lua_pushnil(L);
        while (lua_next(L, 3)) {
                bool known = false;
                lua_pop(L, 1);
                if (lua_type(L, -1) == LUA_TSTRING)
                        for (const char *const *o = run_options; *o; o++)
                                known = known || streq(*o, lua_tostring(L, -1));
                if (!known)
                        luaL_error(L, "bad argument #3 (unknown option '%s')", luaL_tolstring(L, -1, NULL));
        }

        if (lua_getfield(L, 3, "cwd") != LUA_TNIL) {
                if (lua_type(L, -1) != LUA_TSTRING)
                        luaL_error(L, "bad option 'cwd' (string expected, got %s)", luaL_typename(L, -1));
                a->cwd = lua_tostring(L, -1); /* stays on the stack */
        } else
                lua_pop(L, 1);

        if (lua_getfield(L, 3, "name_prefix") != LUA_TNIL) {
                size_t n;
                const char *s = lua_tolstring(L, -1, &n);
                if (lua_type(L, -1) != LUA_TSTRING || n == 0 || n > PREFIX_MAX ||
                    strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.-") != n)
                        luaL_error(L, "bad option 'name_prefix' (1 to %d of [A-Za-z0-9:_.-] expected)", PREFIX_MAX);
                a->prefix = s; /* stays on the stack */
        } else
                lua_pop(L, 1);

        rr_output_check_opts(L, 3, &a->capture, &a->max_capture, &a->timeout, &a->kill_grace);

        if (lua_getfield(L, 3, "on_line") != LUA_TNIL) {
                if (lua_type(L, -1) != LUA_TFUNCTION)
                        luaL_error(L, "bad option 'on_line' (function expected, got %s)", luaL_typename(L, -1));
                a->on_line = lua_gettop(L); /* stays */
        } else
                lua_pop(L, 1);

        if (lua_getfield(L, 3, "on_start") != LUA_TNIL) {
                if (lua_type(L, -1) != LUA_TFUNCTION)
                        luaL_error(L, "bad option 'on_start' (function expected, got %s)", luaL_typename(L, -1));
                a->on_start = lua_gettop(L); /* stays */
        } else
                lua_pop(L, 1);

        if (lua_getfield(L, 3, "env") != LUA_TNIL) {
                if (lua_type(L, -1) != LUA_TTABLE)
                        luaL_error(L, "bad option 'env' (table expected, got %s)", luaL_typename(L, -1));
                env_idx = lua_gettop(L); /* stays */
        } else
                lua_pop(L, 1);
        run_env(L, env_idx, a);
}

/* The working directory, absolute and resolved, into buf: 0 or an errno. */
static int resolve_cwd(const char *cwd, char *buf) {
        struct stat st;

        if (!cwd)
                return getcwd(buf, PATH_MAX) ? 0 : errno;
        if (!realpath(cwd, buf))
                return errno;
        if (stat(buf, &st) < 0)
                return errno;
        return S_ISDIR(st.st_mode) ? 0 : ENOTDIR;
}

/* Can `path` be executed: 0, or the errno exec would give. */
static int exec_error(const char *path) {
        struct stat st;

        if (stat(path, &st) < 0)
                return errno;
        if (!S_ISREG(st.st_mode) || access(path, X_OK) < 0)
                return EACCES;
        return 0;
}

/* The absolute path of the program argv[0] names, into buf, looked up as execvp() does: in
 * cwd when it has a slash, else along path_env. systemd takes only an absolute path, and the
 * lookup here says ENOENT or EACCES before any unit is made. 0 or an errno. */
static int resolve_program(const char *prog, const char *cwd, const char *path_env, char *buf) {
        int worst = ENOENT;

        if (strchr(prog, '/')) {
                if ((size_t) snprintf(buf, PATH_MAX, "%s%s%s", prog[0] == '/' ? "" : cwd, prog[0] == '/' ? "" : "/",
                                      prog) >= PATH_MAX)
                        return ENAMETOOLONG;
                return exec_error(buf);
        }
        if (!path_env)
                path_env = "/usr/local/bin:/usr/bin:/bin";
        while (*path_env) {
                size_t n = strcspn(path_env, ":");
                const char *dir = n ? path_env : ".";
                int len = n ? (int) n : 1, r;
                if (dir[0] != '/')
                        r = snprintf(buf, PATH_MAX, "%s/%.*s/%s", cwd, len, dir, prog);
                else
                        r = snprintf(buf, PATH_MAX, "%.*s/%s", len, dir, prog);
                if (r > 0 && r < PATH_MAX) {
                        int e = exec_error(buf);
                        if (e == 0)
                                return 0;
                        if (e == EACCES)
                                worst = EACCES;
                }
                path_env += n + (path_env[n] == ':');
        }
        return worst;
}

/* A new unit name: prefix-<16 hex digits>.service. */
static int make_unit_name(const char *prefix, char *buf, size_t size) {
        static unsigned counter;
        uint64_t rnd;

        if (getrandom(&rnd, sizeof rnd, GRND_NONBLOCK) != (ssize_t) sizeof rnd)
                rnd = ((uint64_t) getpid() << 32) ^ (uint64_t) (rr_now() * 1e6) ^ ++counter;
        if ((size_t) snprintf(buf, size, "%s-%016llx.service", prefix, (unsigned long long) rnd) >= size)
                return -ENAMETOOLONG;
        return 0;
}

/* ---- the op ---- */

/* "SIGTERM" for 15, "SIG99" for a number without a name (a static buffer). */
static const char *signal_name(int sig) {
        static char buf[32];
        const char *abbrev = sigabbrev_np(sig);

        if (abbrev)
                snprintf(buf, sizeof buf, "SIG%s", abbrev);
        else
                snprintf(buf, sizeof buf, "SIG%d", sig);
        return buf;
}

/* Did the program never run? Its start job failed, and either no process was made or the one
 * made exited with one of systemd's own statuses for a step before the program (200-245: CHDIR,
 * EXEC, USER, ..., systemd.exec(5)). Not the start job's result alone: a program that exits at
 * once can end before its start job and fail it, having run. */
static bool run_never_started(const RunOp *r) {
        if (!r->start_result || streq(r->start_result, "done"))
                return false;
        if (r->exec_code == 0)
                return true;
        return r->exec_code == CLD_EXITED && r->exec_status >= 200 && r->exec_status <= 245;
}

/* The run is over and every callback returned: wake the caller. */
static void run_maybe_finish(RunOp *r) {
        if (r->ended && !r->base.finished && rr_output_idle(&r->out))
                sdop_finish(&r->base);
}

/* The output's progress(): a pipe ended or a callback returned. */
static void run_output_progress(RrOutput *o) {
        run_maybe_finish((RunOp *) ((char *) o - offsetof(RunOp, out)));
}

/* on_start's arguments: unit, main PID (nil when unknown). */
static int push_start_args(lua_State *L, void *ctx) {
        RunOp *r = ctx;
        uint32_t pid = r->main_pid ? r->main_pid : r->exec_main_pid;

        lua_pushstring(L, r->unit);
        if (pid > 0)
                lua_pushinteger(L, pid);
        else
                lua_pushnil(L);
        return 2;
}

/* Is the run over: the start job ended (and the stop job, when one was sent), and the unit is
 * inactive or failed? Then drain the pipes. */
static void run_check(RunOp *r) {
        if (r->ended || !r->start_result || (r->stop_sent && !r->stop_ended))
                return;
        if (!streq(r->state, "inactive") && !streq(r->state, "failed"))
                return;
        r->ended = true;
        r->duration = rr_now() - r->t0;
        (void) sdop_set_timeout(&r->base, -1);
        rr_output_drain(&r->out);
        run_maybe_finish(r);
}

/* StopUnit answered: the stop job to wait for, or the unit is gone already. */
static int run_stop_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        RunOp *r = userdata;
        const sd_bus_error *e;
        const char *job;

        (void) ret_error;
        sdop_take_call(&r->base, reply);
        e = bus_reply_error(reply);
        if (e) {
                if (!sd_bus_error_has_name(e, "org.freedesktop.systemd1.NoSuchUnit")) {
                        sdop_fail(&r->base, e->name, "cannot stop %s (%s) after its timeout: %s", r->name, r->unit,
                                  bus_error_text(e));
                        return 0;
                }
                r->stop_ended = true; /* collected already: it had ended */
        } else if (sd_bus_message_read(reply, "o", &job) < 0 || !(r->stop_job = strdup(job))) {
                sdop_fail(&r->base, ERR_PARSE, "cannot stop %s (%s): bad reply", r->name, r->unit);
                return 0;
        }
        run_check(r);
        return 0;
}

/* The timeout passed: stop the unit (every process of its cgroup) and wait for it to end. */
static void run_timeout(SdOp *o) {
        RunOp *r = (RunOp *) o;
        int q;

        if (r->ended || r->stop_sent)
                return;
        r->timed_out = true;
        r->stop_sent = true;
        q = sdop_call(o, CALL_STOP, run_stop_reply, 0, SD_OBJECT, SD_MANAGER, "StopUnit", "ss", r->unit, "replace");
        if (q < 0)
                sdop_fail(o, strerrorname_np(-q), "cannot stop %s (%s) after its timeout: %s", r->name, r->unit,
                          strerror(-q));
}

/* JobRemoved: the start job's (then the program runs, or could not start) or the stop job's. */
static void run_job_removed(SdOp *o, const char *job, const char *result) {
        RunOp *r = (RunOp *) o;

        if (r->start_job && !r->start_result && streq(job, r->start_job)) {
                r->start_result = strdup(result);
                if (!r->start_result) {
                        sdop_fail(o, NULL, "out of memory");
                        return;
                }
                /* The unit's properties came before its job's end: run_never_started() knows. */
                if (r->on_start) {
                        int q;

                        if (!run_never_started(r))
                                rr_output_call(&r->out, push_start_args, r);
                        /* Only now are the pipes read (see manager_l_run): the lines come after on_start. */
                        q = rr_output_watch(&r->out);
                        if (q < 0) {
                                sdop_fail(o, strerrorname_np(-q), "cannot read the output of %s: %s", r->name,
                                          strerror(-q));
                                return;
                        }
                }
        } else if (r->stop_job && !r->stop_ended && streq(job, r->stop_job))
                r->stop_ended = true;
        else
                return;
        run_check(r);
}

/* Reads one property value (a variant at msg's position) that the run follows, or skips it. */
static int run_read_prop(RunOp *r, sd_bus_message *msg, bool service, const char *key) {
        const char *s;
        int q;

        if (!service) {
                if (!streq(key, "ActiveState"))
                        return sd_bus_message_skip(msg, "v");
                q = sd_bus_message_read(msg, "v", "s", &s);
                if (q >= 0)
                        snprintf(r->state, sizeof r->state, "%s", s);
                return q;
        }
        if (streq(key, "MainPID"))
                return sd_bus_message_read(msg, "v", "u", &r->main_pid);
        if (streq(key, "ExecMainPID"))
                return sd_bus_message_read(msg, "v", "u", &r->exec_main_pid);
        if (streq(key, "ExecMainCode"))
                return sd_bus_message_read(msg, "v", "i", &r->exec_code);
        if (streq(key, "ExecMainStatus"))
                return sd_bus_message_read(msg, "v", "i", &r->exec_status);
        if (streq(key, "Result")) {
                char *copy;
                q = sd_bus_message_read(msg, "v", "s", &s);
                if (q < 0)
                        return q;
                copy = strdup(s);
                if (!copy)
                        return -ENOMEM;
                free(r->result);
                r->result = copy;
                return q;
        }
        return sd_bus_message_skip(msg, "v");
}

/* PropertiesChanged of some unit: ours carries the unit's state and the service's main process. */
static void run_props_changed(SdOp *o, sd_bus_message *msg) {
        RunOp *r = (RunOp *) o;
        const char *path = sd_bus_message_get_path(msg), *iface, *key;
        bool service;
        int q;

        if (!path || !streq(path, r->path) || sd_bus_message_rewind(msg, true) < 0)
                return;
        if (sd_bus_message_read_basic(msg, SD_BUS_TYPE_STRING, &iface) < 0)
                return;
        service = streq(iface, SD_SERVICE_IFACE);
        if (!service && !streq(iface, SD_UNIT))
                return;
        if (sd_bus_message_enter_container(msg, SD_BUS_TYPE_ARRAY, "{sv}") < 0)
                return;
        while ((q = bus_props_next(msg, &key)) > 0) {
                q = run_read_prop(r, msg, service, key);
                if (q < 0 || (q = sd_bus_message_exit_container(msg)) < 0)
                        break;
        }
        if (q < 0) {
                sdop_fail(o, ERR_PARSE, "%s (%s): cannot parse the unit's properties: %s", r->name, r->unit,
                          strerror(-q));
                return;
        }
        run_check(r);
}

/* StartTransientUnit answered: the start job's path, or the manager refused the unit. */
static int run_start_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        RunOp *r = userdata;
        const sd_bus_error *e;
        const char *job;

        (void) ret_error;
        sdop_take_call(&r->base, reply);
        e = bus_reply_error(reply);
        if (e) {
                int errnum = sd_bus_error_get_errno(e);
                r->created = false; /* nothing to stop */
                sdop_fail(&r->base, errnum > 0 ? strerrorname_np(errnum) : e->name, "cannot run %s: %s", r->name,
                          bus_error_text(e));
                return 0;
        }
        /* Its JobRemoved cannot have come yet: the manager replies before the job can run. */
        if (sd_bus_message_read(reply, "o", &job) < 0 || !(r->start_job = strdup(job)))
                sdop_fail(&r->base, ERR_PARSE, "cannot run %s (%s): bad reply", r->name, r->unit);
        return 0;
}

/* The start job did not end with "done": why, for the message. */
static void push_start_failure(lua_State *L, RunOp *r) {
        luaL_Buffer b;

        luaL_buffinit(L, &b);
        lua_pushfstring(L, "cannot run %s: its unit %s failed to start (job %s", r->name, r->unit, r->start_result);
        luaL_addvalue(&b);
        if (r->result) {
                lua_pushfstring(L, ", unit result %s", r->result);
                luaL_addvalue(&b);
        }
        if (r->exec_code == CLD_EXITED) {
                /* systemd's own (203 EXEC, 200 CHDIR, 217 USER, ...): systemd.exec(5), "Process
                 * Exit Codes". */
                lua_pushfstring(L, ", exit status %d", (int) r->exec_status);
                luaL_addvalue(&b);
        }
        luaL_addchar(&b, ')');
        luaL_pushresult(&b);
}

/* res | nil, message, CODE, res | nil, message, CODE (never started) */
static int run_push(lua_State *L, SdOp *o) {
        RunOp *r = (RunOp *) o;
        bool timed_out = r->timed_out || (r->result && streq(r->result, "timeout"));
        uint32_t pid = r->exec_main_pid ? r->exec_main_pid : r->main_pid;
        bool killed = r->exec_code == CLD_KILLED || r->exec_code == CLD_DUMPED;

        luaL_checkstack(L, 8, NULL);
        if (!timed_out && run_never_started(r)) {
                lua_pushnil(L);
                push_start_failure(L, r);
                lua_pushstring(L, streq(r->start_result, "canceled") ? "ECANCELED" : "ENOEXEC");
                return 3;
        }
        lua_createtable(L, 0, 12); /* res */
        if (r->exec_code == CLD_EXITED) {
                lua_pushinteger(L, r->exec_status);
                lua_setfield(L, -2, "exit_code");
        } else if (killed) {
                lua_pushstring(L, signal_name(r->exec_status));
                lua_setfield(L, -2, "signal");
        }
        lua_pushboolean(L, timed_out);
        lua_setfield(L, -2, "timed_out");
        rr_output_push(L, &r->out);
        lua_pushnumber(L, r->duration);
        lua_setfield(L, -2, "duration");
        lua_pushstring(L, r->unit);
        lua_setfield(L, -2, "unit");
        if (pid > 0) {
                lua_pushinteger(L, pid);
                lua_setfield(L, -2, "pid");
        }
        if (r->result) {
                lua_pushstring(L, r->result);
                lua_setfield(L, -2, "result");
        }
        if (r->exec_code == CLD_EXITED && r->exec_status == 0 && !timed_out)
                return 1;

        lua_pushnil(L); /* res nil */
        if (timed_out) {
                char secs[32];
                snprintf(secs, sizeof secs, "%g", r->timeout);
                lua_pushfstring(L, "%s timed out after %s s (killed)", r->name, secs);
                lua_pushliteral(L, "ETIMEDOUT");
        } else if (killed) {
                lua_pushfstring(L, "%s killed by %s", r->name, signal_name(r->exec_status));
                lua_pushliteral(L, "ESIGNAL");
        } else if (r->exec_code == CLD_EXITED) {
                lua_pushfstring(L, "%s exited with code %d", r->name, (int) r->exec_status);
                lua_pushliteral(L, "EEXIT");
        } else {
                lua_pushfstring(L, "%s: its unit %s ended without a result (%s)", r->name, r->unit,
                                r->result ? r->result : "unknown");
                lua_pushliteral(L, "EIO");
        }
        lua_rotate(L, -4, -1); /* nil message code res */
        return 4;
}

/* A StopUnit for a unit nobody waits for any more, sent now (release() cannot wait for the
 * answer). Its processes go whatever becomes of the engine afterwards. */
static void run_abandon(RunOp *r) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *msg = NULL;
        sd_bus *bus = r->base.m->bus;

        if (!bus || r->base.m->lost)
                return;
        if (sd_bus_message_new_method_call(bus, &msg, SD_SERVICE, SD_OBJECT, SD_MANAGER, "StopUnit") < 0 ||
            sd_bus_message_append(msg, "ss", r->unit, "replace") < 0 || sd_bus_message_set_expect_reply(msg, 0) < 0 ||
            sd_bus_send(bus, msg, NULL) < 0) {
                fprintf(stderr, "rrengine: cannot stop %s (%s): it runs on\n", r->unit, r->name);
                return;
        }
        /* Out now: an engine on its way out would not flush it later. */
        (void) sd_bus_flush(bus);
}

/* Frees a RunOp's own fields; a unit still running is stopped first (a canceled caller). */
static void run_done(SdOp *o) {
        RunOp *r = (RunOp *) o;

        if (r->created && !r->ended)
                run_abandon(r);
        rr_output_free(&r->out);
        free(r->name);
        free(r->unit);
        free(r->path);
        free(r->start_job);
        free(r->stop_job);
        free(r->start_result);
        free(r->result);
}

static const SdOpType run_type = {
        .push = run_push,
        .done = run_done,
        .job_removed = run_job_removed,
        .props_changed = run_props_changed,
        .timeout = run_timeout,
};

/* ---- the call ---- */

/* Appends one (sv) property whose value is an array of strings, from the table at idx. */
static int append_strv_prop(sd_bus_message *msg, lua_State *L, const char *name, int idx) {
        lua_Integer n = luaL_len(L, idx);
        int q;

        if ((q = sd_bus_message_open_container(msg, 'r', "sv")) < 0 ||
            (q = sd_bus_message_append_basic(msg, 's', name)) < 0 ||
            (q = sd_bus_message_open_container(msg, 'v', "as")) < 0 ||
            (q = sd_bus_message_open_container(msg, 'a', "s")) < 0)
                return q;
        for (lua_Integer i = 1; i <= n; i++) {
                lua_rawgeti(L, idx, i);
                q = sd_bus_message_append_basic(msg, 's', lua_tostring(L, -1));
                lua_pop(L, 1);
                if (q < 0)
                        return q;
        }
        if ((q = sd_bus_message_close_container(msg)) < 0 || (q = sd_bus_message_close_container(msg)) < 0)
                return q;
        return sd_bus_message_close_container(msg);
}

/* One argv string for ExecStart=, every "$" doubled (systemd expands $VAR and ${VAR} in argv;
 * "$$" is its escape for a literal "$"). */
static int append_exec_arg(sd_bus_message *msg, const char *s) {
        _cleanup_(freep) char *escaped = NULL;
        size_t n = 0;

        for (const char *p = s; *p; p++)
                n += *p == '$';
        if (n == 0)
                return sd_bus_message_append_basic(msg, 's', s);
        escaped = malloc(strlen(s) + n + 1);
        if (!escaped)
                return -ENOMEM;
        n = 0;
        for (const char *p = s; *p; p++) {
                escaped[n++] = *p;
                if (*p == '$')
                        escaped[n++] = '$';
        }
        escaped[n] = '\0';
        return sd_bus_message_append_basic(msg, 's', escaped);
}

/* "rrengine: argv..." cut at DESCRIPTION_MAX bytes, on a character boundary. */
static void make_description(lua_State *L, const RunArgs *a, char *buf, size_t size) {
        size_t len = (size_t) snprintf(buf, size, "rrengine:");

        for (int i = 1; i <= a->argc && len < size - 1; i++) {
                lua_rawgeti(L, a->argv, i);
                len += (size_t) snprintf(buf + len, size - len, " %s", lua_tostring(L, -1));
                lua_pop(L, 1);
        }
        if (len >= size - 1) {
                /* Cut: drop the last character if the cut went through it. */
                size_t end = size - 1, k = end;
                while (k > 0 && ((unsigned char) buf[k - 1] & 0xc0) == 0x80)
                        k--;
                if (k > 0) {
                        unsigned char lead = (unsigned char) buf[k - 1];
                        size_t n = lead < 0x80 ? 1 : (lead & 0xe0) == 0xc0 ? 2 : (lead & 0xf0) == 0xe0 ? 3 : 4;
                        if (k - 1 + n > end)
                                end = k - 1;
                }
                buf[end] = '\0';
        }
}

/* StartTransientUnit for the run into calls[CALL_START]. Its own function so that the message is
 * dropped before the caller waits (see systemd-internal.h). */
static int run_call(RunOp *r, lua_State *L, const RunArgs *a, const char *program, const char *cwd, int out_fd,
                    int err_fd) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *msg = NULL;
        sd_bus *bus = r->base.m->bus;
        char description[DESCRIPTION_MAX + 1];
        mode_t mask = umask(0);
        int q;

        umask(mask);
        if (!bus)
                return -ENOTCONN;
        make_description(L, a, description, sizeof description);
        if ((q = sd_bus_message_new_method_call(bus, &msg, SD_SERVICE, SD_OBJECT, SD_MANAGER, "StartTransientUnit")) < 0 ||
            (q = sd_bus_message_append(msg, "ss", r->unit, "fail")) < 0 ||
            (q = sd_bus_message_open_container(msg, 'a', "(sv)")) < 0)
                return q;
        q = sd_bus_message_append(msg, "(sv)(sv)(sv)(sv)(sv)(sv)(sv)(sv)(sv)(sv)",
                                  "Description", "s", description,
                                  "CollectMode", "s", "inactive-or-failed",
                                  "Type", "s", "exec",
                                  "KillMode", "s", "control-group",
                                  "SendSIGKILL", "b", 1,
                                  "TimeoutStopUSec", "t", (uint64_t) (a->kill_grace * 1e6),
                                  "WorkingDirectory", "s", cwd,
                                  "UMask", "u", (uint32_t) mask,
                                  "StandardOutputFileDescriptor", "h", out_fd,
                                  "StandardErrorFileDescriptor", "h", err_fd);
        if (q < 0)
                return q;
        if (a->timeout > 0 &&
            (q = sd_bus_message_append(msg, "(sv)", "RuntimeMaxUSec", "t", (uint64_t) (a->timeout * 1e6))) < 0)
                return q;
        if ((q = append_strv_prop(msg, L, "Environment", a->assign)) < 0)
                return q;
        if (luaL_len(L, a->unset) > 0 && (q = append_strv_prop(msg, L, "UnsetEnvironment", a->unset)) < 0)
                return q;
        /* ExecStart: a(sasb), one command: the program, its argv, "ignore failure" false. */
        if ((q = sd_bus_message_open_container(msg, 'r', "sv")) < 0 ||
            (q = sd_bus_message_append_basic(msg, 's', "ExecStart")) < 0 ||
            (q = sd_bus_message_open_container(msg, 'v', "a(sasb)")) < 0 ||
            (q = sd_bus_message_open_container(msg, 'a', "(sasb)")) < 0 ||
            (q = sd_bus_message_open_container(msg, 'r', "sasb")) < 0 ||
            (q = sd_bus_message_append_basic(msg, 's', program)) < 0 ||
            (q = sd_bus_message_open_container(msg, 'a', "s")) < 0)
                return q;
        for (int i = 1; i <= a->argc; i++) {
                lua_rawgeti(L, a->argv, i);
                q = append_exec_arg(msg, lua_tostring(L, -1));
                lua_pop(L, 1);
                if (q < 0)
                        return q;
        }
        if ((q = sd_bus_message_close_container(msg)) < 0 || (q = sd_bus_message_append(msg, "b", 0)) < 0)
                return q;
        for (int i = 0; i < 4; i++) /* sasb, a(sasb), v, sv */
                if ((q = sd_bus_message_close_container(msg)) < 0)
                        return q;
        if ((q = sd_bus_message_close_container(msg)) < 0 || /* a(sv) */
            (q = sd_bus_message_append(msg, "a(sa(sv))", 0)) < 0)
                return q;
        return sd_bus_call_async(bus, &r->base.calls[CALL_START], msg, run_start_reply, r, 0);
}

/* m:run(argv[, opts]) -> res | nil, message, CODE, res | nil, message, CODE */
int manager_l_run(lua_State *L) {
        rr_canceled(L, true); /* a cancelled task must not start a side effect it never sees */
        Manager *m = check_manager(L, 1);
        char cwd[PATH_MAX], program[PATH_MAX], unit[256], what[256];
        int out_child = -1, err_child = -1, box, q;
        const char *argv0;
        RunArgs a;
        RunOp *r;

        luaL_checkstack(L, 40, NULL);
        run_parse(L, &a);
        lua_rawgeti(L, a.argv, 1);
        argv0 = lua_tostring(L, -1); /* anchored in the argv table */
        lua_pop(L, 1);
        if (m->lost)
                return push_lost(L, m);
        /* The program, the directory and the output pipes are this machine's: no use on a host
         * reached over ssh (no descriptor crosses it either). */
        if (m->host)
                return rr_push_fail(L, EOPNOTSUPP, "cannot run %s on %s: m:run needs a manager on this machine "
                                    "(rr.remote.run runs a command on a host)", argv0, m->host);
        q = resolve_cwd(a.cwd, cwd);
        if (q != 0)
                return rr_push_fail(L, q, "cannot run %s in %s: %s", argv0, a.cwd ? a.cwd : ".", strerror(q));
        q = resolve_program(argv0, cwd, a.path_env, program);
        if (q != 0)
                return rr_push_fail(L, q, "cannot run %s: %s", argv0, strerror(q));
        if (sd_bus_can_send(m->bus, SD_BUS_TYPE_UNIX_FD) <= 0)
                return rr_push_fail(L, EOPNOTSUPP, "cannot run %s: the connection to the %s manager cannot pass file descriptors",
                                    argv0, manager_scope(m));
        q = make_unit_name(a.prefix, unit, sizeof unit);
        if (q < 0)
                return rr_push_fail(L, -q, "cannot run %s: unit name too long", argv0);

        rr_output_new_box(L, a.on_line, a.on_start); /* ... box: the output's callbacks, held here */
        box = lua_gettop(L);
        r = sdop_new_or_raise(L, sizeof *r, &run_type, m);
        rr_output_init(&r->out, NULL, a.capture, a.max_capture, run_output_progress);
        r->timeout = a.timeout;
        r->on_start = a.on_start != 0;
        r->name = strdup(argv0);
        r->unit = strdup(unit);
        if (!r->name || !r->unit || sd_bus_path_encode(SD_UNIT_PREFIX, unit, &r->path) < 0 ||
            rr_output_attach(L, box, &r->out) < 0)
                return sdop_raise_oom(L, &r->base);
        r->out.name = r->name;

        snprintf(what, sizeof what, "cannot run %s", argv0);
        q = rr_output_pipes(&r->out, &out_child, &err_child);
        if (q < 0)
                return sdop_abandon(L, &r->base, q, what);
        r->t0 = rr_now();
        q = run_call(r, L, &a, program, cwd, out_child, err_child);
        /* The message carried copies of the write ends: the unit gets those. */
        close(out_child);
        close(err_child);
        if (q < 0)
                return sdop_abandon(L, &r->base, q, what);
        r->created = true;
        /* With on_start, the pipes are read once the start job has ended, so that on_start comes
         * before any line: a program writes as soon as it runs, before the manager's JobRemoved
         * reaches us. Until then its output waits in the pipes. */
        q = r->on_start ? 0 : rr_output_watch(&r->out);
        if (q >= 0)
                q = sdop_set_timeout(&r->base, a.timeout > 0 ? a.timeout : -1);
        if (q < 0)
                return sdop_abandon(L, &r->base, q, what); /* release() stops its unit */
        return rr_op_await(L, &r->base.op);
}
