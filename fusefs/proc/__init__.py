"""The processes: ``cli`` (the ``objfs`` command), ``serve`` (one FUSE server), ``sidecar`` (a pod's
servers), ``zygote`` (pre-imported forks), ``dataservice`` (the node's data service) and
``service_process`` (starting it and talking to it)."""
