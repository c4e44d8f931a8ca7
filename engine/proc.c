/* rr.proc: child processes on the loop. A process is spawned from an argv array (never a
 * shell) with posix_spawnp() into a process group of its own, its stdout and stderr read through
 * non-blocking pipes (output.c, which rr.systemd's m:run() shares), its exit seen through
 * sd_event_add_child() (which also reaps it), a timeout through a time source that signals the
 * whole group.
 *
 * Why posix_spawnp(): glibc implements it with clone(CLONE_VM|CLONE_VFORK) and reports a failed
 * exec (or dup2/chdir) as its return value through its own CLOEXEC channel, so "no such program"
 * is known before we return; it resets the signal mask and dispositions (POSIX_SPAWN_SETSIGMASK,
 * POSIX_SPAWN_SETSIGDEF with every signal: the engine blocks SIGCHLD/SIGINT/SIGTERM/SIGHUP and
 * ignores SIGPIPE, a child gets none of that), makes the process group
 * (POSIX_SPAWN_SETPGROUP: the parent is suspended until the exec, so the group exists before any
 * kill(-pid)), changes directory and closes every other descriptor (closefrom) in the child.
 *
 * When is a process finished? When it has exited and both pipes reached end of file. A
 * background grandchild may keep a pipe open forever (a daemon started by a shell script): so
 * when the process itself exits, whatever is already in the pipes is read at once and a pipe not
 * at end of file then is closed. Output written later by such a grandchild is not collected.
 * p:wait() returns once the process is finished and every on_line callback it caused returned. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <limits.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include "output.h"
#include "rr.h"

#define PROCESS_MT "rr.proc.process"
#define DEFAULT_KILL_GRACE 2.0

extern char **environ;

typedef struct Proc Proc;
typedef struct WaitOp WaitOp;

/* One caller waiting in p:wait() or proc.run(). */
struct WaitOp {
        RrOp op;
        Proc *proc; /* NULL once the handle was closed under it */
        WaitOp *next;
};

struct Proc {
        pid_t pid; /* 0 until spawned */
        char *name; /* argv[0], for messages */
        sd_event_source *child_source, *timer_source, *stdin_source;
        RrOutput output; /* stdout and stderr */
        int stdin_fd;
        char *stdin_data;
        size_t stdin_len, stdin_off;
        double timeout, kill_grace;
        double start, duration;
        bool exited;    /* seen by the child source (then reaped by sd-event) or reaped by us */
        bool finished;  /* exited and both pipes done */
        bool timed_out; /* the timeout fired: TERM (then KILL) was sent to the group */
        int exit_code;  /* -1 when killed by a signal */
        int signal;     /* 0 when it exited */
        WaitOp *waiters;
};

/* The userdata: a box, created closed (proc NULL) before anything is acquired (liolib style).
 * Its user value is the output's box (output.h), which holds on_line. */
typedef struct Box {
        Proc *proc;
} Box;

/* "SIGTERM" for 15, "SIG99" for a number without a name (a static buffer). */
static const char *signal_name(int sig) {
        static char buf[32];
        const char *abbrev = sigabbrev_np(sig);
        if (abbrev)
                snprintf(buf, sizeof buf, "SIG%s", abbrev);
        else
                snprintf(buf, sizeof buf, "SIG%d", sig);
        return buf;
}

/* Signal the whole process group. Only while the leader is not reaped: its PID, which is also
 * the group's ID, cannot be reused by another process before that. */
static int proc_signal(Proc *p, int sig) {
        if (p->pid <= 0 || p->exited)
                return -ESRCH;
        if (kill(-p->pid, sig) < 0)
                return -errno;
        return 0;
}

/* ---- completion ---- */

/* Wake the waiters once the process is finished and its line callbacks have all returned. */
static void proc_maybe_complete(Proc *p) {
        if (!p->finished && p->exited && p->output.out.eof && p->output.err.eof)
                p->finished = true;
        if (!p->finished || !rr_output_idle(&p->output))
                return;
        for (WaitOp *w = p->waiters; w; w = w->next)
                rr_op_complete(&w->op);
}

/* The output's progress(): a pipe ended or an on_line call returned. */
static void output_progress(RrOutput *o) {
        proc_maybe_complete((Proc *) ((char *) o - offsetof(Proc, output)));
}

/* ---- stdin ---- */

