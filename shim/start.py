"""The `start` action: make (or find) the shim's socket and launch the serving process.

containerd runs `start` in the bundle directory, reads everything it prints on stdout
and stderr until both reach end of file, and connects to the printed address. So the
serving process must hold neither pipe, and nothing but the address (or, to containerd
2.x, the bootstrap parameters naming task API v3: see bootstrap.py) may be printed.

Kept import-light on purpose (every container start pays for it): os, socket, hashlib,
json (no pathlib, no typing); protobuf only when containerd sent create options on stdin.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import socket
import sys

from kybernate.shim.flags import ShimFlags  # already loaded by the entry point

# `typing` costs `start` ~5 ms of imports; type checkers treat this name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    #: Starts the serving process for the listening socket; its pid.
    Launch = Callable[[ShimFlags, socket.socket], int]

# containerd's defaults.DefaultStateDir + "/s": fixed, whatever --state containerd runs with.
SOCKET_DIR = "/run/containerd/s"
# Annotations that put several containers (a pod) behind one shim, in containerd's order.
GROUP_ANNOTATIONS = ("io.containerd.runc.v2.group", "io.kubernetes.cri.sandbox-id")
ADDRESS_FILE = "address"
OOM_SCORE_ADJ_MAX = 1000
CGROUP_ROOT = "/sys/fs/cgroup"


def go_path_join(*parts: str) -> str:
    """Go's filepath.Join: drop empty parts, join with '/', then Clean."""
    joined = posixpath.normpath("/".join(p for p in parts if p))
    # POSIX normpath keeps a leading '//', Go's Clean does not.
    return "/" + joined.lstrip("/") if joined.startswith("//") else joined


def socket_address(containerd_address: str, namespace: str, group: str, socket_dir: str = "") -> str:
    """The shim socket for a group, exactly as containerd's shim.SocketAddress names it
    (in the directory containerd 2.3's bootstrap parameters name, if they do)."""
    digest = hashlib.sha256(go_path_join(containerd_address, namespace, group).encode()).hexdigest()
    return f"unix://{socket_dir or SOCKET_DIR}/{digest}"


def socket_path(address: str) -> str:
    if not address.startswith("unix://"):
        raise ValueError(f"not a unix socket address: {address!r}")
    return address[len("unix://"):]


def shim_group(bundle: str, container_id: str) -> str:
    """The id whose shim serves this container: a group annotation, else the id itself."""
    try:
        with open(os.path.join(bundle, "config.json"), "rb") as f:
            spec = json.load(f)
    except FileNotFoundError:
        return container_id
    annotations = spec.get("annotations") or {}
    for key in GROUP_ANNOTATIONS:
        if annotations.get(key):
            return str(annotations[key])
    return container_id


