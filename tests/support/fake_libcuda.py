"""Running the real cuda-bindings against a stand-in driver library (fake_libcuda.c).

cuda-bindings finds the driver by dlopen("libcuda.so.1"); a library with that soname
loaded first (RTLD_GLOBAL) is the one it gets. That cannot be undone in a process, so
each scenario runs in a child interpreter: `run_scenario(fn, *args)` starts one, loads
the stand-in, calls fn(FakeDriver, *args) and returns what fn returned (plain data).
`bindings` puts another cuda-bindings (a `pip install --target` folder) first on the
child's path, so one test can run against several versions of the package.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

from kybernate.cuda.backend import gpu_uuid_bytes, gpu_uuid_text

SOURCE = Path(__file__).with_name("fake_libcuda.c")
REPO = Path(__file__).resolve().parents[2]
# Where .ci/setup installs cuda-bindings 12.9 beside the venv's own 13.x.
BINDINGS_12 = REPO / ".venv" / "cuda-bindings-12.9"

STATES = {"RUNNING": 0, "LOCKED": 1, "CHECKPOINTED": 2, "FAILED": 3}


def library() -> Path:
    """The stand-in, compiled once per source version."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:12]
    cache = Path(tempfile.gettempdir()) / "kybernate-fake-libcuda"
    cache.mkdir(parents=True, exist_ok=True)
    built = cache / f"libcuda-{digest}.so"
    if built.exists():
        return built
    partial = cache / f".libcuda-{digest}.{os.getpid()}"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                    "-Wl,-soname,libcuda.so.1", "-o", str(partial), str(SOURCE), "-ldl"],
                   check=True)
    partial.rename(built)
    return built


def library_dir() -> Path:
    """A folder holding the stand-in as libcuda.so.1, for LD_LIBRARY_PATH: a child
    started with it gets the stand-in from cuda-bindings' own dlopen."""
    built = library()
    folder = built.parent / f"dir-{built.stem}"
    link = folder / "libcuda.so.1"
    if not link.exists():
        folder.mkdir(exist_ok=True)
        partial = folder / f".libcuda.so.1.{os.getpid()}"
        partial.symlink_to(built)
        partial.rename(link)
    return folder


class FakeDriver:
    """The stand-in's control functions, as a scenario sees them."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        lib.fake_cuda_log.restype = ctypes.c_char_p

    def reset(self, gpus: Iterable[str], driver_api: int = 13000) -> None:
        raw = b"".join(gpu_uuid_bytes(u) for u in gpus)
        self._lib.fake_cuda_reset(driver_api, len(raw) // 16, raw)

    def add_process(self, pid: int, state: str, gpus: Iterable[str]) -> None:
        raw = b"".join(gpu_uuid_bytes(u) for u in gpus)
        self._lib.fake_cuda_add_process(pid, STATES[state], len(raw) // 16, raw)

    def process_gpus(self, pid: int) -> list[str]:
        out = ctypes.create_string_buffer(16 * 8)
        count = self._lib.fake_cuda_process_gpus(pid, out)
        return [gpu_uuid_text(out.raw[16 * i:16 * i + 16]) for i in range(max(count, 0))]

    def fail_next(self, call: str, code: int) -> None:
        self._lib.fake_cuda_fail_next(call.encode(), code)

    def calls(self, name: str | None = None) -> list[dict[str, Any]]:
        import json

        entries = [json.loads(line) for line in self._lib.fake_cuda_log().decode().splitlines()]
        return [e for e in entries if name is None or e["call"] == name]


def outcome(fn: Callable[[], Any]) -> dict[str, Any]:
    """{"ok": value} or {"error": kind, "message": text}, so errors cross the pipe."""
    try:
        return {"ok": fn()}
    except Exception as err:  # noqa: BLE001 - the scenario reports every failure as data
        return {"error": type(err).__name__, "message": str(err)}


def real_bindings() -> ModuleType:
    """cuda.bindings.driver from the installed package. The repository root, which
    pytest puts on sys.path, holds Kybernate's own `cuda/` folder, a regular package
    that would win over NVIDIA's `cuda` namespace; once the namespace is imported,
    later imports of cuda.* find it in sys.modules."""
    shadow = sys.modules.get("cuda")
    if shadow is not None and getattr(shadow, "__file__", None):
        raise AssertionError(f"'cuda' is already imported from {shadow.__file__}")
    saved = list(sys.path)
    sys.path[:] = [p for p in saved if Path(p or os.getcwd()).resolve() != REPO]
    try:
        driver = importlib.import_module("cuda.bindings.driver")
    finally:
        sys.path[:] = saved
    return driver


def run_scenario(fn: Callable[..., Any], *args: Any, bindings: Path | None = None,
                 timeout: float = 120.0) -> Any:
    """fn(FakeDriver, *args) in a child interpreter with the stand-in as its libcuda."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if bindings is not None:
        env["PYTHONPATH"] = str(bindings)
    request = pickle.dumps((fn.__module__, fn.__qualname__, args, str(library())))
    # Run as a script from elsewhere: the repository root must not be on the path
    # before cuda.bindings is imported (see real_bindings).
    done = subprocess.run([sys.executable, str(Path(__file__).resolve())], input=request,
                          capture_output=True, env=env, cwd="/", timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"scenario {fn.__qualname__} died ({done.returncode}):\n"
                             f"{done.stderr.decode(errors='replace')}")
    return pickle.loads(done.stdout)


def _child() -> None:
    module_name, qualname, args, lib_path = pickle.loads(sys.stdin.buffer.read())
    lib = ctypes.CDLL(lib_path, mode=ctypes.RTLD_GLOBAL)
    importlib.import_module("cuda.bindings.driver")
    sys.path.insert(0, str(REPO))
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    result = target(FakeDriver(lib), *args)
    sys.stdout.buffer.write(pickle.dumps(result))


if __name__ == "__main__":
    _child()