/* write() that cannot kill the engine with SIGPIPE when the child closed its stdin: SIGPIPE is
 * blocked around the call and a SIGPIPE it raised is consumed. The engine ignores SIGPIPE since
 * rr_loop_init(); this keeps the module safe on its own (a host that restores the default). */
static ssize_t write_nosigpipe(int fd, const void *buf, size_t len) {
        sigset_t pipe_set, old, pending;
        bool was_pending;
        ssize_t n;
        int saved;

        sigemptyset(&pipe_set);
        sigaddset(&pipe_set, SIGPIPE);
        sigpending(&pending);
        was_pending = sigismember(&pending, SIGPIPE);
        sigprocmask(SIG_BLOCK, &pipe_set, &old);
        n = write(fd, buf, len);
        saved = errno;
        if (n < 0 && saved == EPIPE && !was_pending) {
                const struct timespec zero = { 0, 0 };
                sigtimedwait(&pipe_set, NULL, &zero);
        }
        sigprocmask(SIG_SETMASK, &old, NULL);
        errno = saved;
        return n;
}

/* Done with the child's stdin: close the pipe, free the data. Idempotent. */
static void stdin_close(Proc *p) {
        p->stdin_source = sd_event_source_disable_unref(p->stdin_source);
        if (p->stdin_fd >= 0)
                close(p->stdin_fd);
        p->stdin_fd = -1;
        free(p->stdin_data);
        p->stdin_data = NULL;
}

/* Write what the pipe takes; close it when all is written or the child stopped reading. */
static void stdin_pump(Proc *p) {
        while (p->stdin_fd >= 0 && p->stdin_off < p->stdin_len) {
                ssize_t n = write_nosigpipe(p->stdin_fd, p->stdin_data + p->stdin_off, p->stdin_len - p->stdin_off);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN)
                                return;
                        break; /* EPIPE: the child does not want the rest */
                }
                p->stdin_off += (size_t) n;
        }
        stdin_close(p);
}

/* The child's stdin takes more. */
static int stdin_io(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        (void) s;
        (void) fd;
        (void) revents;
        stdin_pump(userdata);
        return 0;
}

/* ---- exit and timeout ---- */

/* The process exited: record how, collect what it wrote, finish it. */
static int child_exited(sd_event_source *s, const siginfo_t *si, void *userdata) {
        Proc *p = userdata;

        (void) s;
        /* sd-event calls us while the child is still a zombie and reaps it when we return: the
         * group ID is still ours here, so a timed-out group's stragglers can be killed safely. */
        if (p->timed_out)
                (void) kill(-p->pid, SIGKILL);
        p->exited = true;
        p->duration = rr_now() - p->start;
        if (si->si_code == CLD_EXITED) {
                p->exit_code = si->si_status;
                p->signal = 0;
        } else {
                p->exit_code = -1;
                p->signal = si->si_status;
        }
        /* Drop the source now, not when the handle goes: sd-event keeps one source per PID and
         * refuses a second (EBUSY), so a lingering handle would make spawn fail once the kernel
         * reuses the PID. Unref'ing inside the callback is allowed (the source is only detached;
         * sd-event still reaps the zombie and frees it after we return). */
        p->child_source = sd_event_source_disable_unref(p->child_source);
        p->timer_source = sd_event_source_disable_unref(p->timer_source);
        stdin_close(p);
        /* What the process wrote is in the pipes now (a dying process closes its files before it
         * is reported). A pipe still open after that is held by a grandchild: do not wait for it. */
        rr_output_drain(&p->output);
        proc_maybe_complete(p);
        return 0;
}

/* opts.timeout passed: TERM to the group, then KILL kill_grace seconds later. */
static int timer_fired(sd_event_source *s, uint64_t usec, void *userdata) {
        Proc *p = userdata;

        (void) usec;
        if (p->exited)
                return 0;
        if (!p->timed_out) {
                p->timed_out = true;
                (void) proc_signal(p, SIGTERM);
                if (sd_event_source_set_time_relative(s, (uint64_t) (p->kill_grace * 1e6)) >= 0 &&
                    sd_event_source_set_enabled(s, SD_EVENT_ONESHOT) >= 0)
                        return 0;
        }
        (void) proc_signal(p, SIGKILL);
        return 0;
}

/* ---- life cycle ---- */

/* Kill the group of a still-running process and reap it; release everything. Idempotent through
 * the box. Waiters still waiting are woken: their wait returns nil, "... closed". */
