"""Images without a registry, packed as OCI image layout tars, then `ctr image import`ed:
a busybox rootfs (Debian's busybox-static plus one link per applet), and the sandbox
("pause") image CRI starts first in every pod: one static binary built from pause.c."""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from kybernate.sandbox.containerd import Containerd

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


BUSYBOX_IMAGE_REF = "docker.io/kybernate-test/busybox:latest"
PAUSE_IMAGE_REF = "docker.io/kybernate-test/pause:latest"
PAUSE_SOURCE = Path(__file__).with_name("pause.c")

MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def oci_architecture() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def _reset_owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0  # reproducible layer digests
    return info


def layer_tar(rootfs: Path) -> bytes:
    """An uncompressed layer of `rootfs`, entries relative ("bin/sh"), owned by root."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(rootfs):
            dirnames.sort()
            for name in sorted(dirnames) + sorted(filenames):
                path = Path(dirpath) / name
                tar.add(path, arcname=str(path.relative_to(rootfs)), recursive=False,
                        filter=_reset_owner)
    return buffer.getvalue()


class _Layout:
    """Blobs of an OCI image layout, addressed by digest."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def add(self, media_type: str, data: bytes) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}


def build_oci_archive(out: Path, ref: str = BUSYBOX_IMAGE_REF,
                      extra_files: dict[str, bytes] | None = None,
                      rootfs: Path | None = None) -> Path:
    """Write an OCI image layout tar for a busybox image named `ref` to `out`, or for
    an image of the ready `rootfs` folder where one is given (no busybox needed)."""
    if rootfs is not None:
        layer = layer_tar(rootfs)
    else:
        with tempfile.TemporaryDirectory(prefix="kyb-img-") as scratch:
            layer = layer_tar(make_rootfs(Path(scratch) / "rootfs", extra_files))
    return write_oci_archive(out, ref, layer,
                             {"Env": [DEFAULT_PATH], "Cmd": ["/bin/sh"], "WorkingDir": "/"})


def build_pause_archive(out: Path, ref: str = PAUSE_IMAGE_REF) -> Path:
    """Write an OCI image layout tar for a sandbox image named `ref`: `/pause`, built
    from pause.c with `gcc -static`, and nothing else."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise FileNotFoundError("gcc is needed to build the pause image (run .ci/setup)")
    with tempfile.TemporaryDirectory(prefix="kyb-img-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        rootfs.mkdir()
        subprocess.run([gcc, "-static", "-Os", "-s", "-Wall", "-Werror", "-o",
                        str(rootfs / "pause"), str(PAUSE_SOURCE)],
                       check=True, capture_output=True, timeout=120)
        layer = layer_tar(rootfs)
    return write_oci_archive(out, ref, layer, {"Entrypoint": ["/pause"], "WorkingDir": "/"})


def write_oci_archive(out: Path, ref: str, layer: bytes, image_config: dict[str, Any]) -> Path:
    """Write a one-layer OCI image layout tar named `ref` with the given image config."""
    layout = _Layout()
    layer_desc = layout.add(LAYER_MEDIA_TYPE, layer)
    config = {
        "architecture": oci_architecture(),
        "os": "linux",
        "config": image_config,
        "rootfs": {"type": "layers", "diff_ids": [layer_desc["digest"]]},
    }
    config_desc = layout.add(CONFIG_MEDIA_TYPE, json.dumps(config).encode())
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
                "config": config_desc, "layers": [layer_desc]}
    manifest_desc = layout.add(MANIFEST_MEDIA_TYPE, json.dumps(manifest).encode())
    manifest_desc["platform"] = {"architecture": oci_architecture(), "os": "linux"}
    manifest_desc["annotations"] = {"io.containerd.image.name": ref,
                                    "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[-1]}
    index = {"schemaVersion": 2, "manifests": [manifest_desc]}

    with tarfile.open(out, mode="w") as tar:
        def put(name: str, data: bytes) -> None:
            info = _reset_owner(tarfile.TarInfo(name))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        put("oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())
        put("index.json", json.dumps(index).encode())
        for digest, data in layout.blobs.items():
            put(f"blobs/sha256/{digest.split(':', 1)[1]}", data)
    return out


def import_image(containerd: Containerd, archive: Path, ref: str = BUSYBOX_IMAGE_REF) -> str:
    """`ctr image import` the archive and check the image is there under `ref`."""
    containerd.ctr("images", "import", str(archive), timeout=120, check=True)
    listed = containerd.ctr("images", "ls", "-q", check=True).stdout.split()
    if ref not in listed:
        raise AssertionError(f"image {ref} missing after import; have {listed}")
    return ref
