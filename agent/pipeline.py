"""The checkpoint pipeline, phase by phase (DESIGN.md, Checkpoint).

    accepted -> gpu_locked -> gpu_checkpointed -> frozen -> dumped -> [resumed] -> committed

Each phase is reported as it happens. The pipeline tracks what it has done to the
container (`ContainerCondition`) so that, on any failure, it knows whether it can
bring the container back (thaw, CUDA restore, unlock) or must tell the shim to kill it.

The request was validated before (`plan`); the writable layer is `writable_layer`'s,
the metadata document `metadata`'s, and sealing the directory `commit`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import psutil
from kybernate.agent import commit, work_path, writable_layer
from kybernate.agent.config import AgentConfig
from kybernate.agent.gpu import GpuControl
from kybernate.agent.hash_behind import HashBehind
from kybernate.agent.limits import CheckpointLimits
from kybernate.agent.local_tier import LocalTier
from kybernate.agent.metadata import HostVersions, checkpoint_metadata
from kybernate.agent.metrics import AgentMetrics
from kybernate.agent.plan import CheckpointPlan, check_disk
from kybernate.agent.promoter import Promoter
from kybernate.agent.registry import Registry
from kybernate.api import layout
from kybernate.api.layout import ROOTFS_DIFF_FILE
from kybernate.cuda import CudaState
from kybernate.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    KybernateError,
    NotFound,
    StatusCode,
)
from kybernate.protos import agent_pb2
from kybernate.runtime.cgroups import Cgroup

log = logging.getLogger(__name__)

FREEZE_TIMEOUT_S = 30.0
#: How long a commit waits for containerd to resume the container it paused around
#: Checkpoint (it packs the images first: seconds per GB) before it goes ahead anyway.
COMMIT_THAW_WAIT_S = 120.0
THAW_POLL_S = 0.02
#: Host memory one CRIU dump holds besides GPU state: its page pipes (vmsplice'd
#: pages on their way to the image files) and its own heap. Ten concurrent dumps of
#: 256 MiB containers peaked at 76 MiB RSS for the agent with its CRIU children
#: (bench/scale_bench.py), so 64 MiB per dump is on the safe side.
DUMP_WORKING_SET_BYTES = 64 << 20


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


def _fault_hold(where: str, seconds: float) -> None:
    """Fault injection (tests): stall a blocking step, e.g. the commit's thread."""
    log.warning("fault injection: holding %.1fs %s", seconds, where)
    time.sleep(seconds)


