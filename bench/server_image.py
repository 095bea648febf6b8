"""The image of the model-server benchmark, built here without a registry: Debian's
python3 (its .debs fetched with `apt-get download` and unpacked with `dpkg -x`), the
numpy and scikit-learn wheels from PyPI unpacked into its dist-packages, and
`bench/workload/inference_server.py` as /srv/server.py; byte-compiled, packed as one
OCI layer, imported with `ctr images import`.

Downloads and the finished archive are kept in a cache directory (default
/var/cache/kybernate-bench) so that later runs build nothing and fetch nothing; the
archive's name is a digest of everything that went in, so a changed package list or
server makes a new one. `rm -rf` the directory to get the space back.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from kybernate.sandbox.images import (
    CONFIG_MEDIA_TYPE,
    DEFAULT_PATH,
    LAYER_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    oci_architecture,
)

DEFAULT_CACHE = Path("/var/cache/kybernate-bench")
SERVER_SOURCE = Path(__file__).resolve().parent / "workload" / "inference_server.py"
SERVER_IMAGE_REF = "docker.io/kybernate-bench/model-server:1"
SERVER_PATH = "/srv/server.py"

# Debian's interpreter and the shared libraries its standard library and the wheels
# load; the versions are apt's candidates (bookworm's python3.11).
DEBIAN_PACKAGES = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "python3.11",
    "python3-minimal", "python3", "libpython3-stdlib", "media-types",
    "libc6", "libgcc-s1", "libstdc++6", "zlib1g", "libexpat1", "libffi8", "libssl3",
    "libsqlite3-0", "libbz2-1.0", "liblzma5", "libuuid1", "libncursesw6", "libtinfo6",
    "libreadline8", "libcrypt1", "libzstd1",
)
# The wheels a `pip install scikit-learn` brings, pinned so results stay comparable.
WHEELS = ("numpy==1.26.4", "scipy==1.13.1", "scikit-learn==1.5.2", "joblib==1.4.2",
          "threadpoolctl==3.5.0")
PYTHON_TAG = "3.11"
SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"
# Debian's merged /usr: these are links into /usr in the image.
MERGED_DIRS = ("bin", "sbin", "lib", "lib64")


def _run(argv: list[str], cwd: Path | None = None) -> None:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed ({result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()[-2000:]}")


def fetch_debs(cache: Path) -> list[Path]:
    """apt's candidate .deb of every package in DEBIAN_PACKAGES, downloaded once."""
    folder = cache / "debs"
    folder.mkdir(parents=True, exist_ok=True)
    if _has_user("_apt"):
        shutil.chown(folder, user="_apt")  # apt downloads as _apt
    found = {deb.name.split("_", 1)[0]: deb for deb in folder.glob("*.deb")}
    missing = [name for name in DEBIAN_PACKAGES if name not in found]
    if missing:
        _run(["apt-get", "download", "-q", *missing], cwd=folder)
        found = {deb.name.split("_", 1)[0]: deb for deb in folder.glob("*.deb")}
    absent = [name for name in DEBIAN_PACKAGES if name not in found]
    if absent:
        raise RuntimeError(f"apt-get download left out {absent} (run apt-get update?)")
    return [found[name] for name in DEBIAN_PACKAGES]


