/* rr.systemd: the unit class (rr.systemd.unit). A handle names one unit loaded by the manager
 * (LoadUnit) and keeps its manager open; it reads the unit's properties (GetAll, Get), waits for
 * its state or for a property change through PropertiesChanged signals, resets its failed state
 * and signals its processes. Its jobs (u:start() & co) are in systemd-job.c. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>

#include "systemd-internal.h"

/* ---- unit types ---- */

static const UnitType unit_types[] = {
        { ".service", "org.freedesktop.systemd1.Service", true },
        { ".socket", "org.freedesktop.systemd1.Socket", true },
        { ".target", "org.freedesktop.systemd1.Target", false },
        { ".device", "org.freedesktop.systemd1.Device", false },
        { ".mount", "org.freedesktop.systemd1.Mount", true },
        { ".automount", "org.freedesktop.systemd1.Automount", true },
        { ".swap", "org.freedesktop.systemd1.Swap", true },
        { ".timer", "org.freedesktop.systemd1.Timer", true },
        { ".path", "org.freedesktop.systemd1.Path", true },
        { ".slice", "org.freedesktop.systemd1.Slice", false },
        { ".scope", "org.freedesktop.systemd1.Scope", true },
};

/* The unit type a name's suffix names, or NULL. */
static const UnitType *unit_type_of(const char *name) {
        const char *dot = strrchr(name, '.');
        if (!dot)
                return NULL;
        for (size_t i = 0; i < ELEMENTSOF(unit_types); i++)
                if (streq(dot, unit_types[i].suffix))
                        return &unit_types[i];
        return NULL;
}

/* A unit name systemd could accept: [A-Za-z0-9:_.\@-], at most 255 bytes, a known type suffix. */
static bool unit_name_valid(const char *s) {
        size_t n = strlen(s);
        if (n == 0 || n > 255 || s[0] == '.')
                return false;
        for (const char *p = s; *p; p++)
                if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                      strchr(":_.\\@-", *p)))
                        return false;
        return unit_type_of(s) != NULL;
}

/* ---- ops: load a unit (LoadUnit) ---- */

typedef struct LoadOp {
        SdOp base;
        char *name, *id, *path;
} LoadOp;

/* A unit handle, taking the op's strings. */
static int load_push(lua_State *L, SdOp *o) {
        LoadOp *l = (LoadOp *) o;
        Unit *u = lua_newuserdatauv(L, sizeof(Unit), 1);

        memset(u, 0, sizeof *u);
        luaL_setmetatable(L, UNIT_MT);
        /* The manager userdata is the caller's first argument (m:unit(name)): the unit keeps it. */
        lua_pushvalue(L, 1);
        lua_setiuservalue(L, -2, 1);
        u->m = manager_ref(o->m);
        u->name = l->name;
        u->id = l->id;
        u->path = l->path;
        l->name = l->id = l->path = NULL;
        u->type = unit_type_of(u->id) ? unit_type_of(u->id) : unit_type_of(u->name);
        return 1;
}

/* Frees what load_push() did not take. */
static void load_done(SdOp *o) {
        LoadOp *l = (LoadOp *) o;
        free(l->name);
        free(l->id);
        free(l->path);
}

static const SdOpType load_type = {
        .push = load_push,
        .done = load_done,
};

/* LoadUnit() answered with the unit's object path. */
static int load_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        LoadOp *l = userdata;
        const sd_bus_error *e;
        const char *path;
        int r;

        (void) ret_error;
        sdop_take_call(&l->base, reply);
        e = bus_reply_error(reply);
        if (e) {
                sdop_fail(&l->base, e->name, "cannot load %s: %s", l->name, bus_error_text(e));
                return 0;
        }
        r = sd_bus_message_read(reply, "o", &path);
        if (r < 0) {
                sdop_fail(&l->base, ERR_PARSE, "cannot load %s: bad reply: %s", l->name, strerror(-r));
                return 0;
        }
        l->path = strdup(path);
        r = sd_bus_path_decode(path, SD_UNIT_PREFIX, &l->id);
        if (r == 0)
                l->id = strdup(l->name);
        if (!l->path || r < 0 || !l->id) {
                sdop_fail(&l->base, NULL, "out of memory");
                return 0;
        }
        sdop_finish(&l->base);
        return 0;
}

