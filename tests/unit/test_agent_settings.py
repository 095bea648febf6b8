"""Agent socket resolution and per-container checkpoint options (shim side)."""

from __future__ import annotations

from pathlib import Path

import pytest
from kybernate.errors import InvalidArgument
from kybernate.shim.agent_settings import (
    ContainerCheckpointSettings,
    agent_checkpoint_options,
    agent_socket,
    checkpoint_settings,
    restore_from,
)
from kybernate.shim.options import CheckpointRequestOptions


def _spec(**annotations: str) -> dict[str, object]:
    return {"annotations": annotations}


def test_agent_socket_annotation_then_environment_then_default() -> None:
    env = {"KYBERNATE_AGENT_SOCKET": "/env/agent.sock"}
    assert agent_socket(_spec(**{"io.kybernate.agent-socket": "/a/agent.sock"}), env) == Path("/a/agent.sock")
    assert agent_socket(_spec(), env) == Path("/env/agent.sock")
    assert agent_socket({}, {}) == Path("/run/kybernate/agent.sock")
    with pytest.raises(InvalidArgument, match="absolute"):
        agent_socket(_spec(**{"io.kybernate.agent-socket": "relative.sock"}), {})


def test_checkpoint_annotations_parse() -> None:
    settings = checkpoint_settings(_spec(**{
        "io.kybernate.checkpoint.tcp-established": "true",
        "io.kybernate.checkpoint.leave-running": "false",
        "io.kybernate.checkpoint.gpu-lock-timeout-ms": "2500",
        "io.kybernate.checkpoint.rootfs-diff": "yes",
        "io.kybernate.checkpoint.deadline-ms": "60000",
        "unrelated": "x",
    }))
    assert settings == ContainerCheckpointSettings(tcp_established=True, exit=True, gpu_lock_timeout_ms=2500,
                                                   rootfs_diff=True, deadline_ms=60000)
    assert checkpoint_settings({}) == ContainerCheckpointSettings()


@pytest.mark.parametrize(("key", "value", "message"), [
    ("io.kybernate.checkpoint.exit", "maybe", "true or false"),
    ("io.kybernate.checkpoint.deadline-ms", "10s", "milliseconds"),
    ("io.kybernate.checkpoint.gpu-lock-timeout-ms", "-1", "out of range"),
    ("io.kybernate.checkpoint.tcp-establish", "true", "unknown annotation"),
])
def test_bad_checkpoint_annotations_are_refused(key: str, value: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        checkpoint_settings(_spec(**{key: value}))


def test_exit_and_leave_running_must_agree() -> None:
    with pytest.raises(InvalidArgument, match="contradict"):
        checkpoint_settings(_spec(**{"io.kybernate.checkpoint.exit": "true",
                                     "io.kybernate.checkpoint.leave-running": "true"}))
    agreed = checkpoint_settings(_spec(**{"io.kybernate.checkpoint.exit": "true",
                                          "io.kybernate.checkpoint.leave-running": "false"}))
    assert agreed.exit is True


def test_request_options_win_then_annotations_then_agent_defaults() -> None:
    annotated = ContainerCheckpointSettings(tcp_established=False, exit=False, rootfs_diff=True,
                                            gpu_lock_timeout_ms=700, deadline_ms=9000)
    asked = agent_checkpoint_options(annotated, CheckpointRequestOptions(exit=True, open_tcp=True,
                                                                         file_locks=True))
    assert (asked.exit, asked.open_tcp, asked.file_locks) == (True, True, True)
    assert (asked.rootfs_diff, asked.gpu_lock_timeout_ms, asked.deadline_ms) == (True, 700, 9000)

    from_annotations = agent_checkpoint_options(annotated, CheckpointRequestOptions())
    assert from_annotations.HasField("exit") and not from_annotations.exit
    assert from_annotations.HasField("open_tcp") and not from_annotations.open_tcp

    defaults = agent_checkpoint_options(ContainerCheckpointSettings(), CheckpointRequestOptions())
    assert not defaults.HasField("exit") and not defaults.HasField("open_tcp"), "left to the agent's config"


def test_restore_from_annotation() -> None:
    assert restore_from(_spec(**{"io.kybernate.restore-from": " golden-llama "})) == "golden-llama"
    assert restore_from({}) == ""


def test_restore_from_through_cri_skips_the_sandbox_and_names_containers() -> None:
    pod = {"io.kybernate.restore-from": "golden", "io.kubernetes.cri.sandbox-namespace": "team"}
    assert restore_from(_spec(**pod, **{"io.kubernetes.cri.container-type": "sandbox"})) == ""
    assert restore_from(_spec(**pod, **{"io.kubernetes.cri.container-type": "container",
                                        "io.kubernetes.cri.container-name": "server"})) == "golden"
    named = {**pod, "io.kybernate.restore-from.server": "golden-server"}
    assert restore_from(_spec(**named, **{"io.kubernetes.cri.container-name": "server"})) == "golden-server"
    assert restore_from(_spec(**named, **{"io.kubernetes.cri.container-name": "sidecar"})) == "golden"
