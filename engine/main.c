/* rrengine: the interpreter. Runs a Lua plan (or -e code, or the REPL) with the rr.* modules
 * on one sd-event loop, then runs the loop until every task has finished. */
#define _GNU_SOURCE
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include <lualib.h>
#include <readline/history.h>
#include <readline/readline.h>

#include "rr.h"

#ifndef RR_VERSION
#define RR_VERSION "0.1.0"
#endif
#ifndef RR_DATADIR
#define RR_DATADIR "/usr/local/share/rrengine"
#endif

#define EXIT_INTERRUPTED 130

static const char usage_text[] =
        "Usage: rrengine [options] [SCRIPT.lua [args...]]\n"
        "\n"
        "Examples:\n"
        "  rrengine plans/rolling.lua --service sso.api      restart one service, with rollback\n"
        "  rrengine plans/rolling.lua --dry-run               show the plan, change nothing\n"
        "  rrengine plans/status.lua                          state and health of every service\n"
        "  rrengine -i                                        emergency REPL, services preloaded\n"
        "  rrengine -i --user --services /etc/rr/services.lua the REPL on your user manager\n"
        "  rrengine -e 'print(require(\"rr\").now())'          run a line of Lua\n"
        "\n"
        "Options:\n"
        "  -e CODE      run CODE (may repeat), then the script if one is given\n"
        "  -i [REPL options]\n"
        "               interactive REPL after the -e code and the script (or alone)\n"
        "  --debug      print full tracebacks on errors\n"
        "  --version    print the version\n"
        "  -h, --help   this text\n"
        "\n"
        "REPL options (after -i):\n"
        "  --user            talk to your user service manager (default: $RRENGINE_USER=1)\n"
        "  --services FILE   the services file (default: $RRENGINE_SERVICES, else ./services.lua, else\n"
        "                    /etc/rrengine/services.lua; with --user $XDG_CONFIG_HOME/rrengine/services.lua)\n"
        "In the REPL, help() lists the helpers and Tab completes. Ctrl-C cancels the running line;\n"
        "during restart() it stops the run as in the plan (the service in flight finishes or rolls\n"
        "back); rollback() asks first on a terminal, and always finishes.\n"
        "\n"
        "A plan's own options come after its name: rrengine plans/rolling.lua --help\n"
        "Exit codes: 0 ok, 1 error (plans: a service failed), 2 usage/configuration error,\n"
        "3 a rollback failed (manual action needed), 130 interrupted (SIGINT, SIGTERM, SIGHUP).\n";

static bool debug;

/* Message handler: a traceback only with --debug, else the bare message (operators at 3 a.m.
 * want the one line that says what is wrong). Error objects that are tables pass through. */
static int msghandler(lua_State *L) {
        const char *msg = lua_tostring(L, 1);
        if (!msg) {
                if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING)
                        return 1;
                msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
        }
        if (debug)
                luaL_traceback(L, L, msg, 1);
        else
                lua_pushstring(L, msg);
        return 1;
}

/* lua_pcall() with msghandler() below the function and its arguments. */
static int docall(lua_State *L, int narg, int nres) {
        int base = lua_gettop(L) - narg;
        int r;
        lua_pushcfunction(L, msghandler);
        lua_insert(L, base);
        r = lua_pcall(L, narg, nres, base);
        lua_remove(L, base);
        return r;
}

/* Prints an error at the top of L; not the one that unwinds the caller of an os.exit() made in
 * a task (the exit is what was asked for). */
static void report(lua_State *L, int status) {
        if (status != LUA_OK && rr_loop_exit_requested(NULL))
                lua_pop(L, 1);
        else if (status != LUA_OK) {
                const char *msg = lua_tostring(L, -1);
                fprintf(stderr, "rrengine: %s\n", msg ? msg : "(error object is not a string)");
                lua_pop(L, 1);
        }
}

