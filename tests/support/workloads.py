"""Stateful test workloads whose state lives only in memory.

- `COUNTER_SCRIPT`: a busybox shell loop that keeps its count in a shell variable and
  writes it to a file; after a restore the count must go on, not restart from 0.
- `memhold`: a small static C program that fills N MiB with a pattern derived from a
  seed, then re-verifies it every second and reports to a status file. After a
  restore the pattern must still verify: pages lost or mangled by a dump show up as
  a mismatch. Built once per machine with the system's gcc (static, so it runs in a
  busybox rootfs).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

COUNTER_SCRIPT = (
    "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; "
    "sleep 0.1; done"
)

MEMHOLD_SOURCE = r"""
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* memhold MIB SEED STATUS_FILE: fill MIB MiB with a seeded pattern, then verify it
   once a second, writing "ok <rounds> <mib>" or "BAD <offset>" to STATUS_FILE. */
static uint64_t next(uint64_t *s) {
    *s ^= *s << 13; *s ^= *s >> 7; *s ^= *s << 17; return *s;
}

static void report(const char *path, const char *text) {
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    fputs(text, f);
    fclose(f);
    rename(tmp, path);
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: memhold MIB SEED STATUS\n"); return 2; }
    size_t mib = strtoull(argv[1], 0, 10);
    uint64_t seed = strtoull(argv[2], 0, 10) | 1;
    size_t words = mib * 1024 * 1024 / 8;
    uint64_t *mem = mmap(0, words * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) { perror("mmap"); return 1; }
    uint64_t s = seed;
    for (size_t i = 0; i < words; i++) mem[i] = next(&s);
    char line[256];
    snprintf(line, sizeof line, "filled %zu\n", mib);
    report(argv[3], line);
    for (unsigned long round = 1;; round++) {
        sleep(1);
        s = seed;
        for (size_t i = 0; i < words; i++) {
            if (mem[i] != next(&s)) {
                snprintf(line, sizeof line, "BAD %zu\n", i * 8);
                report(argv[3], line);
                return 3;
            }
        }
        snprintf(line, sizeof line, "ok %lu %zu\n", round, mib);
        report(argv[3], line);
    }
}
"""


def memhold_binary(cache_dir: Path | None = None) -> Path:
    """Compile memhold (once per source version) and return the static binary's path."""
    digest = hashlib.sha256(MEMHOLD_SOURCE.encode()).hexdigest()[:12]
    cache = cache_dir or Path(tempfile.gettempdir()) / "kybernate-workloads"
    cache.mkdir(parents=True, exist_ok=True)
    binary = cache / f"memhold-{digest}"
    if binary.exists():
        return binary
    source = cache / f"memhold-{digest}.c"
    source.write_text(MEMHOLD_SOURCE)
    partial = cache / f".memhold-{digest}.{os.getpid()}"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(partial), str(source)], check=True)
    partial.rename(binary)
    return binary


def memhold_files() -> dict[str, bytes]:
    """Extra rootfs files for tests/support/bundle.make_rootfs: /bin/memhold."""
    return {"/bin/memhold": memhold_binary().read_bytes()}
