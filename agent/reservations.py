"""Claims on a container's next checkpoint, for clients that ask containerd for it.

`kybernate checkpoint create` checkpoints a container through containerd's task API,
so that the request goes through the container's shim and its kill policy. That API
carries no checkpoint name, and containerd packs whatever the shim leaves in its
directory into its content store. So the client first claims the container's next
checkpoint here: the pipeline that checkpoint runs takes the claim's name and keeps
the checkpoint in the registry only. A claim expires (a client that died leaves none
behind for long), and only one claim per container is held at a time.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from kybernate.agent import naming
from kybernate.errors import AlreadyExists, InvalidArgument

DEFAULT_TTL_S = 600.0
MAX_TTL_S = 24 * 3600.0


@dataclasses.dataclass(frozen=True)
class Claim:
    name: str
    expires_at: float


class Reservations:
    """The claims held now, by (containerd namespace, container id)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._claims: dict[tuple[str, str], Claim] = {}

    def reserve(self, namespace: str, container_id: str, name: str, ttl_s: float = 0.0) -> None:
        key = (naming.containerd_namespace(namespace), naming.container_id(container_id))
        naming.checkpoint_name(name)
        if ttl_s < 0 or ttl_s > MAX_TTL_S:
            raise InvalidArgument(f"a checkpoint claim lasts up to {MAX_TTL_S:.0f}s, not {ttl_s}")
        held = self._live(key)
        if held is not None:
            raise AlreadyExists(f"the next checkpoint of {namespace}/{container_id} is already claimed"
                                f" (as {held.name!r})")
        self._claims[key] = Claim(name, self._clock() + (ttl_s or DEFAULT_TTL_S))

    def release(self, namespace: str, container_id: str, name: str) -> None:
        """Drop the claim if it is still this name's (a taken one is gone already)."""
        key = (namespace, container_id)
        held = self._claims.get(key)
        if held is not None and held.name == name:
            del self._claims[key]

    def take(self, namespace: str, container_id: str) -> str | None:
        """The claimed name for this checkpoint (the claim is used up), or None."""
        held = self._live((namespace, container_id))
        if held is None:
            return None
        del self._claims[(namespace, container_id)]
        return held.name

    def _live(self, key: tuple[str, str]) -> Claim | None:
        held = self._claims.get(key)
        if held is not None and held.expires_at <= self._clock():
            del self._claims[key]
            return None
        return held