/* The directory holding this executable, for finding lua/ when run from the source tree. */
static int exe_dir(char *buf, size_t size) {
        ssize_t n = readlink("/proc/self/exe", buf, size - 1);
        char *slash;
        if (n < 0)
                return -errno;
        buf[n] = '\0';
        slash = strrchr(buf, '/');
        if (!slash)
                return -EINVAL;
        *slash = '\0';
        return 0;
}

/* package.path: lua/ beside the executable (source tree) or RR_DATADIR/lua (installed), first;
 * the system's paths after it so busted, cjson and friends are found. */
static void set_paths(lua_State *L) {
        char dir[PATH_MAX], probe[PATH_MAX + 32];
        const char *root = RR_DATADIR;
        struct stat st;

        /* RRENGINE_ROOT: a development override (a binary built outside the tree). */
        if (getenv("RRENGINE_ROOT"))
                root = getenv("RRENGINE_ROOT");
        else if (exe_dir(dir, sizeof dir - 32) == 0) {
                snprintf(probe, sizeof probe, "%s/lua/rr/init.lua", dir);
                if (stat(probe, &st) == 0)
                        root = dir;
        }
        lua_getglobal(L, "package");
        lua_pushfstring(L, "%s/lua/?.lua;%s/lua/?/init.lua;", root, root);
        lua_getfield(L, -2, "path");
        lua_concat(L, 2);
        lua_setfield(L, -2, "path");
        lua_pushstring(L, root);
        lua_setfield(L, LUA_REGISTRYINDEX, "rr.root");
        lua_pop(L, 1);
}

/* The rr.* modules of the engine, for require(). */
static void preload(lua_State *L) {
        static const luaL_Reg modules[] = {
                { "rr.loop", luaopen_rr_loop },       { "rr.systemd", luaopen_rr_systemd },
                { "rr.http", luaopen_rr_http },       { "rr.proc", luaopen_rr_proc },
                { "rr.log", luaopen_rr_log },         { "rr.fs", luaopen_rr_fs },
                { "rr.socket", luaopen_rr_socket },
                { NULL, NULL },
        };
        luaL_getsubtable(L, LUA_REGISTRYINDEX, LUA_PRELOAD_TABLE);
        for (const luaL_Reg *m = modules; m->name; m++) {
                lua_pushcfunction(L, m->func);
                lua_setfield(L, -2, m->name);
        }
        lua_pop(L, 1);
}

/* os.exit(code): finish like the end of a script (tasks canceled, everything released) so that
 * valgrind and ASan see a clean exit, then leave with the code. Inside a task (or any coroutine)
 * the Lua state cannot be closed under the running coroutine: the exit is recorded and an error
 * unwinds the coroutine (its <close> handlers run); main() then exits with the code once control
 * is back at the top. */
static int os_exit(lua_State *L) {
        bool main_thread;
        int code;
        if (lua_isboolean(L, 1))
                code = lua_toboolean(L, 1) ? EXIT_SUCCESS : EXIT_FAILURE;
        else
                code = (int) luaL_optinteger(L, 1, EXIT_SUCCESS);
        main_thread = lua_pushthread(L) == 1;
        lua_pop(L, 1);
        if (!main_thread) {
                rr_loop_request_exit(code);
                return luaL_error(L, "os.exit(%d): exiting", code);
        }
        fflush(stdout);
        rr_loop_shutdown(L);
        lua_close(L);
        rr_loop_free();
        exit(code);
}

/* The globals a script sees besides Lua's own: `arg` as lua.c sets it (the script at 0, its
 * arguments at 1.., what came before it at negative indices), and os.exit() replaced by
 * os_exit(). Where the library and plans live is in the registry ("rr.root", set_paths()). */
static void install_globals(lua_State *L, char **argv, int script) {
        int argc = 0;
        while (argv[argc])
                argc++;
        /* arg as lua.c sets it: arg[0] the script, positives its arguments, negatives before */
        lua_createtable(L, argc - (script > 0 ? script + 1 : 0), script + 1);
        for (int i = 0; i < argc; i++) {
                lua_pushstring(L, argv[i]);
                lua_rawseti(L, -2, i - (script > 0 ? script : argc));
        }
        lua_setglobal(L, "arg");

        lua_getglobal(L, "os");
        lua_pushcfunction(L, os_exit);
        lua_setfield(L, -2, "exit");
        lua_pop(L, 1);
}

