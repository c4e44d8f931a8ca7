/* rr.fs: the file operations the restart flow needs to snapshot definitions and undo a deploy
 * without ever losing a file: atomic writes and copies (temp file in the same directory, fsync,
 * rename, fsync of the directory), stat/list/remove, a recursive remove that never follows a
 * symlink, streaming comparison and SHA-256, and the run lock (flock) that names its holder.
 *
 * These are quick local operations: plain blocking syscalls, no RrOp. Expected failures return
 * `nil, message, "ECODE"`; wrong argument types raise. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#include <openssl/evp.h>

#include "rr.h"

#define LOCK_MT "rr.fs.lock"
#define SCRATCH_MT "rr.fs.scratch"
#define COPY_CHUNK (128 * 1024)
#define DEFAULT_DIR_MODE 0755

static inline void closedirp(DIR **d) {
        if (*d)
                closedir(*d);
}

static inline void evp_md_ctx_freep(EVP_MD_CTX **c) {
        EVP_MD_CTX_free(*c);
}

/* Push `nil, "<what>: <strerror>", "ECODE"` for a negative errno r. */
static int fail(lua_State *L, int r, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(lua_State *L, int r, const char *fmt, ...) {
        char what[1024];
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(what, sizeof what, fmt, ap);
        va_end(ap);
        return rr_push_fail(L, -r, "%s: %s", what, strerror(-r));
}

/* A path argument: a string without NUL bytes (the kernel would silently cut it there). */
static const char *check_path(lua_State *L, int idx) {
        size_t len;
        const char *p = luaL_checklstring(L, idx, &len);
        luaL_argcheck(L, strlen(p) == len, idx, "path contains a NUL byte");
        luaL_argcheck(L, len > 0, idx, "path is empty");
        return p;
}

/* An optional permission mode argument, or def. */
static mode_t opt_mode(lua_State *L, int idx, mode_t def) {
        long long m;

        if (lua_isnoneornil(L, idx))
                return def;
        m = rr_to_mode(L, idx);
        luaL_argcheck(L, m >= 0, idx,
                      "mode must be an integer such as tonumber(\"644\", 8), or an octal string such as \"0644\"");
        return (mode_t) m;
}

/* opts.mode: -1 when absent. */
static long long opt_field_mode(lua_State *L, int opts) {
        long long m = -1;

        if (lua_isnoneornil(L, opts))
                return -1;
        if (lua_getfield(L, opts, "mode") != LUA_TNIL) {
                m = rr_to_mode(L, -1);
                if (m < 0)
                        luaL_error(L, "bad option 'mode' (an integer such as tonumber(\"644\", 8), "
                                      "or an octal string such as \"0644\")");
        }
        lua_pop(L, 1);
        return m;
}

/* opts.<key> as an integer in [lo, hi], or -1 when absent. */
static long long opt_field_int(lua_State *L, int opts, const char *key, long long lo, long long hi) {
        long long v = -1;

        if (lua_isnoneornil(L, opts))
                return -1;
        if (lua_getfield(L, opts, key) != LUA_TNIL) {
                if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) < lo || lua_tointeger(L, -1) > hi)
                        luaL_error(L, "bad option '%s' (integer between %lld and %lld expected)", key, lo, hi);
                v = (long long) lua_tointeger(L, -1);
        }
        lua_pop(L, 1);
        return v;
}

/* Write all of buf, retrying on EINTR and short writes. */
static int write_all(int fd, const void *buf, size_t n) {
        const char *p = buf;

        while (n > 0) {
                ssize_t k = write(fd, p, n);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (k == 0)
                        return -EIO;
                p += k;
                n -= (size_t) k;
        }
        return 0;
}

/* Read up to n bytes, fewer only at end of file. Returns the count or a negative errno. */
static ssize_t read_full(int fd, void *buf, size_t n) {
        char *p = buf;
        size_t got = 0;

        while (got < n) {
                ssize_t k = read(fd, p + got, n - got);
                if (k < 0) {
                        if (errno == EINTR)
                                continue;
                        return -errno;
                }
                if (k == 0)
                        break;
                got += (size_t) k;
        }
        return (ssize_t) got;
}

/* Split path into its directory and last component (trailing slashes ignored). The last
 * component must be a real name: "/", "", "." and ".." give -EINVAL. */
static int split_path(const char *path, char **ret_dir, char **ret_base) {
        _cleanup_(freep) char *copy = strdup(path), *dir = NULL, *base = NULL;
        char *slash;
        size_t len;

        if (!copy)
                return -ENOMEM;
        len = strlen(copy);
        while (len > 1 && copy[len - 1] == '/')
                copy[--len] = '\0';
        slash = strrchr(copy, '/');
        if (!slash) {
                dir = strdup(".");
                base = strdup(copy);
        } else {
                base = strdup(slash + 1);
                if (slash == copy)
                        dir = strdup("/");
                else {
                        *slash = '\0';
                        dir = strdup(copy);
                }
        }
        if (!dir || !base)
                return -ENOMEM;
        if (base[0] == '\0' || strcmp(base, ".") == 0 || strcmp(base, "..") == 0)
                return -EINVAL;
        *ret_dir = dir;
        *ret_base = base;
        dir = base = NULL;
        return 0;
}

