"""The private containerd lives in the package (the demo uses it too)."""

from kybernate.sandbox.containerd import (  # noqa: F401
    CONTAINERD_1_7,
    CONTAINERD_2,
    CRI_NAMESPACE,
    DISABLED_PLUGINS,
    ENV_CONTAINERD,
    KYBERNATE_RUNTIME,
    RELEASES,
    RUNC_STATE_BASE,
    SHIM_SOCKET_DIR,
    Containerd,
    ContainerdError,
    ContainerdRelease,
    CriRuntime,
    CriSettings,
    command_line,
    command_words,
    default_release,
    release_named,
)
