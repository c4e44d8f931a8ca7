/* rr.systemd: systemd's service managers (user or system) over D-Bus, on the engine's one loop.
 *
 * A manager connection (rr.systemd.manager) is one sd-bus connection attached to the sd-event
 * loop and subscribed to the manager's signals (Subscribe()). Every request is an asynchronous
 * method call owned by an op (SdOp, an RrOp underneath): the calling task yields until the reply
 * arrives, or the JobRemoved signal of its job, or a PropertiesChanged signal that answers its
 * wait. Signals reach ops through three matches added once per connection, before the first
 * request goes out, so that a job that ends at once cannot be missed (one connection delivers in
 * order: the reply carrying the job path comes before the job's JobRemoved):
 *   - JobRemoved on the manager object: ops waiting for a job compare its object path;
 *   - PropertiesChanged under /org/freedesktop/systemd1/unit: ops watching a unit compare the
 *     object path;
 *   - the local Disconnected signal: every pending op fails.
 * Every pending op is on its manager's list, so that signals reach it and a close (or a lost
 * connection) fails it. Cancellation (release() on a pending op) drops the op's call slots
 * (sd-bus forgets the reply) and its timer; a job it waited for goes on in systemd.
 *
 * A Lua primitive may leave its C function without returning: a raise is a longjmp, and so is
 * the yield in rr_op_await() when a task calls it (lua_yieldk() never returns to a C caller). So
 * a primitive reads and checks all of its arguments first (strings stay on the stack, where
 * reading them cannot raise), then creates its op, and holds nothing else across the await: no
 * _cleanup_ variable of its frame survives the yield (a method call message built there would
 * keep its bus alive forever). Messages are built in helpers that return first (sdop_callv()). */
#define _GNU_SOURCE
#include <assert.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <systemd/sd-bus.h>

#include "rr.h"

#define MANAGER_MT "rr.systemd.manager"
#define UNIT_MT "rr.systemd.unit"

#define SD_SERVICE "org.freedesktop.systemd1"
#define SD_OBJECT "/org/freedesktop/systemd1"
#define SD_MANAGER "org.freedesktop.systemd1.Manager"
#define SD_UNIT "org.freedesktop.systemd1.Unit"
#define SD_UNIT_PREFIX "/org/freedesktop/systemd1/unit"
#define DBUS_PROPERTIES "org.freedesktop.DBus.Properties"
#define DBUS_LOCAL "org.freedesktop.DBus.Local"

/* Error names of our own (third return value) for failures that are not D-Bus errors. */
#define ERR_CLOSED "closed"
#define ERR_DISCONNECTED "disconnected"
#define ERR_WAIT_TIMEOUT "wait-timeout"
#define ERR_PARSE "bad-reply"

/* daemon-reload may take long on a big system; systemctl waits as long (DAEMON_RELOAD_TIMEOUT_SEC). */
#define DAEMON_RELOAD_TIMEOUT_USEC (6ULL * 60ULL * 1000000ULL)

/* String equality. */
static bool streq(const char *a, const char *b) {
        return strcmp(a, b) == 0;
}

/* Is s one of the n strings of v? */
static bool strv_contains(char *const *v, size_t n, const char *s) {
        for (size_t i = 0; i < n; i++)
                if (streq(v[i], s))
                        return true;
        return false;
}

/* Frees n strings and their array; NULL is fine. */
static void strv_free(char **v, size_t n) {
        if (!v)
                return;
        for (size_t i = 0; i < n; i++)
                free(v[i]);
        free(v);
}

/* ---- unit types ---- */

typedef struct UnitType {
        const char *suffix;
        const char *iface;  /* the type's own D-Bus interface */
        bool has_result;    /* the interface has a Result property */
} UnitType;

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

/* ---- manager connections and ops ---- */

typedef struct SdOp SdOp;

typedef struct Manager {
        unsigned n_ref;
        sd_bus *bus; /* NULL once closed */
        sd_bus_slot *job_removed, *props_changed, *disconnected;
        SdOp *ops;   /* every pending op */
        bool user;
        bool lost;   /* the connection dropped */
} Manager;

/* What differs between kinds of ops. */
typedef struct SdOpType {
        int (*push)(lua_State *L, SdOp *o); /* the results of an op that did not fail */
        void (*done)(SdOp *o);              /* frees the kind's own fields */
        void (*job_removed)(SdOp *o, const char *job, const char *result);
        void (*props_changed)(SdOp *o, sd_bus_message *msg);
        void (*timeout)(SdOp *o);
} SdOpType;

struct SdOp {
        RrOp op;
        const SdOpType *type;
        Manager *m;                /* a reference */
        SdOp *prev, *next;         /* in m->ops while pending */
        bool linked, finished, failed;
        sd_bus_slot *calls[2];     /* method calls in flight */
        sd_event_source *timer;
        char *error, *error_name;  /* failed: push() returns nil, error, error_name */
};

/* "user" or "system", for messages. */
static const char *manager_scope(const Manager *m) {
        return m->user ? "user" : "system";
}

/* Takes a reference (manager userdata, unit handles and ops each hold one). */
static Manager *manager_ref(Manager *m) {
        m->n_ref++;
        return m;
}

