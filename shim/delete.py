"""The `delete` action: clean up after a shim that is gone.

containerd runs it after every disconnect from a shim, often when the bundle or the
runc state no longer exists, so every step tolerates what is already cleaned up. It
force-deletes the container with runc, unmounts the rootfs, and prints a marshalled
DeleteResponse; like runc's shim it reports 137 (SIGKILL), since the real exit status
died with the server.

Import-light (it runs once per container): no asyncio, no protobuf runtime; runc runs
through subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from kybernate.shim.flags import ShimFlags  # already loaded by the entry point

KILLED_EXIT_STATUS = 128 + 9
RUNC_DELETE_TIMEOUT_S = 30.0
INIT_PID_FILE = "init.pid"
# Mirrors kybernate.shim.options (not imported here: see saved_runc_location).
OPTIONS_FILE = "options.json"
DEFAULT_RUNC_BINARY = "runc"
DEFAULT_RUNC_ROOT_BASE = "/run/containerd/runc"


def runc_force_delete(binary: str, root: str, container_id: str) -> str | None:
    """`runc --root ROOT delete --force ID`; returns a warning, or None on success or
    when runc (or its state root) knows no such container."""
    if not os.path.isdir(os.path.join(root, container_id)):
        return None  # runc keeps one directory per container: nothing to delete
    try:
        result = subprocess.run(
            [binary, "--root", root, "delete", "--force", container_id],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=RUNC_DELETE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"runc delete {container_id}: {err}"
    if result.returncode == 0:
        return None
    message = (result.stderr or result.stdout).decode(errors="replace").strip()
    if "does not exist" in message or "not found" in message:
        return None
    return f"runc delete {container_id}: {message or f'exit status {result.returncode}'}"


def read_init_pid(bundle: str) -> int:
    """The container's init pid from the bundle's pid file, 0 when unknown."""
    try:
        with open(os.path.join(bundle, INIT_PID_FILE)) as f:
            return max(int(f.read().strip() or 0), 0)
    except (OSError, ValueError):
        return 0


def remove_stale_socket(bundle: str) -> None:
    """Remove the shim socket named in the bundle's `address` file if no server answers
    on it any more (a killed shim leaves it behind); a live group shim keeps its socket."""
    from kybernate.shim.start import ADDRESS_FILE, can_connect, socket_path

    try:
        with open(os.path.join(bundle, ADDRESS_FILE)) as f:
            path = socket_path(f.read().strip())
    except (OSError, ValueError):
        return
    if not can_connect(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def saved_runc_location(bundle: str, namespace: str) -> tuple[str, str]:
    """(runc binary, runc root) from the `options.json` the server saved at Create.

    Read with json alone: `kybernate.shim.options` (dataclasses, protobuf) would add
    tens of milliseconds to every container's delete. The keys are ShimOptions' field
    names, which is what `ShimOptions.to_json` writes.
    """
    saved: dict[str, object] = {}
    try:
        with open(os.path.join(bundle, OPTIONS_FILE)) as f:
            loaded = json.load(f)
        if isinstance(loaded, dict):
            saved = loaded
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as err:
        print(f"ignoring unreadable {OPTIONS_FILE} in {bundle}: {err}", file=sys.stderr)
    binary = saved.get("binary_name") or DEFAULT_RUNC_BINARY
    root_base = saved.get("root") or DEFAULT_RUNC_ROOT_BASE
    return str(binary), os.path.join(str(root_base), namespace)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_delete_response(pid: int, exit_status: int, exited_at_ns: int) -> bytes:
    """containerd.task.v2.DeleteResponse{pid=1, exit_status=2, exited_at=3 Timestamp}.

    Three scalar fields, encoded by hand because loading the protobuf runtime costs
    ~40 ms here on every container's delete; tests decode it with shim_pb2.
    """
    seconds, nanos = divmod(exited_at_ns, 1_000_000_000)
    timestamp = b"\x08" + _varint(seconds) + (b"\x10" + _varint(nanos) if nanos else b"")
    message = b""
    if pid:
        message += b"\x08" + _varint(pid)
    message += b"\x10" + _varint(exit_status)
    return message + b"\x1a" + _varint(len(timestamp)) + timestamp


def delete(flags: ShimFlags) -> bytes:
    """Run the `delete` action; returns the marshalled DeleteResponse for stdout."""
    if not flags.id:
        raise ValueError("-id is required for delete")
    bundle = flags.bundle_path
    binary, root = saved_runc_location(bundle, flags.namespace)
    warning = runc_force_delete(binary, root, flags.id)
    if warning:
        # containerd logs our stderr as cleanup warnings and goes on.
        print(warning, file=sys.stderr)
    rootfs = os.path.join(bundle, "rootfs")
    if os.path.isdir(rootfs):
        from kybernate.runtime.mount import unmount_all

        try:
            unmount_all(rootfs)
        except OSError as err:
            print(f"unmount {rootfs}: {err}", file=sys.stderr)
    remove_stale_socket(bundle)
    return encode_delete_response(read_init_pid(bundle), KILLED_EXIT_STATUS, time.time_ns())
