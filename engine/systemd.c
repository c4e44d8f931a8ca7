/* rr.systemd: systemd's service managers (user or system, here or on another host over ssh) over
 * D-Bus, on the engine's one loop. This file is the module (systemd.user(), systemd.system(),
 * systemd.remote()) and the manager class (rr.systemd.manager); systemd-internal.h says how the
 * module's files share the work. */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>

#include "output.h"
#include "systemd-internal.h"

/* daemon-reload may take long on a big system; systemctl waits as long (DAEMON_RELOAD_TIMEOUT_SEC). */
#define DAEMON_RELOAD_TIMEOUT_USEC (6ULL * 60ULL * 1000000ULL)
/* How long a remote manager may take to answer its first call (ssh's connection, login, the
 * bridge, the handshake) when the caller does not say. */
#define REMOTE_CONNECT_TIMEOUT 30.0

/* ---- Lua: argument helpers ---- */

/* The manager userdata at idx (its pointer is NULL once closed). */
static Manager **manager_ud(lua_State *L, int idx) {
        return luaL_checkudata(L, idx, MANAGER_MT);
}

/* The open manager connection at idx; raises when it was closed. */
Manager *check_manager(lua_State *L, int idx) {
        Manager *m = *manager_ud(L, idx);

        if (!m || !m->bus) {
                luaL_error(L, "attempt to use a closed " MANAGER_MT);
                return NULL;
        }
        return m;
}

/* An optional timeout in seconds at idx: -1 when absent. */
double opt_timeout(lua_State *L, int idx) {
        double t;

        if (lua_isnoneornil(L, idx))
                return -1;
        t = luaL_checknumber(L, idx);
        luaL_argcheck(L, t >= 0 && t < 1e9, idx, "timeout must be a number of seconds >= 0");
        return t;
}

/* A string or a non-empty list of strings at idx: the count n; with `allowed`, each must be one
 * of them. The n strings are left on top of the stack, in order, for the caller to read once it
 * holds resources (lua_tostring() of a string neither raises nor allocates); a list's items are
 * read only here, so an __index or __len metamethod that raises (or answers differently twice)
 * cannot leave an op behind. */
size_t check_string_list(lua_State *L, int idx, const char *const *allowed, size_t n_allowed) {
        lua_Integer len = 1;
        size_t n;

        if (lua_type(L, idx) != LUA_TSTRING) {
                luaL_checktype(L, idx, LUA_TTABLE);
                len = luaL_len(L, idx);
                luaL_argcheck(L, len > 0, idx, "empty list");
                luaL_argcheck(L, len <= 100000, idx, "list too long");
        }
        n = (size_t) len;
        luaL_checkstack(L, (int) n + 4, "list too long"); /* the items, and an error message */
        for (size_t i = 1; i <= n; i++) {
                const char *s;
                if (lua_type(L, idx) == LUA_TSTRING)
                        lua_pushvalue(L, idx);
                else
                        lua_geti(L, idx, (lua_Integer) i);
                if (lua_type(L, -1) != LUA_TSTRING)
                        luaL_argerror(L, idx, lua_pushfstring(L, "item %d is not a string", (int) i));
                s = lua_tostring(L, -1);
                if (allowed) {
                        bool ok = false;
                        for (size_t k = 0; k < n_allowed; k++)
                                ok = ok || streq(s, allowed[k]);
                        if (!ok)
                                luaL_argerror(L, idx, lua_pushfstring(L, "unknown state '%s'", s));
                }
        }
        return n;
}

/* Copy the n strings at stack indices first.. (check_string_list() left them) into *ret;
 * -ENOMEM on failure. Never raises. */
int copy_string_list(lua_State *L, int first, size_t n, char ***ret) {
        char **v = calloc(n, sizeof(char *));

        if (!v)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
                v[i] = strdup(lua_tostring(L, first + (int) i));
                if (!v[i]) {
                        strv_free(v, n);
                        return -ENOMEM;
                }
        }
        *ret = v;
        return 0;
}

