"""The process state machines: the transition table cell by cell, the process objects
obeying it, and real runc runs of init and exec processes with busybox bundles."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kybernate.errors import FailedPrecondition, KybernateError, NotFound
from kybernate.runtime.process import (
    EXEC_OPERATIONS,
    EXEC_STATES,
    UNKNOWN_EXIT_STATUS,
    ExecProcess,
    Ignore,
    InitProcess,
    Operation,
    Proceed,
    ProcessKind,
    ProcessState,
    Refuse,
    Stdio,
    transition_rule,
)
from kybernate.runtime.reaper import Reaper
from kybernate.runtime.runc import Runc

from tests.support.runc_sandbox import RuncSandbox, runc_sandbox, with_reaper

S = ProcessState
Op = Operation

# -- the table, written out as the specification -------------------------------------
#
# One row per state, one column per operation. A state name: proceeds and leads
# there; "ok": proceeds, state unchanged; "FP"/"NF": refused with FailedPrecondition /
# NotFound; "--": silently ignored.

INIT_COLUMNS = (Op.START, Op.KILL, Op.KILL_ALL, Op.DELETE, Op.PAUSE, Op.RESUME, Op.UPDATE,
                Op.CHECKPOINT, Op.RESIZE, Op.CLOSE_IO, Op.EXEC, Op.SET_EXITED)
INIT_EXPECTED = {
    #            start    kill kill_all delete  pause   resume   update chkpt resize close exec set_exited
    S.CREATED: "RUNNING   ok   ok       DELETED FP      FP       ok     FP    ok     ok    ok   STOPPED",
    S.RUNNING: "FP        ok   ok       FP      PAUSED  FP       ok     ok    ok     ok    ok   STOPPED",
    S.PAUSING: "FP        ok   ok       FP      FP      FP       FP     FP    ok     ok    FP   STOPPED",
    S.PAUSED:  "FP        ok   ok       FP      FP      RUNNING  ok     ok    ok     ok    FP   STOPPED",
    S.CHECKPOINTING:
               "FP        ok   ok       FP      FP      FP       FP     FP    ok     ok    FP   STOPPED",
    S.STOPPED: "FP        NF   ok       DELETED FP      FP       FP     FP    FP     ok    FP   --",
    S.DELETED: "FP        NF   NF       FP      FP      FP       FP     FP    FP     FP    FP   --",
}
# An init created from a checkpoint has nothing running until its restore (Start).
RESTORING_CREATED = "RUNNING FP FP DELETED FP FP FP FP FP ok FP STOPPED"

EXEC_COLUMNS = EXEC_OPERATIONS
EXEC_EXPECTED = {
    #            start    kill  delete   resize  close  set_exited
    S.CREATED: "RUNNING   FP    DELETED  ok      ok     STOPPED",
    S.RUNNING: "FP        ok    FP       ok      ok     STOPPED",
    S.STOPPED: "FP        NF    DELETED  FP      ok     --",
    S.DELETED: "FP        NF    FP       FP      FP     --",
}


def _describe(rule: Any) -> str:
    if isinstance(rule, Ignore):
        return "--"
    if isinstance(rule, Refuse):
        return {FailedPrecondition: "FP", NotFound: "NF"}[rule.error]
    assert isinstance(rule, Proceed)
    return rule.then.name if rule.then is not None else "ok"


def _cells() -> Iterator[tuple[ProcessKind, ProcessState, Operation, str]]:
    for state, row in INIT_EXPECTED.items():
        for op, want in zip(INIT_COLUMNS, row.split(), strict=True):
            yield ProcessKind.INIT, state, op, want
            if state is not S.CREATED:
                yield ProcessKind.RESTORING_INIT, state, op, want
    for op, want in zip(INIT_COLUMNS, RESTORING_CREATED.split(), strict=True):
        yield ProcessKind.RESTORING_INIT, S.CREATED, op, want
    for state, row in EXEC_EXPECTED.items():
        for op, want in zip(EXEC_COLUMNS, row.split(), strict=True):
            yield ProcessKind.EXEC, state, op, want


CELLS = list(_cells())


def test_spec_covers_every_state_and_operation() -> None:
    assert set(INIT_COLUMNS) == set(Operation)
    assert set(INIT_EXPECTED) == set(ProcessState)
    assert set(EXEC_EXPECTED) == set(EXEC_STATES)
    assert len(CELLS) == 2 * len(ProcessState) * len(Operation) + len(EXEC_STATES) * len(EXEC_OPERATIONS)


@pytest.mark.parametrize(("kind", "state", "op", "want"), CELLS,
                         ids=[f"{k.name}-{s.name}-{o.name}" for k, s, o, _ in CELLS])
def test_transition_table_cell(kind: ProcessKind, state: ProcessState, op: Operation,
                               want: str) -> None:
    rule = transition_rule(kind, state, op)
    assert _describe(rule) == want
    if isinstance(rule, Refuse):
        assert rule.message, "a refusal must say why"


def test_pause_passes_through_pausing() -> None:
    rule = transition_rule(ProcessKind.INIT, S.RUNNING, Op.PAUSE)
    assert rule == Proceed(during=S.PAUSING, then=S.PAUSED)


def test_refusals_read_like_runc_shim() -> None:
    def message(kind: ProcessKind, state: ProcessState, op: Operation) -> str:
        rule = transition_rule(kind, state, op)
        assert isinstance(rule, Refuse)
        return rule.message

    assert message(ProcessKind.INIT, S.STOPPED, Op.START) == "cannot start a stopped process"
    assert message(ProcessKind.INIT, S.RUNNING, Op.DELETE) == "cannot delete a running process"
    assert message(ProcessKind.INIT, S.PAUSED, Op.EXEC) == "cannot exec in a paused state"
    assert message(ProcessKind.INIT, S.STOPPED, Op.KILL) == "process already finished"
    assert message(ProcessKind.EXEC, S.STOPPED, Op.KILL) == "process already finished"
    assert message(ProcessKind.RESTORING_INIT, S.CREATED, Op.EXEC) == "cannot exec in a created state"


def test_exec_asked_an_init_operation_is_refused() -> None:
    rule = transition_rule(ProcessKind.EXEC, S.RUNNING, Op.PAUSE)
    assert isinstance(rule, Refuse) and rule.error is FailedPrecondition


# -- the process objects obey the table (runc replaced by a recorder) ----------------


class RecordingRunc:
    """Stands in for Runc: records the subcommands it was asked to run."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Callable[..., Awaitable[None]]:
        async def record(*args: Any, **kwargs: Any) -> None:
            self.calls.append(name)
        return record


