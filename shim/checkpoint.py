"""Checkpoint through the node agent, with the kill policy; GPU locks around Pause.

The agent runs the pipeline and streams one progress message per phase. What the
shim decides is what happens to the container when the pipeline does not finish:

| what happened | container | error |
|---|---|---|
| agent unreachable, or refused before ACCEPTED | untouched, still running | Unavailable naming the socket / the agent's error |
| FAILED with UNTOUCHED or RESTORED | running as before (the agent restored it) | the agent's error (CRIU's line) |
| FAILED with EXITED | CRIU killed it; the reaper publishes the exit | the agent's error |
| FAILED with MUST_KILL, stream broken or agent dead after ACCEPTED, shim deadline passed | SIGKILLed at once; the reaper publishes the exit | FailedPrecondition / Unavailable / DeadlineExceeded naming the phase and the kill |

The processes of a half-checkpointed container may be CUDA-locked, frozen or
half-seized by CRIU; resuming them is not safe, so they are killed, never resumed.

grpc is loaded by the agent client on first use: only a checkpoint or a pause with
an agent present pays for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from kybernate.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    KybernateError,
    StatusCode,
    Unavailable,
    error_from_status,
)
from kybernate.runtime.cgroups import Cgroup
from kybernate.shim.agent_client import AgentClient
from kybernate.shim.agent_settings import (
    agent_checkpoint_options,
    agent_socket,
    checkpoint_settings,
)

if TYPE_CHECKING:
    from kybernate.protos import agent_pb2
    from kybernate.runtime.container import Container
    from kybernate.shim.options import CheckpointRequestOptions

log = logging.getLogger(__name__)

#: The shim's own deadline when the container sets none: generous (a dump of a large
#: GPU container takes minutes), but a hung agent must not hold a container forever.
DEFAULT_CHECKPOINT_DEADLINE_S = 1800.0
#: Added to the container's own deadline-ms: the agent reports its deadline itself
#: (FAILED, MUST_KILL); the shim steps in only when the agent cannot.
SHIM_DEADLINE_GRACE_S = 10.0
#: How long thawing may take while killing (a frozen v1 task dies only once thawed).
KILL_THAW_TIMEOUT_S = 5.0
#: For LockGpu/UnlockGpu calls beyond the lock timeout itself.
GPU_CALL_TIMEOUT_S = 60.0
#: The image reference containerd's CRI plugin records in the spec.
IMAGE_NAME_ANNOTATIONS = ("io.kubernetes.cri.image-name", "io.containerd.image.name")


async def kill_container(container: Container) -> None:
    """SIGKILL every process of the container at once, then make sure they die.

    The pids of its cgroup first (all of them, not the init alone: a CUDA-locked or
    half-seized child must not outlive it), then thaw the freezer (a task frozen in
    cgroup v1 does not die until thawed), then `runc kill --all 9` as a backstop.
    The reaper sees the init's exit and the service publishes /tasks/exit as usual.
    """
    cgroup = container.cgroup
    if cgroup is None and container.pid > 0:
        with contextlib.suppress(KybernateError, OSError):
            cgroup = Cgroup.for_pid(container.pid)
    pids: set[int] = {container.pid} if container.pid > 0 else set()
    if cgroup is not None:
        try:
            pids.update(cgroup.pids())
        except (KybernateError, OSError) as err:
            log.warning("container %s: cannot list its cgroup's pids: %s", container.id, err)
    for pid in sorted(pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if cgroup is not None:
        try:
            await cgroup.thaw(KILL_THAW_TIMEOUT_S)
        except (KybernateError, OSError) as err:
            log.warning("container %s: thawing after SIGKILL: %s", container.id, err)
    try:
        await container.runc.kill(container.id, signal.SIGKILL, all=True)
    except KybernateError as err:  # already gone is the expected answer
        log.debug("container %s: runc kill --all after SIGKILL: %s", container.id, err)
    log.warning("container %s: killed %d process(es) after a failed checkpoint", container.id, len(pids))


def _phase_name(phase: int) -> str:
    from kybernate.protos import agent_pb2

    return agent_pb2.Phase.Name(phase) if phase else "none"


class AgentCheckpointer:
    """The service's `Checkpointer`: the agent's pipeline plus the kill policy."""

    def __init__(self, *, environ: Mapping[str, str] | None = None,
                 default_deadline_s: float = DEFAULT_CHECKPOINT_DEADLINE_S,
                 connect_timeout_s: float = 3.0) -> None:
        self._environ = dict(os.environ if environ is None else environ)
        self._default_deadline_s = default_deadline_s
        self._connect_timeout_s = connect_timeout_s

    def _request(self, container: Container, path: str,
                 options: CheckpointRequestOptions) -> agent_pb2.CheckpointRequest:
        from kybernate.protos import agent_pb2

        annotations = container.spec.get("annotations") or {}
        image_ref = next((annotations[k] for k in IMAGE_NAME_ANNOTATIONS if annotations.get(k)), "")
        return agent_pb2.CheckpointRequest(
            container_id=container.id, namespace=container.namespace, bundle=str(container.bundle),
            runc_root=container.runc.root, init_pid=container.pid,
            # containerd 2.x honours image_path for any runtime and then packs nothing.
            destination=options.image_path or path,
            options=agent_checkpoint_options(checkpoint_settings(container.spec), options),
            image_ref=image_ref, labels={"containerd.namespace": container.namespace})

    async def checkpoint(self, container: Container, path: str,
                         options: CheckpointRequestOptions) -> None:
        socket = agent_socket(container.spec, self._environ)
        request = self._request(container, path, options)
        deadline_s = (request.options.deadline_ms / 1000 + SHIM_DEADLINE_GRACE_S
                      if request.options.deadline_ms else self._default_deadline_s)
        run = _CheckpointRun(container, socket)
        try:
            async with asyncio.timeout(deadline_s):
                await run.stream(request, self._connect_timeout_s)
        except TimeoutError:
            if run.committed:  # only the end of the stream was late
                return
            if not run.accepted:
                raise DeadlineExceeded(
                    f"checkpoint of {container.id}: kybernate agent at {socket} did not accept within "
                    f"{deadline_s:.0f}s; container untouched") from None
            await kill_container(container)
            raise DeadlineExceeded(
                f"checkpoint of {container.id}: no completion within {deadline_s:.0f}s (last phase "
                f"{run.last_phase}); the container was killed") from None
        except asyncio.CancelledError:
            if run.accepted and not run.finished:
                log.warning("container %s: checkpoint cancelled after phase %s; killing it",
                            container.id, run.last_phase)
                await kill_container(container)
            raise


class _CheckpointRun:
    """One checkpoint stream and what it said so far."""

    def __init__(self, container: Container, socket: Path) -> None:
        self.container = container
        self.socket = socket
        self.accepted = False
        self.committed = False
        # Committed, or failed with the kill policy applied: nothing left to do.
        self.finished = False
        self.last_phase = "none"
        self.failure: agent_pb2.CheckpointProgress | None = None

    async def stream(self, request: agent_pb2.CheckpointRequest, connect_timeout_s: float) -> None:
        from kybernate.protos import agent_pb2

        container = self.container
        try:
            async with AgentClient(self.socket, connect_timeout=connect_timeout_s) as client:
                async for progress in client.checkpoint(request):
                    if progress.phase == agent_pb2.FAILED:
                        self.failure = progress
                        continue
                    self.accepted = True
                    self.last_phase = _phase_name(progress.phase)
                    log.info("checkpoint of %s: %s after %d ms%s", container.id, self.last_phase,
                             progress.elapsed_ms,
                             f" (CUDA pids {list(progress.cuda_pids)})" if progress.cuda_pids else "")
                    if progress.phase == agent_pb2.COMMITTED:
                        self.committed = self.finished = True
                        log.info("checkpoint of %s committed as %s at %s", container.id,
                                 progress.checkpoint_id, progress.local_path)
        except KybernateError as err:
            await self._failed(err)
            return
        if self.failure is not None:  # a FAILED message, then a clean end: still a failure
            await self._failed(error_from_status(self.failure.error_code or StatusCode.INTERNAL, self.failure.error_message))
        elif not self.finished:
            await self._failed(Unavailable("the stream ended before COMMITTED"))

    async def _failed(self, err: KybernateError) -> None:
        """Apply the kill policy to a pipeline that did not commit, then raise."""
        from kybernate.protos import agent_pb2

        container = self.container
        self.finished = True
        failure = self.failure
        if failure is None:
            if not self.accepted:
                if isinstance(err, Unavailable):
                    raise Unavailable(f"checkpoint of {container.id}: {err} (container untouched)") from None
                raise type(err)(f"checkpoint of {container.id} refused: {err}") from None
            # The stream broke after ACCEPTED without the agent saying what it left.
            await kill_container(container)
            raise Unavailable(f"checkpoint of {container.id}: lost the kybernate agent at {self.socket} "
                              f"after phase {self.last_phase} ({err}); the container was killed") from None
        state = failure.container_state
        message = failure.error_message or str(err)
        if state == agent_pb2.MUST_KILL:
            await kill_container(container)
            raise FailedPrecondition(f"checkpoint of {container.id} failed after phase {self.last_phase}: "
                                     f"{message}; the container was killed")
        if state == agent_pb2.EXITED:
            raise type(err)(f"checkpoint of {container.id} failed after phase {self.last_phase}: {message}; "
                            "the container had exited (CRIU stopped it)") from None
        # UNTOUCHED or RESTORED: the agent put it back; keep the agent's status code.
        where = "container untouched" if state == agent_pb2.UNTOUCHED else "container resumed as it was"
        raise type(err)(f"checkpoint of {container.id} failed after phase {self.last_phase}: {message} "
                        f"({where})") from None


class AgentGpuLock:
    """The service's pause hooks: lock CUDA before the freeze, unlock after the thaw.

    A frozen CUDA process cannot be locked (the lock needs its threads to run), so
    Pause takes the lock first. A node with no agent has no GPU lock to take: Pause
    then goes on with a warning. Resume's unlock must not be skipped silently, since
    the container may be locked: an unreachable agent fails Resume.
    """

    def __init__(self, *, environ: Mapping[str, str] | None = None) -> None:
        self._environ = dict(os.environ if environ is None else environ)
        # Containers whose Pause took the agent's lock: only those need the unlock.
        self._locked: set[str] = set()

    def _gpu_request(self, container: Container) -> agent_pb2.GpuLockRequest:
        from kybernate.protos import agent_pb2

        settings = checkpoint_settings(container.spec)
        return agent_pb2.GpuLockRequest(container_id=container.id, init_pid=container.pid,
                                        timeout_ms=settings.gpu_lock_timeout_ms)

    async def before_pause(self, container: Container) -> None:
        socket = agent_socket(container.spec, self._environ)
        if not socket.exists():  # no agent on this node: no grpc import, no GPU lock
            log.warning("pause of %s: no kybernate agent at %s; pausing without a GPU lock",
                        container.id, socket)
            return
        try:
            async with AgentClient(socket) as client:
                locked = await client.lock_gpu(self._gpu_request(container), timeout=GPU_CALL_TIMEOUT_S)
        except Unavailable as err:
            log.warning("pause of %s: %s; pausing without a GPU lock", container.id, err)
            return
        self._locked.add(container.id)
        if locked.cuda_pids:
            log.info("pause of %s: CUDA processes %s locked", container.id, list(locked.cuda_pids))

    async def pause_failed(self, container: Container) -> None:
        """runc pause failed after the lock: give the GPU back (best effort)."""
        if container.id in self._locked:
            try:
                await self.after_resume(container)
            except KybernateError as err:
                log.warning("pause of %s failed; unlocking its GPU failed too: %s", container.id, err)

    async def after_resume(self, container: Container) -> None:
        if container.id not in self._locked:
            return  # Pause took no lock (no agent then): nothing to unlock
        socket = agent_socket(container.spec, self._environ)
        try:
            async with AgentClient(socket) as client:
                unlocked = await client.unlock_gpu(self._gpu_request(container), timeout=GPU_CALL_TIMEOUT_S)
        except Unavailable as err:
            raise Unavailable(f"resume of {container.id}: thawed, but the GPU unlock failed: {err}; "
                              "its CUDA processes may still be locked") from None
        self._locked.discard(container.id)
        if unlocked.cuda_pids:
            log.info("resume of %s: CUDA processes %s unlocked", container.id, list(unlocked.cuda_pids))
