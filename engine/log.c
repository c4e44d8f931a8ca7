/* rr.log: the JSONL event log. One event is one JSON object on one line, appended with one
 * write() on an O_APPEND descriptor, so that lines from concurrent writers never interleave;
 * optionally mirrored to the journal with structured fields.
 *
 * Values are encoded by a private lua-cjson instance (cjson.new(), so that a plan changing the
 * global cjson's settings does not change the log), configured never to raise on sparse arrays
 * and to write NaN and infinities as null. The line is assembled here, field by field, in a
 * fixed order: ts, event, run, service, unit, then the other keys sorted, which makes lines easy
 * to read and diff and keeps top-level integers exact (cjson prints every number with %.14g). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <syslog.h>
#include <time.h>

/* No CODE_FILE/CODE_LINE/CODE_FUNC of this file on every event: they would say nothing. */
#define SD_JOURNAL_SUPPRESS_LOCATION
#include <systemd/sd-journal.h>

#include "rr.h"

#define LOG_MT "rr.log.file"
#define DEFAULT_FILE_MODE 0640
#define PARENT_DIR_MODE 0750
#define SUMMARY_MAX 240

/* Keys that come first on every line, in this order. */
static const char *const leading_keys[] = { "ts", "event", "run", "service", "unit" };

typedef struct LogFile {
        int fd;       /* -1 once closed */
        bool journal; /* mirror every event to the journal */
        bool torn;    /* a short write left a line without its newline */
} LogFile;

/* The upvalue every method has: the private cjson encode function. */
#define ENCODE_IDX lua_upvalueindex(1)

/* RFC 3339 UTC with milliseconds from CLOCK_REALTIME: 2026-11-25T03:14:09.123Z */
static void format_timestamp(char buf[static 32]) {
        struct timespec ts;
        struct tm tm;

        clock_gettime(CLOCK_REALTIME, &ts);
        gmtime_r(&ts.tv_sec, &tm);
        strftime(buf, 32, "%Y-%m-%dT%H:%M:%S", &tm);
        snprintf(buf + 19, 13, ".%03dZ", (int) (ts.tv_nsec / 1000000));
}

/* Create the parent directories of path, if it has any. */
static int make_parents(const char *path) {
        _cleanup_(freep) char *dir = strdup(path);
        char *slash;

        if (!dir)
                return -ENOMEM;
        slash = strrchr(dir, '/');
        if (!slash || slash == dir)
                return 0;
        *slash = '\0';
        return rr_mkdir_p(dir, PARENT_DIR_MODE);
}

/* Open the log file: append-only, never through a symlink, only a regular file. O_NONBLOCK
 * keeps open() from waiting on a FIFO put there; it is cleared once we know the type. */
static int open_log(const char *path, mode_t mode) {
        _cleanup_(closep) int fd = -1;
        struct stat st;
        int flags, r;

        fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK, mode);
        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0)
                return -errno;
        if (!S_ISREG(st.st_mode))
                return -EINVAL;
        flags = fcntl(fd, F_GETFL);
        if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0)
                return -errno;
        r = fd;
        fd = -1;
        return r;
}

static LogFile *check_file(lua_State *L, int idx) {
        return luaL_checkudata(L, idx, LOG_MT);
}

static LogFile *check_open_file(lua_State *L, int idx) {
        LogFile *f = check_file(L, idx);
        if (f->fd < 0)
                luaL_error(L, "attempt to use a closed log file");
        return f;
}

