"""The agent's GPU map for a restore (GpuControl.restore_fit) over the fake backend's
inventory: no map when nothing moves, every checkpointed GPU when anything does, and
metadata from outside checked before it decides anything."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from kybernate.agent.gpu import GpuControl
from kybernate.cuda.fake import FakeBackend
from kybernate.errors import FailedPrecondition, InvalidArgument, ResourceExhausted

GIB = 1 << 30
GPU_A = "GPU-aaaaaaaa-0000-4000-8000-000000000001"
GPU_B = "GPU-bbbbbbbb-0000-4000-8000-000000000002"
GPU_C = "GPU-cccccccc-0000-4000-8000-000000000003"
GPU_D = "GPU-dddddddd-0000-4000-8000-000000000004"
H100 = "NVIDIA H100 80GB HBM3"


def node(tmp_path: Path, *gpus: tuple[str, str, int]) -> GpuControl:
    FakeBackend(tmp_path).write_gpus(
        [{"uuid": u, "model": m, "memory_total": t} for u, m, t in gpus])
    return GpuControl("fake", str(tmp_path))


def metadata(*gpus: tuple[str, str, int]) -> dict[str, Any]:
    return {"cuda": {"gpus": [{"uuid": u, "model": m, "memory_used_by_container": used}
                              for u, m, used in gpus]}}


def fit(control: GpuControl, meta: dict[str, Any]) -> dict[str, str]:
    return asyncio.run(control.restore_fit(meta))


def test_no_map_when_every_gpu_is_in_place(tmp_path: Path) -> None:
    control = node(tmp_path, (GPU_A, H100, 80 * GIB), (GPU_B, H100, 80 * GIB))
    assert fit(control, metadata((GPU_A, H100, 10 * GIB), (GPU_B, H100, 0))) == {}
    assert fit(control, {"cuda": {"gpus": []}}) == {}
    assert fit(control, {}) == {}


def test_a_move_maps_every_checkpointed_gpu(tmp_path: Path) -> None:
    # Another node: neither UUID is here. Both GPUs the checkpoint covers get a target,
    # the one that held no memory too.
    control = node(tmp_path, (GPU_C, H100, 80 * GIB), (GPU_D, H100, 80 * GIB))
    plan = fit(control, metadata((GPU_A, H100, 10 * GIB), (GPU_B, H100, 0)))
    assert set(plan) == {GPU_A, GPU_B} and set(plan.values()) == {GPU_C, GPU_D}
    # One of them here: it stays, the other moves, and both are named.
    control = node(tmp_path, (GPU_A, H100, 80 * GIB), (GPU_C, H100, 80 * GIB))
    assert fit(control, metadata((GPU_A, H100, 10 * GIB), (GPU_B, H100, 0))) == \
        {GPU_A: GPU_A, GPU_B: GPU_C}


def test_what_does_not_fit_is_refused_with_need_and_free(tmp_path: Path) -> None:
    control = node(tmp_path, (GPU_A, H100, 4 * GIB))
    with pytest.raises(ResourceExhausted, match=f"GPU {GPU_A}: need {10 * GIB}, free {4 * GIB}"):
        fit(control, metadata((GPU_A, H100, 10 * GIB)))
    with pytest.raises(FailedPrecondition, match="no NVIDIA A100 GPU on this node"):
        fit(control, metadata((GPU_A, "NVIDIA A100", GIB)))
    with pytest.raises(ResourceExhausted, match="already taken"):
        fit(control, metadata((GPU_A, H100, 0), (GPU_B, H100, 0)))


@pytest.mark.parametrize("bad, reason", [
    ({"cuda": {"gpus": "GPU-a"}}, "not a list"),
    ({"cuda": "x"}, "not a list"),
    ({"cuda": {"gpus": ["x"]}}, "not an object"),
    (metadata(("../../etc", H100, 0)), "not a GPU UUID"),
    ({"cuda": {"gpus": [{"uuid": 7, "model": H100}]}}, "is not a string"),
    (metadata((GPU_A, "", 0)), "no usable model"),
    ({"cuda": {"gpus": [{"uuid": GPU_A, "model": ["H100"]}]}}, "no usable model"),
    (metadata((GPU_A, H100, -1)), "is not bytes"),
    ({"cuda": {"gpus": [{"uuid": GPU_A, "model": H100, "memory_used_by_container": "1"}]}},
     "is not bytes"),
    (metadata((GPU_A, H100, 0), (GPU_A, H100, 0)), "listed twice"),
])
def test_metadata_from_outside_is_checked(tmp_path: Path, bad: dict[str, Any], reason: str) -> None:
    control = node(tmp_path, (GPU_A, H100, 80 * GIB))
    with pytest.raises(InvalidArgument, match=reason):
        fit(control, bad)