INIT_RUNC_CALL = {Op.START: "start", Op.KILL: "kill", Op.KILL_ALL: "kill", Op.DELETE: "delete",
                  Op.PAUSE: "pause", Op.RESUME: "resume", Op.UPDATE: "update"}


async def _apply(process: InitProcess | ExecProcess, op: Operation) -> None:
    if op is Op.START:
        await process.start()
    elif op is Op.KILL:
        await process.kill(signal.SIGTERM)
    elif op is Op.KILL_ALL:
        assert isinstance(process, InitProcess)
        await process.kill(signal.SIGTERM, all=True)
    elif op is Op.DELETE:
        await process.delete()
    elif op is Op.PAUSE:
        assert isinstance(process, InitProcess)
        await process.pause()
    elif op is Op.RESUME:
        assert isinstance(process, InitProcess)
        await process.resume()
    elif op is Op.UPDATE:
        assert isinstance(process, InitProcess)
        await process.update({"cpu": {"shares": 512}})
    elif op is Op.CHECKPOINT:
        assert isinstance(process, InitProcess)
        await process.checkpoint(_noop)
    elif op is Op.RESIZE:
        await process.resize(80, 24)
    elif op is Op.CLOSE_IO:
        await process.close_io()
    elif op is Op.EXEC:
        assert isinstance(process, InitProcess)
        await process.admit_exec()
    elif op is Op.SET_EXITED:
        await process.set_exited(3, datetime.datetime.now(datetime.UTC))


async def _noop() -> None:
    return None


INIT_OBJECT_CELLS = [(s, o, w) for k, s, o, w in CELLS if k is ProcessKind.INIT]


@pytest.mark.parametrize(("state", "op", "want"), INIT_OBJECT_CELLS,
                         ids=[f"{s.name}-{o.name}" for s, o, _ in INIT_OBJECT_CELLS])
