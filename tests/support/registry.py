"""An OCI registry for tests: Debian's docker-registry (distribution 2.8, unpacked into
/opt/kybernate by .ci/install-system.sh) on a free loopback port, with its own config
and storage directory, stopped and removed afterwards."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.s3 import free_port

REGISTRY_BINARY = Path("/opt/kybernate/docker-registry/usr/bin/docker-registry")
START_TIMEOUT_S = 30.0


@dataclass
class RegistryServer:
    host: str  # 127.0.0.1:PORT
    root: Path
    process: subprocess.Popen[bytes]

    def url(self, path: str) -> str:
        return f"http://{self.host}{path}"

    def log(self) -> str:
        return (self.root / "registry.log").read_text(errors="replace")


@contextmanager
def running_registry() -> Iterator[RegistryServer]:
    if not REGISTRY_BINARY.exists():
        raise AssertionError(f"{REGISTRY_BINARY} is missing: run .ci/install-system.sh")
    root = Path(tempfile.mkdtemp(prefix="kyb-registry-"))
    port = free_port()
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: warn\n"
        f"storage:\n  filesystem:\n    rootdirectory: {root / 'storage'}\n  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n")
    with (root / "registry.log").open("wb") as log:
        process = subprocess.Popen([str(REGISTRY_BINARY), "serve", str(config)], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = RegistryServer(f"127.0.0.1:{port}", root, process)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(server.url("/v2/"), timeout=2) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"docker-registry did not start:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(root, ignore_errors=True)
