/* rr.systemd: D-Bus values. The manager's replies and signals read into Lua values (a unit's
 * properties table), and into canonical text, to tell whether a property changed without Lua
 * (in a signal callback, inside sd-bus dispatch, where no Lua may run). */
#define _GNU_SOURCE
#include <assert.h>
#include <math.h>

#include "systemd-internal.h"

/* The error a reply carries, or NULL for a method return. */
const sd_bus_error *bus_reply_error(sd_bus_message *reply) {
        return sd_bus_message_is_method_error(reply, NULL) > 0 ? sd_bus_message_get_error(reply) : NULL;
}

/* A D-Bus error's message, for humans. */
const char *bus_error_text(const sd_bus_error *e) {
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
int bus_push_property(lua_State *L, sd_bus_message *msg, const char *name) {
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
int bus_push_props_error(lua_State *L, int top, const char *name, int r) {
        lua_settop(L, top);
        lua_pushnil(L);
        lua_pushfstring(L, "cannot parse the properties of %s: %s", name, strerror(-r));
        lua_pushliteral(L, ERR_PARSE);
        return 3;
}

/* Rewind a GetAll reply and enter its property array (a{sv}), for bus_props_next(). */
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
int bus_props_next(sd_bus_message *msg, const char **name) {
        int r;

        r = sd_bus_message_enter_container(msg, SD_BUS_TYPE_DICT_ENTRY, "sv");
        if (r <= 0)
                return r;
        r = sd_bus_message_read_basic(msg, SD_BUS_TYPE_STRING, name);
        return r < 0 ? r : 1;
}

/* Add the properties of a GetAll reply (a{sv}) to the table at absolute index t: all of them,
 * or only the n_want named in want (the others skipped unread). */
static int props_to_table(lua_State *L, sd_bus_message *reply, int t, char *const *want, size_t n_want) {
        const char *name;
        int r;

        r = props_begin(reply);
        if (r < 0)
                return r;
        while ((r = bus_props_next(reply, &name)) > 0) {
                if (want && !strv_contains(want, n_want, name)) {
                        r = sd_bus_message_skip(reply, "v");
                        if (r < 0)
                                return r;
                        r = sd_bus_message_exit_container(reply);
                        if (r < 0)
                                return r;
                        continue;
                }
                r = bus_push_property(L, reply, name);
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

/* Push one table with the properties of every GetAll reply in replies (NULL entries skipped), or
 * only the n_want named in want (NULL: all): 1.
 * When a reply cannot be parsed: nil, "cannot parse the properties of <name>: ...", "bad-reply"
 * (3), and nothing else is left on the stack. */
int bus_push_props(lua_State *L, sd_bus_message *const *replies, size_t n, const char *name, char *const *want,
                   size_t n_want) {
        int top = lua_gettop(L), r = 0;

        lua_createtable(L, 0, want ? (int) n_want : 0);
        for (size_t i = 0; i < n && r >= 0; i++)
                if (replies[i])
                        r = props_to_table(L, replies[i], top + 1, want, n_want);
        if (r < 0)
                return bus_push_props_error(L, top, name, r);
        lua_settop(L, top + 1);
        return 1;
}

/* ---- canonical text of values, to tell whether a property changed ----
 *
 * A wait compares a property's value now with a baseline: either the value the property had
 * when the wait began (read from a D-Bus reply) or one the caller gave (a Lua value, read from
 * an earlier properties table). Both become the same text: strings as they are, numbers in
 * decimal, booleans true/false, byte arrays in hex (as Lua sees them), containers bracketed.
 * One formatter writes every scalar (canon_basic()), whichever side it came from; the walks stay
 * two, because one side is a D-Bus message read inside sd-bus dispatch, where no Lua may run,
 * and the other a Lua argument, whose D-Bus type is not known until the property is read. */

/* Write one basic value as canonical text. */
static void canon_basic(FILE *f, char type, const BasicValue *v) {
        switch (type) {
        case SD_BUS_TYPE_BYTE:
                fprintf(f, "%u", (unsigned) v->y);
                break;
        case SD_BUS_TYPE_INT16:
                fprintf(f, "%d", (int) v->n);
                break;
        case SD_BUS_TYPE_UINT16:
                fprintf(f, "%u", (unsigned) v->q);
                break;
        case SD_BUS_TYPE_INT32:
        case SD_BUS_TYPE_UNIX_FD:
                fprintf(f, "%d", (int) v->i);
                break;
        case SD_BUS_TYPE_UINT32:
                fprintf(f, "%u", (unsigned) v->u);
                break;
        case SD_BUS_TYPE_INT64:
                fprintf(f, "%lld", (long long) v->x);
                break;
        case SD_BUS_TYPE_UINT64:
                fprintf(f, "%llu", (unsigned long long) v->t);
                break;
        case SD_BUS_TYPE_DOUBLE:
                fprintf(f, "%.17g", v->d);
                break;
        case SD_BUS_TYPE_BOOLEAN:
                fputs(v->b ? "true" : "false", f);
                break;
        default: /* s, o, g */
                fputs(v->s, f);
                break;
        }
}

/* Write the next complete value of msg to f. 1 when written, 0 at the end of the container, or
 * a negative errno. */
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
        canon_basic(f, type, &v);
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

/* Can a Lua value be compared with a property (bus_canon_lua())? Strings, numbers, booleans. */
bool bus_comparable(lua_State *L, int idx) {
        int t = lua_type(L, idx);

        return t == LUA_TSTRING || t == LUA_TNUMBER || t == LUA_TBOOLEAN;
}

/* The basic D-Bus value a bus_comparable() Lua value stands for, as push_basic() made it: an
 * integer, or an integral float in the INT64 range, as INT64; math.huge as systemd's infinity
 * UINT64_MAX; other floats as DOUBLE. Returns the type. */
static char lua_to_basic(lua_State *L, int idx, BasicValue *v) {
        switch (lua_type(L, idx)) {
        case LUA_TSTRING:
                v->s = lua_tostring(L, idx);
                return SD_BUS_TYPE_STRING;
        case LUA_TBOOLEAN:
                v->b = lua_toboolean(L, idx);
                return SD_BUS_TYPE_BOOLEAN;
        case LUA_TNUMBER:
                if (lua_isinteger(L, idx)) {
                        v->x = (int64_t) lua_tointeger(L, idx);
                        return SD_BUS_TYPE_INT64;
                }
                v->d = lua_tonumber(L, idx);
                if (isinf(v->d) && v->d > 0) {
                        v->t = UINT64_MAX;
                        return SD_BUS_TYPE_UINT64;
                }
                if (v->d == floor(v->d) && fabs(v->d) < 9.2e18) {
                        v->x = (int64_t) v->d;
                        return SD_BUS_TYPE_INT64;
                }
                return SD_BUS_TYPE_DOUBLE;
        default:
                assert(false); /* not bus_comparable() */
                v->s = "";
                return SD_BUS_TYPE_STRING;
        }
}

/* The canonical text of a Lua value as the caller gave it for a property (a value read from a
 * properties table compares equal to the same property read again); the value is
 * bus_comparable(). NULL on OOM. Never raises. */
char *bus_canon_lua(lua_State *L, int idx) {
        char *buf = NULL;
        size_t size = 0;
        BasicValue v;
        char type = lua_to_basic(L, idx, &v);
        FILE *f;

        f = open_memstream(&buf, &size);
        if (!f)
                return NULL;
        canon_basic(f, type, &v);
        if (fclose(f) != 0) {
                free(buf);
                return NULL;
        }
        return buf;
}

/* Find property `name` in a GetAll reply; its canonical text in *ret, or NULL when absent. */
int bus_find_canon(sd_bus_message *reply, const char *name, char **ret) {
        const char *key;
        int r;

        *ret = NULL;
        r = props_begin(reply);
        if (r < 0)
                return r;
        while ((r = bus_props_next(reply, &key)) > 0) {
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
