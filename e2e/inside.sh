#!/usr/bin/env bash
# Runs inside run.sh's namespaces: starts the cluster under $1, installs objfs, runs the tests, and tears
# the cluster down by PID whatever happened. Extra arguments go to pytest.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
. "$here/versions.sh"
root=$1; shift
bin="$E2E_CACHE/bin"
export PATH="$bin:$PATH"
ip=10.213.0.1
t0=$SECONDS
phase() { echo "e2e: $1 took $((SECONDS - t0)) s"; t0=$SECONDS; }
mkdir -p "$root"/{pki,etcd,logs,kubelet,objfs,pods,containerd-root,containerd-state,cni,pids}

# The paths the manifests name (hostPaths under /var/lib/kubelet and /var/lib/objfs, containerd's and
# the kubelet's own) are bind mounts of this run's folders, visible only in this mount namespace.
for pair in kubelet:/var/lib/kubelet objfs:/var/lib/objfs pods:/var/log/pods \
            containerd-root:/var/lib/containerd containerd-state:/run/containerd cni:/etc/cni/net.d; do
  src="$root/${pair%%:*}" dst="${pair#*:}"
  mkdir -p "$dst"
  mount --bind "$src" "$dst"
done
mount --make-rshared /var/lib/kubelet   # Bidirectional propagation of the node plugin's mounts
# The node plugin's hostPath /run/objfs (the grant records' key: tmpfs on a node, never on disk): a
# tmpfs of this mount namespace, so that neither the key nor the folder lands in the machine's /run
# (the empty mount point is made there once, like the folders above).
mkdir -p /run/objfs
mount -t tmpfs -o mode=0755,size=1m objfs-e2e-run /run/objfs

pids=()
start() {  # name command...: in the background, log under $root/logs, PID recorded
  local name=$1; shift
  "$@" >"$root/logs/$name.log" 2>&1 &
  pids+=($!)
  echo $! > "$root/pids/$name"
}

