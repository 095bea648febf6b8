"""Kybernate: a containerd shim v2 runtime with CUDA-aware checkpoint and restore."""

__version__ = "0.1.0"
