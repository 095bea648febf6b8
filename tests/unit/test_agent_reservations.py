"""Claims on a container's next checkpoint (kybernate checkpoint create)."""

from __future__ import annotations

import pytest
from kybernate.agent.reservations import DEFAULT_TTL_S, Reservations
from kybernate.cli.containerd_api import pod_container_filter
from kybernate.errors import AlreadyExists, InvalidArgument


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_claim_names_the_next_checkpoint_once() -> None:
    claims = Reservations(Clock())
    claims.reserve("k8s.io", "c1", "golden")
    with pytest.raises(AlreadyExists, match="golden"):
        claims.reserve("k8s.io", "c1", "other")
    assert claims.take("default", "c1") is None  # another namespace's container
    assert claims.take("k8s.io", "c1") == "golden"
    assert claims.take("k8s.io", "c1") is None


def test_a_claim_expires_and_release_drops_only_its_own() -> None:
    clock = Clock()
    claims = Reservations(clock)
    claims.reserve("k8s.io", "c1", "golden")
    claims.release("k8s.io", "c1", "someone-else")
    clock.now += DEFAULT_TTL_S + 1
    assert claims.take("k8s.io", "c1") is None
    claims.reserve("k8s.io", "c1", "again", ttl_s=5)
    claims.release("k8s.io", "c1", "again")
    assert claims.take("k8s.io", "c1") is None


@pytest.mark.parametrize("namespace, container, name", [
    ("k8s io", "c1", "n"), ("k8s.io", "../c1", "n"), ("k8s.io", "c1", "../n"), ("k8s.io", "c1", ""),
])
def test_claims_validate_what_they_are_given(namespace: str, container: str, name: str) -> None:
    with pytest.raises(InvalidArgument):
        Reservations(Clock()).reserve(namespace, container, name)


def test_pod_container_filter_takes_only_kubernetes_names() -> None:
    assert pod_container_filter("team", "web-0", "server") == (
        'labels."io.kubernetes.pod.namespace"==team,labels."io.kubernetes.pod.name"==web-0,'
        'labels."io.kubernetes.container.name"==server,labels."io.cri-containerd.kind"==container')
    for bad in (("team", 'web",x', "server"), ("Team", "web", "server"), ("team", "web", "a,b")):
        with pytest.raises(InvalidArgument):
            pod_container_filter(*bad)