teardown() {
  local rc=$?
  set +e
  echo "e2e: tearing down (logs in $root/logs)"
  # The containers' logs as they are now (deleting the pods below deletes theirs).
  cp -a /var/log/pods "$root/logs/pods" 2>/dev/null
  if [ -s "$root/kubeconfig" ] && [ -f "$root/pids/kubelet" ]; then
    # Pods first, through the kubelet, so CSI unpublish runs and the sidecars exit.
    timeout 120 kubectl --kubeconfig "$root/kubeconfig" delete ns e2e --wait=true --ignore-not-found >/dev/null 2>&1
    timeout 120 kubectl --kubeconfig "$root/kubeconfig" delete -k "$here/overlay" --wait=true --ignore-not-found >/dev/null 2>&1
  fi
  for ((i=${#pids[@]}-1; i>=0; i--)); do kill "${pids[i]}" 2>/dev/null; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$p" 2>/dev/null
  done
  # containerd's shims outlive it: they are ours if their parent is gone and they run our shim binary
  # with our containerd's address.
  for p in $(pgrep -f "containerd-shim-runc-v2 -namespace k8s.io -id .* -address /run/containerd/containerd.sock" || true); do
    [ "$(readlink /proc/$p/ns/net)" = "$(readlink /proc/self/ns/net)" ] && kill -9 "$p" 2>/dev/null
  done
  # Whatever is still mounted under this run's folders (FUSE mounts of killed pods, emptyDirs).
  mount | awk '{print $3}' | grep -E "^(/var/lib/kubelet|/var/lib/objfs|/run/containerd|/var/lib/containerd)/" \
    | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
  exit $rc
}
trap teardown EXIT
trap "exit 143" TERM INT HUP  # a signal runs the teardown too

# --- PKI: one CA; the apiserver's serving cert; a service-account key pair; one admin token.
pki="$root/pki"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=objfs-e2e-ca -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
printf 'subjectAltName=IP:%s,IP:10.0.0.1,IP:127.0.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n' "$ip" > "$pki/san.ext"
openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial -days 2 \
  -extfile "$pki/san.ext" -out "$pki/apiserver.crt" 2>/dev/null
openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
token="$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
umask 077
echo "$token,admin,admin,system:masters" > "$pki/tokens.csv"
cat > "$root/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: e2e, cluster: {server: "https://$ip:6443", certificate-authority: "$pki/ca.crt"}}]
users: [{name: admin, user: {token: "$token"}}]
contexts: [{name: e2e, context: {cluster: e2e, user: admin}}]
current-context: e2e
KC
umask 022
export KUBECONFIG="$root/kubeconfig"
k() { kubectl "$@"; }

# In-cluster clients dial the kubernetes Service (10.0.0.1:443); with no kube-proxy, one DNAT rule.
iptables -t nat -A OUTPUT -d 10.0.0.1/32 -p tcp --dport 443 -j DNAT --to-destination "$ip:6443"

# --- control plane
start etcd etcd --data-dir "$root/etcd" --listen-client-urls http://127.0.0.1:2379 \
  --advertise-client-urls http://127.0.0.1:2379 --listen-peer-urls http://127.0.0.1:2380
start kube-apiserver kube-apiserver --etcd-servers=http://127.0.0.1:2379 --bind-address=0.0.0.0 \
  --advertise-address="$ip" --secure-port=6443 --tls-cert-file="$pki/apiserver.crt" \
  --tls-private-key-file="$pki/apiserver.key" --client-ca-file="$pki/ca.crt" \
  --service-account-key-file="$pki/sa.pub" --service-account-signing-key-file="$pki/sa.key" \
  --service-account-issuer=https://kubernetes.default.svc --token-auth-file="$pki/tokens.csv" \
  --authorization-mode=RBAC --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true \
  --enable-aggregator-routing=true --kubelet-preferred-address-types=InternalIP
for _ in $(seq 120); do k get --raw /readyz >/dev/null 2>&1 && break; sleep 1; done
k get --raw /readyz >/dev/null
phase "etcd + kube-apiserver ready"
start kube-controller-manager kube-controller-manager --kubeconfig="$root/kubeconfig" --leader-elect=false \
  --service-account-private-key-file="$pki/sa.key" --root-ca-file="$pki/ca.crt" \
  --use-service-account-credentials=false --controllers='*,-nodeipam,-cloud-node-lifecycle'
start kube-scheduler kube-scheduler --kubeconfig="$root/kubeconfig" --leader-elect=false
# The cluster's snapshot support (external-snapshotter's CRDs and snapshot-controller, e2e/build.sh
# snapshotter): a cluster administrator's part, as for every CSI driver, not objfs's.
k apply -f "$E2E_CACHE/snapshot-crds-$SNAPSHOTTER_VERSION" >/dev/null
k wait --for=condition=Established --timeout=60s -f "$E2E_CACHE/snapshot-crds-$SNAPSHOTTER_VERSION" >/dev/null
start snapshot-controller snapshot-controller --kubeconfig="$root/kubeconfig" --leader-election=false

# --- node: containerd (runc, cgroupfs, no oom_score_adj: see ../shared/FACTS.md) and the kubelet
cat > "$root/cni/10-loopback.conflist" <<'CNI'
{"cniVersion": "1.0.0", "name": "e2e", "plugins": [{"type": "loopback"}]}
CNI
cat > "$root/containerd.toml" <<TOML
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
start containerd containerd --config "$root/containerd.toml"
for _ in $(seq 60); do ctr version >/dev/null 2>&1 && break; sleep 0.5; done
for t in "$E2E_CACHE"/images/*.tar; do ctr -n k8s.io images import --no-unpack=false "$t" >/dev/null; done
phase "containerd + image import"

cat > "$root/kubelet.yaml" <<KY
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
start kubelet kubelet --config="$root/kubelet.yaml" --kubeconfig="$root/kubeconfig" \
  --root-dir=/var/lib/kubelet --node-ip="$ip" --hostname-override=objfs-e2e --v=2
for _ in $(seq 120); do
  [ "$(k get node objfs-e2e -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ] && break
  sleep 1
done
k wait --for=condition=Ready node/objfs-e2e --timeout=5s >/dev/null
phase "kubelet + node Ready"

if [ "${E2E_SHELL:-0}" = 1 ]; then
  echo "e2e: cluster up; KUBECONFIG=$KUBECONFIG; exit the shell to tear down"
  bash -i || true
  exit 0
fi

# --- objfs, as a platform team installs it
k apply -k "$here/overlay" >/dev/null
k -n objfs rollout status ds/objfs-csi-node --timeout=300s
k -n objfs rollout status deploy/objfs-csi-controller --timeout=300s
k -n objfs rollout status deploy/objfs-webhook --timeout=300s
phase "objfs installed"

E2E_KUBECONFIG="$KUBECONFIG" E2E_NODE_IP="$ip" "$repo/.venv/bin/python" -m pytest -q -p no:cacheprovider \
  -o log_cli=true -o log_cli_level=INFO --durations=0 "$here/tests" "$@"
phase "tests"