def test_init_process_follows_table(state: ProcessState, op: Operation, want: str,
                                    tmp_path: Path) -> None:
    async def body() -> None:
        runc = RecordingRunc()
        process = InitProcess(id="c1", bundle=tmp_path, runc=runc,  # type: ignore[arg-type]
                              stdio=Stdio(), namespace="test")
        process._pid = 4242
        process._state = state
        if want in ("FP", "NF"):
            with pytest.raises(KybernateError) as raised:
                await _apply(process, op)
            assert type(raised.value) is (FailedPrecondition if want == "FP" else NotFound)
            assert process.state is state
            assert runc.calls == []
            return
        await _apply(process, op)
        expected_state = {"ok": state, "--": state}.get(want) or S[want]
        assert process.state is expected_state
        if want != "--" and op in INIT_RUNC_CALL:
            assert runc.calls == [INIT_RUNC_CALL[op]]
        if op is Op.SET_EXITED and want != "--":
            assert (await process.wait()).status == 3

    asyncio.run(body())


# Starting and signalling an exec need a real process: covered with runc below.
EXEC_OBJECT_CELLS = [(s, o, w) for k, s, o, w in CELLS
                     if k is ProcessKind.EXEC and not (o is Op.START and s is S.CREATED)
                     and not (o is Op.KILL and s is S.RUNNING)]


@pytest.mark.parametrize(("state", "op", "want"), EXEC_OBJECT_CELLS,
                         ids=[f"{s.name}-{o.name}" for s, o, _ in EXEC_OBJECT_CELLS])
def test_exec_process_follows_table(state: ProcessState, op: Operation, want: str,
                                    tmp_path: Path) -> None:
    async def body() -> None:
        runc = RecordingRunc()
        parent = InitProcess(id="c1", bundle=tmp_path, runc=runc,  # type: ignore[arg-type]
                             stdio=Stdio(), namespace="test")
        process = ExecProcess(id="e1", container_id="c1", parent=parent,
                              runc=runc, spec={"args": ["true"]},  # type: ignore[arg-type]
                              stdio=Stdio(), namespace="test", work_dir=tmp_path)
        process._state = state
        if want in ("FP", "NF"):
            with pytest.raises(KybernateError) as raised:
                await _apply(process, op)
            assert type(raised.value) is (FailedPrecondition if want == "FP" else NotFound)
            assert process.state is state
            return
        await _apply(process, op)
        expected_state = {"ok": state, "--": state}.get(want) or S[want]
        assert process.state is expected_state

    asyncio.run(body())


def test_running_exec_reports_its_container_paused(tmp_path: Path) -> None:
    async def body() -> None:
        runc = RecordingRunc()
        parent = InitProcess(id="c1", bundle=tmp_path, runc=runc,  # type: ignore[arg-type]
                             stdio=Stdio(), namespace="test")
        process = ExecProcess(id="e1", container_id="c1", parent=parent,
                              runc=runc, spec={"args": ["true"]},  # type: ignore[arg-type]
                              stdio=Stdio(), namespace="test", work_dir=tmp_path)
        parent._state = process._state = S.RUNNING
        await parent.pause()
        assert process.state is S.PAUSED
        await process.set_exited(0)
        assert process.state is S.STOPPED

    asyncio.run(body())


def test_failed_pause_returns_to_running(tmp_path: Path) -> None:
    class FailingPause(RecordingRunc):
        async def pause(self, id: str) -> None:
            raise FailedPrecondition("freezer refused")

    async def body() -> None:
        process = InitProcess(id="c1", bundle=tmp_path, runc=FailingPause(),  # type: ignore[arg-type]
                              stdio=Stdio(), namespace="test")
        process._state = S.RUNNING
        with pytest.raises(FailedPrecondition, match="freezer refused"):
            await process.pause()
        assert process.state is S.RUNNING

    asyncio.run(body())


def test_restore_strategy_runs_at_start_of_checkpointed_init(tmp_path: Path) -> None:
    class FakeRestore:
        def __init__(self) -> None:
            self.restored: list[str] = []

        async def restore(self, process: InitProcess) -> int:
            self.restored.append(process.checkpoint_dir)
            return 31337

    async def body() -> None:
        strategy = FakeRestore()
        runc = RecordingRunc()
        process = InitProcess(id="c1", bundle=tmp_path, runc=runc,  # type: ignore[arg-type]
                              stdio=Stdio(), namespace="test", checkpoint=str(tmp_path / "img"),
                              restore_strategy=strategy)
        await process.create()
        assert process.pid == 0 and runc.calls == []  # nothing runs at create
        assert process.kind is ProcessKind.RESTORING_INIT
        with pytest.raises(FailedPrecondition, match="cannot exec in a created state"):
            await process.admit_exec()
        assert await process.start() == 31337
        assert strategy.restored == [str(tmp_path / "img")]
        assert process.state is S.RUNNING and process.kind is ProcessKind.INIT
        assert runc.calls == []

    asyncio.run(body())


