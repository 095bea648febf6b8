"""ttrpc framing: the 10-byte header and reading whole frames from a stream.

Header, big-endian: uint32 data length (header not counted), uint32 stream id,
uint8 frame type, uint8 flags. Shared by the server and the client.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from typing import NamedTuple

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10

# ttrpc's limit on a frame's data; both ends refuse anything longer.
DEFAULT_MAX_MESSAGE = 4 << 20

# Oversized frames are skipped in chunks so that discarding one costs no more memory.
_DISCARD_CHUNK = 64 << 10


class FrameType(enum.IntEnum):
    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class Frame(NamedTuple):
    stream_id: int
    type: int  # a FrameType value, or an unknown type the reader must ignore
    flags: int
    data: bytes


class FrameTooLarge(Exception):
    """A frame longer than the limit arrived; its data was read and thrown away.

    The stream is still in sync, so the connection stays usable.
    """

    def __init__(self, stream_id: int, frame_type: int, length: int, limit: int) -> None:
        super().__init__(f"message length {length} exceeds the maximum of {limit} bytes")
        self.stream_id = stream_id
        self.frame_type = frame_type
        self.length = length
        self.limit = limit


class TruncatedFrame(ConnectionError):
    """The peer closed the connection in the middle of a frame."""


def encode_frame(stream_id: int, frame_type: int, flags: int, data: bytes) -> bytes:
    """One frame as bytes, ready for a single write (one copy of `data`)."""
    return HEADER.pack(len(data), stream_id, frame_type, flags) + data


def decode_header(header: bytes) -> tuple[int, int, int, int]:
    """(length, stream_id, frame_type, flags) from the first 10 bytes of a frame."""
    return HEADER.unpack_from(header)


async def read_frame(reader: asyncio.StreamReader, max_message: int) -> Frame | None:
    """Read one whole frame; None at a clean end of stream (between frames).

    Raises TruncatedFrame when the stream ends inside a frame and FrameTooLarge,
    after skipping the data, when the frame exceeds `max_message`.
    """
    try:
        header = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise TruncatedFrame(
            f"connection closed after {len(exc.partial)} of {HEADER_SIZE} header bytes"
        ) from None
    length, stream_id, frame_type, flags = HEADER.unpack(header)
    if length > max_message:
        await _discard(reader, length)
        raise FrameTooLarge(stream_id, frame_type, length, max_message)
    if length == 0:
        return Frame(stream_id, frame_type, flags, b"")
    try:
        data = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise TruncatedFrame(
            f"connection closed after {len(exc.partial)} of {length} bytes of frame data"
        ) from None
    return Frame(stream_id, frame_type, flags, data)


async def _discard(reader: asyncio.StreamReader, length: int) -> None:
    remaining = length
    while remaining:
        chunk = await reader.read(min(remaining, _DISCARD_CHUNK))
        if not chunk:
            raise TruncatedFrame(
                f"connection closed inside an oversized frame, {remaining} of {length} "
                "bytes missing"
            )
        remaining -= len(chunk)
