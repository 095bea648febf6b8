"""Checkpoint through the node agent, with the kill policy; GPU locks around Pause.

The agent runs the pipeline and streams one progress message per phase. What the
shim decides is what happens to the container when the pipeline does not finish:

| what the shim heard | container | error |
|---|---|---|
| nothing: the agent could not be reached | untouched | Unavailable naming the socket |
| the agent's refusal of the request (before ACCEPTED) | untouched | the agent's error |
| FAILED with UNTOUCHED, RESTORED or EXITED | as the agent says: as it was, or exited | the agent's error (CRIU's line) |
| FAILED with MUST_KILL; the stream broke; the agent hung past the deadline; a Kill arrived, all before RESUMED | SIGKILLed at once; the reaper publishes the exit | FailedPrecondition / Unavailable / DeadlineExceeded / Cancelled naming the phase and the kill |
| RESUMED, then no EXPORTED | running as before | the cause; the agent commits or fails the checkpoint on its own |

The shim asks the agent to end the stream at EXPORTED (images and metadata.json in
containerd's path): containerd keeps the task paused until Checkpoint returns, and the
agent's own commit (fsync, metadata.json, seal) needs no paused task.

Once the stream is open the agent may act on the container at any moment, and a
broken stream can lose its last messages: so without the agent's own word that the
container is back (RESUMED) or was never touched (a refusal, or FAILED saying so),
the container is taken to be CUDA-locked, frozen or half-seized by CRIU. Resuming
such processes is not safe; they are killed, never resumed. (A container that waits
for admission is untouched, frozen as containerd left it; it is killed all the same
if its agent dies then, since the shim cannot tell that wait from what follows.)

grpc is loaded by the agent client on first use: only a checkpoint or a pause with
an agent present pays for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from kybernate.api.client import AgentClient
from kybernate.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    KybernateError,
    NotFound,
    StatusCode,
    Unavailable,
    error_from_status,
)
from kybernate.shim.agent_settings import (
    POD_NAMESPACE_ANNOTATION,
    agent_checkpoint_options,
    agent_socket,
    checkpoint_settings,
    spec_annotations,
)
from kybernate.shim.cri_checkpoint import cri_checkpoint_dir

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
#: For LockGpu/UnlockGpu calls beyond the lock timeout itself.
GPU_CALL_TIMEOUT_S = 60.0
#: Retrying an unlock the agent could not take (it is down): from 0.5 s up to 30 s apart.
UNLOCK_RETRY_FIRST_S = 0.5
UNLOCK_RETRY_MAX_S = 30.0
#: The image reference containerd's CRI plugin records in the spec.
IMAGE_NAME_ANNOTATIONS = ("io.kubernetes.cri.image-name", "io.containerd.image.name")


def _phase_name(phase: int) -> str:
    from kybernate.protos import agent_pb2

    return agent_pb2.Phase.Name(phase) if phase else "none"


def _safe_after(phase: int) -> bool:
    """Whether the agent said the container is back (resumed as it was) or done with."""
    from kybernate.protos import agent_pb2

    return phase in (agent_pb2.RESUMED, agent_pb2.EXPORTED, agent_pb2.COMMITTED)


#: What gRPC says when the connection broke rather than the agent answering: after
#: them the shim cannot know how far the agent got (its last messages may be lost).
_TRANSPORT_FAILURES = frozenset({StatusCode.UNAVAILABLE, StatusCode.CANCELLED, StatusCode.UNKNOWN,
                                 StatusCode.DEADLINE_EXCEEDED})


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

        annotations = spec_annotations(container.spec)
        image_ref = next((annotations[k] for k in IMAGE_NAME_ANNOTATIONS if annotations.get(k)), "")
        return agent_pb2.CheckpointRequest(
            container_id=container.id, namespace=container.namespace, bundle=str(container.bundle),
            runc_root=container.runc.root, init_pid=container.pid,
            # containerd 2.x honours image_path for any runtime and then packs nothing.
            destination=options.image_path or path,
            options=agent_checkpoint_options(checkpoint_settings(container.spec), options),
            image_ref=image_ref, labels={"containerd.namespace": container.namespace},
            pod_namespace=annotations.get(POD_NAMESPACE_ANNOTATION, ""),
            # runc's shim hands CRIU this as its work directory; containerd 2.x's CRI
            # names it only to runc's runtime, so the shim finds CRI's own.
            work_path=options.work_path or str(cri_checkpoint_dir(container.spec, container.id) or ""),
            # containerd keeps the task paused until we return: the agent's commit
            # (fsync, seal) follows on its own once the task runs again.
            return_after_export=True)

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
            if run.undefined:
                await container.kill_everything()
                raise DeadlineExceeded(
                    f"checkpoint of {container.id}: no completion within {deadline_s:.0f}s (last phase "
                    f"{run.last_phase}); the container was killed") from None
            raise DeadlineExceeded(
                f"checkpoint of {container.id}: no completion within {deadline_s:.0f}s (last phase "
                f"{run.last_phase}); {run.condition()}") from None
        except asyncio.CancelledError:
            # A Kill aborted the checkpoint, or our caller went away.
            if run.undefined and not run.finished:
                log.warning("container %s: checkpoint cancelled after phase %s; killing it",
                            container.id, run.last_phase)
                await container.kill_everything()
            raise


class _CheckpointRun:
    """One checkpoint stream and what it said so far."""

    def __init__(self, container: Container, socket: Path) -> None:
        self.container = container
        self.socket = socket
        self.phase = 0
        # The stream was opened: from here on the agent may act on the container, and
        # only its own word (a FAILED message, a refusal, RESUMED) says otherwise.
        self.started = False
        self.committed = False
        # Committed, or failed with the kill policy applied: nothing left to do.
        self.finished = False
        self.failure: agent_pb2.CheckpointProgress | None = None

    @property
    def last_phase(self) -> str:
        return _phase_name(self.phase)

    @property
    def undefined(self) -> bool:
        """Whether the container must be killed if the pipeline ends here unannounced."""
        return self.started and not _safe_after(self.phase)

    def condition(self) -> str:
        """What the container is like now, for messages (when not undefined)."""
        if not self.started:
            return "the container was not touched"
        return ("the container was resumed as it was; the agent commits the checkpoint or marks it "
                "failed on its own")

    async def stream(self, request: agent_pb2.CheckpointRequest, connect_timeout_s: float) -> None:
        from kybernate.protos import agent_pb2

        container = self.container
        try:
            async with AgentClient(self.socket, connect_timeout=connect_timeout_s) as client:
                await client.connect()
                self.started = True
                async for progress in client.checkpoint(request):
                    if progress.phase == agent_pb2.FAILED:
                        self.failure = progress
                        continue
                    self.phase = progress.phase
                    log.info("checkpoint of %s: %s after %d ms%s", container.id, self.last_phase,
                             progress.elapsed_ms,
                             f" (CUDA pids {list(progress.cuda_pids)})" if progress.cuda_pids else "")
                    if progress.phase == agent_pb2.COMMITTED:
                        self.committed = self.finished = True
                        log.info("checkpoint of %s committed as %s at %s", container.id,
                                 progress.checkpoint_id, progress.local_path)
                    elif progress.phase == agent_pb2.EXPORTED and request.return_after_export:
                        # The images are in containerd's path; the agent commits its
                        # own copy once containerd has resumed the task.
                        self.committed = self.finished = True
                        log.info("checkpoint of %s exported as %s; the agent commits it next",
                                 container.id, progress.checkpoint_id)
        except KybernateError as err:
            await self._failed(err)
            return
        if self.failure is not None:  # a FAILED message, then a clean end: still a failure
            await self._failed(error_from_status(self.failure.error_code or StatusCode.INTERNAL,
                                                 self.failure.error_message))
        elif not self.finished:
            await self._failed(Unavailable("the stream ended before EXPORTED"))

    async def _failed(self, err: KybernateError) -> None:
        """Apply the kill policy to a pipeline that did not commit, then raise."""
        from kybernate.protos import agent_pb2

        container = self.container
        self.finished = True
        failure = self.failure
        if failure is None:
            if not self.started:
                raise Unavailable(f"checkpoint of {container.id}: {err} (container untouched)") from None
            if self.phase == 0 and err.code not in _TRANSPORT_FAILURES:
                # The agent's own answer to the request, before it began.
                raise err.with_message(f"checkpoint of {container.id} refused: {err}") from None
            if self.undefined:  # the stream broke with the container in the agent's hands
                await container.kill_everything()
                raise Unavailable(f"checkpoint of {container.id}: lost the kybernate agent at {self.socket} "
                                  f"after phase {self.last_phase} ({err}); the container was killed") from None
            raise Unavailable(f"checkpoint of {container.id}: lost the kybernate agent at {self.socket} "
                              f"after phase {self.last_phase} ({err}); {self.condition()}") from None
        state = failure.container_state
        message = failure.error_message or str(err)
        if state == agent_pb2.MUST_KILL:
            await container.kill_everything()
            raise FailedPrecondition(f"checkpoint of {container.id} failed after phase {self.last_phase}: "
                                     f"{message}; the container was killed")
        if state == agent_pb2.EXITED:
            raise err.with_message(f"checkpoint of {container.id} failed after phase {self.last_phase}: "
                                   f"{message}; the container had exited (CRIU stopped it)") from None
        # UNTOUCHED or RESTORED: the agent put it back; keep the agent's status code.
        where = "container untouched" if state == agent_pb2.UNTOUCHED else "container resumed as it was"
        raise err.with_message(f"checkpoint of {container.id} failed after phase {self.last_phase}: "
                               f"{message} ({where})") from None


class AgentGpuLock:
    """The service's pause hooks: lock CUDA before the freeze, unlock after the thaw.

    A frozen CUDA process cannot be locked (the lock needs its threads to run), so
    Pause takes the lock first. A node with no agent has no GPU lock to take: Pause
    then goes on with a warning. Whoever took the lock releases it on every path: an
    unlock the agent cannot take now (it is down or restarting) is retried in the
    background until it succeeds or the container is gone, and Resume says so.
    """

    def __init__(self, *, environ: Mapping[str, str] | None = None) -> None:
        self._environ = dict(os.environ if environ is None else environ)
        # Containers whose Pause took the agent's lock: only those need the unlock.
        self._locked: set[str] = set()
        self._retries: dict[str, asyncio.Task[None]] = {}

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
        """runc pause failed after the lock: give the GPU back."""
        if container.id in self._locked:
            try:
                await self.after_resume(container)
            except KybernateError as err:
                log.warning("pause of %s failed; unlocking its GPU failed too: %s", container.id, err)

    async def after_resume(self, container: Container) -> None:
        if container.id not in self._locked:
            return  # Pause took no lock (no agent then): nothing to unlock
        try:
            await self._unlock(container)
        except Unavailable as err:
            self._retry_unlock(container)
            raise Unavailable(f"resume of {container.id}: thawed, but the GPU unlock failed: {err}; "
                              "its CUDA processes stay locked until the agent answers (retrying)") from None

    async def _unlock(self, container: Container) -> None:
        socket = agent_socket(container.spec, self._environ)
        async with AgentClient(socket) as client:
            unlocked = await client.unlock_gpu(self._gpu_request(container), timeout=GPU_CALL_TIMEOUT_S)
        self._locked.discard(container.id)
        if unlocked.cuda_pids:
            log.info("container %s: CUDA processes %s unlocked", container.id, list(unlocked.cuda_pids))

    def _retry_unlock(self, container: Container) -> None:
        if container.id in self._retries:
            return
        task = asyncio.get_running_loop().create_task(self._unlock_until_done(container),
                                                      name=f"gpu-unlock-{container.id}")
        self._retries[container.id] = task
        task.add_done_callback(lambda _: self._retries.pop(container.id, None))

    async def _unlock_until_done(self, container: Container) -> None:
        delay = UNLOCK_RETRY_FIRST_S
        while container.id in self._locked:
            await asyncio.sleep(delay)
            if container.pid <= 0 or not os.path.exists(f"/proc/{container.pid}"):
                self._locked.discard(container.id)  # the container is gone, and its lock with it
                return
            try:
                await self._unlock(container)
            except (NotFound, FailedPrecondition) as err:  # nothing left to unlock
                log.warning("container %s: GPU unlock: %s", container.id, err)
                self._locked.discard(container.id)
                return
            except KybernateError as err:
                log.info("container %s: GPU unlock still failing (%s); retrying", container.id, err)
            delay = min(delay * 2, UNLOCK_RETRY_MAX_S)

    async def close(self) -> None:
        for task in list(self._retries.values()):
            task.cancel()
        await asyncio.gather(*self._retries.values(), return_exceptions=True)