static void proc_free(Proc *p) {
        if (!p)
                return;
        if (p->pid > 0 && !p->exited) {
                (void) kill(-p->pid, SIGKILL);
                /* Without its source sd-event does not reap it: we do, now (SIGKILL is quick). */
                p->child_source = sd_event_source_disable_unref(p->child_source);
                while (waitpid(p->pid, NULL, 0) < 0 && errno == EINTR)
                        ;
                p->exited = true;
        }
        p->child_source = sd_event_source_disable_unref(p->child_source);
        p->timer_source = sd_event_source_disable_unref(p->timer_source);
        stdin_close(p);
        rr_output_free(&p->output);
        for (WaitOp *w = p->waiters; w; w = w->next) {
                w->proc = NULL;
                rr_op_complete(&w->op);
        }
        free(p->name);
        free(p);
}

/* The process handle at idx, open or closed. */
static Box *check_box(lua_State *L, int idx) {
        return luaL_checkudata(L, idx, PROCESS_MT);
}

/* The process of the open handle at idx; raises when it was closed. */
static Proc *check_proc(lua_State *L, int idx) {
        Box *b = check_box(L, idx);
        if (!b->proc)
                luaL_error(L, "attempt to use a closed process handle");
        return b->proc;
}

/* ---- results ---- */

/* Push what run() and wait() return: res, or nil, message, CODE, res (CODE: "ETIMEDOUT",
 * "ESIGNAL" or "EEXIT"), the one failure form of every primitive (as rr.systemd's m:run). */
static int push_result(lua_State *L, Proc *p) {
        luaL_checkstack(L, 6, NULL);
        lua_createtable(L, 0, 10); /* res */
        if (p->signal == 0) {
                lua_pushinteger(L, p->exit_code);
                lua_setfield(L, -2, "exit_code");
        } else {
                lua_pushstring(L, signal_name(p->signal));
                lua_setfield(L, -2, "signal");
        }
        lua_pushboolean(L, p->timed_out);
        lua_setfield(L, -2, "timed_out");
        rr_output_push(L, &p->output);
        lua_pushnumber(L, p->duration);
        lua_setfield(L, -2, "duration");
        lua_pushinteger(L, p->pid);
        lua_setfield(L, -2, "pid");

        if (p->signal == 0 && p->exit_code == 0 && !p->timed_out)
                return 1;
        lua_pushnil(L); /* res nil */
        if (p->timed_out) {
                char secs[32];
                snprintf(secs, sizeof secs, "%g", p->timeout);
                lua_pushfstring(L, "%s timed out after %s s (killed)", p->name, secs);
                lua_pushliteral(L, "ETIMEDOUT");
        } else if (p->signal != 0) {
                lua_pushfstring(L, "%s killed by %s", p->name, signal_name(p->signal));
                lua_pushliteral(L, "ESIGNAL");
        } else {
                lua_pushfstring(L, "%s exited with code %d", p->name, p->exit_code);
                lua_pushliteral(L, "EEXIT");
        }
        lua_rotate(L, -4, -1); /* nil message CODE res */
        return 4;
}

/* RrOp.push of a wait: the result, or nil, message when the handle was closed meanwhile. */
static int wait_push(lua_State *L, RrOp *op) {
        WaitOp *w = (WaitOp *) op;

        if (!w->proc) {
                lua_pushnil(L);
                lua_pushliteral(L, "process handle closed while waiting");
                lua_pushliteral(L, "EBADF");
                return 3;
        }
        return push_result(L, w->proc);
}

/* RrOp.release of a wait: off the process's list of waiters, freed. */
static void wait_release(RrOp *op) {
        WaitOp *w = (WaitOp *) op;

        if (w->proc)
                for (WaitOp **q = &w->proc->waiters; *q; q = &(*q)->next)
                        if (*q == w) {
                                *q = w->next;
                                break;
                        }
        free(w);
}

/* Wait for p to finish and push its result; the caller keeps p's handle on its stack meanwhile
 * (the handle owns p). */
static int proc_wait(lua_State *L, Proc *p) {
        WaitOp *w;

        if (p->finished && rr_output_idle(&p->output))
                return push_result(L, p);
        w = calloc(1, sizeof *w);
        if (!w)
                return luaL_error(L, "out of memory");
        w->op.push = wait_push;
        w->op.release = wait_release;
        w->proc = p;
        w->next = p->waiters;
        p->waiters = w;
        return rr_op_await(L, &w->op);
}