/* fsync a directory, so that a rename or unlink inside it survives a crash. */
static int fsync_dir(const char *dir) {
        _cleanup_(closep) int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);

        if (fd < 0)
                return -errno;
        if (fsync(fd) < 0)
                return -errno;
        return 0;
}

/* The process umask, read without changing it for longer than two syscalls (no threads). */
static mode_t current_umask(void) {
        mode_t m = umask(022);
        umask(m);
        return m;
}

/* ---- scratch: an fd or DIR* owned by a userdata, for work that allocates Lua memory (which
 * may raise) while the descriptor is open; the collector closes what an error left behind ---- */

typedef struct Scratch {
        int fd;
        DIR *dir;
} Scratch;

static void scratch_release(Scratch *s) {
        if (s->dir) {
                closedir(s->dir);
                s->dir = NULL;
        }
        if (s->fd >= 0) {
                close(s->fd);
                s->fd = -1;
        }
}

static int scratch_gc(lua_State *L) {
        scratch_release(luaL_checkudata(L, 1, SCRATCH_MT));
        return 0;
}

/* Pushes a closed scratch holder. */
static Scratch *scratch_new(lua_State *L) {
        Scratch *s = lua_newuserdatauv(L, sizeof *s, 0);
        s->fd = -1;
        s->dir = NULL;
        luaL_setmetatable(L, SCRATCH_MT);
        return s;
}

/* ---- temp file + rename: the core of write_atomic and copy_atomic ---- */

typedef struct Atomic {
        char *dir;  /* directory of the target */
        char *tmp;  /* temp file path while it exists */
        int fd;
} Atomic;

static void atomic_done(Atomic *a) {
        if (a->fd >= 0)
                close(a->fd);
        if (a->tmp)
                (void) unlink(a->tmp);
        free(a->tmp);
        free(a->dir);
        *a = (Atomic) { .fd = -1 };
}

/* Create the temp file ".<name>.XXXXXX" beside path (mode 0600 until atomic_commit). On
 * failure nothing is left to release. */
static int atomic_begin(Atomic *a, const char *path) {
        _cleanup_(freep) char *base = NULL;
        int r;

        *a = (Atomic) { .fd = -1 };
        r = split_path(path, &a->dir, &base);
        if (r < 0)
                return r;
        if (asprintf(&a->tmp, "%s/.%s.XXXXXX", a->dir, base) < 0) {
                a->tmp = NULL;
                atomic_done(a);
                return -ENOMEM;
        }
        a->fd = mkostemp(a->tmp, O_CLOEXEC);
        if (a->fd < 0) {
                r = -errno;
                free(a->tmp);
                a->tmp = NULL; /* nothing to unlink */
                atomic_done(a);
                return r;
        }
        return 0;
}

/* Set owner and mode on the written temp file, fsync it, rename it over path, fsync the
 * directory. uid/gid -1: leave. Ownership first: chown clears set-id bits that fchmod sets. */
static int atomic_commit(Atomic *a, const char *path, mode_t mode, uid_t uid, gid_t gid, bool owner_best_effort,
                         const struct timespec *times) {
        int r;

        if (uid != (uid_t) -1 || gid != (gid_t) -1) {
                if (fchown(a->fd, uid, gid) < 0) {
                        r = -errno;
                        if (!(owner_best_effort && r == -EPERM))
                                return r;
                }
        }
        if (fchmod(a->fd, mode) < 0)
                return -errno;
        if (times && futimens(a->fd, times) < 0)
                return -errno;
        if (fsync(a->fd) < 0)
                return -errno;
        r = close(a->fd);
        a->fd = -1;
        if (r < 0)
                return -errno;
        if (rename(a->tmp, path) < 0)
                return -errno;
        free(a->tmp);
        a->tmp = NULL; /* it is the target now */
        return fsync_dir(a->dir);
}

/* The owner a replaced file keeps: that of the regular file at path, if any and not ours. */
static void inherit_owner(const char *path, uid_t *uid, gid_t *gid, mode_t *mode) {
        struct stat st;

        if (lstat(path, &st) < 0 || !S_ISREG(st.st_mode))
                return;
        if (*mode == (mode_t) -1)
                *mode = st.st_mode & 07777;
        if (*uid == (uid_t) -1 && st.st_uid != geteuid())
                *uid = st.st_uid;
        if (*gid == (gid_t) -1 && st.st_gid != getegid())
                *gid = st.st_gid;
}

/* fs.write_atomic(path, data, {mode=, uid=, gid=}) -> true | nil, err, code */
static int fs_write_atomic(lua_State *L) {
        const char *path = check_path(L, 1);
        size_t len;
        const char *data = luaL_checklstring(L, 2, &len);
        long long m, u, g;
        mode_t mode;
        uid_t uid;
        gid_t gid;
        bool explicit_owner;
        Atomic a;
        int r;

        if (!lua_isnoneornil(L, 3))
                luaL_checktype(L, 3, LUA_TTABLE);
        m = opt_field_mode(L, 3);
        u = opt_field_int(L, 3, "uid", 0, UINT32_MAX - 1);
        g = opt_field_int(L, 3, "gid", 0, UINT32_MAX - 1);
        mode = m >= 0 ? (mode_t) m : (mode_t) -1;
        uid = u >= 0 ? (uid_t) u : (uid_t) -1;
        gid = g >= 0 ? (gid_t) g : (gid_t) -1;
        explicit_owner = u >= 0 || g >= 0;

        /* A replaced file keeps its mode and owner unless told otherwise. */
        inherit_owner(path, &uid, &gid, &mode);
        if (mode == (mode_t) -1)
                mode = 0666 & ~current_umask();

        r = atomic_begin(&a, path);
        if (r < 0)
                return fail(L, r, "cannot create a temporary file for %s", path);
        r = write_all(a.fd, data, len);
        if (r >= 0)
                r = atomic_commit(&a, path, mode, uid, gid, !explicit_owner && geteuid() != 0, NULL);
        atomic_done(&a);
        if (r < 0)
                return fail(L, r, "cannot write %s", path);
        lua_pushboolean(L, 1);
        return 1;
}

