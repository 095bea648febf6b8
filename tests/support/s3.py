"""An S3-compatible HTTP server for tests: moto in server mode on a loopback port."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
from botocore.config import Config
from kybernate.agent.config import PART_SIZE_MIN, S3Config
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import ThreadedMotoServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class S3Server:
    """A moto server that tests can stop and start again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server: ThreadedMotoServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def client(self, config: Config | None = None) -> Any:
        """A plain boto3 client of this server: another writer of the bucket."""
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="x", aws_secret_access_key="y", config=config)

    def make_bucket(self, bucket: str) -> None:
        self.client().create_bucket(Bucket=bucket)

    def rot_stored_object(self, bucket: str, key: str, offset: int = 0) -> None:
        """Flip one bit of a stored object's bytes, leaving the checksum the server
        stored at upload: the store's own corruption, which only that checksum shows.
        The server runs in this process, so its storage is at hand."""
        stored = s3_backends[DEFAULT_ACCOUNT_ID]["global"].buckets[bucket].keys[key]
        data = bytearray(stored.value)
        data[offset] ^= 1
        stored.value = bytes(data)


@contextmanager
def running_s3() -> Iterator[S3Server]:
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def s3_config(server: S3Server, bucket: str, **overrides: Any) -> S3Config:
    """An agent's [s3] section for `bucket` on `server`: small parts, quick retries."""
    settings: dict[str, Any] = {
        "bucket": bucket, "endpoint_url": server.url, "prefix": "kyb/", "region": "us-east-1",
        "access_key_id": "kyb-test", "secret_access_key": "kyb-test-secret", "max_attempts": 2,
        "backoff_base_s": 0.05, "backoff_max_s": 0.1, "promote_interval_s": 0.3,
        "part_size_bytes": PART_SIZE_MIN, "max_concurrency": 2}
    return S3Config(**(settings | overrides))