/* ---- spawning ---- */

typedef struct SpawnArgs {
        const char **argv;
        const char **envp;
        const char *cwd;
        const char *stdin_data;
        size_t stdin_len;
        bool capture;
        size_t max_capture;
        double timeout, kill_grace;
        int on_line_idx; /* stack index of the callback, 0 without */
} SpawnArgs;

/* An environment variable name: not empty, no '=' and no NUL byte. */
static bool env_name_ok(const char *s, size_t len) {
        return len > 0 && strlen(s) == len && !strchr(s, '=');
}

/* Fill a->envp from environ and opts.env (at env_idx, 0 for none): NAME=value strings anchored in
 * a new table left on the stack, the pointer array in a userdata left above it. */
static void build_env(lua_State *L, int env_idx, bool clear, SpawnArgs *a) {
        int list, n = 0;
        const char **envp;

        lua_newtable(L); /* the strings, anchored */
        list = lua_gettop(L);
        if (!clear)
                for (char **e = environ; *e; e++) {
                        const char *eq = strchr(*e, '=');
                        if (!eq)
                                continue;
                        if (env_idx) {
                                /* Overridden or removed by opts.env? */
                                lua_pushlstring(L, *e, (size_t) (eq - *e));
                                bool overridden = lua_rawget(L, env_idx) != LUA_TNIL;
                                lua_pop(L, 1);
                                if (overridden)
                                        continue;
                        }
                        lua_pushstring(L, *e);
                        lua_rawseti(L, list, ++n);
                }
        if (env_idx) {
                lua_pushnil(L);
                while (lua_next(L, env_idx)) { /* key value */
                        size_t klen;
                        const char *k;
                        if (lua_type(L, -2) != LUA_TSTRING)
                                luaL_error(L, "bad option 'env' (names must be strings)");
                        k = lua_tolstring(L, -2, &klen);
                        if (!env_name_ok(k, klen))
                                luaL_error(L, "bad option 'env' (invalid variable name '%s')", k);
                        if (lua_type(L, -1) == LUA_TBOOLEAN && !lua_toboolean(L, -1)) {
                                lua_pop(L, 1); /* NAME = false: unset */
                                continue;
                        }
                        if (lua_type(L, -1) != LUA_TSTRING && lua_type(L, -1) != LUA_TNUMBER)
                                luaL_error(L, "bad option 'env' (value of %s must be a string, a number or false)", k);
                        lua_pushvalue(L, -2);
                        lua_pushliteral(L, "=");
                        lua_pushvalue(L, -3);
                        lua_concat(L, 3); /* key value "k=v" */
                        {
                                size_t len;
                                const char *s = lua_tolstring(L, -1, &len);
                                if (strlen(s) != len)
                                        luaL_error(L, "bad option 'env' (value of %s contains a NUL byte)", k);
                        }
                        lua_rawseti(L, list, ++n);
                        lua_pop(L, 1); /* key */
                }
        }
        envp = lua_newuserdatauv(L, sizeof(char *) * ((size_t) n + 1), 0);
        for (int i = 1; i <= n; i++) {
                lua_rawgeti(L, list, i);
                envp[i - 1] = lua_tostring(L, -1); /* anchored in list */
                lua_pop(L, 1);
        }
        envp[n] = NULL;
        a->envp = envp;
}

static const char *const option_names[] = {
        "cwd", "env", "env_clear", "timeout", "kill_grace", "on_line", "stdin", "capture", "max_capture", NULL,
};