/* Call a loaded chunk (status: how loading went) with the nargs arguments above it; report an
 * error. */
static int run_chunk(lua_State *L, int status, int nargs) {
        if (status == LUA_OK)
                status = docall(L, nargs, 0);
        else if (nargs > 0)
                lua_pop(L, nargs);
        report(L, status);
        return status;
}

/* A relative script that is not here is looked up beside the library, so that an installed
 * `rrengine plans/rolling.lua` finds $PREFIX/share/rrengine/plans/rolling.lua. */
static int load_script(lua_State *L, const char *path) {
        const char *root;
        if (path[0] == '/' || access(path, F_OK) == 0)
                return luaL_loadfile(L, path);
        lua_getfield(L, LUA_REGISTRYINDEX, "rr.root");
        root = lua_tostring(L, -1);
        if (root) {
                const char *full = lua_pushfstring(L, "%s/%s", root, path);
                if (access(full, F_OK) == 0) {
                        int r = luaL_loadfile(L, full);
                        lua_remove(L, -2); /* the path */
                        lua_remove(L, -2); /* root */
                        return r;
                }
                lua_pop(L, 1);
        }
        lua_pop(L, 1);
        return luaL_loadfile(L, path);
}

/* Load and run the script at path with the script's arguments. */
static int run_script(lua_State *L, const char *path) {
        int nargs, status;
        status = load_script(L, path);
        /* the script's arguments as varargs too, as lua.c does */
        lua_getglobal(L, "arg");
        nargs = (int) luaL_len(L, -1);
        luaL_checkstack(L, nargs + 3, "too many arguments");
        for (int i = 1; i <= nargs; i++)
                lua_rawgeti(L, -i, i);
        lua_remove(L, -1 - nargs);
        return run_chunk(L, status, nargs);
}

/* ---- REPL: readline's callback interface on the loop, so tasks keep running at the prompt ----
 *
 * stdin's io source only notes that input is there; readline reads it (rl_callback_read_char())
 * back at the top level, in repl_wait_line(), never inside sd-event's dispatch: a key may run Lua
 * (Tab asks rr.repl's complete() for candidates). */

static struct {
        lua_State *L;
        sd_event_source *src; /* stdin: enabled while readline waits for a line */
        bool installed;       /* a readline handler (a prompt) is installed */
        bool readable;        /* stdin has input for readline */
        bool have_line;
        bool eof;
        bool asking;      /* repl_ask() waits for its answer */
        char *line;       /* the line readline gave, for the caller to take */
        int complete_ref; /* rr.repl's complete(), or LUA_NOREF */
        char **cands;     /* the candidates of the completion under way */
        size_t ncands, next;
} repl = { .complete_ref = LUA_NOREF };

/* readline's line handler: the line typed (NULL at end of input), for the caller to take. The
 * handler goes at once, so that readline shows no new prompt before the line has run. */
static void repl_line(char *line) {
        rl_callback_handler_remove();
        repl.installed = false;
        repl.have_line = true;
        if (!line) {
                repl.eof = true;
                return;
        }
        repl.line = line;
}

/* stdin is readable: noted for repl_wait_line(), which lets readline read it. */
static int repl_input(sd_event_source *src, int fd, uint32_t revents, void *userdata) {
        (void) src;
        (void) fd;
        (void) revents;
        (void) userdata;
        repl.readable = true;
        return 0;
}

/* Shows prompt and lets readline take keys until the next line. */
static void repl_prompt(const char *prompt) {
        rl_callback_handler_install(prompt, repl_line);
        repl.installed = true;
        sd_event_source_set_enabled(repl.src, SD_EVENT_ON);
}

/* No prompt, stdin not watched (while a line runs). */
static void repl_unprompt(void) {
        if (repl.installed)
                rl_callback_handler_remove();
        repl.installed = false;
        sd_event_source_set_enabled(repl.src, SD_EVENT_OFF);
}

