/* rr.systemd: manager connections and the ops every request runs on (see systemd-internal.h
 * for the shape). An op is pending on its manager until it has its outcome: its method calls,
 * its timer and the signals it waits for all end with sdop_finish() or sdop_fail(), which wake
 * the caller. */
#define _GNU_SOURCE
#include <assert.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "systemd-internal.h"

/* "user" or "system", for messages. */
const char *manager_scope(const Manager *m) {
        return m->user ? "user" : "system";
}

/* Takes a reference (manager userdata, unit handles and ops each hold one). */
Manager *manager_ref(Manager *m) {
        m->n_ref++;
        return m;
}

/* Fail every pending op (their tasks wake with the error). */
static void manager_fail_all(Manager *m, const char *name, const char *why) {
        /* sdop_fail() unlinks the op, so the list shrinks at every step. */
        while (m->ops)
                sdop_fail(m->ops, name, "the connection to the %s manager %s", manager_scope(m), why);
}

/* Close the connection: pending ops fail, the bus leaves the loop. Idempotent. No flush: nothing
 * we could still send matters once we stop listening, and a flush can block on a hung manager. */
void manager_close(Manager *m) {
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
Manager *manager_unref(Manager *m) {
        if (!m)
                return NULL;
        assert(m->n_ref > 0);
        if (--m->n_ref > 0)
                return NULL;
        manager_close(m);
        while (m->jobs) {
                JobRecord *r = m->jobs;
                m->jobs = r->next;
                job_record_free(r);
        }
        free(m);
        return NULL;
}

/* Frees a record; NULL is fine. */
void job_record_free(JobRecord *r) {
        if (!r)
                return;
        free(r->job);
        free(r->verb);
        free(r->result);
        free(r);
}

/* The record of job, or NULL. */
static JobRecord *manager_find_job(Manager *m, const char *job) {
        for (JobRecord *r = m->jobs; r; r = r->next)
                if (streq(r->job, job))
                        return r;
        return NULL;
}

/* Keep the result of job when its JobRemoved comes (see systemd-internal.h). */
int manager_keep_job(Manager *m, const char *job, const char *verb) {
        JobRecord *r;

        if (manager_find_job(m, job))
                return 0;
        r = calloc(1, sizeof *r);
        if (!r)
                return -ENOMEM;
        r->job = strdup(job);
        r->verb = strdup(verb);
        if (!r->job || !r->verb) {
                job_record_free(r);
                return -ENOMEM;
        }
        r->next = m->jobs;
        m->jobs = r;
        return 0;
}

/* The record of a kept job, taken off the manager, or NULL. */
JobRecord *manager_take_job(Manager *m, const char *job) {
        for (JobRecord **p = &m->jobs; *p; p = &(*p)->next)
                if (streq((*p)->job, job)) {
                        JobRecord *r = *p;
                        *p = r->next;
                        r->next = NULL;
                        return r;
                }
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
void sdop_finish(SdOp *o) {
        if (o->finished)
                return;
        o->finished = true;
        sdop_stop(o);
        rr_op_complete(&o->op);
}

/* The op failed: push() returns nil, message, name (name may be NULL). */
void sdop_fail(SdOp *o, const char *name, const char *fmt, ...) {
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
void *sdop_new(size_t size, const SdOpType *type, Manager *m) {
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
int sdop_abandon(lua_State *L, SdOp *o, int r, const char *what) {
        sdop_release(&o->op);
        return rr_push_fail(L, -r, "%s: %s", what, strerror(-r));
}

/* sdop_new() for a Lua primitive: raises "out of memory" instead of returning NULL. */
void *sdop_new_or_raise(lua_State *L, size_t size, const SdOpType *type, Manager *m) {
        void *o = sdop_new(size, type, m);

        if (!o)
                luaL_error(L, "out of memory");
        return o;
}

/* A primitive ran out of memory filling in its op: free it and raise "out of memory". */
int sdop_raise_oom(lua_State *L, SdOp *o) {
        sdop_release(&o->op);
        return luaL_error(L, "out of memory");
}

/* Call a manager method asynchronously into o->calls[idx]; the reply goes to cb with o. The
 * arguments (of D-Bus signature `types`, NULL for none) are in ap. */
int sdop_callv(SdOp *o, unsigned idx, sd_bus_message_handler_t cb, uint64_t timeout_usec, const char *path,
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
int sdop_call(SdOp *o, unsigned idx, sd_bus_message_handler_t cb, uint64_t timeout_usec, const char *path,
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
int sdop_get_all(SdOp *o, sd_bus_message_handler_t cb, const char *path, const char *type_iface, unsigned *pending) {
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
int sdop_take_call(SdOp *o, sd_bus_message *reply) {
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
int sdop_set_timeout(SdOp *o, double seconds) {
        /* Safe inside the timer's own callback: sd-event keeps a source alive while it dispatches. */
        o->timer = sd_event_source_disable_unref(o->timer);
        if (seconds < 0)
                return 0;
        return sd_event_add_time(rr_loop_event(), &o->timer, CLOCK_MONOTONIC, rr_deadline_usec(seconds), 1000,
                                 sdop_timer_fired, o);
}

/* ---- the connection ---- */

/* JobRemoved(id, job, unit, result): keep it for a kept job, hand it to the ops waiting for jobs. */
static int on_job_removed(sd_bus_message *msg, void *userdata, sd_bus_error *ret_error) {
        Manager *m = userdata;
        const char *job, *unit, *result;
        JobRecord *kept;
        uint32_t id;

        (void) ret_error;
        if (sd_bus_message_read(msg, "uoss", &id, &job, &unit, &result) < 0)
                return 0;
        kept = manager_find_job(m, job);
        if (kept && !kept->result)
                kept->result = strdup(result); /* out of memory: a later wait says the result is lost */
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
                        *p++ = "0123456789abcdef"[c >> 4];
                        *p++ = "0123456789abcdef"[c & 15];
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
int manager_open(bool user, Manager **ret, char *err, size_t errsize) {
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
        e = bus_reply_error(reply);
        if (e)
                sdop_fail(&c->base, e->name, "%s failed: %s", c->what, bus_error_text(e));
        else
                sdop_finish(&c->base);
        return 0;
}

/* nil, "the connection to the ... manager was lost", "disconnected" */
int push_lost(lua_State *L, const Manager *m) {
        lua_pushnil(L);
        lua_pushfstring(L, "the connection to the %s manager was lost", manager_scope(m));
        lua_pushliteral(L, ERR_DISCONNECTED);
        return 3;
}

/* Start a CallOp: a manager method that answers with nothing we need. */
int start_call(lua_State *L, Manager *m, const char *what, uint64_t timeout_usec, const char *path,
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