/* Open a regular file for copying: no symlink, no FIFO (O_NONBLOCK keeps open() from waiting). */
static int open_regular(const char *path, struct stat *st) {
        _cleanup_(closep) int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY);
        int r;

        if (fd < 0)
                return -errno;
        if (fstat(fd, st) < 0)
                return -errno;
        if (S_ISDIR(st->st_mode))
                return -EISDIR;
        if (!S_ISREG(st->st_mode))
                return -EINVAL;
        /* Back to blocking reads (a regular file ignores the flag, but be exact). */
        r = fcntl(fd, F_GETFL);
        if (r < 0 || fcntl(fd, F_SETFL, r & ~O_NONBLOCK) < 0)
                return -errno;
        r = fd;
        fd = -1;
        return r;
}

/* Copy src (a regular file, not a symlink) to dst through a temp file. mode, uid, gid: -1 keeps
 * src's; times: keep src's atime and mtime. *failed names the path an error is about. */
static int copy_file_atomic(const char *src, const char *dst, long long mode, long long uid, long long gid,
                            bool times, const char **failed) {
        _cleanup_(freep) char *buf = NULL;
        _cleanup_(closep) int in = -1;
        struct timespec ts[2];
        struct stat st;
        Atomic a;
        int r;

        *failed = src;
        in = open_regular(src, &st);
        if (in < 0)
                return in;
        buf = malloc(COPY_CHUNK);
        if (!buf)
                return -ENOMEM;

        *failed = dst;
        r = atomic_begin(&a, dst);
        if (r < 0)
                return r;
        for (;;) {
                ssize_t n = read_full(in, buf, COPY_CHUNK);
                if (n < 0) {
                        *failed = src;
                        r = (int) n;
                        break;
                }
                if (n == 0)
                        break;
                r = write_all(a.fd, buf, (size_t) n);
                if (r < 0)
                        break;
        }
        if (r >= 0) {
                ts[0] = st.st_atim;
                ts[1] = st.st_mtim;
                /* The owner is src's; only a change needs fchown (which, unprivileged, may fail:
                 * then the copy is ours, as cp -p does). */
                r = atomic_commit(&a, dst, mode >= 0 ? (mode_t) mode : st.st_mode & 07777,
                                  uid >= 0 ? (uid_t) uid : (st.st_uid != geteuid() ? st.st_uid : (uid_t) -1),
                                  gid >= 0 ? (gid_t) gid : (st.st_gid != getegid() ? st.st_gid : (gid_t) -1),
                                  uid < 0 && gid < 0 && geteuid() != 0, times ? ts : NULL);
        }
        atomic_done(&a);
        return r;
}

/* fs.copy_atomic(src, dst, {mode=, uid=, gid=, times=true}) -> true | nil, err, code */
static int fs_copy_atomic(lua_State *L) {
        const char *src = check_path(L, 1), *dst = check_path(L, 2), *failed;
        long long m, u, g;
        bool times = true;
        int r;

        if (!lua_isnoneornil(L, 3)) {
                luaL_checktype(L, 3, LUA_TTABLE);
                if (lua_getfield(L, 3, "times") != LUA_TNIL)
                        times = lua_toboolean(L, -1);
                lua_pop(L, 1);
        }
        m = opt_field_mode(L, 3);
        u = opt_field_int(L, 3, "uid", 0, UINT32_MAX - 1);
        g = opt_field_int(L, 3, "gid", 0, UINT32_MAX - 1);

        r = copy_file_atomic(src, dst, m, u, g, times, &failed);
        if (r == -ELOOP && failed == src)
                return rr_push_fail(L, ELOOP, "cannot copy %s: it is a symbolic link", src);
        if ((r == -EINVAL || r == -EISDIR) && failed == src)
                return rr_push_fail(L, -r, "cannot copy %s: not a regular file", src);
        if (r < 0)
                return fail(L, r, "cannot copy %s to %s (%s)", src, dst, failed == src ? "reading" : "writing");
        lua_pushboolean(L, 1);
        return 1;
}

