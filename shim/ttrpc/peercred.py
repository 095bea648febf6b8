"""Who is at the other end of a unix socket (SO_PEERCRED), and whether ttrpc trusts it."""

from __future__ import annotations

import os
import socket
import struct
from typing import NamedTuple

# struct ucred: pid, uid, gid.
_UCRED = struct.Struct("3i")


class PeerCredentials(NamedTuple):
    """The peer's identity as the kernel recorded it when the connection was made."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    return PeerCredentials(
        *_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    )


def peer_allowed(uid: int) -> bool:
    """ttrpc trusts only its own (effective) uid and root, at both ends."""
    return uid == 0 or uid == os.geteuid()
