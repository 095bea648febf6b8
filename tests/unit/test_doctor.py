"""Doctor's readings of what it does not run here: the NVIDIA driver's version file in
both of its forms (proprietary and open kernel modules), and the runtime entries of a
`containerd config dump` in 1.7's and 2.x's layouts."""

from __future__ import annotations

from pathlib import Path

from kybernate.cli.doctor import Status, check_gpu, runtime_entries


def test_driver_versions(tmp_path: Path) -> None:
    proprietary = tmp_path / "proprietary"
    proprietary.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.86.15  Wed Jan 29 2025\n"
                           "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    open_modules = tmp_path / "open"
    open_modules.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build\n")
    old = tmp_path / "old"
    old.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.183.01  Sun May 12 2024\n")
    for path, version, status in ((proprietary, "570.86.15", Status.OK), (open_modules, "580.65.06", Status.OK),
                                  (old, "535.183.01", Status.FAIL)):
        driver = check_gpu(path)[0]
        assert driver.name == "gpu driver" and driver.status is status and version in driver.detail


def test_runtime_entries_in_both_layouts() -> None:
    kybernate = {"runtime_type": "io.containerd.kybernate.v1"}
    runc = {"runtime_type": "io.containerd.runc.v2"}
    v17 = {"plugins": {"io.containerd.grpc.v1.cri": {"containerd": {"runtimes": {"kyb": kybernate, "runc": runc}}}}}
    v2 = {"plugins": {"io.containerd.cri.v1.runtime": {"containerd": {"runtimes": {"gpu": kybernate}}}}}
    assert runtime_entries(v17) == ["kyb"] and runtime_entries(v2) == ["gpu"]
    assert runtime_entries({"plugins": {"io.containerd.grpc.v1.cri": {"containerd": {"runtimes": {"runc": runc}}}}}) == []
