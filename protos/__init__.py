"""Protobuf messages Kybernate speaks: containerd's task API, ttrpc, events, runc options,
cgroup metrics, CRIU's RPC and the node agent API. Import the generated modules directly
(``from kybernate.protos import shim_pb2``); this file stays free of imports so that
loading one module costs only that module. Regenerate with
``python -m kybernate.protos.generate``.
"""