/* log.open(path [, {mode=0640, journal=false}]) -> file | nil, err, code */
static int log_open(lua_State *L) {
        size_t len;
        const char *path = luaL_checklstring(L, 1, &len);
        mode_t mode = DEFAULT_FILE_MODE;
        bool journal = false;
        LogFile *f;
        int r;

        luaL_argcheck(L, len > 0 && strlen(path) == len, 1, "path is empty or contains a NUL byte");
        if (!lua_isnoneornil(L, 2)) {
                luaL_checktype(L, 2, LUA_TTABLE);
                if (lua_getfield(L, 2, "mode") != LUA_TNIL) {
                        long long m = rr_to_mode(L, -1);
                        if (m < 0)
                                return luaL_error(L, "bad option 'mode' (an integer such as tonumber(\"640\", 8), "
                                                     "or an octal string such as \"0640\")");
                        mode = (mode_t) m;
                }
                lua_pop(L, 1);
                lua_getfield(L, 2, "journal");
                journal = lua_toboolean(L, -1);
                lua_pop(L, 1);
        }

        f = lua_newuserdatauv(L, sizeof *f, 1); /* closed until open() succeeds */
        f->fd = -1;
        f->journal = journal;
        f->torn = false;
        luaL_setmetatable(L, LOG_MT);
        lua_pushvalue(L, 1);
        lua_setiuservalue(L, -2, 1);

        r = make_parents(path);
        if (r < 0)
                return rr_push_fail(L, -r, "cannot create the directory of %s: %s", path, strerror(-r));
        r = open_log(path, mode);
        if (r == -ELOOP)
                return rr_push_fail(L, ELOOP, "cannot open log %s: it is a symbolic link", path);
        if (r == -EINVAL)
                return rr_push_fail(L, EINVAL, "cannot open log %s: not a regular file", path);
        if (r < 0)
                return rr_push_fail(L, -r, "cannot open log %s: %s", path, strerror(-r));
        f->fd = r;
        return 1;
}

/* Protected: encode(value) -> JSON text, with values cjson refuses (functions, userdata,
 * threads) written as their tostring(). Arguments: encode, value. */
static int encode_value(lua_State *L) {
        switch (lua_type(L, 2)) {
        case LUA_TFUNCTION:
        case LUA_TUSERDATA:
        case LUA_TTHREAD:
                luaL_tolstring(L, 2, NULL); /* encode value str */
                lua_replace(L, 2);
                break;
        default:
                break;
        }
        lua_call(L, 1, 1);
        return 1;
}

/* Push the JSON text of the value at idx (integers printed here, exactly); raises with the
 * field's name when it cannot be encoded. */
static void push_json(lua_State *L, int idx, int encode_idx, const char *key) {
        idx = lua_absindex(L, idx);
        if (lua_isinteger(L, idx)) {
                lua_pushfstring(L, "%I", (LUAI_UACINT) lua_tointeger(L, idx));
                return;
        }
        lua_pushcfunction(L, encode_value);
        lua_pushvalue(L, encode_idx);
        lua_pushvalue(L, idx);
        if (lua_pcall(L, 2, 1, 0) != LUA_OK)
                luaL_error(L, "field '%s': %s", key, lua_tostring(L, -1));
}

static bool is_leading_key(const char *k) {
        for (size_t i = 0; i < ELEMENTSOF(leading_keys); i++)
                if (strcmp(k, leading_keys[i]) == 0)
                        return true;
        return false;
}

/* Protected, with the encoder as upvalue 1: event_line(event) -> line (with its newline), copy,
 * keys. The copy has string keys only and a ts; keys lists them in line order. Raises on a key
 * that is neither a string nor a number, or on a value cjson cannot encode (a cycle, a function
 * inside a nested table). */