# -- real runc -------------------------------------------------------------------------


@pytest.fixture
def sandbox() -> Iterator[RuncSandbox]:
    with runc_sandbox("proc") as box:
        yield box


async def _runc_status(runc: Runc, cid: str) -> str:
    return str((await runc.state(cid))["status"])


def with_sleeping_init(sandbox: RuncSandbox,
                       body: Callable[[Reaper, Runc, InitProcess], Awaitable[None]]) -> None:
    """Run `body` with an init of `sleep 1000` in a new bundle, not yet created."""
    cid, bundle = sandbox.new_bundle(["sleep", "1000"])

    async def run(reaper: Reaper) -> None:
        runc = sandbox.runc(reaper, bundle)
        await body(reaper, runc, InitProcess(id=cid, bundle=bundle, runc=runc, namespace="test",
                                             stdio=Stdio()))

    with_reaper(run)


def test_init_runs_to_exit_with_output(sandbox: RuncSandbox) -> None:
    cid, bundle = sandbox.new_bundle(["sh", "-c", "read line; echo got $line; exit 3"])
    out = sandbox.dir / "out.log"
    fifo = sandbox.dir / "stdin"
    os.mkfifo(fifo)

    async def body(reaper: Reaper) -> None:
        runc = sandbox.runc(reaper, bundle)
        process = InitProcess(id=cid, bundle=bundle, runc=runc, namespace="test",
                              stdio=Stdio(stdin=str(fifo), stdout=f"file://{out}"))
        # The client's side of the stdin FIFO (containerd holds it open the same way).
        writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
        try:
            await process.create()
            assert process.pid > 0 and process.state is S.CREATED
            assert await _runc_status(runc, cid) == "created"
            assert await process.start() == process.pid
            assert process.state is S.RUNNING
            os.write(writer, b"hello\n")
            exit_ = await reaper.wait_for(process.pid, timeout=20)
            await process.set_exited(exit_.status, exit_.at)
        finally:
            os.close(writer)
        assert process.state is S.STOPPED
        waited = await process.wait()
        assert (waited.pid, waited.status) == (process.pid, 3)
        with pytest.raises(FailedPrecondition, match="cannot start a stopped process"):
            await process.start()
        deleted = await process.delete()
        assert deleted.status == 3 and process.state is S.DELETED
        with pytest.raises(NotFound):
            await runc.state(cid)
        assert out.read_text() == "got hello\n"

    with_reaper(body)


def test_init_pause_resume_kill(sandbox: RuncSandbox) -> None:
    async def body(reaper: Reaper, runc: Runc, process: InitProcess) -> None:
        cid = process.id
        await process.create()
        await process.start()
        await process.pause()
        assert process.state is S.PAUSED
        assert await _runc_status(runc, cid) == "paused"
        with pytest.raises(FailedPrecondition, match="cannot delete a paused process"):
            await process.delete()
        await process.resume()
        assert await _runc_status(runc, cid) == "running"
        await process.update({"pids": {"limit": 64}})
        await process.kill(signal.SIGKILL)
        exit_ = await reaper.wait_for(process.pid, timeout=20)
        await process.set_exited(exit_.status, exit_.at)
        assert (await process.wait()).status == 128 + signal.SIGKILL
        with pytest.raises(NotFound, match="process already finished"):
            await process.kill(signal.SIGTERM)
        await process.delete()

    with_sleeping_init(sandbox, body)


def test_exec_in_running_init(sandbox: RuncSandbox) -> None:
    out = sandbox.dir / "exec.log"

    async def body(reaper: Reaper, runc: Runc, init: InitProcess) -> None:
        cid = init.id
        await init.create()
        await init.start()
        exec_ = ExecProcess(id="probe", container_id=cid, parent=init, runc=runc,
                            spec={"args": ["sh", "-c", "echo in-container; exit 7"], "cwd": "/",
                                  "env": ["PATH=/bin:/usr/bin"]},
                            stdio=Stdio(stdout=f"file://{out}"), namespace="test",
                            work_dir=sandbox.dir)
        pid = await exec_.start()
        assert pid > 0 and pid != init.pid
        exit_ = await reaper.wait_for(pid, timeout=20)
        await exec_.set_exited(exit_.status, exit_.at)
        assert (await exec_.wait()).status == 7
        with pytest.raises(NotFound, match="process already finished"):
            await exec_.kill(signal.SIGKILL)
        await exec_.delete()
        assert out.read_text() == "in-container\n"
        await init.kill(signal.SIGKILL)
        init_exit = await reaper.wait_for(init.pid, timeout=20)
        await init.set_exited(init_exit.status, init_exit.at)
        await init.delete()

    with_sleeping_init(sandbox, body)