/* m:unit(name) -> unit | nil, err, code */
int unit_l_load(lua_State *L) {
        Manager *m = check_manager(L, 1);
        const char *name = luaL_checkstring(L, 2);
        LoadOp *l;
        int r;

        if (!unit_name_valid(name))
                return luaL_argerror(L, 2, lua_pushfstring(L, "invalid unit name '%s'", name));
        if (m->lost)
                return push_lost(L, m);
        l = sdop_new_or_raise(L, sizeof *l, &load_type, m);
        l->name = strdup(name);
        if (!l->name)
                return sdop_raise_oom(L, &l->base);
        r = sdop_call(&l->base, 0, load_reply, 0, SD_OBJECT, SD_MANAGER, "LoadUnit", "s", name);
        if (r < 0)
                return sdop_abandon(L, &l->base, r, "cannot load the unit");
        return rr_op_await(L, &l->base.op);
}

/* ---- ops: properties (GetAll per interface) and one property (Get) ---- */

typedef struct PropsOp {
        SdOp base;
        char *name, *path, *prop;     /* prop: get()'s one property */
        char **want;                  /* properties(names): only those; NULL: all */
        size_t n_want;
        const char *iface;            /* the unit type's interface, NULL if unknown */
        bool tried_type_iface;        /* get(): not on the Unit interface, asked the type's */
        sd_bus_message *replies[2];
        unsigned pending;
} PropsOp;

/* The properties table, or get()'s one value. */
static int props_push(lua_State *L, SdOp *o) {
        PropsOp *p = (PropsOp *) o;
        int top = lua_gettop(L), r;

        if (!p->prop)
                return bus_push_props(L, p->replies, ELEMENTSOF(p->replies), p->name, p->want, p->n_want);
        r = sd_bus_message_rewind(p->replies[0], true);
        if (r >= 0)
                r = bus_push_property(L, p->replies[0], p->prop);
        if (r < 0)
                return bus_push_props_error(L, top, p->name, r);
        lua_settop(L, top + 1);
        return 1;
}

/* Frees a PropsOp's own fields. */
static void props_done(SdOp *o) {
        PropsOp *p = (PropsOp *) o;
        for (size_t i = 0; i < ELEMENTSOF(p->replies); i++)
                sd_bus_message_unref(p->replies[i]);
        free(p->name);
        free(p->path);
        free(p->prop);
        strv_free(p->want, p->n_want);
}

static const SdOpType props_type = {
        .push = props_push,
        .done = props_done,
};

/* One GetAll() answered; done when both are in. */
static int props_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        PropsOp *p = userdata;
        const sd_bus_error *e;
        int idx;

        (void) ret_error;
        idx = sdop_take_call(&p->base, reply);
        e = bus_reply_error(reply);
        if (e) {
                sdop_fail(&p->base, e->name, "cannot read the properties of %s: %s", p->name, bus_error_text(e));
                return 0;
        }
        if (idx < 0)
                return 0;
        p->replies[idx] = sd_bus_message_ref(reply);
        if (--p->pending == 0)
                sdop_finish(&p->base);
        return 0;
}

/* Get() answered; a property unknown to the Unit interface is asked of the type's. */
static int get_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        PropsOp *p = userdata;
        const sd_bus_error *e;
        int r;

        (void) ret_error;
        sdop_take_call(&p->base, reply);
        e = bus_reply_error(reply);
        if (e && p->iface && !p->tried_type_iface &&
            (sd_bus_error_has_name(e, SD_BUS_ERROR_UNKNOWN_PROPERTY) ||
             sd_bus_error_has_name(e, SD_BUS_ERROR_UNKNOWN_INTERFACE))) {
                /* Not a Unit property: the unit type's interface may have it. */
                p->tried_type_iface = true;
                r = sdop_call(&p->base, 0, get_reply, 0, p->path, DBUS_PROPERTIES, "Get", "ss", p->iface, p->prop);
                if (r < 0)
                        sdop_fail(&p->base, strerrorname_np(-r), "cannot read %s of %s: %s", p->prop, p->name,
                                  strerror(-r));
                return 0;
        }
        if (e) {
                sdop_fail(&p->base, e->name, "cannot read %s of %s: %s", p->prop, p->name, bus_error_text(e));
                return 0;
        }
        p->replies[0] = sd_bus_message_ref(reply);
        sdop_finish(&p->base);
        return 0;
}

