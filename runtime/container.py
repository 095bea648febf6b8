"""One container as the shim holds it: bundle, spec, rootfs, runc, init and execs.

A Container is built by `Container.create` from containerd's CreateTaskRequest and
lives until its init is deleted. It owns what the container needs outside its
processes: the rootfs mounts it made (undone at delete), the runc instance with the
binary and state root the create options chose, the cgroup (found from the init's
pid) with its OOM watch, and the exec processes by id.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import any_pb2
from kybernate.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    KybernateError,
    NotFound,
)
from kybernate.oci import load_spec
from kybernate.protos import typeurl
from kybernate.runtime.cgroups import Cgroup
from kybernate.runtime.mount import mount_rootfs, unmount_all
from kybernate.runtime.process import (
    ExecProcess,
    InitProcess,
    Process,
    RestoreStrategy,
    Stdio,
)
from kybernate.runtime.reaper import Exit
from kybernate.runtime.runc import Runc

if TYPE_CHECKING:
    from kybernate.protos import shim_pb2

log = logging.getLogger(__name__)

#: Where a container's private scratch files live inside its bundle (exec pid files).
WORK_DIR_NAME = "work"


@dataclasses.dataclass(frozen=True)
class ProcessSettings:
    """What the create options say about the container's processes."""

    io_uid: int = 0
    io_gid: int = 0
    no_pivot_root: bool = False
    no_new_keyring: bool = False
    criu_work_path: str = ""


def decode_json_any(message: any_pb2.Any, what: str) -> dict[str, Any]:
    """The JSON object inside an Any (the exec Process spec, Update's LinuxResources)."""
    if not message.value:
        raise InvalidArgument(f"{what} is empty")
    try:
        value = json.loads(message.value)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"{what} ({message.type_url or 'no type'}) is not JSON: {err}") \
            from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def has_private_pid_namespace(spec: dict[str, Any]) -> bool:
    """Whether the container gets its own pid namespace (the kernel then kills every
    process in it when the init dies, so the shim need not)."""
    namespaces = (spec.get("linux") or {}).get("namespaces") or []
    return any(ns.get("type") == "pid" and not ns.get("path") for ns in namespaces)