def test_delete_of_created_init_releases_waiters(sandbox: RuncSandbox) -> None:
    async def body(reaper: Reaper, runc: Runc, process: InitProcess) -> None:
        cid = process.id
        await process.create()
        waiting = asyncio.ensure_future(process.wait())
        deleted = await process.delete()
        assert deleted.status == UNKNOWN_EXIT_STATUS
        assert (await asyncio.wait_for(waiting, 5)).status == UNKNOWN_EXIT_STATUS
        # runc delete killed the created init.
        await reaper.wait_for(process.pid, timeout=20)
        with pytest.raises(NotFound):
            await runc.state(cid)

    with_sleeping_init(sandbox, body)


# -- a checkpoint runs without the lock; Kill aborts it --------------------------------


def test_kill_aborts_a_checkpoint_in_flight(tmp_path: Path) -> None:
    """A checkpoint waiting on a hung agent holds no lock: Pause and Exec are refused at
    once, Kill cancels the checkpoint (which fails with Cancelled, saying why) and then
    signals; the process is back in the state it came from."""
    async def body() -> None:
        runc = RecordingRunc()
        process = InitProcess(id="c1", bundle=tmp_path, runc=runc,  # type: ignore[arg-type]
                              stdio=Stdio(), namespace="test")
        process._pid = 4242
        process._state = S.PAUSED
        hung = asyncio.Event()
        cancelled = asyncio.Event()

        async def hung_checkpoint() -> None:
            hung.set()
            try:
                await asyncio.Event().wait()  # the agent never answers
            except asyncio.CancelledError:
                cancelled.set()  # where the kill policy runs
                raise

        checkpoint = asyncio.create_task(process.checkpoint(hung_checkpoint))
        await hung.wait()
        assert process.state is S.CHECKPOINTING and process.reported_state is S.PAUSED
        for refused in (process.resume(), process.update({}), process.admit_exec(),
                        process.checkpoint(_noop)):
            with pytest.raises(FailedPrecondition, match="checkpoint"):
                await asyncio.wait_for(refused, 1)
        await asyncio.wait_for(process.kill(signal.SIGKILL), 1)
        assert cancelled.is_set()
        assert runc.calls == ["kill"]
        with pytest.raises(KybernateError, match="abandoned: signal 9") as raised:
            await checkpoint
        assert raised.value.code == 1  # Cancelled
        assert process.state is S.PAUSED

    asyncio.run(body())


def test_an_exit_during_a_checkpoint_is_kept(tmp_path: Path) -> None:
    """CRIU's `exit` stops the tasks during the dump: the process ends STOPPED."""
    async def body() -> None:
        process = InitProcess(id="c1", bundle=tmp_path, runc=RecordingRunc(),  # type: ignore[arg-type]
                              stdio=Stdio(), namespace="test")
        process._pid = 4242
        process._state = S.RUNNING

        async def dump_with_exit() -> None:
            await process.set_exited(137)

        await process.checkpoint(dump_with_exit)
        assert process.state is S.STOPPED and (await process.wait()).status == 137

    asyncio.run(body())


def test_a_kill_that_finds_the_aborted_checkpoints_victim_gone_succeeds(tmp_path: Path) -> None:
    async def body() -> None:
        class GoneRunc(RecordingRunc):
            async def kill(self, *args: Any, **kwargs: Any) -> None:
                from kybernate.runtime.runc import ProcessNotFound
                raise ProcessNotFound("container not running")

        process = InitProcess(id="c1", bundle=tmp_path, runc=GoneRunc(),  # type: ignore[arg-type]
                              stdio=Stdio(), namespace="test")
        process._pid = 4242
        process._state = S.RUNNING
        started = asyncio.Event()

        async def checkpoint_then_policy_kills() -> None:
            started.set()
            await asyncio.Event().wait()

        task = asyncio.create_task(process.checkpoint(checkpoint_then_policy_kills))
        await started.wait()
        await process.kill(signal.SIGTERM)  # no NotFound: the abort's kill got there first
        with pytest.raises(KybernateError):
            await task
        with pytest.raises(NotFound):  # without a checkpoint to abort, it is an error as ever
            await process.kill(signal.SIGTERM)

    asyncio.run(body())