/* Check argv (1) and opts (2); leaves anchors for every string pointer it stores on the stack. */
static void parse_args(lua_State *L, SpawnArgs *a) {
        int n, env_idx = 0;
        bool env_clear = false;

        memset(a, 0, sizeof *a);
        a->capture = true;
        a->max_capture = RR_OUTPUT_DEFAULT_MAX_CAPTURE;
        a->kill_grace = DEFAULT_KILL_GRACE;

        luaL_checktype(L, 1, LUA_TTABLE);
        n = (int) luaL_len(L, 1);
        luaL_argcheck(L, n > 0, 1, "argv must not be empty");
        if (lua_isnoneornil(L, 2)) {
                lua_settop(L, 1);
                lua_newtable(L);
        } else
                luaL_checktype(L, 2, LUA_TTABLE);
        lua_settop(L, 2);

        /* argv: the strings anchored in a table at 3 (numbers become new strings), the pointer
         * array in a userdata at 4. */
        lua_createtable(L, n, 0);
        a->argv = lua_newuserdatauv(L, sizeof(char *) * ((size_t) n + 1), 0);
        for (int i = 1; i <= n; i++) {
                size_t len;
                const char *s;
                int t = lua_geti(L, 1, i);
                if (t != LUA_TSTRING && t != LUA_TNUMBER)
                        luaL_error(L, "bad argument #1 (argv[%d] must be a string, got %s)", i, luaL_typename(L, -1));
                s = lua_tolstring(L, -1, &len); /* converts a number in place */
                if (strlen(s) != len)
                        luaL_error(L, "bad argument #1 (argv[%d] contains a NUL byte)", i);
                a->argv[i - 1] = s;
                lua_rawseti(L, 3, i); /* anchored */
        }
        a->argv[n] = NULL;

        /* Unknown options are mistakes. */
        lua_pushnil(L);
        while (lua_next(L, 2)) {
                bool known = false;
                lua_pop(L, 1);
                if (lua_type(L, -1) == LUA_TSTRING)
                        for (const char *const *o = option_names; *o; o++)
                                known = known || strcmp(*o, lua_tostring(L, -1)) == 0;
                if (!known)
                        luaL_error(L, "bad argument #2 (unknown option '%s')", luaL_tolstring(L, -1, NULL));
        }

        if (lua_getfield(L, 2, "cwd") != LUA_TNIL) {
                if (lua_type(L, -1) != LUA_TSTRING)
                        luaL_error(L, "bad option 'cwd' (string expected, got %s)", luaL_typename(L, -1));
                a->cwd = lua_tostring(L, -1); /* stays on the stack */
        } else
                lua_pop(L, 1);

        if (lua_getfield(L, 2, "stdin") != LUA_TNIL) {
                if (lua_type(L, -1) != LUA_TSTRING)
                        luaL_error(L, "bad option 'stdin' (string expected, got %s)", luaL_typename(L, -1));
                a->stdin_data = lua_tolstring(L, -1, &a->stdin_len); /* stays on the stack */
        } else
                lua_pop(L, 1);

        rr_output_check_opts(L, 2, &a->capture, &a->max_capture, &a->timeout, &a->kill_grace);

        if (lua_getfield(L, 2, "env_clear") != LUA_TNIL)
                env_clear = lua_toboolean(L, -1);
        lua_pop(L, 1);

        if (lua_getfield(L, 2, "env") != LUA_TNIL) {
                if (lua_type(L, -1) != LUA_TTABLE)
                        luaL_error(L, "bad option 'env' (table expected, got %s)", luaL_typename(L, -1));
                env_idx = lua_gettop(L); /* stays */
        } else
                lua_pop(L, 1);
        build_env(L, env_idx, env_clear, a); /* ... list envp */

        if (lua_getfield(L, 2, "on_line") != LUA_TNIL) {
                if (lua_type(L, -1) != LUA_TFUNCTION)
                        luaL_error(L, "bad option 'on_line' (function expected, got %s)", luaL_typename(L, -1));
                a->on_line_idx = lua_gettop(L); /* stays */
        } else
                lua_pop(L, 1);
}

/* A pipe whose parent end (*parent) is non-blocking; both ends close-on-exec (the child gets its
 * end through dup2, which clears the flag). */
static int make_pipe(int *parent, int *child, bool parent_reads) {
        int fds[2];

        if (pipe2(fds, O_CLOEXEC) < 0)
                return -errno;
        *parent = parent_reads ? fds[0] : fds[1];
        *child = parent_reads ? fds[1] : fds[0];
        if (fcntl(*parent, F_SETFL, O_NONBLOCK) < 0)
                return -errno;
        return 0;
}

/* posix_spawnp() with a clean child: empty signal mask, default dispositions, its own process
 * group, pipes on 0/1/2 (or /dev/null on 0), cwd, no other descriptor. Returns a positive errno. */
