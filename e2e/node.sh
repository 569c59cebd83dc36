#!/usr/bin/env bash
# One node of the e2e cluster: containerd + runc and a kubelet, with a bridge pod network, started in the
# network and mount namespace this script runs in (inside.sh runs it in the cluster's own for the first
# node, and under a network + mount namespace of the node's own for the second). It returns once the
# kubelet is started; its processes keep running and are listed in $root/pids.list for the teardown.
# Usage: node.sh ROOT NAME NODE_IP POD_CIDR API_IP   (as PID 1 of a PID namespace: stays until SIGTERM)
#   ROOT     the run's folder ($ROOT/nodes/NAME holds this node's folders, logs in $ROOT/logs/NAME-*)
#   POD_CIDR this node's pod subnet (bridge cni0, the first address its gateway)
#   API_IP   the API server's address (the kubernetes Service 10.0.0.1:443 is sent there)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/versions.sh"
root=$1 name=$2 ip=$3 pod_cidr=$4 api_ip=$5
node="$root/nodes/$name"
export PATH="$E2E_CACHE/bin:$PATH"
mkdir -p "$node"/{kubelet,objfs,pods,containers,containerd-root,containerd-state,cni,cni-state,netns} "$root/logs"

# The paths the manifests name (hostPaths under /var/lib/kubelet and /var/lib/objfs), containerd's, the
# kubelet's and CNI's own are bind mounts of this node's folders, visible only in its mount namespace.
for pair in kubelet:/var/lib/kubelet objfs:/var/lib/objfs pods:/var/log/pods containers:/var/log/containers \
            containerd-root:/var/lib/containerd containerd-state:/run/containerd cni:/etc/cni/net.d \
            cni-state:/var/lib/cni netns:/run/netns; do
  src="$node/${pair%%:*}" dst="${pair#*:}"
  mkdir -p "$dst"
  # What is mounted there already goes first (a second node's namespace starts as a copy of the
  # first's): with two mounts stacked on /var/lib/kubelet, containerd checks the lower one for the
  # shared propagation the node plugin's Bidirectional mount needs. Unmounting in this namespace
  # (a slave) changes nothing outside it.
  while mountpoint -q "$dst"; do umount -l "$dst"; done
  mount --bind "$src" "$dst"
done
mount --make-rshared /var/lib/kubelet   # Bidirectional propagation of the node plugin's mounts
# The node plugin's hostPath /run/objfs (the grant records' key: tmpfs on a node, never on disk): a
# tmpfs of this mount namespace, so that neither the key nor the folder lands in the machine's /run
# (the empty mount point is made there once, like the folders above).
mkdir -p /run/objfs
while mountpoint -q /run/objfs; do umount -l /run/objfs; done
mount -t tmpfs -o mode=0755,size=1m "objfs-e2e-run-$name" /run/objfs

start() {  # what command...: in the background, logged, its PID listed for the teardown (a node with
  # a PID namespace of its own is torn down by its PID 1, this script: its PIDs mean nothing outside)
  local what=$1; shift
  "$@" >"$root/logs/$name-$what.log" 2>&1 &
  [ $$ = 1 ] || echo "$name-$what $!" >> "$root/pids.list"
}

# --- network: pods on a bridge (cni0) with host-local addresses; the node routes (the other nodes'
# pod subnets are routed by inside.sh). In-cluster clients dial the kubernetes Service (10.0.0.1:443):
# with no kube-proxy, DNAT rules send it to the API server, from pods (PREROUTING) and from the node's
# own network (OUTPUT: the node plugin).
sysctl -qw net.ipv4.ip_forward=1
iptables -t nat -A OUTPUT -d 10.0.0.1/32 -p tcp --dport 443 -j DNAT --to-destination "$api_ip:6443"
iptables -t nat -A PREROUTING -d 10.0.0.1/32 -p tcp --dport 443 -j DNAT --to-destination "$api_ip:6443"
cat > "$node/cni/10-bridge.conflist" <<CNI
{"cniVersion": "1.0.0", "name": "e2e", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$pod_cidr"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}
]}
CNI

# --- containerd (runc, cgroupfs, no oom_score_adj: see ../shared/FACTS.md)
cat > "$node/containerd.toml" <<TOML
version = 2
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/objfs-e2e/pause:e2e"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
TOML
start containerd containerd --config "$node/containerd.toml"
for _ in $(seq 60); do ctr version >/dev/null 2>&1 && break; sleep 0.5; done
for t in "$E2E_CACHE"/images/*.tar; do ctr -n k8s.io images import --no-unpack=false "$t" >/dev/null; done

# --- the kubelet (settings without which pods do not start here: ../shared/FACTS.md)
cat > "$node/kubelet.yaml" <<KY
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
failCgroupV1: false
failSwapOn: false
cgroupsPerQOS: false
enforceNodeAllocatable: []
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
address: $ip
readOnlyPort: 0
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
serializeImagePulls: false
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
KY
start kubelet kubelet --config="$node/kubelet.yaml" --kubeconfig="$root/kubeconfig" \
  --root-dir=/var/lib/kubelet --node-ip="$ip" --hostname-override="$name" --v=2

if [ $$ = 1 ]; then
  # PID 1 of the node's own PID namespace: it stays, and on SIGTERM stops the kubelet and containerd
  # and leaves, which ends every process left in the namespace (shims, containers).
  trap 'kill $(jobs -p) 2>/dev/null; wait; exit 0' TERM
  touch "$node/started"
  wait
fi
