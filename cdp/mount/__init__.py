"""`cdp mount`: a recovery point or an archived snapshot as a read-only FUSE file system.

    MOUNTPOINT/VOL.img     the volume's image as of the point (or snapshot)
    MOUNTPOINT/files/      its files, when cdp.archive.files can read its file system

sources.py opens what is shown (a pinned replica point, or a snapshot under the
repository's shared lock), tree.py turns it into paths and attributes (no FUSE in
it), fuse.py serves the tree through libfuse (mfusepy) until a signal.
"""
