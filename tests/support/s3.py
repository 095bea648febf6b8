"""An S3-compatible HTTP server for tests: moto in server mode on a loopback port."""

from __future__ import annotations

import socket

import boto3
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

    def make_bucket(self, bucket: str) -> None:
        boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                     aws_access_key_id="x", aws_secret_access_key="y").create_bucket(Bucket=bucket)
