"""Metrics: each agent has its own registry, served over HTTP when asked."""

from __future__ import annotations

import socket
import urllib.request

from kybernate.agent.metrics import AgentMetrics


def test_metrics_are_per_agent_and_served() -> None:
    first, second = AgentMetrics(), AgentMetrics()
    first.checkpoint_finished("committed")
    first.phase_reached("dumped", 0.3)
    first.dirty_checkpoints.set(2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first.serve(port)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        first.close()
    assert 'kybernate_checkpoints_total{result="committed"} 1.0' in body
    assert 'kybernate_checkpoint_phase_seconds_count{phase="dumped"} 1.0' in body
    assert "kybernate_dirty_checkpoints 2.0" in body
    assert second.registry.get_sample_value("kybernate_checkpoints_total", {"result": "committed"}) is None
