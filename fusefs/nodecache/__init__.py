"""The node-wide cache on local disk, shared by every volume on a node; written only by the
data service (``fusefs.service``)."""