/* fs.read(path) -> string | nil, err, code */
static int fs_read(lua_State *L) {
        const char *path = check_path(L, 1);
        Scratch *s = scratch_new(L);
        luaL_Buffer b;
        struct stat st;
        size_t want = 16 * 1024;

        s->fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (s->fd < 0)
                return fail(L, -errno, "cannot read %s", path);
        /* A regular file is read into a buffer of its size + 1: the last byte is room for the
         * read that sees end of file, so the buffer never grows (or doubles) for it. */
        if (fstat(s->fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size > 0)
                want = (size_t) st.st_size + 1;
        luaL_buffinit(L, &b);
        for (;;) {
                char *p = luaL_prepbuffsize(&b, want);
                ssize_t n = read(s->fd, p, want);
                if (n < 0) {
                        int e = errno;
                        if (e == EINTR)
                                continue;
                        scratch_release(s);
                        return fail(L, -e, "cannot read %s", path); /* the buffer is dropped */
                }
                if (n == 0)
                        break;
                luaL_addsize(&b, (size_t) n);
                /* Room left from the last size: use it; else grow by 64 KiB or more. */
                want = (size_t) n < want ? want - (size_t) n : 64 * 1024;
        }
        scratch_release(s);
        luaL_pushresult(&b);
        return 1;
}

/* The "type" string of a stat mode. */
static const char *type_name(mode_t m) {
        if (S_ISREG(m))
                return "file";
        if (S_ISDIR(m))
                return "dir";
        if (S_ISLNK(m))
                return "link";
        return "other";
}

/* fs.stat(path [, follow]) -> {type=, mode=, size=, uid=, gid=, mtime=, ino=, dev=, nlink=} */
static int fs_stat(lua_State *L) {
        const char *path = check_path(L, 1);
        bool follow = lua_toboolean(L, 2);
        struct stat st;

        if ((follow ? stat(path, &st) : lstat(path, &st)) < 0)
                return fail(L, -errno, "cannot stat %s", path);
        lua_createtable(L, 0, 9);
        lua_pushstring(L, type_name(st.st_mode));
        lua_setfield(L, -2, "type");
        lua_pushinteger(L, st.st_mode & 07777);
        lua_setfield(L, -2, "mode");
        lua_pushinteger(L, (lua_Integer) st.st_size);
        lua_setfield(L, -2, "size");
        lua_pushinteger(L, (lua_Integer) st.st_uid);
        lua_setfield(L, -2, "uid");
        lua_pushinteger(L, (lua_Integer) st.st_gid);
        lua_setfield(L, -2, "gid");
        lua_pushnumber(L, (lua_Number) st.st_mtim.tv_sec + (lua_Number) st.st_mtim.tv_nsec / 1e9);
        lua_setfield(L, -2, "mtime");
        lua_pushinteger(L, (lua_Integer) st.st_ino);
        lua_setfield(L, -2, "ino");
        lua_pushinteger(L, (lua_Integer) st.st_dev);
        lua_setfield(L, -2, "dev");
        lua_pushinteger(L, (lua_Integer) st.st_nlink);
        lua_setfield(L, -2, "nlink");
        return 1;
}

/* fs.exists(path [, follow]) -> true | false (nothing there) | nil, err, code (cannot tell) */
static int fs_exists(lua_State *L) {
        const char *path = check_path(L, 1);
        bool follow = lua_toboolean(L, 2);
        struct stat st;

        if ((follow ? stat(path, &st) : lstat(path, &st)) == 0) {
                lua_pushboolean(L, 1);
                return 1;
        }
        if (errno == ENOENT || errno == ENOTDIR) {
                lua_pushboolean(L, 0);
                return 1;
        }
        return fail(L, -errno, "cannot stat %s", path);
}

/* fs.mkdir_p(path [, mode=0755]) -> true | nil, err, code */
static int fs_mkdir_p(lua_State *L) {
        const char *path = check_path(L, 1);
        mode_t mode = opt_mode(L, 2, DEFAULT_DIR_MODE);
        int r = rr_mkdir_p(path, mode);

        if (r < 0)
                return fail(L, r, "cannot create directory %s", path);
        lua_pushboolean(L, 1);
        return 1;
}

/* fs.remove(path) -> true | nil, err, code: a file, a symlink or an empty directory */
static int fs_remove(lua_State *L) {
        const char *path = check_path(L, 1);

        if (unlink(path) < 0) {
                if (errno != EISDIR)
                        return fail(L, -errno, "cannot remove %s", path);
                if (rmdir(path) < 0)
                        return fail(L, -errno, "cannot remove %s", path);
        }
        lua_pushboolean(L, 1);
        return 1;
}

/* fs.rename(from, to) -> true | nil, err, code (rename(2): atomic, same file system) */
static int fs_rename(lua_State *L) {
        const char *from = check_path(L, 1), *to = check_path(L, 2);

        if (rename(from, to) < 0)
                return fail(L, -errno, "cannot rename %s to %s", from, to);
        lua_pushboolean(L, 1);
        return 1;
}

/* fs.fsync_dir(path) -> true | nil, err, code */
static int fs_fsync_dir(lua_State *L) {
        const char *path = check_path(L, 1);
        int r = fsync_dir(path);

        if (r < 0)
                return fail(L, r, "cannot fsync %s", path);
        lua_pushboolean(L, 1);
        return 1;
}

/* fs.list(dir) -> { names sorted bytewise, without "." and ".." } | nil, err, code */
static int fs_list(lua_State *L) {
        const char *path = check_path(L, 1);
        Scratch *s = scratch_new(L); /* scratch */
        lua_Integer n = 0;
        RrName *names;
        int unsorted;

        s->dir = opendir(path);
        if (!s->dir)
                return fail(L, -errno, "cannot list %s", path);
        lua_newtable(L); /* scratch unsorted */
        unsorted = lua_gettop(L);
        for (;;) {
                struct dirent *de;
                errno = 0;
                de = readdir(s->dir);
                if (!de) {
                        if (errno != 0) {
                                int e = errno;
                                scratch_release(s);
                                return fail(L, -e, "cannot list %s", path);
                        }
                        break;
                }
                if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
                        continue;
                lua_pushstring(L, de->d_name);
                lua_rawseti(L, unsorted, ++n);
        }
        scratch_release(s);

        /* Sort pointers to the strings, which the unsorted table keeps alive. */
        names = lua_newuserdatauv(L, (size_t) n * sizeof(RrName) + 1, 0); /* scratch unsorted names */
        for (lua_Integer i = 1; i <= n; i++) {
                lua_rawgeti(L, unsorted, i);
                names[i - 1].s = lua_tolstring(L, -1, &names[i - 1].len);
                lua_pop(L, 1); /* still referenced by the table */
        }
        qsort(names, (size_t) n, sizeof(RrName), rr_name_cmp);
        lua_createtable(L, (int) n, 0); /* scratch unsorted names result */
        for (lua_Integer i = 0; i < n; i++) {
                lua_pushlstring(L, names[i].s, names[i].len);
                lua_rawseti(L, -2, i + 1);
        }
        return 1;
}

/* fs.realpath(path) -> absolute path without symlinks, "." or ".." | nil, err, code */
static int fs_realpath(lua_State *L) {
        const char *path = check_path(L, 1);
        _cleanup_(freep) char *r = realpath(path, NULL);

        if (!r)
                return fail(L, -errno, "cannot resolve %s", path);
        lua_pushstring(L, r);
        return 1;
}

/* fs.symlink(target, path) -> true | nil, err, code (target is stored as given) */
static int fs_symlink(lua_State *L) {
        const char *target = check_path(L, 1), *path = check_path(L, 2);

        if (symlink(target, path) < 0)
                return fail(L, -errno, "cannot create symlink %s", path);
        lua_pushboolean(L, 1);
        return 1;
}

/* fs.readlink(path) -> target | nil, err, code ("EINVAL": not a symlink) */
static int fs_readlink(lua_State *L) {
        const char *path = check_path(L, 1);
        char buf[PATH_MAX];
        ssize_t n = readlink(path, buf, sizeof buf);

        if (n < 0)
                return fail(L, -errno, "cannot read link %s", path);
        if ((size_t) n >= sizeof buf)
                return rr_push_fail(L, ENAMETOOLONG, "cannot read link %s: target too long", path);
        lua_pushlstring(L, buf, (size_t) n);
        return 1;
}

/* fs.mkdtemp([prefix]) -> path of a new mode-0700 directory named prefix.."XXXXXX" */
static int fs_mkdtemp(lua_State *L) {
        _cleanup_(freep) char *tmpl = NULL;
        int r;

        if (lua_isnoneornil(L, 1)) {
                const char *tmpdir = getenv("TMPDIR");
                if (!tmpdir || tmpdir[0] != '/')
                        tmpdir = "/tmp";
                r = asprintf(&tmpl, "%s/rrengine-XXXXXX", tmpdir);
        } else
                r = asprintf(&tmpl, "%sXXXXXX", check_path(L, 1));
        if (r < 0) {
                tmpl = NULL; /* undefined after a failure */
                return fail(L, -ENOMEM, "cannot create a temporary directory");
        }
        if (!mkdtemp(tmpl))
                return fail(L, -errno, "cannot create a directory from %s", tmpl);
        lua_pushstring(L, tmpl);
        return 1;
}

/* ---- remove_tree ---- */

typedef struct RmCtx {
        int error;        /* the first error, negative errno */
        char *error_path; /* where it happened */
} RmCtx;

static void rm_record(RmCtx *c, int r, const char *dir, const char *name) {
        if (c->error < 0)
                return;
        c->error = r;
        if (name) {
                if (asprintf(&c->error_path, "%s/%s", dir, name) < 0)
                        c->error_path = NULL;
        } else
                c->error_path = strdup(dir);
}

/* Is name (in dirfd) a directory that is the root of a mount? Those are never descended. */
static int is_mount_root(int dirfd, const char *name, dev_t parent_dev) {
        struct statx sx;

        if (statx(dirfd, name, AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT, STATX_TYPE | STATX_INO, &sx) < 0)
                return -errno;
        if (sx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT)
                return !!(sx.stx_attributes & STATX_ATTR_MOUNT_ROOT);
        return makedev(sx.stx_dev_major, sx.stx_dev_minor) != parent_dev;
}

/* Remove everything inside the directory fd (consumed), never following a symlink and never
 * crossing into another mount. Keeps going after an error; the first one is recorded. */
static void rm_children(int fd, const char *path, dev_t dev, RmCtx *c) {
        _cleanup_(closedirp) DIR *d = fdopendir(fd);

        if (!d) {
                rm_record(c, -errno, path, NULL);
                close(fd);
                return;
        }
        for (;;) {
                struct dirent *de;
                bool is_dir;
                int r;

                errno = 0;
                de = readdir(d);
                if (!de) {
                        if (errno != 0)
                                rm_record(c, -errno, path, NULL);
                        break;
                }
                if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
                        continue;
                if (de->d_type == DT_UNKNOWN) {
                        struct stat st;
                        if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
                                if (errno != ENOENT)
                                        rm_record(c, -errno, path, de->d_name);
                                continue;
                        }
                        is_dir = S_ISDIR(st.st_mode);
                } else
                        is_dir = de->d_type == DT_DIR;

                if (is_dir) {
                        _cleanup_(freep) char *sub = NULL;
                        int subfd;

                        r = is_mount_root(dirfd(d), de->d_name, dev);
                        if (r != 0) {
                                rm_record(c, r < 0 ? r : -EXDEV, path, de->d_name);
                                continue;
                        }
                        subfd = openat(dirfd(d), de->d_name,
                                       O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
                        if (subfd < 0) {
                                rm_record(c, -errno, path, de->d_name);
                                continue;
                        }
                        if (asprintf(&sub, "%s/%s", path, de->d_name) < 0) {
                                sub = NULL;
                                close(subfd);
                                rm_record(c, -ENOMEM, path, de->d_name);
                                continue;
                        }
                        rm_children(subfd, sub, dev, c);
                        r = unlinkat(dirfd(d), de->d_name, AT_REMOVEDIR);
                } else
                        r = unlinkat(dirfd(d), de->d_name, 0);
                if (r < 0 && errno != ENOENT)
                        rm_record(c, -errno, path, de->d_name);
        }
}

/* Number of components of an absolute, canonical path ("/" has 0). */
static int path_depth(const char *p) {
        int n = 0;
        for (; *p; p++)
                if (*p == '/' && p[1] != '\0' && p[1] != '/')
                        n++;
        return n;
}

/* Remove the tree at dir/base (dir canonical, path as the caller wrote it). Returns 0 or a
 * negative errno; details of the first error inside the tree go to c. */
static int remove_tree_at(const char *dir, const char *base, const char *path, RmCtx *c) {
        _cleanup_(closep) int pfd = -1;
        struct stat pst, st;
        int fd, r;

        pfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (pfd < 0 || fstat(pfd, &pst) < 0)
                return -errno;
        if (fstatat(pfd, base, &st, AT_SYMLINK_NOFOLLOW) < 0)
                return -errno;
        if (!S_ISDIR(st.st_mode))
                return unlinkat(pfd, base, 0) < 0 ? -errno : 0;

        r = is_mount_root(pfd, base, pst.st_dev);
        if (r != 0)
                return r < 0 ? r : -EBUSY;
        fd = openat(pfd, base, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
        if (fd < 0)
                return -errno;
        rm_children(fd, path, st.st_dev, c);
        if (c->error < 0)
                return c->error;
        return unlinkat(pfd, base, AT_REMOVEDIR) < 0 ? -errno : 0;
}

/* fs.remove_tree(path) -> true | nil, err, code: rm -r without following symlinks or crossing
 * mounts; refuses "/" and any path with fewer than 2 components once its parent is resolved. */
static int fs_remove_tree(lua_State *L) {
        const char *path = check_path(L, 1);
        _cleanup_(freep) char *dir = NULL, *base = NULL, *canon = NULL, *where = NULL, *at = NULL;
        RmCtx c = { 0 };
        int r;

        r = split_path(path, &dir, &base);
        if (r == -ENOMEM)
                return fail(L, r, "cannot remove %s", path);
        if (r < 0)
                return rr_push_fail(L, EPERM, "refusing to remove %s: not a removable path", path);
        canon = realpath(dir, NULL);
        if (!canon)
                return fail(L, -errno, "cannot remove %s", path);
        if (asprintf(&where, "%s%s%s", canon, strcmp(canon, "/") == 0 ? "" : "/", base) < 0) {
                where = NULL;
                return fail(L, -ENOMEM, "cannot remove %s", path);
        }
        if (path_depth(where) < 2)
                return rr_push_fail(L, EPERM, "refusing to remove %s: fewer than 2 path components", where);

        r = remove_tree_at(canon, base, path, &c);
        at = c.error_path;
        if (r == 0) {
                lua_pushboolean(L, 1);
                return 1;
        }
        if (r == -EBUSY && !at)
                return rr_push_fail(L, EBUSY, "refusing to remove %s: it is a mount point", path);
        if (r == -EXDEV)
                return rr_push_fail(L, EXDEV, "cannot remove %s: %s is a mount point", path, at ? at : path);
        if (at && strcmp(at, path) != 0)
                return fail(L, r, "cannot remove %s (at %s)", path, at);
        return fail(L, r, "cannot remove %s", path);
}

/* ---- comparison and digest ---- */

/* Compare two files' modes and bytes, streaming. 1 same, 0 different (or one is missing or
 * not a regular file), negative errno when they cannot be read. */
static int files_same(const char *a, const char *b, const char **failed) {
        _cleanup_(closep) int fa = -1, fb = -1;
        _cleanup_(freep) char *ba = NULL, *bb = NULL;
        struct stat sa, sb;

        *failed = a;
        fa = open(a, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
        if (fa < 0)
                return errno == ENOENT || errno == ENOTDIR ? 0 : -errno;
        *failed = b;
        fb = open(b, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
        if (fb < 0)
                return errno == ENOENT || errno == ENOTDIR ? 0 : -errno;
        if (fstat(fa, &sa) < 0)
                return -errno;
        if (fstat(fb, &sb) < 0)
                return -errno;
        if (!S_ISREG(sa.st_mode) || !S_ISREG(sb.st_mode))
                return 0;
        if ((sa.st_mode & 07777) != (sb.st_mode & 07777) || sa.st_size != sb.st_size)
                return 0;
        if (sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino)
                return 1;
        ba = malloc(COPY_CHUNK);
        bb = malloc(COPY_CHUNK);
        if (!ba || !bb)
                return -ENOMEM;
        for (;;) {
                ssize_t na, nb;
                *failed = a;
                na = read_full(fa, ba, COPY_CHUNK);
                if (na < 0)
                        return (int) na;
                *failed = b;
                nb = read_full(fb, bb, COPY_CHUNK);
                if (nb < 0)
                        return (int) nb;
                if (na != nb || memcmp(ba, bb, (size_t) na) != 0)
                        return 0;
                if (na == 0)
                        return 1;
        }
}

/* fs.same(a, b) -> true | false | nil, err, code */
static int fs_same(lua_State *L) {
        const char *a = check_path(L, 1), *b = check_path(L, 2), *failed;
        int r = files_same(a, b, &failed);

        if (r < 0)
                return fail(L, r, "cannot compare %s", failed);
        lua_pushboolean(L, r);
        return 1;
}

/* SHA-256 of a file as lowercase hex into out[65]. */
static int file_sha256(const char *path, char out[static 65]) {
        _cleanup_(evp_md_ctx_freep) EVP_MD_CTX *ctx = NULL;
        _cleanup_(closep) int fd = -1;
        _cleanup_(freep) char *buf = NULL;
        unsigned char md[EVP_MAX_MD_SIZE];
        unsigned mdlen = 0;

        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0)
                return -errno;
        buf = malloc(COPY_CHUNK);
        ctx = EVP_MD_CTX_new();
        if (!buf || !ctx)
                return -ENOMEM;
        if (EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1)
                return -EIO;
        for (;;) {
                ssize_t n = read_full(fd, buf, COPY_CHUNK);
                if (n < 0)
                        return (int) n;
                if (n == 0)
                        break;
                if (EVP_DigestUpdate(ctx, buf, (size_t) n) != 1)
                        return -EIO;
        }
        if (EVP_DigestFinal_ex(ctx, md, &mdlen) != 1 || mdlen != 32)
                return -EIO;
        for (unsigned i = 0; i < mdlen; i++)
                snprintf(out + 2 * i, 3, "%02x", md[i]);
        return 0;
}

/* fs.sha256(path) -> "hex digest" | nil, err, code */
static int fs_sha256(lua_State *L) {
        const char *path = check_path(L, 1);
        char hex[65];
        int r = file_sha256(path, hex);

        if (r < 0)
                return fail(L, r, "cannot hash %s", path);
        lua_pushstring(L, hex);
        return 1;
}

/* ---- the run lock ---- */

typedef struct Lock {
        int fd; /* -1 once released */
} Lock;

static Lock *check_lock(lua_State *L, int idx) {
        return luaL_checkudata(L, idx, LOCK_MT);
}

/* The PID written in a held lock file, or 0 when it is not there (yet). */
static pid_t lock_holder(int fd) {
        char buf[32];
        ssize_t n;
        long long v = 0;

        do
                n = pread(fd, buf, sizeof buf - 1, 0);
        while (n < 0 && errno == EINTR);
        if (n <= 0)
                return 0;
        buf[n] = '\0';
        for (char *p = buf; *p >= '0' && *p <= '9'; p++) {
                v = v * 10 + (*p - '0');
                if (v > INT_MAX)
                        return 0;
        }
        return (pid_t) v;
}

/* Record our PID: write first, then cut, so a reader sees one PID or another, never "". */
static int lock_write_pid(int fd) {
        char buf[32];
        int n = snprintf(buf, sizeof buf, "%d\n", (int) getpid());
        ssize_t k;

        do
                k = pwrite(fd, buf, (size_t) n, 0);
        while (k < 0 && errno == EINTR);
        if (k < 0)
                return -errno;
        if (k != n)
                return -EIO;
        if (ftruncate(fd, n) < 0)
                return -errno;
        return 0;
}

/* fs.lock(path) -> lock | nil, "locked by pid N", "EWOULDBLOCK", N | nil, err, code */
static int fs_lock(lua_State *L) {
        const char *path = check_path(L, 1);
        Lock *l;
        int r;

        /* The userdata owns the descriptor from open() on, so a Lua error cannot leak it. */
        l = lua_newuserdatauv(L, sizeof *l, 1); /* lock */
        l->fd = -1;
        luaL_setmetatable(L, LOCK_MT);
        lua_pushvalue(L, 1);
        lua_setiuservalue(L, -2, 1);

        /* Retry when the file we locked was replaced or removed meanwhile (someone removed a
         * stale lock file): holding a lock on an unlinked inode locks nothing. */
        for (int attempt = 0;; attempt++) {
                struct stat a, b;
                pid_t pid;

                l->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW | O_NOCTTY, 0644);
                if (l->fd < 0)
                        return fail(L, -errno, "cannot open lock file %s", path);
                if (flock(l->fd, LOCK_EX | LOCK_NB) == 0) {
                        if (fstat(l->fd, &a) < 0) {
                                r = -errno;
                                break;
                        }
                        if (lstat(path, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino) {
                                r = lock_write_pid(l->fd);
                                if (r < 0)
                                        break;
                                return 1;
                        }
                        r = -EAGAIN;
                        close(l->fd);
                        l->fd = -1;
                        if (attempt < 8)
                                continue;
                        return rr_push_fail(L, EAGAIN, "cannot lock %s: the file keeps being replaced", path);
                }
                r = -errno;
                if (r != -EWOULDBLOCK)
                        break;

                pid = lock_holder(l->fd);
                close(l->fd);
                l->fd = -1;
                lua_pushnil(L);
                if (pid > 0)
                        lua_pushfstring(L, "locked by pid %d", (int) pid);
                else
                        lua_pushliteral(L, "locked by another process");
                lua_pushliteral(L, "EWOULDBLOCK"); /* not EAGAIN, its value on Linux */
                if (pid > 0)
                        lua_pushinteger(L, pid);
                else
                        lua_pushnil(L);
                return 4;
        }
        close(l->fd);
        l->fd = -1;
        return fail(L, r, "cannot lock %s", path);
}

/* fs.getpid() -> our PID: what fs.lock writes into the lock file */
static int fs_getpid(lua_State *L) {
        lua_pushinteger(L, getpid());
        return 1;
}

/* fs.isatty(fd) -> bool: whether fd is a terminal (the live progress view needs to know). */
static int fs_isatty(lua_State *L) {
        lua_Integer fd = luaL_checkinteger(L, 1);
        luaL_argcheck(L, fd >= 0 && fd <= INT32_MAX, 1, "not a file descriptor");
        lua_pushboolean(L, isatty((int) fd));
        return 1;
}

/* fs.term_size(fd) -> columns, rows | nil, message, code: the terminal's size now (asked at every
 * redraw, so a resized terminal is seen without a SIGWINCH handler). */
static int fs_term_size(lua_State *L) {
        lua_Integer fd = luaL_checkinteger(L, 1);
        struct winsize ws = {};

        luaL_argcheck(L, fd >= 0 && fd <= INT32_MAX, 1, "not a file descriptor");
        if (ioctl((int) fd, TIOCGWINSZ, &ws) < 0)
                return rr_push_fail(L, errno, "cannot read the terminal size: %s", strerror(errno));
        if (ws.ws_col == 0)
                return rr_push_fail(L, EINVAL, "the terminal has no size");
        lua_pushinteger(L, ws.ws_col);
        lua_pushinteger(L, ws.ws_row);
        return 2;
}

/* l:unlock(), __gc, __close: release the lock (idempotent). The file stays: removing it would
 * let two runs lock two different inodes. */
static int lock_unlock(lua_State *L) {
        Lock *l = check_lock(L, 1);

        if (l->fd >= 0) {
                close(l->fd); /* drops the flock: the descriptor was never shared (O_CLOEXEC) */
                l->fd = -1;
        }
        return 0;
}

/* l:path() */
static int lock_path(lua_State *L) {
        check_lock(L, 1);
        lua_getiuservalue(L, 1, 1);
        return 1;
}

/* l:held() -> boolean */
static int lock_held(lua_State *L) {
        lua_pushboolean(L, check_lock(L, 1)->fd >= 0);
        return 1;
}

static int lock_tostring(lua_State *L) {
        Lock *l = check_lock(L, 1);
        lua_getiuservalue(L, 1, 1);
        lua_pushfstring(L, "rr.fs.lock %s (%s)", lua_tostring(L, -1), l->fd >= 0 ? "held" : "released");
        return 1;
}

static const luaL_Reg lock_methods[] = {
        { "unlock", lock_unlock },
        { "path", lock_path },
        { "held", lock_held },
        { NULL, NULL },
};

static const luaL_Reg lock_meta[] = {
        { "__gc", lock_unlock },
        { "__close", lock_unlock },
        { "__tostring", lock_tostring },
        { NULL, NULL },
};

static const luaL_Reg fs_functions[] = {
        { "read", fs_read },
        { "write_atomic", fs_write_atomic },
        { "copy_atomic", fs_copy_atomic },
        { "stat", fs_stat },
        { "exists", fs_exists },
        { "mkdir_p", fs_mkdir_p },
        { "remove", fs_remove },
        { "rename", fs_rename },
        { "fsync_dir", fs_fsync_dir },
        { "list", fs_list },
        { "realpath", fs_realpath },
        { "symlink", fs_symlink },
        { "readlink", fs_readlink },
        { "mkdtemp", fs_mkdtemp },
        { "remove_tree", fs_remove_tree },
        { "same", fs_same },
        { "sha256", fs_sha256 },
        { "lock", fs_lock },
        { "getpid", fs_getpid },
        { "isatty", fs_isatty },
        { "term_size", fs_term_size },
        { NULL, NULL },
};

int luaopen_rr_fs(lua_State *L) {
        if (luaL_newmetatable(L, LOCK_MT)) {
                luaL_setfuncs(L, lock_meta, 0);
                luaL_newlib(L, lock_methods);
                lua_setfield(L, -2, "__index");
        }
        lua_pop(L, 1);
        if (luaL_newmetatable(L, SCRATCH_MT)) {
                lua_pushcfunction(L, scratch_gc);
                lua_setfield(L, -2, "__gc");
        }
        lua_pop(L, 1);
        luaL_newlib(L, fs_functions);
        return 1;
}