def can_connect(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def listen_unix(path: str) -> socket.socket:
    """Bind and listen on `path` (mode 0600); EADDRINUSE propagates to the caller."""
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def write_address_file(bundle: str, address: str) -> None:
    """Atomically write `address` in the bundle, as containerd's WriteAddress does."""
    target = os.path.join(bundle, ADDRESS_FILE)
    tmp = os.path.join(bundle, f".{ADDRESS_FILE}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(address)
    os.replace(tmp, target)


def adjust_oom_score(child_pid: int, parent_pid: int) -> None:
    """Give the shim containerd's oom_score_adj + 1, so the OOM killer prefers the shim."""
    with open(f"/proc/{parent_pid}/oom_score_adj") as f:
        parent_score = int(f.read().strip())
    score = min(parent_score + 1, OOM_SCORE_ADJ_MAX)
    with open(f"/proc/{child_pid}/oom_score_adj", "w") as f:
        f.write(str(score))


def move_to_cgroup(pid: int, cgroup: str) -> None:
    """Put `pid` in the cgroup named by the `shim_cgroup` option (v2 or every v1 hierarchy)."""
    root = CGROUP_ROOT
    relative = cgroup.strip("/")
    if os.path.exists(os.path.join(root, "cgroup.controllers")):
        targets = [os.path.join(root, relative)]
    else:
        hierarchies = (os.path.join(root, name) for name in sorted(os.listdir(root)))
        targets = [os.path.join(h, relative) for h in hierarchies
                   if os.path.isdir(h) and not os.path.islink(h)
                   and os.path.exists(os.path.join(h, "cgroup.procs"))]
    joined = 0
    for target in targets:
        procs = os.path.join(target, "cgroup.procs")
        if not os.path.exists(procs):
            continue
        with open(procs, "w") as f:
            f.write(str(pid))
        joined += 1
    if not joined:
        raise FileNotFoundError(f"shim cgroup {cgroup!r} does not exist")


def server_environment(flags: ShimFlags) -> dict[str, str]:
    """The serving process's environment: containerd's, as `start` received it."""
    env = dict(os.environ)
    env.setdefault("TTRPC_ADDRESS", flags.ttrpc_address)
    env.setdefault("NAMESPACE", flags.namespace)
    return env


def spawn_server(flags: ShimFlags, sock: socket.socket) -> int:
    """Start `python -m kybernate.shim ... serve` in its own session, holding `sock`."""
    sock_fd = sock.fileno()
    os.set_inheritable(sock_fd, True)
    serve_flags = flags.replace(bundle=os.path.abspath(flags.bundle_path), socket_fd=sock_fd,
                                action="serve")
    argv = [sys.executable, "-I", "-m", "kybernate.shim", *serve_flags.to_argv(), "serve"]
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        # containerd waits for EOF on our stdout/stderr: the server must not hold them.
        actions = [(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)]
        return os.posix_spawn(sys.executable, argv, server_environment(flags),
                              file_actions=actions, setsid=True)
    finally:
        os.close(devnull)
        os.set_inheritable(sock_fd, False)  # nothing else we start may hold it


def launch_server(flags: ShimFlags, sock: socket.socket) -> int:
    """The serving process for `sock`: forked by the template when one runs (and then
    moved into our cgroups, where a spawned child would be born), else spawned, with a
    template launched in the background for the next container."""
    from kybernate.shim import template

    env = server_environment(flags)
    try:
        pid = template.fork_from_template(flags, sock, env)
    except template.TemplateRefused:
        pid = None
    if pid is None:
        pid = spawn_server(flags, sock)
        template.launch_template(flags)
        return pid
    try:
        join_own_cgroups(pid)
    except BaseException:
        os.kill(pid, 9)
        raise
    return pid


def cgroup_mounts() -> list[tuple[frozenset[str], str, str]]:
    """Mounted cgroup hierarchies as (super options, mount point, root within the
    hierarchy); a v2 mount has the options {""} so that it matches v2's empty
    controller list in /proc/PID/cgroup."""
    from kybernate import mountinfo  # only when the server must join our cgroups

    return [(frozenset({""}) if m.fstype == "cgroup2" else frozenset(m.super_options), m.mount_point, m.root)
            for m in mountinfo.read() if m.fstype in ("cgroup", "cgroup2")]


def join_own_cgroups(pid: int, source: int | str = "self") -> None:
    """Move `pid` into every cgroup (v1 hierarchies and v2) this process (or `source`)
    is in."""
    with open(f"/proc/{source}/cgroup") as f:
        mine = f.read()
    with open(f"/proc/{pid}/cgroup") as f:
        if f.read() == mine:
            return
    mounts = cgroup_mounts()
    for line in mine.splitlines():
        _, controllers, path = line.split(":", 2)
        wanted = frozenset(controllers.split(","))
        mount = next((m for m in mounts if wanted <= m[0]), None)
        if mount is None:
            continue  # a hierarchy not mounted here
        _, mount_point, root = mount
        if root != "/" and (path == root or path.startswith(root + "/")):
            path = path[len(root):] or "/"
        procs = posixpath.join(mount_point, path.lstrip("/"), "cgroup.procs")
        with open(procs, "w") as f:
            f.write(str(pid))


def start(flags: ShimFlags, *, containerd_pid: int | None = None, options_bytes: bytes | None = None,
          launch: Launch | None = None) -> str:
    """Run the `start` action; returns what to print: the address containerd should
    connect to, in the form the containerd that runs us (our parent) reads best.

    Relayed through the template (see relay.py), the worker passes what the command
    process received: containerd's pid, stdin, and a `launch` that forks the server."""
    from kybernate.shim.bootstrap import preferred_task_api, start_output

    parent = os.getppid() if containerd_pid is None else containerd_pid
    address = serve_group(flags, containerd_pid=parent, options_bytes=options_bytes,
                          launch=launch or launch_server)
    return start_output(address, preferred_task_api(parent))


def serve_group(flags: ShimFlags, *, containerd_pid: int, options_bytes: bytes | None = None,
                launch: Launch = launch_server) -> str:
    """Make sure a serving process listens for this container's group; its address."""
    if not flags.id:
        raise ValueError("-id is required for start")
    if not flags.address:
        raise ValueError("-address is required for start")
    bundle = flags.bundle_path
    # Relayed through the template, the command process read stdin for us.
    from kybernate.shim.relay import read_stdin

    stdin = read_stdin() if options_bytes is None else options_bytes
    params = None
    if stdin:
        from kybernate.shim.start_params import parse_start_stdin

        params = parse_start_stdin(stdin, flags.id, flags.namespace)
    address = socket_address(flags.address, flags.namespace, shim_group(bundle, flags.id),
                             params.socket_dir if params else "")
    path = socket_path(address)
    try:
        sock = listen_unix(path)
    except OSError as err:
        if err.errno != errno.EADDRINUSE:
            raise
        if can_connect(path):
            # A shim already serves this group (a pod): share it.
            write_address_file(bundle, address)
            return address
        os.unlink(path)  # stale: its server is gone
        sock = listen_unix(path)

    child_pid = 0
    try:
        write_address_file(bundle, address)
        shim_cgroup = ""
        if params is not None and params.options:
            from kybernate.shim.options import decode_create_options_bytes

            shim_cgroup = decode_create_options_bytes(params.options).shim_cgroup
        child_pid = launch(flags, sock)
        if shim_cgroup:
            move_to_cgroup(child_pid, shim_cgroup)
        adjust_oom_score(child_pid, containerd_pid)
    except BaseException:
        if child_pid:
            try:
                os.kill(child_pid, 9)
            except ProcessLookupError:
                pass
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        raise
    finally:
        sock.close()
    return address
