"""Any packing with containerd's bare type URLs.

containerd puts a message's full name in `Any.type_url` with no "host/" prefix
(`containerd.runc.v1.Options`, `containerd.events.TaskExit`), and protobuf's own
`Any.Pack`/`Unpack`/`Is` reject such URLs, so every Any on the shim's wire goes
through these two functions.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.any_pb2 import Any
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


def full_name(type_url: str) -> str:
    """The message name in a type URL, bare or prefixed (`types.x/pkg.Msg`)."""
    return type_url.rsplit("/", 1)[-1]


def pack(message: Message) -> Any:
    """An Any holding `message` under its bare full name, as containerd writes it."""
    return Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


def unpack(any_message: Any, message_type: type[M]) -> M | None:
    """Decode `any_message` as `message_type`, or None if it holds another type."""
    if full_name(any_message.type_url) != message_type.DESCRIPTOR.full_name:
        return None
    decoded = message_type()
    decoded.ParseFromString(any_message.value)
    return decoded
