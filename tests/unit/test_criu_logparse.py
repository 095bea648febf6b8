"""CRIU's failing line, picked out of real and sample logs."""

from __future__ import annotations

import subprocess
from pathlib import Path

from kybernate.criu import parse_criu_log
from kybernate.criu.logparse import first_error_line


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_real_failing_dump_log_names_the_missing_task(tmp_path: Path) -> None:
    pid = _dead_pid()
    result = subprocess.run(
        ["criu", "dump", "-t", str(pid), "-D", str(tmp_path), "-o", "dump.log", "-v4"],
        capture_output=True, timeout=60, check=False,
    )
    assert result.returncode != 0
    line = parse_criu_log(tmp_path / "dump.log")
    assert line is not None
    assert line.startswith("Error (") and str(pid) in line
    assert not line.startswith("(")  # timestamp removed
    assert "RLIMIT_NOFILE" not in line and not line.endswith("Dumping FAILED.")


SAMPLE = """\
(00.000010) Version: 4.2.1 (gitid 0)
(00.053836) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.100000) Warn  (criu/x.c:1): something odd
(00.200000) Error (criu/files-reg.c:1357): Can't lookup mount=77 for fd=1 path=/out.log
(00.300000) Error (criu/cr-dump.c:1975): Dumping FAILED.
"""


def test_first_real_error_wins_over_harmless_and_summary() -> None:
    assert first_error_line(SAMPLE) == (
        "Error (criu/files-reg.c:1357): Can't lookup mount=77 for fd=1 path=/out.log")


def test_summary_only_when_nothing_more_specific() -> None:
    text = "\n".join(line for line in SAMPLE.splitlines() if "files-reg" not in line)
    assert first_error_line(text) == "Error (criu/cr-dump.c:1975): Dumping FAILED."


def test_no_error_or_no_log_gives_none(tmp_path: Path) -> None:
    assert first_error_line("(00.1) Dumping finished successfully\n") is None
    assert parse_criu_log(tmp_path / "missing.log") is None
