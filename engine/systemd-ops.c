/* rr.systemd: manager connections and the ops every request runs on (see systemd-internal.h
 * for the shape). An op is pending on its manager until it has its outcome: its method calls,
 * its timer and the signals it waits for all end with sdop_finish() or sdop_fail(), which wake
 * the caller. */
#define _GNU_SOURCE
#include <assert.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include "systemd-internal.h"

extern char **environ;

static void ssh_link_free(SshLink *l);
static void manager_mark_lost(Manager *m);

/* "user" or "system", for messages. */
const char *manager_scope(const Manager *m) {
        return m->user ? "user" : "system";
}

/* "user manager", "system manager on web1": for messages. */
const char *manager_what(const Manager *m) {
        return m->what ? m->what : m->user ? "user manager" : "system manager";
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
                sdop_fail(m->ops, name, "the connection to the %s %s", manager_what(m), why);
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
        /* ssh would leave on its own once it reads the end of its input; no need to wait. */
        ssh_link_free(m->ssh);
        m->ssh = NULL;
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
        ssh_link_free(m->ssh); /* one that never got a bus */
        free(m->host);
        free(m->what);
        free(m->why);
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

/* The op failed: push() returns nil, message, name (name may be NULL). On a connection that
 * dropped, whatever the op was told, it fails as lost (see systemd-internal.h): its type's lost()
 * says how, else "the connection to the ... was lost". */
void sdop_fail(SdOp *o, const char *name, const char *fmt, ...) {
        va_list ap;

        if (o->finished)
                return;
        if (!o->lost_seen && manager_is_lost(o->m)) {
                Manager *m = o->m;
                o->lost_seen = true;
                if (o->type->lost)
                        o->type->lost(o);
                else
                        sdop_fail(o, ERR_LOST, "the connection to the %s was lost%s%s", manager_what(m),
                                  m->why ? ": " : "", m->why ? m->why : "");
                return;
        }
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

/* A primitive could not start its op: free it and return nil, "<what>: <errno text>", ERRNO; or
 * the lost connection's failure when that is why (a bus that sd-bus is closing refuses calls
 * before its Disconnected arrives). */
int sdop_abandon(lua_State *L, SdOp *o, int r, const char *what) {
        Manager *m = manager_ref(o->m);
        int n;

        sdop_release(&o->op);
        n = manager_is_lost(m) ? push_lost(L, m) : rr_push_fail(L, -r, "%s: %s", what, strerror(-r));
        manager_unref(m);
        return n;
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

/* The connection dropped (manager gone, daemon-reexec, ssh gone): fail every pending op. */
static int on_disconnected(sd_bus_message *msg, void *userdata, sd_bus_error *ret_error) {
        Manager *m = userdata;

        (void) msg;
        (void) ret_error;
        manager_mark_lost(m);
        manager_fail_all(m, ERR_LOST, "was lost");
        return 0;
}

/* Has the connection dropped? sd-bus closes a connection whose peer went away, then answers each
 * pending call with a synthetic error, then sends Disconnected: a bus no longer open is lost. A
 * connection we closed ourselves has no bus any more, and is not lost. */
bool manager_is_lost(Manager *m) {
        if (m->lost)
                return true;
        if (!m->bus || sd_bus_is_open(m->bus) > 0)
                return false;
        manager_mark_lost(m);
        return true;
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

/* Put m's connection on the loop and add its signal matches (before any call goes out). */
static int manager_attach(Manager *m) {
        _cleanup_(freep) char *match = NULL;
        sd_bus *bus = m->bus;
        const char *sender;
        int r;

        r = sd_bus_attach_event(bus, rr_loop_event(), SD_EVENT_PRIORITY_NORMAL);
        if (r < 0)
                return r;
        /* On a bus, only the manager's own signals; a direct connection has no sender names. */
        sender = sd_bus_is_bus_client(bus) > 0 ? SD_SERVICE : NULL;
        r = sd_bus_match_signal_async(bus, &m->job_removed, sender, SD_OBJECT, SD_MANAGER, "JobRemoved", on_job_removed,
                                      NULL, m);
        if (r < 0)
                return r;
        if (asprintf(&match,
                     "type='signal',%s%s%sinterface='" DBUS_PROPERTIES "',member='PropertiesChanged',"
                     "path_namespace='" SD_UNIT_PREFIX "'",
                     sender ? "sender='" : "", sender ? sender : "", sender ? "'," : "") < 0)
                return -ENOMEM;
        r = sd_bus_add_match_async(bus, &m->props_changed, match, on_props_changed, NULL, m);
        if (r < 0)
                return r;
        return sd_bus_match_signal_async(bus, &m->disconnected, DBUS_LOCAL, NULL, DBUS_LOCAL, "Disconnected",
                                         on_disconnected, NULL, m);
}

/* A new manager connection on the loop, with its signal matches added (before any call). */
int manager_open(bool user, Manager **ret, char *err, size_t errsize) {
        Manager *m;
        sd_bus *bus = NULL;
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
        r = manager_attach(m);
        if (r < 0) {
                snprintf(err, errsize, "cannot set up the connection: %s", strerror(-r));
                manager_unref(m);
                return r;
        }
        *ret = m;
        return 0;
}

/* ---- remote managers: the connection over ssh ---- */

/* What ssh (and the bridge, whose stderr ssh forwards) printed is kept for messages, at most
 * this much: the end, where the reason is. */
#define SSH_ERR_MAX 4096

struct SshLink {
        pid_t pid;
        sd_event_source *child;  /* owns the process: freeing it kills and reaps it */
        sd_event_source *err_io; /* ssh's stderr */
        int err_fd;
        char err[SSH_ERR_MAX + 1];
        size_t err_len;
        int exit_code, exit_signal;
        bool exited;
};

/* Read what ssh printed on stderr so far (non-blocking), keeping the last SSH_ERR_MAX bytes. At
 * the end of the pipe the source goes. */
static void ssh_read_err(SshLink *l) {
        char buf[1024];

        while (l->err_fd >= 0) {
                ssize_t n = read(l->err_fd, buf, sizeof buf);
                if (n < 0 && errno == EINTR)
                        continue;
                if (n < 0 && errno == EAGAIN)
                        return;
                if (n <= 0) {
                        l->err_io = sd_event_source_disable_unref(l->err_io);
                        close(l->err_fd);
                        l->err_fd = -1;
                        return;
                }
                /* sizeof buf < SSH_ERR_MAX: drop the oldest bytes to make room. */
                if (l->err_len + (size_t) n > SSH_ERR_MAX) {
                        size_t drop = l->err_len + (size_t) n - SSH_ERR_MAX;
                        memmove(l->err, l->err + drop, l->err_len - drop);
                        l->err_len -= drop;
                }
                memcpy(l->err + l->err_len, buf, (size_t) n);
                l->err_len += (size_t) n;
                l->err[l->err_len] = '\0';
        }
}

/* ssh's stderr has something. */
static int ssh_err_ready(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        (void) s;
        (void) fd;
        (void) revents;
        ssh_read_err(userdata);
        return 0;
}

/* ssh exited: keep how, for the message of a lost connection (its socket closes too, and sd-bus
 * says Disconnected). sd-event reaps it after this returns. */
static int ssh_exited(sd_event_source *s, const siginfo_t *si, void *userdata) {
        SshLink *l = userdata;

        (void) s;
        l->exited = true;
        if (si->si_code == CLD_EXITED)
                l->exit_code = si->si_status;
        else
                l->exit_signal = si->si_status;
        return 0;
}

/* Kill ssh if it still runs, reap it, close its stderr. NULL is fine. */
static void ssh_link_free(SshLink *l) {
        if (!l)
                return;
        l->err_io = sd_event_source_disable_unref(l->err_io);
        if (l->err_fd >= 0)
                close(l->err_fd);
        if (l->child)
                l->child = sd_event_source_unref(l->child); /* SIGKILL and waitid() when it runs */
        else if (l->pid > 0) {
                (void) kill(l->pid, SIGKILL);
                (void) waitpid(l->pid, NULL, 0);
        }
        free(l);
}

/* The reason a remote connection dropped, from what ssh said: its last non-empty line (ssh's own
 * "Connection closed by ...", or the bridge's "Failed to connect to bus: ..."), else how ssh
 * ended. NULL when nothing is known (yet). */
static char *ssh_why(SshLink *l) {
        char *end = l->err + l->err_len, *line, *p;
        char *out = NULL;

        while (end > l->err && (end[-1] == '\n' || end[-1] == '\r' || end[-1] == ' '))
                end--;
        if (end > l->err) {
                line = end;
                while (line > l->err && line[-1] != '\n')
                        line--;
                out = strndup(line, (size_t) (end - line));
                /* Control characters (a \r inside the line) are no help in a message. */
                for (p = out; p && *p; p++)
                        if ((unsigned char) *p < 0x20)
                                *p = ' ';
                return out;
        }
        /* ssh's own failures exit 255; a client of a shared connection (ControlMaster) says nothing
         * when the master gives up on the host: its own stderr is gone. */
        /* out of memory: NULL, and the caller says less */
        if (l->exited && l->exit_signal) {
                if (asprintf(&out, "ssh was killed by signal %d", l->exit_signal) < 0)
                        out = NULL;
        } else if (l->exited && l->exit_code == 255)
                out = strdup("ssh exited with code 255 (its connection failed or was closed)");
        else if (l->exited) {
                if (asprintf(&out, "ssh exited with code %d", l->exit_code) < 0)
                        out = NULL;
        }
        return out;
}

/* The connection dropped: remember it and, for a remote one, why (what ssh printed so far). */
static void manager_mark_lost(Manager *m) {
        if (m->lost)
                return;
        m->lost = true;
        if (m->ssh) {
                ssh_read_err(m->ssh);
                free(m->why);
                m->why = ssh_why(m->ssh); /* NULL on OOM too: the message then says less */
        }
}

/* `s` quoted for the remote POSIX shell that runs ssh's command line: in single quotes, a ' as
 * '\''. NULL on OOM. */
static char *shell_quote(const char *s) {
        size_t n = 3;
        char *out, *p;

        for (const char *c = s; *c; c++)
                n += *c == '\'' ? 4 : 1;
        out = malloc(n);
        if (!out)
                return NULL;
        p = out;
        *p++ = '\'';
        for (const char *c = s; *c; c++) {
                if (*c == '\'') {
                        memcpy(p, "'\\''", 4);
                        p += 4;
                } else
                        *p++ = *c;
        }
        *p++ = '\'';
        *p = '\0';
        return out;
}

/* The bridge's bus for a user manager when none is given: the user's bus, found on the host by
 * its shell (the runtime directory is only known there: pam_systemd sets $XDG_RUNTIME_DIR, and
 * /run/user/UID is where systemd puts it). */
#define REMOTE_USER_BUS "--bus-path=unix:path=\"${XDG_RUNTIME_DIR:-/run/user/$(id -u)}\"/bus"

/* ssh's argv for spec: ssh [-F CONFIG] -x -T -o BatchMode=yes -- HOST SYSTEMD_LOG_TARGET=console
 * systemd-stdio-bridge [--bus-path=...]. ssh joins the words after HOST into one command line for the remote shell:
 * the bus path given is quoted for it. *bus_arg is the one string allocated here. */
static int ssh_argv(const RemoteSpec *spec, const char *argv[static 13], char **bus_arg) {
        size_t n = 0;

        *bus_arg = NULL;
        argv[n++] = "ssh";
        if (spec->ssh_config) {
                argv[n++] = "-F";
                argv[n++] = spec->ssh_config;
        }
        /* No X11, no terminal: the session carries D-Bus bytes. BatchMode: never a password
         * prompt, which nobody would see (several connections may open at once). */
        argv[n++] = "-x";
        argv[n++] = "-T";
        argv[n++] = "-o";
        argv[n++] = "BatchMode=yes";
        argv[n++] = "--";
        argv[n++] = spec->host;
        /* systemd tools log to the journal when stderr is no terminal: the bridge's reason for
         * failing (no such bus) would never reach us. */
        argv[n++] = "SYSTEMD_LOG_TARGET=console";
        argv[n++] = "systemd-stdio-bridge";
        if (spec->bus_path) {
                _cleanup_(freep) char *q = shell_quote(spec->bus_path);
                if (!q || asprintf(bus_arg, "--bus-path=%s", q) < 0)
                        return -ENOMEM;
                argv[n++] = *bus_arg;
        } else if (spec->user)
                argv[n++] = REMOTE_USER_BUS;
        argv[n] = NULL;
        return 0;
}

/* Start ssh with one end of a socket pair on its stdin and stdout (the bus connection) and a
 * pipe on its stderr; in a process group of its own (the terminal's Ctrl-C is the engine's to
 * handle), with a clean signal mask and no other descriptor. Returns 0 or a negative errno. */
static int ssh_spawn(const char *const *argv, pid_t *pid, int *sock, int *err_fd) {
        _cleanup_(closep) int s0 = -1, s1 = -1, e0 = -1, e1 = -1;
        posix_spawn_file_actions_t fa;
        posix_spawnattr_t attr;
        sigset_t none, all;
        int sv[2], ep[2], r;

        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
                return -errno;
        s0 = sv[0];
        s1 = sv[1];
        if (pipe2(ep, O_CLOEXEC) < 0)
                return -errno;
        e0 = ep[0];
        e1 = ep[1];
        if (fcntl(e0, F_SETFL, O_NONBLOCK) < 0)
                return -errno;

        sigemptyset(&none);
        sigfillset(&all);
        r = posix_spawnattr_init(&attr);
        if (r != 0)
                return -r;
        r = posix_spawn_file_actions_init(&fa);
        if (r != 0) {
                posix_spawnattr_destroy(&attr);
                return -r;
        }
        /* dup2() clears close-on-exec on the copies the child keeps. */
        if ((r = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF |
                                                         POSIX_SPAWN_SETPGROUP)) == 0 &&
            (r = posix_spawnattr_setsigmask(&attr, &none)) == 0 &&
            (r = posix_spawnattr_setsigdefault(&attr, &all)) == 0 &&
            (r = posix_spawnattr_setpgroup(&attr, 0)) == 0 &&
            (r = posix_spawn_file_actions_adddup2(&fa, s1, STDIN_FILENO)) == 0 &&
            (r = posix_spawn_file_actions_adddup2(&fa, s1, STDOUT_FILENO)) == 0 &&
            (r = posix_spawn_file_actions_adddup2(&fa, e1, STDERR_FILENO)) == 0 &&
            (r = posix_spawn_file_actions_addclosefrom_np(&fa, 3)) == 0)
                r = posix_spawnp(pid, argv[0], &fa, &attr, (char *const *) argv, environ);
        posix_spawn_file_actions_destroy(&fa);
        posix_spawnattr_destroy(&attr);
        if (r != 0)
                return -r;
        *sock = s0;
        *err_fd = e0;
        s0 = e0 = -1;
        return 0;
}

/* A bus client connection on an ssh socket: Hello and our calls go out once the bridge answers
 * the authentication (sd_bus_start() does not wait for it). Takes sock in every case. */
static int bus_open_fd(int sock, const char *description, sd_bus **ret) {
        _cleanup_(sd_bus_close_unrefp) sd_bus *bus = NULL;
        int r;

        r = sd_bus_new(&bus);
        if (r < 0) {
                close(sock);
                return r;
        }
        r = sd_bus_set_fd(bus, sock, sock);
        if (r < 0) {
                close(sock);
                return r;
        }
        /* Through the bridge we talk to a bus (Hello, matches with a sender), as sd_bus_open_system_remote()
         * does; no descriptors cross ssh. */
        if ((r = sd_bus_set_bus_client(bus, 1)) < 0 || (r = sd_bus_negotiate_fds(bus, 0)) < 0)
                return r;
        (void) sd_bus_set_description(bus, description);
        r = sd_bus_start(bus);
        if (r < 0)
                return r;
        *ret = bus;
        bus = NULL;
        return 0;
}

/* A manager on another host, through ssh to systemd-stdio-bridge (see systemd-internal.h). */
int manager_open_remote(const RemoteSpec *spec, Manager **ret, char *err, size_t errsize) {
        _cleanup_(freep) char *bus_arg = NULL;
        const char *argv[13];
        Manager *m;
        SshLink *l;
        int sock = -1, r;

        m = calloc(1, sizeof *m);
        l = calloc(1, sizeof *l);
        if (!m || !l) {
                free(m);
                free(l);
                snprintf(err, errsize, "out of memory");
                return -ENOMEM;
        }
        m->n_ref = 1;
        m->user = spec->user;
        m->ssh = l;
        l->err_fd = -1;
        m->host = strdup(spec->host);
        if (!m->host || asprintf(&m->what, "%s manager on %s", spec->user ? "user" : "system", spec->host) < 0) {
                m->what = NULL;
                r = -ENOMEM;
                goto fail;
        }
        r = ssh_argv(spec, argv, &bus_arg);
        if (r < 0)
                goto fail;
        r = ssh_spawn(argv, &l->pid, &sock, &l->err_fd);
        if (r < 0) {
                snprintf(err, errsize, "cannot run ssh: %s", strerror(-r));
                manager_unref(m);
                return r;
        }
        /* From here on the child is ours to kill and reap: the source does both when freed. */
        r = sd_event_add_child(rr_loop_event(), &l->child, l->pid, WEXITED, ssh_exited, l);
        if (r >= 0 && (r = sd_event_source_set_child_process_own(l->child, 1)) < 0)
                l->child = sd_event_source_unref(l->child); /* ssh_link_free() then kills and reaps it */
        if (r >= 0)
                r = sd_event_add_io(rr_loop_event(), &l->err_io, l->err_fd, EPOLLIN, ssh_err_ready, l);
        if (r < 0) {
                close(sock);
                goto fail;
        }
        r = bus_open_fd(sock, m->what, &m->bus);
        if (r < 0)
                goto fail;
        r = manager_attach(m);
        if (r < 0)
                goto fail;
        *ret = m;
        return 0;

fail:
        snprintf(err, errsize, "cannot set up the connection: %s", strerror(-r));
        manager_unref(m); /* kills ssh */
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

/* nil, "the connection to the ... manager was lost[: why]", "ECONNRESET" */
int push_lost(lua_State *L, const Manager *m) {
        lua_pushnil(L);
        lua_pushfstring(L, "the connection to the %s was lost%s%s", manager_what(m), m->why ? ": " : "",
                        m->why ? m->why : "");
        lua_pushliteral(L, ERR_LOST);
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
