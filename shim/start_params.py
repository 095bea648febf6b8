"""What containerd writes on the `start` command's stdin, in each of its forms.

- containerd 1.7 to 2.2: the runtime's create options, a marshalled protobuf Any
  (`containerd.runc.v1.Options`, or CRI's `runtimeoptions.v1.Options`), or nothing.
- containerd 2.3 and newer: the bootstrap parameters
  (`containerd.runtime.bootstrap.v1.BootstrapParams`, protobuf-encoded): the
  container's id and namespace, containerd's addresses, an optional socket directory,
  and the create options as one of its extensions.
- Development builds of 2.3 between January and March 2026 wrote the same parameters
  as JSON (Go's encoding of the message: snake_case keys, the Any's value in base64);
  accepted too, since that is what the protocol's own description still says.

A marshalled Any also parses as BootstrapParams (both begin with two strings), so
parameters count only when they name this container's id and namespace, as
containerd's own shims check. Kept import-light: protobuf loads only when stdin holds
something.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json

from kybernate.errors import InvalidArgument

#: The create options types the shim reads (kybernate.shim.options).
CREATE_OPTIONS_TYPES = frozenset({
    "containerd.runc.v1.Options", "containerd.linux.runc.CreateOptions", "runtimeoptions.v1.Options",
})


@dataclasses.dataclass(frozen=True)
class StartParams:
    """What `start` takes from its stdin."""

    #: The create options as a marshalled Any (b"" when none were sent).
    options: bytes = b""
    #: Where containerd wants the shim's socket ("" for the shim's default).
    socket_dir: str = ""
    #: Whether containerd spoke the bootstrap protocol (2.3 and newer).
    bootstrap: bool = False


def parse_start_stdin(data: bytes, container_id: str, namespace: str) -> StartParams:
    if not data.strip():
        return StartParams()
    if data.lstrip()[:1] == b"{":
        return _from_json(data, container_id, namespace)
    return _from_protobuf(data, container_id, namespace)


def _type_name(type_url: str) -> str:
    return type_url.rsplit("/", 1)[-1]


def _from_protobuf(data: bytes, container_id: str, namespace: str) -> StartParams:
    from google.protobuf.message import DecodeError
    from kybernate.protos import bootstrap_pb2

    try:
        params = bootstrap_pb2.BootstrapParams.FromString(data)
    except (DecodeError, UnicodeDecodeError):
        return StartParams(options=data)  # not parameters: the legacy options Any
    if not params.instance_id or params.instance_id != container_id or params.namespace != namespace:
        return StartParams(options=data)
    options = b""
    for extension in params.extensions:
        if _type_name(extension.value.type_url) in CREATE_OPTIONS_TYPES:
            options = extension.value.SerializeToString()
            break
    socket_dir = params.socket_dir if params.HasField("socket_dir") else ""
    return StartParams(options=options, socket_dir=_checked_socket_dir(socket_dir), bootstrap=True)


def _from_json(data: bytes, container_id: str, namespace: str) -> StartParams:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidArgument(f"start: stdin is not valid JSON bootstrap parameters: {err}") from None
    if not isinstance(document, dict):
        raise InvalidArgument("start: JSON bootstrap parameters must be an object")
    instance_id = _field(document, "instance_id", "instanceId")
    params_namespace = _field(document, "namespace", "namespace")
    if instance_id != container_id or params_namespace != namespace:
        raise InvalidArgument(f"start: bootstrap parameters name {instance_id!r} in {params_namespace!r}, "
                              f"not {container_id!r} in {namespace!r}")
    extensions = document.get("extensions") or []
    if not isinstance(extensions, list):
        raise InvalidArgument("start: bootstrap parameters' extensions must be a list")
    options = b""
    for extension in extensions:
        value = extension.get("value") if isinstance(extension, dict) else None
        if not isinstance(value, dict):
            continue
        type_url = _field(value, "type_url", "typeUrl")
        if _type_name(type_url) in CREATE_OPTIONS_TYPES:
            options = _any_bytes(type_url, _field(value, "value", "value"))
            break
    return StartParams(options=options, socket_dir=_checked_socket_dir(_field(document, "socket_dir", "socketDir")),
                       bootstrap=True)


def _field(document: dict[str, object], name: str, camel: str) -> str:
    value = document.get(name, document.get(camel, ""))
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgument(f"start: bootstrap parameter {name} must be a string")
    return value


def _any_bytes(type_url: str, encoded: str) -> bytes:
    from google.protobuf import any_pb2

    try:
        value = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidArgument(f"start: the value of extension {type_url} is not base64: {err}") from None
    return any_pb2.Any(type_url=type_url, value=value).SerializeToString()


def _checked_socket_dir(socket_dir: str) -> str:
    if socket_dir and (not socket_dir.startswith("/") or "\0" in socket_dir):
        raise InvalidArgument(f"start: socket directory {socket_dir!r} must be an absolute path")
    return socket_dir
