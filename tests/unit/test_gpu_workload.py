"""bench/gpu_workload.py, the GPU process under test, run with the real cuda-bindings
against the stand-in libcuda (tests/support/fake_libcuda.c), whose "device" memory is
ordinary memory of the workload process: its pattern, checksum and file loading are
checked here, and a byte changed behind its back through /proc/PID/mem must show."""

from __future__ import annotations

import os
import random
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.gpu_workload import CHUNK, DriverError, Workload, checksum
from tests.support.fake_libcuda import library_dir

SIZE = 3 * CHUNK + 4321  # a short last chunk


@pytest.fixture
def env() -> Iterator[dict[str, str]]:
    yield {**os.environ, "LD_LIBRARY_PATH": str(library_dir())}


def expected_checksum(seed: int, size: int, source: bytes | None = None) -> int:
    """Computed here, independently of the workload's code."""
    block = random.Random(seed).randbytes(CHUNK) if source is None else b""
    crcs = []
    for index, offset in enumerate(range(0, size, CHUNK)):
        length = min(CHUNK, size - offset)
        if source is None:
            body = block[:length]
        else:
            body = source[offset:offset + length]
        header = (index ^ (seed << 32)).to_bytes(8, "little")
        crcs.append(zlib.crc32(header + body[8:]))
    return checksum(crcs)


def test_pattern_checksum_and_a_changed_byte(env: dict[str, str]) -> None:
    with Workload(SIZE, seed=7, env=env) as work:
        assert work.ready["intact"] and work.ready["bytes"] == SIZE
        assert work.checksum == work.ready["expected"] == expected_checksum(7, SIZE)
        assert work.ready["device_uuid"] == "GPU-00000000-0000-0000-0000-000000000000"
        check = work.ask("check")
        assert (check["checksum"], check["intact"], check["bad_chunks"]) == (work.checksum, True, [])
        rates = work.ask("bandwidth")
        assert rates["bytes"] == SIZE and rates["pinned_htod_gb_s"] > 0 < rates["pinned_dtoh_gb_s"]
        assert work.ask("check")["checksum"] == work.checksum  # the bandwidth run left it alone

        # Change one byte of chunk 2 of "GPU memory".
        address = work.ready["device_pointer"] + 2 * CHUNK + 12345
        with open(f"/proc/{work.pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(address)
            old = mem.read(1)
            mem.seek(address)
            mem.write(bytes([old[0] ^ 0xFF]))
        after = work.ask("check")
        assert not after["intact"] and after["bad_chunks"] == [2]
        assert after["checksum"] != work.checksum
        assert work.ask("nonsense") == {"error": "unknown command 'nonsense'"}
    assert work.proc.returncode == 0


def test_loading_a_file_and_choosing_the_device(env: dict[str, str], tmp_path: Path) -> None:
    weights = tmp_path / "weights.bin"
    data = os.urandom(CHUNK + 999)
    weights.write_bytes(data)
    with Workload(len(data), seed=3, source=str(weights), env=env,
                  device="GPU-00000000-0000-0000-0000-000000000000") as work:
        assert work.ready["intact"]
        assert work.checksum == expected_checksum(3, len(data), data)
    with pytest.raises(DriverError, match="no GPU 'GPU-11111111"):
        Workload(CHUNK, env=env, device="GPU-11111111-0000-0000-0000-000000000000")
