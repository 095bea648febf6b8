"""A private containerd, beside anything else on the machine: for the demo and the tests.

Everything it owns lives under one temporary directory (root, state, sockets, config)
plus a unique namespace, so parallel sessions never meet. The Kybernate shim is found
the way containerd finds any shim: by name on PATH, with this interpreter's bin
directory first.

Two containerd lines can run it (`ContainerdRelease`): the system's 1.7 (config
version 2) and the 2.x that `.ci/install-system.sh` unpacks into /opt/kybernate
(config version 3). `KYBERNATE_CONTAINERD` (`1.7` or `2`) picks the default. The CRI
plugin stays disabled unless `CriSettings` ask for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from kybernate import mountinfo

KYBERNATE_RUNTIME = "io.containerd.kybernate.v1"
RUNC_STATE_BASE = Path("/run/containerd/runc")
SHIM_SOCKET_DIR = Path("/run/containerd/s")

# Plugins a test never needs. NRI would listen on one socket shared by every
# containerd of the machine (2.x enables it by default).
DISABLED_PLUGINS = (
    "io.containerd.nri.v1.nri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.blockfile",
    "io.containerd.snapshotter.v1.erofs",
    "io.containerd.differ.v1.erofs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)
# The CRI plugins (1.7 has one, 2.x splits it in four), disabled unless asked for:
# CRI wants CNI, pulls images and keeps its own state.
CRI_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.cri.v1.runtime",
    "io.containerd.cri.v1.images",
    "io.containerd.podsandbox.controller.v1.podsandbox",
)
#: The containerd namespace CRI keeps Kubernetes' containers and images in.
CRI_NAMESPACE = "k8s.io"
#: Chooses the default containerd line: a `ContainerdRelease` name.
ENV_CONTAINERD = "KYBERNATE_CONTAINERD"
#: Where `.ci/install-system.sh` unpacks containerd 2.x (Debian sid's package).
CONTAINERD_2_PREFIX = Path("/opt/kybernate/containerd-2")


@dataclasses.dataclass(frozen=True)
class ContainerdRelease:
    """One installed containerd line: its binaries and the config version it reads."""

    name: str
    #: Directory of containerd, ctr and containerd-shim-runc-v2; None: found on PATH.
    bin_dir: Path | None
    config_version: int

    @property
    def containerd(self) -> str:
        return str(self.bin_dir / "containerd") if self.bin_dir else "containerd"

    @property
    def ctr(self) -> str:
        return str(self.bin_dir / "ctr") if self.bin_dir else "ctr"

    def missing(self) -> list[str]:
        """The binaries of this release that are not installed."""
        if self.bin_dir is None:
            return [tool for tool in ("containerd", "ctr") if shutil.which(tool) is None]
        return [str(self.bin_dir / tool) for tool in ("containerd", "ctr")
                if not os.access(self.bin_dir / tool, os.X_OK)]

    def version(self) -> str:
        """`containerd --version`, e.g. "containerd github.com/containerd/containerd/v2 2.1.9"."""
        return subprocess.run([self.containerd, "--version"], capture_output=True, text=True,
                              timeout=30, check=True).stdout.strip()


#: The system's containerd (trixie's 1.7.24 on these machines).
CONTAINERD_1_7 = ContainerdRelease("1.7", None, config_version=2)
#: containerd 2.x (sid's 2.1.9 today), unpacked beside the system's.
CONTAINERD_2 = ContainerdRelease("2", CONTAINERD_2_PREFIX / "usr" / "bin", config_version=3)
RELEASES = {release.name: release for release in (CONTAINERD_1_7, CONTAINERD_2)}


def release_named(name: str) -> ContainerdRelease:
    try:
        return RELEASES[name]
    except KeyError:
        raise ValueError(f"unknown containerd release {name!r}: want one of "
                         f"{', '.join(RELEASES)}") from None


def default_release(environ: Mapping[str, str] | None = None) -> ContainerdRelease:
    """The release `KYBERNATE_CONTAINERD` names; the system's 1.7 when unset."""
    env = os.environ if environ is None else environ
    return release_named(env.get(ENV_CONTAINERD) or CONTAINERD_1_7.name)


@dataclasses.dataclass(frozen=True)
class CriRuntime:
    """A CRI runtime handler: what a RuntimeClass names, the shim it runs, its options.

    `options` become the handler's options table; for a runtime type that is not
    io.containerd.runc.*, CRI hands them to the shim as runtimeoptions.v1.Options."""

    handler: str
    runtime_type: str
    options: Mapping[str, str | bool | int] = dataclasses.field(default_factory=dict)
    #: Annotation patterns CRI passes from the pod and container configs to the spec.
    annotations: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class CriSettings:
    """What a CRI-enabled private containerd needs (see ENVIRONMENT.md)."""

    sandbox_image: str
    runtimes: tuple[CriRuntime, ...]
    #: The cgroup parent every pod of the instance uses: removed at stop.
    cgroup_parent: str


