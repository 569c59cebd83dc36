"""The admission webhook: ``server`` (HTTPS), ``inject`` (the sidecar patch), ``certs``, ``kubeapi``."""