static int do_spawn(const SpawnArgs *a, int in_fd, int out_fd, int err_fd, pid_t *pid) {
        posix_spawn_file_actions_t fa;
        posix_spawnattr_t attr;
        sigset_t none, all;
        int r;

        sigemptyset(&none);
        sigfillset(&all);
        r = posix_spawnattr_init(&attr);
        if (r != 0)
                return r;
        r = posix_spawn_file_actions_init(&fa);
        if (r != 0) {
                posix_spawnattr_destroy(&attr);
                return r;
        }
        if ((r = posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF |
                                                         POSIX_SPAWN_SETPGROUP)) == 0 &&
            (r = posix_spawnattr_setsigmask(&attr, &none)) == 0 &&
            (r = posix_spawnattr_setsigdefault(&attr, &all)) == 0 &&
            (r = posix_spawnattr_setpgroup(&attr, 0)) == 0 &&
            (r = in_fd >= 0 ? posix_spawn_file_actions_adddup2(&fa, in_fd, STDIN_FILENO)
                            : posix_spawn_file_actions_addopen(&fa, STDIN_FILENO, "/dev/null", O_RDONLY, 0)) == 0 &&
            (r = posix_spawn_file_actions_adddup2(&fa, out_fd, STDOUT_FILENO)) == 0 &&
            (r = posix_spawn_file_actions_adddup2(&fa, err_fd, STDERR_FILENO)) == 0 &&
            (r = a->cwd ? posix_spawn_file_actions_addchdir_np(&fa, a->cwd) : 0) == 0 &&
            (r = posix_spawn_file_actions_addclosefrom_np(&fa, 3)) == 0)
                r = posix_spawnp(pid, a->argv[0], &fa, &attr, (char *const *) a->argv, (char *const *) a->envp);
        posix_spawn_file_actions_destroy(&fa);
        posix_spawnattr_destroy(&attr);
        return r;
}

/* Can `path` be executed: 0, or the errno exec would give. */
static int exec_error(const char *path) {
        struct stat st;
        if (stat(path, &st) < 0)
                return errno;
        if (!S_ISREG(st.st_mode) || access(path, X_OK) < 0)
                return EACCES;
        return 0;
}

/* The errno exec would fail with for argv[0], found as posix_spawnp() would look for it (PATH
 * from the child's environment). posix_spawnp() reports this itself, but not under every
 * emulation of CLONE_VFORK (valgrind's), where a failed exec becomes an exit code 127: checked
 * first, the operator gets "No such file or directory" either way. */
static int program_error(const SpawnArgs *a) {
        const char *prog = a->argv[0], *path = NULL;
        char buf[PATH_MAX];
        int worst = ENOENT;

        if (strchr(prog, '/')) {
                if (prog[0] != '/' && a->cwd) {
                        if ((size_t) snprintf(buf, sizeof buf, "%s/%s", a->cwd, prog) >= sizeof buf)
                                return ENAMETOOLONG;
                        return exec_error(buf);
                }
                return exec_error(prog);
        }
        for (const char **e = a->envp; e && *e; e++)
                if (strncmp(*e, "PATH=", 5) == 0)
                        path = *e + 5;
        if (!path)
                path = "/usr/local/bin:/usr/bin:/bin";
        while (*path) {
                size_t n = strcspn(path, ":");
                int r;
                if ((size_t) snprintf(buf, sizeof buf, "%.*s/%s", (int) n, n ? path : ".", prog) < sizeof buf) {
                        r = exec_error(buf);
                        if (r == 0)
                                return 0;
                        if (r == EACCES)
                                worst = EACCES;
                }
                path += n + (path[n] == ':');
        }
        return worst;
}

