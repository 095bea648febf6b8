"""Shared fixtures: a private containerd for the whole session and a busybox image in it.

Integration tests run by default: CI runs as root with containerd, runc and CRIU
installed, and a missing tool makes them fail, never skip. `--run-integration=no`
deselects them (and says so) for a quick unit-only run; `--run-unit=no` runs only the
integration tests (CI's second pass, on the other containerd).

`--containerd=1.7|2` (default: `KYBERNATE_CONTAINERD`, else 1.7) picks the containerd
line every private containerd of the run uses; `.ci/test` runs the integration tests
once on each.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.containerd import (
    ENV_CONTAINERD,
    RELEASES,
    Containerd,
    default_release,
)
from tests.support.images import BUSYBOX_IMAGE_REF, build_oci_archive, import_image

REQUIRED_TOOLS = ("runc", "criu")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-integration", choices=("yes", "no"), default="yes",
                     help="run the tests under tests/integration (default: yes)")
    parser.addoption("--run-unit", choices=("yes", "no"), default="yes",
                     help="run the tests outside tests/integration (default: yes)")
    parser.addoption("--containerd", choices=tuple(RELEASES), default=None,
                     help=f"containerd line for the integration tests (default: "
                          f"${ENV_CONTAINERD}, else 1.7)")


def pytest_configure(config: pytest.Config) -> None:
    chosen = config.getoption("--containerd")
    if chosen:
        # Every private containerd (and any subprocess the tests start) reads this.
        os.environ[ENV_CONTAINERD] = chosen


def pytest_report_header(config: pytest.Config) -> str:
    release = default_release()
    missing = release.missing()
    described = f"not installed ({', '.join(missing)})" if missing else release.version()
    return f"containerd {release.name}: {described}"


def _deselect(config: pytest.Config, items: list[pytest.Item], drop: list[pytest.Item],
              why: str) -> None:
    if not drop:
        return
    config.hook.pytest_deselected(items=drop)
    dropped = set(drop)
    items[:] = [item for item in items if item not in dropped]
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"{why}: {len(drop)} test(s) deselected")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    integration = [item for item in items if "tests/integration/" in item.nodeid.replace("\\", "/")]
    for item in integration:
        item.add_marker(pytest.mark.integration)
    if config.getoption("--run-integration") == "no":
        _deselect(config, items, integration, "--run-integration=no")
    if default_release().config_version < 3:
        needs_2x = [item for item in items if item.get_closest_marker("containerd2")]
        _deselect(config, items, needs_2x,
                  "containerd 1.7's CRI has no CheckpointContainer and no restore from an archive")
    if config.getoption("--run-unit") == "no":
        chosen = set(integration)
        _deselect(config, items, [item for item in items if item not in chosen], "--run-unit=no")


def require_tools() -> None:
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    missing += default_release().missing()
    if missing:
        pytest.fail(f"integration tests need {', '.join(missing)}", pytrace=False)


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
