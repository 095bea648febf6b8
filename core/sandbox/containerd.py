"""A private containerd 1.7, beside anything else on the machine: for the demo and the tests.

Everything it owns lives under one temporary directory (root, state, sockets, config)
plus a unique namespace, so parallel sessions never meet. The Kybernate shim is found
the way containerd finds any shim: by name on PATH, with this interpreter's bin
directory first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

KYBERNATE_RUNTIME = "io.containerd.kybernate.v1"
RUNC_STATE_BASE = Path("/run/containerd/runc")
SHIM_SOCKET_DIR = Path("/run/containerd/s")

# Plugins a test never needs; CRI above all (it would want CNI and pull images).
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.blockfile",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


def _kybernate_shim_action(argv: list[bytes]) -> str | None:
    """The action of a `python -m kybernate.shim ... ACTION` command line, else None."""
    from kybernate.shim.main import UsageError, parse_flags

    if b"kybernate.shim" not in argv:
        return None
    words = [a.decode(errors="replace") for a in argv[argv.index(b"kybernate.shim") + 1:]]
    try:
        return parse_flags(words).action
    except UsageError:
        return ""


class ContainerdError(AssertionError):
    """The private containerd did not come up or misbehaved; carries its log tail."""


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Containerd:
    """One private containerd process and the ctr command line that talks to it."""

    def __init__(self, base: Path | None = None, namespace: str | None = None) -> None:
        # Unix socket paths are limited to 108 bytes: keep the base short.
        self.base = base or Path(tempfile.mkdtemp(prefix=f"kyb-ctd-{os.getpid()}-", dir="/tmp"))
        self.namespace = namespace or f"kyb-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.root = self.base / "root"
        self.state = self.base / "state"
        self.address = str(self.base / "c.sock")
        self.config = self.base / "config.toml"
        self.log_path = self.base / "containerd.log"
        self.runtime_dir = self.base / "xdg"
        self._process: subprocess.Popen[bytes] | None = None

    # ---- lifecycle -------------------------------------------------------------------

    def start(self, ready_timeout: float = 30.0) -> None:
        for tool in ("containerd", "ctr", "runc"):
            if shutil.which(tool) is None:
                raise ContainerdError(f"{tool} is not installed (run .ci/setup)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self._config_text())
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                ["containerd", "--config", str(self.config), "--root", str(self.root),
                 "--state", str(self.state), "--address", self.address, "--log-level", "debug"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.environment(),
                start_new_session=True)
        self._wait_ready(ready_timeout)

    def restart(self, ready_timeout: float = 30.0) -> None:
        """Stop containerd alone (shims and containers keep running), then start it again."""
        self._terminate_containerd()
        self.start(ready_timeout)

    def stop(self) -> list[str]:
        """Tear everything down; returns what had to be cleaned up by force (for asserts)."""
        forced: list[str] = []
        if self.running:
            with contextlib.suppress(Exception):
                forced += self._remove_all_containers()
        self._terminate_containerd()
        self._stop_templates()
        forced += self._kill_leftover_shims()
        forced += self._delete_leftover_runc_containers()
        forced += self._unmount_under(self.base)
        forced += self._remove_namespace_cgroups()
        shutil.rmtree(self.base, ignore_errors=True)
        return forced

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        bin_dir = os.path.dirname(sys.executable)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])
        # containerd unpacks checkpoints for restores into XDG_RUNTIME_DIR (default /tmp)
        # and leaves them there: keep them under our base, which stop() removes.
        env["XDG_RUNTIME_DIR"] = str(self.runtime_dir)
        return env

    # ---- ctr -------------------------------------------------------------------------

    def ctr_argv(self, *args: str) -> list[str]:
        return ["ctr", "--address", self.address, "--namespace", self.namespace, *args]

    def ctr(self, *args: str, input: bytes | str | None = None, timeout: float = 60.0,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ctr against this containerd; text in, text out."""
        data = input.decode() if isinstance(input, bytes) else input
        result = subprocess.run(self.ctr_argv(*args), input=data, capture_output=True, text=True,
                                timeout=timeout, env=self.environment(),
                                stdin=None if data is not None else subprocess.DEVNULL,
                                check=False)
        if check and result.returncode != 0:
            raise ContainerdError(f"ctr {' '.join(args)} failed ({result.returncode}):\n"
                                  f"{result.stdout}{result.stderr}\n--- containerd log ---\n"
                                  f"{self.log_tail()}")
        return result

    def task_status(self, container_id: str) -> str | None:
        """The STATUS column of `ctr task ls` for the container, None when it has no task."""
        listing = self.ctr("task", "ls", check=True).stdout.splitlines()[1:]
        for line in listing:
            fields = line.split()
            if fields and fields[0] == container_id:
                return fields[-1]
        return None

    def wait_task_status(self, container_id: str, want: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            status = self.task_status(container_id)
            if status == want:
                return
            time.sleep(0.1)
        raise AssertionError(f"task {container_id} is {status}, not {want}, after {timeout}s")

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no containerd log)"

    # ---- what belongs to this instance ---------------------------------------------

    def _processes_with_address(self) -> list[tuple[int, list[bytes]]]:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if self.address.encode() in argv:
                found.append((int(entry.name), argv))
        return found

    def shim_pids(self) -> list[int]:
        """Every live process started as a shim of this containerd (any runtime); the
        Kybernate shim's forking template is not one (see `template_pids`)."""
        return [pid for pid, argv in self._processes_with_address()
                if b"containerd-shim" in b" ".join(argv)
                or _kybernate_shim_action(argv) not in (None, "template")]

    def template_pids(self) -> list[int]:
        """The Kybernate shim's forking template for this containerd, when one runs."""
        return [pid for pid, argv in self._processes_with_address()
                if _kybernate_shim_action(argv) == "template"]

    def runc_root(self) -> Path:
        return RUNC_STATE_BASE / self.namespace

    def mounts_under(self, *prefixes: Path) -> list[str]:
        found = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mount_point = line.split()[4].replace("\\040", " ")
                if any(mount_point == str(p) or mount_point.startswith(f"{p}/") for p in prefixes):
                    found.append(mount_point)
        return found

    # ---- internals -------------------------------------------------------------------

    def _config_text(self) -> str:
        disabled = ", ".join(_toml_string(p) for p in DISABLED_PLUGINS)
        return (
            "version = 2\n"
            f"root = {_toml_string(str(self.root))}\n"
            f"state = {_toml_string(str(self.state))}\n"
            f"disabled_plugins = [{disabled}]\n"
            "[grpc]\n"
            f"  address = {_toml_string(self.address)}\n"
            "[ttrpc]\n"
            f"  address = {_toml_string(self.address + '.ttrpc')}\n"
            "[debug]\n"
            "  address = \"\"\n"
            "  level = \"debug\"\n"
            "[metrics]\n"
            "  address = \"\"\n"
            "[plugins]\n"
            "  [plugins.\"io.containerd.internal.v1.opt\"]\n"
            f"    path = {_toml_string(str(self.root / 'opt'))}\n"
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise ContainerdError(f"containerd exited at start:\n{self.log_tail()}")
            probe = subprocess.run(["ctr", "--address", self.address, "version"],
                                   capture_output=True, timeout=10, check=False)
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise ContainerdError(f"containerd not ready after {timeout}s:\n{self.log_tail()}")

    def _terminate_containerd(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)

    def _remove_all_containers(self) -> list[str]:
        forced = []
        containers = self.ctr("containers", "ls", "-q", timeout=30).stdout.split()
        for container_id in containers:
            if self.task_status(container_id) is not None:
                forced.append(f"task {container_id}")
                self.ctr("task", "kill", "-s", "SIGKILL", "--all", container_id, timeout=30)
                self.ctr("task", "delete", "--force", container_id, timeout=30)
            forced.append(f"container {container_id}")
            self.ctr("containers", "rm", container_id, timeout=30)
        return forced

    def _stop_templates(self) -> None:
        """The template outlives containers by design (it idles, then exits): stop it
        with its containerd, and remove its socket even when it had to be killed."""
        from kybernate.shim.template import template_socket_path

        interpreters = {sys.executable}
        for pid, argv in self._processes_with_address():
            if _kybernate_shim_action(argv) == "template":
                interpreters.add(argv[0].decode(errors="replace"))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while self.template_pids() and time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in self.template_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for interpreter in interpreters:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(template_socket_path(self.address, interpreter))

    def _kill_leftover_shims(self) -> list[str]:
        forced = []
        for pid in self.shim_pids():
            forced.append(f"shim pid {pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.shim_pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        return forced

    def _delete_leftover_runc_containers(self) -> list[str]:
        forced = []
        root = self.runc_root()
        if root.is_dir():
            for entry in root.iterdir():
                forced.append(f"runc container {entry.name}")
                subprocess.run(["runc", "--root", str(root), "delete", "--force", entry.name],
                               capture_output=True, timeout=30, check=False)
            shutil.rmtree(root, ignore_errors=True)
        return forced

    def namespace_cgroups(self) -> list[Path]:
        """ctr puts containers at cgroup /<namespace>/<id>: these are the parents."""
        root = Path("/sys/fs/cgroup")
        if (root / "cgroup.controllers").exists():
            candidates = [root / self.namespace]
        else:
            candidates = [h / self.namespace for h in root.iterdir() if not h.is_symlink()]
        return [c for c in candidates if c.is_dir()]

    def _remove_namespace_cgroups(self) -> list[str]:
        forced = []
        for cgroup in self.namespace_cgroups():
            for child in sorted(cgroup.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                if child.is_dir():
                    forced.append(f"cgroup {child}")
                    with contextlib.suppress(OSError):
                        child.rmdir()
            with contextlib.suppress(OSError):
                cgroup.rmdir()
        return forced

    def _unmount_under(self, base: Path) -> list[str]:
        mounts = self.mounts_under(base)
        for mount_point in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount_point], capture_output=True, timeout=30,
                           check=False)
        return [f"mount {m}" for m in mounts]
