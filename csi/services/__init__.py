"""The CSI gRPC services: one module per service (``identity``, ``controller``, ``node``), and the
controller's snapshots."""
