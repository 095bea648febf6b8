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

BUSYBOX = Path(shutil.which("busybox") or "/bin/busybox")


def make_rootfs(root: Path, extra_files: dict[str, bytes] | None = None) -> Path:
    """Populate `root` with busybox, its applet links, and the files `/etc` needs."""
    for sub in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root", "var", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run(
        [str(BUSYBOX), "--list-full"], check=True, capture_output=True, text=True
    ).stdout.split()
    for applet in applets:
        link = root / applet
        if applet == "bin/busybox" or link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    (root / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    os.chmod(root / "tmp", 0o1777)
    for rel, data in (extra_files or {}).items():
        path = root / rel.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o755)
    return root


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