class Container:
    """The init process, its execs, and the resources the container holds."""

    def __init__(self, *, id: str, bundle: Path, namespace: str, spec: dict[str, Any],
                 settings: ProcessSettings, init: InitProcess, rootfs: Path | None,
                 on_oom: Callable[[str], None]) -> None:
        self.id = id
        self.bundle = bundle
        self.namespace = namespace
        self.spec = spec
        self.settings = settings
        self.init = init
        self.runc = init.runc
        self._rootfs = rootfs  # set only when we mounted it
        self._on_oom = on_oom
        self._execs: dict[str, ExecProcess] = {}
        self._cgroup: Cgroup | None = None
        self._oom_watch: asyncio.Task[None] | None = None

    # -- creation ---------------------------------------------------------------------

    @classmethod
    async def create(cls, request: shim_pb2.CreateTaskRequest, *, namespace: str, runc: Runc,
                     settings: ProcessSettings, on_oom: Callable[[str], None],
                     restore_strategy: RestoreStrategy | None = None) -> Container:
        """Mount the rootfs and `runc create` (or, from a checkpoint, prepare a restore).

        `runc` and `settings` come from the create options, which the caller decoded.
        """
        if not request.id:
            raise InvalidArgument("container id must not be empty")
        bundle = Path(request.bundle)
        spec = load_spec(bundle)
        rootfs = _mount_rootfs(bundle, list(request.rootfs))
        try:
            init = InitProcess(
                id=request.id, bundle=bundle, runc=runc, namespace=namespace,
                stdio=Stdio(request.stdin, request.stdout, request.stderr, request.terminal),
                io_uid=settings.io_uid, io_gid=settings.io_gid,
                no_pivot_root=settings.no_pivot_root, no_new_keyring=settings.no_new_keyring,
                checkpoint=request.checkpoint, criu_work_path=settings.criu_work_path,
                restore_strategy=restore_strategy,
            )
            await init.create()
        except BaseException:
            if rootfs is not None:
                _unmount_quietly(rootfs)
            raise
        container = cls(id=request.id, bundle=bundle, namespace=namespace, spec=spec,
                        settings=settings, init=init, rootfs=rootfs, on_oom=on_oom)
        if init.pid > 0:
            container._attach_cgroup(init.pid)
        return container

    # -- processes ------------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.init.pid

    def process(self, exec_id: str = "") -> Process:
        """The init ("") or the exec with this id."""
        if not exec_id:
            return self.init
        try:
            return self._execs[exec_id]
        except KeyError:
            raise NotFound(f"process {exec_id} does not exist in container {self.id}") from None

    def exec_processes(self) -> list[ExecProcess]:
        return list(self._execs.values())

    async def add_exec(self, exec_id: str, spec: any_pb2.Any, stdio: Stdio) -> ExecProcess:
        """Register an exec (runc exec runs at its Start)."""
        if not exec_id:
            raise InvalidArgument("exec id must not be empty")
        if exec_id in self._execs:
            raise AlreadyExists(f"id {exec_id}: exec process already exists")
        process_spec = decode_json_any(spec, "exec process spec")
        args = process_spec.get("args")
        if not isinstance(args, list) or not args or not all(isinstance(a, str) for a in args):
            raise InvalidArgument("exec process spec needs args: a non-empty list of strings")
        await self.init.admit_exec()
        if exec_id in self._execs:  # a concurrent Exec won while we waited
            raise AlreadyExists(f"id {exec_id}: exec process already exists")
        work_dir = self.bundle / WORK_DIR_NAME
        work_dir.mkdir(mode=0o711, exist_ok=True)
        process = ExecProcess(
            id=exec_id, container_id=self.id, parent=self.init, runc=self.runc,
            spec=process_spec, stdio=stdio, namespace=self.namespace, work_dir=work_dir,
            io_uid=self.settings.io_uid, io_gid=self.settings.io_gid,
        )
        self._execs[exec_id] = process
        return process

    async def start(self, exec_id: str = "") -> int:
        """Start the init (or restore it) or an exec; the new pid."""
        if exec_id:
            process = self.process(exec_id)
            assert isinstance(process, ExecProcess)
            return await process.start()
        pid = await self.init.start()
        if self._cgroup is None:  # restored: no pid existed at create
            self._attach_cgroup(pid)
        self._watch_oom()
        return pid

    async def delete_process(self, exec_id: str) -> Exit:
        """Delete an exec and forget it."""
        process = self.process(exec_id)
        assert isinstance(process, ExecProcess)
        exit_ = await process.delete()
        self._execs.pop(exec_id, None)
        return exit_

    async def delete(self) -> Exit:
        """Delete the init (runc delete), stop watching, unmount what we mounted."""
        exit_ = await self.init.delete()
        self._stop_oom_watch()
        if self._rootfs is not None:
            _unmount_quietly(self._rootfs)
            self._rootfs = None
        return exit_

    async def kill_everything(self) -> int:
        """SIGKILL every process of the container (see `kill_everything`)."""
        return await kill_everything(self.id, self.pid, self.runc, self._cgroup)

    @property
    def kill_all_on_init_exit(self) -> bool:
        """runc's shim rule: without a private pid namespace, the execs outlive the
        init unless the shim kills them."""
        return not has_private_pid_namespace(self.spec)

    # -- resources ------------------------------------------------------------------

    @property
    def cgroup(self) -> Cgroup | None:
        return self._cgroup

    async def pids(self) -> list[tuple[int, str]]:
        """(pid, exec id or "") of every process in the container."""
        exec_by_pid = {p.pid: p.id for p in self._execs.values() if p.pid}
        return [(pid, exec_by_pid.get(pid, "")) for pid in await self.runc.ps(self.id)]

    def stats(self) -> any_pb2.Any:
        """The cgroup metrics packed as containerd expects them."""
        if self._cgroup is None:
            raise NotFound(f"cgroup of container {self.id} does not exist")
        return typeurl.pack(self._cgroup.stats())

    async def update(self, resources: any_pb2.Any) -> None:
        await self.init.update(decode_json_any(resources, "update resources"))

    def _attach_cgroup(self, pid: int) -> None:
        try:
            self._cgroup = Cgroup.for_pid(pid)
        except (KybernateError, OSError) as err:
            # Stats and OOM events need it; the container itself runs without.
            log.warning("container %s: cannot load the cgroup of pid %d: %s", self.id, pid, err)

    def _watch_oom(self) -> None:
        if self._cgroup is None or self._oom_watch is not None:
            return
        self._oom_watch = asyncio.get_running_loop().create_task(
            self._forward_oom(self._cgroup), name=f"oom-watch-{self.id}")

    async def _forward_oom(self, cgroup: Cgroup) -> None:
        try:
            async for _ in cgroup.oom_events():
                self._on_oom(self.id)
        except asyncio.CancelledError:
            raise
        except Exception:  # a failed watch must not take the shim down
            log.exception("container %s: OOM watch stopped", self.id)

    def _stop_oom_watch(self) -> None:
        if self._oom_watch is not None:
            self._oom_watch.cancel()
            self._oom_watch = None


async def kill_everything(container_id: str, init_pid: int, runc: Runc,
                         cgroup: Cgroup | None = None) -> int:
    """SIGKILL every process of a container at once and make sure they die; how many
    were signalled. For a container whose state is undefined (half checkpointed, half
    restored): the whole cgroup, not the init alone (a CUDA-locked or half-seized child
    must not outlive it), frozen or not, then `runc kill --all 9` as a backstop. The
    reaper sees the init's exit as usual."""
    if cgroup is None and init_pid > 0:
        with contextlib.suppress(KybernateError, OSError):
            cgroup = Cgroup.for_pid(init_pid)
    victims: set[int] = set()
    if cgroup is not None:
        try:
            victims.update(await cgroup.kill())
        except (KybernateError, OSError) as err:
            log.warning("container %s: killing its cgroup: %s", container_id, err)
    if init_pid > 0:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(init_pid, signal.SIGKILL)
            victims.add(init_pid)
    try:
        await runc.kill(container_id, signal.SIGKILL, all=True)
    except KybernateError as err:  # already gone is the expected answer
        log.debug("container %s: runc kill --all after SIGKILL: %s", container_id, err)
    return len(victims)


def _mount_rootfs(bundle: Path, mounts: list[Any]) -> Path | None:
    """Mount containerd's rootfs mounts at bundle/rootfs; the target if we mounted."""
    if not mounts:
        return None  # the bundle brings its rootfs (ctr run --rootfs, tests)
    target = bundle / "rootfs"
    target.mkdir(mode=0o711, exist_ok=True)
    if os.path.ismount(target):
        log.info("rootfs %s is mounted already; leaving it as it is", target)
        return None
    try:
        mount_rootfs(mounts, str(target))
    except OSError as err:
        raise FailedPrecondition(f"failed to mount rootfs component at {target}: {err}") \
            from None
    return target


def _unmount_quietly(target: Path) -> None:
    try:
        unmount_all(str(target))
    except Exception:  # cleanup goes on; the shim's delete command retries
        log.exception("cannot unmount rootfs %s", target)
