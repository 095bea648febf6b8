"""Which task API `start` announces: read from the containerd binary that runs it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from kybernate.shim.bootstrap import (
    FALLBACK_TASK_API,
    BuildInfoUnreadable,
    containerd_major,
    go_main_package,
    preferred_task_api,
    start_output,
)

from tests.support.containerd import CONTAINERD_1_7, CONTAINERD_2


def installed(binary: str) -> str:
    path = shutil.which(binary)
    assert path is not None, f"{binary} is not installed (run .ci/setup)"
    return path


def test_both_installed_containerds_are_told_apart_by_their_build_information() -> None:
    system = installed(CONTAINERD_1_7.containerd)
    unpacked = installed(CONTAINERD_2.containerd)
    assert go_main_package(system) == "github.com/containerd/containerd/cmd/containerd"
    assert go_main_package(unpacked) == "github.com/containerd/containerd/v2/cmd/containerd"
    assert (containerd_major(system), containerd_major(unpacked)) == (1, 2)


def test_other_go_binaries_and_non_go_binaries_are_not_containerd() -> None:
    assert go_main_package(installed("runc")) == "github.com/opencontainers/runc"
    assert containerd_major(installed("runc")) is None
    with pytest.raises(BuildInfoUnreadable, match="no .go.buildinfo section"):
        go_main_package(installed("busybox"))
    assert containerd_major(installed("busybox")) is None


@pytest.mark.parametrize("content", [
    b"", b"#!/bin/sh\necho containerd\n", b"\x7fELF\x01\x01" + b"\0" * 58,
    b"\x7fELF\x02\x01" + b"\0" * 34 + (10**6).to_bytes(8, "little") + b"\0" * 16,
], ids=["empty", "script", "32-bit", "table-outside-the-file"])
def test_unreadable_binaries_fall_back_to_v2(tmp_path: Path, content: bytes) -> None:
    binary = tmp_path / "containerd"
    binary.write_bytes(content)
    with pytest.raises(BuildInfoUnreadable):
        go_main_package(str(binary))
    assert containerd_major(str(binary)) is None


def test_truncated_build_information_is_refused(tmp_path: Path) -> None:
    # The real 2.x binary, cut just after its build information's header.
    source = Path(installed(CONTAINERD_2.containerd)).read_bytes()
    start = source.index(b"\xff Go buildinf:")
    binary = tmp_path / "containerd"
    binary.write_bytes(source[:start + 40])
    assert containerd_major(str(binary)) is None


def test_a_process_that_is_no_containerd_gets_the_fallback() -> None:
    assert preferred_task_api(os.getpid()) == FALLBACK_TASK_API == 2
    assert preferred_task_api(2**22 + 7) == FALLBACK_TASK_API  # no such process


def test_start_output_is_a_bare_address_for_v2_and_bootstrap_json_for_v3() -> None:
    address = "unix:///run/containerd/s/abc"
    assert start_output(address, 2) == address
    assert json.loads(start_output(address, 3)) == {
        "version": 3, "address": address, "protocol": "ttrpc"}
