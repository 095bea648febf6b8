"""CRIU driven directly over its RPC protocol (`criu swrk`), never through runc.

Builds dump options from an OCI bundle the way runc does, so that images dumped here
are restorable by stock `runc restore`; turns CRIU failures into errors that carry
CRIU's own failing log line.
"""

from .descriptors import read_descriptors, write_descriptors
from .errors import CriuError
from .logparse import parse_criu_log
from .options import CriuOptions, DumpOptions, RestoreOptions, dump_options_from_bundle
from .swrk import CriuClient, NotifyCallback, SpawnFn, spawn_with_asyncio

__all__ = [
    "CriuClient",
    "CriuError",
    "CriuOptions",
    "DumpOptions",
    "NotifyCallback",
    "RestoreOptions",
    "SpawnFn",
    "dump_options_from_bundle",
    "parse_criu_log",
    "read_descriptors",
    "spawn_with_asyncio",
    "write_descriptors",
]