/* ---- ops: wait for a unit's state or for a property change, through PropertiesChanged ---- */

static const char *const active_states[] = {
        "active", "reloading", "inactive", "failed", "activating", "deactivating", "maintenance", "refreshing",
};

typedef struct WatchOp {
        SdOp base;
        bool change;              /* wait_change(); else wait_state() */
        char *name, *path;
        const UnitType *type;
        char **want;              /* wait_state: ActiveState values; wait_change: property names */
        size_t n_want;
        char **baseline;          /* wait_change: the values to compare with; NULL: the first read's */
        bool *changed;
        char *state;              /* wait_state: the last ActiveState seen */
        sd_bus_message *replies[2];
        unsigned pending;         /* reads in flight */
        bool again;               /* a signal came during a read: read once more after it */
        bool timed_out;
} WatchOp;

static int watch_read(WatchOp *w);

/* wait_state: true, state | nil, message, "ETIMEDOUT", state; wait_change: props, changed | nil,
 * message, "ETIMEDOUT": the one failure form, the state seen last as the extra value. */
static int watch_push(lua_State *L, SdOp *o) {
        WatchOp *w = (WatchOp *) o;
        lua_Integer k = 0;
        int n;

        if (!w->change) {
                if (w->timed_out) {
                        lua_pushnil(L);
                        if (w->state)
                                lua_pushfstring(L, "%s is still %s at the timeout", w->name, w->state);
                        else
                                lua_pushfstring(L, "%s: no state seen before the timeout", w->name);
                        lua_pushliteral(L, "ETIMEDOUT");
                        lua_pushstring(L, w->state); /* nil when none was seen */
                        return 4;
                }
                lua_pushboolean(L, 1);
                lua_pushstring(L, w->state);
                return 2;
        }
        if (w->timed_out) {
                lua_pushnil(L);
                lua_pushfstring(L, "%s: no change of the watched properties before the timeout", w->name);
                lua_pushliteral(L, "ETIMEDOUT");
                return 3;
        }
        n = bus_push_props(L, w->replies, ELEMENTSOF(w->replies), w->name, NULL, 0);
        if (n != 1)
                return n; /* nil, err, code */
        lua_newtable(L);
        for (size_t i = 0; i < w->n_want; i++)
                if (w->changed[i]) {
                        lua_pushstring(L, w->want[i]);
                        lua_rawseti(L, -2, ++k);
                }
        return 2;
}

/* Frees a WatchOp's own fields. */
static void watch_done(SdOp *o) {
        WatchOp *w = (WatchOp *) o;

        for (size_t i = 0; i < ELEMENTSOF(w->replies); i++)
                sd_bus_message_unref(w->replies[i]);
        strv_free(w->want, w->n_want);
        strv_free(w->baseline, w->n_want);
        free(w->changed);
        free(w->state);
        free(w->name);
        free(w->path);
}

/* The wait's deadline passed. */
static void watch_timeout(SdOp *o) {
        ((WatchOp *) o)->timed_out = true;
        sdop_finish(o);
}

/* wait_state: the unit's ActiveState is now `state`. */
static void watch_state_seen(WatchOp *w, const char *state) {
        char *s = strdup(state);

        if (!s) {
                sdop_fail(&w->base, NULL, "out of memory");
                return;
        }
        free(w->state);
        w->state = s;
        if (strv_contains(w->want, w->n_want, state))
                sdop_finish(&w->base);
}

