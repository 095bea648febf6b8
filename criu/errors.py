"""The error a failed CRIU request raises."""

from __future__ import annotations

from pathlib import Path

from kybernate.errors import Internal


class CriuError(Internal):
    """CRIU refused or failed a request.

    The message carries CRIU's own first error line when its log has one, and the log's
    path; `log_path` is None for requests that write no log (VERSION).
    """

    def __init__(self, message: str, *, log_path: Path | None = None,
                 log_line: str | None = None) -> None:
        super().__init__(message)
        self.log_path = log_path
        self.log_line = log_line
