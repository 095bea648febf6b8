"""What a ttrpc handler learns about the call it serves."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

NAMESPACE_METADATA_KEY = "containerd-namespace-ttrpc"


@dataclass(frozen=True)
class CallContext:
    service: str
    method: str
    # Metadata keys may repeat on the wire, so every key maps to all its values in order.
    metadata: dict[str, list[str]] = field(default_factory=dict, hash=False)
    # Absolute deadline on the event loop's clock (loop.time()); None when the caller set none.
    deadline: float | None = None

    @property
    def namespace(self) -> str | None:
        """The containerd namespace the caller acts in, or None when it sent none."""
        values = self.metadata.get(NAMESPACE_METADATA_KEY)
        return values[0] if values else None

    def time_remaining(self) -> float | None:
        """Seconds left before the deadline (negative once passed); None without one."""
        if self.deadline is None:
            return None
        return self.deadline - asyncio.get_running_loop().time()
