/* rr.fs, changing the tree: mkdir_p, remove, rename, remove_tree, and the walk behind their
 * `under` option (and write_atomic's and copy_atomic's, in fs.c).
 *
 * Why `under`: the engine keeps its state in one directory (the state root). The root itself may
 * be a symlink (an operator puts /var/lib/rrengine on another disk), but nothing below it may
 * be: a `runs` or `snapshots/<svc>` replaced by a link to elsewhere would make the engine write,
 * rename or remove through it. With `under = root`, every component below the root is opened
 * with O_NOFOLLOW from the descriptor of its parent (openat, mkdirat, renameat, unlinkat), so a
 * symlink is met, not followed, and the operation fails naming it, with nothing touched. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#include "fs.h"

#define DEFAULT_DIR_MODE 0755

static inline void closedirp(DIR **d) {
        if (*d)
                closedir(*d);
}

/* path with repeated slashes collapsed and trailing ones removed ("/" stays "/"). */
static char *normalize(const char *path) {
        char *out = malloc(strlen(path) + 1), *o = out;

        if (!out)
                return NULL;
        for (const char *p = path; *p; p++)
                if (*p != '/' || o == out || o[-1] != '/')
                        *o++ = *p;
        while (o > out + 1 && o[-1] == '/')
                o--;
        *o = '\0';
        return out;
}

/* Normalized root and the part of path below it ("" for root itself). -EXDEV when path is not
 * under root; -EINVAL when a component below root is "." or ".." (the walk would leave it). */
static int rel_under(const char *root, const char *path, char **ret_root, const char **ret_rel, char **ret_path) {
        _cleanup_(freep) char *r = normalize(root), *p = normalize(path);
        size_t n;
        const char *rel;

        if (!r || !p)
                return -ENOMEM;
        n = strlen(r);
        if (strcmp(r, "/") == 0)
                rel = p[0] == '/' ? p + 1 : NULL;
        else if (strncmp(p, r, n) == 0 && (p[n] == '\0' || p[n] == '/'))
                rel = p[n] == '/' ? p + n + 1 : p + n;
        else
                rel = NULL;
        if (!rel)
                return -EXDEV;
        for (const char *c = rel; *c;) {
                size_t len = strcspn(c, "/");
                if ((len == 1 && c[0] == '.') || (len == 2 && c[0] == '.' && c[1] == '.'))
                        return -EINVAL;
                c += len;
                if (*c == '/')
                        c++;
        }
        *ret_rel = rel;
        *ret_root = r;
        *ret_path = p;
        r = p = NULL;
        return 0;
}

void rr_fs_check_under(lua_State *L, const char *root, const char *path, bool may_be_root) {
        char *r = NULL, *p = NULL;
        const char *rel;
        int k = rel_under(root, path, &r, &rel, &p);
        bool outside = k < 0 || (!may_be_root && rel[0] == '\0');

        /* freed by hand: luaL_error does not return, so no _cleanup_ would run */
        free(r);
        free(p);
        if (k == -ENOMEM)
                luaL_error(L, "out of memory");
        if (outside) /* misuse: the caller computed a path outside its own root */
                luaL_error(L, "%s is not %sunder %s", path, may_be_root ? "" : "strictly ", root);
}