static void sdop_fail(SdOp *o, const char *name, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Fail every pending op (their tasks wake with the error). */
static void manager_fail_all(Manager *m, const char *name, const char *why) {
        /* sdop_fail() unlinks the op, so the list shrinks at every step. */
        while (m->ops)
                sdop_fail(m->ops, name, "the connection to the %s manager %s", manager_scope(m), why);
}

/* Close the connection: pending ops fail, the bus leaves the loop. Idempotent. No flush: nothing
 * we could still send matters once we stop listening, and a flush can block on a hung manager. */
static void manager_close(Manager *m) {
        if (!m || !m->bus)
                return;
        manager_fail_all(m, ERR_CLOSED, "was closed");
        m->job_removed = sd_bus_slot_unref(m->job_removed);
        m->props_changed = sd_bus_slot_unref(m->props_changed);
        m->disconnected = sd_bus_slot_unref(m->disconnected);
        (void) sd_bus_detach_event(m->bus);
        m->bus = sd_bus_close_unref(m->bus);
}

/* Drops a reference; the last one closes and frees. Returns NULL. */
static Manager *manager_unref(Manager *m) {
        if (!m)
                return NULL;
        assert(m->n_ref > 0);
        if (--m->n_ref > 0)
                return NULL;
        manager_close(m);
        free(m);
        return NULL;
}

/* Takes the op off its manager's pending list. */
static void sdop_unlink(SdOp *o) {
        if (!o->linked)
                return;
        if (o->prev)
                o->prev->next = o->next;
        else
                o->m->ops = o->next;
        if (o->next)
                o->next->prev = o->prev;
        o->prev = o->next = NULL;
        o->linked = false;
}

/* Stop everything the op still waits on. Idempotent; safe inside the op's own callbacks (sd-bus
 * and sd-event keep a slot or source alive while its callback runs). */
static void sdop_stop(SdOp *o) {
        for (size_t i = 0; i < ELEMENTSOF(o->calls); i++)
                o->calls[i] = sd_bus_slot_unref(o->calls[i]);
        o->timer = sd_event_source_disable_unref(o->timer);
        sdop_unlink(o);
}

/* The op has its outcome: stop waiting and wake the caller. */
static void sdop_finish(SdOp *o) {
        if (o->finished)
                return;
        o->finished = true;
        sdop_stop(o);
        rr_op_complete(&o->op);
}

/* The op failed: push() returns nil, message, name (name may be NULL). */
static void sdop_fail(SdOp *o, const char *name, const char *fmt, ...) {
        va_list ap;

        if (o->finished)
                return;
        va_start(ap, fmt);
        if (vasprintf(&o->error, fmt, ap) < 0)
                o->error = NULL; /* push() says "out of memory" */
        va_end(ap);
        o->error_name = name ? strdup(name) : NULL;
        o->failed = true;
        sdop_finish(o);
}

/* RrOp.push: the failure shape, or the kind's own results. */
static int sdop_push(lua_State *L, RrOp *op) {
        SdOp *o = (SdOp *) op;

        if (!o->failed)
                return o->type->push(L, o);
        lua_pushnil(L);
        lua_pushstring(L, o->error ? o->error : "out of memory");
        if (!o->error_name)
                return 2;
        lua_pushstring(L, o->error_name);
        return 3;
}

/* RrOp.release: stops whatever is pending, then frees (also on a canceled op). */
static void sdop_release(RrOp *op) {
        SdOp *o = (SdOp *) op;

        sdop_stop(o);
        if (o->type->done)
                o->type->done(o);
        manager_unref(o->m);
        free(o->error);
        free(o->error_name);
        free(o);
}

/* A new op of `size` bytes (an SdOp first), pending on m. */
static void *sdop_new(size_t size, const SdOpType *type, Manager *m) {
        SdOp *o;

        assert(size >= sizeof(SdOp));
        o = calloc(1, size);
        if (!o)
                return NULL;
        o->op.push = sdop_push;
        o->op.release = sdop_release;
        o->type = type;
        o->m = manager_ref(m);
        o->next = m->ops;
        if (m->ops)
                m->ops->prev = o;
        m->ops = o;
        o->linked = true;
        return o;
}

/* A primitive could not start its op: free it and return nil, "<what>: <errno text>", ERRNO. */
static int sdop_abandon(lua_State *L, SdOp *o, int r, const char *what) {
        sdop_release(&o->op);
        return rr_push_fail(L, -r, "%s: %s", what, strerror(-r));
}

/* sdop_new() for a Lua primitive: raises "out of memory" instead of returning NULL. */
static void *sdop_new_or_raise(lua_State *L, size_t size, const SdOpType *type, Manager *m) {
        void *o = sdop_new(size, type, m);

        if (!o)
                luaL_error(L, "out of memory");
        return o;
}

/* A primitive ran out of memory filling in its op: free it and raise "out of memory". */
static int sdop_raise_oom(lua_State *L, SdOp *o) {
        sdop_release(&o->op);
        return luaL_error(L, "out of memory");
}

/* Call a manager method asynchronously into o->calls[idx]; the reply goes to cb with o. The
 * arguments (of D-Bus signature `types`, NULL for none) are in ap. */
static int sdop_callv(SdOp *o, unsigned idx, sd_bus_message_handler_t cb, uint64_t timeout_usec, const char *path,
                      const char *iface, const char *member, const char *types, va_list ap) {
        _cleanup_(sd_bus_message_unrefp) sd_bus_message *msg = NULL;
        int r;

        assert(idx < ELEMENTSOF(o->calls));
        assert(!o->calls[idx]);
        if (!o->m->bus)
                return -ENOTCONN;
        r = sd_bus_message_new_method_call(o->m->bus, &msg, SD_SERVICE, path, iface, member);
        if (r < 0)
                return r;
        if (types) {
                r = sd_bus_message_appendv(msg, types, ap);
                if (r < 0)
                        return r;
        }
        return sd_bus_call_async(o->m->bus, &o->calls[idx], msg, cb, o, timeout_usec);
}

/* sdop_callv() with the arguments given here. */
static int sdop_call(SdOp *o, unsigned idx, sd_bus_message_handler_t cb, uint64_t timeout_usec, const char *path,
                     const char *iface, const char *member, const char *types, ...) {
        va_list ap;
        int r;

        va_start(ap, types);
        r = sdop_callv(o, idx, cb, timeout_usec, path, iface, member, types, ap);
        va_end(ap);
        return r;
}

/* GetAll() of the Unit interface into o->calls[0] and, when type_iface is not NULL, of the unit
 * type's into o->calls[1]; both replies go to cb. *pending: how many replies to wait for. */
static int sdop_get_all(SdOp *o, sd_bus_message_handler_t cb, const char *path, const char *type_iface,
                        unsigned *pending) {
        int r;

        r = sdop_call(o, 0, cb, 0, path, DBUS_PROPERTIES, "GetAll", "s", SD_UNIT);
        if (r < 0)
                return r;
        *pending = 1;
        if (type_iface) {
                r = sdop_call(o, 1, cb, 0, path, DBUS_PROPERTIES, "GetAll", "s", type_iface);
                if (r < 0)
                        return r;
                *pending = 2;
        }
        return 0;
}

/* In a reply callback: which of o's calls this reply answers (its slot is dropped), or -1. */
static int sdop_take_call(SdOp *o, sd_bus_message *reply) {
        sd_bus_slot *slot = sd_bus_get_current_slot(sd_bus_message_get_bus(reply));

        for (size_t i = 0; i < ELEMENTSOF(o->calls); i++)
                if (o->calls[i] && o->calls[i] == slot) {
                        o->calls[i] = sd_bus_slot_unref(o->calls[i]);
                        return (int) i;
                }
        return -1;
}

/* The op's deadline passed. */
static int sdop_timer_fired(sd_event_source *src, uint64_t usec, void *userdata) {
        SdOp *o = userdata;

        (void) src;
        (void) usec;
        o->type->timeout(o);
        return 0;
}

/* Arm o's deadline, `seconds` from now (negative: none). From the clock (rr_deadline_usec()), not
 * from sd_event_add_time_relative(): that counts from the loop's cached time of its last wake-up,
 * which is stale after Lua code ran for a while, and the deadline would come early. */
static int sdop_set_timeout(SdOp *o, double seconds) {
        if (seconds < 0)
                return 0;
        return sd_event_add_time(rr_loop_event(), &o->timer, CLOCK_MONOTONIC, rr_deadline_usec(seconds), 1000,
                                 sdop_timer_fired, o);
}

/* The error a reply carries, or NULL for a method return. */
static const sd_bus_error *reply_error(sd_bus_message *reply) {
        return sd_bus_message_is_method_error(reply, NULL) > 0 ? sd_bus_message_get_error(reply) : NULL;
}

/* A D-Bus error's message, for humans. */
static const char *error_text(const sd_bus_error *e) {
        if (e->message && *e->message)
                return e->message;
        return e->name ? e->name : "unknown error";
}

/* ---- D-Bus values to Lua ---- */

/* Is a D-Bus type code a container (array, struct, dict entry, variant)? */
static bool is_container(char type) {
        return type == SD_BUS_TYPE_ARRAY || type == SD_BUS_TYPE_STRUCT || type == SD_BUS_TYPE_DICT_ENTRY ||
               type == SD_BUS_TYPE_VARIANT;
}

static const char hexdigits[] = "0123456789abcdef";

/* Push the byte array as lowercase hex (InvocationID and other binary ids read so). */
static void push_hex(lua_State *L, const uint8_t *p, size_t n) {
        luaL_Buffer b;

        luaL_buffinit(L, &b);
        for (size_t i = 0; i < n; i++) {
                luaL_addchar(&b, hexdigits[p[i] >> 4]);
                luaL_addchar(&b, hexdigits[p[i] & 15]);
        }
        luaL_pushresult(&b);
}

typedef union BasicValue {
        uint8_t y;
        int16_t n;
        uint16_t q;
        int32_t i;
        uint32_t u;
        int64_t x;
        uint64_t t;
        double d;
        int b;
        const char *s;
} BasicValue;

/* Push a basic D-Bus value as its Lua counterpart. */
static void push_basic(lua_State *L, char type, const BasicValue *v) {
        switch (type) {
        case SD_BUS_TYPE_BYTE:
                lua_pushinteger(L, v->y);
                break;
        case SD_BUS_TYPE_INT16:
                lua_pushinteger(L, v->n);
                break;
        case SD_BUS_TYPE_UINT16:
                lua_pushinteger(L, v->q);
                break;
        case SD_BUS_TYPE_INT32:
        case SD_BUS_TYPE_UNIX_FD:
                lua_pushinteger(L, v->i);
                break;
        case SD_BUS_TYPE_UINT32:
                lua_pushinteger(L, v->u);
                break;
        case SD_BUS_TYPE_INT64:
                lua_pushinteger(L, v->x);
                break;
        case SD_BUS_TYPE_UINT64:
                /* systemd's "infinity" is UINT64_MAX: math.huge in Lua. */
                if (v->t == UINT64_MAX)
                        lua_pushnumber(L, HUGE_VAL);
                else if (v->t > (uint64_t) INT64_MAX)
                        lua_pushnumber(L, (double) v->t);
                else
                        lua_pushinteger(L, (lua_Integer) v->t);
                break;
        case SD_BUS_TYPE_DOUBLE:
                lua_pushnumber(L, v->d);
                break;
        case SD_BUS_TYPE_BOOLEAN:
                lua_pushboolean(L, v->b);
                break;
        default: /* s, o, g */
                lua_pushstring(L, v->s);
                break;
        }
}

/* Push the next complete value of msg; 1 when pushed, 0 at the end of the container, or a
 * negative errno. Arrays become lists (dicts: tables, byte arrays: hex strings), structs lists. */
static int push_value(lua_State *L, sd_bus_message *msg) {
        const char *contents;
        char type;
        int r;

        luaL_checkstack(L, 4, "D-Bus value nested too deep");
        r = sd_bus_message_peek_type(msg, &type, &contents);
        if (r <= 0)
                return r;

        if (type == SD_BUS_TYPE_ARRAY && streq(contents, "y")) {
                const void *p;
                size_t n;
                r = sd_bus_message_read_array(msg, SD_BUS_TYPE_BYTE, &p, &n);
                if (r < 0)
                        return r;
                push_hex(L, p, n);
                return 1;
        }
        if (type == SD_BUS_TYPE_ARRAY && contents[0] == SD_BUS_TYPE_DICT_ENTRY_BEGIN) {
                r = sd_bus_message_enter_container(msg, type, contents);
                if (r < 0)
                        return r;
                lua_newtable(L);
                for (;;) {
                        const char *entry;
                        char etype;
                        r = sd_bus_message_peek_type(msg, &etype, &entry);
                        if (r <= 0)
                                break;
                        r = sd_bus_message_enter_container(msg, etype, entry);
                        if (r < 0)
                                return r;
                        r = push_value(L, msg); /* t key */
                        if (r <= 0)
                                return r < 0 ? r : -EBADMSG;
                        r = push_value(L, msg); /* t key value */
                        if (r <= 0)
                                return r < 0 ? r : -EBADMSG;
                        lua_rawset(L, -3);
                        r = sd_bus_message_exit_container(msg);
                        if (r < 0)
                                return r;
                }
                if (r < 0)
                        return r;
                r = sd_bus_message_exit_container(msg);
                return r < 0 ? r : 1;
        }
        if (is_container(type)) {
                lua_Integer i = 0;
                r = sd_bus_message_enter_container(msg, type, contents);
                if (r < 0)
                        return r;
                if (type == SD_BUS_TYPE_VARIANT) {
                        r = push_value(L, msg);
                        if (r <= 0)
                                return r < 0 ? r : -EBADMSG;
                } else {
                        lua_newtable(L);
                        while ((r = push_value(L, msg)) > 0)
                                lua_rawseti(L, -2, ++i);
                        if (r < 0)
                                return r;
                }
                r = sd_bus_message_exit_container(msg);
                return r < 0 ? r : 1;
        }

        BasicValue v;
        r = sd_bus_message_read_basic(msg, type, &v);
        if (r < 0)
                return r;
        push_basic(L, type, &v);
        return 1;
}

/* EnvironmentFiles (a(sb)) as a list of {path = ..., optional = bool}. */
static int push_environment_files(lua_State *L, sd_bus_message *msg) {
        const char *path;
        lua_Integer i = 0;
        int optional, r;

        r = sd_bus_message_enter_container(msg, SD_BUS_TYPE_VARIANT, "a(sb)");
        if (r < 0)
                return r;
        r = sd_bus_message_enter_container(msg, SD_BUS_TYPE_ARRAY, "(sb)");
        if (r < 0)
                return r;
        lua_newtable(L);
        while ((r = sd_bus_message_read(msg, "(sb)", &path, &optional)) > 0) {
                lua_createtable(L, 0, 2);
                lua_pushstring(L, path);
                lua_setfield(L, -2, "path");
                lua_pushboolean(L, optional);
                lua_setfield(L, -2, "optional");
                lua_rawseti(L, -2, ++i);
        }
        if (r < 0)
                return r;
        r = sd_bus_message_exit_container(msg);
        if (r < 0)
                return r;
        r = sd_bus_message_exit_container(msg);
        return r < 0 ? r : 1;
}

/* Push the value of property `name`, a variant at msg's read position. */
static int push_property(lua_State *L, sd_bus_message *msg, const char *name) {
        const char *contents;
        int r;

        r = sd_bus_message_peek_type(msg, NULL, &contents);
        if (r <= 0)
                return r < 0 ? r : -EBADMSG;
        if (streq(name, "EnvironmentFiles") && streq(contents, "a(sb)"))
                return push_environment_files(L, msg);
        r = push_value(L, msg);
        return r == 0 ? -EBADMSG : r;
}

/* Drop what was pushed above top, then push nil, "cannot parse the properties of <name>: <errno
 * text>", "bad-reply" for the negative errno r: 3. */
static int push_props_error(lua_State *L, int top, const char *name, int r) {
        lua_settop(L, top);
        lua_pushnil(L);
        lua_pushfstring(L, "cannot parse the properties of %s: %s", name, strerror(-r));
        lua_pushliteral(L, ERR_PARSE);
        return 3;
}

/* Rewind a GetAll reply and enter its property array (a{sv}), for props_next(). */
static int props_begin(sd_bus_message *reply) {
        int r;

        r = sd_bus_message_rewind(reply, true);
        if (r < 0)
                return r;
        return sd_bus_message_enter_container(reply, SD_BUS_TYPE_ARRAY, "{sv}");
}

/* Enter the next entry of a property array (a{sv}) and read its name: 1 with the value (a
 * variant) next, for the caller to read or skip before it exits the entry; 0 at the end of the
 * array; or a negative errno. */
static int props_next(sd_bus_message *msg, const char **name) {
        int r;

        r = sd_bus_message_enter_container(msg, SD_BUS_TYPE_DICT_ENTRY, "sv");
        if (r <= 0)
                return r;
        r = sd_bus_message_read_basic(msg, SD_BUS_TYPE_STRING, name);
        return r < 0 ? r : 1;
}

/* Add the properties of a GetAll reply (a{sv}) to the table at absolute index t. */
static int props_to_table(lua_State *L, sd_bus_message *reply, int t) {
        const char *name;
        int r;

        r = props_begin(reply);
        if (r < 0)
                return r;
        while ((r = props_next(reply, &name)) > 0) {
                r = push_property(L, reply, name);
                if (r < 0)
                        return r;
                lua_setfield(L, t, name);
                r = sd_bus_message_exit_container(reply);
                if (r < 0)
                        return r;
        }
        if (r < 0)
                return r;
        return sd_bus_message_exit_container(reply);
}

/* Push one table with the properties of every GetAll reply in replies (NULL entries skipped): 1.
 * When a reply cannot be parsed: nil, "cannot parse the properties of <name>: ...", "bad-reply"
 * (3), and nothing else is left on the stack. */
static int push_props(lua_State *L, sd_bus_message *const *replies, size_t n, const char *name) {
        int top = lua_gettop(L), r = 0;

        lua_newtable(L);
        for (size_t i = 0; i < n && r >= 0; i++)
                if (replies[i])
                        r = props_to_table(L, replies[i], top + 1);
        if (r < 0)
                return push_props_error(L, top, name, r);
        lua_settop(L, top + 1);
        return 1;
}

/* ---- canonical text of values, to tell whether a property changed ---- */

/* Write the next complete value of msg to f: strings as they are, numbers in decimal, booleans
 * true/false, byte arrays in hex (as Lua sees them), containers bracketed. 1 when written, 0 at
 * the end of the container, or a negative errno. */
static int canon_write(sd_bus_message *msg, FILE *f) {
        const char *contents;
        BasicValue v;
        char type;
        int r;

        r = sd_bus_message_peek_type(msg, &type, &contents);
        if (r <= 0)
                return r;
        if (type == SD_BUS_TYPE_ARRAY && streq(contents, "y")) {
                const uint8_t *p;
                size_t n;
                r = sd_bus_message_read_array(msg, SD_BUS_TYPE_BYTE, (const void **) &p, &n);
                if (r < 0)
                        return r;
                for (size_t i = 0; i < n; i++)
                        fprintf(f, "%02x", p[i]);
                return 1;
        }
        if (is_container(type)) {
                bool first = true;
                r = sd_bus_message_enter_container(msg, type, contents);
                if (r < 0)
                        return r;
                if (type != SD_BUS_TYPE_VARIANT)
                        fputc('[', f);
                while ((r = canon_write(msg, f)) > 0) {
                        if (!first)
                                fputc(',', f);
                        first = false;
                }
                if (r < 0)
                        return r;
                if (type != SD_BUS_TYPE_VARIANT)
                        fputc(']', f);
                r = sd_bus_message_exit_container(msg);
                return r < 0 ? r : 1;
        }
        r = sd_bus_message_read_basic(msg, type, &v);
        if (r < 0)
                return r;
        switch (type) {
        case SD_BUS_TYPE_BYTE:
                fprintf(f, "%u", (unsigned) v.y);
                break;
        case SD_BUS_TYPE_INT16:
                fprintf(f, "%d", (int) v.n);
                break;
        case SD_BUS_TYPE_UINT16:
                fprintf(f, "%u", (unsigned) v.q);
                break;
        case SD_BUS_TYPE_INT32:
        case SD_BUS_TYPE_UNIX_FD:
                fprintf(f, "%d", (int) v.i);
                break;
        case SD_BUS_TYPE_UINT32:
                fprintf(f, "%u", (unsigned) v.u);
                break;
        case SD_BUS_TYPE_INT64:
                fprintf(f, "%lld", (long long) v.x);
                break;
        case SD_BUS_TYPE_UINT64:
                fprintf(f, "%llu", (unsigned long long) v.t);
                break;
        case SD_BUS_TYPE_DOUBLE:
                fprintf(f, "%.17g", v.d);
                break;
        case SD_BUS_TYPE_BOOLEAN:
                fputs(v.b ? "true" : "false", f);
                break;
        default:
                fputs(v.s, f);
                break;
        }
        return 1;
}

/* The canonical text of the value at msg's read position (a variant). */
static int canon_value(sd_bus_message *msg, char **ret) {
        char *buf = NULL;
        size_t size = 0;
        FILE *f;
        int r;

        f = open_memstream(&buf, &size);
        if (!f)
                return -errno;
        r = canon_write(msg, f);
        if (fclose(f) != 0 && r >= 0)
                r = -ENOMEM;
        if (r <= 0) {
                free(buf);
                return r < 0 ? r : -EBADMSG;
        }
        *ret = buf;
        return 0;
}

/* Can a Lua value be compared with a property (canon_lua())? Strings, numbers, booleans. */
static bool lua_comparable(lua_State *L, int idx) {
        int t = lua_type(L, idx);

        return t == LUA_TSTRING || t == LUA_TNUMBER || t == LUA_TBOOLEAN;
}

/* The canonical text of a Lua value as the caller gave it for a property (a value read from a
 * properties table compares equal to the same property read again); the value is
 * lua_comparable(). NULL on OOM. Never raises. */
static char *canon_lua(lua_State *L, int idx) {
        char *s = NULL;

        switch (lua_type(L, idx)) {
        case LUA_TSTRING:
                return strdup(lua_tostring(L, idx));
        case LUA_TBOOLEAN:
                return strdup(lua_toboolean(L, idx) ? "true" : "false");
        case LUA_TNUMBER:
                if (lua_isinteger(L, idx)) {
                        if (asprintf(&s, "%lld", (long long) lua_tointeger(L, idx)) < 0)
                                return NULL;
                } else {
                        double d = lua_tonumber(L, idx);
                        int r;
                        if (isinf(d) && d > 0)
                                r = asprintf(&s, "%llu", (unsigned long long) UINT64_MAX);
                        else if (d == floor(d) && fabs(d) < 9.2e18)
                                r = asprintf(&s, "%lld", (long long) d);
                        else
                                r = asprintf(&s, "%.17g", d);
                        if (r < 0)
                                return NULL;
                }
                return s;
        default:
                assert(false); /* not lua_comparable() */
                return NULL;
        }
}

/* Find property `name` in a GetAll reply; its canonical text in *ret, or NULL when absent. */
static int reply_find_canon(sd_bus_message *reply, const char *name, char **ret) {
        const char *key;
        int r;

        *ret = NULL;
        r = props_begin(reply);
        if (r < 0)
                return r;
        while ((r = props_next(reply, &key)) > 0) {
                if (streq(key, name))
                        return canon_value(reply, ret);
                r = sd_bus_message_skip(reply, "v");
                if (r < 0)
                        return r;
                r = sd_bus_message_exit_container(reply);
                if (r < 0)
                        return r;
        }
        return r;
}

/* ---- the connection ---- */

/* JobRemoved(id, job, unit, result): hand it to the ops waiting for jobs. */
static int on_job_removed(sd_bus_message *msg, void *userdata, sd_bus_error *ret_error) {
        Manager *m = userdata;
        const char *job, *unit, *result;
        uint32_t id;

        (void) ret_error;
        if (sd_bus_message_read(msg, "uoss", &id, &job, &unit, &result) < 0)
                return 0;
        /* A handler may finish its own op (unlinking it), never another one. */
        for (SdOp *o = m->ops, *next; o; o = next) {
                next = o->next;
                if (o->type->job_removed)
                        o->type->job_removed(o, job, result);
        }
        return 0;
}

/* PropertiesChanged of some unit: hand it to the ops watching units. */
static int on_props_changed(sd_bus_message *msg, void *userdata, sd_bus_error *ret_error) {
        Manager *m = userdata;

        (void) ret_error;
        for (SdOp *o = m->ops, *next; o; o = next) {
                next = o->next;
                if (o->type->props_changed)
                        o->type->props_changed(o, msg);
        }
        return 0;
}

/* The connection dropped (manager gone, daemon-reexec): fail every pending op. */
static int on_disconnected(sd_bus_message *msg, void *userdata, sd_bus_error *ret_error) {
        Manager *m = userdata;

        (void) msg;
        (void) ret_error;
        m->lost = true;
        manager_fail_all(m, ERR_DISCONNECTED, "was lost");
        return 0;
}

/* `path` escaped for a D-Bus address: anything but [A-Za-z0-9_/.-] as %XX. */
static char *address_escape(const char *path) {
        size_t n = strlen(path);
        char *out = malloc(n * 3 + 1), *p = out;

        if (!out)
                return NULL;
        for (const char *s = path; *s; s++) {
                unsigned char c = (unsigned char) *s;
                if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || strchr("_/.-", c))
                        *p++ = (char) c;
                else {
                        *p++ = '%';
                        *p++ = hexdigits[c >> 4];
                        *p++ = hexdigits[c & 15];
                }
        }
        *p = '\0';
        return out;
}

