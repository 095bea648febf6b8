"""The containerd config snippets in packaging/containerd, loaded by a real containerd
as their headers say: the one for this run's containerd (1.7: config version 2,
appended to the main config; 2.x: version 3, imported) shows the kybernate handler and
its options in `containerd config dump`, beside runc and the main config's own CRI
settings."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path
from typing import Any

from tests.support.containerd import KYBERNATE_RUNTIME, ContainerdRelease, default_release

PACKAGING = Path(__file__).resolve().parents[2] / "packaging" / "containerd"
SANDBOX_IMAGE = "registry.example.com/pause:9"


def dump(release: ContainerdRelease, config: Path) -> dict[str, Any]:
    result = subprocess.run([release.containerd, "--config", str(config), "config", "dump"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return tomllib.loads(result.stdout)


def private_dirs(tmp_path: Path) -> str:
    return f'root = "{tmp_path / "root"}"\nstate = "{tmp_path / "state"}"\n'


def assert_kybernate_handler(runtimes: dict[str, Any]) -> None:
    kybernate = runtimes["kybernate"]
    assert kybernate["runtime_type"] == KYBERNATE_RUNTIME
    assert kybernate["pod_annotations"] == ["io.kybernate.*"]
    assert kybernate["container_annotations"] == ["io.kybernate.*"]
    assert kybernate["options"] == {"TypeUrl": "containerd.runc.v1.Options",
                                    "ConfigPath": "/etc/kybernate/shim.toml"}
    assert runtimes["runc"]["runtime_type"] == "io.containerd.runc.v2"


def test_containerd_loads_the_kybernate_handler_snippet(tmp_path: Path) -> None:
    release = default_release()
    if release.config_version >= 3:
        snippet = PACKAGING / "containerd-2.toml"
        main = tmp_path / "config.toml"
        main.write_text(
            f"version = 3\n{private_dirs(tmp_path)}imports = [\"{snippet}\"]\n"
            f'[plugins."io.containerd.cri.v1.images".pinned_images]\n  sandbox = "{SANDBOX_IMAGE}"\n'
            '[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]\n'
            "  SystemdCgroup = true\n")
        dumped = dump(release, main)
        assert str(snippet) in dumped["imports"]
        assert dumped["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"] == SANDBOX_IMAGE
        runtimes = dumped["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]
        assert runtimes["runc"]["options"]["SystemdCgroup"] is True
    else:
        snippet = PACKAGING / "containerd-1.7.toml"
        tables = snippet.read_text().split("version = 2\n", 1)[1]
        default = subprocess.run([release.containerd, "config", "default"], capture_output=True,
                                 text=True, timeout=60, check=True).stdout
        main = tmp_path / "config.toml"
        main.write_text(default.replace('sandbox_image = "', f'sandbox_image = "{SANDBOX_IMAGE}" #', 1)
                        + tables)
        dumped = dump(release, main)
        cri = dumped["plugins"]["io.containerd.grpc.v1.cri"]
        assert cri["sandbox_image"] == SANDBOX_IMAGE
        runtimes = cri["containerd"]["runtimes"]
        # Why it is appended, not imported: 1.7 replaces the whole CRI table with an
        # imported one (runc's handler and the sandbox image would be lost).
        imported = tmp_path / "imported.toml"
        imported.write_text(f"version = 2\n{private_dirs(tmp_path)}imports = [\"{snippet}\"]\n"
                            f'[plugins."io.containerd.grpc.v1.cri"]\n  sandbox_image = "{SANDBOX_IMAGE}"\n')
        lost = dump(release, imported)["plugins"]["io.containerd.grpc.v1.cri"]
        assert lost["sandbox_image"] != SANDBOX_IMAGE and "runc" not in lost["containerd"]["runtimes"]
        # The snippet alone is a valid version-2 config too.
        alone = dump(release, snippet)
        assert alone["version"] == 2
        assert_kybernate_handler({**alone["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"],
                                  "runc": runtimes["runc"]})
    assert dumped["version"] == release.config_version
    assert_kybernate_handler(runtimes)

