"""Dump options built from an OCI bundle the way runc 1.1 builds them, and their RPC form."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from kybernate.criu import DumpOptions, RestoreOptions, dump_options_from_bundle
from kybernate.criu.options import RUNC_CRIU_CONFIG, host_cgroup_v1_hierarchies
from kybernate.criu.request import dump_request, restore_request
from kybernate.errors import FailedPrecondition, InvalidArgument
from kybernate.protos import criu_rpc_pb2 as rpc

MOUNTINFO = """\
25 1 0:23 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
35 25 0:30 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:14 - cgroup cgroup rw,cpu,cpuacct
36 25 0:31 / /sys/fs/cgroup/freezer rw,nosuid shared:15 - cgroup cgroup rw,freezer
37 25 0:32 / /sys/fs/cgroup/systemd rw,nosuid shared:16 - cgroup cgroup rw,xattr,name=systemd
38 25 0:33 / /sys/fs/cgroup/unified rw,nosuid shared:17 - cgroup2 cgroup2 rw
39 25 0:34 / /sys/fs/cgroup/net_cls rw,nosuid shared:18 - cgroup cgroup rw,net_cls
99 1 0:31 / /mnt/second\\040freezer rw shared:15 - cgroup cgroup rw,freezer
"""
OWN_CGROUPS = "12:freezer:/x\n4:cpu,cpuacct:/\n1:name=systemd:/init.scope\n0::/init.scope\n"


def test_cgroup_v1_hierarchies_one_per_joined_hierarchy_in_mount_order() -> None:
    # net_cls is mounted but this process is not in it; the second freezer mount and
    # the cgroup2 mount are not separate v1 hierarchies.
    assert host_cgroup_v1_hierarchies(MOUNTINFO, OWN_CGROUPS) == [
        "cpu,cpuacct", "freezer", "systemd",
    ]


def _spec(**linux: Any) -> dict[str, Any]:
    return {
        "ociVersion": "1.0.2",
        "root": {"path": "rootfs"},
        "process": {"args": ["/bin/sh"], "terminal": False},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/data", "type": "bind", "source": "/srv/data", "options": ["rbind", "rw"]},
            {"destination": "/var/run/app", "type": "none", "source": "/srv/app", "options": ["bind", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["ro"]},
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network", "path": "/proc/self/ns/net"}, {"type": "mount"}],
            "maskedPaths": ["/etc/hostname", "/etc", "/no/such/path"],
            "devices": [
                {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
                {"path": "/dev/null", "type": "c", "major": 1, "minor": 3},
            ],
            **linux,
        },
    }


def _bundle(tmp_path: Path, spec: dict[str, Any]) -> Path:
    bundle = tmp_path / "bundle"
    (bundle / "rootfs" / "var").mkdir(parents=True)
    (bundle / "rootfs" / "run").mkdir()
    # /var/run -> /run inside the rootfs: runc keys the mount by the resolved path.
    (bundle / "rootfs" / "var" / "run").symlink_to("/run")
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def _build(bundle: Path, *, terminal: bool = False, pid: int | None = None) -> DumpOptions:
    return dump_options_from_bundle(
        bundle, pid=pid or os.getpid(), images_dir=bundle / "img", work_dir=bundle / "work",
        freeze_cgroup="/sys/fs/cgroup/freezer/c1", leave_running=True, tcp_established=True,
        ext_unix_sk=False, file_locks=True, terminal=terminal,
    )


def test_options_from_bundle_match_runc(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path, _spec())
    opts = _build(bundle)

    assert opts.root == bundle / "rootfs" and opts.root.is_absolute()
    assert opts.pid == os.getpid()
    assert (opts.leave_running, opts.tcp_established, opts.file_locks) == (True, True, True)
    assert opts.ext_unix_sk is False and opts.shell_job is False
    assert opts.manage_cgroups is True and opts.orphan_pts_master is True
    assert opts.freeze_cgroup == "/sys/fs/cgroup/freezer/c1"
    assert opts.config_file == RUNC_CRIU_CONFIG
    assert opts.empty_ns == 0x40000000  # CLONE_NEWNET, as runc always asks

    net_inode = os.stat("/proc/self/ns/net").st_ino
    assert opts.external == [f"net[{net_inode}]:extRootNetNS"]

    cgroup_binds = [(f"/sys/fs/cgroup/{h}",) * 2 for h in host_cgroup_v1_hierarchies()]
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        cgroup_binds = []  # a unified host mounts cgroup2 for real
    devices = ["/dev/random", "/dev/full", "/dev/tty", "/dev/zero", "/dev/urandom",
               "/dev/fuse", "/dev/null"]
    assert opts.ext_mounts == [
        ("/data", "/data"),
        ("/run/app", "/run/app"),
        *cgroup_binds,
        ("/etc/hostname", "/dev/null"),  # a masked file; /etc is a directory, skipped
        *[(d, d) for d in devices],
    ]


def test_cgroup_namespace_keeps_cgroup_mount_real(tmp_path: Path) -> None:
    spec = _spec()
    spec["linux"]["namespaces"].append({"type": "cgroup"})
    opts = _build(_bundle(tmp_path, spec))
    assert not any(key.startswith("/sys/fs/cgroup") for key, _ in opts.ext_mounts)


def test_terminal_means_shell_job(tmp_path: Path) -> None:
    opts = _build(_bundle(tmp_path, _spec()), terminal=True)
    assert opts.shell_job is True and opts.orphan_pts_master is True


def test_private_netns_is_not_external(tmp_path: Path) -> None:
    spec = _spec(namespaces=[{"type": "network"}, {"type": "pid"}])
    assert _build(_bundle(tmp_path, spec)).external == []


def test_missing_netns_path_is_a_clear_error(tmp_path: Path) -> None:
    spec = _spec(namespaces=[{"type": "network", "path": str(tmp_path / "gone")}])
    with pytest.raises(FailedPrecondition, match="gone"):
        _build(_bundle(tmp_path, spec))


@pytest.mark.parametrize(("annotations", "expected"), [
    ({"org.criu.config": "/etc/criu/mine.conf"}, "/etc/criu/mine.conf"),
    ({"org.criu.config": ""}, None),
    ({"other": "x"}, RUNC_CRIU_CONFIG),
])
def test_criu_config_annotation(tmp_path: Path, annotations: dict[str, str],
                                expected: str | None) -> None:
    spec = _spec()
    spec["annotations"] = annotations
    assert _build(_bundle(tmp_path, spec)).config_file == expected


def test_bad_bundles_are_rejected_clearly(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="config.json"):
        _build(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidArgument, match="config.json"):
        _build(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"root": {}}))
    with pytest.raises(InvalidArgument, match="root.path"):
        _build(tmp_path)


def test_option_validation(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="absolute"):
        DumpOptions(images_dir=tmp_path, work_dir=tmp_path, pid=1, root=Path("rootfs"))
    with pytest.raises(InvalidArgument, match="cgroup mode"):
        DumpOptions(images_dir=tmp_path, work_dir=tmp_path, pid=1, root=Path("/"),
                    manage_cgroups_mode="softish")
    with pytest.raises(InvalidArgument, match="pid"):
        DumpOptions(images_dir=tmp_path, work_dir=tmp_path, pid=0, root=Path("/"))
    with pytest.raises(InvalidArgument, match="inherit"):
        RestoreOptions(images_dir=tmp_path, work_dir=tmp_path, inherit_fds=[(-1, "pipe:[1]")])


def test_dump_request_carries_every_option(tmp_path: Path) -> None:
    opts = DumpOptions(
        images_dir=tmp_path, work_dir=tmp_path, pid=42, root=Path("/rootfs"),
        freeze_cgroup="/sys/fs/cgroup/freezer/c", external=["net[7]:extRootNetNS"],
        ext_mounts=[("/data", "/data"), ("/proc/kcore", "/dev/null")], timeout_s=30,
        manage_cgroups_mode="full",
    )
    req = dump_request(opts, images_dir_fd=7, work_dir_fd=8, notify_scripts=True)
    o = req.opts
    assert req.type == rpc.DUMP
    assert (o.images_dir_fd, o.work_dir_fd, o.pid, o.root) == (7, 8, 42, "/rootfs")
    assert (o.log_file, o.log_level) == ("dump.log", 4)
    assert o.freeze_cgroup == "/sys/fs/cgroup/freezer/c" and o.timeout == 30
    assert list(o.external) == ["net[7]:extRootNetNS"]
    assert [(m.key, m.val) for m in o.ext_mnt] == [("/data", "/data"), ("/proc/kcore", "/dev/null")]
    assert o.manage_cgroups and o.manage_cgroups_mode == rpc.FULL and o.notify_scripts
    assert not o.leave_running and o.orphan_pts_master
    assert not o.HasField("parent_img") and not o.HasField("config_file")
    # What goes on the wire decodes back to the same request.
    assert rpc.criu_req.FromString(req.SerializeToString()) == req


def test_restore_request_carries_inherit_fds_and_cgroup_root(tmp_path: Path) -> None:
    opts = RestoreOptions(images_dir=tmp_path, work_dir=tmp_path, root=Path("/mnt/root"),
                          inherit_fds=[(5, "pipe:[123]")], cgroup_root="/kyb/c1",
                          ext_mounts=[("/data", "/srv/data")], shell_job=True)
    o = restore_request(opts, images_dir_fd=3, work_dir_fd=4, notify_scripts=False).opts
    assert o.rst_sibling and o.root == "/mnt/root" and o.shell_job
    assert [(i.fd, i.key) for i in o.inherit_fd] == [(5, "pipe:[123]")]
    assert [(c.HasField("ctrl"), c.path) for c in o.cg_root] == [(False, "/kyb/c1")]
    assert [(m.key, m.val) for m in o.ext_mnt] == [("/data", "/srv/data")]
    assert o.log_file == "restore.log" and not o.notify_scripts
