"""Talking to a running QEMU (qemu-system or qemu-storage-daemon) about its block nodes.

Building blocks for the planned `mode = "qemu"` volume (issue 18): QEMU tracks a
disk's changed blocks itself in dirty bitmaps, and cdp asks it over QMP to start,
freeze, merge and drop those bitmaps (`qmp`), then reads the dirty extents and the
data over NBD with cdp.nbd.client. Nothing here decides when to do what: that
policy belongs to the volume mode, which does not exist yet.
"""
