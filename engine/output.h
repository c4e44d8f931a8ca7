/* The output of a child, read on the loop: what rr.proc's processes and rr.systemd's transient
 * units (m:run) write to their stdout and stderr.
 *
 * Each stream is a pipe whose parent end is non-blocking and watched by an sd-event io source.
 * What comes is captured (up to max_capture bytes per stream) and, with an on_line callback,
 * split into lines, each delivered as a task on_line(stream, line), in the order read. When too
 * many callbacks are pending, reading stops until they catch up (the writer then blocks on a full
 * pipe). The owner learns through progress() that a pipe ended or a callback returned, and has
 * everything once rr_output_idle().
 *
 * On the Lua side an output has a box (userdata): its user values are the callbacks (1: on_line,
 * 2: one of the owner's own, see rr_output_call()), and every callback task holds the box, so a
 * task outliving its output (the owner was closed or canceled) finds the box closed, not freed
 * memory. The owner keeps the box reachable while the output lives (a process handle's user
 * value, a primitive's own stack). */
#pragma once

#include <stdbool.h>
#include <stddef.h>

#include "rr.h"

#define RR_OUTPUT_DEFAULT_MAX_CAPTURE (1024 * 1024)

typedef struct RrOutput RrOutput;
typedef struct RrOutputBox RrOutputBox;

/* One pipe. */
typedef struct RrStream {
        RrOutput *output;
        const char *name; /* "stdout" or "stderr": what on_line receives */
        int fd;           /* parent's read end, -1 once done */
        sd_event_source *source;
        bool eof;
        char *capture; /* up to max_capture bytes */
        size_t capture_len, capture_size;
        bool truncated;
        char *line; /* the partial line (only with on_line) */
        size_t line_len;
} RrStream;

struct RrOutput {
        RrStream out, err;
        const char *name; /* the program, for messages (not owned: the owner's) */
        bool capture, on_line;
        size_t max_capture;
        unsigned pending;   /* callback tasks started and not yet returned */
        bool paused;        /* reading stopped until the callbacks catch up */
        bool draining;      /* the writers are gone (rr_output_drain()) */
        RrOutputBox *box;   /* NULL before rr_output_attach() or once the box is gone */
        void (*progress)(RrOutput *o); /* a pipe ended or a callback returned; may be NULL */
};

/* Sets up what outputs need (metatables, the table of boxes, the main thread). Every module
 * that uses outputs calls it from its opener; idempotent. */
void rr_output_open(lua_State *L);

/* The options rr.proc and rr.systemd's m:run share, read from the table at idx (misuse raises):
 * capture, max_capture, timeout (> 0), kill_grace (>= 0). A field absent leaves its value. */
void rr_output_check_opts(lua_State *L, int idx, bool *capture, size_t *max_capture, double *timeout,
                          double *kill_grace);

/* An output not yet connected to pipes: capture, max_capture and the program's name (kept by
 * pointer). */
void rr_output_init(RrOutput *o, const char *name, bool capture, size_t max_capture,
                    void (*progress)(RrOutput *o));

/* Pushes a new box, not tied to any output yet, holding the functions at on_line_idx and
 * extra_idx (0: none). Raises on out of memory (nothing is acquired yet when it is called). */
void rr_output_new_box(lua_State *L, int on_line_idx, int extra_idx);

/* Ties o to the box at idx: its callbacks are the box's. Allocates the line buffers when the box
 * has an on_line. 0 or -ENOMEM. Never raises. */
int rr_output_attach(lua_State *L, int idx, RrOutput *o);

/* Makes the two pipes: o keeps the read ends, *out_child and *err_child are the write ends for
 * the child (close-on-exec; the caller closes them once the child has its own). 0 or -errno. */
int rr_output_pipes(RrOutput *o, int *out_child, int *err_child);

/* Starts reading both pipes on the loop. 0 or -errno. */
int rr_output_watch(RrOutput *o);

/* The writers are gone (the process exited, the unit's processes are all dead): read what is in
 * the pipes now, then close them. A pipe still held by someone else (a grandchild, a manager's
 * copy) is not waited for. */
void rr_output_drain(RrOutput *o);

/* Both pipes done and every callback returned. */
bool rr_output_idle(const RrOutput *o);

/* Starts the task that calls the box's second callback with the arguments push_args(L, ctx)
 * pushes (it returns their count), counted as pending like a line. For loop callbacks (runs Lua
 * on the main thread, in protected mode): a call that cannot be made (out of memory) is dropped
 * with a message on stderr. */
void rr_output_call(RrOutput *o, int (*push_args)(lua_State *L, void *ctx), void *ctx);

/* Sets stdout, stderr ("" without capture) and truncated = { stdout =, stderr = } in the table on
 * top of L. */
void rr_output_push(lua_State *L, const RrOutput *o);

/* Closes the pipes and their sources, frees the buffers, unties the box (callback tasks still
 * running then find it closed). Idempotent. */
void rr_output_free(RrOutput *o);
