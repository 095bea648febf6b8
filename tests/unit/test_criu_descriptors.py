"""runc's descriptors.json, written from a real process's stdio."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from kybernate.criu import read_descriptors, write_descriptors


def test_descriptors_record_pipe_file_and_null(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    out_path = tmp_path / "out.log"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(["sleep", "30"], stdin=read_end, stdout=out,
                                stderr=subprocess.DEVNULL)
    try:
        write_descriptors(tmp_path, proc.pid)
        expected = [f"pipe:[{os.fstat(read_end).st_ino}]", str(out_path), "/dev/null"]
        path = tmp_path / "descriptors.json"
        assert json.loads(path.read_text()) == expected
        assert read_descriptors(tmp_path) == expected
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        proc.kill()
        proc.wait()
        os.close(read_end)
        os.close(write_end)


def test_descriptors_of_missing_process_fail(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    with pytest.raises(FileNotFoundError):
        write_descriptors(tmp_path, proc.pid)
    assert not (tmp_path / "descriptors.json").exists()


def test_malformed_descriptors_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "descriptors.json").write_text('{"0": "pipe:[1]"}')
    with pytest.raises(ValueError, match="list of strings"):
        read_descriptors(tmp_path)
