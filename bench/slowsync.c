/* A slower disk for bench/bench.py --fsync-delay-us: fsync and fdatasync do their work, then
 * wait SLOW_FSYNC_US microseconds more. Loaded with LD_PRELOAD into mail2alert and into
 * Postfix's daemons alike, so that both meet the same disk in one run.
 *
 *   gcc -shared -fPIC -O2 -o slowsync.so slowsync.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static void slower(void) {
    const char *us = getenv("SLOW_FSYNC_US");
    long wait = us ? atol(us) : 0;
    if (wait > 0) {
        struct timespec t = {wait / 1000000L, (wait % 1000000L) * 1000L};
        while (nanosleep(&t, &t) != 0) {
        }
    }
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    int done = real(fd);
    slower();
    return done;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    int done = real(fd);
    slower();
    return done;
}
