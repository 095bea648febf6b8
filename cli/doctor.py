"""`kybernate doctor`: is this node ready for Kybernate, and if not, what to fix.

One check per line, each saying what it found and, when it is not fine, what to do:
the kernel features CRIU needs (`criu check`, userfaultfd, the cgroup version and its
freezer), CRIU, runc and containerd against the supported versions, containerd's
runtime entry for Kybernate (from `containerd config dump`), the shim on the PATH,
the node agent and its tiers (writable, free space, the remote tier reachable), and
where NVIDIA GPUs are present the driver, cuda-bindings and cuda-checkpoint. The exit
status says whether the node is ready (no check failed); `--json` for automation.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import enum
import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kybernate.errors import KybernateError

SHIM_BINARY = "containerd-shim-kybernate-v1"
RUNTIME_TYPE = "io.containerd.kybernate.v1"
CRIU_MIN = (4, 2)
RUNC_MIN = (1, 1)
#: containerd lines Kybernate is tested with: 1.7 and 2.x.
CONTAINERD_LINES = ((1, 7), (2, None))
DEFAULT_MIN_FREE = 1 << 30
_TIMEOUT_S = 60


class Status(enum.StrEnum):
    OK = "ok"
    WARN = "warn"  # works, with something to know
    FAIL = "fail"  # not ready
    SKIP = "skip"  # does not apply here


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""

    def line(self) -> str:
        text = f"{self.status.value.upper():<5} {self.name:<18} {self.detail}"
        return text + (f" -> {self.fix}" if self.fix else "")


@dataclasses.dataclass(frozen=True)
class Options:
    socket: Path
    containerd: str
    containerd_config: Path
    address: Path | None
    min_free_bytes: int


def _run(argv: Sequence[str]) -> tuple[int, str]:
    """(exit status, stdout and stderr) of a command; 127 when it is not there."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    except FileNotFoundError:
        return 127, f"{argv[0]}: not found"
    except subprocess.TimeoutExpired:
        return 124, f"{argv[0]}: no answer within {_TIMEOUT_S}s"
    return done.returncode, (done.stdout + done.stderr).strip()


def _version(text: str) -> tuple[int, ...] | None:
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(part) for part in found.groups() if part is not None) if found else None


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


# -- host -------------------------------------------------------------------------------


def check_criu() -> list[Check]:
    status, out = _run(["criu", "--version"])
    if status == 127:
        return [Check("criu", Status.FAIL, "CRIU is not installed", "install CRIU 4.2 or newer (Debian: criu)")]
    version = _version(out)
    checks = []
    if version is None or version[:2] < CRIU_MIN:
        checks.append(Check("criu", Status.FAIL, f"CRIU {_dotted(version) if version else '?'} is older than"
                            f" {_dotted(CRIU_MIN)}", "install CRIU 4.2 or newer"))
    else:
        checks.append(Check("criu", Status.OK, f"CRIU {_dotted(version)} (>= {_dotted(CRIU_MIN)})"))
    status, out = _run(["criu", "check"])
    if status == 0:
        checks.append(Check("criu check", Status.OK, out.splitlines()[-1] if out else "looks good"))
    else:
        last = out.splitlines()[-1] if out else f"exit status {status}"
        checks.append(Check("criu check", Status.FAIL, f"the kernel lacks what CRIU needs: {last[:200]}",
                            "run `criu check` as root and enable what it names (a kernel with"
                            " CONFIG_CHECKPOINT_RESTORE)"))
    status, out = _run(["criu", "check", "--feature", "uffd-noncoop"])
    if status == 0:
        checks.append(Check("userfaultfd", Status.OK, "userfaultfd with non-cooperative events"))
    else:
        checks.append(Check("userfaultfd", Status.WARN, "no usable userfaultfd: lazy restores are not available",
                            "a kernel with CONFIG_USERFAULTFD (and vm.unprivileged_userfaultfd for non-root)"))
    return checks


def check_cgroups(root: Path = Path("/sys/fs/cgroup")) -> list[Check]:
    if (root / "cgroup.controllers").exists():
        frozen = any((child / "cgroup.freeze").exists() for child in root.iterdir() if child.is_dir())
        if frozen:
            return [Check("cgroups", Status.OK, "cgroup v2 with its freezer (cgroup.freeze)")]
        return [Check("cgroups", Status.FAIL, "cgroup v2 without cgroup.freeze", "a kernel of 5.2 or newer")]
    if (root / "freezer").is_dir():
        return [Check("cgroups", Status.OK, "cgroup v1 with the freezer controller")]
    return [Check("cgroups", Status.FAIL, f"no cgroup v2 and no v1 freezer under {root}",
                  "mount cgroup2 on /sys/fs/cgroup (or the v1 freezer controller)")]