/* A direct connection to the manager's private socket (what systemctl uses first). */
static int bus_open_direct(const char *socket_path, sd_bus **ret) {
        _cleanup_(sd_bus_close_unrefp) sd_bus *bus = NULL;
        _cleanup_(freep) char *escaped = NULL, *address = NULL;
        int r;

        if (access(socket_path, F_OK) < 0)
                return -errno;
        escaped = address_escape(socket_path);
        if (!escaped || asprintf(&address, "unix:path=%s", escaped) < 0)
                return -ENOMEM;
        r = sd_bus_new(&bus);
        if (r < 0)
                return r;
        r = sd_bus_set_address(bus, address);
        if (r < 0)
                return r;
        r = sd_bus_start(bus);
        if (r < 0)
                return r;
        *ret = bus;
        bus = NULL;
        return 0;
}

/* Open a connection to the user or system manager: its private socket first, else the bus. On
 * failure *err says what was tried. */
static int bus_open(bool user, sd_bus **ret, char *err, size_t errsize) {
        char private[256]; /* a unix socket path is at most 108 bytes anyway */
        int r, q;

        if (user) {
                const char *rt = getenv("XDG_RUNTIME_DIR");
                if (!rt || rt[0] != '/') {
                        snprintf(err, errsize, "$XDG_RUNTIME_DIR is not set");
                        return -ENXIO;
                }
                if ((size_t) snprintf(private, sizeof private, "%s/systemd/private", rt) >= sizeof private) {
                        snprintf(err, errsize, "$XDG_RUNTIME_DIR is too long");
                        return -ENAMETOOLONG;
                }
        } else
                snprintf(private, sizeof private, "/run/systemd/private");

        r = geteuid() == 0 || user ? bus_open_direct(private, ret) : -EACCES;
        if (r >= 0)
                return 0;
        q = user ? sd_bus_open_user(ret) : sd_bus_open_system(ret);
        if (q >= 0)
                return 0;
        snprintf(err, errsize, "%s: %s; %s bus: %s", private, strerror(-r), user ? "user" : "system", strerror(-q));
        return q;
}

