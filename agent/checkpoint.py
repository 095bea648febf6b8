"""The checkpoint pipeline, phase by phase (DESIGN.md, Checkpoint).

    accepted -> gpu_locked -> gpu_checkpointed -> frozen -> dumped -> [resumed] -> committed

Each phase is reported as it happens. The pipeline tracks what it has done to the
container (`ContainerCondition`) so that, on any failure, it knows whether it can
bring the container back (thaw, CUDA restore, unlock) or must tell the shim to kill it.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import enum
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from kybernate.agent import commit, naming
from kybernate.agent.config import AgentConfig
from kybernate.agent.gpu import GpuControl
from kybernate.agent.limits import CheckpointLimits
from kybernate.agent.metrics import AgentMetrics
from kybernate.agent.promoter import Promoter
from kybernate.agent.registry import Registry
from kybernate.agent.storage import LocalTier
from kybernate.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    KybernateError,
    NotFound,
    ResourceExhausted,
    StatusCode,
)
from kybernate.protos import agent_pb2
from kybernate.runtime.cgroups import Cgroup

log = logging.getLogger(__name__)

ROOTFS_DIFF_FILE = "rootfs-diff.tar"
_LIBC = ctypes.CDLL(None, use_errno=True)
FREEZE_TIMEOUT_S = 30.0


class ContainerCondition(enum.Enum):
    """What the pipeline has done to the container so far."""

    UNTOUCHED = "untouched"
    LOCKING = "locking"                # thawed (if Pause froze it), CUDA locks may be held
    GPU_LOCKED = "gpu-locked"
    GPU_CHECKPOINTED = "gpu-checkpointed"
    FROZEN = "frozen"
    EXITED = "exited"                  # CRIU dumped and killed the tasks
    RESTORED = "restored"              # back as it was before the request


# The only moves the pipeline makes; anything else is a bug caught at once.
_TRANSITIONS: dict[ContainerCondition, frozenset[ContainerCondition]] = {
    ContainerCondition.UNTOUCHED: frozenset({ContainerCondition.LOCKING}),
    ContainerCondition.LOCKING: frozenset({ContainerCondition.GPU_LOCKED}),
    ContainerCondition.GPU_LOCKED: frozenset({ContainerCondition.GPU_CHECKPOINTED}),
    ContainerCondition.GPU_CHECKPOINTED: frozenset({ContainerCondition.FROZEN}),
    ContainerCondition.FROZEN: frozenset({ContainerCondition.EXITED, ContainerCondition.RESTORED}),
    ContainerCondition.EXITED: frozenset(),
    ContainerCondition.RESTORED: frozenset(),
}


@dataclasses.dataclass(frozen=True)
class CheckpointPlan:
    """A validated request."""

    checkpoint_id: str
    name: str
    container_id: str
    namespace: str
    bundle: Path
    runc_root: str
    init_pid: int
    destination: Path | None
    exit: bool
    open_tcp: bool
    external_unix_sockets: bool
    terminal: bool
    file_locks: bool
    rootfs_upperdir: Path | None
    gpu_lock_timeout_ms: int
    deadline_s: float | None
    image_ref: str
    labels: Mapping[str, str]
    memory_estimate: int

    def options_record(self) -> dict[str, Any]:
        return {
            "exit": self.exit, "open_tcp": self.open_tcp,
            "external_unix_sockets": self.external_unix_sockets, "terminal": self.terminal,
            "file_locks": self.file_locks, "rootfs_diff": self.rootfs_upperdir is not None,
            "gpu_lock_timeout_ms": self.gpu_lock_timeout_ms,
        }


@dataclasses.dataclass(frozen=True)
class HostVersions:
    kernel: str
    criu: str
    runc: str


@dataclasses.dataclass(frozen=True)
class PipelineDeps:
    config: AgentConfig
    registry: Registry
    local: LocalTier
    gpu: GpuControl
    criu: Any  # kybernate.criu.CriuClient
    versions: HostVersions
    limits: CheckpointLimits
    metrics: AgentMetrics
    promoter: Promoter | None


Report = Callable[[agent_pb2.CheckpointProgress], Awaitable[None]]


def overlay_upperdir(pid: int) -> Path | None:
    """The upperdir of the overlay mounted at the container's root, if it is one."""
    try:
        return upperdir_from_mountinfo(Path(f"/proc/{pid}/mountinfo").read_text())
    except OSError:
        return None


