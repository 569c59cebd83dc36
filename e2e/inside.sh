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
mkdir -p "$root"/{pki,etcd,logs,nodes}
: > "$root/pids.list"

start() {  # name command...: in the background, log under $root/logs, PID listed for the teardown
  local name=$1; shift
  "$@" >"$root/logs/$name.log" 2>&1 &
  echo "$name $!" >> "$root/pids.list"
}

teardown() {
  local rc=$?
  set +e
  echo "e2e: tearing down (logs in $root/logs)"
  # The containers' logs as they are now (deleting the pods below deletes theirs).
  for n in "$root"/nodes/*/; do cp -a "$n/pods" "$root/logs/pods-$(basename "$n")" 2>/dev/null; done
  if [ -s "$root/kubeconfig" ] && grep -q kubelet "$root/pids.list"; then
    # Pods first, through the kubelets, so CSI unpublish runs and the sidecars exit.
    timeout 120 kubectl --kubeconfig "$root/kubeconfig" delete ns e2e --wait=true --ignore-not-found >/dev/null 2>&1
    timeout 120 kubectl --kubeconfig "$root/kubeconfig" delete -k "$here/overlay" --wait=true --ignore-not-found >/dev/null 2>&1
  fi
  # The nodes' network namespaces (containerd's shims run there) before their holders go.
  local netns=("$(readlink /proc/self/ns/net)") p
  for p in $(awk '/-netns /{print $2}' "$root/pids.list"); do netns+=("$(readlink "/proc/$p/ns/net")"); done
  local listed
  listed="$(tac "$root/pids.list" | awk '{print $2}')"
  for p in $listed; do kill "$p" 2>/dev/null; done
  for p in $listed; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$p" 2>/dev/null
  done
  # containerd's shims outlive it: they are ours if they run our shim binary with a containerd address
  # and live in one of the cluster's network namespaces; the containers under them (in their pods'
  # network namespaces) go with them.
  kill_tree() { local c; for c in $(pgrep -P "$1"); do kill_tree "$c"; done; kill -9 "$1" 2>/dev/null; }
  for p in $(pgrep -f "containerd-shim-runc-v2 -namespace k8s.io -id .* -address /run/containerd/containerd.sock" || true); do
    printf '%s\n' "${netns[@]}" | grep -qxF "$(readlink "/proc/$p/ns/net")" && kill_tree "$p"
  done
  # Whatever is still mounted under this run's folders (FUSE mounts of killed pods, emptyDirs).
  mount | awk '{print $3}' | grep -E "^(/var/lib/kubelet|/var/lib/objfs|/run/containerd|/var/lib/containerd|/run/netns)/" \
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

# --- nodes: the first in the cluster's own namespaces (the API server's address is its node IP), the
# others each in a network + mount namespace of its own, joined to the first by a veth pair (their
# node IPs 10.213.0.2, ...; pod subnets 10.244.N.0/24, routed through their node).
bash "$here/node.sh" "$root" objfs-e2e "$ip" 10.244.0.0/24 "$ip"
add_node() {  # index (1, 2, ...): node objfs-e2e-<index+1>
  local i=$1 name="objfs-e2e-$(($1 + 1))" nip="10.213.0.$(($1 + 1))" cidr="10.244.$1.0/24" holder
  # An empty network namespace, held by a sleeping process (no name in /run/netns: nothing is left
  # on the machine if the run is killed).
  unshare --net sleep infinity &
  holder=$!
  echo "$name-netns $holder" >> "$root/pids.list"
  for _ in $(seq 50); do
    [ "$(readlink "/proc/$holder/ns/net")" != "$(readlink /proc/self/ns/net)" ] && break; sleep 0.1
  done
  ip link add "e2e-n$i" type veth peer name eth0 netns "$holder"
  ip link set "e2e-n$i" up
  ip route add "$nip/32" dev "e2e-n$i"
  ip route add "$cidr" via "$nip" dev "e2e-n$i" onlink
  nsenter --net="/proc/$holder/ns/net" sh -ec "ip link set lo up; ip link set eth0 up
    ip addr add $nip/32 dev eth0; ip route add $ip/32 dev eth0; ip route add default via $ip dev eth0 onlink"
  # Its own mount and PID namespaces (node.sh stays as their PID 1: see run.sh); its processes go
  # with that PID 1 at the teardown.
  rm -f "$root/nodes/$name/started"
  nsenter --net="/proc/$holder/ns/net" unshare --mount --propagation slave --pid --fork --mount-proc \
    bash "$here/node.sh" "$root" "$name" "$nip" "$cidr" "$ip" &
  local launcher=$!
  for _ in $(seq 600); do
    [ -e "$root/nodes/$name/started" ] && break
    kill -0 "$launcher" 2>/dev/null || { echo "e2e: node $name did not start (logs: $root/logs/$name-*)" >&2; exit 1; }
    sleep 0.5
  done
  echo "$name-init $(pgrep -P "$launcher")" >> "$root/pids.list"
}
nodes=(objfs-e2e)
for ((i = 1; i < ${E2E_NODES:-2}; i++)); do add_node "$i"; nodes+=("objfs-e2e-$((i + 1))"); done
phase "containerd + image import, kubelets started (${#nodes[@]} nodes)"
for n in "${nodes[@]}"; do
  for _ in $(seq 120); do
    [ "$(k get node "$n" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ] && break
    sleep 1
  done
  k wait --for=condition=Ready "node/$n" --timeout=5s >/dev/null
done
phase "nodes Ready"

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

# What runs on the cluster: E2E_RUN, a list of "tests" (pytest of e2e/tests: `make e2e`) and
# "conformance" (Kubernetes' storage e2e suite: `make conformance`).
for what in ${E2E_RUN:-tests}; do
  case "$what" in
    tests)
      E2E_KUBECONFIG="$KUBECONFIG" E2E_NODE_IP="$ip" E2E_NODES="${nodes[*]}" "$repo/.venv/bin/python" -m pytest -q \
        -p no:cacheprovider -o log_cli=true -o log_cli_level=INFO --durations=0 "$here/tests" "$@"
      phase "tests" ;;
    conformance)
      E2E_NODE_IP="$ip" bash "$here/conformance.sh" "$root"
      phase "conformance" ;;
    *) echo "e2e: E2E_RUN: unknown $what (tests, conformance)" >&2; exit 2 ;;
  esac
done
