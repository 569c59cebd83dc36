#!/usr/bin/env bash
# Kubernetes' storage e2e suite against objfs (`make conformance`): run by e2e/inside.sh in the cluster's
# namespaces once objfs is installed. A moto S3 server on the first node's address (it keeps a `dir/`
# marker beside `dir/x`, which rclone's local backend cannot; the suite makes directories), a bucket,
# the StorageClass e2e/conformance/driver.yaml names, then e2e.test with the External.Storage tests,
# serially; the junit report goes to build/conformance/ of the repository.
# Usage: conformance.sh ROOT   (KUBECONFIG set; E2E_CONFORMANCE_SKIP adds to the skipped tags,
# E2E_CONFORMANCE_REPORT is another folder for the report)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
. "$here/versions.sh"
root=$1
ip=${E2E_NODE_IP:-10.213.0.1}
port=19100
bucket=objfs-conformance
report="${E2E_CONFORMANCE_REPORT:-$repo/build/conformance}"
t0=$SECONDS
phase() { echo "conformance: $1 took $((SECONDS - t0)) s"; t0=$SECONDS; }

for need in "$E2E_CACHE/bin/e2e.test" "$MOTO_VENV/bin/python"; do
  [ -x "$need" ] || { echo "conformance: $need is missing: run \`bash e2e/build.sh suite\` (make conformance does)" >&2; exit 1; }
done

# The store. moto checks no signature, but objfs always signs: the Secret holds a throwaway pair.
"$MOTO_VENV/bin/python" -m moto.server -H "$ip" -p "$port" >"$root/logs/moto.log" 2>&1 &
echo "moto $!" >> "$root/pids.list"
for _ in $(seq 100); do curl -fsS -o /dev/null "http://$ip:$port/" 2>/dev/null && break; sleep 0.2; done
curl -fsS -X PUT -o /dev/null "http://$ip:$port/$bucket"
key="conformance$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')"
secret="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
kubectl -n objfs create secret generic objfs-conformance --from-literal=accessKeyID="$key" \
  --from-file=secretAccessKey=<(printf %s "$secret") >/dev/null
kubectl apply -f - >/dev/null <<SC
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: objfs-conformance}
provisioner: objfs.csi.dev
reclaimPolicy: Delete
volumeBindingMode: Immediate
parameters:
  bucket: $bucket
  prefix: volumes
  endpoint: http://$ip:$port
  region: us-east-1
  csi.storage.k8s.io/provisioner-secret-name: objfs-conformance
  csi.storage.k8s.io/provisioner-secret-namespace: objfs
  csi.storage.k8s.io/node-publish-secret-name: objfs-conformance
  csi.storage.k8s.io/node-publish-secret-namespace: objfs
SC
phase "store + StorageClass"

# Serially (one cluster of two small nodes); [Disruptive] and [Serial] restart or take over the
# cluster, [Feature:...] need features this cluster does not enable.
skip='\[Disruptive\]|\[Serial\]|\[Feature:'
[ -n "${E2E_CONFORMANCE_SKIP:-}" ] && skip="$skip|$E2E_CONFORMANCE_SKIP"
rm -rf "$report" && mkdir -p "$report"
set +e
KUBE_TEST_REPO_LIST="$here/conformance/repo-list.yaml" "$E2E_CACHE/bin/e2e.test" \
  -kubeconfig="$KUBECONFIG" -storage.testdriver="$here/conformance/driver.yaml" \
  -ginkgo.focus='External.Storage' -ginkgo.skip="$skip" -ginkgo.timeout=80m -ginkgo.no-color \
  -ginkgo.junit-report="$report/junit.xml" -report-dir="$report" -provider=skeleton \
  >"$report/e2e.log" 2>&1
rc=$?
set -e
phase "e2e.test External.Storage (log: build/conformance/e2e.log)"
# The summary: Ginkgo's last lines (Ran N of M Specs ... Passed | Failed | Pending | Skipped).
grep -E '^(Ran [0-9]+ of|FAIL!|SUCCESS!|PASS|FAIL)|\[FAIL\]' "$report/e2e.log" | tail -40 || true
exit $rc