class CheckpointPipeline:
    """Runs one checkpoint; `run()` reports FAILED instead of raising (it re-raises
    only a cancellation, after the same recovery as a failure).

    Two clocks: the request's deadline bounds the time the container is in the
    agent's hands (admission wait, lock, dump, resume); the commit that follows is
    outside it and is never cancelled once it starts. Once the dump has succeeded the
    data is complete, and a complete checkpoint commits whatever else fails (the
    container's resume, the deadline, the agent being stopped); if the agent dies
    first, its successor commits it from the staging directory's draft.
    """

    def __init__(self, deps: PipelineDeps, plan: CheckpointPlan, report: Report) -> None:
        self._deps = deps
        self._plan = plan
        self._report = report
        self._condition = ContainerCondition.UNTOUCHED
        self._was_frozen = False
        self._cuda_pids: list[int] = []
        # The CUDA state each process had when the agent took over (LOCKED when the
        # client's Pause took the lock): what bringing the container back returns to.
        self._entry_cuda: dict[int, CudaState] = {}
        self._cgroup: Cgroup | None = None
        self._started = 0.0
        self._timings: dict[str, int] = {}
        self._cuda_steps: dict[str, Any] = {}
        self._inventory: dict[str, Any] = {"gpus": []}
        self._data_complete = False
        self._commit_task: asyncio.Future[dict[str, Any]] | None = None
        # Digests of the pages images, computed behind CRIU's writes; then of every file.
        self._pages_digests: dict[str, tuple[int, str]] = {}
        self._files: dict[str, dict[str, Any]] | None = None
        # The metadata (without the file list) exported and committed: computed once,
        # so containerd's copy and the local one hold the same metadata.json.
        self._final_metadata: dict[str, Any] | None = None
        self._writeback: asyncio.Future[None] | None = None
        self._staging = deps.local.staging(plan.checkpoint_id)
        self._work_dir = deps.config.work_root / plan.checkpoint_id

    # -- reporting --------------------------------------------------------------

    def _elapsed_ms(self) -> int:
        return int((time.monotonic() - self._started) * 1000)

    async def _phase(self, phase: agent_pb2.Phase, **fields: Any) -> None:
        name = agent_pb2.Phase.Name(phase).lower()
        previous_ms = max(self._timings.values(), default=0)
        self._timings[name] = self._elapsed_ms()
        self._deps.metrics.phase_reached(name, self._timings[name] / 1000, previous_ms / 1000)
        if phase == agent_pb2.COMMITTED and self._plan.return_after_export:  # its caller left at EXPORTED
            log.info("checkpoint %s committed after %d ms", self._plan.checkpoint_id, self._timings[name])
        else:
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
                namespace=plan.namespace, pod_namespace=plan.pod_namespace, image=plan.image_ref)
        except KybernateError as exc:
            await self._report_failure(exc, agent_pb2.UNTOUCHED)
            self._deps.metrics.checkpoint_finished("failed")
            return
        deadline_passed = False
        # Resolved once the commit is over, however it ends: from EXPORTED on, the
        # caller may have gone on, and a restore by name waits for this instead of
        # finding a staging row.
        committing: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            try:
                async with asyncio.timeout(plan.deadline_s):
                    await self._execute()
            except TimeoutError:
                deadline_passed = True
                assert plan.deadline_s is not None
                raise DeadlineExceeded(
                    f"checkpoint of {plan.container_id} passed its deadline of {plan.deadline_s:.1f}s"
                    f" while the container was {self._condition.value}") from None
            self._deps.local.in_flight.add(plan.checkpoint_id, committing)
            await self._export()
            await self._await_thaw()
            await self._commit()
        except asyncio.CancelledError:
            log.warning("checkpoint %s cancelled (agent stopping, or the shim gave up) while the"
                        " container was %s", plan.checkpoint_id, self._condition.value)
            await self._fail(Cancelled(f"checkpoint of {plan.container_id} was cancelled"))
            raise
        except KybernateError as exc:
            await self._fail(exc, deadline_passed=deadline_passed)
        except Exception as exc:  # a bug, but the shim still needs an answer
            log.exception("checkpoint %s failed", plan.checkpoint_id)
            await self._fail(exc)
        finally:
            committing.set_result(None)

    async def _execute(self) -> None:
        """Everything up to complete data and a container back as it was (or exited)."""
        plan, deps = self._plan, self._deps
        self._staging.mkdir(mode=0o700)
        self._work_dir.mkdir(parents=True, mode=0o700)
        await self._phase(agent_pb2.ACCEPTED)

        # Read-only until admitted: a container that containerd paused stays frozen
        # (and its GPU locked by our Pause) while it waits for its turn.
        cgroup = self._cgroup = Cgroup.for_pid(plan.init_pid)
        self._was_frozen = cgroup.is_frozen()
        self._cuda_pids = await deps.gpu.cuda_pids(cgroup.pids())
        gpu_usage = await deps.gpu.gpus_of(self._cuda_pids)
        # Checkpointed GPU memory lands in host memory, and so in CRIU's pages.
        gpu_bytes = sum(gpu_usage.values())
        check_disk(deps.local, deps.config, plan.memory_estimate + gpu_bytes, plan.container_id)

        # What a dump holds in host memory: the GPU memory copied out of the devices,
        # and CRIU's own working set. Not the container's RSS: CRIU streams the pages
        # through its page pipes into the image files.
        async with deps.limits.admit(gpu_usage, gpu_bytes + DUMP_WORKING_SET_BYTES):
            deps.limits.in_flight += 1
            try:
                await self._phase(agent_pb2.ADMITTED)
                await self._checkpoint_admitted()
            finally:
                deps.limits.in_flight -= 1

    async def _checkpoint_admitted(self) -> None:
        plan, deps = self._plan, self._deps
        assert self._cgroup is not None
        cgroup = self._cgroup

        self._advance(ContainerCondition.LOCKING)
        if self._was_frozen and self._cuda_pids:  # a frozen process cannot take its CUDA lock
            await cgroup.thaw(FREEZE_TIMEOUT_S)
        self._entry_cuda = await deps.gpu.states(self._cuda_pids)
        # Lock every CUDA process before checkpointing any: one locked alone can
        # deadlock on one still running.
        self._cuda_steps["lock"] = await deps.gpu.lock(self._cuda_pids, plan.gpu_lock_timeout_ms)
        self._advance(ContainerCondition.GPU_LOCKED)
        self._inventory = await deps.gpu.inventory(self._cuda_pids)
        await self._phase(agent_pb2.GPU_LOCKED, cuda_pids=self._cuda_pids)

        self._cuda_steps["checkpoint"] = await deps.gpu.checkpoint(self._cuda_pids)
        self._advance(ContainerCondition.GPU_CHECKPOINTED)
        await self._phase(agent_pb2.GPU_CHECKPOINTED)

        await cgroup.freeze(FREEZE_TIMEOUT_S)
        self._advance(ContainerCondition.FROZEN)
        await asyncio.to_thread(writable_layer.sync_container_fs, plan.init_pid)
        await self._phase(agent_pb2.FROZEN)

        dump_started = time.monotonic()
        await self._dump(cgroup)
        dumped_bytes = await asyncio.to_thread(_tree_bytes, self._staging)
        self._deps.metrics.data_moved("dumped", dumped_bytes, time.monotonic() - dump_started)
        await self._phase(agent_pb2.DUMPED)

        if not plan.exit:
            await self._bring_back()
            await self._phase(agent_pb2.RESUMED)

    async def _dump(self, cgroup: Cgroup) -> None:
        from kybernate.criu import dump_options_from_bundle, write_descriptors

        plan = self._plan
        # Before the dump: with exit, the tasks (and their /proc) are gone after it.
        # The writable layer too: the tasks are frozen and synced, so it is what the
        # dump will expect, and after the dump the data is complete at once.
        await asyncio.to_thread(write_descriptors, self._staging, plan.init_pid)
        if plan.rootfs_upperdir is not None:
            await writable_layer.save_diff(plan.rootfs_upperdir, self._staging / ROOTFS_DIFF_FILE)
        options = dump_options_from_bundle(
            plan.bundle, pid=plan.init_pid, images_dir=self._staging, work_dir=self._work_dir,
            freeze_cgroup=cgroup.freezer_path(), leave_running=not plan.exit,
            tcp_established=plan.open_tcp, ext_unix_sk=plan.external_unix_sockets,
            file_locks=plan.file_locks, terminal=plan.terminal,
        )
        # If the agent dies while CRIU runs, its successor reads CRIU's log to learn
        # whether the dump finished (`commit.recoverable_metadata`).
        await asyncio.to_thread(commit.write_draft, self._staging, self._metadata(), commit.DRAFT_DUMPING,
                                work_dir=self._work_dir)
        hasher = HashBehind(self._staging).start()
        try:
            await self._deps.criu.dump(options)
        except BaseException:
            await asyncio.to_thread(hasher.close)
            raise
        finally:  # the log of a failed dump is what its client looks for first
            if plan.client_work_path is not None:
                await asyncio.to_thread(work_path.hand_over, self._work_dir, plan.client_work_path)
        # The disk starts on the images now, in the background: the commit's fsync
        # after the thaw then has little left to wait for.
        self._writeback = asyncio.ensure_future(asyncio.to_thread(commit.start_writeback, self._staging))
        self._pages_digests = await asyncio.to_thread(hasher.finish)
        if plan.exit:
            self._advance(ContainerCondition.EXITED)
        await asyncio.to_thread(commit.write_draft, self._staging, self._metadata(), commit.DRAFT_COMPLETE,
                                work_dir=self._work_dir)
        self._data_complete = True

    async def _bring_back(self) -> None:
        """After a successful dump that leaves the container running."""
        await self._return_to_entry_state()
        self._advance(ContainerCondition.RESTORED)

    async def _return_to_entry_state(self) -> None:
        """Thaw, CUDA restore, then the state the container had when the agent took it
        over: running and unlocked, or (containerd pauses before Checkpoint) frozen,
        with the GPU lock held only where a Pause had taken it."""
        assert self._cgroup is not None
        gpu = self._deps.gpu
        if not self._cuda_pids:
            # Nothing to give back to a GPU: a container that came frozen stays frozen
            # throughout (its files are as the dump saw them when containerd diffs them).
            if not self._was_frozen:
                await self._cgroup.thaw(FREEZE_TIMEOUT_S)
            return
        await self._cgroup.thaw(FREEZE_TIMEOUT_S)
        await gpu.restore(self._cuda_pids)
        if self._was_frozen:
            await gpu.unlock([pid for pid in self._cuda_pids
                              if self._entry_cuda.get(pid, CudaState.RUNNING) is CudaState.RUNNING])
            await self._cgroup.freeze(FREEZE_TIMEOUT_S)
        else:
            await gpu.unlock(self._cuda_pids)

    # -- the commit ---------------------------------------------------------------

    def _metadata(self) -> dict[str, Any]:
        return checkpoint_metadata(
            self._plan, self._deps.versions, cuda_backend=self._deps.gpu.backend_name,
            cuda_inventory=self._inventory, cuda_pids=self._cuda_pids, cuda_steps=self._cuda_steps,
            timings_ms=self._timings)

    async def _export(self) -> None:
        """Finish the digests, then put the images and metadata.json where containerd
        packs them (phase EXPORTED). Nothing here needs the container stopped; what
        runs while containerd keeps it paused is the tail of the pages CRIU wrote last
        and the small images."""
        plan = self._plan
        self._files = await asyncio.to_thread(self._digest_all)
        self._final_metadata = self._metadata()
        if plan.destination is not None:
            document = commit.document_for(self._final_metadata, self._files)
            try:
                await asyncio.to_thread(commit.export, self._staging, plan.destination, document=document)
            except OSError as exc:
                raise Internal(f"checkpoint {plan.checkpoint_id}: exporting it to {plan.destination} failed:"
                               f" {exc}") from None
        await self._phase(agent_pb2.EXPORTED)

    def _digest_all(self) -> dict[str, dict[str, Any]]:
        """Every payload file's size and sha256: the pages from behind CRIU, the rest now."""
        digests = {rel: digest for rel, (_, digest) in self._pages_digests.items()}
        rest = [rel for rel in commit.payload_names(self._staging) if rel not in digests]
        digests.update(commit.hash_files(self._staging, rest))
        return commit.file_entries(self._staging, digests)

    async def _await_thaw(self) -> None:
        """When the caller went on at EXPORTED (containerd resumes the task only after
        it has packed the images), fsync and seal once the container runs again: the
        commit is I/O a paused container need not wait for, and containerd's removal
        of its links to our files (which moves their ctime) has happened by then."""
        plan = self._plan
        if not plan.return_after_export or plan.exit or self._cgroup is None:
            return
        waited = time.monotonic()
        while time.monotonic() - waited < COMMIT_THAW_WAIT_S:
            try:
                frozen = await asyncio.to_thread(self._cgroup.is_frozen)
            except (KybernateError, OSError):
                return  # the container is gone
            if not frozen or not psutil.pid_exists(plan.init_pid):
                return
            await asyncio.sleep(THAW_POLL_S)
        log.info("checkpoint %s: container %s still paused after %.0fs; committing anyway",
                 plan.checkpoint_id, plan.container_id, COMMIT_THAW_WAIT_S)

    async def _commit(self) -> None:
        """Seal the complete data and record it. After the rename the checkpoint
        exists, whatever fails next."""
        commit_started = time.monotonic()
        final = await self._seal()
        self._deps.metrics.data_moved("committed", await asyncio.to_thread(_tree_bytes, final),
                                      time.monotonic() - commit_started)
        await asyncio.to_thread(shutil.rmtree, self._work_dir, True)
        await self._phase(agent_pb2.COMMITTED, local_path=str(final))

    async def _seal(self) -> Path:
        """Commit the staging directory and record it; never cancelled half way (the
        thread cannot be stopped, and with `exit` the data is the only copy)."""
        plan, deps = self._plan, self._deps
        final = deps.local.committed(plan.checkpoint_id)
        if self._writeback is not None:
            await asyncio.wait([self._writeback])
        if self._commit_task is None:
            hold = deps.config.debug_hold_during_commit_s
            self._commit_task = asyncio.ensure_future(asyncio.to_thread(
                self._commit_and_seal, final,
                (lambda: _fault_hold("during commit", hold)) if hold else None))
            deps.local.in_flight.add(plan.checkpoint_id, self._commit_task)
        try:
            document = await asyncio.shield(self._commit_task)
        except asyncio.CancelledError:
            log.warning("checkpoint %s: cancelled during its commit; finishing the commit first",
                        plan.checkpoint_id)
            await asyncio.wait([self._commit_task])
            if self._commit_task.exception() is None:
                await self._record_committed(self._commit_task.result())
            raise
        await self._record_committed(document)
        return final

    def _commit_and_seal(self, final: Path, before_metadata: Callable[[], None] | None) -> dict[str, Any]:
        document = commit.commit(self._staging, final, self._final_metadata or self._metadata(),
                                 files=self._files, before_metadata=before_metadata)
        try:
            self._deps.local.seals.record(self._plan.checkpoint_id, final,
                                          [*document["files"], layout.METADATA_FILE])
        except OSError as exc:  # unsealed, it is hashed at its next restore instead
            log.warning("checkpoint %s: committed, but sealing it failed: %s", self._plan.checkpoint_id, exc)
        return document

    async def _record_committed(self, document: Mapping[str, Any]) -> None:
        plan, deps = self._plan, self._deps
        deps.metrics.checkpoint_finished("committed")
        files = document["files"]
        dirty = deps.promoter is not None
        try:
            await deps.registry.mark_committed(
                plan.checkpoint_id, size_bytes=sum(f["size"] for f in files.values()), file_count=len(files),
                checksums={rel: f["sha256"] for rel, f in files.items()}, dirty=dirty)
        except Exception:  # the disk is the truth; the next start reconciles the row
            log.exception("checkpoint %s is committed, but recording it in the registry failed",
                          plan.checkpoint_id)
            return
        if dirty:
            assert deps.promoter is not None
            deps.metrics.dirty_checkpoints.inc()
            deps.promoter.enqueue(plan.checkpoint_id)

    # -- failure ----------------------------------------------------------------

    async def _recover(self, deadline_passed: bool) -> agent_pb2.ContainerState:
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
        self._condition = ContainerCondition.RESTORED
        return agent_pb2.RESTORED

    async def _fail(self, exc: BaseException, *, deadline_passed: bool = False) -> None:
        """Recover the container, keep complete data, report FAILED."""
        plan = self._plan
        state = await self._recover(deadline_passed)
        message = str(exc) or type(exc).__name__
        if state == agent_pb2.MUST_KILL:
            message += "; the container's state is undefined (locked, frozen or half-seized): it must be killed"
        if self._data_complete:
            message += await self._keep_complete_data()
        else:
            await self._discard(message)
        await self._report_failure(exc, state, message)
        if not self._deps.local.has(plan.checkpoint_id):
            self._deps.metrics.checkpoint_finished("failed")

    async def _keep_complete_data(self) -> str:
        """The dump succeeded before the failure: commit it anyway (what went wrong was
        the container's resume, the deadline, a stop), or leave it for the next start."""
        plan, deps = self._plan, self._deps
        if deps.local.has(plan.checkpoint_id):
            return f"; the checkpoint itself is complete and committed as {plan.checkpoint_id}"
        try:
            await self._seal()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the staging data stays for the next start
            log.exception("checkpoint %s: commit failed", plan.checkpoint_id)
            with contextlib.suppress(Exception):
                await deps.registry.mark_failed(
                    plan.checkpoint_id, f"commit failed: {exc}; the data is kept and the agent retries the"
                                        " commit at its next start")
            return f"; committing its complete data failed too ({exc}); the agent retries at its next start"
        await asyncio.to_thread(shutil.rmtree, self._work_dir, True)
        return f"; the checkpoint itself is complete and committed as {plan.checkpoint_id}"

    async def _discard(self, message: str) -> None:
        plan = self._plan
        await self._keep_logs()
        try:
            await self._deps.registry.mark_failed(plan.checkpoint_id, message)
        except NotFound:
            pass  # the row was never added
        except Exception:
            log.exception("checkpoint %s: registry update failed", plan.checkpoint_id)
        await asyncio.to_thread(shutil.rmtree, self._staging, True)

    async def _report_failure(self, exc: BaseException, state: agent_pb2.ContainerState, message: str | None = None) -> None:
        code = exc.code if isinstance(exc, KybernateError) else StatusCode.INTERNAL
        with contextlib.suppress(Exception):  # the stream may be gone (cancelled)
            await self._report(agent_pb2.CheckpointProgress(
                phase=agent_pb2.FAILED, checkpoint_id=self._plan.checkpoint_id, elapsed_ms=self._elapsed_ms(),
                error_code=int(code), error_message=message or str(exc) or type(exc).__name__,
                container_state=state))

    async def _keep_logs(self) -> None:
        """Move CRIU's work dir (dump.log) to the failed-checkpoints dir for the operator."""
        if not self._work_dir.exists():
            return
        if not any(self._work_dir.iterdir()):
            await asyncio.to_thread(shutil.rmtree, self._work_dir, True)
            return
        target = self._deps.config.failed_root / self._plan.checkpoint_id
        target.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(shutil.move, str(self._work_dir), str(target))
        log.error("checkpoint %s failed; CRIU logs kept in %s", self._plan.checkpoint_id, target)


def _tree_bytes(directory: Path) -> int:
    """Bytes of the regular files under `directory`."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and not p.is_symlink())