/* A new manager connection on the loop, with its signal matches added (before any call). */
static int manager_open(bool user, Manager **ret, char *err, size_t errsize) {
        _cleanup_(freep) char *match = NULL;
        Manager *m;
        sd_bus *bus = NULL;
        const char *sender;
        int r;

        r = bus_open(user, &bus, err, errsize);
        if (r < 0)
                return r;
        m = calloc(1, sizeof *m);
        if (!m) {
                sd_bus_close_unref(bus);
                snprintf(err, errsize, "out of memory");
                return -ENOMEM;
        }
        m->n_ref = 1;
        m->user = user;
        m->bus = bus;
        (void) sd_bus_set_description(bus, user ? "rr.systemd user manager" : "rr.systemd system manager");

        r = sd_bus_attach_event(bus, rr_loop_event(), SD_EVENT_PRIORITY_NORMAL);
        if (r < 0)
                goto fail;
        /* On a bus, only the manager's own signals; a direct connection has no sender names. */
        sender = sd_bus_is_bus_client(bus) > 0 ? SD_SERVICE : NULL;
        r = sd_bus_match_signal_async(bus, &m->job_removed, sender, SD_OBJECT, SD_MANAGER, "JobRemoved", on_job_removed,
                                      NULL, m);
        if (r < 0)
                goto fail;
        if (asprintf(&match,
                     "type='signal',%s%s%sinterface='" DBUS_PROPERTIES "',member='PropertiesChanged',"
                     "path_namespace='" SD_UNIT_PREFIX "'",
                     sender ? "sender='" : "", sender ? sender : "", sender ? "'," : "") < 0) {
                r = -ENOMEM;
                goto fail;
        }
        r = sd_bus_add_match_async(bus, &m->props_changed, match, on_props_changed, NULL, m);
        if (r < 0)
                goto fail;
        r = sd_bus_match_signal_async(bus, &m->disconnected, DBUS_LOCAL, NULL, DBUS_LOCAL, "Disconnected",
                                      on_disconnected, NULL, m);
        if (r < 0)
                goto fail;
        *ret = m;
        return 0;

fail:
        snprintf(err, errsize, "cannot set up the connection: %s", strerror(-r));
        manager_unref(m);
        return r;
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

static const SdOpType connect_type = {
        .push = connect_push,
};

/* Subscribe() answered: the manager is reachable. */
static int connect_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        SdOp *o = userdata;
        const sd_bus_error *e;

        (void) ret_error;
        sdop_take_call(o, reply);
        e = reply_error(reply);
        if (e)
                sdop_fail(o, e->name, "cannot connect to the %s manager: %s", manager_scope(o->m), error_text(e));
        else
                sdop_finish(o);
        return 0;
}