/* Runs the loop (tasks go on) until readline has a line or end of input, a stop signal or an
 * exit request; readline reads stdin here, at the top level. Returns 0, or the loop's failure. */
static int repl_wait_line(void) {
        repl.have_line = false;
        while (!repl.have_line) {
                int r;
                repl.readable = false;
                r = rr_loop_run_until(&repl.readable);
                if (r < 0)
                        return r;
                if (!repl.readable)
                        return 0;
                rl_callback_read_char(); /* may call repl_line(), or repl_complete() */
        }
        return 0;
}

static void free_candidates(void) {
        for (size_t i = 0; i < repl.ncands; i++)
                free(repl.cands[i]);
        free(repl.cands);
        repl.cands = NULL;
        repl.ncands = repl.next = 0;
}

/* Protected: complete(line up to the cursor, word start) into repl.cands. Arguments: the word's
 * start and end in rl_line_buffer. Returns true when readline's own file name completion is
 * wanted (complete() returned nil). */
static int collect_candidates(lua_State *L) {
        lua_Integer start = lua_tointeger(L, 1), end = lua_tointeger(L, 2), n;

        lua_rawgeti(L, LUA_REGISTRYINDEX, repl.complete_ref);
        lua_pushlstring(L, rl_line_buffer, (size_t) end);
        lua_pushinteger(L, start);
        lua_call(L, 2, 1); /* candidates | nil */
        if (lua_isnil(L, -1)) {
                lua_pushboolean(L, 1);
                return 1;
        }
        luaL_checktype(L, -1, LUA_TTABLE);
        n = luaL_len(L, -1);
        if (n <= 0) {
                lua_pushboolean(L, 0);
                return 1;
        }
        repl.cands = calloc((size_t) n, sizeof(char *));
        if (!repl.cands)
                return luaL_error(L, "out of memory");
        for (lua_Integer i = 1; i <= n; i++) {
                const char *c;
                lua_rawgeti(L, -1, i); /* candidates c */
                c = lua_tostring(L, -1);
                if (c) {
                        repl.cands[repl.ncands] = strdup(c);
                        if (!repl.cands[repl.ncands])
                                return luaL_error(L, "out of memory");
                        repl.ncands++;
                }
                lua_pop(L, 1);
        }
        lua_pushboolean(L, 0);
        return 1;
}

/* readline's generator over repl.cands: each candidate handed over (readline frees it). */
static char *repl_candidate(const char *text, int state) {
        char *c;
        (void) text;
        if (state == 0)
                repl.next = 0;
        if (repl.next >= repl.ncands)
                return NULL;
        c = repl.cands[repl.next];
        repl.cands[repl.next++] = NULL;
        return c;
}

/* Tab: the candidates of rr.repl's complete() for the text from start to end (the cursor). */
static char **repl_complete(const char *text, int start, int end) {
        lua_State *L = repl.L;
        char **matches = NULL;
        int status;

        rl_attempted_completion_over = 1; /* readline's file names only when complete() asks */
        rl_completion_append_character = '\0';
        if (repl.complete_ref == LUA_NOREF || repl.asking)
                return NULL;
        lua_pushcfunction(L, collect_candidates);
        lua_pushinteger(L, start);
        lua_pushinteger(L, end);
        status = docall(L, 2, 1); /* files? | err */
        if (status != LUA_OK) {
                /* a completion that fails completes nothing; the line stays as typed */
                lua_pop(L, 1);
                free_candidates();
                rl_ding();
                return NULL;
        }
        if (lua_toboolean(L, -1))
                rl_attempted_completion_over = 0;
        else if (repl.ncands > 0)
                matches = rl_completion_matches(text, repl_candidate);
        lua_pop(L, 1);
        free_candidates();
        return matches;
}

/* Pushes the string at the light userdata (protected: the caller frees it whatever happens). */
static int push_line(lua_State *L) {
        lua_pushstring(L, lua_touserdata(L, 1));
        return 1;
}

