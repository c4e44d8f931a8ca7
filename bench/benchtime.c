/* benchtime: run a command and write its resource usage, as wait4() reports it, to a file.
 * make bench uses it instead of /usr/bin/time, whose user and system times have 10 ms
 * steps (a 20-service run of the engine costs a few tens of ms of CPU).
 *
 *   benchtime OUTFILE COMMAND [ARGS...]
 *
 * OUTFILE gets one line: "wall_us=N user_us=N sys_us=N maxrss_kb=N status=N", where the
 * times cover the command and every descendant it waited for, and status is the wait
 * status. benchtime exits with the command's exit code (128+signal when it was killed). */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

/* Monotonic clock in microseconds. */
static int64_t now_us(void) {
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (int64_t) ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static int64_t tv_us(struct timeval tv) {
        return (int64_t) tv.tv_sec * 1000000 + tv.tv_usec;
}

int main(int argc, char **argv) {
        struct rusage ru;
        int64_t t0, t1;
        pid_t pid;
        FILE *out;
        int r, status;

        if (argc < 3) {
                fprintf(stderr, "usage: benchtime OUTFILE COMMAND [ARGS...]\n");
                return 2;
        }
        t0 = now_us();
        r = posix_spawnp(&pid, argv[2], NULL, NULL, argv + 2, environ);
        if (r != 0) {
                fprintf(stderr, "benchtime: cannot run %s: %s\n", argv[2], strerror(r));
                return 127;
        }
        while (wait4(pid, &status, 0, &ru) < 0) {
                if (errno != EINTR) {
                        fprintf(stderr, "benchtime: wait4: %m\n");
                        return 2;
                }
        }
        t1 = now_us();
        out = fopen(argv[1], "we");
        if (!out) {
                fprintf(stderr, "benchtime: cannot write %s: %m\n", argv[1]);
                return 2;
        }
        fprintf(out, "wall_us=%lld user_us=%lld sys_us=%lld maxrss_kb=%ld status=%d\n", (long long) (t1 - t0),
                (long long) tv_us(ru.ru_utime), (long long) tv_us(ru.ru_stime), ru.ru_maxrss, status);
        if (fclose(out) != 0) {
                fprintf(stderr, "benchtime: cannot write %s: %m\n", argv[1]);
                return 2;
        }
        if (WIFEXITED(status))
                return WEXITSTATUS(status);
        return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}
