/* rr.fs is one Lua module in two files: engine/fs.c (reading, writing, copying, looking, free
 * space, the run lock) and engine/fs_tree.c (changing the tree: mkdir_p, remove, rename,
 * remove_tree, and the `under` walk that never follows a symlink below a root). This header is
 * what the two share; nothing else includes it. */
#pragma once

#include <sys/stat.h>

#include "rr.h"

/* Push `nil, "<what>: <strerror>", "ECODE"` for a negative errno r. */
int rr_fs_fail(lua_State *L, int r, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* The same, except that a symlink met below a root (r == -ELOOP with at set) is named:
 * `nil, "<at> is a symbolic link: refusing to write through it", "ELOOP"`. */
int rr_fs_fail_at(lua_State *L, int r, const char *at, const char *fmt, ...) __attribute__((format(printf, 4, 5)));

/* A path argument: a non-empty string without NUL bytes. Raises otherwise. */
const char *rr_fs_check_path(lua_State *L, int idx);

/* opts.under (opts at idx, a table or none/nil): the state root the operation must not leave
 * through a symlink, or NULL. A bad value raises. */
const char *rr_fs_opt_under(lua_State *L, int idx);

/* Raise unless path lies below root (strictly, or root itself when may_be_root): a caller that
 * computed a path outside its own root has a bug. ".." below the root counts as outside. */
void rr_fs_check_under(lua_State *L, const char *root, const char *path, bool may_be_root);

/* Split path into its directory and last component (trailing slashes ignored). The last
 * component must be a real name: "/", "", "." and ".." give -EINVAL. */
int rr_fs_split_path(const char *path, char **ret_dir, char **ret_base);

/* Open the directory dir (O_DIRECTORY, O_CLOEXEC). root NULL: as open(2) does, following
 * symlinks. With root: root itself is opened following symlinks (it may be a link to another
 * disk), every component below it with O_NOFOLLOW; a symlink there is -ELOOP and *ret_at (freed
 * by the caller) names it. create_mode != 0: missing directories (root too) are created with
 * it. Returns the descriptor or a negative errno. */
int rr_fs_open_dir(const char *root, const char *dir, mode_t create_mode, char **ret_at);

/* Open the directory holding path's last component (see rr_fs_open_dir; never creates) and
 * return its descriptor, the last component in *ret_base. With root, the last component must
 * not be a symlink either (-ELOOP, *ret_at = path). */
int rr_fs_open_parent(const char *root, const char *path, char **ret_base, char **ret_at);

/* fsync a directory by path, so that a rename or unlink inside it survives a crash. */
int rr_fs_fsync_dir(const char *dir);

/* Lua functions of fs_tree.c, registered by fs.c. */
int rr_fs_mkdir_p(lua_State *L);
int rr_fs_remove(lua_State *L);
int rr_fs_rename(lua_State *L);
int rr_fs_remove_tree(lua_State *L);