static int event_line(lua_State *L) {
        const int event = 1, copy = 2, names_idx = 3, keys = 4, parts = 5;
        lua_Integer n = 0, k = 0;
        char ts[32];
        RrName *names;

        luaL_checktype(L, event, LUA_TTABLE);
        lua_settop(L, event);
        lua_newtable(L); /* event copy */
        lua_pushnil(L);
        while (lua_next(L, event)) { /* event copy key value */
                switch (lua_type(L, -2)) {
                case LUA_TSTRING:
                        lua_pushvalue(L, -2);
                        break;
                case LUA_TNUMBER:
                        /* its text, without converting the key lua_next needs */
                        lua_pushvalue(L, -2);
                        lua_pushstring(L, lua_tostring(L, -1));
                        lua_remove(L, -2);
                        break;
                default:
                        return luaL_error(L, "event keys must be strings (found a %s key)", luaL_typename(L, -2));
                }
                lua_insert(L, -2);   /* event copy key skey value */
                lua_rawset(L, copy); /* event copy key */
        }
        if (lua_getfield(L, copy, "ts") == LUA_TNIL) {
                format_timestamp(ts);
                lua_pushstring(L, ts);
                lua_setfield(L, copy, "ts");
        }
        lua_pop(L, 1);

        /* The keys that do not lead, sorted bytewise; the copy keeps the strings alive. */
        lua_pushnil(L);
        while (lua_next(L, copy)) {
                lua_pop(L, 1);
                n++;
        }
        names = lua_newuserdatauv(L, (size_t) n * sizeof(RrName) + 1, 0); /* event copy names */
        n = 0;
        lua_pushnil(L);
        while (lua_next(L, copy)) {
                lua_pop(L, 1);
                if (!is_leading_key(lua_tostring(L, -1))) {
                        names[n].s = lua_tolstring(L, -1, &names[n].len);
                        n++;
                }
        }
        qsort(names, (size_t) n, sizeof(RrName), rr_name_cmp);

        lua_createtable(L, (int) n + (int) ELEMENTSOF(leading_keys), 0); /* event copy names keys */
        for (size_t i = 0; i < ELEMENTSOF(leading_keys); i++) {
                bool present = lua_getfield(L, copy, leading_keys[i]) != LUA_TNIL;
                lua_pop(L, 1);
                if (present) {
                        lua_pushstring(L, leading_keys[i]);
                        lua_rawseti(L, keys, ++k);
                }
        }
        for (lua_Integer i = 0; i < n; i++) {
                lua_pushlstring(L, names[i].s, names[i].len);
                lua_rawseti(L, keys, ++k);
        }

        /* Each field as "key":value in a parts list, then one buffer over the parts (nothing
         * else may sit on the stack between buffer operations). */
        lua_createtable(L, (int) k, 0); /* event copy names keys parts */
        for (lua_Integer i = 1; i <= k; i++) {
                const char *key;
                lua_rawgeti(L, keys, i);                   /* ... key */
                key = lua_tostring(L, -1);
                push_json(L, -1, lua_upvalueindex(1), key); /* ... key jkey */
                lua_pushliteral(L, ":");
                lua_getfield(L, copy, key);
                push_json(L, -1, lua_upvalueindex(1), key); /* ... key jkey ":" value jvalue */
                lua_remove(L, -2);
                lua_concat(L, 3);                          /* ... key part */
                lua_rawseti(L, parts, i);
                lua_pop(L, 1);
        }
        {
                luaL_Buffer b;
                luaL_buffinit(L, &b);
                luaL_addchar(&b, '{');
                for (lua_Integer i = 1; i <= k; i++) {
                        if (i > 1)
                                luaL_addchar(&b, ',');
                        lua_rawgeti(L, parts, i);
                        luaL_addvalue(&b);
                }
                luaL_addstring(&b, "}\n");
                luaL_pushresult(&b); /* event copy names keys parts line */
        }
        lua_replace(L, names_idx); /* event copy line keys parts */
        lua_pop(L, 1);             /* event copy line keys */
        lua_rotate(L, copy, -1);   /* event line keys copy */
        lua_rotate(L, 3, 1);       /* event line copy keys */
        return 3;
}

/* A journal field name for an event key: event/run/service get the RRENGINE_ prefix, unit is
 * UNIT, others are upper-cased with [^A-Z0-9_] as "_"; NULL for names journald would refuse
 * or that would clash with the fields set here. buf holds 64 bytes + NUL. */
