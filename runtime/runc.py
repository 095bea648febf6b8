"""The runc command line, called the way containerd's shim calls it.

Every call is `runc --root ROOT --log LOG --log-format json [--systemd-cgroup] SUB ...`
run through the Reaper (runc's own children, the container processes, are ours as
subreaper). On failure runc writes JSON lines to LOG; the last `"level":"error"` line
is the message users need, so it goes into the raised error.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from kybernate.errors import AlreadyExists, Internal, InvalidArgument, NotFound, StatusCode
from kybernate.runtime.reaper import DEVNULL, CommandResult, Reaper

LOG_FILE_NAME = "log.json"

_NOT_FOUND = re.compile(r"container(?: with id \S+)? (?:does not exist|not found)|no such container")
_ALREADY_EXISTS = re.compile(r"container with (?:given )?id (?:\S+ )?already exists|already exists")
_PROCESS_GONE = re.compile(r"process already finished|container not running|no such process")


class RuncError(Internal):
    """A runc command failed; the message carries runc's own last error line."""

    def __init__(self, message: str, *, command: Sequence[str] = (), exit_status: int | None = None,
                 runc_message: str = "") -> None:
        super().__init__(message)
        self.command = list(command)
        self.exit_status = exit_status
        self.runc_message = runc_message


class ContainerNotFound(RuncError, NotFound):
    """runc says the container does not exist."""

    code = StatusCode.NOT_FOUND


class ContainerExists(RuncError, AlreadyExists):
    """runc says a container with that id already exists."""

    code = StatusCode.ALREADY_EXISTS


class ProcessNotFound(RuncError, NotFound):
    """kill found no process to signal (it already exited)."""

    code = StatusCode.NOT_FOUND


class RuncIO(Protocol):
    """What Runc needs from a process's stdio (kybernate.runtime.stdio.ProcessIO)."""

    def runc_fds(self) -> tuple[int | None, int | None, int | None]:
        """(stdin, stdout, stderr) for runc's own stdio; None means /dev/null."""
        ...

    def close_after_start(self) -> None:
        """Close the shim's copies of the fds the container now holds."""
        ...


def last_error_message(log_text: str) -> str:
    """The `msg` of the last error-level JSON line in runc's log ('' if none).

    Lines that are not JSON (runc writes plain text before it parsed its flags) are
    kept as a fallback so the message is never silently empty.
    """
    message = ""
    plain = ""
    for line in log_text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            plain = line
            continue
        if isinstance(entry, dict) and entry.get("level") in ("error", "fatal", "panic"):
            message = str(entry.get("msg", ""))
    return message or plain


