"""Restore through the node agent: the `RestoreStrategy` the shim runs at Start.

Where the checkpoint comes from is `restore_source`'s; the writable layer saved with
it is applied by `rootfs_diff`.

At Start, in this order, and Running only when all of it succeeded:
1. PrepareRestore: the agent authorizes, verifies metadata.json, every checksum, the
   CRIU version and the GPU fit, and fetches a registry checkpoint from S3 if needed;
2. the writable layer saved with the checkpoint (`rootfs-diff.tar`) goes into the
   rootfs, confined to it (`kybernate.shim.rootfs_diff`), unless containerd already
   applied one (`--rw`);
3. `runc restore --detach` from the verified directory (runc keeps its state, so
   exec, kill and delete keep working; the restored init is the shim's child);
4. CompleteRestore: CUDA restore and unlock of the restored processes.
A failure after 3 kills what was restored, force-deletes it in runc and fails Start
with the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kybernate.api.client import AgentClient
from kybernate.errors import FailedPrecondition, KybernateError
from kybernate.oci import load_spec
from kybernate.runtime.container import kill_everything
from kybernate.shim import rootfs_diff, verification_gate
from kybernate.shim.agent_settings import (
    POD_NAMESPACE_ANNOTATION,
    agent_socket,
    restore_lazy,
    spec_annotations,
)
from kybernate.shim.lazy_pages import LazyPagesDaemon
from kybernate.shim.restore_source import containerd_checkpoint_dir, prepare_request

if TYPE_CHECKING:
    from kybernate.protos import agent_pb2
    from kybernate.runtime.process import InitProcess
    from kybernate.runtime.stdio import ProcessIO

log = logging.getLogger(__name__)

#: PrepareRestore may download a checkpoint from S3: give it time.
PREPARE_TIMEOUT_S = 1800.0
COMPLETE_TIMEOUT_S = 600.0


class AgentRestore:
    """`RestoreStrategy` that verifies with the agent, restores with runc, and hands
    the GPU state back through the agent before the task is reported running."""

    def __init__(self, *, environ: Mapping[str, str] | None = None,
                 connect_timeout_s: float = 3.0) -> None:
        self._environ = dict(os.environ if environ is None else environ)
        self._connect_timeout_s = connect_timeout_s
        # Lazy restores whose daemon still brings memory in; the tasks that outlive a
        # restore (daemon supervisors, removal of containerd's copy).
        self._lazy_images: set[str] = set()
        self._supervisors: set[asyncio.Task[None]] = set()
        self._releasing: dict[str, asyncio.Task[None]] = {}

    async def restore(self, process: InitProcess) -> int:
        source = process.checkpoint_dir
        if not source:
            raise FailedPrecondition(f"{process.id}: no checkpoint to restore from")
        spec = load_spec(process.bundle)
        prepare = prepare_request(source, process.namespace,
                                  spec_annotations(spec).get(POD_NAMESPACE_ANNOTATION, ""))
        prepare.container_id = process.id
        lazy = restore_lazy(spec)
        if lazy is not None:
            prepare.lazy_pages = lazy
        socket = agent_socket(spec, self._environ)
        try:
            return await self._restore(process, prepare, socket)
        finally:
            self._start_release(process)

    def _start_release(self, process: InitProcess) -> None:
        """Remove containerd's copy in the background: deleting GBs of page cache takes
        a while, not on the way to Running (Delete awaits it)."""
        if process.id in self._releasing:
            return
        removal = self._in_background(self._remove_copy(process), f"release-{process.id}")
        self._releasing[process.id] = removal
        removal.add_done_callback(lambda _: self._releasing.pop(process.id, None))

    def _in_background(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._supervisors.add(task)
        task.add_done_callback(self._supervisors.discard)
        return task

    async def release(self, process: InitProcess) -> None:
        """Remove containerd's temporary copy of the images once it is consumed (or the
        container is deleted): containerd 1.7 never does. A removal the restore left
        running in the background is awaited."""
        pending = self._releasing.get(process.id)
        if pending is not None:
            await asyncio.wait([pending])
            return
        await self._remove_copy(process)

    async def _remove_copy(self, process: InitProcess) -> None:
        if process.id in self._lazy_images:
            return  # a lazy-pages daemon still reads it; removed when it is done
        directory = containerd_checkpoint_dir(process.checkpoint_dir)
        if directory is not None and directory.is_dir():
            await asyncio.to_thread(shutil.rmtree, directory, True)
            log.info("restore of %s: removed containerd's checkpoint copy %s", process.id, directory)

    async def _restore(self, process: InitProcess, prepare: agent_pb2.PrepareRestoreRequest,
                       socket: Path) -> int:
        from kybernate.protos import agent_pb2

        source = process.checkpoint_dir
        work_path = Path(process.criu_work_path or process.bundle / "criu-restore")
        # The pages may be hashed while CRIU restores when the shim can hold the
        # restored tasks until that hash matched (verification_gate.py).
        prepare.defer_pages = verification_gate.usable(load_spec(process.bundle), work_path)
        async with AgentClient(socket, connect_timeout=self._connect_timeout_s) as client:
            prepared = await client.prepare_restore(prepare, timeout=PREPARE_TIMEOUT_S)
            image_dir = Path(prepared.image_dir)
            metadata = _metadata(prepared)
            copy = containerd_checkpoint_dir(source)
            if copy is not None and not image_dir.resolve().is_relative_to(copy.resolve()):
                # The agent restores its sealed copy instead: containerd's is not needed,
                # and the memory its page cache holds is what CRIU is about to allocate.
                self._start_release(process)
            log.info("restore of %s: checkpoint %s verified at %s%s", process.id,
                     prepared.checkpoint_id or source, image_dir,
                     f" (still hashing {', '.join(prepared.deferred_files)})" if prepared.verification_id else "")
            await asyncio.to_thread(rootfs_diff.apply_saved_layer, image_dir, process.bundle / "rootfs")
            if prepared.lazy_pages:
                pid = await self._lazy_restore(process, image_dir, work_path, metadata.get("options") or {})
            elif prepared.verification_id:
                pid = await self._gated_restore(process, client, prepared, work_path, metadata)
            else:
                pid = await self._runc_restore(process, image_dir, work_path, metadata.get("options") or {})
            try:
                completed = await client.complete_restore(
                    agent_pb2.CompleteRestoreRequest(container_id=process.id, init_pid=pid,
                                                     gpu_map=dict(prepared.gpu_map)),
                    timeout=COMPLETE_TIMEOUT_S)
            except BaseException as err:
                await _undo_restore(process, pid)
                if isinstance(err, KybernateError):
                    raise err.with_message(f"restore of {process.id}: GPU restore failed: {err}; "
                                           "the restored processes were killed") from None
                raise
        if completed.cuda_pids:
            log.info("restore of %s: CUDA processes %s restored and unlocked", process.id,
                     list(completed.cuda_pids))
        return pid

    async def _gated_restore(self, process: InitProcess, client: AgentClient,
                             prepared: agent_pb2.PrepareRestoreResponse, work_path: Path,
                             metadata: Mapping[str, Any]) -> int:
        """`runc restore` whose restored tasks wait in CRIU's post-restore step until the
        agent's verification of the deferred files answered; a mismatch makes CRIU
        kill them, and Start fails naming the file."""
        from kybernate.protos import agent_pb2

        gate = verification_gate.VerificationGate(process.bundle, work_path)

        async def verdict() -> None:
            try:
                await client.await_verification(
                    agent_pb2.AwaitVerificationRequest(verification_id=prepared.verification_id),
                    timeout=PREPARE_TIMEOUT_S)
            except BaseException:
                gate.decide(False)
                raise
            gate.decide(True)

        await asyncio.to_thread(gate.install)
        verifying = asyncio.create_task(verdict(), name=f"verify-{process.id}")
        try:
            pid = await self._runc_restore(process, Path(prepared.image_dir), work_path,
                                           metadata.get("options") or {})
        except BaseException as err:
            if verifying.done() and not verifying.cancelled() and verifying.exception() is not None:
                failed = verifying.exception()
                assert isinstance(failed, BaseException)
                if isinstance(failed, KybernateError):
                    raise failed.with_message(f"restore of {process.id}: {failed}; CRIU killed the"
                                              " restored processes before they ran") from None
                raise failed from err
            raise
        finally:
            held = gate.held()
            if not verifying.done():
                verifying.cancel()
            await asyncio.gather(verifying, return_exceptions=True)
            await asyncio.to_thread(gate.uninstall)
        if not held or verifying.cancelled() or verifying.exception() is not None:
            # runc returned without CRIU holding the tasks for the verdict: they may
            # have run on unverified pages, so they do not run on.
            await _undo_restore(process, pid)
            raise FailedPrecondition(f"restore of {process.id}: the restored tasks did not wait for the"
                                     " verification of the pages images; they were killed")
        return pid

    async def _lazy_restore(self, process: InitProcess, image_dir: Path, work_path: Path,
                            options: Mapping[str, Any]) -> int:
        """`runc restore --lazy-pages` with a lazy-pages daemon serving the memory; the
        daemon is supervised until it has copied every page (see lazy_pages.py)."""
        daemon = LazyPagesDaemon(process.runc.reaper, image_dir, work_path)
        await daemon.start()
        try:
            pid = await self._runc_restore(process, image_dir, work_path, options, lazy_pages=True)
        except BaseException:
            await daemon.stop()
            raise
        log.info("restore of %s: running (pid %d) while criu lazy-pages (pid %d) brings its memory in",
                 process.id, pid, daemon.pid)

        async def page_source_failed(reason: str) -> None:
            log.error("container %s: %s; killing it (its memory can no longer arrive)", process.id, reason)
            await kill_everything(process.id, pid, process.runc)

        async def supervise() -> None:
            try:
                status = await daemon.supervise(page_source_failed)
                if status == 0:
                    log.info("restore of %s: every page is in (criu lazy-pages exited 0)", process.id)
            finally:
                self._lazy_images.discard(process.id)
                await self._remove_copy(process)

        self._lazy_images.add(process.id)  # containerd's copy stays until the daemon is done
        self._in_background(supervise(), f"lazy-pages-{process.id}")
        return pid

    async def _runc_restore(self, process: InitProcess, image_dir: Path, work_path: Path,
                            options: Mapping[str, Any], *, lazy_pages: bool = False) -> int:
        work_path.mkdir(parents=True, exist_ok=True)

        async def run_restore(console_socket: str | None, io: ProcessIO | None) -> None:
            # The dump's options decide what the restore must be told (runc's rule too).
            await process.runc.restore(
                process.id, str(process.bundle), image_path=str(image_dir), work_path=str(work_path),
                pid_file=str(process.pid_file), console_socket=console_socket, io=io, detach=True,
                no_pivot=process.no_pivot_root, tcp_established=bool(options.get("open_tcp")),
                ext_unix_sk=bool(options.get("external_unix_sockets")),
                file_locks=bool(options.get("file_locks")), lazy_pages=lazy_pages)

        try:
            return await process.launch(run_restore)
        except BaseException as err:
            # runc may have got as far as a restored (or half-restored) container.
            await _undo_restore(process, 0)
            if isinstance(err, KybernateError):
                criu_line = _first_criu_error(work_path / "restore.log")
                raise err.with_message(f"restore of {process.id}: {err}"
                                       + (f"; CRIU: {criu_line}" if criu_line else "")) from None
            raise


def _metadata(prepared: agent_pb2.PrepareRestoreResponse) -> dict[str, Any]:
    try:
        document = json.loads(prepared.metadata_json or "{}")
    except ValueError as err:
        raise FailedPrecondition(f"restore: the agent's metadata is not JSON: {err}") from None
    return document if isinstance(document, dict) else {}


def _first_criu_error(log_path: Path) -> str:
    """CRIU's first meaningful error line of its restore log ("" when there is none):
    the later ones are usually its consequences (the restorer tearing down)."""
    from kybernate.criu.logparse import parse_criu_log  # only on this failure path

    return parse_criu_log(log_path) or ""


async def _undo_restore(process: InitProcess, pid: int) -> None:
    """Leave nothing of a failed restore running: SIGKILL every restored process
    (thawing so frozen ones die), force-delete in runc, drop the pid file."""
    await kill_everything(process.id, pid, process.runc)
    try:
        await process.runc.delete(process.id, force=True)
    except KybernateError as err:
        log.debug("restore of %s: runc delete --force after failure: %s", process.id, err)
    with contextlib.suppress(FileNotFoundError):
        process.pid_file.unlink()