/* wait_change: both reads are in; did a watched property change? */
static void watch_compare(WatchOp *w) {
        bool any = false;

        for (size_t i = 0; i < w->n_want; i++) {
                char *value = NULL;
                for (size_t k = 0; k < ELEMENTSOF(w->replies) && !value; k++) {
                        int r;
                        if (!w->replies[k])
                                continue;
                        r = bus_find_canon(w->replies[k], w->want[i], &value);
                        if (r < 0) {
                                sdop_fail(&w->base, ERR_PARSE, "cannot parse the properties of %s: %s", w->name,
                                          strerror(-r));
                                return;
                        }
                }
                if (!value) {
                        /* Neither interface has it (a typo, or a property of another unit type):
                         * it could never change. */
                        sdop_fail(&w->base, SD_BUS_ERROR_UNKNOWN_PROPERTY, "%s has no property %s", w->name,
                                  w->want[i]);
                        return;
                }
                if (!w->baseline[i])
                        w->baseline[i] = value;
                else {
                        if (!streq(w->baseline[i], value))
                                w->changed[i] = any = true;
                        free(value);
                }
        }
        if (any)
                sdop_finish(&w->base);
}

/* After a read came in: read again if a signal asked for it meanwhile. */
static void watch_read_done(WatchOp *w) {
        int r;

        if (w->base.finished || w->pending > 0 || !w->again)
                return;
        w->again = false;
        r = watch_read(w);
        if (r < 0)
                sdop_fail(&w->base, strerrorname_np(-r), "cannot read the state of %s: %s", w->name, strerror(-r));
}

/* A read for a wait answered (ActiveState, or one GetAll of wait_change's two). */
static int watch_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        WatchOp *w = userdata;
        const sd_bus_error *e;
        const char *state;
        int idx, r;

        (void) ret_error;
        idx = sdop_take_call(&w->base, reply);
        if (idx < 0)
                return 0;
        w->pending--;
        e = bus_reply_error(reply);
        if (e) {
                sdop_fail(&w->base, e->name, "cannot read the state of %s: %s", w->name, bus_error_text(e));
                return 0;
        }
        if (!w->change) {
                r = sd_bus_message_read(reply, "v", "s", &state);
                if (r < 0) {
                        sdop_fail(&w->base, ERR_PARSE, "cannot read the state of %s: %s", w->name, strerror(-r));
                        return 0;
                }
                watch_state_seen(w, state);
        } else {
                sd_bus_message_unref(w->replies[idx]);
                w->replies[idx] = sd_bus_message_ref(reply);
                if (w->pending == 0)
                        watch_compare(w);
        }
        watch_read_done(w);
        return 0;
}

/* Read what the wait needs: ActiveState, or every property (both interfaces) for wait_change. */
static int watch_read(WatchOp *w) {
        int r;

        if (!w->change) {
                r = sdop_call(&w->base, 0, watch_reply, 0, w->path, DBUS_PROPERTIES, "Get", "ss", SD_UNIT,
                              "ActiveState");
                if (r < 0)
                        return r;
                w->pending = 1;
                return 0;
        }
        return sdop_get_all(&w->base, watch_reply, w->path, w->type ? w->type->iface : NULL, &w->pending);
}

/* A PropertiesChanged signal of some unit: the new ActiveState when it is there, else a read when
 * a watched property changed or was invalidated. */
static void watch_props_changed(SdOp *o, sd_bus_message *msg) {
        WatchOp *w = (WatchOp *) o;
        const char *path = sd_bus_message_get_path(msg), *iface, *key;
        bool hit = false;
        int r;

        if (!path || !streq(path, w->path) || sd_bus_message_rewind(msg, true) < 0)
                return;
        if (sd_bus_message_read_basic(msg, SD_BUS_TYPE_STRING, &iface) < 0)
                return;
        if (!w->change && !streq(iface, SD_UNIT))
                return;
        if (sd_bus_message_enter_container(msg, SD_BUS_TYPE_ARRAY, "{sv}") < 0)
                return;
        while ((r = bus_props_next(msg, &key)) > 0) {
                if (!w->change && streq(key, "ActiveState")) {
                        const char *state;
                        /* Signals and replies arrive in the order the manager sent them: the last one
                         * read is the newest state. */
                        if (sd_bus_message_read(msg, "v", "s", &state) < 0)
                                return;
                        watch_state_seen(w, state);
                        if (w->base.finished)
                                return;
                } else {
                        if (w->change && strv_contains(w->want, w->n_want, key))
                                hit = true;
                        if (sd_bus_message_skip(msg, "v") < 0)
                                return;
                }
                if (sd_bus_message_exit_container(msg) < 0)
                        return;
        }
        if (r < 0 || sd_bus_message_exit_container(msg) < 0)
                return;
        if (sd_bus_message_enter_container(msg, SD_BUS_TYPE_ARRAY, "s") < 0)
                return;
        while ((r = sd_bus_message_read_basic(msg, SD_BUS_TYPE_STRING, &key)) > 0)
                if (w->change ? strv_contains(w->want, w->n_want, key) : streq(key, "ActiveState"))
                        hit = true;
        if (!hit)
                return;
        if (w->pending > 0) {
                w->again = true;
                return;
        }
        r = watch_read(w);
        if (r < 0)
                sdop_fail(o, strerrorname_np(-r), "cannot read the state of %s: %s", w->name, strerror(-r));
}