static const char *journal_field(const char *key, char buf[static 65]) {
        static const char *const reserved[] = { "MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER",
                                                "CODE_FILE", "CODE_LINE", "CODE_FUNC", "ERRNO" };
        size_t n = 0;

        if (strcmp(key, "event") == 0)
                return "RRENGINE_EVENT";
        if (strcmp(key, "run") == 0)
                return "RRENGINE_RUN";
        if (strcmp(key, "service") == 0)
                return "RRENGINE_SERVICE";
        if (strcmp(key, "unit") == 0)
                return "UNIT";
        if (strcmp(key, "ts") == 0)
                return NULL; /* the journal has its own */
        for (const char *p = key; *p; p++) {
                char c = *p;
                if (n == 64)
                        return NULL;
                if (c >= 'a' && c <= 'z')
                        c = (char) (c - 'a' + 'A');
                else if (!((c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')))
                        c = '_';
                buf[n++] = c;
        }
        buf[n] = '\0';
        if (n == 0 || buf[0] == '_' || (buf[0] >= '0' && buf[0] <= '9') || strncmp(buf, "RRENGINE_", 9) == 0)
                return NULL;
        for (size_t i = 0; i < ELEMENTSOF(reserved); i++)
                if (strcmp(buf, reserved[i]) == 0)
                        return NULL;
        return buf;
}

/* The text of the scalar (string, number, boolean) at idx, or NULL. A string is returned as is:
 * it must be anchored elsewhere (here: in the event copy) to outlive its stack slot; numbers
 * are formatted into buf. */
static const char *scalar_text(lua_State *L, int idx, char buf[static 64]) {
        switch (lua_type(L, idx)) {
        case LUA_TSTRING:
                return lua_tostring(L, idx);
        case LUA_TNUMBER:
                if (lua_isinteger(L, idx))
                        snprintf(buf, 64, LUA_INTEGER_FMT, (LUAI_UACINT) lua_tointeger(L, idx));
                else
                        snprintf(buf, 64, LUA_NUMBER_FMT, (LUAI_UACNUMBER) lua_tonumber(L, idx));
                return buf;
        case LUA_TBOOLEAN:
                return lua_toboolean(L, idx) ? "true" : "false";
        default:
                return NULL;
        }
}

/* Protected: send the event to the journal. Arguments: copy, keys (from event_line). Its
 * outcome is ignored: a journal failure never fails emit(). */
static int journal_send(lua_State *L) {
        const int copy = 1, keys = 2;
        lua_Integer nkeys = (lua_Integer) lua_rawlen(L, keys);
        const char *event, *service, *detail = NULL;
        char field[65], num[64];
        int priority = LOG_INFO;
        struct iovec *iov;
        size_t niov = 0;

        luaL_checkstack(L, (int) nkeys + 16, "too many event fields");
        iov = lua_newuserdatauv(L, (size_t) (nkeys + 4) * sizeof(struct iovec), 0);

        lua_getfield(L, copy, "event");
        event = scalar_text(L, -1, num);
        event = lua_pushstring(L, event ? event : "event"); /* anchored on the stack */
        lua_getfield(L, copy, "service");
        service = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        if (lua_getfield(L, copy, "error") != LUA_TNIL) {
                detail = luaL_tolstring(L, -1, NULL);
                priority = LOG_ERR;
        } else if (lua_getfield(L, copy, "message") == LUA_TSTRING)
                detail = lua_tostring(L, -1);
        if (!detail) {
                /* A summary: key=value of the scalar fields not already in the head. */
                luaL_Buffer b;
                luaL_buffinit(L, &b);
                for (lua_Integer i = 1; i <= nkeys && luaL_bufflen(&b) < SUMMARY_MAX; i++) {
                        const char *k, *v;
                        lua_rawgeti(L, keys, i);
                        k = lua_tostring(L, -1);
                        lua_pop(L, 1); /* the keys table keeps k */
                        if (is_leading_key(k))
                                continue;
                        lua_getfield(L, copy, k);
                        v = scalar_text(L, -1, num);
                        lua_pop(L, 1); /* the copy keeps a string v */
                        if (!v)
                                continue;
                        if (luaL_bufflen(&b) > 0)
                                luaL_addchar(&b, ' ');
                        luaL_addstring(&b, k);
                        luaL_addchar(&b, '=');
                        luaL_addstring(&b, v);
                }
                luaL_pushresult(&b);
                detail = lua_tostring(L, -1);
        }
        if (strlen(event) > 7 && strcmp(event + strlen(event) - 7, "_FAILED") == 0)
                priority = LOG_ERR;
        else if (priority == LOG_INFO && strncmp(event, "ROLLBACK_", 9) == 0)
                priority = LOG_WARNING;

        /* Every string pushed below stays on the stack until sd_journal_sendv() returns. */
        lua_pushfstring(L, "MESSAGE=%s%s%s%s%s", event, service ? " " : "", service ? service : "",
                        *detail ? ": " : "", detail);
        iov[niov++] = (struct iovec) { (void *) lua_tostring(L, -1), lua_rawlen(L, -1) };
        lua_pushfstring(L, "PRIORITY=%d", priority);
        iov[niov++] = (struct iovec) { (void *) lua_tostring(L, -1), lua_rawlen(L, -1) };
        lua_pushliteral(L, "SYSLOG_IDENTIFIER=rrengine");
        iov[niov++] = (struct iovec) { (void *) lua_tostring(L, -1), lua_rawlen(L, -1) };

        for (lua_Integer i = 1; i <= nkeys; i++) {
                const char *k, *name, *v;
                lua_rawgeti(L, keys, i);
                k = lua_tostring(L, -1);
                lua_pop(L, 1);
                name = journal_field(k, field);
                if (!name)
                        continue;
                lua_getfield(L, copy, k);
                v = scalar_text(L, -1, num);
                lua_pop(L, 1);
                if (!v)
                        continue;
                lua_pushfstring(L, "%s=%s", name, v);
                iov[niov++] = (struct iovec) { (void *) lua_tostring(L, -1), lua_rawlen(L, -1) };
        }
        (void) sd_journal_sendv(iov, (int) niov); /* no journal: the file still has the event */
        return 0;
}

/* Write the whole line with one write(): O_APPEND makes that one atomic append. Returns 0,
 * the count written on a short write (> 0), or a negative errno. */
static ssize_t write_line(int fd, const char *s, size_t n) {
        ssize_t k;

        do
                k = write(fd, s, n);
        while (k < 0 && errno == EINTR);
        if (k < 0)
                return -errno;
        return (size_t) k == n ? 0 : (k == 0 ? -EIO : k);
}

/* f:emit(event) -> true, line | nil, err, code */
static int file_emit(lua_State *L) {
        LogFile *f = check_open_file(L, 1);
        const char *line;
        size_t len;
        ssize_t w;

        luaL_checktype(L, 2, LUA_TTABLE);
        lua_settop(L, 2);

        lua_pushvalue(L, ENCODE_IDX);
        lua_pushcclosure(L, event_line, 1); /* f event event_line */
        lua_pushvalue(L, 2);
        if (lua_pcall(L, 1, 3, 0) != LUA_OK) /* f event line copy keys | f event msg */
                return rr_push_fail(L, EINVAL, "cannot encode event: %s", lua_tostring(L, -1));
        line = lua_tolstring(L, 3, &len);

        if (f->journal) {
                lua_pushcfunction(L, journal_send);
                lua_pushvalue(L, 4);
                lua_pushvalue(L, 5);
                if (lua_pcall(L, 2, 0, 0) != LUA_OK)
                        lua_pop(L, 1); /* a journal failure never fails emit */
        }

        /* A line torn by an earlier short write gets its end first, so this one starts on a
         * line of its own (once the disk has room again). */
        if (f->torn) {
                w = write_line(f->fd, "\n", 1);
                if (w < 0) {
                        lua_getiuservalue(L, 1, 1);
                        return rr_push_fail(L, (int) -w, "cannot write to %s: %s", lua_tostring(L, -1),
                                            strerror((int) -w));
                }
                f->torn = false;
        }
        w = write_line(f->fd, line, len);
        if (w > 0) {
                /* Short write (disk full, file size limit): end the partial line so the next
                 * ones stay readable, and report why if the kernel says. */
                ssize_t r = write_line(f->fd, "\n", 1);
                int e = r < 0 ? (int) -r : EIO;
                f->torn = r != 0;
                lua_getiuservalue(L, 1, 1);
                return rr_push_fail(L, e, "short write to %s (%zd of %zu bytes): %s", lua_tostring(L, -1), w, len,
                                    strerror(e));
        }
        if (w < 0) {
                lua_getiuservalue(L, 1, 1);
                return rr_push_fail(L, (int) -w, "cannot write to %s: %s", lua_tostring(L, -1), strerror((int) -w));
        }
        lua_pushboolean(L, 1);
        lua_pushlstring(L, line, len - 1); /* without the newline */
        return 2;
}

/* f:sync() -> true | nil, err, code */
static int file_sync(lua_State *L) {
        LogFile *f = check_open_file(L, 1);

        if (fsync(f->fd) < 0) {
                int e = errno;
                lua_getiuservalue(L, 1, 1);
                return rr_push_fail(L, e, "cannot fsync %s: %s", lua_tostring(L, -1), strerror(e));
        }
        lua_pushboolean(L, 1);
        return 1;
}

/* f:close() -> true | nil, err, code; also __gc and __close (idempotent). */
static int file_close(lua_State *L) {
        LogFile *f = check_file(L, 1);
        int fd = f->fd;

        f->fd = -1;
        if (fd >= 0 && close(fd) < 0 && errno != EINTR) {
                int e = errno;
                lua_getiuservalue(L, 1, 1);
                return rr_push_fail(L, e, "cannot close %s: %s", lua_tostring(L, -1), strerror(e));
        }
        lua_pushboolean(L, 1);
        return 1;
}

/* f:path() */
static int file_path(lua_State *L) {
        check_file(L, 1);
        lua_getiuservalue(L, 1, 1);
        return 1;
}

static int file_tostring(lua_State *L) {
        LogFile *f = check_file(L, 1);
        lua_getiuservalue(L, 1, 1);
        lua_pushfstring(L, "rr.log.file %s (%s)", lua_tostring(L, -1), f->fd >= 0 ? "open" : "closed");
        return 1;
}

/* log.timestamp() -> "2026-11-25T03:14:09.123Z" */
static int log_timestamp(lua_State *L) {
        char ts[32];
        format_timestamp(ts);
        lua_pushstring(L, ts);
        return 1;
}

static const luaL_Reg file_methods[] = {
        { "emit", file_emit },
        { "sync", file_sync },
        { "close", file_close },
        { "path", file_path },
        { NULL, NULL },
};

static const luaL_Reg file_meta[] = {
        { "__gc", file_close },
        { "__close", file_close },
        { "__tostring", file_tostring },
        { NULL, NULL },
};

static const luaL_Reg log_functions[] = {
        { "open", log_open },
        { "timestamp", log_timestamp },
        { NULL, NULL },
};

/* Pushes the encode function of a private cjson instance set up for logging. */
static void push_encoder(lua_State *L) {
        lua_getglobal(L, "require");
        lua_pushliteral(L, "cjson");
        lua_call(L, 1, 1);            /* cjson */
        lua_getfield(L, -1, "new");
        lua_call(L, 0, 1);            /* cjson inst */
        lua_getfield(L, -1, "encode_sparse_array");
        lua_pushboolean(L, 1);        /* sparse arrays become objects instead of raising */
        lua_call(L, 1, 0);
        lua_getfield(L, -1, "encode_invalid_numbers");
        lua_pushliteral(L, "null");   /* NaN and inf as null: the line stays valid JSON */
        lua_call(L, 1, 0);
        lua_getfield(L, -1, "encode");
        lua_replace(L, -3);           /* encode inst */
        lua_pop(L, 1);                /* encode */
}

int luaopen_rr_log(lua_State *L) {
        push_encoder(L); /* encode */
        if (luaL_newmetatable(L, LOG_MT)) {       /* encode mt */
                lua_pushvalue(L, -2);
                luaL_setfuncs(L, file_meta, 1);
                luaL_newlibtable(L, file_methods); /* encode mt methods */
                lua_pushvalue(L, -3);
                luaL_setfuncs(L, file_methods, 1);
                lua_setfield(L, -2, "__index");
        }
        lua_pop(L, 2);
        luaL_newlib(L, log_functions);
        return 1;
}