def command_words(cmdline: bytes) -> list[bytes]:
    """The words of a /proc/PID/cmdline: its arguments, or the words of a title (one
    string, as setproctitle writes it: a serving shim's `containerd-shim-kybernate-v1
    -namespace NS -id ID -address ADDR`)."""
    words = [word for word in cmdline.split(b"\0") if word]
    if len(words) == 1 and b" " in words[0]:
        return words[0].split()
    return words


def command_line(pid: int) -> list[str]:
    """`command_words` of a live process, as text ([] once it is gone)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [word.decode(errors="replace") for word in command_words(cmdline)]


def _kybernate_shim_action(argv: list[bytes]) -> str | None:
    """The action of a `python -m kybernate.shim ... ACTION` command line, else None."""
    from kybernate.shim.flags import UsageError, parse_flags

    if b"kybernate.shim" not in argv:
        return None
    words = [a.decode(errors="replace") for a in argv[argv.index(b"kybernate.shim") + 1:]]
    try:
        return parse_flags(words).action
    except UsageError:
        return ""


class ContainerdError(AssertionError):
    """The private containerd did not come up or misbehaved; carries its log tail."""


def cgroups_named(path: str) -> list[Path]:
    """The cgroup at `path` in every mounted hierarchy (one on cgroup v2), where it exists."""
    root = Path("/sys/fs/cgroup")
    relative = path.strip("/")
    if (root / "cgroup.controllers").exists():
        candidates = [root / relative]
    else:
        candidates = [h / relative for h in root.iterdir() if not h.is_symlink()]
    return [c for c in candidates if c.is_dir()]


def _remove_cgroup_tree(top: Path) -> list[str]:
    """Remove the cgroups below `top`, deepest first, then `top`; the ones below, which
    something should have removed already."""
    forced = []
    for child in sorted(top.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if child.is_dir():
            forced.append(f"cgroup {child}")
            with contextlib.suppress(OSError):
                child.rmdir()
    with contextlib.suppress(OSError):
        top.rmdir()
    return forced


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _toml_value(value: str | bool | int) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return _toml_string(value)


class Containerd:
    """One private containerd process and the ctr command line that talks to it."""

    def __init__(self, base: Path | None = None, namespace: str | None = None, *,
                 release: ContainerdRelease | None = None, cri: CriSettings | None = None) -> None:
        self.release = release or default_release()
        self.cri = cri
        # Unix socket paths are limited to 108 bytes: keep the base short.
        self.base = base or Path(tempfile.mkdtemp(prefix=f"kyb-ctd-{os.getpid()}-", dir="/tmp"))
        if cri is not None and namespace not in (None, CRI_NAMESPACE):
            raise ValueError(f"a CRI containerd keeps its containers in {CRI_NAMESPACE}")
        self.namespace = CRI_NAMESPACE if cri is not None else (
            namespace or f"kyb-test-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        self.root = self.base / "root"
        self.state = self.base / "state"
        self.address = str(self.base / "c.sock")
        self.config = self.base / "config.toml"
        self.log_path = self.base / "containerd.log"
        self.runtime_dir = self.base / "xdg"
        # CRI's runc state and CNI directories: private, so instances never share them.
        self.private_runc_root = self.base / "runc"
        self.cni_conf_dir = self.base / "cni" / "net.d"
        self.cni_bin_dir = self.base / "cni" / "bin"
        self._process: subprocess.Popen[bytes] | None = None

    # ---- lifecycle -------------------------------------------------------------------

    def start(self, ready_timeout: float = 30.0) -> None:
        missing = self.release.missing() + ([] if shutil.which("runc") else ["runc"])
        if missing:
            raise ContainerdError(f"containerd {self.release.name}: {', '.join(missing)} "
                                  "not installed (run .ci/setup)")
        for directory in (self.root, self.state, self.runtime_dir, self.cni_conf_dir,
                          self.cni_bin_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.config.write_text(self._config_text())
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [self.release.containerd, "--config", str(self.config), "--root", str(self.root),
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
        forced += self._remove_cri_cgroups()
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
        # Our shim first; then the release's own runc shim, which matches its containerd.
        first = [os.path.dirname(sys.executable)]
        if self.release.bin_dir is not None:
            first.append(str(self.release.bin_dir))
        env["PATH"] = os.pathsep.join([*first, env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")])
        # containerd unpacks checkpoints for restores into XDG_RUNTIME_DIR (default /tmp)
        # and leaves them there: keep them under our base, which stop() removes.
        env["XDG_RUNTIME_DIR"] = str(self.runtime_dir)
        return env

    # ---- ctr -------------------------------------------------------------------------

    def ctr_argv(self, *args: str) -> list[str]:
        return [self.release.ctr, "--address", self.address, "--namespace", self.namespace, *args]

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
                argv = command_words((entry / "cmdline").read_bytes())
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

    def shims_serving(self, container_id: str) -> list[int]:
        """The shim processes of this containerd whose command line names the container."""
        return [pid for pid in self.shim_pids() if container_id in command_line(pid)]

    def template_pids(self) -> list[int]:
        """The Kybernate shim's forking template for this containerd, when one runs."""
        return [pid for pid, argv in self._processes_with_address()
                if _kybernate_shim_action(argv) == "template"]

    def runc_root(self) -> Path:
        """Where runc keeps this instance's containers: CRI's handlers are configured
        with a private root, ctr's containers use runc's shim default."""
        base = self.private_runc_root if self.cri is not None else RUNC_STATE_BASE
        return base / self.namespace

    def mounts_under(self, *prefixes: Path) -> list[str]:
        return [m.mount_point for m in mountinfo.read()
                if any(m.mount_point == str(p) or m.mount_point.startswith(f"{p}/") for p in prefixes)]

    # ---- internals -------------------------------------------------------------------

    def _config_text(self) -> str:
        disabled = DISABLED_PLUGINS + (CRI_PLUGINS if self.cri is None else ())
        opt = "io.containerd.internal.v1.opt"
        lines = [
            f"version = {self.release.config_version}",
            f"root = {_toml_string(str(self.root))}",
            f"state = {_toml_string(str(self.state))}",
            f"disabled_plugins = [{', '.join(_toml_string(p) for p in disabled)}]",
            "[grpc]",
            f"  address = {_toml_string(self.address)}",
            "[ttrpc]",
            f"  address = {_toml_string(self.address + '.ttrpc')}",
            "[debug]",
            '  address = ""',
            '  level = "debug"',
            "[metrics]",
            '  address = ""',
            f"[plugins.{_toml_string(opt)}]",
            f"  path = {_toml_string(str(self.root / 'opt'))}",
        ]
        if self.cri is not None:
            lines += self._cri_config_lines(self.cri)
        return "\n".join(lines) + "\n"

    def _cri_config_lines(self, cri: CriSettings) -> list[str]:
        """The CRI plugin's settings, where each config version keeps them: 1.7 has one
        plugin (`io.containerd.grpc.v1.cri`), 2.x splits runtime and images off it."""
        if self.release.config_version >= 3:
            runtime = _toml_string("io.containerd.cri.v1.runtime")
            images = _toml_string("io.containerd.cri.v1.images")
            server = _toml_string("io.containerd.grpc.v1.cri")
            image_lines = [f"[plugins.{images}.pinned_images]",
                           f"  sandbox = {_toml_string(cri.sandbox_image)}"]
            cni_bin = f"  bin_dirs = [{_toml_string(str(self.cni_bin_dir))}]"
        else:
            runtime = images = server = _toml_string("io.containerd.grpc.v1.cri")
            image_lines = []
            cni_bin = f"  bin_dir = {_toml_string(str(self.cni_bin_dir))}"
        lines = [
            f"[plugins.{server}]",
            "  disable_tcp_service = true",
            '  stream_server_address = "127.0.0.1"',
            '  stream_server_port = "0"',
            *([f"  sandbox_image = {_toml_string(cri.sandbox_image)}"] if server == images else []),
            *image_lines,
            *([f"[plugins.{runtime}]"] if runtime != server else []),
            # These VMs lack CAP_SYS_RESOURCE for lowering oom_score_adj below containerd's.
            "  restrict_oom_score_adj = true",
            "  enable_cdi = false",
            "  disable_apparmor = true",
            f"[plugins.{runtime}.cni]",
            cni_bin,
            f"  conf_dir = {_toml_string(str(self.cni_conf_dir))}",
            f"[plugins.{runtime}.containerd]",
            f"  default_runtime_name = {_toml_string(cri.runtimes[0].handler)}",
        ]
        for handler in cri.runtimes:
            table = f"plugins.{runtime}.containerd.runtimes.{_toml_string(handler.handler)}"
            lines += [f"[{table}]", f"  runtime_type = {_toml_string(handler.runtime_type)}"]
            if handler.annotations:
                patterns = ", ".join(_toml_string(a) for a in handler.annotations)
                lines += [f"  pod_annotations = [{patterns}]",
                          f"  container_annotations = [{patterns}]"]
            if handler.options:
                lines.append(f"[{table}.options]")
                lines += [f"  {key} = {_toml_value(value)}" for key, value in handler.options.items()]
        return lines

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise ContainerdError(f"containerd exited at start:\n{self.log_tail()}")
            probe = subprocess.run([self.release.ctr, "--address", self.address, "version"],
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
        return cgroups_named(self.namespace)

    def _remove_namespace_cgroups(self) -> list[str]:
        forced = []
        for cgroup in self.namespace_cgroups():
            forced += _remove_cgroup_tree(cgroup)
        return forced

    def _remove_cri_cgroups(self) -> list[str]:
        """The pods' cgroup parent, in every hierarchy (what CRI left of it)."""
        if self.cri is None:
            return []
        forced = []
        for parent in cgroups_named(self.cri.cgroup_parent):
            forced += _remove_cgroup_tree(parent)
        return forced

    def _unmount_under(self, base: Path) -> list[str]:
        mounts = self.mounts_under(base)
        for mount_point in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount_point], capture_output=True, timeout=30,
                           check=False)
        return [f"mount {m}" for m in mounts]
