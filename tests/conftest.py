"""Shared fixtures: a private containerd for the whole session and a busybox image in it.

Integration tests run by default: CI runs as root with containerd, runc and CRIU
installed, and a missing tool makes them fail, never skip. `--run-integration=no`
deselects them (and says so) for a quick unit-only run.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containerd import Containerd
from tests.support.images import BUSYBOX_IMAGE_REF, build_oci_archive, import_image

REQUIRED_TOOLS = ("containerd", "ctr", "runc", "criu")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-integration", choices=("yes", "no"), default="yes",
                     help="run the tests under tests/integration (default: yes)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    integration = [item for item in items if "tests/integration/" in item.nodeid.replace("\\", "/")]
    for item in integration:
        item.add_marker(pytest.mark.integration)
    if config.getoption("--run-integration") == "no" and integration:
        config.hook.pytest_deselected(items=integration)
        items[:] = [item for item in items if item not in integration]
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"--run-integration=no: {len(integration)} integration test(s) deselected")


def require_tools() -> None:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"integration tests need {', '.join(missing)} on PATH", pytrace=False)


@pytest.fixture(scope="session")
def containerd() -> Iterator[Containerd]:
    """A private containerd shared by the session's integration tests."""
    require_tools()
    instance = Containerd()
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="session")
def busybox_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The busybox OCI layout tar, built once per session."""
    return build_oci_archive(tmp_path_factory.mktemp("images") / "busybox-oci.tar")


@pytest.fixture(scope="session")
def busybox_image(containerd: Containerd, busybox_archive: Path) -> str:
    """Reference of the busybox image, imported into the session's containerd."""
    return import_image(containerd, busybox_archive, BUSYBOX_IMAGE_REF)