static const SdOpType watch_type = {
        .push = watch_push,
        .done = watch_done,
        .props_changed = watch_props_changed,
        .timeout = watch_timeout,
};

/* ---- Lua: rr.systemd.unit ---- */

/* The unit handle at idx; raises when its manager was closed. */
Unit *check_unit(lua_State *L, int idx) {
        Unit *u = luaL_checkudata(L, idx, UNIT_MT);

        if (!u->m || !u->m->bus) {
                luaL_error(L, "attempt to use %s of a closed " MANAGER_MT, u->name ? u->name : "a unit");
                return NULL;
        }
        return u;
}

/* u:name() -> the name it was opened with */
static int unit_l_name(lua_State *L) {
        Unit *u = luaL_checkudata(L, 1, UNIT_MT);
        lua_pushstring(L, u->name);
        return 1;
}

/* u:id() -> the manager's name for it (an alias resolved) */
static int unit_l_id(lua_State *L) {
        Unit *u = luaL_checkudata(L, 1, UNIT_MT);
        lua_pushstring(L, u->id);
        return 1;
}

/* u:path() -> its D-Bus object path */
static int unit_l_path(lua_State *L) {
        Unit *u = luaL_checkudata(L, 1, UNIT_MT);
        lua_pushstring(L, u->path);
        return 1;
}

/* A PropsOp for u (raises on OOM). */
static PropsOp *props_new(lua_State *L, Unit *u) {
        PropsOp *p = sdop_new_or_raise(L, sizeof *p, &props_type, u->m);

        p->name = strdup(u->name);
        p->path = strdup(u->path);
        p->iface = u->type ? u->type->iface : NULL;
        if (!p->name || !p->path) {
                sdop_raise_oom(L, &p->base);
                return NULL;
        }
        return p;
}

/* u:properties([names]) -> table of every property of the Unit interface and the unit type's, or
 * only of those named | nil, err, code. The manager sends them all either way (GetAll: one
 * round trip per interface); the names spare the Lua table of the ~400 others, which is most
 * of the engine's time and memory for a unit in flight. */
static int unit_l_properties(lua_State *L) {
        Unit *u = check_unit(L, 1);
        PropsOp *p;
        size_t n = 0;
        int r;

        if (!lua_isnoneornil(L, 2)) {
                lua_settop(L, 2); /* u names: check_string_list() pushes above the arguments */
                n = check_string_list(L, 2, NULL, 0); /* u names names... */
        }
        if (u->m->lost)
                return push_lost(L, u->m);
        p = props_new(L, u);
        if (n > 0) {
                p->n_want = n;
                if (copy_string_list(L, 3, n, &p->want) < 0) {
                        p->n_want = 0;
                        return sdop_raise_oom(L, &p->base);
                }
        }
        r = sdop_get_all(&p->base, props_reply, u->path, p->iface, &p->pending);
        if (r < 0)
                return sdop_abandon(L, &p->base, r, "cannot read the properties");
        return rr_op_await(L, &p->base.op);
}