/* rr.repl's ask(prompt) -> line | nil: a question answered at the terminal while the loop runs,
 * not kept in the history. nil at end of input, on a stop signal (Ctrl-C), on an exit request,
 * and when not called from a REPL line (a task cannot run the loop it runs in). */
static int repl_ask(lua_State *L) {
        const char *prompt = luaL_checkstring(L, 1);
        bool main_thread = lua_pushthread(L) == 1;
        char *line;
        int r;

        lua_pop(L, 1);
        if (!main_thread || !repl.src || repl.installed || repl.asking) {
                lua_pushnil(L);
                return 1;
        }
        repl.asking = true;
        repl.eof = false;
        repl_prompt(prompt);
        (void) repl_wait_line(); /* a loop failure is no answer; the REPL's own wait sees it again */
        if (repl.installed) {
                /* no answer (a signal, an exit): what was typed goes */
                rl_free_line_state();
                rl_crlf();
        }
        repl_unprompt();
        repl.asking = false;
        repl.eof = false; /* Ctrl-D answers "no"; the REPL goes on */
        line = repl.line;
        repl.line = NULL;
        if (!line) {
                lua_pushnil(L);
                return 1;
        }
        lua_pushcfunction(L, push_line);
        lua_pushlightuserdata(L, line);
        r = lua_pcall(L, 1, 1, 0);
        free(line);
        if (r != LUA_OK)
                return lua_error(L);
        return 1;
}

/* Evaluate one REPL line and print what it returns. */
static void repl_eval(lua_State *L, const char *line) {
        int status;
        /* An expression first (so `status()` and `1+1` print), else a statement. */
        const char *ret = lua_pushfstring(L, "return %s;", line);
        status = luaL_loadbuffer(L, ret, strlen(ret), "=stdin");
        lua_remove(L, -2);
        if (status != LUA_OK) {
                lua_pop(L, 1);
                status = luaL_loadbuffer(L, line, strlen(line), "=stdin");
        }
        if (status == LUA_OK) {
                int base = lua_gettop(L);
                status = docall(L, 0, LUA_MULTRET);
                if (status == LUA_OK) {
                        int n = lua_gettop(L) - base + 1;
                        /* A line may return any number of values, which may leave no free slot. */
                        if (n > 0 && !lua_checkstack(L, 1)) {
                                lua_pop(L, n);
                                lua_pushliteral(L, "too many results to print");
                                report(L, LUA_ERRRUN);
                                return;
                        }
                        if (n > 0) {
                                lua_getglobal(L, "print");
                                lua_insert(L, -1 - n);
                                if (lua_pcall(L, n, 0, 0) != LUA_OK)
                                        report(L, LUA_ERRRUN);
                        }
                        return;
                }
        }
        report(L, status);
}

/* The REPL's helpers (status, restart, ...) when the library provides them:
 * require("rr.repl").start(args), args the REPL's own options (those after -i). Before start(),
 * the module gets ask() (repl_ask) and its complete() is kept for Tab. Returns false when the
 * REPL must not start. */
static bool repl_helpers(lua_State *L, char **args, int nargs) {
        int status;

        lua_getglobal(L, "require");
        lua_pushliteral(L, "rr.repl");
        status = docall(L, 1, 1); /* M | err */
        if (status != LUA_OK) {
                const char *msg = lua_tostring(L, -1);
                bool missing = msg && strstr(msg, "module 'rr.repl' not found");
                if (!missing)
                        fprintf(stderr, "rrengine: REPL helpers not loaded: %s\n", msg ? msg : "?");
                else if (nargs > 0)
                        fprintf(stderr, "rrengine: REPL options given, but the rr.repl library is not installed\n");
                lua_pop(L, 1);
                return nargs == 0;
        }
        if (!lua_istable(L, -1)) {
                lua_pop(L, 1);
                return true; /* a library that installs its helpers when loaded */
        }
        lua_pushcfunction(L, repl_ask);
        lua_setfield(L, -2, "ask");
        lua_getfield(L, -1, "complete"); /* M complete */
        if (lua_isfunction(L, -1))
                repl.complete_ref = luaL_ref(L, LUA_REGISTRYINDEX);
        else
                lua_pop(L, 1);
        lua_getfield(L, -1, "start"); /* M start */
        lua_remove(L, -2);            /* start */
        if (!lua_isfunction(L, -1)) {
                lua_pop(L, 1);
                return true;
        }
        lua_createtable(L, nargs, 0); /* start args */
        for (int i = 0; i < nargs; i++) {
                lua_pushstring(L, args[i]);
                lua_rawseti(L, -2, i + 1);
        }
        status = docall(L, 1, 0);
        report(L, status);
        return status == LUA_OK;
}

