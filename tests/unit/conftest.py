"""Fixtures of the unit tests that need an S3 server (moto over HTTP, in this process)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.support.s3 import S3Server, running_s3


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with running_s3() as server:
        yield server


@pytest.fixture
def bucket(s3: S3Server) -> str:
    """A new bucket: moto keeps every bucket of the process, so each test gets its own."""
    name = f"kyb-{uuid.uuid4().hex[:16]}"
    s3.make_bucket(name)
    return name
