"""Hold CRIU's restored tasks until the agent has verified the pages images.

When PrepareRestore defers the hash of the pages images (the agent hashes them while
CRIU restores), nothing restored may run before that hash matched. CRIU has the
place for it: after every task is restored (memory included) and before any resumes,
it runs the `post-restore` action scripts, and a script that fails makes CRIU kill
every restored task and fail the restore. runc passes CRIU the configuration file
its bundle names in the `org.criu.config` annotation, and CRIU runs the action
scripts of that file beside runc's own notifications.

So for such a restore the shim writes, in the restore's work directory: a FIFO, a
script that reads one line from it at `post-restore` and succeeds only on "ok", and
a CRIU configuration naming the script; it adds the annotation to the bundle's
config.json for the one `runc restore` (and puts the original back afterwards). The
shim holds the FIFO open for writing from the start, so the script's read waits
for the verdict; should the shim die, the read ends empty and the restore fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any

CRIU_CONFIG_ANNOTATION = "org.criu.config"
FIFO_NAME = "kybernate-verdict"
MARKER_NAME = "kybernate-held"
SCRIPT_NAME = "kybernate-verify.sh"
CONFIG_NAME = "kybernate-criu.conf"
VERDICT_OK = b"ok\n"
VERDICT_FAILED = b"failed\n"

_SCRIPT = """#!/bin/sh
# Kybernate: hold the restored tasks until the agent has verified the pages images.
[ "$CRTOOLS_SCRIPT_ACTION" = post-restore ] || exit 0
: > '{marker}'
read -r verdict < '{fifo}'
[ "$verdict" = ok ]
"""


def usable(spec: dict[str, Any], work_path: Path) -> bool:
    """Whether this restore can be gated: the bundle names no CRIU configuration of
    its own, and the work path is plain enough for CRIU's configuration syntax."""
    annotations = spec.get("annotations") or {}
    if not isinstance(annotations, dict) or CRIU_CONFIG_ANNOTATION in annotations:
        return False
    text = str(work_path)
    return work_path.is_absolute() and not any(c.isspace() or c in "'\"\\#" for c in text)


class VerificationGate:
    """One restore's gate: `install()`, then `open_verdict()`, run `runc restore`, and
    `uninstall()` whatever happened."""

    def __init__(self, bundle: Path, work_path: Path) -> None:
        self._bundle = bundle
        self._work_path = work_path
        self._config_json = bundle / "config.json"
        self._original: bytes | None = None
        self._fifo_fd = -1
        self.decided = False

    @property
    def fifo(self) -> Path:
        return self._work_path / FIFO_NAME

    def install(self) -> None:
        """Blocking: FIFO (held open), script, CRIU configuration, annotated config.json."""
        self._work_path.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.fifo.unlink()
        os.mkfifo(self.fifo, 0o600)
        # O_RDWR: never blocks, and keeps a writer open until the verdict is written.
        self._fifo_fd = os.open(self.fifo, os.O_RDWR | os.O_CLOEXEC)
        script = self._work_path / SCRIPT_NAME
        with contextlib.suppress(FileNotFoundError):
            (self._work_path / MARKER_NAME).unlink()
        script.write_text(_SCRIPT.format(fifo=self.fifo, marker=self._work_path / MARKER_NAME))
        script.chmod(stat.S_IRWXU)
        config = self._work_path / CONFIG_NAME
        config.write_text(f"action-script {script}\n")
        self._original = self._config_json.read_bytes()
        spec = json.loads(self._original)
        spec.setdefault("annotations", {})[CRIU_CONFIG_ANNOTATION] = str(config)
        temporary = self._config_json.with_name(".config.json.kybernate")
        temporary.write_text(json.dumps(spec))
        os.rename(temporary, self._config_json)

    def held(self) -> bool:
        """Whether CRIU ran the script, i.e. held the restored tasks for the verdict."""
        return (self._work_path / MARKER_NAME).exists()

    def decide(self, ok: bool) -> None:
        """Let the restored tasks run (ok) or have CRIU kill them."""
        if self.decided or self._fifo_fd < 0:
            return
        self.decided = True
        os.write(self._fifo_fd, VERDICT_OK if ok else VERDICT_FAILED)

    def uninstall(self) -> None:
        """Blocking: the original config.json back, the gate's files gone."""
        if self._fifo_fd >= 0:
            os.close(self._fifo_fd)  # a script still reading now reads nothing: fails
            self._fifo_fd = -1
        if self._original is not None:
            temporary = self._config_json.with_name(".config.json.kybernate")
            temporary.write_bytes(self._original)
            os.rename(temporary, self._config_json)
            self._original = None
        for name in (FIFO_NAME, SCRIPT_NAME, CONFIG_NAME, MARKER_NAME):
            with contextlib.suppress(FileNotFoundError):
                (self._work_path / name).unlink()
