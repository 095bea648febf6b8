"""The small things: `kybernate agent` without the agent extra, JSON logs, the
agent's new configuration keys."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from kybernate.agent.config import config_from_args, config_from_mapping
from kybernate.agent.logs import JsonFormatter
from kybernate.errors import InvalidArgument

# Hides grpc as an installation without the `agent` extra would.
WITHOUT_GRPC = """
import sys
class HideGrpc:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "grpc":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, HideGrpc())
from kybernate.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv", [["agent", "--socket", "/tmp/kyb-no-grpc.sock"],
                                  ["checkpoint", "list", "--socket", "/dev/null"]])
def test_without_the_agent_extra_says_how_to_install_it(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-c", WITHOUT_GRPC, *argv], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 3, result.stderr
    assert "pip install 'kybernate[agent]'" in result.stderr and "grpc" in result.stderr
    assert "Traceback" not in result.stderr


def test_json_log_lines() -> None:
    record = logging.LogRecord("kybernate.agent", logging.WARNING, __file__, 1, "checkpoint %s failed", ("x",), None)
    record.checkpoint_id = "x"
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "warning" and line["message"] == "checkpoint x failed"
    assert line["logger"] == "kybernate.agent" and line["checkpoint_id"] == "x" and line["time"].endswith("+00:00")


def test_configuration_keys() -> None:
    config = config_from_mapping({
        "retention": {"keep_per_container": 3, "max_age_s": 86400, "local_max_bytes": 10, "remote_max_bytes": 20,
                      "interval_s": 60, "restore_hold_s": 30},
        "oci": {"registries": ["registry.example.com", "127.0.0.1:5000"], "plain_http": ["127.0.0.1:5000"]},
        "metrics": {"port": 9464, "address": "0.0.0.0", "occupancy_interval_s": 5},
        "log": {"format": "json", "level": "debug"}})
    assert config.retention.keep_per_container == 3 and config.retention.max_age_s == 86400.0
    assert config.restore_hold_s == 30.0 and config.oci_plain_http == ("127.0.0.1:5000",)
    assert config.log_format == "json" and config.metrics_address == "0.0.0.0"
    assert config_from_args(["--log-format", "json"]).log_format == "json"
    for bad in ({"log": {"format": "xml"}}, {"retention": {"keep_per_container": -1}},
                {"oci": {"registries": ["http://x"]}}, {"retention": {"nope": 1}}):
        with pytest.raises(InvalidArgument):
            config_from_mapping(bad)
