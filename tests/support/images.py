"""The busybox image builder lives in the package (the demo uses it too)."""

from kybernate.sandbox.images import (  # noqa: F401
    BUSYBOX_IMAGE_REF,
    build_oci_archive,
    import_image,
    layer_tar,
    make_rootfs,
    oci_architecture,
)
