"""objfs filesystem: object storage buckets as FUSE filesystems.

Layers, top to bottom (each only calls the one below it):

- ``cli``     the ``objfs`` command (mount, unmount, serve, sidecar, zygote, data-service)
- ``mount``   mount(2)/umount(2), kernel tuning, running the pyfuse3 loop
- ``ops``     pyfuse3 Operations: turns FUSE requests into calls on the layers below
- ``meta``    inodes, attributes, directory listings, positive and negative caches
- ``read``    per-object block fetching with prefetch windows and single-flight
- ``write``   streamed multipart uploads and staged random writes
- ``service`` the data service: the only holder of credentials, store clients and the node cache
              (``api.DataClient`` is all the layers above know of their data; ``local`` serves it
              in-process, ``daemon`` is the node's service process)
- ``wire``    process-to-process messages, both ends of each protocol in one module (``grant``: a
              FUSE server and the data service; ``control``: the node plugin and the data service;
              ``regrant``: a running server's next grant connection)
- ``cache``   the node-wide block cache on local disk (shared by every volume on a node)
- ``store``   the object store protocol and its S3 and GCS backends

``fusefs`` knows nothing about CSI; ``config.MountConfig`` is the seam, and ``MountConfig.server_view``
is what a FUSE server may know of it (no credential, no endpoint, no node path).
"""

__version__ = "0.1.0"
