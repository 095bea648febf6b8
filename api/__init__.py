"""What the shim and the node agent share, so that neither imports the other.

`client`: the agent's gRPC client and the default socket (grpc is loaded on first use,
so a shim that never talks to the agent never pays for it); `layout`: the files of a
checkpoint directory that both read. The message types themselves are
`kybernate.protos.agent_pb2`. This package imports only `protos` and the foundation.
"""