def check_runc() -> list[Check]:
    status, out = _run(["runc", "--version"])
    if status == 127:
        return [Check("runc", Status.FAIL, "runc is not installed", "install runc 1.1 or newer")]
    version = _version(out)
    if version is None or version[:2] < RUNC_MIN:
        return [Check("runc", Status.FAIL, f"runc {_dotted(version) if version else '?'} is older than 1.1",
                      "install runc 1.1 or newer")]
    return [Check("runc", Status.OK, f"runc {_dotted(version)} (>= {_dotted(RUNC_MIN)})")]


def check_containerd(options: Options) -> list[Check]:
    status, out = _run([options.containerd, "--version"])
    if status == 127:
        return [Check("containerd", Status.FAIL, f"{options.containerd} is not installed",
                      "install containerd 1.7 or 2.x")]
    version = _version(out.split()[-1] if out else "")
    supported = version is not None and any(
        version[0] == major and (minor is None or version[1] == minor) for major, minor in CONTAINERD_LINES)
    checks = [Check("containerd", Status.OK, f"containerd {_dotted(version)} (1.7 or 2.x)") if supported and version
              else Check("containerd", Status.FAIL, f"containerd {out[:80]!r} is not 1.7 or 2.x",
                         "install containerd 1.7 or 2.x")]
    checks.append(check_runtime_entry(options))
    if options.address is not None:
        checks.append(_check_socket("containerd socket", options.address, "is containerd running?"))
    return checks


def runtime_entries(config: dict[str, Any]) -> list[str]:
    """The CRI handlers whose runtime_type is Kybernate's, in containerd 1.7's and
    2.x's layouts."""
    plugins = config.get("plugins", {})
    found = []
    for plugin in ("io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime"):
        runtimes = plugins.get(plugin, {}).get("containerd", {}).get("runtimes", {})
        found += [handler for handler, entry in runtimes.items()
                  if isinstance(entry, dict) and entry.get("runtime_type") == RUNTIME_TYPE]
    return found


def check_runtime_entry(options: Options) -> Check:
    config = options.containerd_config
    if not config.exists():
        return Check("runtime entry", Status.FAIL, f"{config} does not exist",
                     "write it with the runtime entry of packaging/containerd/kybernate.toml, or name the"
                     " config with --containerd-config")
    status, out = _run([options.containerd, "--config", str(config), "config", "dump"])
    if status != 0:
        return Check("runtime entry", Status.FAIL, f"`containerd config dump` of {config} failed: {out[-200:]}",
                     "fix containerd's config")
    try:
        handlers = runtime_entries(tomllib.loads(out))
    except tomllib.TOMLDecodeError as exc:
        return Check("runtime entry", Status.FAIL, f"containerd's config dump is not TOML: {exc}")
    if not handlers:
        return Check("runtime entry", Status.FAIL, f"no CRI runtime with runtime_type = \"{RUNTIME_TYPE}\" in {config}",
                     "merge packaging/containerd/kybernate.toml into it and restart containerd (ctr --runtime"
                     f" {RUNTIME_TYPE} works without it; CRI and Kubernetes need it)")
    return Check("runtime entry", Status.OK, f"CRI handler {', '.join(handlers)} runs {RUNTIME_TYPE}")


def check_shim() -> list[Check]:
    path = shutil.which(SHIM_BINARY)
    if path is None:
        return [Check("shim", Status.FAIL, f"{SHIM_BINARY} is not on the PATH",
                      "install Kybernate where containerd's PATH finds it (a link in /usr/local/bin)")]
    return [Check("shim", Status.OK, f"{path}")]


def _check_socket(name: str, path: Path, hint: str) -> Check:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(3)
        try:
            probe.connect(str(path))
        except OSError as exc:
            return Check(name, Status.FAIL, f"{path}: {exc.strerror or exc}", hint)
    return Check(name, Status.OK, f"{path} accepts connections")


# -- the agent ------------------------------------------------------------------------------