/* Spawn from the arguments at 1 and 2; pushes the handle (1 result) or nil, message, code. */
static int spawn(lua_State *L) {
        _cleanup_(closep) int in_child = -1, out_child = -1, err_child = -1;
        sd_event *e = rr_loop_event();
        SpawnArgs a;
        struct stat st;
        Box *b;
        Proc *p;
        int r;

        parse_args(L, &a);
        /* posix_spawnp() would report a bad cwd as ENOENT too: say which one it is. */
        if (a.cwd) {
                int errnum = stat(a.cwd, &st) < 0 ? errno : !S_ISDIR(st.st_mode) ? ENOTDIR : 0;
                if (errnum)
                        return rr_push_fail(L, errnum, "cannot run %s in %s: %s", a.argv[0], a.cwd, strerror(errnum));
        }

        r = program_error(&a);
        if (r != 0) {
                if (a.cwd)
                        return rr_push_fail(L, r, "cannot run %s in %s: %s", a.argv[0], a.cwd, strerror(r));
                return rr_push_fail(L, r, "cannot run %s: %s", a.argv[0], strerror(r));
        }

        /* The handle first, closed; from here on it owns p and frees it whatever happens. */
        b = lua_newuserdatauv(L, sizeof *b, 1);
        b->proc = NULL;
        luaL_setmetatable(L, PROCESS_MT);
        rr_output_new_box(L, a.on_line_idx, 0); /* h box */
        lua_setiuservalue(L, -2, 1);            /* h */
        p = calloc(1, sizeof *p);
        if (!p)
                return luaL_error(L, "out of memory");
        rr_output_init(&p->output, NULL, a.capture, a.max_capture, output_progress);
        b->proc = p;
        p->stdin_fd = -1;
        p->exit_code = -1;
        p->timeout = a.timeout;
        p->kill_grace = a.kill_grace;
        p->name = strdup(a.argv[0]);
        if (!p->name)
                return luaL_error(L, "out of memory");
        p->output.name = p->name;
        lua_getiuservalue(L, -1, 1); /* h box */
        r = rr_output_attach(L, -1, &p->output);
        lua_pop(L, 1);               /* h */
        if (r < 0)
                return luaL_error(L, "out of memory");

        if ((r = rr_output_pipes(&p->output, &out_child, &err_child)) < 0 ||
            (a.stdin_data && (r = make_pipe(&p->stdin_fd, &in_child, false)) < 0)) {
                b->proc = NULL;
                proc_free(p);
                return rr_push_fail(L, -r, "cannot run %s: cannot make a pipe: %s", a.argv[0], strerror(-r));
        }

        p->start = rr_now();
        r = do_spawn(&a, in_child, out_child, err_child, &p->pid);
        if (r != 0) {
                p->pid = 0;
                b->proc = NULL;
                proc_free(p);
                if (a.cwd)
                        return rr_push_fail(L, r, "cannot run %s in %s: %s", a.argv[0], a.cwd, strerror(r));
                return rr_push_fail(L, r, "cannot run %s: %s", a.argv[0], strerror(r));
        }
        /* The child has its copies; ours would keep the pipes open. */
        close(out_child);
        close(err_child);
        out_child = err_child = -1;
        if (in_child >= 0) {
                close(in_child);
                in_child = -1;
        }

        /* WEXITED only: sd-event then watches a pidfd, and reaps the child after our callback. */
        r = sd_event_add_child(e, &p->child_source, p->pid, WEXITED, child_exited, p);
        if (r < 0)
                goto fail;
        r = rr_output_watch(&p->output);
        if (r < 0)
                goto fail;
        if (a.timeout > 0) {
                r = sd_event_add_time(e, &p->timer_source, CLOCK_MONOTONIC, rr_deadline_usec(a.timeout), 1000,
                                      timer_fired, p);
                if (r < 0)
                        goto fail;
        }
        if (p->stdin_fd >= 0) {
                p->stdin_data = malloc(a.stdin_len ? a.stdin_len : 1);
                if (!p->stdin_data) {
                        r = -ENOMEM;
                        goto fail;
                }
                memcpy(p->stdin_data, a.stdin_data, a.stdin_len);
                p->stdin_len = a.stdin_len;
                stdin_pump(p);
                if (p->stdin_fd >= 0) {
                        r = sd_event_add_io(e, &p->stdin_source, p->stdin_fd, EPOLLOUT, stdin_io, p);
                        if (r < 0)
                                goto fail;
                }
        }
        return 1;

fail:
        /* Cannot watch it: do not leave it running unwatched. */
        b->proc = NULL;
        proc_free(p);
        return rr_push_fail(L, -r, "cannot watch %s: %s", a.argv[0], strerror(-r));
}

/* proc.spawn(argv, opts) -> process | nil, message, code */
static int proc_l_spawn(lua_State *L) {
        rr_canceled(L, true); /* a cancelled task must not start a side effect it never sees */
        return spawn(L);
}

/* proc.run(argv, opts) -> res | nil, message, res | nil, message, code */
static int proc_l_run(lua_State *L) {
        rr_canceled(L, true); /* a cancelled task must not start a side effect it never sees */
        int n = spawn(L);
        Box *b;

        if (n != 1)
                return n;
        /* The handle closes when run returns, raises or its task is canceled: a canceled or
         * interrupted run kills its process group instead of leaving it to the collector. */
        lua_toclose(L, -1);
        b = lua_touserdata(L, -1);
        return proc_wait(L, b->proc);
}

