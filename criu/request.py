"""Encode dump and restore options as CRIU RPC requests.

The image and work directories travel as fds: CRIU resolves them through
/proc/<peer>/fd/<n>, the peer being the process that created the socket pair (us), so
they need not be inherited by CRIU itself. Only inherit_fd numbers are CRIU's own fds,
which is why the client passes those to the child unchanged.
"""

from __future__ import annotations

from kybernate.protos import criu_rpc_pb2 as rpc

from .options import CriuOptions, DumpOptions, RestoreOptions

_CGROUP_MODE = {
    "ignore": rpc.IGNORE,
    "none": rpc.CG_NONE,
    "props": rpc.PROPS,
    "soft": rpc.SOFT,
    "full": rpc.FULL,
    "strict": rpc.STRICT,
    "default": rpc.DEFAULT,
}


def _common_opts(opts: CriuOptions, *, images_dir_fd: int, work_dir_fd: int,
                 notify_scripts: bool) -> rpc.criu_opts:
    """The criu_opts fields a dump and a restore request fill alike."""
    o = rpc.criu_opts(
        images_dir_fd=images_dir_fd,
        work_dir_fd=work_dir_fd,
        log_file=opts.log_file,
        log_level=opts.log_level,
        tcp_established=opts.tcp_established,
        ext_unix_sk=opts.ext_unix_sk,
        file_locks=opts.file_locks,
        shell_job=opts.shell_job,
        orphan_pts_master=opts.orphan_pts_master,
        manage_cgroups=opts.manage_cgroups,
        manage_cgroups_mode=_CGROUP_MODE[opts.manage_cgroups_mode],
        notify_scripts=notify_scripts,
        empty_ns=opts.empty_ns,
    )
    if opts.root is not None:
        o.root = str(opts.root)
    if opts.timeout_s is not None:
        o.timeout = opts.timeout_s
    if opts.config_file:
        o.config_file = opts.config_file
    o.external.extend(opts.external)
    for key, val in opts.ext_mounts:
        o.ext_mnt.add(key=key, val=val)
    return o


def dump_request(opts: DumpOptions, *, images_dir_fd: int, work_dir_fd: int,
                 notify_scripts: bool) -> rpc.criu_req:
    """A DUMP criu_req for `opts`."""
    o = _common_opts(opts, images_dir_fd=images_dir_fd, work_dir_fd=work_dir_fd,
                     notify_scripts=notify_scripts)
    o.pid = opts.pid
    o.leave_running = opts.leave_running
    o.auto_dedup = opts.auto_dedup
    o.track_mem = opts.track_mem
    if opts.freeze_cgroup:
        o.freeze_cgroup = opts.freeze_cgroup
    if opts.parent_img:
        o.parent_img = opts.parent_img
    return rpc.criu_req(type=rpc.DUMP, opts=o)


def restore_request(opts: RestoreOptions, *, images_dir_fd: int, work_dir_fd: int,
                    notify_scripts: bool) -> rpc.criu_req:
    """A RESTORE criu_req for `opts`."""
    o = _common_opts(opts, images_dir_fd=images_dir_fd, work_dir_fd=work_dir_fd,
                     notify_scripts=notify_scripts)
    o.rst_sibling = opts.rst_sibling
    o.evasive_devices = opts.evasive_devices
    if opts.cgroup_root:
        o.cg_root.add(path=opts.cgroup_root)
    for fd, key in opts.inherit_fds:
        o.inherit_fd.add(fd=fd, key=key)
    return rpc.criu_req(type=rpc.RESTORE, opts=o)


def version_request() -> rpc.criu_req:
    return rpc.criu_req(type=rpc.VERSION)


def check_request() -> rpc.criu_req:
    return rpc.criu_req(type=rpc.CHECK)


def notify_ack(success: bool) -> rpc.criu_req:
    """The answer CRIU waits for after each notification; False makes it roll back."""
    return rpc.criu_req(type=rpc.NOTIFY, notify_success=success)