def check_agent(options: Options) -> list[Check]:
    try:
        import grpc  # noqa: F401
    except ModuleNotFoundError:
        return [Check("agent", Status.FAIL, "the agent's packages are not installed (grpc is missing)",
                      "pip install 'kybernate[agent]'")]
    from kybernate.api.client import AgentClient

    async def status() -> Any:
        async with AgentClient(options.socket) as client:
            return await client.status(timeout=30, probe_tiers=True)

    try:
        answer = asyncio.run(status())
    except KybernateError as exc:
        return [Check("agent", Status.FAIL, str(exc),
                      "start the node agent (systemctl start kybernate-agent, or kybernate agent --config ...)")]
    checks = [Check("agent", Status.OK, f"agent {answer.version} at {options.socket} (CRIU {answer.criu_version},"
                                        f" CUDA backend {answer.cuda_backend})")]
    if answer.local_tier_error:
        checks.append(Check("local tier", Status.FAIL, f"cannot write: {answer.local_tier_error}",
                            "make the agent's local_tier a writable directory on a local disk"))
    elif answer.local_tier_free_bytes < options.min_free_bytes:
        checks.append(Check("local tier", Status.FAIL, f"{answer.local_tier}: only {answer.local_tier_free_bytes}"
                            f" bytes free (want {options.min_free_bytes})",
                            "free space, or lower the retention budget (kybernate checkpoint gc)"))
    else:
        checks.append(Check("local tier", Status.OK, f"{answer.local_tier} writable,"
                                                     f" {answer.local_tier_free_bytes / 2**30:.1f} GiB free"))
    if not answer.remote_tier:
        checks.append(Check("remote tier", Status.SKIP, "none configured (checkpoints stay on this node)"))
    elif answer.remote_tier_error:
        checks.append(Check("remote tier", Status.FAIL, f"{answer.remote_tier}: {answer.remote_tier_error}",
                            "check [s3] endpoint_url, bucket and credentials in the agent's configuration"))
    else:
        checks.append(Check("remote tier", Status.OK, f"{answer.remote_tier} reachable"
                                                      f" ({answer.dirty_count} not yet uploaded)"))
    return checks


# -- GPUs ---------------------------------------------------------------------------------------


def check_gpu(proc_driver: Path = Path("/proc/driver/nvidia/version")) -> list[Check]:
    if not proc_driver.exists() and not Path("/dev/nvidia0").exists():
        return [Check("gpu", Status.SKIP, "no NVIDIA GPU on this node")]
    checks = []
    try:
        text = proc_driver.read_text()
        version = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+\.\d+(?:\.\d+)?)", text)
        driver = version.group(1) if version else "unknown"
        major = int(driver.split(".")[0]) if version else 0
        if major >= 570:
            checks.append(Check("gpu driver", Status.OK, f"NVIDIA driver {driver} (>= 570, CUDA 12.8)"))
        else:
            checks.append(Check("gpu driver", Status.FAIL, f"NVIDIA driver {driver} has no checkpoint API",
                                "install driver 570 or newer (580 to restore onto other GPUs)"))
    except OSError as exc:
        checks.append(Check("gpu driver", Status.FAIL, f"{proc_driver}: {exc}", "load the NVIDIA kernel module"))
    if importlib.util.find_spec("cuda") is not None and importlib.util.find_spec("cuda.bindings") is not None:
        checks.append(Check("cuda-bindings", Status.OK, "importable"))
    else:
        checks.append(Check("cuda-bindings", Status.FAIL, "not installed", "pip install 'kybernate[gpu]'"))
    tool = shutil.which("cuda-checkpoint")
    checks.append(Check("cuda-checkpoint", Status.OK, tool) if tool else
                  Check("cuda-checkpoint", Status.WARN, "not on the PATH (the driver backend does without it)",
                        "install NVIDIA's cuda-checkpoint for the `tool` backend"))
    return checks


def run_checks(options: Options) -> list[Check]:
    steps: list[Callable[[], list[Check]]] = [
        check_criu, check_cgroups, check_runc, lambda: check_containerd(options), check_shim,
        lambda: check_agent(options), check_gpu]
    checks: list[Check] = []
    for step in steps:
        try:
            checks += step()
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            checks.append(Check(getattr(step, "__name__", "check"), Status.FAIL, f"{type(exc).__name__}: {exc}"))
    return checks


def doctor_main(argv: Sequence[str]) -> int:
    from kybernate.api.client import DEFAULT_SOCKET

    parser = argparse.ArgumentParser(prog="kybernate doctor", description="Check this node for Kybernate")
    parser.add_argument("--socket", type=Path, default=Path(DEFAULT_SOCKET), help="the agent's socket")
    parser.add_argument("--containerd", default="containerd", help="containerd's binary")
    parser.add_argument("--containerd-config", type=Path, default=Path("/etc/containerd/config.toml"))
    parser.add_argument("--address", type=Path, help="containerd's socket (default: not checked)")
    parser.add_argument("--min-free-bytes", type=int, default=DEFAULT_MIN_FREE,
                        help="free space the local tier needs")
    parser.add_argument("--json", action="store_true", help="one JSON document: ready and every check")
    args = parser.parse_args(list(argv))
    options = Options(args.socket, args.containerd, args.containerd_config, args.address, args.min_free_bytes)
    checks = run_checks(options)
    ready = not any(check.status is Status.FAIL for check in checks)
    if args.json:
        print(json.dumps({"ready": ready, "checks": [dataclasses.asdict(c) for c in checks]}, indent=2))
    else:
        for check in checks:
            print(check.line())
        failed = sum(check.status is Status.FAIL for check in checks)
        print("ready" if ready else f"not ready: {failed} check(s) failed", file=sys.stderr if not ready else sys.stdout)
    return 0 if ready else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(doctor_main(sys.argv[1:]))