int rr_fs_open_dir(const char *root, const char *dir, mode_t create_mode, char **ret_at) {
        _cleanup_(freep) char *r = NULL, *p = NULL;
        _cleanup_(closep) int fd = -1;
        const char *rel;
        int k;

        *ret_at = NULL;
        if (!root) {
                if (create_mode) {
                        k = rr_mkdir_p(dir, create_mode);
                        if (k < 0)
                                return k;
                }
                k = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
                return k < 0 ? -errno : k;
        }

        k = rel_under(root, dir, &r, &rel, &p);
        if (k < 0)
                return k;
        fd = open(r, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0 && errno == ENOENT && create_mode) {
                k = rr_mkdir_p(r, create_mode);
                if (k < 0)
                        return k;
                fd = open(r, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        }
        if (fd < 0)
                return -errno;

        /* rel points into p: each component is cut out in place, then the '/' put back. */
        for (char *c = (char *) rel; *c;) {
                size_t len = strcspn(c, "/");
                char saved = c[len];
                int next;

                c[len] = '\0';
                next = openat(fd, c, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
                if (next < 0 && errno == ENOENT && create_mode) {
                        if (mkdirat(fd, c, create_mode) < 0 && errno != EEXIST)
                                return -errno;
                        next = openat(fd, c, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
                }
                if (next < 0) {
                        int e = errno;
                        struct stat st;
                        if ((e == ELOOP || e == ENOTDIR) && fstatat(fd, c, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
                            S_ISLNK(st.st_mode)) {
                                *ret_at = strdup(p); /* p is cut after the link: it names it */
                                return *ret_at ? -ELOOP : -ENOMEM;
                        }
                        return -e;
                }
                close(fd);
                fd = next;
                c[len] = saved;
                c += len;
                if (*c == '/')
                        c++;
        }
        k = fd;
        fd = -1;
        return k;
}

int rr_fs_open_parent(const char *root, const char *path, char **ret_base, char **ret_at) {
        _cleanup_(freep) char *dir = NULL, *base = NULL;
        _cleanup_(closep) int fd = -1;
        struct stat st;
        int r;

        *ret_at = NULL;
        r = rr_fs_split_path(path, &dir, &base);
        if (r < 0)
                return r;
        fd = rr_fs_open_dir(root, dir, 0, ret_at);
        if (fd < 0)
                return fd;
        if (root && fstatat(fd, base, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISLNK(st.st_mode)) {
                *ret_at = strdup(path);
                return *ret_at ? -ELOOP : -ENOMEM;
        }
        *ret_base = base;
        base = NULL;
        r = fd;
        fd = -1;
        return r;
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

/* fs.mkdir_p(path [, mode=0755 [, {under = root}]]) -> true | nil, err, code */
int rr_fs_mkdir_p(lua_State *L) {
        const char *path = rr_fs_check_path(L, 1), *under;
        mode_t mode = opt_mode(L, 2, DEFAULT_DIR_MODE);
        _cleanup_(freep) char *at = NULL;
        int fd;

        under = rr_fs_opt_under(L, 3);
        if (under)
                rr_fs_check_under(L, under, path, true);
        fd = rr_fs_open_dir(under, path, mode, &at);
        if (fd < 0)
                return rr_fs_fail_at(L, fd, at, "cannot create directory %s", path);
        close(fd);
        lua_pushboolean(L, 1);
        return 1;
}

/* fs.remove(path [, {under = root}]) -> true | nil, err, code: a file, a symlink or an empty
 * directory */
int rr_fs_remove(lua_State *L) {
        const char *path = rr_fs_check_path(L, 1), *under = rr_fs_opt_under(L, 2);
        _cleanup_(freep) char *at = NULL, *base = NULL;
        _cleanup_(closep) int dfd = -1;

        if (!under) {
                if (unlink(path) < 0) {
                        if (errno != EISDIR)
                                return rr_fs_fail(L, -errno, "cannot remove %s", path);
                        if (rmdir(path) < 0)
                                return rr_fs_fail(L, -errno, "cannot remove %s", path);
                }
                lua_pushboolean(L, 1);
                return 1;
        }
        rr_fs_check_under(L, under, path, false);
        dfd = rr_fs_open_parent(under, path, &base, &at);
        if (dfd < 0)
                return rr_fs_fail_at(L, dfd, at, "cannot remove %s", path);
        if (unlinkat(dfd, base, 0) < 0) {
                if (errno != EISDIR)
                        return rr_fs_fail(L, -errno, "cannot remove %s", path);
                if (unlinkat(dfd, base, AT_REMOVEDIR) < 0)
                        return rr_fs_fail(L, -errno, "cannot remove %s", path);
        }
        lua_pushboolean(L, 1);
        return 1;
}

/* fs.rename(from, to [, {under = root}]) -> true | nil, err, code (rename(2): atomic, same file
 * system) */
int rr_fs_rename(lua_State *L) {
        const char *from = rr_fs_check_path(L, 1), *to = rr_fs_check_path(L, 2), *under = rr_fs_opt_under(L, 3);
        _cleanup_(freep) char *at = NULL, *from_base = NULL, *to_base = NULL;
        _cleanup_(closep) int from_fd = -1, to_fd = -1;

        if (!under) {
                if (rename(from, to) < 0)
                        return rr_fs_fail(L, -errno, "cannot rename %s to %s", from, to);
                lua_pushboolean(L, 1);
                return 1;
        }
        rr_fs_check_under(L, under, from, false);
        rr_fs_check_under(L, under, to, false);
        from_fd = rr_fs_open_parent(under, from, &from_base, &at);
        if (from_fd < 0)
                return rr_fs_fail_at(L, from_fd, at, "cannot rename %s to %s", from, to);
        to_fd = rr_fs_open_parent(under, to, &to_base, &at);
        if (to_fd < 0)
                return rr_fs_fail_at(L, to_fd, at, "cannot rename %s to %s", from, to);
        if (renameat(from_fd, from_base, to_fd, to_base) < 0)
                return rr_fs_fail(L, -errno, "cannot rename %s to %s", from, to);
        lua_pushboolean(L, 1);
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

/* Number of components of an absolute, canonical path ("/" has 0). */
static int path_depth(const char *p) {
        int n = 0;
        for (; *p; p++)
                if (*p == '/' && p[1] != '\0' && p[1] != '/')
                        n++;
        return n;
}

/* Remove the tree at base in the directory pfd (path as the caller wrote it). Returns 0 or a
 * negative errno; details of the first error inside the tree go to c. */
static int remove_tree_at(int pfd, const char *base, const char *path, RmCtx *c) {
        struct stat pst, st;
        int fd, r;

        if (fstat(pfd, &pst) < 0)
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

/* The directory that holds path (opened through under's walk when given, else by its resolved
 * path) and the resolved path the depth check reads: *ret_where. */
static int remove_tree_parent(const char *under, const char *path, char **ret_base, char **ret_where, char **ret_at) {
        _cleanup_(freep) char *dir = NULL, *canon = NULL;
        _cleanup_(closep) int pfd = -1;
        int r;

        r = rr_fs_split_path(path, &dir, ret_base);
        if (r < 0)
                return r == -ENOMEM ? r : -EPERM;
        if (under) {
                free(*ret_base);
                *ret_base = NULL;
                pfd = rr_fs_open_parent(under, path, ret_base, ret_at);
                if (pfd < 0)
                        return pfd;
        }
        canon = realpath(dir, NULL);
        if (!canon)
                return -errno;
        if (asprintf(ret_where, "%s%s%s", canon, strcmp(canon, "/") == 0 ? "" : "/", *ret_base) < 0) {
                *ret_where = NULL;
                return -ENOMEM;
        }
        if (pfd < 0) {
                pfd = open(canon, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
                if (pfd < 0)
                        return -errno;
        }
        r = pfd;
        pfd = -1;
        return r;
}

/* fs.remove_tree(path [, {under = root}]) -> true | nil, err, code: rm -r without following
 * symlinks or crossing mounts; refuses "/" and any path with fewer than 2 components once its
 * parent is resolved. */
int rr_fs_remove_tree(lua_State *L) {
        const char *path = rr_fs_check_path(L, 1), *under = rr_fs_opt_under(L, 2);
        _cleanup_(freep) char *base = NULL, *where = NULL, *at = NULL, *inside = NULL;
        _cleanup_(closep) int pfd = -1;
        RmCtx c = { 0 };
        int r;

        if (under)
                rr_fs_check_under(L, under, path, false);
        pfd = remove_tree_parent(under, path, &base, &where, &at);
        if (pfd == -EPERM)
                return rr_push_fail(L, EPERM, "refusing to remove %s: not a removable path", path);
        if (pfd < 0)
                return rr_fs_fail_at(L, pfd, at, "cannot remove %s", path);
        if (path_depth(where) < 2)
                return rr_push_fail(L, EPERM, "refusing to remove %s: fewer than 2 path components", where);

        r = remove_tree_at(pfd, base, path, &c);
        inside = c.error_path;
        if (r == 0) {
                lua_pushboolean(L, 1);
                return 1;
        }
        if (r == -EBUSY && !inside)
                return rr_push_fail(L, EBUSY, "refusing to remove %s: it is a mount point", path);
        if (r == -EXDEV)
                return rr_push_fail(L, EXDEV, "cannot remove %s: %s is a mount point", path, inside ? inside : path);
        if (inside && strcmp(inside, path) != 0)
                return rr_fs_fail(L, r, "cannot remove %s (at %s)", path, inside);
        return rr_fs_fail(L, r, "cannot remove %s", path);
}
