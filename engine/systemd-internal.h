/* rr.systemd's private header: what its files share.
 *
 *   systemd.c        the module (rr.systemd.user/system/remote) and the manager class
 *   systemd-unit.c   the unit class: handles, properties, waits, reset-failed, kill
 *   systemd-job.c    unit jobs (u:start, u:stop, ..., u:wait_job): the job op, its escalation
 *   systemd-ops.c    manager connections (local, and remote over ssh) and the op machinery every
 *                    request runs on
 *   systemd-bus.c    D-Bus values: to Lua, and as canonical text for comparisons
 *   systemd-run.c    m:run(): a command as a transient service unit, its output read as rr.proc's
 *
 * A manager connection (Manager) is one sd-bus connection attached to the sd-event loop and
 * subscribed to the manager's signals (Subscribe()). A remote one is the same connection carried
 * by ssh to systemd-stdio-bridge on the host (what `systemctl -H` does), its ssh process ours. Every request is an asynchronous method
 * call owned by an op (SdOp, an RrOp underneath): the calling task yields until the reply
 * arrives, or the JobRemoved signal of its job, or a PropertiesChanged signal that answers its
 * wait. Signals reach ops through three matches added once per connection, before the first
 * request goes out, so that a job that ends at once cannot be missed (one connection delivers in
 * order: the reply carrying the job path comes before the job's JobRemoved):
 *   - JobRemoved on the manager object: ops waiting for a job compare its object path;
 *   - PropertiesChanged under /org/freedesktop/systemd1/unit: ops watching a unit compare the
 *     object path;
 *   - the local Disconnected signal: every pending op fails.
 * Every pending op is on its manager's list, so that signals reach it and a close (or a lost
 * connection) fails it. A lost connection fails every op the same way, whichever noticed first:
 * sd-bus first answers each pending method call with a synthetic NoReply error while it closes,
 * then sends Disconnected; sdop_fail() sees that the bus is no longer open and says "lost". Cancellation (release() on a pending op) drops the op's call slots
 * (sd-bus forgets the reply) and its timer.
 *
 * A Lua primitive may leave its C function without returning: a raise is a longjmp, and so is
 * the yield in rr_op_await() when a task calls it (lua_yieldk() never returns to a C caller). So
 * a primitive reads and checks all of its arguments first (strings stay on the stack, where
 * reading them cannot raise), then creates its op, and holds nothing else across the await: no
 * _cleanup_ variable of its frame survives the yield (a method call message built there would
 * keep its bus alive forever). Messages are built in helpers that return first (sdop_callv()). */
#pragma once

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

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
#define ERR_LOST "ECONNRESET"          /* the connection dropped */
#define ERR_UNREACHABLE "EHOSTUNREACH" /* a remote manager could not be reached at all */
#define ERR_PARSE "bad-reply"

/* String equality. */
static inline bool streq(const char *a, const char *b) {
        return strcmp(a, b) == 0;
}

/* Is s one of the n strings of v? */
static inline bool strv_contains(char *const *v, size_t n, const char *s) {
        for (size_t i = 0; i < n; i++)
                if (streq(v[i], s))
                        return true;
        return false;
}

/* Frees n strings and their array; NULL is fine. */
static inline void strv_free(char **v, size_t n) {
        if (!v)
                return;
        for (size_t i = 0; i < n; i++)
                free(v[i]);
        free(v);
}

/* A unit type: its name suffix and its own D-Bus interface. */
typedef struct UnitType {
        const char *suffix;
        const char *iface;  /* the type's own D-Bus interface */
        bool has_result;    /* the interface has a Result property */
} UnitType;

typedef struct SdOp SdOp;

/* A job that systemd still ran when a caller stopped waiting for it (a timeout): its result,
 * once its JobRemoved comes, is kept for a later u:wait_job(). */
typedef struct JobRecord {
        struct JobRecord *next;
        char *job;    /* the job's object path */
        char *verb;   /* "start", "stop", ... for messages */
        char *result; /* from its JobRemoved; NULL while it runs */
} JobRecord;

/* The ssh process that carries a remote manager's connection (systemd-ops.c). */
typedef struct SshLink SshLink;

typedef struct Manager {
        unsigned n_ref;
        sd_bus *bus; /* NULL once closed */
        sd_bus_slot *job_removed, *props_changed, *disconnected;
        SdOp *ops;   /* every pending op */
        JobRecord *jobs;
        bool user;
        bool lost;   /* the connection dropped */
        char *host;  /* the ssh destination of a remote manager; NULL for this machine's */
        char *what;  /* "user manager", "system manager on web1": for messages */
        char *why;   /* once lost: what ssh or the bridge last said, or NULL */
        SshLink *ssh;
} Manager;

