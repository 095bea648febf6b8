"""The shim's command line, as containerd passes it: Go `flag`-style options, then an action.

    containerd-shim-kybernate-v1 -namespace NS -address ADDR -publish-binary EXE -id ID [-debug] start
    containerd-shim-kybernate-v1 -namespace NS -address ADDR -publish-binary EXE -id ID -bundle DIR [-debug] delete

Read on every `start` and `delete`: no dataclasses, no typing (see main.py).
"""

from __future__ import annotations

import os

# `collections.abc` would load `collections` (~3 ms) on every start and delete; type
# checkers treat this name as true.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

#: The binary containerd runs; the serving process takes it as its title.
SHIM_NAME = "containerd-shim-kybernate-v1"



class UsageError(Exception):
    """Bad command line; reported the way Go's flag package reports it (exit 2)."""


class ShimFlags:
    """The command line as containerd passes it, plus `-socket-fd` for our own `serve`
    and `-idle-timeout` for the template.

    Immutable by convention; a plain class rather than a dataclass because importing
    `dataclasses` (it pulls in `inspect`) would cost every container start ~20 ms.
    """

    __slots__ = (
        "action",
        "address",
        "bundle",
        "debug",
        "id",
        "idle_timeout",
        "namespace",
        "publish_binary",
        "socket",
        "socket_fd",
        "version",
    )

    def __init__(self, *, namespace: str = "", address: str = "",
                 publish_binary: str = "containerd", id: str = "", bundle: str = "",
                 socket: str = "", debug: bool = False, version: bool = False,
                 socket_fd: int = -1, idle_timeout: int = -1, action: str = "") -> None:
        self.namespace = namespace
        self.address = address
        self.publish_binary = publish_binary
        self.id = id
        self.bundle = bundle
        self.socket = socket
        self.debug = debug
        self.version = version
        self.socket_fd = socket_fd
        self.idle_timeout = idle_timeout  # seconds; the template's, -1 for its default
        self.action = action

    def _fields(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__slots__}

    def replace(self, **changes: object) -> ShimFlags:
        return ShimFlags(**{**self._fields(), **changes})  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ShimFlags) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(tuple(self._fields().values()))

    def __repr__(self) -> str:
        return "ShimFlags(" + ", ".join(f"{k}={v!r}" for k, v in self._fields().items()) + ")"

    @property
    def bundle_path(self) -> str:
        """The bundle: `-bundle`, else the working directory (containerd runs us there)."""
        return self.bundle or os.getcwd()

    @property
    def ttrpc_address(self) -> str:
        """containerd's ttrpc endpoint for events (the TTRPC_ADDRESS it exports)."""
        return os.environ.get("TTRPC_ADDRESS") or (self.address + ".ttrpc" if self.address else "")

    def process_title(self) -> str:
        """What the serving process shows as its command line (ps, /proc/PID/cmdline)
        and, cut to 15 bytes, its name (`containerd-shim`, which pgrep and top show):
        what containerd's Go shims show."""
        return f"{SHIM_NAME} -namespace {self.namespace} -id {self.id} -address {self.address}"

    def to_argv(self) -> list[str]:
        """Flags (not the action) in the form `parse_flags` reads back."""
        argv = [
            "-namespace", self.namespace, "-address", self.address,
            "-publish-binary", self.publish_binary, "-id", self.id,
        ]
        if self.bundle:
            argv += ["-bundle", self.bundle]
        if self.socket_fd >= 0:
            argv += ["-socket-fd", str(self.socket_fd)]
        if self.debug:
            argv.append("-debug")
        return argv


_STRING_FLAGS = {
    "namespace": "namespace", "address": "address", "publish-binary": "publish_binary",
    "id": "id", "bundle": "bundle", "socket": "socket",
}
_INT_FLAGS = {"socket-fd": "socket_fd", "idle-timeout": "idle_timeout"}
_BOOL_FLAGS = {"debug": "debug", "v": "version"}
_TRUE = {"1", "t", "T", "true", "TRUE", "True"}
_FALSE = {"0", "f", "F", "false", "FALSE", "False"}


def parse_flags(argv: Sequence[str]) -> ShimFlags:
    """Parse like Go's `flag`: `-name value`, `-name=value`, `--name`, bools bare or
    `=true|false`; flags stop at `--` or the first non-flag word, which is the action."""
    values: dict[str, object] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            i += 1
            break
        if len(arg) < 2 or not arg.startswith("-"):
            break
        name = arg[2:] if arg.startswith("--") else arg[1:]
        value: str | None = None
        if "=" in name:
            name, value = name.split("=", 1)
        i += 1
        if name in _BOOL_FLAGS:
            if value is None:
                values[_BOOL_FLAGS[name]] = True
            elif value in _TRUE or value in _FALSE:
                values[_BOOL_FLAGS[name]] = value in _TRUE
            else:
                raise UsageError(f'invalid boolean value "{value}" for -{name}')
            continue
        if name not in _STRING_FLAGS and name not in _INT_FLAGS:
            raise UsageError(f"flag provided but not defined: -{name}")
        if value is None:
            if i >= len(args):
                raise UsageError(f"flag needs an argument: -{name}")
            value = args[i]
            i += 1
        if name in _INT_FLAGS:
            try:
                values[_INT_FLAGS[name]] = int(value)
            except ValueError:
                raise UsageError(f'invalid value "{value}" for flag -{name}') from None
        else:
            values[_STRING_FLAGS[name]] = value
    action = args[i] if i < len(args) else ""
    return ShimFlags(action=action, **values)  # type: ignore[arg-type]