/* ---- process methods ---- */

/* Signal number from a name ("TERM", "SIGTERM") or a number at idx; def when absent. */
static int check_signal(lua_State *L, int idx, int def) {
        const char *s;

        if (lua_isnoneornil(L, idx))
                return def;
        if (lua_type(L, idx) == LUA_TNUMBER) {
                lua_Integer n = luaL_checkinteger(L, idx);
                luaL_argcheck(L, n >= 0 && n < NSIG, idx, "invalid signal number");
                return (int) n;
        }
        s = luaL_checkstring(L, idx);
        if (strncmp(s, "SIG", 3) == 0)
                s += 3;
        for (int sig = 1; sig < NSIG; sig++) {
                const char *abbrev = sigabbrev_np(sig);
                if (abbrev && strcmp(abbrev, s) == 0)
                        return sig;
        }
        return luaL_argerror(L, idx, lua_pushfstring(L, "unknown signal '%s'", lua_tostring(L, idx)));
}

/* p:pid() -> number */
static int process_l_pid(lua_State *L) {
        lua_pushinteger(L, check_proc(L, 1)->pid);
        return 1;
}

/* p:running() -> bool: the process itself has not exited */
static int process_l_running(lua_State *L) {
        Box *b = check_box(L, 1);
        lua_pushboolean(L, b->proc && !b->proc->exited);
        return 1;
}

/* p:kill(sig = "TERM") -> true | nil, message, code: signals the whole process group */
static int process_l_kill(lua_State *L) {
        Proc *p = check_proc(L, 1);
        int sig = check_signal(L, 2, SIGTERM);
        int r = proc_signal(p, sig);

        if (r == -ESRCH)
                return rr_push_fail(L, ESRCH, "%s (pid %d) has exited", p->name, (int) p->pid);
        if (r < 0)
                return rr_push_fail(L, -r, "cannot signal %s (pid %d): %s", p->name, (int) p->pid, strerror(-r));
        lua_pushboolean(L, true);
        return 1;
}

/* p:wait() -> res | nil, message, res */
static int process_l_wait(lua_State *L) {
        Proc *p = check_proc(L, 1);
        lua_settop(L, 1); /* the handle stays on the stack while waiting */
        return proc_wait(L, p);
}

/* __gc, __close and p:close(): if still running, SIGKILL the group and reap it; free. */
static int process_l_close(lua_State *L) {
        Box *b = check_box(L, 1);
        Proc *p = b->proc;

        if (!p)
                return 0;
        b->proc = NULL;
        proc_free(p);
        return 0;
}

/* tostring(p): "rr.proc.process PID (NAME, running)" or how it ended. */
static int process_l_tostring(lua_State *L) {
        Box *b = check_box(L, 1);
        Proc *p = b->proc;

        if (!p)
                lua_pushliteral(L, "rr.proc.process (closed)");
        else if (!p->exited)
                lua_pushfstring(L, "rr.proc.process %d (%s, running)", (int) p->pid, p->name);
        else if (p->signal)
                lua_pushfstring(L, "rr.proc.process %d (%s, killed by %s)", (int) p->pid, p->name, signal_name(p->signal));
        else
                lua_pushfstring(L, "rr.proc.process %d (%s, exited with code %d)", (int) p->pid, p->name, p->exit_code);
        return 1;
}

static const luaL_Reg process_methods[] = {
        { "pid", process_l_pid },
        { "running", process_l_running },
        { "kill", process_l_kill },
        { "wait", process_l_wait },
        { "close", process_l_close },
        { NULL, NULL },
};

static const luaL_Reg process_meta[] = {
        { "__gc", process_l_close },
        { "__close", process_l_close },
        { "__tostring", process_l_tostring },
        { NULL, NULL },
};

static const luaL_Reg proc_functions[] = {
        { "spawn", proc_l_spawn },
        { "run", proc_l_run },
        { NULL, NULL },
};

/* require("rr.proc"): spawn and run; the process class. */
int luaopen_rr_proc(lua_State *L) {
        rr_output_open(L);
        if (luaL_newmetatable(L, PROCESS_MT)) {
                luaL_setfuncs(L, process_meta, 0);
                luaL_newlib(L, process_methods);
                lua_setfield(L, -2, "__index");
        }
        lua_pop(L, 1);
        luaL_newlib(L, proc_functions);
        return 1;
}
