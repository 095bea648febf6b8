"""The whole container path for bench/gpu_validate.py: a private containerd, runc, CRIU,
the Kybernate agent (driver backend) and shim run bench/gpu_workload.py in a container
that has the GPU's device nodes; cold start, checkpoint, removal, restore, checksum.

The container's image holds only empty mount points; the host's /usr (and /bin, /lib
where they are not links into it), /etc, the Python installation, the carry prefix and
the repository are bound in read-only, so the workload runs the host's own Python and
cuda-bindings without copying them. It talks through files in its /tmp (see
gpu_workload.py --control), which CRIU carries over where pipes would break.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
IMAGE_REF = "docker.io/kybernate-bench/gpu-skeleton:latest"
RUNTIME = "io.containerd.kybernate.v1"
AGENT_SOCKET_ANNOTATION = "io.kybernate.agent-socket"
READY_TIMEOUT_S = 180.0


def _host_binds(extra: list[str]) -> list[str]:
    """Host folders the container sees read-only: real folders bound, links copied."""
    wanted = ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", sys.prefix, sys.base_prefix,
              str(REPO), *extra]
    for entry in sys.path:
        if entry and os.path.isdir(entry):
            wanted.append(entry)
    binds: list[str] = []
    for path in sorted({os.path.realpath(p) for p in wanted if os.path.exists(p)}):
        if not any(path == b or path.startswith(b.rstrip("/") + "/") for b in binds):
            binds.append(path)
    return binds


def _skeleton(root: Path, binds: list[str]) -> Path:
    """A rootfs of mount points and the host's top-level links (merged /usr)."""
    for sub in ("proc", "sys", "dev", "tmp", "run", "root", "var/tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)
    for top in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
        host = Path("/") / top
        if host.is_symlink():
            (root / top).symlink_to(os.readlink(host))
    for path in binds:
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    return root


class Channel:
    """The host side of gpu_workload.py --control: files in the container's /tmp."""

    def __init__(self, directory: Path, alive: Callable[[], bool]) -> None:
        self.directory = directory
        self.alive = alive

    def wait_file(self, name: str, timeout: float) -> dict[str, Any]:
        path = self.directory / name
        deadline = time.monotonic() + timeout
        checked = time.monotonic()
        while True:
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                message = json.loads(path.read_text())
                path.unlink()
                if "error" in message:
                    raise RuntimeError(f"workload: {message['error']}")
                return dict(message)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {name} from the workload in {timeout:.0f} s")
            if time.monotonic() - checked > 2:
                checked = time.monotonic()
                if not self.alive():
                    raise RuntimeError(f"the workload's task ended before writing {name}")
            time.sleep(0.02)

    def ask(self, command: str, timeout: float = 300.0) -> dict[str, Any]:
        partial = self.directory / ".command"
        partial.write_text(command + "\n")
        os.replace(partial, self.directory / "command")
        return self.wait_file("reply.json", timeout)


def _agent_config(workdir: Path, backend: str) -> Path:
    config = workdir / "agent.toml"
    config.write_text(
        f'socket = "{workdir / "agent.sock"}"\n'
        f'state_dir = "{workdir / "agent-state"}"\n'
        f'local_tier = "{workdir / "tier"}"\n'
        "[cuda]\n"
        f'backend = "{backend}"\n'
        "lock_timeout_ms = 30000\n"
        "[checkpoint]\n"
        "min_free_bytes = 0\n")
    return config


def _start_agent(workdir: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = open(workdir / "agent.log", "ab")  # noqa: SIM115 - the agent keeps it
    # From /: the repository root as working directory would shadow NVIDIA's `cuda`.
    process = subprocess.Popen(
        [sys.executable, "-m", "kybernate.agent", "--config", str(_agent_config(workdir, "driver"))],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd="/", env=env)
    socket_path = workdir / "agent.sock"
    deadline = time.monotonic() + 60
    while not socket_path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("agent did not start: " + (workdir / "agent.log").read_text()[-2000:])
        time.sleep(0.05)
    return process


def container_round_trip(run: Any, record: dict[str, Any], size: int,
                         libcuda_dir: str | None) -> None:
    from kybernate.sandbox.containerd import Containerd
    from kybernate.sandbox.images import build_oci_archive, import_image

    missing = [t for t in ("containerd", "ctr", "runc", "criu") if not _which(t)]
    if missing:
        record["status"] = f"skipped: {', '.join(missing)} not on PATH (use --carry)"
        return
    workdir = Path(tempfile.mkdtemp(prefix="kyb-gpuc-", dir="/tmp"))
    env = dict(os.environ)
    if libcuda_dir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join([libcuda_dir, env.get("LD_LIBRARY_PATH", "")])
    containerd = Containerd()
    agent: subprocess.Popen[bytes] | None = None

    def cleanup() -> None:
        with contextlib.suppress(Exception):
            if record.get("status") != "ok":
                record["containerd_log_tail"] = containerd.log_tail(40)
        with contextlib.suppress(Exception):
            containerd.stop()
        if agent is not None and agent.poll() is None:
            agent.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.wait(15)
            if agent.poll() is None:
                agent.kill()
        with contextlib.suppress(Exception):
            record["agent_log_tail"] = (workdir / "agent.log").read_text(errors="replace")[-3000:]
        subprocess.run(["rm", "-rf", str(workdir)], check=False)

    run.cleanups.append(cleanup)
    carry = os.environ.get("KYBERNATE_CARRY_PREFIX")
    stand_in = [libcuda_dir, str(Path(libcuda_dir, "libcuda.so.1").resolve().parent)] \
        if libcuda_dir else []
    binds = _host_binds([p for p in (carry, *stand_in) if p])
    archive = build_oci_archive(workdir / "image.tar", IMAGE_REF,
                                rootfs=_skeleton(workdir / "rootfs", binds))
    agent = _start_agent(workdir, env)
    containerd.start()
    import_image(containerd, archive, IMAGE_REF)
    record["binds"] = binds

    container_id = f"kyb-gpu-{os.getpid()}"
    devices = sorted(str(p) for p in Path("/dev").glob("nvidia*") if p.is_char_device())
    mounts = [f"--mount=type=bind,src={b},dst={b},options=rbind:ro" for b in binds]
    container_env = [f"--env={k}={env[k]}" for k in ("PATH", "PYTHONPATH", "LD_LIBRARY_PATH")
                     if env.get(k)]
    workload = (f"exec {sys.executable} {REPO / 'bench' / 'gpu_workload.py'} --bytes {size} "
                # Nothing open on the rootfs: a restore without --rw gets a fresh one.
                f"--control /tmp > /dev/null 2>&1 < /dev/null")
    record["devices"] = devices

    def ctr(*args: str, timeout: float = 300.0) -> float:
        started = time.monotonic()
        done = containerd.ctr(*args, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args[:3])} failed: "
                               f"{(done.stderr or done.stdout).strip()[-1500:]}")
        return time.monotonic() - started

    bundle = containerd.state / "io.containerd.runtime.v2.task" / containerd.namespace / container_id
    channel = Channel(bundle / "rootfs" / "tmp",
                      lambda: containerd.task_status(container_id) == "RUNNING")
    started = time.monotonic()
    ctr("run", "-d", "--runtime", RUNTIME,
        f"--annotation={AGENT_SOCKET_ANNOTATION}={workdir / 'agent.sock'}",
        *mounts, *[f"--device={d}" for d in devices], *container_env,
        IMAGE_REF, container_id, "/bin/sh", "-c", workload, timeout=60)
    ready = channel.wait_file("ready.json", READY_TIMEOUT_S)
    record["cold_start_s"] = round(time.monotonic() - started - ready["timings_s"]["check"], 3)
    record["workload"] = ready
    if not ready["intact"]:
        raise RuntimeError("the workload's data did not verify before any checkpoint")

    checkpoint_ref = f"docker.io/kybernate-bench/{container_id}-checkpoint:1"
    record["checkpoint_s"] = round(ctr("container", "checkpoint", "--task", container_id,
                                       checkpoint_ref), 3)
    record["after_checkpoint"] = channel.ask("check")  # it keeps running
    ctr("task", "kill", "-s", "SIGKILL", container_id)
    with contextlib.suppress(Exception):
        containerd.wait_task_status(container_id, "STOPPED", timeout=30)
    ctr("task", "delete", container_id)
    ctr("container", "delete", container_id)

    started = time.monotonic()
    record["restore_s"] = round(ctr("container", "restore", "--live", container_id,
                                    checkpoint_ref), 3)
    after = channel.ask("check")
    record["restore_to_checked_s"] = round(time.monotonic() - started, 3)
    record["after_restore"] = after
    record["intact"] = bool(after["intact"]) and after["checksum"] == ready["checksum"]
    record["task_status"] = containerd.task_status(container_id)
    if record["cold_start_s"] and record["restore_s"]:
        record["cold_start_over_restore"] = round(record["cold_start_s"] / record["restore_s"], 2)
    if not record["intact"]:
        raise RuntimeError(f"checksum after the container restore differs: {after}")


def _which(tool: str) -> bool:
    import shutil

    return shutil.which(tool) is not None