/* The REPL: read lines with readline while the loop runs tasks, until end of input, SIGTERM or
 * SIGHUP, or os.exit(); returns the exit code. */
static int repl_run(lua_State *L, char **args, int nargs) {
        _cleanup_(freep) char *history = NULL;
        const char *home = getenv("HOME");
        int r, code = EXIT_SUCCESS;

        repl.L = L;
        if (!repl_helpers(L, args, nargs))
                return rr_loop_exit_requested(NULL) ? EXIT_SUCCESS : 2;

        if (home && asprintf(&history, "%s/.rrengine_history", home) >= 0)
                read_history(history);
        rl_readline_name = "rrengine";
        rl_catch_signals = 0; /* signals arrive through sd-event */
        rl_attempted_completion_function = repl_complete;
        /* Lua's operators and brackets end a word; '.', ':', '@' and '-' do not (rr.systemd,
         * m:unit, service names such as api@1 or sso-api). */
        rl_completer_word_break_characters = " \t\n\"'`<>=;|&{}()[],";
        /* Inside a string, the word starts after its quote, and a unique match closes it:
         * restart("sso.r<Tab> becomes restart("sso.redis" */
        rl_completer_quote_characters = "\"'";
        r = sd_event_add_io(rr_loop_event(), &repl.src, STDIN_FILENO, EPOLLIN, repl_input, NULL);
        if (r < 0) {
                fprintf(stderr, "rrengine: cannot watch stdin: %s\n", strerror(-r));
                return EXIT_FAILURE;
        }
        for (;;) {
                int sig;
                char *line;

                if (!repl.installed)
                        repl_prompt("rr> ");
                if (repl_wait_line() < 0) {
                        code = EXIT_FAILURE; /* the loop said why */
                        break;
                }
                if (rr_loop_exit_requested(NULL))
                        break; /* a task called os.exit() */
                sig = rr_loop_take_interrupt();
                if (sig != 0 && sig != SIGINT) {
                        /* SIGTERM, or SIGHUP: the terminal or the SSH session is gone. */
                        code = EXIT_INTERRUPTED;
                        break;
                }
                if (sig != 0 && !repl.eof) {
                        /* Ctrl-C at the prompt drops the line, as a shell does. */
                        free(repl.line);
                        repl.line = NULL;
                        if (repl.installed) {
                                rl_free_line_state();
                                rl_crlf();
                                rl_replace_line("", 0);
                                rl_on_new_line();
                                rl_redisplay();
                        }
                        continue;
                }
                if (repl.eof)
                        break;
                if (!repl.have_line)
                        continue;
                repl_unprompt();
                line = repl.line;
                repl.line = NULL;
                if (*line) {
                        add_history(line);
                        (void) rr_loop_take_quit_signal(); /* one a handler took at the prompt is old */
                        repl_eval(L, line);
                        (void) rr_loop_take_interrupt(); /* a Ctrl-C that canceled the line is spent */
                }
                free(line);
                if (rr_loop_exit_requested(NULL))
                        break;
                if (rr_loop_take_quit_signal() != 0) {
                        /* SIGTERM/SIGHUP during the line: the line ended as its signal handlers
                         * (a restart's: the service in flight finished) or the cancel made it end;
                         * now the REPL goes too. */
                        code = EXIT_INTERRUPTED;
                        break;
                }
        }
        repl_unprompt();
        free(repl.line);
        repl.line = NULL;
        if (isatty(STDIN_FILENO))
                putchar('\n');
        if (history)
                write_history(history);
        repl.src = sd_event_source_disable_unref(repl.src);
        if (repl.complete_ref != LUA_NOREF) {
                luaL_unref(L, LUA_REGISTRYINDEX, repl.complete_ref);
                repl.complete_ref = LUA_NOREF;
        }
        return code;
}

