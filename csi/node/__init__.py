"""The node plugin's machinery behind ``csi.services.node``: state records, launchers, the data
service's grants, the passthrough broker, pod exit, statfs."""
