"""The files of a committed checkpoint directory that the agent writes and the shim reads."""

#: Written last, fsynced: its presence makes the directory a checkpoint. It lists every
#: other file with its size and sha256.
METADATA_FILE = "metadata.json"
#: The container's writable layer (the overlay's upperdir) as a tar, when it was saved.
ROOTFS_DIFF_FILE = "rootfs-diff.tar"
