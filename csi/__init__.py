"""objfs CSI plugin: Identity, Controller and Node services over gRPC (see DESIGN.md)."""

__version__ = "0.1.0"