/* ---- ops: connect (Subscribe) ---- */

/* The connection is up: hand Lua its manager userdata (created closed-safe). */
static int connect_push(lua_State *L, SdOp *o) {
        Manager **ud = lua_newuserdatauv(L, sizeof(Manager *), 0);

        *ud = NULL;
        luaL_setmetatable(L, MANAGER_MT);
        *ud = manager_ref(o->m);
        return 1;
}

typedef struct ConnectOp {
        SdOp base;
        double timeout; /* for the message */
} ConnectOp;

/* The connection dropped before the manager answered: it was never reached (ssh could not
 * connect or log in, the bridge found no bus); ssh's last words say why. */
static void connect_lost(SdOp *o) {
        Manager *m = o->m;

        sdop_fail(o, ERR_UNREACHABLE, "cannot connect to the %s: %s", manager_what(m),
                  m->why ? m->why : "the connection was closed before the manager answered");
}

/* No answer in time (a host that does not answer, a login that hangs). */
static void connect_timeout(SdOp *o) {
        sdop_fail(o, "ETIMEDOUT", "cannot connect to the %s: no answer within %g s", manager_what(o->m),
                  ((ConnectOp *) o)->timeout);
}

static const SdOpType connect_type = {
        .push = connect_push,
        .timeout = connect_timeout,
        .lost = connect_lost,
};

/* Subscribe() answered: the manager is reachable. */
static int connect_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        SdOp *o = userdata;
        const sd_bus_error *e;

        (void) ret_error;
        sdop_take_call(o, reply);
        e = bus_reply_error(reply);
        if (e)
                sdop_fail(o, e->name, "cannot connect to the %s: %s", manager_what(o->m), bus_error_text(e));
        else
                sdop_finish(o);
        return 0;
}

/* ---- Lua: the module ---- */

/* Subscribe() on a new connection m (the op takes m's reference) and wait for the answer, at most
 * timeout seconds (negative: as long as it takes). */
static int systemd_connect(lua_State *L, Manager *m, double timeout) {
        char what[512];
        ConnectOp *c;
        SdOp *o;
        int r;

        c = sdop_new(sizeof *c, &connect_type, m);
        manager_unref(m); /* the op holds it now */
        if (!c)
                return luaL_error(L, "out of memory");
        c->timeout = timeout;
        o = &c->base;
        snprintf(what, sizeof what, "cannot connect to the %s", manager_what(o->m));
        r = sdop_set_timeout(o, timeout);
        if (r < 0)
                return sdop_abandon(L, o, r, what);
        /* The manager sends signals only to subscribers (a direct connection is one already). */
        r = sdop_call(o, 0, connect_reply, 0, SD_OBJECT, SD_MANAGER, "Subscribe", NULL);
        if (r < 0)
                return sdop_abandon(L, o, r, what);
        return rr_op_await(L, &o->op);
}

/* A connection to this machine's user or system manager. */
static int systemd_local(lua_State *L, bool user) {
        Manager *m = NULL;
        char err[1024];
        int r;

        r = manager_open(user, &m, err, sizeof err);
        if (r < 0)
                return rr_push_fail(L, -r, "cannot connect to the %s manager: %s", user ? "user" : "system", err);
        return systemd_connect(L, m, -1);
}

/* systemd.user() -> manager | nil, err, code */
static int systemd_user(lua_State *L) {
        return systemd_local(L, true);
}

/* The system manager (as systemd.user, for the system instance) -> manager | nil, err, code */
static int systemd_system(lua_State *L) {
        return systemd_local(L, false);
}

/* An optional string field of the options table at idx, left on the stack (NULL when absent):
 * not empty, no NUL byte. */
