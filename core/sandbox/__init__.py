"""A sandbox to try Kybernate in: a private containerd and busybox images built locally.

Used by `kybernate demo` and by the integration tests; nothing here is needed on a
real node.
"""
