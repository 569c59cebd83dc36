"""objfs filesystem: object storage buckets as FUSE filesystems.

Layers, top to bottom; each imports only the layers below it (``make check`` runs the contract in
pyproject.toml, ``[tool.importlinter]``):

- ``proc``        the processes: ``cli`` (the ``objfs`` command: arguments only), ``mount`` (``objfs
                  mount``/``unmount``), ``serve`` (one FUSE server), ``spawn`` (starting one),
                  ``sidecar`` (a pod's servers), ``zygote`` (pre-imported forks), ``fork`` (what
                  those two share), ``dataservice`` (the node's data service) and ``service_process``
                  (starting it, its control link)
- ``fs``          the filesystem: ``ops`` (FUSE requests), ``meta`` (inodes, listings, caches),
                  ``read`` (blocks, prefetch, single flight), ``write`` and ``parts`` (uploads)
- ``wire``        process-to-process messages, both ends of one protocol in one module: ``grant``
                  (a server and the data service), ``control`` (the plugin and the data service),
                  ``regrant``, ``handoff`` (the serve pipe and the sidecar hand-over), ``zygote``
                  (the plugin asking ``objfs zygote`` for servers), ``fds``
- ``service``     the data service: ``api.DataClient`` is all ``fs`` knows of its data; ``local``
                  serves one grant in-process, checked against its ``scope``
- ``passthrough`` FUSE passthrough: ``backing`` (negotiation, registration), ``broker`` (the messages of
                  the node plugin's registration broker, both ends, and its client)
- ``nodecache``   the node-wide cache on local disk, written only by the data service
- ``store``       the object store protocol and its S3, GCS and in-memory backends
- ground floor:   ``config`` (``MountConfig``), ``errors``, ``retry``, ``metrics``, ``buffers``, ``filemeta``,
                  ``kernel`` (mount(2), readahead), ``directio``

``fusefs`` knows nothing about CSI; ``config.MountConfig`` is the seam, and ``MountConfig.server_view``
is what a FUSE server may know of it (no credential, no endpoint, no node path).
"""

__version__ = "0.1.0"
