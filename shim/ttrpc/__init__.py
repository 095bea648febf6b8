"""ttrpc, containerd's lightweight RPC over unix sockets: a unary server and a client."""

from kybernate.shim.ttrpc.client import TtrpcClient
from kybernate.shim.ttrpc.context import NAMESPACE_METADATA_KEY, CallContext
from kybernate.shim.ttrpc.server import TtrpcServer, bind_unix_socket

__all__ = [
    "NAMESPACE_METADATA_KEY",
    "CallContext",
    "TtrpcClient",
    "TtrpcServer",
    "bind_unix_socket",
]
