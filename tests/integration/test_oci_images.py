"""Checkpoints as OCI checkpoint images, through a real containerd, shim, agent, runc,
CRIU and registry (Debian's docker-registry on loopback): export, the image as
checkpointctl reads it, import into a namespace, restore by `io.kybernate.restore-from=
oci:REF`; and what the agent refuses (registries it was not given, tampered layers).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import tarfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.agent import AgentProcess, running_agent, temporary_workdir
from tests.support.containerd import KYBERNATE_RUNTIME, Containerd
from tests.support.counters import (
    checkpoint,
    cli,
    container_names,
    count,
    records,
    run,
    wait_for_count,
)
from tests.support.registry import RegistryServer, running_registry
from tests.support.tasks import private_containerd

pytestmark = pytest.mark.integration

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with temporary_workdir("kyb-oci") as path:
        yield path


@pytest.fixture(scope="module")
def registry() -> Iterator[RegistryServer]:
    with running_registry() as server:
        yield server


@pytest.fixture(scope="module")
def agent(workdir: Path, registry: RegistryServer) -> Iterator[AgentProcess]:
    toml = f'[oci]\nregistries = ["{registry.host}"]\nplain_http = ["{registry.host}"]\n'
    with running_agent(workdir, "oci", extra_toml=toml) as node:
        yield node


@pytest.fixture(scope="module")
def ctd(busybox_archive: Path) -> Iterator[Containerd]:
    with private_containerd(Containerd(), busybox_archive) as instance:
        yield instance


@pytest.fixture
def names(ctd: Containerd) -> Iterator[Callable[[str], str]]:
    with container_names(ctd) as make:
        yield make


def get(registry: RegistryServer, path: str, accept: str = "") -> bytes:
    request = urllib.request.Request(registry.url(path), headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return bytes(answer.read())


def test_export_show_import_and_restore_through_a_registry(
        ctd: Containerd, agent: AgentProcess, registry: RegistryServer, names: Callable[[str], str],
        workdir: Path) -> None:
    source = names("oci")
    run(ctd, agent, source)
    # Far enough that a fresh start (counting from 1) cannot pass for a restore.
    wait_for_count(ctd, source, 30)
    taken = checkpoint(ctd, agent, source)
    reference = f"{registry.host}/kybernate/{source}:v1"

    exported = json.loads(cli(agent, "export", taken["id"], reference, "--json").stdout)
    assert exported["id"] == taken["id"] and exported["digest"].startswith("sha256:")

    # What the registry holds: an OCI image manifest with the checkpoint annotations
    # and one tar layer.
    manifest_bytes = get(registry, f"/v2/kybernate/{source}/manifests/v1", OCI_MANIFEST)
    assert "sha256:" + hashlib.sha256(manifest_bytes).hexdigest() == exported["digest"]
    manifest = json.loads(manifest_bytes)
    annotations = manifest["annotations"]
    assert annotations["org.criu.checkpoint.container.name"] == source
    assert annotations["org.criu.checkpoint.runtime.name"] == KYBERNATE_RUNTIME
    assert annotations["org.criu.checkpoint.criu.version"].startswith("4.")
    assert annotations.get("org.criu.checkpoint.rootfsImageName", "") == taken.get("image", "")
    assert annotations["io.kybernate.checkpoint.id"] == taken["id"]
    [layer] = manifest["layers"]
    assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    blob = get(registry, f"/v2/kybernate/{source}/blobs/{layer['digest']}")
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer["digest"] and len(blob) == layer["size"]
    archive = workdir / f"{source}.tar"
    archive.write_bytes(blob)
    with tarfile.open(archive) as tar:
        members = set(tar.getnames())
    assert {"checkpoint", "config.dump", "spec.dump", "checkpoint/metadata.json",
            "checkpoint/pstree.img", "checkpoint/descriptors.json"} <= members, sorted(members)

    # checkpointctl (Debian's) reads the image's archive as it reads Podman's and CRI-O's.
    shown = subprocess.run(["checkpointctl", "show", str(archive)], capture_output=True, text=True, timeout=60,
                           check=False)
    assert shown.returncode == 0, shown.stderr
    assert source in shown.stdout and KYBERNATE_RUNTIME in shown.stdout and "containerd" in shown.stdout, shown.stdout

    # Import into another namespace: a new checkpoint of its own there, verified.
    imported = json.loads(cli(agent, "import", reference, "-n", "imports", "--name", "golden", "--json").stdout)
    assert imported["namespace"] == "imports" and imported["name"] == "golden"
    assert imported["id"] != taken["id"] and imported["file_count"] == taken["file_count"]
    metadata = json.loads((agent.local_tier / imported["id"] / "metadata.json").read_text())
    assert metadata["imported_from"] == {**metadata["imported_from"], "reference": reference,
                                         "digest": exported["digest"], "id": taken["id"],
                                         "namespace": ctd.namespace}
    assert "verified" in cli(agent, "verify", imported["id"]).stdout

    # Restore by annotation naming the image: pulled, verified, recorded in the
    # restoring container's namespace, running with the checkpoint's memory.
    ctd.ctr("task", "kill", "-s", "KILL", source, timeout=30)
    restored = names("restored")
    run(ctd, agent, restored, restore_from=f"oci:{reference}")
    assert count(ctd, restored) >= 30, "the counter goes on from the checkpoint's value"
    rows = list(records(agent).values())
    pulled = [r for r in rows if r["namespace"] == ctd.namespace and r["name"].startswith("oci-")]
    assert len(pulled) == 1 and pulled[0]["id"] not in (taken["id"], imported["id"])

    # A second restore of the same image reuses what the namespace already pulled.
    again = names("again")
    run(ctd, agent, again, restore_from=f"oci:{reference}")
    rows = list(records(agent).values())
    assert len([r for r in rows if r["namespace"] == ctd.namespace and r["name"].startswith("oci-")]) == 1


def test_registries_not_configured_and_tampered_layers_are_refused(
        ctd: Containerd, agent: AgentProcess, registry: RegistryServer, names: Callable[[str], str]) -> None:
    source = names("tamper")
    run(ctd, agent, source)
    taken = checkpoint(ctd, agent, source)

    # A registry the agent was not given: refused before any request.
    refused = cli(agent, "export", taken["id"], f"127.0.0.1:1/kybernate/{source}:v1", check=False)
    assert refused.returncode != 0 and "not one the agent may use" in refused.stderr, refused.stderr
    err = run(ctd, agent, names("elsewhere"), restore_from=f"oci:127.0.0.1:1/kybernate/{source}:v1", check=False)
    assert "not one the agent may use" in err, err

    # An image whose layer lists a file outside its directory: refused, nothing kept.
    reference = f"{registry.host}/kybernate/{source}:evil"
    tier_before = sorted(p.name for p in agent.local_tier.iterdir())
    push_image(registry, f"kybernate/{source}", "evil", {"checkpoint/../../escape": b"x"})
    refused = cli(agent, "import", reference, "-n", "imports", check=False)
    assert refused.returncode != 0 and "escape" in refused.stderr, refused.stderr
    assert sorted(p.name for p in agent.local_tier.iterdir()) == tier_before
    # A symlink in the layer: refused.
    push_image(registry, f"kybernate/{source}", "link", {}, symlink=("checkpoint/pstree.img", "/etc/shadow"))
    refused = cli(agent, "import", f"{registry.host}/kybernate/{source}:link", "-n", "imports", check=False)
    assert refused.returncode != 0 and "not a regular file" in refused.stderr, refused.stderr
    # A checkpoint whose file no longer matches metadata.json: refused, naming it.
    exported = Path(agent.local_tier / taken["id"])
    files = {f"checkpoint/{p.relative_to(exported)}": p.read_bytes() for p in exported.rglob("*") if p.is_file()}
    files["checkpoint/pstree.img"] = files["checkpoint/pstree.img"] + b"\0"
    push_image(registry, f"kybernate/{source}", "altered", files)
    refused = cli(agent, "import", f"{registry.host}/kybernate/{source}:altered", "-n", "imports", check=False)
    assert refused.returncode != 0 and "pstree.img" in refused.stderr, refused.stderr
    assert sorted(p.name for p in agent.local_tier.iterdir()) == tier_before


def push_image(registry: RegistryServer, repository: str, tag: str, files: dict[str, bytes],
               symlink: tuple[str, str] | None = None) -> None:
    """Push a hand-made one-layer image, as a hostile registry user could."""
    import io

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        directory = tarfile.TarInfo("checkpoint")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink is not None:
            info = tarfile.TarInfo(symlink[0])
            info.type = tarfile.SYMTYPE
            info.linkname = symlink[1]
            tar.addfile(info)
    layer = buffer.getvalue()
    config = b"{}"
    for blob in (layer, config):
        upload(registry, repository, blob)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": "sha256:" + hashlib.sha256(config).hexdigest(), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": "sha256:" + hashlib.sha256(layer).hexdigest(), "size": len(layer)}]}).encode()
    request = urllib.request.Request(registry.url(f"/v2/{repository}/manifests/{tag}"), data=manifest,
                                     method="PUT", headers={"Content-Type": OCI_MANIFEST})
    urllib.request.urlopen(request, timeout=30).close()


def upload(registry: RegistryServer, repository: str, blob: bytes) -> None:
    start = urllib.request.Request(registry.url(f"/v2/{repository}/blobs/uploads/"), data=b"", method="POST")
    with urllib.request.urlopen(start, timeout=30) as answer:
        location = answer.headers["Location"]
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    url = location if location.startswith("http") else registry.url(location)
    put = urllib.request.Request(f"{url}{'&' if '?' in url else '?'}digest={digest}", data=blob, method="PUT",
                                 headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(put, timeout=30).close()
