"""The relay's wire format: what the command process sends is what the worker reads,
stdin with NULs included, and anything malformed is refused (the command then runs in
its own process)."""

from __future__ import annotations

import pytest
from kybernate.shim.relay import decode_reply, encode_reply, encode_request
from kybernate.shim.relay_worker import RelayedCommand

ARGV = ["-namespace", "ns", "-address", "/run/c.sock", "-id", "c1", "start"]


def test_request_round_trip_keeps_nuls_in_stdin() -> None:
    stdin = b"\x0a\x00options\x00\xff"
    data = encode_request("start", ARGV, {"TTRPC_ADDRESS": "/run/c.sock.ttrpc", "EMPTY": ""}, "/b/c1",
                          4242, stdin)
    command = RelayedCommand.decode(data)
    assert (command.action, command.cwd, command.ppid, command.argv, command.stdin) == (
        "start", "/b/c1", 4242, ARGV, stdin)
    assert command.env == {"TTRPC_ADDRESS": "/run/c.sock.ttrpc", "EMPTY": ""}


def test_empty_argv_and_environment() -> None:
    command = RelayedCommand.decode(encode_request("delete", [], {}, "/", 1, b""))
    assert (command.argv, command.env, command.stdin) == ([], {}, b"")


@pytest.mark.parametrize("data", [
    b"", b"something else\0start\0/\x001\x000\x000\0",
    encode_request("exec", ARGV, {}, "/b", 1, b""),        # not an action we relay
    encode_request("start", ARGV, {}, "relative", 1, b""),  # cwd must be absolute
    encode_request("start", ARGV, {}, "/b", 1, b"").replace(b"\x007\x00", b"\x0099\x00", 1),  # too few args
    encode_request("start", [], {"A": "1"}, "/b", 1, b"").replace(b"A=1", b"A1"),  # not KEY=VALUE
    encode_request("start", [], {}, "/b", 1, b"").replace(b"\x001\x00", b"\x00-1\x00", 1),  # pid not a number
])
def test_malformed_requests_are_refused(data: bytes) -> None:
    with pytest.raises(ValueError):
        RelayedCommand.decode(data)


def test_reply_round_trip_and_refusals() -> None:
    assert decode_reply(encode_reply(1, b"\x08\x00out", b"warning\n")) == (1, b"\x08\x00out", b"warning\n")
    assert decode_reply(b"fallback\n") is None
    assert decode_reply(b"0 5 0\nabc") is None  # lengths do not add up
    assert decode_reply(b"") is None
