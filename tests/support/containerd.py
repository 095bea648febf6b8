"""The private containerd lives in the package (the demo uses it too)."""

from kybernate.sandbox.containerd import (  # noqa: F401
    DISABLED_PLUGINS,
    KYBERNATE_RUNTIME,
    RUNC_STATE_BASE,
    SHIM_SOCKET_DIR,
    Containerd,
    ContainerdError,
)