/* u:get(property) -> value | nil, err, code */
static int unit_l_get(lua_State *L) {
        Unit *u = check_unit(L, 1);
        const char *prop = luaL_checkstring(L, 2);
        PropsOp *p;
        int r;

        if (u->m->lost)
                return push_lost(L, u->m);
        p = props_new(L, u);
        p->prop = strdup(prop);
        if (!p->prop)
                return sdop_raise_oom(L, &p->base);
        r = sdop_call(&p->base, 0, get_reply, 0, u->path, DBUS_PROPERTIES, "Get", "ss", SD_UNIT, prop);
        if (r < 0)
                return sdop_abandon(L, &p->base, r, "cannot read the property");
        return rr_op_await(L, &p->base.op);
}

/* A WatchOp for u with the n strings at stack indices first.. (raises on OOM). */
static WatchOp *watch_new(lua_State *L, Unit *u, bool change, int first, size_t n) {
        WatchOp *w = sdop_new_or_raise(L, sizeof *w, &watch_type, u->m);

        w->change = change;
        w->type = u->type;
        w->name = strdup(u->name);
        w->path = strdup(u->path);
        w->n_want = n;
        if (!w->name || !w->path || copy_string_list(L, first, n, &w->want) < 0) {
                w->n_want = 0;
                sdop_raise_oom(L, &w->base);
                return NULL;
        }
        return w;
}

/* Read once, arm the deadline, wait. */
static int watch_start(lua_State *L, WatchOp *w, double timeout) {
        int r;

        r = watch_read(w);
        if (r >= 0)
                r = sdop_set_timeout(&w->base, timeout);
        if (r < 0)
                return sdop_abandon(L, &w->base, r, "cannot watch the unit");
        return rr_op_await(L, &w->base.op);
}

/* u:wait_state(states[, timeout]) -> true, state | nil, message, "ETIMEDOUT", state | nil, err, code */
static int unit_l_wait_state(lua_State *L) {
        Unit *u = check_unit(L, 1);
        double timeout = opt_timeout(L, 3);
        size_t n;
        WatchOp *w;

        lua_settop(L, 3); /* u states timeout: check_string_list() pushes above the arguments */
        n = check_string_list(L, 2, active_states, ELEMENTSOF(active_states)); /* u states timeout states... */
        if (u->m->lost)
                return push_lost(L, u->m);
        w = watch_new(L, u, false, lua_gettop(L) - (int) n + 1, n);
        return watch_start(L, w, timeout);
}

/* u:wait_change(properties[, timeout[, since]]) -> props, changed_names | nil, message, "ETIMEDOUT" | nil, err, code
 * Returns once one of the named properties differs from since[name] (or, without it, from its
 * value when the wait began). */
static int unit_l_wait_change(lua_State *L) {
        Unit *u = check_unit(L, 1);
        double timeout = opt_timeout(L, 3);
        int names, since = 0;
        size_t n;
        WatchOp *w;

        lua_settop(L, 4); /* u names timeout since: check_string_list() pushes above the arguments */
        n = check_string_list(L, 2, NULL, 0); /* u names timeout since names... */
        names = lua_gettop(L) - (int) n + 1;
        if (!lua_isnil(L, 4)) {
                luaL_checktype(L, 4, LUA_TTABLE);
                /* since[name] for each name, next on the stack (read now: an __index may raise). */
                luaL_checkstack(L, (int) n + 4, "list too long"); /* the values, and an error message */
                since = lua_gettop(L) + 1;
                for (size_t i = 0; i < n; i++) {
                        const char *name = lua_tostring(L, names + (int) i);
                        if (lua_getfield(L, 4, name) != LUA_TNIL && !bus_comparable(L, -1))
                                luaL_argerror(L, 4, lua_pushfstring(L, "since.%s must be a string, number or boolean",
                                                                    name));
                } /* u names timeout since names... values... */
        }
        if (u->m->lost)
                return push_lost(L, u->m);
        w = watch_new(L, u, true, names, n);
        w->baseline = calloc(n, sizeof(char *));
        w->changed = calloc(n, sizeof(bool));
        if (!w->baseline || !w->changed)
                return sdop_raise_oom(L, &w->base);
        for (size_t i = 0; since > 0 && i < n; i++)
                if (!lua_isnil(L, since + (int) i)) {
                        w->baseline[i] = bus_canon_lua(L, since + (int) i);
                        if (!w->baseline[i])
                                return sdop_raise_oom(L, &w->base);
                }
        return watch_start(L, w, timeout);
}

