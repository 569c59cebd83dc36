#!/usr/bin/env bash
# `make e2e`: a real two-node Kubernetes (etcd, kube-apiserver, controller-manager, scheduler; per node
# containerd + runc and a kubelet) in network and mount namespaces of its own, objfs installed
# with `kubectl apply -k e2e/overlay`, the pytest tests of e2e/ against it, then everything torn down
# by PID. The namespaces keep the cluster's ports, its address (10.213.0.1: the kubelet refuses a loopback
# node IP) and every mount it makes off the machine.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/versions.sh"
ns="objfs-e2e-$$"
root="$(mktemp -d /var/tmp/objfs-e2e.XXXXXX)"
cleanup() {
  # Normally inside.sh has torn the cluster down; if it was killed, whatever is left goes here: every
  # process in the cluster's network namespaces (this one and the other nodes', whose holders
  # inside.sh lists as NAME-netns) and every process under them (the containers of pods, which live
  # in pods' own network namespaces under their shims).
  local nets=() p n
  n="$(ip netns exec "$ns" readlink /proc/self/ns/net 2>/dev/null)" && nets+=("$n")
  for p in $(awk '/-netns /{print $2}' "$root/pids.list" 2>/dev/null); do
    n="$(readlink "/proc/$p/ns/net" 2>/dev/null)" && nets+=("$n")
  done
  kill_tree() { local c; for c in $(pgrep -P "$1"); do kill_tree "$c"; done; kill -9 "$1" 2>/dev/null; }
  if [ ${#nets[@]} -gt 0 ]; then
    for p in /proc/[0-9]*; do
      n="$(readlink "$p/ns/net" 2>/dev/null)" || continue
      printf '%s\n' "${nets[@]}" | grep -qxF "$n" && kill_tree "${p#/proc/}"
    done
  fi
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
# A PID namespace of its own too, with inside.sh its PID 1: the kernel ends whatever is left in it when
# inside.sh exits, and a pod with hostPID (the storage suite's node checks: nsenter into /proc/1's
# mount namespace) lands in this node's mount namespace, not the machine's.
nsenter --net="/run/netns/$ns" unshare --mount --propagation slave --pid --fork --mount-proc \
  bash "$here/inside.sh" "$root" "$@"
