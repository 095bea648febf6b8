"""Agent configuration: TOML, flags on top, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from kybernate.agent.config import AgentConfig, config_from_args, config_from_mapping, load_file
from kybernate.errors import InvalidArgument


def test_defaults() -> None:
    config = config_from_args([])
    assert config == AgentConfig()
    assert config.socket == Path("/run/kybernate/agent.sock")
    assert config.local_tier == Path("/var/lib/kybernate/checkpoints")
    assert config.s3 is None


def test_file_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(f"""
socket = "{tmp_path}/a.sock"
state_dir = "{tmp_path}/state"
[cuda]
backend = "fake"
fake_dir = "{tmp_path}/fake"
lock_timeout_ms = 2500
[checkpoint]
open_tcp = true
leave_running = false
[s3]
bucket = "ckpt"
endpoint_url = "http://127.0.0.1:9"
prefix = "node-a/"
max_attempts = 3
backoff_base_s = 0.1
[debug]
hold_after_phase = {{ dumped = 2.5 }}
""")
    config = config_from_args(["--config", str(path), "--local-tier", str(tmp_path / "tier")])
    assert config.socket == tmp_path / "a.sock"
    assert config.local_tier == tmp_path / "tier"
    assert (config.cuda_backend, config.cuda_fake_dir) == ("fake", tmp_path / "fake")
    assert config.gpu_lock_timeout_ms == 2500
    assert config.default_open_tcp and not config.default_leave_running
    assert config.s3 is not None and config.s3.url == "s3://ckpt/node-a/"
    assert config.s3.max_attempts == 3 and config.s3.backoff_base_s == 0.1
    assert config.debug_hold_after_phase == {"dumped": 2.5}
    assert config.registry_path == tmp_path / "state" / "registry.db"


@pytest.mark.parametrize("data, message", [
    ({"sockett": "/x"}, "unknown key 'sockett'"),
    ({"cuda": {"backend": "opencl"}}, "cuda backend 'opencl'"),
    ({"cuda": {"backend": "fake"}}, "needs fake_dir"),
    ({"cuda": {"lock_timeout_ms": True}}, "wrong type"),
    ({"s3": {"prefix": "p/"}}, "needs a bucket"),
    ({"debug": {"hold_after_phase": {"thawed": 1}}}, "unknown phase 'thawed'"),
    ({"state_dir": "relative/dir"}, "must be an absolute path"),
    ({"metrics": {"port": 70000}}, "out of range"),
])
def test_bad_config_is_refused(data: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        config_from_mapping(data)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        load_file(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("socket = \n")
    with pytest.raises(InvalidArgument, match="bad.toml"):
        load_file(bad)


def test_node_name_defaults_to_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "GPU-Node-7.example")
    assert AgentConfig().node_name == "gpu-node-7.example"
    assert config_from_mapping({"node_name": "node-b"}).node_name == "node-b"
    assert config_from_args(["--node-name", "node-c"]).node_name == "node-c"


@pytest.mark.parametrize("node", ["Node_A", "../a", "a/b", ""])
def test_node_name_that_cannot_be_a_key_is_refused(node: str) -> None:
    with pytest.raises(InvalidArgument, match="node name .*set node_name"):
        config_from_mapping({"node_name": node})


def test_s3_transfer_and_retry_settings() -> None:
    config = config_from_mapping({"s3": {"bucket": "b", "retry_mode": "adaptive", "request_max_attempts": 6,
                                         "part_size_bytes": 16 << 20, "max_concurrency": 8}})
    assert config.s3 is not None
    assert (config.s3.retry_mode, config.s3.request_max_attempts) == ("adaptive", 6)
    assert (config.s3.part_size_bytes, config.s3.max_concurrency) == (16 << 20, 8)
    defaults = config_from_mapping({"s3": {"bucket": "b"}}).s3
    assert defaults is not None and (defaults.retry_mode, defaults.part_size_bytes) == ("standard", 64 << 20)


@pytest.mark.parametrize("s3, message", [
    ({"retry_mode": "legacy"}, "retry_mode 'legacy'"),
    ({"retry_mode": ""}, "retry_mode ''"),
    ({"request_max_attempts": 0}, "at least 1"),
    ({"part_size_bytes": 1 << 20}, "outside S3's"),
    ({"part_size_bytes": 6 << 30}, "outside S3's"),
    ({"max_concurrency": 0}, "max_concurrency 0"),
])
def test_bad_s3_settings_are_refused(s3: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        config_from_mapping({"s3": {"bucket": "b", **s3}})


def test_writable_layer_default_is_on_and_configurable() -> None:
    from kybernate.agent.config import config_from_mapping

    assert config_from_mapping({}).default_rootfs_diff is True
    assert config_from_mapping({"checkpoint": {"rootfs_diff": False}}).default_rootfs_diff is False
