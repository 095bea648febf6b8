"""Pull the line that explains a failure out of a CRIU log.

CRIU writes one line per event, `(SS.UUUUUU) Level (file.c:line): text`; when it fails,
the first real error names the cause and the later ones are consequences (rollback,
"Dumping FAILED."). A few errors are logged on every run and mean nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

_TIMESTAMP = re.compile(r"^\(\s*\d+\.\d+\)\s*")
_ERROR_MARK = "Error ("

# Logged on every run in unprivileged-rlimit sandboxes; CRIU carries on regardless.
_HARMLESS = (
    "rlimit: Can't setup RLIMIT_NOFILE",
)

# The summary CRIU prints last; only worth showing when nothing more specific exists.
_SUMMARY_SUFFIXES = ("Dumping FAILED.", "Restoring FAILED.", "Pre-dumping FAILED.")


def parse_criu_log(path: Path) -> str | None:
    """The first meaningful `Error (...)` line of the log at `path`, timestamp removed.

    None when the log is missing, unreadable or holds no error.
    """
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    return first_error_line(text)


def first_error_line(text: str) -> str | None:
    """Like `parse_criu_log`, on the log's text."""
    summary: str | None = None
    for raw in text.splitlines():
        if _ERROR_MARK not in raw:
            continue
        line = _TIMESTAMP.sub("", raw).strip()
        if any(marker in line for marker in _HARMLESS):
            continue
        if line.endswith(_SUMMARY_SUFFIXES):
            summary = summary or line
            continue
        return line
    return summary