/* u:reset_failed() -> true | nil, err, code */
static int unit_l_reset_failed(lua_State *L) {
        rr_canceled(L, true); /* a cancelled task must not start a side effect it never sees */
        Unit *u = check_unit(L, 1);
        char what[512];

        snprintf(what, sizeof what, "reset-failed of %s", u->name);
        return start_call(L, u->m, what, 0, SD_OBJECT, SD_MANAGER, "ResetFailedUnit", "s", u->id);
}

static const struct {
        const char *name;
        int signo;
} signals[] = {
        { "HUP", SIGHUP },   { "INT", SIGINT },   { "QUIT", SIGQUIT }, { "KILL", SIGKILL }, { "USR1", SIGUSR1 },
        { "USR2", SIGUSR2 }, { "TERM", SIGTERM }, { "CONT", SIGCONT }, { "STOP", SIGSTOP }, { "ABRT", SIGABRT },
};

/* u:kill([signal[, whom]]) -> true | nil, err, code; signal a number or "TERM"/"SIGTERM"..., whom
 * "all" (default), "main" or "control". */
static int unit_l_kill(lua_State *L) {
        rr_canceled(L, true); /* a cancelled task must not start a side effect it never sees */
        static const char *const whoms[] = { "all", "main", "control", NULL };
        Unit *u = check_unit(L, 1);
        int signo = SIGTERM;
        const char *whom;
        char what[512];

        if (lua_type(L, 2) == LUA_TSTRING) {
                const char *s = lua_tostring(L, 2);
                signo = 0;
                if (strncmp(s, "SIG", 3) == 0)
                        s += 3;
                for (size_t i = 0; i < ELEMENTSOF(signals); i++)
                        if (streq(s, signals[i].name))
                                signo = signals[i].signo;
                if (signo == 0)
                        return luaL_argerror(L, 2, lua_pushfstring(L, "unknown signal '%s'", lua_tostring(L, 2)));
        } else if (!lua_isnoneornil(L, 2)) {
                lua_Integer s = luaL_checkinteger(L, 2);
                luaL_argcheck(L, s > 0 && s < 65, 2, "not a signal number");
                signo = (int) s;
        }
        whom = whoms[luaL_checkoption(L, 3, "all", whoms)];
        snprintf(what, sizeof what, "kill of %s", u->name);
        return start_call(L, u->m, what, 0, SD_OBJECT, SD_MANAGER, "KillUnit", "ssi", u->id, whom, signo);
}

/* __gc: drop the manager reference and the names. */
static int unit_l_gc(lua_State *L) {
        Unit *u = luaL_checkudata(L, 1, UNIT_MT);

        u->m = manager_unref(u->m);
        free(u->name);
        free(u->id);
        free(u->path);
        u->name = u->id = u->path = NULL;
        return 0;
}

/* tostring(u): "rr.systemd.unit x.service (user manager)", "... (user manager on web1)". */
static int unit_l_tostring(lua_State *L) {
        Unit *u = luaL_checkudata(L, 1, UNIT_MT);

        lua_pushfstring(L, UNIT_MT " %s (%s)", u->name ? u->name : "?", u->m ? manager_what(u->m) : "no manager");
        return 1;
}

static const luaL_Reg unit_methods[] = {
        { "name", unit_l_name },
        { "id", unit_l_id },
        { "path", unit_l_path },
        { "properties", unit_l_properties },
        { "get", unit_l_get },
        /* and the job methods of job_verbs (add_job_methods) */
        { "wait_state", unit_l_wait_state },
        { "wait_change", unit_l_wait_change },
        { "reset_failed", unit_l_reset_failed },
        { "kill", unit_l_kill },
        { NULL, NULL },
};

static const luaL_Reg unit_meta[] = {
        { "__gc", unit_l_gc },
        { "__tostring", unit_l_tostring },
        { NULL, NULL },
};

/* Creates the rr.systemd.unit class: the methods above and the job methods. */
void unit_class_new(lua_State *L) {
        new_class(L, UNIT_MT, unit_meta, unit_methods, add_job_methods);
}
