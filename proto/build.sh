#!/usr/bin/env bash
# Fetch the CSI spec at a pinned version through the Go module proxy and compile csi.proto
# into csi/v1/ (importable as csi.v1.csi_pb2). Generated code is never committed.
set -euo pipefail
version="${1:?usage: proto/build.sh VERSION PYTHON}"
python="${2:?usage: proto/build.sh VERSION PYTHON}"
root="$(cd "$(dirname "$0")/.." && pwd)"
dir="$(cd /tmp && go mod download -json "github.com/container-storage-interface/spec@${version}" \
       | "$python" -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/csi/v1"
cp "$dir/csi.proto" "$work/csi/v1/csi.proto"
out="$root/csi/v1"
rm -rf "$out.tmp" && mkdir -p "$out.tmp"
"$python" -m grpc_tools.protoc -I "$work" --python_out="$out.tmp" --pyi_out="$out.tmp" \
    --grpc_python_out="$out.tmp" "$work/csi/v1/csi.proto"
mv "$out.tmp/csi/v1/"* "$out.tmp/" && rmdir "$out.tmp/csi/v1" "$out.tmp/csi"
printf '"""Generated from the CSI spec %s by proto/build.sh. Do not edit."""\n' "$version" > "$out.tmp/__init__.py"
echo "$version" > "$out.tmp/VERSION"
rm -rf "$out" && mv "$out.tmp" "$out"
echo "compiled CSI spec $version into csi/v1/"