def upperdir_from_mountinfo(mountinfo: str) -> Path | None:
    for line in reversed(mountinfo.splitlines()):  # the last mount on "/" is the visible one
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or fields[4] != "/":
            continue
        if len(tail) < 3 or tail[0] != "overlay":
            return None
        for option in tail[2].split(","):
            if option.startswith("upperdir="):
                return Path(option[len("upperdir="):].replace("\\040", " "))
        return None
    return None


def sync_container_fs(pid: int) -> None:
    """syncfs() of the filesystem holding the container's root: its writable layer
    reaches the disk as the frozen tasks left it, without a node-wide sync()."""
    fd = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _LIBC.syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"syncfs of the root of pid {pid}: {os.strerror(errno)}")
    finally:
        os.close(fd)


def _container_rss(pid: int) -> int:
    """Resident memory of every process in the container's cgroup: what a dump writes."""
    try:
        pids = list(Cgroup.for_pid(pid).pids())
    except (KybernateError, OSError):
        pids = [pid]
    total = 0
    for p in pids:
        try:
            total += psutil.Process(p).memory_info().rss
        except psutil.Error:
            continue
    return total


def plan_checkpoint(request: agent_pb2.CheckpointRequest, config: AgentConfig, local: LocalTier) -> CheckpointPlan:
    """Validate a request without touching the container (phase `accepted`)."""
    if not request.container_id:
        raise InvalidArgument("checkpoint: container_id is required")
    if request.init_pid <= 0:
        raise InvalidArgument(f"checkpoint of {request.container_id}: init_pid is required")
    pid = int(request.init_pid)
    if not psutil.pid_exists(pid):
        raise NotFound(f"checkpoint of {request.container_id}: init pid {pid} is not running")
    bundle = Path(request.bundle)
    if not bundle.is_absolute() or not os.access(bundle / "config.json", os.R_OK):
        raise FailedPrecondition(f"checkpoint of {request.container_id}: bundle {bundle} has no readable config.json")
    destination = Path(request.destination) if request.destination else None
    if destination is not None:
        if not destination.is_absolute():
            raise InvalidArgument(f"checkpoint destination {destination} must be absolute")
        probe = destination if destination.exists() else destination.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise FailedPrecondition(f"checkpoint destination {destination} is not writable")
    checkpoint_id = naming.new_checkpoint_id()
    # The default name carries the id: unique without relying on the clock's second.
    name = naming.checkpoint_name(request.name or f"{request.container_id}-{checkpoint_id}")

    options = request.options
    upperdir = None
    if options.rootfs_diff:
        upperdir = overlay_upperdir(pid)
        if upperdir is None or not upperdir.is_dir():
            raise FailedPrecondition(
                f"checkpoint of {request.container_id}: rootfs_diff asked, but its root is not an overlay mount")

    memory = _container_rss(pid)
    local.prepare()
    free = local.free_bytes()
    if free - memory < config.min_free_bytes:
        raise ResourceExhausted(
            f"checkpoint of {request.container_id}: {local.root} has {free} bytes free; the dump needs"
            f" about {memory} and {config.min_free_bytes} must stay free")

    return CheckpointPlan(
        checkpoint_id=checkpoint_id, name=name, container_id=request.container_id,
        namespace=request.namespace, bundle=bundle, runc_root=request.runc_root, init_pid=pid,
        destination=destination,
        exit=options.exit if options.HasField("exit") else not config.default_leave_running,
        open_tcp=options.open_tcp if options.HasField("open_tcp") else config.default_open_tcp,
        external_unix_sockets=options.external_unix_sockets, terminal=options.terminal,
        file_locks=options.file_locks, rootfs_upperdir=upperdir,
        gpu_lock_timeout_ms=options.gpu_lock_timeout_ms or config.gpu_lock_timeout_ms,
        deadline_s=options.deadline_ms / 1000 if options.deadline_ms else None,
        image_ref=request.image_ref, labels=dict(request.labels), memory_estimate=memory,
    )


