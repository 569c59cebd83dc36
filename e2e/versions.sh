# Pinned versions of what the e2e cluster runs; the cache is keyed by them.
K8S_VERSION=v1.34.0
K8S_STAGING_VERSION=v0.34.0
PROVISIONER_VERSION=v5.3.0
# csi-snapshotter and snapshot-controller, and the snapshot CRDs (its client module, same version)
SNAPSHOTTER_VERSION=v8.7.0
K8S_COMMANDS="kube-apiserver kubelet kube-controller-manager kube-scheduler kubectl"
E2E_APT_PACKAGES="etcd-server containerd runc containernetworking-plugins buildah debootstrap iptables conntrack busybox-static"
E2E_CACHE="${E2E_CACHE:-$HOME/.cache/objfs/e2e/$K8S_VERSION-$PROVISIONER_VERSION}"
export E2E_CACHE
# The S3 server of `make conformance` (moto keeps `dir/` markers beside `dir/x`; rclone's local
# backend cannot): a venv of its own, outside the repository's, keyed by version.
MOTO_VERSION=5.2.5
MOTO_VENV="$HOME/.cache/objfs/e2e/moto-$MOTO_VERSION"
export MOTO_VENV
