"""Builders for test root filesystems and OCI bundles from Debian's busybox-static.

No image can be pulled here, so every test image is a busybox rootfs: the static
binary plus one link per applet.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from kybernate.sandbox.images import BUSYBOX, make_rootfs  # noqa: F401  (re-exported for tests)


def default_spec(args: list[str], *, terminal: bool = False, cgroups_path: str | None = None) -> dict[str, Any]:
    """runc's default spec (`runc spec`), with our args and a writable rootfs."""
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"kyb-spec-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["runc", "spec"], cwd=scratch, check=True, capture_output=True)
        spec: dict[str, Any] = json.loads((scratch / "config.json").read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    spec["process"]["args"] = args
    spec["process"]["terminal"] = terminal
    spec["root"] = {"path": "rootfs", "readonly": False}
    if cgroups_path:
        spec["linux"]["cgroupsPath"] = cgroups_path
    return spec


def make_bundle(bundle: Path, args: list[str], *, terminal: bool = False,
                cgroups_path: str | None = None, extra_files: dict[str, bytes] | None = None) -> Path:
    """A complete runc bundle at `bundle`: `rootfs/` plus `config.json`."""
    bundle.mkdir(parents=True, exist_ok=True)
    make_rootfs(bundle / "rootfs", extra_files)
    spec = default_spec(args, terminal=terminal, cgroups_path=cgroups_path)
    (bundle / "config.json").write_text(json.dumps(spec, indent=2))
    return bundle
