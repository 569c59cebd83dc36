"""objfs filesystem: object storage buckets as FUSE filesystems.

Layers, top to bottom (each only calls the one below it):

- ``cli``     the ``objfs`` command (mount, unmount, serve)
- ``mount``   mount(2)/umount(2), kernel tuning, running the pyfuse3 loop
- ``ops``     pyfuse3 Operations: turns FUSE requests into calls on the layers below
- ``meta``    inodes, attributes, directory listings, positive and negative caches
- ``read``    per-object block fetching with prefetch windows and single-flight
- ``write``   streamed multipart uploads and staged random writes
- ``cache``   the node-wide block cache on local disk (shared by every server on a node)
- ``store``   the object store protocol and its S3 and GCS backends

``fusefs`` knows nothing about CSI; ``config.MountConfig`` is the seam.
"""

__version__ = "0.1.0"
