"""A sandbox to try Kybernate in: a private containerd and busybox images built locally.

The product needs it: `kybernate demo` runs on it (a node with nothing but the
packages `.ci/setup` installs). The integration tests and benchmarks use it too.
Nothing here runs on a real node's path: the shim and the agent never import it.
"""
