/* touchrate MIB: time memhold's fill (first touch of fresh anonymous memory with a
   xorshift pattern) of MIB MiB; prints the seconds it took on CLOCK_MONOTONIC. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static uint64_t next(uint64_t *s) { *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17; return *s; }

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: touchrate MIB\n"); return 2; }
    size_t words = strtoull(argv[1], 0, 10) * 1024 * 1024 / 8;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    uint64_t *mem = mmap(0, words * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) { perror("mmap"); return 1; }
    uint64_t s = 7;
    for (size_t i = 0; i < words; i++) mem[i] = next(&s);
    clock_gettime(CLOCK_MONOTONIC, &b);
    volatile uint64_t sink = mem[words / 2];
    (void)sink;
    printf("%.6f\n", (double)(b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9);
    return 0;
}
