"""The processes: ``cli`` (the ``objfs`` command: arguments and dispatch), ``mount`` (``objfs mount`` and
``unmount``), ``serve`` (one FUSE server), ``spawn`` (starting ``objfs serve``: the serve pipe's
launching end), ``sidecar`` (a pod's servers), ``zygote`` (pre-imported forks), ``fork`` (what the
sidecar and the zygote share), ``dataservice`` (the node's data service) and ``service_process``
(starting it and talking to it)."""