static const char *opt_string_field(lua_State *L, int idx, const char *name) {
        const char *s;
        size_t len;

        if (lua_getfield(L, idx, name) == LUA_TNIL)
                return NULL;
        if (lua_type(L, -1) != LUA_TSTRING)
                luaL_error(L, "bad option '%s' (string expected, got %s)", name, luaL_typename(L, -1));
        s = lua_tolstring(L, -1, &len);
        if (len == 0 || strlen(s) != len)
                luaL_error(L, "bad option '%s' (an empty string or one with a NUL byte)", name);
        return s;
}

/* systemd.remote(host[, {user =, ssh_config =, bus_path =, timeout =}]) -> manager | nil, err, code */
static int systemd_remote(lua_State *L) {
        static const char *const known[] = { "user", "ssh_config", "bus_path", "timeout" };
        RemoteSpec spec = { 0 };
        double timeout = REMOTE_CONNECT_TIMEOUT;
        Manager *m = NULL;
        char err[1024];
        size_t len;
        int r;

        spec.host = luaL_checklstring(L, 1, &len);
        /* ssh takes one word as its destination; anything else is a caller's mistake. */
        luaL_argcheck(L, len > 0 && len < 1024 && strlen(spec.host) == len, 1, "bad host name");
        for (const char *c = spec.host; *c; c++)
                luaL_argcheck(L, (unsigned char) *c > ' ' && *c != 0x7f, 1, "bad host name (space or control character)");
        luaL_argcheck(L, spec.host[0] != '-', 1, "bad host name (starts with '-')");
        if (!lua_isnoneornil(L, 2)) {
                luaL_checktype(L, 2, LUA_TTABLE);
                lua_pushnil(L);
                while (lua_next(L, 2)) {
                        bool ok = false;
                        lua_pop(L, 1);
                        for (size_t i = 0; i < ELEMENTSOF(known); i++)
                                ok = ok || (lua_type(L, -1) == LUA_TSTRING && streq(lua_tostring(L, -1), known[i]));
                        if (!ok)
                                return luaL_error(L, "unknown option '%s'", lua_type(L, -1) == LUA_TSTRING ?
                                                  lua_tostring(L, -1) : luaL_typename(L, -1));
                }
                if (lua_getfield(L, 2, "user") != LUA_TNIL) {
                        luaL_argcheck(L, lua_isboolean(L, -1), 2, "option 'user' must be a boolean");
                        spec.user = lua_toboolean(L, -1);
                }
                /* The strings stay on the stack until the connection copied them. */
                spec.ssh_config = opt_string_field(L, 2, "ssh_config");
                spec.bus_path = opt_string_field(L, 2, "bus_path");
                if (lua_getfield(L, 2, "timeout") != LUA_TNIL) {
                        timeout = luaL_checknumber(L, -1);
                        luaL_argcheck(L, timeout > 0 && timeout < 1e9, 2, "option 'timeout' must be seconds > 0");
                }
        }
        if (!spec.ssh_config) {
                const char *e = getenv("RR_SSH_CONFIG");
                spec.ssh_config = e && *e ? e : NULL;
        }
        rr_canceled(L, true); /* a cancelled task must not start ssh it never sees */
        r = manager_open_remote(&spec, &m, err, sizeof err);
        if (r < 0)
                return rr_push_fail(L, -r, "cannot connect to the %s manager on %s: %s", spec.user ? "user" : "system",
                                    spec.host, err);
        return systemd_connect(L, m, timeout);
}

/* ---- ops: list units (ListUnitsByPatterns) ---- */

typedef struct ListOp {
        SdOp base;
        sd_bus_message *reply;
} ListOp;

