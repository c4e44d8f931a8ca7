/* Small helpers more than one module needs: creating directories, reading a permission mode
 * from Lua, sorting names bytewise. No state, no Lua module of their own. */
#define _GNU_SOURCE
#include <string.h>
#include <sys/stat.h>

#include "rr.h"

/* mkdir -p, returning 0 or a negative errno (see rr.h). */
int rr_mkdir_p(const char *path, mode_t mode) {
        _cleanup_(freep) char *p = strdup(path);
        struct stat st;

        if (!p)
                return -ENOMEM;
        for (char *s = p + 1;; s++) {
                bool last = *s == '\0';
                if (*s != '/' && !last)
                        continue;
                *s = '\0';
                if (mkdir(p, mode) < 0) {
                        int e = errno;
                        if (e != EEXIST)
                                return -e;
                        if (stat(p, &st) < 0)
                                return -errno;
                        if (!S_ISDIR(st.st_mode))
                                return -ENOTDIR;
                }
                if (last)
                        break;
                *s = '/';
                while (s[1] == '/')
                        s++;
        }
        return 0;
}

/* A permission mode from a Lua integer or octal string, -1 when not a mode (see rr.h). */
long long rr_to_mode(lua_State *L, int idx) {
        if (lua_type(L, idx) == LUA_TSTRING) {
                const char *s = lua_tostring(L, idx);
                long long v = 0;
                if (!*s)
                        return -1;
                for (; *s; s++) {
                        if (*s < '0' || *s > '7')
                                return -1;
                        v = v * 8 + (*s - '0');
                        if (v > 07777)
                                return -1;
                }
                return v;
        }
        if (lua_isinteger(L, idx)) {
                lua_Integer v = lua_tointeger(L, idx);
                return v >= 0 && v <= 07777 ? (long long) v : -1;
        }
        return -1;
}

/* Bytewise order of two RrName, a prefix first: for qsort(). */
int rr_name_cmp(const void *a, const void *b) {
        const RrName *x = a, *y = b;
        int c = memcmp(x->s, y->s, x->len < y->len ? x->len : y->len);
        return c ? c : (x->len > y->len) - (x->len < y->len);
}
