"""FUSE passthrough: whether the kernel and the server can use it (``backing``), and the
client of the node plugin's registration broker (``broker``)."""
