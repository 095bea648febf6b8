"""Which checkpoints are in use right now, and by what: restores between PrepareRestore
and CompleteRestore, uploads, fetches, exports, verifications.

Removal (`kybernate checkpoint rm`) and the retention policy ask here first and leave
a checkpoint in use alone. A restore's hold ends at CompleteRestore for its container,
or after a timeout: a shim that died half way must not pin a checkpoint for ever.
Lives on the event loop; never touched from threads.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from kybernate.errors import FailedPrecondition


class InUse:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # checkpoint id -> user -> expiry (monotonic seconds; None: until released)
        self._users: dict[str, dict[str, float | None]] = {}

    @contextlib.contextmanager
    def using(self, checkpoint_id: str, user: str) -> Iterator[None]:
        """Hold `checkpoint_id` for the duration of a block."""
        self.hold(checkpoint_id, user)
        try:
            yield
        finally:
            self.release(user, checkpoint_id)

    def hold(self, checkpoint_id: str, user: str, ttl_s: float | None = None) -> None:
        expiry = None if ttl_s is None else self._clock() + ttl_s
        self._users.setdefault(checkpoint_id, {})[user] = expiry

    def release(self, user: str, checkpoint_id: str | None = None) -> None:
        """End `user`'s hold on one checkpoint, or on every checkpoint."""
        ids = [checkpoint_id] if checkpoint_id is not None else list(self._users)
        for held in ids:
            users = self._users.get(held)
            if users is not None:
                users.pop(user, None)
                if not users:
                    del self._users[held]

    def users(self, checkpoint_id: str) -> list[str]:
        now = self._clock()
        users = self._users.get(checkpoint_id, {})
        for user, expiry in list(users.items()):
            if expiry is not None and expiry <= now:
                del users[user]
        if not users:
            self._users.pop(checkpoint_id, None)
        return sorted(users)

    def check_free(self, checkpoint_id: str, what: str) -> None:
        """FailedPrecondition naming the users when `checkpoint_id` is in use."""
        if users := self.users(checkpoint_id):
            raise FailedPrecondition(f"{what}: checkpoint {checkpoint_id} is in use by {', '.join(users)};"
                                     " try again once that is done")