/* The list of units, one table each. */
static int list_push(lua_State *L, SdOp *o) {
        static const char *const fields[] = { "name", "description", "load_state", "active_state", "sub_state",
                                              "following", "path" };
        ListOp *l = (ListOp *) o;
        const char *s[ELEMENTSOF(fields)], *jtype, *jpath;
        uint32_t job_id;
        lua_Integer i = 0;
        int top = lua_gettop(L), r;

        lua_newtable(L);
        r = sd_bus_message_enter_container(l->reply, SD_BUS_TYPE_ARRAY, "(ssssssouso)");
        while (r >= 0 && (r = sd_bus_message_read(l->reply, "(ssssssouso)", &s[0], &s[1], &s[2], &s[3], &s[4], &s[5],
                                                  &s[6], &job_id, &jtype, &jpath)) > 0) {
                lua_createtable(L, 0, ELEMENTSOF(fields) + 3);
                for (size_t f = 0; f < ELEMENTSOF(fields); f++) {
                        lua_pushstring(L, s[f]);
                        lua_setfield(L, -2, fields[f]);
                }
                if (job_id != 0) {
                        lua_pushinteger(L, job_id);
                        lua_setfield(L, -2, "job_id");
                        lua_pushstring(L, jtype);
                        lua_setfield(L, -2, "job_type");
                        lua_pushstring(L, jpath);
                        lua_setfield(L, -2, "job_path");
                }
                lua_rawseti(L, -2, ++i);
        }
        if (r < 0) {
                lua_settop(L, top);
                return rr_push_fail(L, 0, "cannot parse the unit list: %s", strerror(-r));
        }
        return 1;
}

/* Frees a ListOp's reply. */
static void list_done(SdOp *o) {
        sd_bus_message_unref(((ListOp *) o)->reply);
}

static const SdOpType list_type = {
        .push = list_push,
        .done = list_done,
};

/* ListUnitsByPatterns() answered. */
static int list_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        ListOp *l = userdata;
        const sd_bus_error *e;

        (void) ret_error;
        sdop_take_call(&l->base, reply);
        e = bus_reply_error(reply);
        if (e) {
                sdop_fail(&l->base, e->name, "cannot list units: %s", bus_error_text(e));
                return 0;
        }
        l->reply = sd_bus_message_ref(reply);
        sdop_finish(&l->base);
        return 0;
}

/* ListUnitsByPatterns(any state, the n patterns at stack indices first..) into l's calls[0]. Its
 * own function so that the message is dropped before the caller waits (see the top). */
static int list_call(ListOp *l, lua_State *L, int first, size_t n) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *msg = NULL;
        sd_bus *bus = l->base.m->bus;
        int r;

        if (!bus)
                return -ENOTCONN;
        r = sd_bus_message_new_method_call(bus, &msg, SD_SERVICE, SD_OBJECT, SD_MANAGER, "ListUnitsByPatterns");
        if (r < 0)
                return r;
        r = sd_bus_message_append_strv(msg, NULL); /* any state */
        if (r < 0)
                return r;
        r = sd_bus_message_open_container(msg, SD_BUS_TYPE_ARRAY, "s");
        if (r < 0)
                return r;
        for (size_t i = 0; i < n; i++) {
                r = sd_bus_message_append_basic(msg, SD_BUS_TYPE_STRING, lua_tostring(L, first + (int) i));
                if (r < 0)
                        return r;
        }
        r = sd_bus_message_close_container(msg);
        if (r < 0)
                return r;
        return sd_bus_call_async(bus, &l->base.calls[0], msg, list_reply, l, 0);
}

/* ---- Lua: rr.systemd.manager ---- */

/* m:daemon_reload() -> true | nil, err, code */
static int manager_l_daemon_reload(lua_State *L) {
        rr_canceled(L, true); /* a cancelled task must not start a side effect it never sees */
        Manager *m = check_manager(L, 1);
        char what[512];

        snprintf(what, sizeof what, "daemon-reload of the %s", manager_what(m));
        return start_call(L, m, what, DAEMON_RELOAD_TIMEOUT_USEC, SD_OBJECT, SD_MANAGER, "Reload", NULL);
}

