#!/usr/bin/env bash
# `make e2e`: a real single-node Kubernetes (etcd, kube-apiserver, controller-manager, scheduler,
# containerd + runc, kubelet) in a network namespace and mount namespace of its own, objfs installed
# with `kubectl apply -k e2e/overlay`, the pytest tests of e2e/ against it, then everything torn down
# by PID. The namespaces keep the cluster's ports, its address (10.213.0.1: the kubelet refuses a loopback
# node IP) and every mount it makes off the machine.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/versions.sh"
ns="objfs-e2e-$$"
root="$(mktemp -d /var/tmp/objfs-e2e.XXXXXX)"
cleanup() {
  ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  if [ "${E2E_KEEP:-0}" != 1 ]; then rm -rf "$root"; fi
}
trap cleanup EXIT
trap "exit 143" TERM INT HUP  # so that a stopped run still runs cleanup (EXIT alone does not on a signal)
ip netns add "$ns"
ip -n "$ns" link set lo up
# The node's address, on lo (no dummy or veth links on this machine's kernel): not 127/8, which is
# all the kubelet asks of a node IP. The Service range routes there too (see the DNAT in inside.sh).
ip -n "$ns" addr add 10.213.0.1/32 dev lo
ip -n "$ns" route add 10.0.0.0/24 dev lo
# Private mounts (slave: the machine's mounts still come in, ours never go out), then the cluster.
# nsenter, not `ip netns exec`: that mounts a fresh /sys, which hides the cgroup mounts runc needs.
nsenter --net="/run/netns/$ns" unshare --mount --propagation slave bash "$here/inside.sh" "$root" "$@"