/* ---- ops: load a unit (LoadUnit) ---- */

typedef struct Unit {
        Manager *m;  /* a reference */
        char *name;  /* as the caller named it */
        char *id;    /* the manager's name for it (an alias resolved) */
        char *path;  /* its object path */
        const UnitType *type;
} Unit;

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
        e = reply_error(reply);
        if (e) {
                sdop_fail(&l->base, e->name, "cannot load %s: %s", l->name, error_text(e));
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

/* ---- ops: properties (GetAll per interface) and one property (Get) ---- */

typedef struct PropsOp {
        SdOp base;
        char *name, *path, *prop;     /* prop: get()'s one property */
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
                return push_props(L, p->replies, ELEMENTSOF(p->replies), p->name);
        r = sd_bus_message_rewind(p->replies[0], true);
        if (r >= 0)
                r = push_property(L, p->replies[0], p->prop);
        if (r < 0)
                return push_props_error(L, top, p->name, r);
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
        e = reply_error(reply);
        if (e) {
                sdop_fail(&p->base, e->name, "cannot read the properties of %s: %s", p->name, error_text(e));
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
        e = reply_error(reply);
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
                sdop_fail(&p->base, e->name, "cannot read %s of %s: %s", p->prop, p->name, error_text(e));
                return 0;
        }
        p->replies[0] = sd_bus_message_ref(reply);
        sdop_finish(&p->base);
        return 0;
}

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
        if (!reply_error(reply) && sd_bus_message_read(reply, "v", "s", &result) >= 0)
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
        e = reply_error(reply);
        if (e) {
                sdop_fail(&j->base, e->name, "%s of %s failed: %s", j->verb->verb, j->name, error_text(e));
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

/* ---- ops: plain calls that return nothing (daemon-reload, reset-failed, kill) ---- */

typedef struct CallOp {
        SdOp base;
        char *what;
} CallOp;

/* true: the call succeeded. */
static int call_push(lua_State *L, SdOp *o) {
        (void) o;
        lua_pushboolean(L, 1);
        return 1;
}

/* Frees a CallOp's own fields. */
static void call_done(SdOp *o) {
        free(((CallOp *) o)->what);
}

static const SdOpType call_type = {
        .push = call_push,
        .done = call_done,
};

/* The call answered: done, or failed with the manager's error. */
static int call_reply(sd_bus_message *reply, void *userdata, sd_bus_error *ret_error) {
        CallOp *c = userdata;
        const sd_bus_error *e;

        (void) ret_error;
        sdop_take_call(&c->base, reply);
        e = reply_error(reply);
        if (e)
                sdop_fail(&c->base, e->name, "%s failed: %s", c->what, error_text(e));
        else
                sdop_finish(&c->base);
        return 0;
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
        e = reply_error(reply);
        if (e) {
                sdop_fail(&l->base, e->name, "cannot list units: %s", error_text(e));
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

/* wait_state: true, state | nil, "timeout", state; wait_change: props, changed | nil, "timeout". */
static int watch_push(lua_State *L, SdOp *o) {
        WatchOp *w = (WatchOp *) o;
        lua_Integer k = 0;
        int n;

        if (!w->change) {
                if (w->timed_out) {
                        lua_pushnil(L);
                        lua_pushliteral(L, "timeout");
                        lua_pushstring(L, w->state); /* nil when none was seen */
                        return 3;
                }
                lua_pushboolean(L, 1);
                lua_pushstring(L, w->state);
                return 2;
        }
        if (w->timed_out) {
                lua_pushnil(L);
                lua_pushliteral(L, "timeout");
                return 2;
        }
        n = push_props(L, w->replies, ELEMENTSOF(w->replies), w->name);
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
                        r = reply_find_canon(w->replies[k], w->want[i], &value);
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
        e = reply_error(reply);
        if (e) {
                sdop_fail(&w->base, e->name, "cannot read the state of %s: %s", w->name, error_text(e));
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
        while ((r = props_next(msg, &key)) > 0) {
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

/* ---- Lua: argument helpers ---- */

/* The manager userdata at idx (its pointer is NULL once closed). */
static Manager **manager_ud(lua_State *L, int idx) {
        return luaL_checkudata(L, idx, MANAGER_MT);
}

/* The open manager connection at idx; raises when it was closed. */
static Manager *check_manager(lua_State *L, int idx) {
        Manager *m = *manager_ud(L, idx);

        if (!m || !m->bus) {
                luaL_error(L, "attempt to use a closed " MANAGER_MT);
                return NULL;
        }
        return m;
}

/* The unit handle at idx; raises when its manager was closed. */
static Unit *check_unit(lua_State *L, int idx) {
        Unit *u = luaL_checkudata(L, idx, UNIT_MT);

        if (!u->m || !u->m->bus) {
                luaL_error(L, "attempt to use %s of a closed " MANAGER_MT, u->name ? u->name : "a unit");
                return NULL;
        }
        return u;
}

/* nil, "the connection to the ... manager was lost", "disconnected" */
static int push_lost(lua_State *L, const Manager *m) {
        lua_pushnil(L);
        lua_pushfstring(L, "the connection to the %s manager was lost", manager_scope(m));
        lua_pushliteral(L, ERR_DISCONNECTED);
        return 3;
}

/* An optional timeout in seconds at idx: -1 when absent. */
static double opt_timeout(lua_State *L, int idx) {
        double t;

        if (lua_isnoneornil(L, idx))
                return -1;
        t = luaL_checknumber(L, idx);
        luaL_argcheck(L, t >= 0 && t < 1e9, idx, "timeout must be a number of seconds >= 0");
        return t;
}

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

/* A string or a non-empty list of strings at idx: the count n; with `allowed`, each must be one
 * of them. The n strings are left on top of the stack, in order, for the caller to read once it
 * holds resources (lua_tostring() of a string neither raises nor allocates); a list's items are
 * read only here, so an __index or __len metamethod that raises (or answers differently twice)
 * cannot leave an op behind. */
static size_t check_string_list(lua_State *L, int idx, const char *const *allowed, size_t n_allowed) {
        lua_Integer len = 1;
        size_t n;

        if (lua_type(L, idx) != LUA_TSTRING) {
                luaL_checktype(L, idx, LUA_TTABLE);
                len = luaL_len(L, idx);
                luaL_argcheck(L, len > 0, idx, "empty list");
                luaL_argcheck(L, len <= 100000, idx, "list too long");
        }
        n = (size_t) len;
        luaL_checkstack(L, (int) n, "list too long");
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
static int copy_string_list(lua_State *L, int first, size_t n, char ***ret) {
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

/* ---- Lua: the module ---- */

/* Open a connection, then Subscribe() and wait for the answer. */
static int systemd_connect(lua_State *L, bool user) {
        Manager *m = NULL;
        SdOp *o;
        char err[1024];
        int r;

        r = manager_open(user, &m, err, sizeof err);
        if (r < 0)
                return rr_push_fail(L, -r, "cannot connect to the %s manager: %s", user ? "user" : "system", err);
        o = sdop_new(sizeof(SdOp), &connect_type, m);
        manager_unref(m); /* the op holds it now */
        if (!o)
                return luaL_error(L, "out of memory");
        /* The manager sends signals only to subscribers (a direct connection is one already). */
        r = sdop_call(o, 0, connect_reply, 0, SD_OBJECT, SD_MANAGER, "Subscribe", NULL);
        if (r < 0)
                return sdop_abandon(L, o, r, user ? "cannot connect to the user manager" : "cannot connect to the system manager");
        return rr_op_await(L, &o->op);
}

/* systemd.user() -> manager | nil, err, code */
static int systemd_user(lua_State *L) {
        return systemd_connect(L, true);
}

/* The system manager (as systemd.user, for the system instance) -> manager | nil, err, code */
static int systemd_system(lua_State *L) {
        return systemd_connect(L, false);
}

/* ---- Lua: rr.systemd.manager ---- */

/* m:unit(name) -> unit | nil, err, code */
static int manager_l_unit(lua_State *L) {
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

/* Start a CallOp: a manager method that answers with nothing we need. */
static int start_call(lua_State *L, Manager *m, const char *what, uint64_t timeout_usec, const char *path,
                      const char *iface, const char *method, const char *types, ...) {
        CallOp *c;
        va_list ap;
        int r;

        if (m->lost)
                return push_lost(L, m);
        c = sdop_new_or_raise(L, sizeof *c, &call_type, m);
        c->what = strdup(what);
        if (!c->what)
                return sdop_raise_oom(L, &c->base);
        va_start(ap, types);
        r = sdop_callv(&c->base, 0, call_reply, timeout_usec, path, iface, method, types, ap);
        va_end(ap);
        if (r < 0)
                return sdop_abandon(L, &c->base, r, what);
        return rr_op_await(L, &c->base.op);
}

/* m:daemon_reload() -> true | nil, err, code */
static int manager_l_daemon_reload(lua_State *L) {
        rr_canceled(L, true); /* a cancelled task must not start a side effect it never sees */
        Manager *m = check_manager(L, 1);
        char what[64];

        snprintf(what, sizeof what, "daemon-reload of the %s manager", manager_scope(m));
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

/* tostring(m): "rr.systemd.manager (user)". */
static int manager_l_tostring(lua_State *L) {
        Manager *m = *manager_ud(L, 1);

        if (!m || !m->bus)
                lua_pushliteral(L, MANAGER_MT " (closed)");
        else
                lua_pushfstring(L, MANAGER_MT " (%s%s)", manager_scope(m), m->lost ? ", connection lost" : "");
        return 1;
}

static const luaL_Reg manager_methods[] = {
        { "unit", manager_l_unit },
        { "daemon_reload", manager_l_daemon_reload },
        { "list_units", manager_l_list_units },
        { "scope", manager_l_scope },
        { "close", manager_l_close },
        { NULL, NULL },
};

static const luaL_Reg manager_meta[] = {
        { "__gc", manager_l_close },
        { "__close", manager_l_close },
        { "__tostring", manager_l_tostring },
        { NULL, NULL },
};

/* ---- Lua: rr.systemd.unit ---- */

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

/* u:properties() -> table of every property of the Unit interface and the unit type's | nil, err, code */
static int unit_l_properties(lua_State *L) {
        Unit *u = check_unit(L, 1);
        PropsOp *p;
        int r;

        if (u->m->lost)
                return push_lost(L, u->m);
        p = props_new(L, u);
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

/* u:wait_state(states[, timeout]) -> true, state | nil, "timeout", state | nil, err, code */
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

/* u:wait_change(properties[, timeout[, since]]) -> props, changed_names | nil, "timeout" | nil, err, code
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
                luaL_checkstack(L, (int) n, "list too long");
                since = lua_gettop(L) + 1;
                for (size_t i = 0; i < n; i++) {
                        const char *name = lua_tostring(L, names + (int) i);
                        if (lua_getfield(L, 4, name) != LUA_TNIL && !lua_comparable(L, -1))
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
                        w->baseline[i] = canon_lua(L, since + (int) i);
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

/* tostring(u): "rr.systemd.unit x.service (user manager)". */
static int unit_l_tostring(lua_State *L) {
        Unit *u = luaL_checkudata(L, 1, UNIT_MT);

        lua_pushfstring(L, UNIT_MT " %s (%s manager)", u->name ? u->name : "?", u->m ? manager_scope(u->m) : "no");
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

static const luaL_Reg systemd_functions[] = {
        { "user", systemd_user },
        { "system", systemd_system },
        { NULL, NULL },
};

/* Adds u:start(), u:stop(), ...: one unit_l_job closure per job verb, to the methods table on top. */
static void add_job_methods(lua_State *L) {
        for (size_t i = 0; i < ELEMENTSOF(job_verbs); i++) {
                lua_pushlightuserdata(L, (void *) &job_verbs[i]); /* methods verb */
                lua_pushcclosure(L, unit_l_job, 1);               /* methods closure */
                lua_setfield(L, -2, job_verbs[i].lua);            /* methods */
        }
}

/* Creates the metatable `name` with meta-methods `meta` and methods `methods` (then, when not
 * NULL, those add_methods puts in the table on top) as __index. */
static void new_class(lua_State *L, const char *name, const luaL_Reg *meta, const luaL_Reg *methods,
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
        new_class(L, MANAGER_MT, manager_meta, manager_methods, NULL);
        new_class(L, UNIT_MT, unit_meta, unit_methods, add_job_methods);
        luaL_newlib(L, systemd_functions);
        return 1;
}
