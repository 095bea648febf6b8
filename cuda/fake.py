"""A CUDA backend for machines without a GPU that keeps the driver's state machine and
its pitfalls, shared through files so that the agent (which drives it) and the tests
(which inspect it) can be different processes.

It ships with the product on purpose: the agent's `cuda.backend = "fake"` is how the
integration tests, the benchmarks and GPU-less demos drive containers through the real
agent, containerd, runc and CRIU with the GPU ordering in place. Nothing selects it
unless the agent's configuration names it.

- A process is a CUDA process when its environment holds KYBERNATE_FAKE_CUDA=<token>.
  State is kept per token, not per pid: after a CRIU restore the pid changes but the
  environment does not, just as the real driver state travels inside the images.
- A process becomes known to the fake the first time a call names it; from then on
  it holds KYBERNATE_FAKE_CUDA_MEM bytes (default 256 MiB) on the GPU named by
  KYBERNATE_FAKE_CUDA_GPU (default: the first GPU) until it is checkpointed. Its CUDA
  state covers every GPU it can see, as the driver's does: those listed (comma
  separated) in KYBERNATE_FAKE_CUDA_VISIBLE, else every GPU of the fake inventory.
- A restore follows the driver's rules for GPU pairs: a map that moves nothing is no
  map; otherwise it must name every checkpointed GPU (CUDA_ERROR_INVALID_VALUE), send
  each onto a present GPU of the same model (CUDA_ERROR_INVALID_VALUE) with room
  (CUDA_ERROR_OUT_OF_MEMORY). Without a map every checkpointed GPU must be present
  under its own UUID (CUDA_ERROR_INVALID_DEVICE).
- Locking a process whose cgroup is frozen waits out the timeout and raises
  CudaLockTimeout, as the real driver does: a frozen process cannot reach the point
  where it yields its CUDA lock. The other calls on a frozen process fail at once
  (the real driver would hang in them).
- Files in the state directory: gpus.json (inventory), processes/<token>.json (one per
  token, replaced atomically), events.jsonl (one JSON line per get-state, lock,
  checkpoint, restore and unlock call, failed ones included), and failure
  injection: fail-lock, fail-checkpoint, fail-restore, fail-unlock make the next such
  call fail (the file's text, if any, is the error name) and are removed by it;
  hang-lock makes locks hang while it exists, up to their timeout.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kybernate.cuda import procfs
from kybernate.cuda.backend import (
    CudaError,
    CudaLockTimeout,
    CudaState,
    GpuInfo,
    is_identity_map,
    validate_gpu_map,
    validate_pid,
    validate_timeout_ms,
)
from kybernate.errors import InvalidArgument

ENV_TOKEN = "KYBERNATE_FAKE_CUDA"
ENV_MEMORY = "KYBERNATE_FAKE_CUDA_MEM"
ENV_GPU = "KYBERNATE_FAKE_CUDA_GPU"
ENV_VISIBLE = "KYBERNATE_FAKE_CUDA_VISIBLE"
ENV_STATE_DIR = "KYBERNATE_FAKE_CUDA_DIR"
DEFAULT_STATE_DIR = "/run/kybernate-fake-cuda"
DEFAULT_PROCESS_MEMORY = 256 << 20
DEFAULT_GPUS: tuple[dict[str, Any], ...] = (
    {
        "uuid": "GPU-fa4e0000-0000-4000-8000-000000000000",
        "model": "Fake H100",
        "memory_total": 80 << 30,
    },
)
EVENTS_FILE = "events.jsonl"
GPUS_FILE = "gpus.json"

_TOKEN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_ACTIONS_WITH_FAILURE_INJECTION = ("lock", "checkpoint", "restore", "unlock")


@dataclass
class _ProcessRecord:
    """The fake driver's view of one CUDA process (one token)."""

    token: str
    pid: int
    state: CudaState = CudaState.RUNNING
    device_memory: dict[str, int] = field(default_factory=dict)  # GPU UUID -> bytes on it
    host_memory: dict[str, int] = field(default_factory=dict)  # checkpointed, per source GPU
    gpus: dict[str, str] = field(default_factory=dict)  # every GPU its state covers -> model

    def to_json(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "pid": self.pid,
            "state": self.state.name,
            "device_memory": self.device_memory,
            "host_memory": self.host_memory,
            "gpus": self.gpus,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> _ProcessRecord:
        return cls(
            token=str(data["token"]),
            pid=int(data["pid"]),
            state=CudaState[data["state"]],
            device_memory={str(k): int(v) for k, v in data.get("device_memory", {}).items()},
            host_memory={str(k): int(v) for k, v in data.get("host_memory", {}).items()},
            gpus={str(k): str(v) for k, v in data.get("gpus", {}).items()},
        )


class FakeBackend:
    """File-backed stand-in for the CUDA driver; see the module docstring."""

    name = "fake"

    def __init__(self, state_dir: str | os.PathLike[str] | None = None, *,
                 poll_interval: float = 0.01) -> None:
        chosen = state_dir or os.environ.get(ENV_STATE_DIR) or DEFAULT_STATE_DIR
        self.state_dir = Path(chosen)
        self.processes_dir = self.state_dir / "processes"
        self.events_path = self.state_dir / EVENTS_FILE
        self._poll_interval = poll_interval
        self.processes_dir.mkdir(parents=True, exist_ok=True)

    # -- the CudaBackend protocol ------------------------------------------------------

    def is_cuda_process(self, pid: int) -> bool:
        validate_pid(pid)
        token = self._token_of(pid)
        if token is None:
            return False
        with self._exclusive():
            self._load(token, pid)
        return True

    def get_state(self, pid: int) -> CudaState:
        token = self._require_token(pid)
        with self._exclusive():
            state = self._load(token, pid).state
        self._log("get-state", pid, token, state, state)
        return state

    def lock(self, pid: int, timeout_ms: int) -> None:
        validate_timeout_ms(timeout_ms)
        token = self._require_token(pid)
        deadline = None if timeout_ms == 0 else time.monotonic() + timeout_ms / 1000
        hang_file = self.state_dir / "hang-lock"
        # The lock waits for the process to reach a CUDA API boundary; a frozen
        # process (or an injected hang) never does, so only the timeout ends the wait.
        while True:
            hanging = hang_file.exists()
            frozen = procfs.freeze_state(pid)
            if not hanging and not frozen.frozen:
                break
            if deadline is not None and time.monotonic() >= deadline:
                if hanging:
                    hang_file.unlink(missing_ok=True)
                reason = "injected hang" if hanging else f"cgroup freezer {frozen.freezer}"
                with self._exclusive():
                    state = self._load(token, pid).state
                self._log("lock", pid, token, state, state, error="timeout: " + reason)
                raise CudaLockTimeout(pid, timeout_ms, reason)
            time.sleep(self._poll_interval)
        self._transition(pid, token, "lock", CudaState.RUNNING, CudaState.LOCKED)

    def checkpoint(self, pid: int) -> None:
        token = self._require_token(pid)
        self._transition(pid, token, "checkpoint", CudaState.LOCKED, CudaState.CHECKPOINTED)

    def restore(self, pid: int, gpu_map: Mapping[str, str] | None = None) -> None:
        token = self._require_token(pid)
        self._transition(pid, token, "restore", CudaState.CHECKPOINTED, CudaState.LOCKED,
                         gpu_map=gpu_map)

    def unlock(self, pid: int) -> None:
        token = self._require_token(pid)
        self._transition(pid, token, "unlock", CudaState.LOCKED, CudaState.RUNNING)

    def restore_thread_id(self, pid: int) -> int:
        self._require_token(pid)
        tid = procfs.first_thread_id(pid)
        if tid is None:
            raise CudaError("process is gone", pid=pid, error_name="CUDA_ERROR_NOT_FOUND")
        return tid

    def gpus(self) -> list[GpuInfo]:
        with self._exclusive():
            return self._inventory()

    def driver_version(self) -> str:
        return "fake"

    def process_gpu_memory(self, pid: int) -> dict[str, int]:
        token = self._require_token(pid)
        with self._exclusive():
            record = self._load(token, pid)
            return dict(record.device_memory) if _holds_device(record.state) else {}

    def process_gpus(self, pid: int) -> set[str]:
        """Like the driver's device files: held while RUNNING or LOCKED, closed once
        checkpointed."""
        token = self._require_token(pid)
        with self._exclusive():
            record = self._load(token, pid)
            return set(record.gpus) if _holds_device(record.state) else set()

    # -- inspection helpers for tests ------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        """Every call logged so far, oldest first."""
        try:
            text = self.events_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def inject_failure(self, action: str, error_name: str = "CUDA_ERROR_UNKNOWN") -> None:
        """Make the next `action` call fail with `error_name`."""
        if action not in _ACTIONS_WITH_FAILURE_INJECTION:
            raise InvalidArgument(f"no failure injection for {action!r}")
        _write_atomically(self.state_dir / f"fail-{action}", error_name)

    def write_gpus(self, gpus: list[Mapping[str, Any]]) -> None:
        """Replace the fake inventory: entries with uuid, model, memory_total."""
        for gpu in gpus:
            if not {"uuid", "model", "memory_total"} <= gpu.keys():
                raise InvalidArgument(f"fake GPU needs uuid, model, memory_total: {gpu!r}")
        _write_atomically(self.state_dir / GPUS_FILE, json.dumps(list(gpus), indent=1))

    # -- internals ----------------------------------------------------------------------

    def _token_of(self, pid: int) -> str | None:
        env = procfs.read_environ(pid)
        if env is None or not procfs.is_alive(pid):
            return None
        token = env.get(ENV_TOKEN)
        if not token:
            return None
        if not _TOKEN.match(token):
            raise InvalidArgument(f"pid {pid}: {ENV_TOKEN}={token!r} is not a usable token")
        return token

    def _require_token(self, pid: int) -> str:
        validate_pid(pid)
        token = self._token_of(pid)
        if token is None:
            raise CudaError("not a CUDA process", pid=pid, error_name="CUDA_ERROR_NOT_FOUND")
        return token

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Serialise read-modify-write of the state files across processes."""
        with open(self.state_dir / ".lock", "a+") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _record_path(self, token: str) -> Path:
        return self.processes_dir / f"{token}.json"

    def _load(self, token: str, pid: int) -> _ProcessRecord:
        """The token's record, created on first sight; notes the pid it lives under now."""
        path = self._record_path(token)
        try:
            record = _ProcessRecord.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            record = self._first_sight(token, pid)
            self._save(record)
            return record
        if record.pid != pid:
            record.pid = pid  # restored by CRIU under a new pid
            self._save(record)
        return record

    def _first_sight(self, token: str, pid: int) -> _ProcessRecord:
        env = procfs.read_environ(pid) or {}
        raw_memory = env.get(ENV_MEMORY, str(DEFAULT_PROCESS_MEMORY))
        try:
            memory = int(raw_memory)
        except ValueError:
            raise InvalidArgument(f"pid {pid}: {ENV_MEMORY}={raw_memory!r} is not bytes") from None
        inventory = {g.uuid: g.model for g in self._inventory()}
        gpu = env.get(ENV_GPU) or next(iter(inventory), "")
        if gpu not in inventory:
            raise InvalidArgument(f"pid {pid}: {ENV_GPU}={gpu!r} is not a fake GPU")
        visible = [u.strip() for u in env.get(ENV_VISIBLE, "").split(",") if u.strip()]
        unknown = [u for u in visible if u not in inventory]
        if unknown:
            raise InvalidArgument(f"pid {pid}: {ENV_VISIBLE} names GPUs the fake lacks: {unknown}")
        seen = {u: inventory[u] for u in (visible or inventory)}
        seen.setdefault(gpu, inventory[gpu])
        return _ProcessRecord(token=token, pid=pid, device_memory={gpu: memory}, gpus=seen)

    def _save(self, record: _ProcessRecord) -> None:
        _write_atomically(self._record_path(record.token), json.dumps(record.to_json()))

    def _all_records(self) -> list[_ProcessRecord]:
        records = []
        for path in self.processes_dir.glob("*.json"):
            try:
                records.append(_ProcessRecord.from_json(json.loads(path.read_text())))
            except FileNotFoundError:
                continue
        return records

    def _inventory(self) -> list[GpuInfo]:
        try:
            configured = json.loads((self.state_dir / GPUS_FILE).read_text())
        except FileNotFoundError:
            configured = list(DEFAULT_GPUS)
        used: dict[str, int] = {}
        for record in self._all_records():
            # Device memory of a process that exited is the driver's to reclaim.
            if _holds_device(record.state) and self._token_of(record.pid) == record.token:
                for uuid, size in record.device_memory.items():
                    used[uuid] = used.get(uuid, 0) + size
        return [
            GpuInfo(
                index=index,
                uuid=str(gpu["uuid"]),
                model=str(gpu["model"]),
                memory_total=int(gpu["memory_total"]),
                memory_free=max(0, int(gpu["memory_total"]) - used.get(str(gpu["uuid"]), 0)),
            )
            for index, gpu in enumerate(configured)
        ]

    def _take_injected_failure(self, action: str) -> str | None:
        path = self.state_dir / f"fail-{action}"
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return None
        path.unlink(missing_ok=True)
        return text or "CUDA_ERROR_UNKNOWN"

    def _transition(self, pid: int, token: str, action: str, source: CudaState,
                    target: CudaState, *, gpu_map: Mapping[str, str] | None = None) -> None:
        frozen = procfs.freeze_state(pid)
        with self._exclusive():
            record = self._load(token, pid)
            before = record.state
            try:
                if frozen.frozen:
                    raise CudaError(
                        f"{action} of a frozen process (cgroup freezer {frozen.freezer}); "
                        "the driver would block here", pid=pid,
                        error_name="CUDA_ERROR_ILLEGAL_STATE")
                injected = self._take_injected_failure(action)
                if injected is not None:
                    raise CudaError(f"{action} failed (injected)", pid=pid, error_name=injected)
                if before is not source:
                    raise CudaError(
                        f"{action} needs a {source.name} process, it is {before.name}",
                        pid=pid, error_name="CUDA_ERROR_ILLEGAL_STATE")
                if action == "checkpoint":
                    record.host_memory, record.device_memory = record.device_memory, {}
                elif action == "restore":
                    record.device_memory = self._placement(record, gpu_map)
                    record.host_memory = {}
                record.state = target
                self._save(record)
            except CudaError as err:
                self._log(action, pid, token, before, record.state, frozen=frozen, error=str(err))
                raise
            self._log(action, pid, token, before, target, frozen=frozen)

    def _placement(self, record: _ProcessRecord,
                   gpu_map: Mapping[str, str] | None) -> dict[str, int]:
        """Where the checkpointed memory goes on restore, and where each checkpointed GPU
        lands (record.gpus is updated); fails as the driver would (module docstring)."""
        pid = record.pid
        inventory = {gpu.uuid: gpu for gpu in self._inventory()}
        covered = dict(record.gpus) or {uuid: "" for uuid in record.host_memory}
        if gpu_map and not is_identity_map(validate_gpu_map(gpu_map)):
            if set(gpu_map) != set(covered):
                raise CudaError(
                    f"GPU map must name every checkpointed GPU ({sorted(covered)}), "
                    f"it names {sorted(gpu_map)}", pid=pid, error_name="CUDA_ERROR_INVALID_VALUE")
            for old, new in gpu_map.items():
                target = inventory.get(new)
                if target is None or (covered[old] and target.model != covered[old]):
                    found = "not present" if target is None else f"a {target.model}"
                    raise CudaError(f"GPU {new} for checkpointed GPU {old} ({covered[old]}) is "
                                    f"{found}", pid=pid, error_name="CUDA_ERROR_INVALID_VALUE")
            moves = dict(gpu_map)
        else:
            absent = [uuid for uuid in covered if uuid not in inventory]
            if absent:
                raise CudaError(f"GPU {absent[0]} is not present and no GPU map was given",
                                pid=pid, error_name="CUDA_ERROR_INVALID_DEVICE")
            moves = {uuid: uuid for uuid in covered}
        placement: dict[str, int] = {}
        for old, size in record.host_memory.items():
            new = moves.get(old, old)
            placement[new] = placement.get(new, 0) + size
        for uuid, need in placement.items():
            gpu = inventory[uuid]
            if need > gpu.memory_free:
                raise CudaError(
                    f"not enough GPU memory on GPU {uuid}: need {need}, free {gpu.memory_free}",
                    pid=pid, error_name="CUDA_ERROR_OUT_OF_MEMORY")
        record.gpus = {moves[old]: inventory[moves[old]].model for old in covered}
        return placement

    def _log(self, action: str, pid: int, token: str, before: CudaState, after: CudaState,
             *, frozen: procfs.FreezeState | None = None, error: str | None = None) -> None:
        frozen = frozen or procfs.freeze_state(pid)
        entry = {
            "monotonic_ns": time.monotonic_ns(),
            "wall": time.time(),
            "action": action,
            "pid": pid,
            "token": token,
            "before": before.name,
            "after": after.name,
            "frozen": frozen.frozen,
            "freezer": frozen.freezer,
            "run_state": frozen.run_state,
            "ok": error is None,
            "error": error,
        }
        # One write() of one line to an O_APPEND file: lines from several processes
        # never interleave.
        fd = os.open(self.events_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, (json.dumps(entry) + "\n").encode())
        finally:
            os.close(fd)


def _holds_device(state: CudaState) -> bool:
    return state in (CudaState.RUNNING, CudaState.LOCKED)


def _write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a torn write."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
