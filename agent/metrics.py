"""Prometheus metrics of one agent, in a registry the agent owns (no global state).

Served on `[metrics] port` when configured:
- kybernate_checkpoints_total{result}: checkpoints finished (committed, failed)
- kybernate_checkpoint_phase_seconds{phase}: from acceptance until each phase was reached
- kybernate_checkpoint_phase_duration_seconds{phase}: time spent reaching a phase from the one before
- kybernate_phase_bytes_total{phase} and kybernate_phase_gigabytes_per_second{phase}: the
  bytes and the last throughput of the phases that move data (dumped, committed; upload,
  download, export, import, verify)
- kybernate_restores_total{step,result}: restores prepared and completed
- kybernate_tier_bytes{tier} and kybernate_tier_checkpoints{tier}: what each tier holds
- kybernate_dirty_checkpoints: committed checkpoints not yet uploaded
- kybernate_uploads_total, kybernate_upload_retries_total
- kybernate_collected_checkpoints_total{scope}: copies the retention policy or rm removed
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http: Any = None
        self._checkpoints = Counter(
            "kybernate_checkpoints", "Checkpoints finished, by result", ["result"], registry=self.registry)
        self._phase_seconds = Histogram(
            "kybernate_checkpoint_phase_seconds", "Seconds from acceptance until each phase was reached",
            ["phase"], registry=self.registry, buckets=_SECONDS_BUCKETS)
        self._phase_duration = Histogram(
            "kybernate_checkpoint_phase_duration_seconds",
            "Seconds each phase took, from the phase before it", ["phase"], registry=self.registry,
            buckets=_SECONDS_BUCKETS)
        self._phase_bytes = Counter(
            "kybernate_phase_bytes", "Bytes moved by the phases that move data", ["phase"], registry=self.registry)
        self._phase_rate = Gauge(
            "kybernate_phase_gigabytes_per_second", "Throughput of the last run of each data-moving phase (GB/s)",
            ["phase"], registry=self.registry)
        self._restores = Counter(
            "kybernate_restores", "Restores prepared or completed, by step and result", ["step", "result"],
            registry=self.registry)
        self.dirty_checkpoints = Gauge(
            "kybernate_dirty_checkpoints", "Committed checkpoints not yet uploaded", registry=self.registry)
        self._uploads = Counter(
            "kybernate_uploads", "Checkpoint uploads to the remote tier", registry=self.registry)
        self._upload_retries = Counter(
            "kybernate_upload_retries", "Upload attempts that failed and were retried", registry=self.registry)
        self._tier_bytes = Gauge(
            "kybernate_tier_bytes", "Bytes of committed checkpoints in each tier", ["tier"], registry=self.registry)
        self._tier_count = Gauge(
            "kybernate_tier_checkpoints", "Committed checkpoints in each tier", ["tier"], registry=self.registry)
        self._collected = Counter(
            "kybernate_collected_checkpoints", "Checkpoint copies removed (retention policy or rm), by scope",
            ["scope"], registry=self.registry)

    def phase_reached(self, phase: str, seconds: float, previous_seconds: float = 0.0) -> None:
        self._phase_seconds.labels(phase=phase).observe(seconds)
        self._phase_duration.labels(phase=phase).observe(max(0.0, seconds - previous_seconds))

    def data_moved(self, phase: str, size_bytes: int, seconds: float) -> None:
        """A phase that moved `size_bytes` in `seconds`."""
        self._phase_bytes.labels(phase=phase).inc(max(0, size_bytes))
        if seconds > 0:
            self._phase_rate.labels(phase=phase).set(size_bytes / seconds / 1e9)

    def checkpoint_finished(self, result: str) -> None:
        self._checkpoints.labels(result=result).inc()

    def restore_step(self, step: str, result: str) -> None:
        self._restores.labels(step=step, result=result).inc()

    def uploaded(self) -> None:
        self._uploads.inc()

    def upload_retried(self) -> None:
        self._upload_retries.inc()

    def collected(self, scope: str) -> None:
        self._collected.labels(scope=scope).inc()

    def occupancy(self, tier: str, size_bytes: int, count: int) -> None:
        self._tier_bytes.labels(tier=tier).set(size_bytes)
        self._tier_count.labels(tier=tier).set(count)

    def serve(self, port: int, addr: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP on a background thread until `close()`."""
        self._http, _ = start_http_server(port, addr=addr, registry=self.registry)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
