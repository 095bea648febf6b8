"""Prometheus metrics of one agent, in a registry the agent owns (no global state)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http: Any = None
        self._checkpoints = Counter(
            "kybernate_checkpoints", "Checkpoints finished, by result", ["result"], registry=self.registry)
        self._phase_seconds = Histogram(
            "kybernate_checkpoint_phase_seconds", "Seconds from acceptance until each phase was reached",
            ["phase"], registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self._restores = Counter(
            "kybernate_restores", "Restores prepared or completed, by step and result", ["step", "result"],
            registry=self.registry)
        self.dirty_checkpoints = Gauge(
            "kybernate_dirty_checkpoints", "Committed checkpoints not yet uploaded", registry=self.registry)
        self._uploads = Counter(
            "kybernate_uploads", "Checkpoint uploads to the remote tier", registry=self.registry)

    def phase_reached(self, phase: str, seconds: float) -> None:
        self._phase_seconds.labels(phase=phase).observe(seconds)

    def checkpoint_finished(self, result: str) -> None:
        self._checkpoints.labels(result=result).inc()

    def restore_step(self, step: str, result: str) -> None:
        self._restores.labels(step=step, result=result).inc()

    def uploaded(self) -> None:
        self._uploads.inc()

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP on a background thread until `close()`."""
        self._http, _ = start_http_server(port, addr=addr, registry=self.registry)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
