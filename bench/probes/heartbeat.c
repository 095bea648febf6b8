/* heartbeat GAPS_FILE [THRESHOLD_US]: wake every millisecond on CLOCK_MONOTONIC and
   append "<from_ns> <to_ns>" (CLOCK_MONOTONIC) to GAPS_FILE for every interval
   between two wake-ups longer than THRESHOLD_US (default 3000). A freeze, a CRIU
   seize or a SIGSTOP shows up as one long interval. Only gaps are written, so the
   file stays tiny and adds nothing to a checkpoint. The file is opened per gap, never
   held: a restore without the writable layer (no --rw) has no such file to reopen. */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3) { fprintf(stderr, "usage: heartbeat GAPS_FILE [THRESHOLD_US]\n"); return 2; }
    long long threshold_ns = (argc == 3 ? atoll(argv[2]) : 3000) * 1000LL;
    struct timespec tick = {0, 1000000};
    long long previous = now_ns();
    char line[64];
    for (;;) {
        clock_nanosleep(CLOCK_MONOTONIC, 0, &tick, NULL);
        long long current = now_ns();
        if (current - previous > threshold_ns) {
            int n = snprintf(line, sizeof line, "%lld %lld\n", previous, current);
            int fd = open(argv[1], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
            if (fd < 0 || write(fd, line, (size_t)n) != n) return 1;
            close(fd);
        }
        previous = current;
    }
}