int main(int argc, char **argv) {
        lua_State *L;
        int script = 0, repl_args = 0, status = LUA_OK, code = EXIT_SUCCESS, r;
        bool interactive = false, have_exec = false;

        for (int i = 1; i < argc; i++) {
                const char *a = argv[i];
                if (strcmp(a, "--version") == 0) {
                        printf("rrengine %s (%s, %s)\n", RR_VERSION, LUA_RELEASE, "libsystemd, libcurl");
                        return EXIT_SUCCESS;
                } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
                        fputs(usage_text, stdout);
                        return EXIT_SUCCESS;
                } else if (strcmp(a, "--debug") == 0)
                        debug = true;
                else if (strcmp(a, "-i") == 0)
                        interactive = true;
                else if (strcmp(a, "-e") == 0) {
                        if (++i >= argc) {
                                fprintf(stderr, "rrengine: -e needs an argument\n");
                                return 2;
                        }
                        have_exec = true;
                } else if (strcmp(a, "--") == 0) {
                        if (i + 1 < argc)
                                script = i + 1;
                        break;
                } else if (a[0] == '-' && a[1] != '\0' && interactive) {
                        /* After -i, the first option the engine does not know starts the REPL's
                         * own options (rr.repl parses them): rrengine -i --user --services F */
                        repl_args = i;
                        break;
                } else if (a[0] == '-' && a[1] != '\0') {
                        fprintf(stderr, "rrengine: unknown option '%s' (REPL options go after -i; try --help)\n", a);
                        return 2;
                } else {
                        script = i;
                        break;
                }
        }

        L = luaL_newstate();
        if (!L) {
                fprintf(stderr, "rrengine: cannot create Lua state\n");
                return EXIT_FAILURE;
        }
        luaL_openlibs(L);
        r = rr_loop_init(L);
        if (r < 0) {
                fprintf(stderr, "rrengine: cannot start the event loop: %s\n", strerror(-r));
                lua_close(L);
                rr_loop_free();
                return EXIT_FAILURE;
        }
        set_paths(L);
        preload(L);
        install_globals(L, argv, script);

        for (int i = 1; i < (script ? script : repl_args ? repl_args : argc) && status == LUA_OK &&
                        !rr_loop_exit_requested(NULL); i++)
                if (strcmp(argv[i], "-e") == 0) {
                        const char *code_arg = argv[++i];
                        status = run_chunk(L, luaL_loadbuffer(L, code_arg, strlen(code_arg), "=(command line)"), 0);
                }
        if (status == LUA_OK && script && !rr_loop_exit_requested(NULL))
                status = run_script(L, argv[script]);
        if (status == LUA_OK && !rr_loop_exit_requested(NULL))
                rr_loop_drain(L);
        if (status == LUA_OK && !rr_loop_exit_requested(NULL) && (interactive || (!script && !have_exec)))
                code = repl_run(L, repl_args ? argv + repl_args : NULL, repl_args ? argc - repl_args : 0);

        if (rr_loop_take_interrupt())
                code = EXIT_INTERRUPTED;
        else if (status != LUA_OK)
                code = rr_interrupts() > 0 ? EXIT_INTERRUPTED : EXIT_FAILURE;
        fflush(stdout);
        /* Cancels what still runs; a task that called os.exit() has unwound by now, so the
         * state can be closed. Its code wins (also one made while the shutdown unwinds tasks). */
        rr_loop_shutdown(L);
        (void) rr_loop_exit_requested(&code);
        lua_close(L);
        rr_loop_free();
        return code;
}