def _has_user(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def fetch_wheels(cache: Path, python: str) -> list[Path]:
    """The pinned manylinux wheels for CPython 3.11, downloaded once with pip."""
    folder = cache / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    wanted = {spec.split("==")[0].replace("-", "_"): spec.split("==")[1] for spec in WHEELS}

    def present() -> dict[str, Path]:
        have = {}
        for wheel in folder.glob("*.whl"):
            name, version = wheel.name.split("-")[:2]
            if wanted.get(name.lower()) == version:
                have[name.lower()] = wheel
        return have

    if len(present()) < len(wanted):
        _run([python, "-m", "pip", "download", "-q", "--only-binary=:all:", "--no-deps",
              "--python-version", PYTHON_TAG, "--implementation", "cp", "--abi", "cp311",
              "--platform", "manylinux2014_x86_64", "-d", str(folder), *WHEELS])
    have = present()
    if len(have) < len(wanted):
        raise RuntimeError(f"pip download left out {sorted(set(wanted) - set(have))}")
    return sorted(have.values())


def build_rootfs(root: Path, debs: list[Path], wheels: list[Path]) -> None:
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(root)])
    for name in MERGED_DIRS:
        legacy, merged = root / name, root / "usr" / name
        if legacy.is_symlink():
            continue
        merged.mkdir(parents=True, exist_ok=True)
        if legacy.is_dir():
            for entry in legacy.iterdir():
                target = merged / entry.name
                if target.exists() or target.is_symlink():
                    if entry.is_dir() and not entry.is_symlink() and target.is_dir():
                        shutil.copytree(entry, target, symlinks=True, dirs_exist_ok=True)
                        shutil.rmtree(entry)
                        continue
                    raise RuntimeError(f"usr-merge: both {entry} and {target} exist")
                entry.rename(target)
            legacy.rmdir()
        legacy.symlink_to(f"usr/{name}")
    site = root / SITE_PACKAGES
    site.mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.infolist():
                # pip's own data/scripts directories are not needed to import the package
                if member.filename.split("/", 1)[0].endswith(".data"):
                    continue
                archive.extract(member, site)
    (root / "srv").mkdir(exist_ok=True)
    shutil.copy2(SERVER_SOURCE, root / SERVER_PATH.lstrip("/"))
    for sub in ("proc", "sys", "dev", "tmp", "root", "etc", "run", "var/tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    (root / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    # Byte-compile with the host's python3 (the same 3.11 magic number); unchecked-hash
    # pycs stay valid although the layer resets every mtime, so the server never writes
    # into its rootfs (a leave-running checkpoint needs the writable layer unchanged).
    subprocess.run(["/usr/bin/python3", "-m", "compileall", "-q", "-j", "0",
                    "--invalidation-mode", "unchecked-hash", "-s", str(root), "-p", "/",
                    str(root / "usr/lib/python3.11"), str(site), str(root / "srv")],
                   capture_output=True, check=False)  # a few test files of scipy do not compile


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest(), path.stat().st_size


def pack_oci_archive(rootfs: Path, out: Path, ref: str, config: dict[str, Any]) -> Path:
    """One uncompressed layer of `rootfs` (GNU tar: sorted, root-owned, mtime 0, so the
    digest is reproducible) in an OCI image layout tar written to `out`, streamed from
    disk (the layer is hundreds of MB)."""
    with tempfile.TemporaryDirectory(prefix="kyb-layer-", dir=out.parent) as scratch:
        layer = Path(scratch) / "layer.tar"
        _run(["tar", "--sort=name", "--numeric-owner", "--owner=0", "--group=0", "--mtime=@0",
              "--format=posix", "--pax-option=delete=atime,delete=ctime", "-C", str(rootfs),
              "-cf", str(layer), "."])
        layer_digest, layer_size = _sha256_file(layer)
        image_config = {"architecture": oci_architecture(), "os": "linux", "config": config,
                        "rootfs": {"type": "layers", "diff_ids": [layer_digest]}}
        blobs: dict[str, bytes] = {}

        def blob(media_type: str, document: dict[str, Any]) -> dict[str, Any]:
            data = json.dumps(document).encode()
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            blobs[digest] = data
            return {"mediaType": media_type, "digest": digest, "size": len(data)}

        manifest = blob(MANIFEST_MEDIA_TYPE, {
            "schemaVersion": 2, "mediaType": MANIFEST_MEDIA_TYPE,
            "config": blob(CONFIG_MEDIA_TYPE, image_config),
            "layers": [{"mediaType": LAYER_MEDIA_TYPE, "digest": layer_digest, "size": layer_size}]})
        manifest["platform"] = {"architecture": oci_architecture(), "os": "linux"}
        manifest["annotations"] = {"io.containerd.image.name": ref,
                                   "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[-1]}
        partial = out.with_name(f".{out.name}.{os.getpid()}")
        with tarfile.open(partial, "w") as tar:
            def put(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

            put("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
            put("index.json", json.dumps({"schemaVersion": 2, "manifests": [manifest]}).encode())
            for digest, data in blobs.items():
                put(f"blobs/sha256/{digest.split(':', 1)[1]}", data)
            tar.add(layer, arcname=f"blobs/sha256/{layer_digest.split(':', 1)[1]}")
        partial.rename(out)
    return out


def server_image_archive(cache: Path = DEFAULT_CACHE, python: str = "python3") -> Path:
    """The model server's OCI archive, built (and cached) when absent."""
    debs = fetch_debs(cache)
    wheels = fetch_wheels(cache, python)
    recipe = hashlib.sha256()
    for part in [*(d.name for d in debs), *(w.name for w in wheels), SERVER_SOURCE.read_text(),
                 SERVER_IMAGE_REF, Path(__file__).read_text()]:
        recipe.update(part.encode() + b"\0")
    images = cache / "images"
    images.mkdir(parents=True, exist_ok=True)
    archive = images / f"model-server-{recipe.hexdigest()[:16]}.tar"
    if archive.exists():
        return archive
    for stale in images.glob("model-server-*.tar"):
        stale.unlink()  # one archive at a time: each is a few hundred MB
    with tempfile.TemporaryDirectory(prefix="kyb-server-rootfs-", dir=images) as scratch:
        rootfs = Path(scratch) / "rootfs"
        rootfs.mkdir()
        build_rootfs(rootfs, debs, wheels)
        # One BLAS/OpenMP thread: on a shared 2-core VM spinning worker threads make the
        # cold start swing 2x between runs; the restores are not affected either way.
        config = {"Env": [DEFAULT_PATH, "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1",
                          "OPENBLAS_NUM_THREADS=1", "OMP_NUM_THREADS=1"],
                  "Cmd": ["/usr/bin/python3", SERVER_PATH], "WorkingDir": "/"}
        pack_oci_archive(rootfs, archive, SERVER_IMAGE_REF, config)
    return archive


if __name__ == "__main__":
    import sys

    print(server_image_archive(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_CACHE,
                               sys.executable))
