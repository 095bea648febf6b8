"""The image builders live in the package (the demo uses them too)."""

from kybernate.sandbox.images import (  # noqa: F401
    BUSYBOX_IMAGE_REF,
    PAUSE_IMAGE_REF,
    build_oci_archive,
    build_pause_archive,
    import_image,
    layer_tar,
    make_rootfs,
    oci_architecture,
)