class CheckpointPipeline:
    """Runs one checkpoint; `run()` never raises, it reports FAILED instead."""

    def __init__(self, deps: PipelineDeps, plan: CheckpointPlan, report: Report) -> None:
        self._deps = deps
        self._plan = plan
        self._report = report
        self._condition = ContainerCondition.UNTOUCHED
        self._was_frozen = False
        self._cuda_pids: list[int] = []
        self._cgroup: Cgroup | None = None
        self._started = 0.0
        self._timings: dict[str, int] = {}
        self._cuda_steps: dict[str, Any] = {}
        self._staging = deps.local.staging(plan.checkpoint_id)
        self._work_dir = deps.config.work_root / plan.checkpoint_id

    # -- reporting --------------------------------------------------------------

    def _elapsed_ms(self) -> int:
        return int((time.monotonic() - self._started) * 1000)

    async def _phase(self, phase: int, **fields: Any) -> None:
        name = agent_pb2.Phase.Name(phase).lower()
        self._timings[name] = self._elapsed_ms()
        self._deps.metrics.phase_reached(name, self._timings[name] / 1000)
        await self._report(agent_pb2.CheckpointProgress(
            phase=phase, checkpoint_id=self._plan.checkpoint_id, elapsed_ms=self._timings[name], **fields))
        hold = self._deps.config.debug_hold_after_phase.get(name)
        if hold:
            log.warning("fault injection: holding %.1fs after phase %s", hold, name)
            await asyncio.sleep(hold)

    def _advance(self, condition: ContainerCondition) -> None:
        if condition not in _TRANSITIONS[self._condition]:
            raise AssertionError(f"checkpoint pipeline: {self._condition.value} -> {condition.value}")
        self._condition = condition

    # -- the pipeline -----------------------------------------------------------

    async def run(self) -> None:
        plan = self._plan
        self._started = time.monotonic()
        try:
            await self._deps.registry.add_staging(
                plan.checkpoint_id, plan.name, container_id=plan.container_id,
                namespace=plan.namespace, image=plan.image_ref)
        except KybernateError as exc:
            await self._fail(exc)
            return
        try:
            async with asyncio.timeout(plan.deadline_s):
                await self._execute()
        except TimeoutError:
            await self._fail(DeadlineExceeded(
                f"checkpoint of {plan.container_id} passed its deadline of {plan.deadline_s:.1f}s"),
                deadline_passed=True)
        except KybernateError as exc:
            await self._fail(exc)
        except Exception as exc:  # a bug, but the shim still needs an answer
            log.exception("checkpoint %s failed", plan.checkpoint_id)
            await self._fail(exc)

    async def _execute(self) -> None:
        plan, deps = self._plan, self._deps
        self._staging.mkdir(mode=0o700)
        self._work_dir.mkdir(parents=True, mode=0o700)
        await self._phase(agent_pb2.ACCEPTED)

        cgroup = self._cgroup = Cgroup.for_pid(plan.init_pid)
        # containerd pauses the task before Checkpoint; a frozen process cannot
        # take its CUDA lock, so thaw first (Pause already locked the GPU).
        if cgroup.is_frozen():
            self._was_frozen = True
            self._advance(ContainerCondition.LOCKING)
            await cgroup.thaw(FREEZE_TIMEOUT_S)
        self._cuda_pids = await deps.gpu.cuda_pids(cgroup.pids())
        gpu_usage = await deps.gpu.gpus_of(self._cuda_pids)
        # Checkpointed GPU memory lands in host memory, and so in CRIU's pages.
        self._check_disk(plan.memory_estimate + sum(gpu_usage.values()))

        async with deps.limits.admit(gpu_usage, plan.memory_estimate + sum(gpu_usage.values())):
            deps.limits.in_flight += 1
            try:
                await self._checkpoint_admitted()
            finally:
                deps.limits.in_flight -= 1

    async def _checkpoint_admitted(self) -> None:
        plan, deps = self._plan, self._deps
        assert self._cgroup is not None
        cgroup = self._cgroup

        # Lock every CUDA process before checkpointing any: one locked alone can
        # deadlock on one still running.
        if self._condition is ContainerCondition.UNTOUCHED:
            self._advance(ContainerCondition.LOCKING)
        self._cuda_steps["lock"] = await deps.gpu.lock(self._cuda_pids, plan.gpu_lock_timeout_ms)
        self._advance(ContainerCondition.GPU_LOCKED)
        inventory = await deps.gpu.inventory(self._cuda_pids)
        await self._phase(agent_pb2.GPU_LOCKED, cuda_pids=self._cuda_pids)

        self._cuda_steps["checkpoint"] = await deps.gpu.checkpoint(self._cuda_pids)
        self._advance(ContainerCondition.GPU_CHECKPOINTED)
        await self._phase(agent_pb2.GPU_CHECKPOINTED)

        await cgroup.freeze(FREEZE_TIMEOUT_S)
        self._advance(ContainerCondition.FROZEN)
        await asyncio.to_thread(sync_container_fs, plan.init_pid)
        await self._phase(agent_pb2.FROZEN)

        await self._dump(cgroup)
        await self._phase(agent_pb2.DUMPED)

        if not plan.exit:
            await self._bring_back()
            await self._phase(agent_pb2.RESUMED)

        await self._commit(inventory)

    async def _dump(self, cgroup: Cgroup) -> None:
        from kybernate.criu import dump_options_from_bundle, write_descriptors

        plan = self._plan
        # Before the dump: with exit, the tasks (and their /proc) are gone after it.
        await asyncio.to_thread(write_descriptors, self._staging, plan.init_pid)
        options = dump_options_from_bundle(
            plan.bundle, pid=plan.init_pid, images_dir=self._staging, work_dir=self._work_dir,
            freeze_cgroup=cgroup.freezer_path(), leave_running=not plan.exit,
            tcp_established=plan.open_tcp, ext_unix_sk=plan.external_unix_sockets,
            file_locks=plan.file_locks, terminal=plan.terminal,
        )
        await self._deps.criu.dump(options)
        if plan.exit:
            self._advance(ContainerCondition.EXITED)
        if plan.rootfs_upperdir is not None:
            await self._save_rootfs_diff(plan.rootfs_upperdir)

    def _check_disk(self, needed: int) -> None:
        free = self._deps.local.free_bytes()
        if free - needed < self._deps.config.min_free_bytes:
            raise ResourceExhausted(
                f"checkpoint of {self._plan.container_id}: {self._deps.local.root} has {free} bytes free;"
                f" the dump needs about {needed} and {self._deps.config.min_free_bytes} must stay free")

    async def _save_rootfs_diff(self, upperdir: Path) -> None:
        process = await asyncio.create_subprocess_exec(
            "tar", "--xattrs", "--numeric-owner", "-C", str(upperdir), "-cf",
            str(self._staging / ROOTFS_DIFF_FILE), ".",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, stderr = await process.communicate()
        if process.returncode != 0:
            raise FailedPrecondition(f"saving the rootfs diff of {upperdir} failed: "
                                     f"{stderr.decode(errors='replace').strip()}")

    async def _bring_back(self) -> None:
        """After a successful dump that leaves the container running."""
        await self._return_to_entry_state()
        self._advance(ContainerCondition.RESTORED)

    async def _return_to_entry_state(self) -> None:
        """Thaw, CUDA restore, then the state the container had when the request came:
        running and unlocked, or (containerd pauses before Checkpoint) frozen with the
        GPU lock our Pause took, so that containerd's Resume finds what it paused."""
        assert self._cgroup is not None
        await self._cgroup.thaw(FREEZE_TIMEOUT_S)
        await self._deps.gpu.restore(self._cuda_pids)
        if self._was_frozen:
            await self._cgroup.freeze(FREEZE_TIMEOUT_S)
        else:
            await self._deps.gpu.unlock(self._cuda_pids)

    async def _commit(self, inventory: dict[str, Any]) -> None:
        plan, deps = self._plan, self._deps
        metadata = {
            "id": plan.checkpoint_id,
            "name": plan.name,
            "created_at": datetime.now(UTC).isoformat(),
            "container": {"id": plan.container_id, "namespace": plan.namespace, "image": plan.image_ref,
                          "labels": dict(plan.labels), "bundle": str(plan.bundle)},
            "host": {"kernel": deps.versions.kernel, "criu_version": deps.versions.criu,
                     "runc_version": deps.versions.runc},
            "cuda": {**inventory, "backend": deps.gpu.backend_name, "pids": self._cuda_pids,
                     "driver_version": await deps.gpu.driver_version(), "steps": self._cuda_steps},
            "options": plan.options_record(),
            "timings_ms": dict(self._timings),
        }
        final = deps.local.committed(plan.checkpoint_id)
        document = await asyncio.to_thread(commit.commit, self._staging, final, metadata)
        files = document["files"]
        dirty = deps.promoter is not None
        await deps.registry.mark_committed(
            plan.checkpoint_id, size_bytes=sum(f["size"] for f in files.values()), file_count=len(files),
            checksums={rel: f["sha256"] for rel, f in files.items()}, dirty=dirty)
        if dirty:
            deps.metrics.dirty_checkpoints.inc()
        await asyncio.to_thread(shutil.rmtree, self._work_dir, True)
        if plan.destination is not None:
            await asyncio.to_thread(commit.export, final, plan.destination)
        if deps.promoter is not None:
            deps.promoter.enqueue(plan.checkpoint_id)
        deps.metrics.checkpoint_finished("committed")
        await self._phase(agent_pb2.COMMITTED, local_path=str(final))

    # -- failure ----------------------------------------------------------------

    async def _recover(self, deadline_passed: bool) -> int:
        """Put the container back if its state is known good; else say it must die."""
        condition = self._condition
        if condition is ContainerCondition.UNTOUCHED:
            return agent_pb2.UNTOUCHED
        if condition is ContainerCondition.EXITED:
            return agent_pb2.EXITED
        if condition is ContainerCondition.RESTORED:
            return agent_pb2.RESTORED
        if deadline_passed and condition is not ContainerCondition.LOCKING:
            return agent_pb2.MUST_KILL
        if not psutil.pid_exists(self._plan.init_pid):
            return agent_pb2.MUST_KILL
        try:
            async with asyncio.timeout(FREEZE_TIMEOUT_S):
                await self._return_to_entry_state()
        except Exception as exc:  # noqa: BLE001 - whatever failed, its state is now unknown
            log.error("checkpoint %s: could not bring container %s back: %s",
                      self._plan.checkpoint_id, self._plan.container_id, exc)
            return agent_pb2.MUST_KILL
        return agent_pb2.RESTORED

    async def _fail(self, exc: BaseException, *, deadline_passed: bool = False) -> None:
        plan = self._plan
        state = await self._recover(deadline_passed)
        message = str(exc) or type(exc).__name__
        if state == agent_pb2.MUST_KILL:
            message += "; the container's state is undefined (locked, frozen or half-seized): it must be killed"
        code = exc.code if isinstance(exc, KybernateError) else StatusCode.INTERNAL
        await self._keep_logs(exc)
        try:
            await self._deps.registry.mark_failed(plan.checkpoint_id, message)
        except NotFound:
            pass  # the row was never added (e.g. a duplicate name)
        except Exception:
            log.exception("checkpoint %s: registry update failed", plan.checkpoint_id)
        await asyncio.to_thread(shutil.rmtree, self._staging, True)
        self._deps.metrics.checkpoint_finished("failed")
        await self._report(agent_pb2.CheckpointProgress(
            phase=agent_pb2.FAILED, checkpoint_id=plan.checkpoint_id, elapsed_ms=self._elapsed_ms(),
            error_code=int(code), error_message=message, container_state=state))

    async def _keep_logs(self, exc: BaseException) -> None:
        """Move CRIU's work dir (dump.log) to the failed-checkpoints dir for the operator."""
        if not self._work_dir.exists():
            return
        if not any(self._work_dir.iterdir()):
            await asyncio.to_thread(shutil.rmtree, self._work_dir, True)
            return
        target = self._deps.config.failed_root / self._plan.checkpoint_id
        target.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(shutil.move, str(self._work_dir), str(target))
        log.error("checkpoint %s failed (%s); CRIU logs kept in %s", self._plan.checkpoint_id, exc, target)
