"""The retention policy's plan, and the in-use tracker it respects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kybernate.agent.inuse import InUse
from kybernate.agent.registry import CheckpointRow, CheckpointState, Tier
from kybernate.agent.retention import Candidate, RetentionPolicy, Scope, plan

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def row(n: int, *, container: str = "c1", size: int = 100, age_s: float = 0.0, tier: Tier = Tier.LOCAL,
        state: CheckpointState = CheckpointState.COMMITTED) -> CheckpointRow:
    return CheckpointRow(id=f"20261207T0000{n:02d}Z-{n:08x}", name=f"cp{n}", state=state, tier=tier, dirty=False,
                         size_bytes=size, file_count=1, checksums={}, container_id=container, namespace="ns",
                         image="", created_at=NOW - timedelta(seconds=age_s), error="")


def candidate(r: CheckpointRow, *, local: bool = True, uploaded: bool = False, in_use: bool = False,
              shared: bool = False) -> Candidate:
    return Candidate(row=r, local=local, uploaded=uploaded, in_use=in_use, shared=shared)


def decided(policy: RetentionPolicy, candidates: list[Candidate], remote: bool = False) -> dict[str, Scope]:
    return {d.checkpoint_id: d.scope for d in plan(policy, candidates, now=NOW, remote_configured=remote).decisions}


def test_keeps_the_newest_per_container() -> None:
    rows = [row(1, age_s=30), row(2, age_s=20), row(3, age_s=10), row(4, container="c2", age_s=40)]
    assert decided(RetentionPolicy(keep_per_container=2), [candidate(r) for r in rows]) == {rows[0].id: Scope.ALL}


def test_max_age() -> None:
    rows = [row(1, age_s=7200), row(2, age_s=60)]
    assert decided(RetentionPolicy(max_age_s=3600), [candidate(r) for r in rows]) == {rows[0].id: Scope.ALL}


def test_local_budget_evicts_uploaded_copies_and_keeps_what_is_not_uploaded() -> None:
    old_dirty, old_uploaded, new = row(1, age_s=30), row(2, age_s=20, tier=Tier.REMOTE), row(3, age_s=10)
    candidates = [candidate(old_dirty), candidate(old_uploaded, uploaded=True), candidate(new)]
    result = plan(RetentionPolicy(local_max_bytes=150), candidates, now=NOW, remote_configured=True)
    assert {d.checkpoint_id: d.scope for d in result.decisions} == {old_uploaded.id: Scope.LOCAL}
    assert any(old_dirty.id in kept and "not uploaded" in kept for kept in result.kept)
    # Without a remote tier, the oldest goes whole until the budget holds.
    assert decided(RetentionPolicy(local_max_bytes=150), [candidate(old_dirty), candidate(new)]) == {
        old_dirty.id: Scope.ALL}


def test_remote_budget() -> None:
    local_and_remote, remote_only, new = (row(1, age_s=30, tier=Tier.REMOTE), row(2, age_s=20, tier=Tier.REMOTE),
                                          row(3, age_s=10, tier=Tier.REMOTE))
    candidates = [candidate(local_and_remote, uploaded=True), candidate(remote_only, local=False, uploaded=True),
                  candidate(new, uploaded=True)]
    assert decided(RetentionPolicy(remote_max_bytes=100), candidates, remote=True) == {
        local_and_remote.id: Scope.REMOTE, remote_only.id: Scope.ALL}


def test_in_use_and_shared_checkpoints_stay() -> None:
    rows = [row(1, age_s=30), row(2, age_s=20), row(3, age_s=10)]
    result = plan(RetentionPolicy(keep_per_container=1),
                  [candidate(rows[0], in_use=True), candidate(rows[1], shared=True), candidate(rows[2])],
                  now=NOW, remote_configured=False)
    assert result.decisions == []
    assert len(result.kept) == 2 and "in use" in result.kept[1] + result.kept[0]


def test_only_committed_checkpoints_are_considered() -> None:
    failed = row(1, age_s=99999, state=CheckpointState.FAILED)
    assert decided(RetentionPolicy(max_age_s=1), [candidate(failed, local=False)]) == {}


def test_in_use_holds_expire_and_release() -> None:
    clock = [0.0]
    inuse = InUse(clock=lambda: clock[0])
    inuse.hold("a", "restore of container x", ttl_s=10)
    with inuse.using("a", "upload"):
        assert inuse.users("a") == ["restore of container x", "upload"]
    assert inuse.users("a") == ["restore of container x"]
    clock[0] = 11
    assert inuse.users("a") == []
    inuse.hold("b", "restore of container y")
    inuse.release("restore of container y")
    inuse.check_free("b", "removal")
