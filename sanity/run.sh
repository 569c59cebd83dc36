#!/usr/bin/env bash
# Run the real csi-sanity suite (kubernetes-csi/csi-test) against objfs-csi with real FUSE mounts
# on a local rclone S3 server. No spec is skipped by name; exits non-zero on any failure.
#   MODE=bucket (default): every volume is a bucket of its own;
#   MODE=prefix: every volume is a prefix in one shared bucket.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="$root/.venv/bin/python"
sanity="${CSI_SANITY:-$root/.tools/bin/csi-sanity}"
mode="${MODE:-bucket}"
work="$(mktemp -d /tmp/objfs-sanity.XXXXXX)"
chmod 755 "$work"  # the unprivileged servers reach the node cache below it
s3_pid="" csi_pid=""

cleanup() {
  set +e
  [ -n "$csi_pid" ] && kill -TERM "$csi_pid" 2>/dev/null && wait "$csi_pid" 2>/dev/null
  # Mounts left behind by a failed run: detach them (their servers then exit), deepest first.
  awk -v w="$work/" 'index($5, w) == 1 {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$m"
  done
  # Servers recorded in the plugin's state that are still running.
  for rec in "$work"/state/targets/*.json; do
    [ -e "$rec" ] || continue
    pid="$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$rec")"
    kill -TERM "$pid" 2>/dev/null
  done
  [ -n "$s3_pid" ] && kill -TERM "$s3_pid" 2>/dev/null && wait "$s3_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

echo "== starting a local S3 server (rclone serve s3)"
"$py" "$root/sanity/s3_server.py" "$work/s3" "$work/s3.env" &
s3_pid=$!
for _ in $(seq 300); do [ -e "$work/s3.env" ] && break; sleep 0.1; done
[ -e "$work/s3.env" ] || { echo "S3 server did not start"; exit 1; }
endpoint="$(sed -n 's/^endpoint=//p' "$work/s3.env")"
access_key="$(sed -n 's/^access_key=//p' "$work/s3.env")"
secret_key="$(sed -n 's/^secret_key=//p' "$work/s3.env")"

# Volume parameters and secrets, as a StorageClass and its secrets would give them.
umask 077
{
  echo "endpoint: \"$endpoint\""
  echo "region: us-east-1"
  echo "metadataTTL: \"5\""
  if [ "$mode" = prefix ]; then
    echo "bucket: sanity-shared"
    echo "prefix: volumes"
  fi
} > "$work/params.yaml"
{
  for k in CreateVolumeSecret DeleteVolumeSecret NodePublishVolumeSecret NodeStageVolumeSecret \
           ControllerPublishVolumeSecret ControllerUnpublishVolumeSecret ControllerValidateVolumeCapabilitiesSecret \
           ControllerExpandVolumeSecret NodeExpandVolumeSecret ListSnapshotsSecret CreateSnapshotSecret \
           DeleteSnapshotSecret; do
    echo "$k:"
    echo "  accessKeyID: \"$access_key\""
    echo "  secretAccessKey: \"$secret_key\""
  done
} > "$work/secrets.yaml"
umask 022
# Snapshots of a prefix volume go to its own bucket; a volume that is a bucket of its own needs
# the VolumeSnapshotClass to name a bucket for them (DeleteVolume deletes the volume's bucket).
if [ "$mode" = prefix ]; then shared=sanity-shared; else shared=sanity-snapshots; fi
echo "bucket: $shared" > "$work/snapshot-params.yaml"
AWS_ACCESS_KEY_ID="$access_key" AWS_SECRET_ACCESS_KEY="$secret_key" "$py" -c '
import sys, boto3
boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1").create_bucket(Bucket=sys.argv[2])
' "$endpoint" "$shared"

# The servers run as an unprivileged uid (65534) where it can run our interpreter; a venv whose
# interpreter lives under a private home (/root, 0700) cannot be run by it: then uid 0.
server_uid="$(cd "$root" && "$py" -c 'from csi.node.launcher import runnable_as; print(65534 if runnable_as(65534, 65534) else 0)')"
[ "$server_uid" = 0 ] && echo "note: uid 65534 cannot run $py here; objfs serve runs as uid 0"
echo "== starting objfs-csi (mode all)"
"$root/.venv/bin/objfs-csi" --endpoint "unix://$work/csi.sock" --node-id sanity-node --mode all \
  --state-dir "$work/state" --cache-dir "$work/cache" \
  --server-uid "$server_uid" --server-gid "$server_uid" --log-level "${LOG_LEVEL:-INFO}" \
  2> "$work/objfs-csi.log" &
csi_pid=$!
for _ in $(seq 300); do [ -S "$work/csi.sock" ] && break; sleep 0.1; done
[ -S "$work/csi.sock" ] || { echo "objfs-csi did not start:"; cat "$work/objfs-csi.log"; exit 1; }
# and until Probe says ready (its zygote has imported what servers need), as kubelet's probes would
"$root/.venv/bin/python" -c "import sys; from testing.plugin import Client; Client(sys.argv[1]).wait_ready(120)" \
  "$work/csi.sock" || { echo "objfs-csi did not become ready:"; cat "$work/objfs-csi.log"; exit 1; }

echo "== running $("$sanity" -version 2>/dev/null || echo csi-sanity) ($mode mode)"
set +e
"$sanity" -csi.endpoint "unix://$work/csi.sock" -csi.mountdir "$work/mnt" -csi.stagingdir "$work/staging" \
  -csi.testvolumeparameters "$work/params.yaml" -csi.testsnapshotparameters "$work/snapshot-params.yaml" \
  -csi.secrets "$work/secrets.yaml" -ginkgo.no-color "$@" \
  > "$work/sanity.log" 2>&1
rc=$?
set -e
if [ "$rc" -ne 0 ] || [ -n "${VERBOSE:-}" ]; then
  cat "$work/sanity.log"
  echo "== objfs-csi log (tail)"; tail -n 60 "$work/objfs-csi.log"
fi
echo "== summary"
grep -E "^Ran [0-9]+ of [0-9]+ Specs" "$work/sanity.log" || true
grep -E "(SUCCESS|FAIL)!.*Passed" "$work/sanity.log" || true
if [ -n "${SANITY_LOG:-}" ]; then cp "$work/sanity.log" "$SANITY_LOG"; cp "$work/objfs-csi.log" "$SANITY_LOG.csi"; fi
exit "$rc"
