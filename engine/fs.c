/* rr.fs: the file operations the restart flow needs to snapshot definitions and undo a deploy
 * without ever losing a file: atomic writes and copies (temp file in the same directory, fsync,
 * rename, fsync of the directory), stat/list, streaming comparison and SHA-256, free space, and
 * the run lock (flock) that names its holder. Changing the tree (mkdir_p, remove, rename,
 * remove_tree) and the `under` walk that never follows a symlink below the state root are in
 * engine/fs_tree.c.
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
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/statvfs.h>

#include <openssl/evp.h>

#include "fs.h"

#define LOCK_MT "rr.fs.lock"
#define SCRATCH_MT "rr.fs.scratch"
#define COPY_CHUNK (128 * 1024)

static inline void evp_md_ctx_freep(EVP_MD_CTX **c) {
        EVP_MD_CTX_free(*c);
}

static int vfail(lua_State *L, int r, const char *fmt, va_list ap) {
        char what[1024];

        vsnprintf(what, sizeof what, fmt, ap);
        return rr_push_fail(L, -r, "%s: %s", what, strerror(-r));
}

int rr_fs_fail(lua_State *L, int r, const char *fmt, ...) {
        va_list ap;
        int n;

        va_start(ap, fmt);
        n = vfail(L, r, fmt, ap);
        va_end(ap);
        return n;
}

int rr_fs_fail_at(lua_State *L, int r, const char *at, const char *fmt, ...) {
        va_list ap;
        int n;

        if (r == -ELOOP && at)
                return rr_push_fail(L, ELOOP, "%s is a symbolic link: refusing to write through it", at);
        va_start(ap, fmt);
        n = vfail(L, r, fmt, ap);
        va_end(ap);
        return n;
}

const char *rr_fs_check_path(lua_State *L, int idx) {
        size_t len;
        const char *p = luaL_checklstring(L, idx, &len);
        luaL_argcheck(L, strlen(p) == len, idx, "path contains a NUL byte");
        luaL_argcheck(L, len > 0, idx, "path is empty");
        return p;
}

const char *rr_fs_opt_under(lua_State *L, int idx) {
        const char *root = NULL;
        size_t len;

        if (lua_isnoneornil(L, idx))
                return NULL;
        luaL_checktype(L, idx, LUA_TTABLE);
        if (lua_getfield(L, idx, "under") != LUA_TNIL) {
                if (lua_type(L, -1) != LUA_TSTRING)
                        luaL_error(L, "bad option 'under' (the state root: a directory path expected)");
                root = lua_tolstring(L, -1, &len);
                if (len == 0 || strlen(root) != len)
                        luaL_error(L, "bad option 'under' (an empty path, or one with a NUL byte)");
        }
        lua_pop(L, 1); /* the string stays alive in the options table */
        return root;
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

