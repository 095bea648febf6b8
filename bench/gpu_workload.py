#!/usr/bin/env python3
"""A GPU process under test that needs nothing but cuda-bindings (no torch).

    python3 bench/gpu_workload.py --bytes N [--seed S] [--device UUID|INDEX] [--source FILE]

It allocates N bytes of GPU memory with the driver API and fills them in 64 MiB
chunks: chunk i is an 8-byte header (i, the seed) followed by a block of seeded random
bytes, or the bytes of FILE at that offset when --source is given (a process loading
weights). It answers on stdout, one JSON object per line, and reads commands from
stdin, so between commands it makes no CUDA call (a locked or checkpointed process
must not):

    (start)     {"ready": true, "pid", "bytes", "device", "device_uuid", "device_pointer",
                 "checksum", "expected", "intact",
                 "timings_s": {"init", "alloc", "fill", "check"}}
    check       {"checksum", "intact", "bad_chunks", "seconds"}
    bandwidth   {"pinned_htod_gb_s", "pinned_dtoh_gb_s", "bytes"}: copies of its own
                memory to and from page-locked host memory, the rate a checkpoint and
                restore of it could at best reach
    exit        leaves

With --control DIR (a process inside a container, whose stdio nobody holds) the same
answers go to DIR/ready.json and DIR/reply.json, and commands come as DIR/command files,
looked for every 50 ms; sleeping between looks makes no CUDA call either, and files
survive a CRIU checkpoint and restore where pipes to the outside would not.

The checksum is a CRC-32 over the CRC-32 of each chunk read back from the GPU (chunks
are summed on a thread pool while the next one is copied); `expected` is the same
computed from the host bytes uploaded, and `intact` says they agree chunk by chunk.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import select
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Self

CHUNK = 64 << 20
PINNED_BUFFERS = 4  # chunks in flight while their checksums are computed
GB = 10**9


class DriverError(RuntimeError):
    pass


def _call(result: Any, what: str) -> Any:
    """The value of a cuda-bindings call; DriverError naming the call and CUresult."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise DriverError(f"{what} failed: {getattr(err, 'name', err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _uuid_text(raw: bytes) -> str:
    h = bytes(raw).hex()
    return f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


class GpuBuffer:
    """N bytes of device memory on one GPU, with page-locked staging buffers."""

    def __init__(self, size: int, device: str | None) -> None:
        from cuda.bindings import driver

        self.cu = driver
        started = time.monotonic()
        _call(driver.cuInit(0), "cuInit")
        self.device, self.device_uuid = self._pick_device(device)
        raw_name = _call(driver.cuDeviceGetName(256, self.device), "cuDeviceGetName")
        self.device_name = bytes(raw_name).split(b"\0", 1)[0].decode(errors="replace").strip()
        context = _call(driver.cuDevicePrimaryCtxRetain(self.device), "cuDevicePrimaryCtxRetain")
        _call(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
        self.init_s = time.monotonic() - started
        started = time.monotonic()
        self.size = size
        self.pointer = int(_call(driver.cuMemAlloc(size), "cuMemAlloc"))
        self.staging = [int(_call(driver.cuMemAllocHost(CHUNK), "cuMemAllocHost"))
                        for _ in range(PINNED_BUFFERS)]
        self.alloc_s = time.monotonic() - started
        self.chunks = (size + CHUNK - 1) // CHUNK
        self._pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))

    def _pick_device(self, wanted: str | None) -> tuple[Any, str]:
        cu = self.cu
        count = _call(cu.cuDeviceGetCount(), "cuDeviceGetCount")
        found = []
        for ordinal in range(count):
            device = _call(cu.cuDeviceGet(ordinal), "cuDeviceGet")
            uuid = _uuid_text(_call(cu.cuDeviceGetUuid(device), "cuDeviceGetUuid").bytes)
            found.append((device, uuid))
            if wanted in (None, str(ordinal), uuid):
                return device, uuid
        raise DriverError(f"no GPU {wanted!r} among {[u for _, u in found]}")

    def _view(self, buffer: int, length: int) -> memoryview:
        return memoryview((ctypes.c_char * length).from_address(buffer)).cast("B")

    def _length(self, index: int) -> int:
        return min(CHUNK, self.size - index * CHUNK)

    def fill(self, seed: int, source: str | None) -> list[int]:
        """Upload the pattern (or the file); the CRC-32 of every chunk as uploaded,
        summed on the pool from the host bytes while the uploads go on."""
        block = random.Random(seed).randbytes(CHUNK) if source is None else b""
        staging = self.staging[0]
        sums: list[Future[int]] = []
        with open(source, "rb") if source else contextlib.nullcontext() as data:
            for index in range(self.chunks):
                length = self._length(index)
                chunk = block
                if data is not None:
                    chunk = data.read(length)
                    if len(chunk) < length:  # a short file repeats
                        chunk = (chunk * (length // max(len(chunk), 1) + 1))[:length]
                header = (index ^ (seed << 32)).to_bytes(8, "little")[:length]
                ctypes.memmove(staging, chunk, length)
                ctypes.memmove(staging, header, len(header))
                sums.append(self._pool.submit(_chunk_crc, chunk, header, length))
                _call(self.cu.cuMemcpyHtoD(self.pointer + index * CHUNK, staging, length),
                      "cuMemcpyHtoD")
        return [s.result() for s in sums]

    def read_crcs(self) -> list[int]:
        """Every chunk copied back and summed, copies overlapping the sums."""
        pending: list[Future[int] | None] = [None] * PINNED_BUFFERS
        results: list[Future[int]] = []
        for index in range(self.chunks):
            slot = index % PINNED_BUFFERS
            previous = pending[slot]
            if previous is not None:
                previous.result()  # that buffer's sum is done: it may be overwritten
            length = self._length(index)
            _call(self.cu.cuMemcpyDtoH(self.staging[slot], self.pointer + index * CHUNK, length),
                  "cuMemcpyDtoH")
            future = self._pool.submit(zlib.crc32, self._view(self.staging[slot], length))
            pending[slot] = future
            results.append(future)
        return [f.result() for f in results]

    def bandwidth(self, limit: int = 1 << 30) -> dict[str, Any]:
        """Pinned host <-> device copy rates over `limit` bytes of scratch device memory
        (the data under test stays as it is); best of three."""
        total = min(self.size, limit)
        scratch = int(_call(self.cu.cuMemAlloc(total), "cuMemAlloc"))
        rates: dict[str, Any] = {"bytes": total}
        try:
            for name, copy in (
                    ("pinned_htod_gb_s", lambda off, n: self.cu.cuMemcpyHtoD(
                        scratch + off, self.staging[0], n)),
                    ("pinned_dtoh_gb_s", lambda off, n: self.cu.cuMemcpyDtoH(
                        self.staging[0], scratch + off, n))):
                best = 0.0
                for _ in range(3):
                    started = time.perf_counter()
                    for offset in range(0, total, CHUNK):
                        _call(copy(offset, min(CHUNK, total - offset)), name)
                    seconds = time.perf_counter() - started
                    best = max(best, total / seconds / GB if seconds > 0 else 0.0)
                rates[name] = round(best, 3)
        finally:
            _call(self.cu.cuMemFree(scratch), "cuMemFree")
        return rates


def _chunk_crc(body: bytes, header: bytes, length: int) -> int:
    """CRC-32 of the chunk as uploaded: the header, then the body's bytes after it."""
    return zlib.crc32(memoryview(body)[len(header):length], zlib.crc32(header))


def checksum(crcs: list[int]) -> int:
    return zlib.crc32(b"".join(c.to_bytes(4, "little") for c in crcs))


def serve(size: int, seed: int, device: str | None, source: str | None,
          control: str | None = None) -> int:
    channel = FileChannel(control) if control else StdioChannel()
    buffer = GpuBuffer(size, device)
    started = time.monotonic()
    expected = buffer.fill(seed, source)
    fill_s = time.monotonic() - started
    started = time.monotonic()
    found = buffer.read_crcs()
    channel.reply({
        "ready": True, "pid": os.getpid(), "bytes": size, "device": buffer.device_name,
        "device_uuid": buffer.device_uuid, "device_pointer": buffer.pointer,
        "checksum": checksum(found), "expected": checksum(expected), "intact": found == expected,
        "timings_s": {"init": round(buffer.init_s, 6), "alloc": round(buffer.alloc_s, 6),
                      "fill": round(fill_s, 6), "check": round(time.monotonic() - started, 6)}})
    for command in channel.commands():
        if command == "check":
            started = time.monotonic()
            found = buffer.read_crcs()
            channel.reply({
                "checksum": checksum(found), "intact": found == expected,
                "bad_chunks": [i for i, (a, b) in enumerate(zip(found, expected)) if a != b][:16],
                "seconds": round(time.monotonic() - started, 6)})
        elif command == "bandwidth":
            channel.reply(buffer.bandwidth())
        elif command == "exit":
            return 0
        else:
            channel.reply({"error": f"unknown command {command!r}"})
    return 0


class StdioChannel:
    def commands(self) -> Iterator[str]:
        for line in sys.stdin:
            yield line.strip()

    def reply(self, message: dict[str, Any]) -> None:
        reply(message)


class FileChannel:
    """Commands as DIR/command files, answers as DIR/ready.json then DIR/reply.json."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.first = True

    def commands(self) -> Iterator[str]:
        path = os.path.join(self.directory, "command")
        while True:
            try:
                with open(path) as f:
                    command = f.read().strip()
            except FileNotFoundError:
                time.sleep(0.05)
                continue
            os.unlink(path)
            yield command

    def reply(self, message: dict[str, Any]) -> None:
        name = "ready.json" if self.first else "reply.json"
        self.first = False
        partial = os.path.join(self.directory, f".{name}")
        with open(partial, "w") as f:
            json.dump(message, f)
        os.replace(partial, os.path.join(self.directory, name))


def reply(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


class Workload:
    """The controlling side: starts this file as a child and talks to it."""

    def __init__(self, size: int, *, seed: int = 1234, device: str | None = None,
                 source: str | None = None, python: str = sys.executable,
                 env: dict[str, str] | None = None, ready_timeout: float = 300.0) -> None:
        argv = [python, os.path.abspath(__file__), "--bytes", str(size), "--seed", str(seed)]
        if device is not None:
            argv += ["--device", device]
        if source is not None:
            argv += ["--source", source]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env)
        self.ready = self._read(ready_timeout)
        self.ready_s = time.monotonic() - self.started
        if not self.ready.get("ready"):
            self.close()
            raise DriverError(f"workload did not start: {self.ready}")
        self.pid: int = self.ready["pid"]
        self.checksum: int = self.ready["checksum"]

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise DriverError(f"workload {self.proc.pid} gave no answer in {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise DriverError(f"workload exited with {self.proc.wait()} before answering")
        return dict(json.loads(line))

    def ask(self, command: str, timeout: float = 300.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("exit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bytes", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", help="GPU UUID or CUDA ordinal (default: the first)")
    parser.add_argument("--source", help="file whose bytes to load instead of the pattern")
    parser.add_argument("--control", help="talk through files in this folder, not stdio")
    args = parser.parse_args(argv)
    if args.bytes <= 0:
        parser.error("--bytes must be positive")
    try:
        return serve(args.bytes, args.seed, args.device, args.source, args.control)
    except Exception as err:  # noqa: BLE001 - whoever waits for an answer gets this one
        (FileChannel(args.control) if args.control else StdioChannel()).reply(
            {"error": f"{type(err).__name__}: {err}"})
        return 1


if __name__ == "__main__":
    sys.exit(main())