class Runc:
    """runc for one state root; one instance per shim (per container bundle).

    log_dir: where runc's `log.json` lives (containerd's shim uses the bundle); None
    gives every call its own temporary log file.
    """

    def __init__(self, reaper: Reaper, binary: str = "runc",
                 root: str = "/run/containerd/runc/default", systemd_cgroup: bool = False,
                 log_dir: str | None = None, command_timeout: float | None = None) -> None:
        if not binary:
            raise ValueError("runc binary must not be empty")
        if not root:
            raise ValueError("runc root must not be empty")
        self.reaper = reaper
        self.binary = binary
        self.root = root
        self.systemd_cgroup = systemd_cgroup
        self.log_dir = log_dir
        self.command_timeout = command_timeout

    # -- lifecycle ---------------------------------------------------------------

    async def create(self, id: str, bundle: str, *, pid_file: str, console_socket: str | None = None,
                     io: RuncIO | None = None, no_pivot: bool = False,
                     no_new_keyring: bool = False) -> None:
        """`runc create`: the init process exists, stopped before the user's program."""
        args = ["create", "--bundle", bundle, "--pid-file", pid_file]
        args += self._process_flags(console_socket, no_pivot=no_pivot, no_new_keyring=no_new_keyring)
        await self._run_with_io(args + [_checked_id(id)], io, subject=id)

    async def start(self, id: str) -> None:
        """`runc start`: run the user's program in a created container."""
        await self._run(["start", _checked_id(id)], subject=id)

    async def exec(self, id: str, process_spec: dict[str, Any], *, pid_file: str,
                   console_socket: str | None = None, io: RuncIO | None = None) -> None:
        """`runc exec --detach --process FILE`: start an extra process in the container."""
        with self._process_file(process_spec) as process_path:
            args = ["exec", "--detach", "--process", process_path, "--pid-file", pid_file]
            args += self._process_flags(console_socket)
            await self._run_with_io(args + [_checked_id(id)], io, subject=id)

    async def restore(self, id: str, bundle: str, *, image_path: str, work_path: str, pid_file: str,
                      console_socket: str | None = None, io: RuncIO | None = None,
                      tcp_established: bool = False, ext_unix_sk: bool = False,
                      file_locks: bool = False, detach: bool = True, no_pivot: bool = False,
                      manage_cgroups_mode: str | None = None,
                      empty_namespaces: Sequence[str] = (), lazy_pages: bool = False) -> None:
        """`runc restore` from CRIU images; the restored init is our child (no --no-subreaper).
        With `lazy_pages` a `criu lazy-pages` daemon must listen in `work_path`."""
        args = ["restore"]
        if detach:
            args.append("--detach")
        if lazy_pages:
            args.append("--lazy-pages")
        args += _criu_flags(image_path, work_path, tcp_established=tcp_established, ext_unix_sk=ext_unix_sk,
                            file_locks=file_locks, manage_cgroups_mode=manage_cgroups_mode,
                            empty_namespaces=empty_namespaces)
        args += ["--bundle", bundle, "--pid-file", pid_file]
        args += self._process_flags(console_socket, no_pivot=no_pivot)
        await self._run_with_io(args + [_checked_id(id)], io, subject=id)

    async def checkpoint(self, id: str, *, image_path: str, work_path: str,
                         leave_running: bool = False, tcp_established: bool = False,
                         ext_unix_sk: bool = False, file_locks: bool = False,
                         manage_cgroups_mode: str | None = None,
                         empty_namespaces: Sequence[str] = ()) -> None:
        """`runc checkpoint` (CRIU dump through runc); stock runc's path, kept for
        comparison and fallback: Kybernate's own pipeline dumps through CRIU directly."""
        args = ["checkpoint", *_criu_flags(image_path, work_path, tcp_established=tcp_established,
                                           ext_unix_sk=ext_unix_sk, file_locks=file_locks,
                                           manage_cgroups_mode=manage_cgroups_mode,
                                           empty_namespaces=empty_namespaces)]
        if leave_running:
            args.append("--leave-running")
        await self._run(args + [_checked_id(id)], subject=id)

    async def kill(self, id: str, signal: int, *, all: bool = False) -> None:
        """`runc kill`; a process that already exited raises ProcessNotFound."""
        if signal <= 0:
            raise InvalidArgument(f"invalid signal {signal}")
        args = ["kill"] + (["--all"] if all else []) + [_checked_id(id), str(signal)]
        await self._run(args, subject=id)

    async def delete(self, id: str, *, force: bool = False) -> None:
        """`runc delete`; force kills a running container first."""
        await self._run(["delete"] + (["--force"] if force else []) + [_checked_id(id)], subject=id)

    async def pause(self, id: str) -> None:
        """`runc pause` (cgroup freeze)."""
        await self._run(["pause", _checked_id(id)], subject=id)

    async def resume(self, id: str) -> None:
        """`runc resume` (cgroup thaw)."""
        await self._run(["resume", _checked_id(id)], subject=id)

    async def update(self, id: str, resources: dict[str, Any]) -> None:
        """`runc update -r -` with the OCI LinuxResources JSON on stdin."""
        payload = json.dumps(resources).encode()
        await self._run(["update", "-r", "-", _checked_id(id)], input=payload, subject=id)

    # -- queries -----------------------------------------------------------------

    async def ps(self, id: str) -> list[int]:
        """Pids of every process in the container (`runc ps --format json`)."""
        result = await self._run(["ps", "--format", "json", _checked_id(id)], subject=id)
        pids = _parse_json(result.stdout, "ps")
        if pids is None:
            return []
        if not isinstance(pids, list) or not all(isinstance(p, int) for p in pids):
            raise RuncError(f"runc ps {id}: unexpected output {result.stdout[:200]!r}")
        return pids

    async def state(self, id: str) -> dict[str, Any]:
        """runc's state document: id, pid, status, bundle, rootfs, created, annotations."""
        result = await self._run(["state", _checked_id(id)], subject=id)
        state = _parse_json(result.stdout, "state")
        if not isinstance(state, dict):
            raise RuncError(f"runc state {id}: unexpected output {result.stdout[:200]!r}")
        return state

    async def list_containers(self) -> list[dict[str, Any]]:
        """Every container under this root (`runc list --format json`)."""
        result = await self._run(["list", "--format", "json"])
        items = _parse_json(result.stdout, "list")
        return list(items or [])

    async def version(self) -> str:
        """runc's version number, e.g. '1.1.15+ds1'."""
        try:
            result = await self.reaper.run([self.binary, "--version"], timeout=self.command_timeout)
        except OSError as exc:
            raise RuncError(f"cannot run {self.binary}: {exc}") from exc
        text = result.stdout.decode(errors="replace")
        if result.returncode != 0:
            raise RuncError(f"{self.binary} --version exited {result.returncode}: "
                            f"{result.stderr.decode(errors='replace').strip()}")
        match = re.search(r"runc version (\S+)", text)
        if not match:
            raise RuncError(f"cannot parse runc version from {text[:200]!r}")
        return match.group(1)

    # -- plumbing ----------------------------------------------------------------

    def global_args(self, log_path: str) -> list[str]:
        """The flags every runc invocation starts with."""
        args = [self.binary, "--root", self.root, "--log", log_path, "--log-format", "json"]
        if self.systemd_cgroup:
            args.append("--systemd-cgroup")
        return args

    @staticmethod
    def _process_flags(console_socket: str | None, *, no_pivot: bool = False,
                       no_new_keyring: bool = False) -> list[str]:
        flags: list[str] = []
        if console_socket:
            flags += ["--console-socket", console_socket]
        if no_pivot:
            flags.append("--no-pivot")
        if no_new_keyring:
            flags.append("--no-new-keyring")
        return flags

    @contextlib.contextmanager
    def _process_file(self, process_spec: dict[str, Any]) -> Iterator[str]:
        if not isinstance(process_spec, dict) or not process_spec.get("args"):
            raise InvalidArgument("exec process spec needs non-empty args")
        fd, path = tempfile.mkstemp(prefix="runc-process-", suffix=".json", dir=self.log_dir)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(process_spec, f)
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    @contextlib.contextmanager
    def _log_file(self) -> Iterator[tuple[str, int]]:
        """The log path for one call and the offset where this call's lines begin."""
        if self.log_dir is not None:
            path = os.path.join(self.log_dir, LOG_FILE_NAME)
            try:
                offset = os.path.getsize(path)
            except FileNotFoundError:
                offset = 0
            yield path, offset
            return
        fd, path = tempfile.mkstemp(prefix="runc-log-", suffix=".json")
        os.close(fd)
        try:
            yield path, 0
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    async def _run_with_io(self, args: list[str], io: RuncIO | None, *, subject: str) -> None:
        # Without io, runc's stdio must not be our capture pipes: the container
        # would inherit them and the read would never see EOF.
        stdio: tuple[int | None, int | None, int | None] = (None, None, None)
        if io is not None:
            stdio = io.runc_fds()
        try:
            await self._run(
                args,
                stdin=DEVNULL if stdio[0] is None else stdio[0],
                stdout=DEVNULL if stdio[1] is None else stdio[1],
                stderr=DEVNULL if stdio[2] is None else stdio[2],
                subject=subject,
            )
        finally:
            if io is not None:
                io.close_after_start()

    async def _run(self, args: list[str], *, stdin: int | None = None, stdout: int | None = None,
                   stderr: int | None = None, input: bytes | None = None,
                   subject: str = "") -> CommandResult:
        with self._log_file() as (log_path, offset):
            argv = self.global_args(log_path) + args
            try:
                result = await self.reaper.run(argv, stdin=stdin, stdout=stdout, stderr=stderr,
                                               input=input, timeout=self.command_timeout)
            except OSError as exc:  # the binary is missing or not executable
                raise RuncError(f"cannot run {self.binary}: {exc}", command=argv) from exc
            if result.returncode == 0:
                return result
            raise self._error(args, argv, subject, result, _read_from(log_path, offset))

    @staticmethod
    def _error(args: list[str], argv: list[str], subject: str, result: CommandResult,
               log_text: str) -> RuncError:
        message = last_error_message(log_text)
        if not message:
            message = (result.stderr or result.stdout).decode(errors="replace").strip()
        if not message:
            message = f"exit status {result.returncode}"
        text = f"runc {args[0]} {subject}: {message}" if subject else f"runc {args[0]}: {message}"
        kind: type[RuncError] = RuncError
        lowered = message.lower()
        if _NOT_FOUND.search(lowered):
            kind = ContainerNotFound
        elif args[0] == "kill" and _PROCESS_GONE.search(lowered):
            kind = ProcessNotFound
        elif args[0] in ("create", "restore") and _ALREADY_EXISTS.search(lowered):
            kind = ContainerExists
        return kind(text, command=argv, exit_status=result.returncode, runc_message=message)