/* What differs between kinds of ops. */
typedef struct SdOpType {
        int (*push)(lua_State *L, SdOp *o); /* the results of an op that did not fail */
        void (*done)(SdOp *o);              /* frees the kind's own fields */
        void (*job_removed)(SdOp *o, const char *job, const char *result);
        void (*props_changed)(SdOp *o, sd_bus_message *msg);
        void (*timeout)(SdOp *o);
        void (*lost)(SdOp *o); /* the connection dropped: fail the op (default: "... was lost") */
} SdOpType;

struct SdOp {
        RrOp op;
        const SdOpType *type;
        Manager *m;                /* a reference */
        SdOp *prev, *next;         /* in m->ops while pending */
        bool linked, finished, failed, lost_seen;
        sd_bus_slot *calls[3];     /* method calls in flight */
        sd_event_source *timer;
        char *error, *error_name;  /* failed: push() returns nil, error, error_name */
};

/* A unit handle (rr.systemd.unit userdata). */
typedef struct Unit {
        Manager *m;  /* a reference */
        char *name;  /* as the caller named it */
        char *id;    /* the manager's name for it (an alias resolved) */
        char *path;  /* its object path */
        const UnitType *type;
} Unit;

/* ---- systemd-ops.c: connections ---- */

/* A new manager connection on the loop, with its signal matches added (before any call). On
 * failure *err says what was tried. */
int manager_open(bool user, Manager **ret, char *err, size_t errsize);

/* Where a remote manager is and how to reach it (strings borrowed for the call). */
typedef struct RemoteSpec {
        const char *host;       /* ssh destination: an alias, host, user@host */
        const char *ssh_config; /* ssh -F, or NULL */
        const char *bus_path;   /* the bridge's --bus-path (taken literally), or NULL: the default */
        bool user;              /* the user manager of the ssh user, else the system manager */
} RemoteSpec;

/* manager_open() for a manager on another host: starts ssh to systemd-stdio-bridge and the
 * connection's handshake, without waiting for either (the first call's answer says whether the
 * manager was reached). On failure *err says why; ENOENT when there is no ssh. */
int manager_open_remote(const RemoteSpec *spec, Manager **ret, char *err, size_t errsize);
/* "user" or "system", for messages. */
const char *manager_scope(const Manager *m);
/* "user manager", "system manager on web1": for messages. */
const char *manager_what(const Manager *m);
/* Has the connection dropped? Notices a bus that sd-bus is closing before its Disconnected. */
bool manager_is_lost(Manager *m);
/* Takes a reference (manager userdata, unit handles and ops each hold one). */
Manager *manager_ref(Manager *m);
/* Drops a reference; the last one closes and frees. Returns NULL. */
Manager *manager_unref(Manager *m);
/* Close the connection: pending ops fail, the bus leaves the loop. Idempotent. */
void manager_close(Manager *m);
/* Keep the result of job (of kind verb) when its JobRemoved comes (for manager_take_job()).
 * A job kept already stays as it is. 0 or -ENOMEM. */
int manager_keep_job(Manager *m, const char *job, const char *verb);
/* The record of a job kept by manager_keep_job(), taken off the manager (free it with
 * job_record_free()), or NULL. */
JobRecord *manager_take_job(Manager *m, const char *job);
/* Frees a record; NULL is fine. */
void job_record_free(JobRecord *r);

/* ---- systemd-ops.c: ops ---- */