/* m:list_units([patterns]) -> { {name=, description=, load_state=, active_state=, sub_state=, ...}, ... } */
static int manager_l_list_units(lua_State *L) {
        Manager *m = check_manager(L, 1);
        size_t n = 0;
        ListOp *l;
        int r;

        lua_settop(L, 2); /* m patterns: check_string_list() pushes above the arguments */
        if (!lua_isnil(L, 2))
                n = check_string_list(L, 2, NULL, 0); /* m patterns... */
        if (m->lost)
                return push_lost(L, m);
        l = sdop_new_or_raise(L, sizeof *l, &list_type, m);
        r = list_call(l, L, lua_gettop(L) - (int) n + 1, n);
        if (r < 0)
                return sdop_abandon(L, &l->base, r, "cannot list units");
        return rr_op_await(L, &l->base.op);
}

/* m:scope() -> "user" | "system" */
static int manager_l_scope(lua_State *L) {
        Manager *m = *manager_ud(L, 1);
        if (!m)
                return luaL_error(L, "attempt to use a closed " MANAGER_MT);
        lua_pushstring(L, manager_scope(m));
        return 1;
}

/* m:host() -> the ssh destination of a remote manager | nil for this machine's */
static int manager_l_host(lua_State *L) {
        Manager *m = *manager_ud(L, 1);
        if (!m)
                return luaL_error(L, "attempt to use a closed " MANAGER_MT);
        if (m->host)
                lua_pushstring(L, m->host);
        else
                lua_pushnil(L);
        return 1;
}

/* m:close(), __close, __gc: pending requests fail with "closed"; idempotent. */
static int manager_l_close(lua_State *L) {
        Manager **ud = manager_ud(L, 1);
        Manager *m = *ud;

        *ud = NULL;
        if (m) {
                manager_close(m);
                manager_unref(m);
        }
        return 0;
}

/* tostring(m): "rr.systemd.manager (user)", "rr.systemd.manager (user on web1)". */
static int manager_l_tostring(lua_State *L) {
        Manager *m = *manager_ud(L, 1);

        if (!m || !m->bus)
                lua_pushliteral(L, MANAGER_MT " (closed)");
        else
                lua_pushfstring(L, MANAGER_MT " (%s%s%s%s)", manager_scope(m), m->host ? " on " : "", m->host ? m->host : "",
                                manager_is_lost(m) ? ", connection lost" : "");
        return 1;
}

static const luaL_Reg manager_methods[] = {
        { "unit", unit_l_load },
        { "daemon_reload", manager_l_daemon_reload },
        { "list_units", manager_l_list_units },
        { "run", manager_l_run },
        { "scope", manager_l_scope },
        { "host", manager_l_host },
        { "close", manager_l_close },
        { NULL, NULL },
};

static const luaL_Reg manager_meta[] = {
        { "__gc", manager_l_close },
        { "__close", manager_l_close },
        { "__tostring", manager_l_tostring },
        { NULL, NULL },
};

static const luaL_Reg systemd_functions[] = {
        { "user", systemd_user },
        { "system", systemd_system },
        { "remote", systemd_remote },
        { NULL, NULL },
};

/* Creates the metatable `name` with meta-methods `meta` and methods `methods` (then, when not
 * NULL, those add_methods puts in the table on top) as __index. */
void new_class(lua_State *L, const char *name, const luaL_Reg *meta, const luaL_Reg *methods,
               void (*add_methods)(lua_State *L)) {
        if (luaL_newmetatable(L, name)) {
                luaL_setfuncs(L, meta, 0);
                lua_newtable(L); /* meta methods */
                luaL_setfuncs(L, methods, 0);
                if (add_methods)
                        add_methods(L);
                lua_setfield(L, -2, "__index"); /* meta */
        }
        lua_pop(L, 1);
}

/* require("rr.systemd"): the user and system openers; the two classes. */
int luaopen_rr_systemd(lua_State *L) {
        rr_output_open(L); /* m:run() reads its command's output as rr.proc does */
        new_class(L, MANAGER_MT, manager_meta, manager_methods, NULL);
        unit_class_new(L);
        luaL_newlib(L, systemd_functions);
        return 1;
}
