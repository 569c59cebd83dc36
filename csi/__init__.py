"""objfs CSI plugin: Identity, Controller and Node services over gRPC (README's "How it is built").

Layers, top to bottom (the import contract in pyproject.toml): ``main`` (the process), ``services``
(one module per gRPC service), ``node`` (the node plugin's machinery), ``webhook``, and the shared
``errors``, ``params``, ``volume_id``.
"""

__version__ = "0.1.0"