/* A new op of `size` bytes (an SdOp first), pending on m; NULL on OOM. */
void *sdop_new(size_t size, const SdOpType *type, Manager *m);
/* sdop_new() for a Lua primitive: raises "out of memory" instead of returning NULL. */
void *sdop_new_or_raise(lua_State *L, size_t size, const SdOpType *type, Manager *m);
/* A primitive ran out of memory filling in its op: free it and raise "out of memory". */
int sdop_raise_oom(lua_State *L, SdOp *o);
/* A primitive could not start its op: free it and return nil, "<what>: <errno text>", ERRNO. */
int sdop_abandon(lua_State *L, SdOp *o, int r, const char *what);
/* The op has its outcome: stop waiting and wake the caller. */
void sdop_finish(SdOp *o);
/* The op failed: push() returns nil, message, name (name may be NULL). */
void sdop_fail(SdOp *o, const char *name, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Call a manager method asynchronously into o->calls[idx]; the reply goes to cb with o. The
 * arguments (of D-Bus signature `types`, NULL for none) are in ap. */
int sdop_callv(SdOp *o, unsigned idx, sd_bus_message_handler_t cb, uint64_t timeout_usec, const char *path,
               const char *iface, const char *member, const char *types, va_list ap);
/* sdop_callv() with the arguments given here. */
int sdop_call(SdOp *o, unsigned idx, sd_bus_message_handler_t cb, uint64_t timeout_usec, const char *path,
              const char *iface, const char *member, const char *types, ...);
/* GetAll() of the Unit interface into o->calls[0] and, when type_iface is not NULL, of the unit
 * type's into o->calls[1]; both replies go to cb. *pending: how many replies to wait for. */
int sdop_get_all(SdOp *o, sd_bus_message_handler_t cb, const char *path, const char *type_iface, unsigned *pending);
/* In a reply callback: which of o's calls this reply answers (its slot is dropped), or -1. */
int sdop_take_call(SdOp *o, sd_bus_message *reply);
/* Arm o's deadline (its type's timeout()), `seconds` from now (negative: none), in place of the
 * one it had. */
int sdop_set_timeout(SdOp *o, double seconds);

/* Start an op for a manager method that answers with nothing we need (daemon-reload,
 * reset-failed, kill): true | nil, "<what> failed: ...", code. */
int start_call(lua_State *L, Manager *m, const char *what, uint64_t timeout_usec, const char *path, const char *iface,
               const char *method, const char *types, ...);
/* nil, "the connection to the ... manager was lost[: why]", "ECONNRESET": 3. */
int push_lost(lua_State *L, const Manager *m);

/* ---- systemd-bus.c: D-Bus values ---- */

/* The error a reply carries, or NULL for a method return. */
const sd_bus_error *bus_reply_error(sd_bus_message *reply);
/* A D-Bus error's message, for humans. */
const char *bus_error_text(const sd_bus_error *e);
/* Push the value of property `name`, a variant at msg's read position: 1 or a negative errno. */
int bus_push_property(lua_State *L, sd_bus_message *msg, const char *name);
/* Drop what was pushed above top, then push nil, "cannot parse the properties of <name>: <errno
 * text>", "bad-reply" for the negative errno r: 3. */
int bus_push_props_error(lua_State *L, int top, const char *name, int r);
/* Push one table with the properties of every GetAll reply in replies (NULL entries skipped): 1.
 * When a reply cannot be parsed: nil, message, "bad-reply" (3), nothing else left. */
int bus_push_props(lua_State *L, sd_bus_message *const *replies, size_t n, const char *name, char *const *want,
                   size_t n_want);
/* Enter the next entry of a property array (a{sv}) and read its name: 1 with the value (a
 * variant) next, for the caller to read or skip before it exits the entry; 0 at the end of the
 * array; or a negative errno. */
int bus_props_next(sd_bus_message *msg, const char **name);
/* Find property `name` in a GetAll reply; its canonical text in *ret, or NULL when absent. */
int bus_find_canon(sd_bus_message *reply, const char *name, char **ret);
/* Can a Lua value be compared with a property (bus_canon_lua())? Strings, numbers, booleans. */
bool bus_comparable(lua_State *L, int idx);
/* The canonical text of a bus_comparable() Lua value given for a property. NULL on OOM. Never
 * raises. */
char *bus_canon_lua(lua_State *L, int idx);

/* ---- systemd.c: arguments ---- */

/* The open manager connection at idx; raises when it was closed. */
Manager *check_manager(lua_State *L, int idx);
/* An optional timeout in seconds at idx: -1 when absent. */
double opt_timeout(lua_State *L, int idx);
/* A string or a non-empty list of strings at idx, left on top of the stack: their count. */
size_t check_string_list(lua_State *L, int idx, const char *const *allowed, size_t n_allowed);
/* Copy the n strings at stack indices first.. into *ret; -ENOMEM on failure. Never raises. */
int copy_string_list(lua_State *L, int first, size_t n, char ***ret);
/* Creates the metatable `name` with meta-methods `meta` and methods `methods` (then, when not
 * NULL, those add_methods puts in the table on top) as __index. */
void new_class(lua_State *L, const char *name, const luaL_Reg *meta, const luaL_Reg *methods,
               void (*add_methods)(lua_State *L));

/* ---- systemd-unit.c ---- */

/* m:unit(name) -> unit | nil, err, code */
int unit_l_load(lua_State *L);
/* The unit handle at idx; raises when its manager was closed. */
Unit *check_unit(lua_State *L, int idx);
/* Creates the rr.systemd.unit class. */
void unit_class_new(lua_State *L);

/* ---- systemd-run.c ---- */

/* m:run(argv[, opts]) -> res | nil, message, CODE, res | nil, message, CODE */
int manager_l_run(lua_State *L);

/* ---- systemd-job.c ---- */

/* Adds u:start(), u:stop(), ... to the methods table on top. */
void add_job_methods(lua_State *L);