def _checked_id(id: str) -> str:
    # runc would reject these too, but with a less obvious message.
    if not id or id.startswith("-") or "/" in id or id in (".", ".."):
        raise InvalidArgument(f"invalid container id {id!r}")
    return id


def _parse_json(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw or b"null")
    except json.JSONDecodeError as exc:
        raise RuncError(f"runc {what}: output is not JSON ({exc}): {raw[:200]!r}") from None


def _read_from(path: str, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(1 << 20).decode(errors="replace")
    except FileNotFoundError:
        return ""


def _criu_flags(image_path: str, work_path: str, *, tcp_established: bool, ext_unix_sk: bool,
                file_locks: bool, manage_cgroups_mode: str | None,
                empty_namespaces: Sequence[str]) -> list[str]:
    """The flags `runc checkpoint` and `runc restore` share (what CRIU is told)."""
    flags = ["--image-path", image_path, "--work-path", work_path]
    if tcp_established:
        flags.append("--tcp-established")
    if ext_unix_sk:
        flags.append("--ext-unix-sk")
    if file_locks:
        flags.append("--file-locks")
    if manage_cgroups_mode:
        flags += ["--manage-cgroups-mode", manage_cgroups_mode]
    for ns in empty_namespaces:
        flags += ["--empty-ns", ns]
    return flags