int rr_fs_split_path(const char *path, char **ret_dir, char **ret_base) {
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

int rr_fs_fsync_dir(const char *dir) {
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

/* Everything happens relative to the target's directory, opened once: the temp file is created
 * there (O_EXCL|O_NOFOLLOW: never through a symlink planted under its name) and renamed over
 * the target there, so with `under` the directory checked is the one written. */
typedef struct Atomic {
        int dirfd;  /* directory of the target */
        char *base; /* the target's name in it */
        char *tmp;  /* the temp file's name in it while it exists */
        int fd;
        bool nosync; /* rename only: whole against a killed process, not against a power loss */
} Atomic;

static void atomic_done(Atomic *a) {
        if (a->fd >= 0)
                close(a->fd);
        if (a->tmp)
                (void) unlinkat(a->dirfd, a->tmp, 0);
        if (a->dirfd >= 0)
                close(a->dirfd);
        free(a->tmp);
        free(a->base);
        *a = (Atomic) { .fd = -1, .dirfd = -1 };
}

/* Create the temp file ".<name>.XXXXXX" beside path (mode 0600 until atomic_commit), its
 * directory reached through under's walk when under is set (*at then names a symlink met, for
 * -ELOOP). On failure nothing is left to release but *at. */
static int atomic_begin(Atomic *a, const char *under, const char *path, char **at) {
        static const char chars[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        int r;

        *a = (Atomic) { .fd = -1, .dirfd = -1 };
        r = rr_fs_open_parent(under, path, &a->base, at);
        if (r < 0)
                return r;
        a->dirfd = r;
        if (asprintf(&a->tmp, ".%s.XXXXXX", a->base) < 0) {
                a->tmp = NULL;
                atomic_done(a);
                return -ENOMEM;
        }
        for (int attempt = 0; attempt < 100; attempt++) {
                unsigned char rnd[6];
                char *x = a->tmp + strlen(a->tmp) - 6;

                if (getrandom(rnd, sizeof rnd, 0) != (ssize_t) sizeof rnd) {
                        r = -EIO;
                        break;
                }
                for (size_t i = 0; i < sizeof rnd; i++)
                        x[i] = chars[rnd[i] % (sizeof chars - 1)];
                a->fd = openat(a->dirfd, a->tmp, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
                if (a->fd >= 0)
                        return 0;
                r = -errno;
                if (r != -EEXIST)
                        break;
        }
        free(a->tmp);
        a->tmp = NULL; /* nothing to unlink */
        atomic_done(a);
        return r;
}

/* Set owner and mode on the written temp file, fsync it, rename it over the target, fsync the
 * directory. uid/gid -1: leave. Ownership first: chown clears set-id bits that fchmod sets. */
static int atomic_commit(Atomic *a, mode_t mode, uid_t uid, gid_t gid, bool owner_best_effort,
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
        if (!a->nosync && fsync(a->fd) < 0)
                return -errno;
        r = close(a->fd);
        a->fd = -1;
        if (r < 0)
                return -errno;
        if (renameat(a->dirfd, a->tmp, a->dirfd, a->base) < 0)
                return -errno;
        free(a->tmp);
        a->tmp = NULL; /* it is the target now */
        if (a->nosync)
                return 0;
        return fsync(a->dirfd) < 0 ? -errno : 0;
}

/* The owner a replaced file keeps: that of the regular file being replaced, if any and not ours. */
static void inherit_owner(const Atomic *a, uid_t *uid, gid_t *gid, mode_t *mode) {
        struct stat st;

        if (fstatat(a->dirfd, a->base, &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISREG(st.st_mode))
                return;
        if (*mode == (mode_t) -1)
                *mode = st.st_mode & 07777;
        if (*uid == (uid_t) -1 && st.st_uid != geteuid())
                *uid = st.st_uid;
        if (*gid == (gid_t) -1 && st.st_gid != getegid())
                *gid = st.st_gid;
}

/* fs.write_atomic(path, data, {mode=, uid=, gid=, under=, sync=}) -> true | nil, err, code */
static int fs_write_atomic(lua_State *L) {
        const char *path = rr_fs_check_path(L, 1), *under;
        size_t len;
        const char *data = luaL_checklstring(L, 2, &len);
        _cleanup_(freep) char *at = NULL;
        long long m, u, g;
        mode_t mode;
        uid_t uid;
        gid_t gid;
        bool explicit_owner, nosync = false;
        Atomic a;
        int r;

        under = rr_fs_opt_under(L, 3);
        if (under)
                rr_fs_check_under(L, under, path, false);
        m = opt_field_mode(L, 3);
        u = opt_field_int(L, 3, "uid", 0, UINT32_MAX - 1);
        g = opt_field_int(L, 3, "gid", 0, UINT32_MAX - 1);
        mode = m >= 0 ? (mode_t) m : (mode_t) -1;
        uid = u >= 0 ? (uid_t) u : (uid_t) -1;
        gid = g >= 0 ? (gid_t) g : (gid_t) -1;
        explicit_owner = u >= 0 || g >= 0;

        if (lua_type(L, 3) == LUA_TTABLE) {
                lua_getfield(L, 3, "sync");
                if (!lua_isnil(L, -1) && !lua_isboolean(L, -1))
                        luaL_error(L, "bad option 'sync' (boolean expected, got %s)", luaL_typename(L, -1));
                nosync = lua_isboolean(L, -1) && !lua_toboolean(L, -1);
                lua_pop(L, 1);
        }

        r = atomic_begin(&a, under, path, &at);
        if (r < 0)
                return rr_fs_fail_at(L, r, at, "cannot create a temporary file for %s", path);
        a.nosync = nosync;
        /* A replaced file keeps its mode and owner unless told otherwise. */
        inherit_owner(&a, &uid, &gid, &mode);
        if (mode == (mode_t) -1)
                mode = 0666 & ~current_umask();
        r = write_all(a.fd, data, len);
        if (r >= 0)
                r = atomic_commit(&a, mode, uid, gid, !explicit_owner && geteuid() != 0, NULL);
        atomic_done(&a);
        if (r < 0)
                return rr_fs_fail(L, r, "cannot write %s", path);
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
 * src's; times: keep src's atime and mtime; under: see atomic_begin. *failed names the path an
 * error is about. */
static int copy_file_atomic(const char *src, const char *under, const char *dst, long long mode, long long uid,
                            long long gid, bool times, const char **failed, char **at) {
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
        r = atomic_begin(&a, under, dst, at);
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
                r = atomic_commit(&a, mode >= 0 ? (mode_t) mode : st.st_mode & 07777,
                                  uid >= 0 ? (uid_t) uid : (st.st_uid != geteuid() ? st.st_uid : (uid_t) -1),
                                  gid >= 0 ? (gid_t) gid : (st.st_gid != getegid() ? st.st_gid : (gid_t) -1),
                                  uid < 0 && gid < 0 && geteuid() != 0, times ? ts : NULL);
        }
        atomic_done(&a);
        return r;
}

/* fs.copy_atomic(src, dst, {mode=, uid=, gid=, times=true, under=}) -> true | nil, err, code */
static int fs_copy_atomic(lua_State *L) {
        const char *src = rr_fs_check_path(L, 1), *dst = rr_fs_check_path(L, 2), *failed, *under;
        _cleanup_(freep) char *at = NULL;
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
        under = rr_fs_opt_under(L, 3);
        if (under)
                rr_fs_check_under(L, under, dst, false);

        r = copy_file_atomic(src, under, dst, m, u, g, times, &failed, &at);
        if (r == -ELOOP && failed == src)
                return rr_push_fail(L, ELOOP, "cannot copy %s: it is a symbolic link", src);
        if ((r == -EINVAL || r == -EISDIR) && failed == src)
                return rr_push_fail(L, -r, "cannot copy %s: not a regular file", src);
        if (r < 0)
                return rr_fs_fail_at(L, r, at, "cannot copy %s to %s (%s)", src, dst, failed == src ? "reading" : "writing");
        lua_pushboolean(L, 1);
        return 1;
}

/* fs.read(path) -> string | nil, err, code */
static int fs_read(lua_State *L) {
        const char *path = rr_fs_check_path(L, 1);
        Scratch *s = scratch_new(L);
        luaL_Buffer b;
        struct stat st;
        size_t want = 16 * 1024;

        s->fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (s->fd < 0)
                return rr_fs_fail(L, -errno, "cannot read %s", path);
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
                        return rr_fs_fail(L, -e, "cannot read %s", path); /* the buffer is dropped */
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
        const char *path = rr_fs_check_path(L, 1);
        bool follow = lua_toboolean(L, 2);
        struct stat st;

        if ((follow ? stat(path, &st) : lstat(path, &st)) < 0)
                return rr_fs_fail(L, -errno, "cannot stat %s", path);
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
        const char *path = rr_fs_check_path(L, 1);
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
        return rr_fs_fail(L, -errno, "cannot stat %s", path);
}

/* fs.rr_fs_fsync_dir(path) -> true | nil, err, code */
static int fs_fsync_dir(lua_State *L) {
        const char *path = rr_fs_check_path(L, 1);
        int r = rr_fs_fsync_dir(path);

        if (r < 0)
                return rr_fs_fail(L, r, "cannot fsync %s", path);
        lua_pushboolean(L, 1);
        return 1;
}

/* fs.list(dir) -> { names sorted bytewise, without "." and ".." } | nil, err, code */
static int fs_list(lua_State *L) {
        const char *path = rr_fs_check_path(L, 1);
        Scratch *s = scratch_new(L); /* scratch */
        lua_Integer n = 0;
        RrName *names;
        int unsorted;

        s->dir = opendir(path);
        if (!s->dir)
                return rr_fs_fail(L, -errno, "cannot list %s", path);
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
                                return rr_fs_fail(L, -e, "cannot list %s", path);
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
        const char *path = rr_fs_check_path(L, 1);
        _cleanup_(freep) char *r = realpath(path, NULL);

        if (!r)
                return rr_fs_fail(L, -errno, "cannot resolve %s", path);
        lua_pushstring(L, r);
        return 1;
}

/* fs.symlink(target, path) -> true | nil, err, code (target is stored as given) */
static int fs_symlink(lua_State *L) {
        const char *target = rr_fs_check_path(L, 1), *path = rr_fs_check_path(L, 2);

        if (symlink(target, path) < 0)
                return rr_fs_fail(L, -errno, "cannot create symlink %s", path);
        lua_pushboolean(L, 1);
        return 1;
}

/* fs.readlink(path) -> target | nil, err, code ("EINVAL": not a symlink) */
static int fs_readlink(lua_State *L) {
        const char *path = rr_fs_check_path(L, 1);
        char buf[PATH_MAX];
        ssize_t n = readlink(path, buf, sizeof buf);

        if (n < 0)
                return rr_fs_fail(L, -errno, "cannot read link %s", path);
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
                r = asprintf(&tmpl, "%sXXXXXX", rr_fs_check_path(L, 1));
        if (r < 0) {
                tmpl = NULL; /* undefined after a failure */
                return rr_fs_fail(L, -ENOMEM, "cannot create a temporary directory");
        }
        if (!mkdtemp(tmpl))
                return rr_fs_fail(L, -errno, "cannot create a directory from %s", tmpl);
        lua_pushstring(L, tmpl);
        return 1;
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
        const char *a = rr_fs_check_path(L, 1), *b = rr_fs_check_path(L, 2), *failed;
        int r = files_same(a, b, &failed);

        if (r < 0)
                return rr_fs_fail(L, r, "cannot compare %s", failed);
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
        const char *path = rr_fs_check_path(L, 1);
        char hex[65];
        int r = file_sha256(path, hex);

        if (r < 0)
                return rr_fs_fail(L, r, "cannot hash %s", path);
        lua_pushstring(L, hex);
        return 1;
}

/* ---- free space ---- */

/* fs.statvfs(path) -> {size=, free=, avail=, bsize=, files=, ffree=} | nil, err, code: the file
 * system that holds path (symlinks followed), in bytes; avail is what an unprivileged writer
 * may still use (free less the blocks reserved for root), files/ffree count inodes (0 where the
 * file system has no fixed number). */
static int fs_statvfs(lua_State *L) {
        const char *path = rr_fs_check_path(L, 1);
        struct statvfs sv;
        unsigned long bs;

        if (statvfs(path, &sv) < 0)
                return rr_fs_fail(L, -errno, "cannot read the free space of the file system of %s", path);
        bs = sv.f_frsize ? sv.f_frsize : sv.f_bsize;
        lua_createtable(L, 0, 6);
        lua_pushinteger(L, (lua_Integer) (sv.f_blocks * bs));
        lua_setfield(L, -2, "size");
        lua_pushinteger(L, (lua_Integer) (sv.f_bfree * bs));
        lua_setfield(L, -2, "free");
        lua_pushinteger(L, (lua_Integer) (sv.f_bavail * bs));
        lua_setfield(L, -2, "avail");
        lua_pushinteger(L, (lua_Integer) bs);
        lua_setfield(L, -2, "bsize");
        lua_pushinteger(L, (lua_Integer) sv.f_files);
        lua_setfield(L, -2, "files");
        lua_pushinteger(L, (lua_Integer) sv.f_favail);
        lua_setfield(L, -2, "ffree");
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

/* Record our PID: write first, then cut, so a reader sees one PID or another, never "". A
 * short write is retried, so that a file system that just filled up says ENOSPC; on failure
 * the file is emptied (best effort): a partial PID would name another process. */
static int lock_write_pid(int fd) {
        char buf[32];
        int n = snprintf(buf, sizeof buf, "%d\n", (int) getpid());
        size_t done = 0;

        while (done < (size_t) n) {
                ssize_t k = pwrite(fd, buf + done, (size_t) n - done, (off_t) done);
                if (k < 0 && errno == EINTR)
                        continue;
                if (k <= 0) {
                        int r = k < 0 ? -errno : -EIO;
                        /* best effort: a half-written PID must not name a stranger; the write's
                         * own error is what the caller reports */
                        if (ftruncate(fd, 0) < 0)
                                r = r == -EIO ? -errno : r;
                        return r;
                }
                done += (size_t) k;
        }
        if (ftruncate(fd, n) < 0)
                return -errno;
        return 0;
}

/* fs.lock(path) -> lock | nil, "locked by pid N", "EWOULDBLOCK", N | nil, err, code */
static int fs_lock(lua_State *L) {
        const char *path = rr_fs_check_path(L, 1);
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
                        return rr_fs_fail(L, -errno, "cannot open lock file %s", path);
                if (flock(l->fd, LOCK_EX | LOCK_NB) == 0) {
                        if (fstat(l->fd, &a) < 0) {
                                r = -errno;
                                break;
                        }
                        if (lstat(path, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino) {
                                r = lock_write_pid(l->fd);
                                if (r >= 0)
                                        return 1;
                                close(l->fd);
                                l->fd = -1;
                                return rr_fs_fail(L, r, "cannot write our PID into the lock file %s", path);
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
        return rr_fs_fail(L, r, "cannot lock %s", path);
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
        { "mkdir_p", rr_fs_mkdir_p },
        { "remove", rr_fs_remove },
        { "rename", rr_fs_rename },
        { "fsync_dir", fs_fsync_dir },
        { "list", fs_list },
        { "realpath", fs_realpath },
        { "symlink", fs_symlink },
        { "readlink", fs_readlink },
        { "mkdtemp", fs_mkdtemp },
        { "remove_tree", rr_fs_remove_tree },
        { "same", fs_same },
        { "sha256", fs_sha256 },
        { "statvfs", fs_statvfs },
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
