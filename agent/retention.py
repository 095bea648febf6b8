"""The retention policy: which checkpoints (or which of their copies) may go.

Set in the agent's configuration (`[retention]`), applied in the background every
`interval_s` and on demand (`kybernate checkpoint gc`). Planning is a pure function of
the registry's rows and what is known of each (local copy, uploaded, in use, shared),
so it can be read and tested on its own; `Collector` carries a plan out.

Rules, in this order:
1. beyond the newest `keep_per_container` committed checkpoints of one container
   (namespace and container id), or older than `max_age_s`: the checkpoint goes,
   everywhere (local files, remote copy, registry row);
2. while the local tier holds more than `local_max_bytes`: the oldest local copies
   go; a checkpoint already uploaded keeps its remote copy and its row (a restore
   fetches it again); one that is not uploaded yet stays (it would be lost) unless
   there is no remote tier, where it goes whole;
3. while the remote tier holds more than `remote_max_bytes`: the oldest remote copies
   go; a checkpoint whose local copy stays is local again, one without goes whole.

Never taken: a checkpoint in use (a restore, upload, fetch or export of it right now),
and one shared with other namespaces (a golden snapshot others restore): those go only
by `kybernate checkpoint rm`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from kybernate.agent.registry import CheckpointRow, CheckpointState


@dataclasses.dataclass(frozen=True)
class RetentionPolicy:
    keep_per_container: int = 0  # 0: no limit
    max_age_s: float = 0.0  # 0: no limit
    local_max_bytes: int = 0  # 0: no budget
    remote_max_bytes: int = 0  # 0: no budget
    interval_s: float = 3600.0  # 0: only on demand

    @property
    def active(self) -> bool:
        return bool(self.keep_per_container or self.max_age_s or self.local_max_bytes or self.remote_max_bytes)


class Scope(enum.StrEnum):
    LOCAL = "local"  # the local copy only
    REMOTE = "remote"  # the remote copy only
    ALL = "all"  # both copies and the registry row


@dataclasses.dataclass(frozen=True)
class Candidate:
    row: CheckpointRow
    local: bool  # a committed copy in the local tier
    uploaded: bool  # a complete copy in the remote tier
    in_use: bool = False
    shared: bool = False

    @property
    def protected(self) -> bool:
        return self.in_use or self.shared


@dataclasses.dataclass(frozen=True)
class Decision:
    checkpoint_id: str
    scope: Scope
    reason: str


@dataclasses.dataclass(frozen=True)
class Plan:
    decisions: list[Decision]
    # Checkpoints a rule would take but that stay, with why.
    kept: list[str]


def plan(policy: RetentionPolicy, candidates: Iterable[Candidate], *, now: datetime,
         remote_configured: bool) -> Plan:
    live = sorted((c for c in candidates if c.row.state is CheckpointState.COMMITTED),
                  key=lambda c: (c.row.created_at, c.row.id))
    decisions: list[Decision] = []
    kept: list[str] = []
    gone: set[str] = set()

    def take(candidate: Candidate, scope: Scope, reason: str) -> bool:
        if candidate.protected:
            why = "in use" if candidate.in_use else "shared with other namespaces"
            kept.append(f"{candidate.row.qualified_name} ({candidate.row.id}): {reason}, but {why}")
            return False
        decisions.append(Decision(candidate.row.id, scope, reason))
        return True

    # 1. count and age: the whole checkpoint.
    if policy.keep_per_container:
        groups: dict[tuple[str, str], list[Candidate]] = {}
        for candidate in live:
            groups.setdefault((candidate.row.namespace, candidate.row.container_id), []).append(candidate)
        for (namespace, container), members in groups.items():
            for candidate in reversed(members[:-policy.keep_per_container] if len(members) > policy.keep_per_container
                                      else []):
                if take(candidate, Scope.ALL, f"beyond the newest {policy.keep_per_container} of container"
                                              f" {namespace}/{container or '?'}"):
                    gone.add(candidate.row.id)
    if policy.max_age_s:
        oldest_kept = now - timedelta(seconds=policy.max_age_s)
        for candidate in live:
            if (candidate.row.id not in gone and candidate.row.created_at < oldest_kept
                    and take(candidate, Scope.ALL, f"older than {policy.max_age_s:g}s")):
                gone.add(candidate.row.id)

    remaining = [c for c in live if c.row.id not in gone]
    local_gone: set[str] = set()
    # 2. the local budget: oldest local copies first.
    if policy.local_max_bytes:
        held = sum(c.row.size_bytes for c in remaining if c.local)
        for candidate in remaining:
            if held <= policy.local_max_bytes:
                break
            if not candidate.local:
                continue
            reason = f"the local tier holds {held} bytes, over its budget of {policy.local_max_bytes}"
            if candidate.uploaded:
                scope = Scope.LOCAL
            elif not remote_configured:
                scope = Scope.ALL
            else:
                kept.append(f"{candidate.row.qualified_name} ({candidate.row.id}): {reason}, but not uploaded yet")
                continue
            if take(candidate, scope, reason):
                held -= candidate.row.size_bytes
                local_gone.add(candidate.row.id)
                if scope is Scope.ALL:
                    gone.add(candidate.row.id)

    # 3. the remote budget: oldest remote copies first.
    if policy.remote_max_bytes:
        remaining = [c for c in remaining if c.row.id not in gone]
        held = sum(c.row.size_bytes for c in remaining if c.uploaded)
        for candidate in remaining:
            if held <= policy.remote_max_bytes:
                break
            if not candidate.uploaded:
                continue
            keeps_local = candidate.local and candidate.row.id not in local_gone
            reason = f"the remote tier holds {held} bytes, over its budget of {policy.remote_max_bytes}"
            if take(candidate, Scope.REMOTE if keeps_local else Scope.ALL, reason):
                held -= candidate.row.size_bytes
                if not keeps_local:
                    # Its local copy was already planned away: it goes whole.
                    decisions[:] = [d for d in decisions if d.checkpoint_id != candidate.row.id or d.scope is Scope.ALL]
                    gone.add(candidate.row.id)
    return Plan(_merged(decisions), kept)


def _merged(decisions: Sequence[Decision]) -> list[Decision]:
    """One decision per checkpoint: the widest."""
    chosen: dict[str, Decision] = {}
    for decision in decisions:
        previous = chosen.get(decision.checkpoint_id)
        if previous is None or decision.scope is Scope.ALL:
            chosen[decision.checkpoint_id] = decision
    return list(chosen.values())
