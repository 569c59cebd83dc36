#!/usr/bin/env bash
# The e2e cluster's images, without a registry: a Debian base made with debootstrap, local stand-ins for
# the two bases deploy/Dockerfile names (python:3.11-slim-bookworm, golang:1.22-bookworm: Debian's own
# python3 and golang on that base), then deploy/Dockerfile itself through buildah, plus small images for
# the pause program, csi-provisioner, csi-snapshotter and the registrar. Each is saved as an OCI archive under
# $E2E_CACHE/images/, which e2e/cluster.sh imports into its containerd.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/.." && pwd)"
. "$here/versions.sh"
img="$E2E_CACHE/images"
mkdir -p "$img"
bud=(buildah --storage-driver overlay)
t0=$SECONDS
phase() { echo "e2e-build: image $1 took $((SECONDS - t0)) s"; t0=$SECONDS; }

base_tar="$E2E_CACHE/debian-bookworm.tar"
if [ ! -s "$base_tar" ]; then
  root="$E2E_CACHE/rootfs.tmp"
  unmount_under() { mount | awk -v r="$1/" 'index($3, r) == 1 {print $3}' | sort -r | xargs -r umount -l; }
  unmount_under "$root"   # a debootstrap killed half-way leaves its /proc and /sys mounted
  rm -rf --one-file-system "$root"
  nice -n 19 debootstrap --variant=minbase --include=ca-certificates bookworm "$root" http://deb.debian.org/debian >/dev/null
  # This machine reaches registries through an intercepting proxy: its CAs go into the base, or
  # pip, go and apt over https fail with CERTIFICATE_VERIFY_FAILED inside the build.
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$root" update-ca-certificates >/dev/null
  cp /etc/apt/sources.list.d/debian.sources "$root/etc/apt/sources.list.d/" 2>/dev/null && rm -f "$root/etc/apt/sources.list"
  cp /etc/apt/apt.conf.d/99artifact-registry "$root/etc/apt/apt.conf.d/" 2>/dev/null || true
  rm -rf "$root/var/cache/apt/archives/"*.deb "$root/var/lib/apt/lists/"*
  unmount_under "$root"
  tar -C "$root" --one-file-system -cf "$base_tar.tmp" .
  mv "$base_tar.tmp" "$base_tar"
  rm -rf --one-file-system "$root"
  phase "debootstrap base"
fi

have() { "${bud[@]}" inspect --type image "$1" >/dev/null 2>&1; }

if ! have localhost/objfs-e2e/debian:bookworm; then
  c=$("${bud[@]}" from scratch)
  "${bud[@]}" add "$c" "$base_tar" / >/dev/null
  "${bud[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$c"
  "${bud[@]}" commit -q "$c" localhost/objfs-e2e/debian:bookworm >/dev/null
  "${bud[@]}" rm "$c" >/dev/null
  phase "debian base"
fi

# Stand-ins for the Dockerfile's bases, labelled as such: same Debian release and Python minor.
if ! have docker.io/library/python:3.11-slim-bookworm; then
  c=$("${bud[@]}" from --pull-never localhost/objfs-e2e/debian:bookworm)
  "${bud[@]}" run --network host "$c" -- sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends python3 python3-pip python3-venv python3-dev python-is-python3 >/dev/null \
    && rm -rf /var/lib/apt/lists/* && printf "[global]\nbreak-system-packages = true\n" > /etc/pip.conf'
  "${bud[@]}" config --label objfs.e2e.stand-in="Debian bookworm python3 for python:3.11-slim-bookworm" "$c"
  "${bud[@]}" commit -q "$c" docker.io/library/python:3.11-slim-bookworm >/dev/null
  "${bud[@]}" rm "$c" >/dev/null
  phase "python stand-in"
fi
if ! have docker.io/library/golang:1.22-bookworm; then
  c=$("${bud[@]}" from --pull-never localhost/objfs-e2e/debian:bookworm)
  "${bud[@]}" run --network host "$c" -- sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
    apt-get install -y -qq --no-install-recommends golang-go git >/dev/null && rm -rf /var/lib/apt/lists/*'
  "${bud[@]}" config --env GOPATH=/go --label objfs.e2e.stand-in="Debian bookworm golang for golang:1.22-bookworm" "$c"
  "${bud[@]}" commit -q "$c" docker.io/library/golang:1.22-bookworm >/dev/null
  "${bud[@]}" rm "$c" >/dev/null
  phase "golang stand-in"
fi

# The objfs image from deploy/Dockerfile, rebuilt every time (it is the code under test); buildah's
# layer cache keeps the unchanged steps.
nice -n 19 "${bud[@]}" bud --pull-never --layers --network host -q -f "$repo/deploy/Dockerfile" \
  -t localhost/objfs-csi:e2e "$repo" >/dev/null
rm -f "$img/objfs-csi.tar"
"${bud[@]}" push -q localhost/objfs-csi:e2e "oci-archive:$img/objfs-csi.tar:localhost/objfs-csi:e2e"
phase "objfs-csi (deploy/Dockerfile)"

# Binaries on the Debian base (csi-provisioner is linked against glibc) or from scratch (pause).
bin_image() {  # name binary base
  local name=$1 bin=$2 base=$3 c
  [ -s "$img/$name.tar" ] && [ "$img/$name.tar" -nt "$E2E_CACHE/bin/$bin" ] && return 0
  c=$("${bud[@]}" from --pull-never "$base")
  "${bud[@]}" copy "$c" "$E2E_CACHE/bin/$bin" "/$bin" >/dev/null
  "${bud[@]}" config --entrypoint "[\"/$bin\"]" "$c"
  "${bud[@]}" commit -q "$c" "localhost/objfs-e2e/$name:e2e" >/dev/null
  "${bud[@]}" rm "$c" >/dev/null
  rm -f "$img/$name.tar"
  "${bud[@]}" push -q "localhost/objfs-e2e/$name:e2e" "oci-archive:$img/$name.tar:localhost/objfs-e2e/$name:e2e"
  phase "$name"
}
bin_image pause pause scratch
bin_image csi-provisioner csi-provisioner localhost/objfs-e2e/debian:bookworm
bin_image csi-snapshotter csi-snapshotter localhost/objfs-e2e/debian:bookworm
bin_image registrar objfs-e2e-registrar localhost/objfs-e2e/debian:bookworm

# The two images Kubernetes' storage e2e suite runs (`make conformance`), under the names its
# KUBE_TEST_REPO_LIST (e2e/conformance/repo-list.yaml) gives them; the tags are the suite's own (it asks
# for exactly these). busybox: Debian's busybox-static (1.35, which the tag does not say) with a link
# per applet in /bin, as the upstream image has; agnhost: built from the suite's own module
# (e2e/build.sh e2etest) on the Debian base, which has the shell its tests call.
suite_image() {  # name:tag container-id: commit and save as localhost/e2e-test-images/<name:tag>
  local ref="localhost/e2e-test-images/$1" c=$2
  "${bud[@]}" commit -q "$c" "$ref" >/dev/null
  "${bud[@]}" rm "$c" >/dev/null
  rm -f "$img/${1%%:*}.tar"
  "${bud[@]}" push -q "$ref" "oci-archive:$img/${1%%:*}.tar:$ref"
  phase "$1"
}
if [ -x "$E2E_CACHE/bin/agnhost" ] && ! { [ -s "$img/agnhost.tar" ] && [ "$img/agnhost.tar" -nt "$E2E_CACHE/bin/agnhost" ]; }; then
  c=$("${bud[@]}" from --pull-never localhost/objfs-e2e/debian:bookworm)
  "${bud[@]}" copy "$c" "$E2E_CACHE/bin/agnhost" /agnhost >/dev/null
  "${bud[@]}" config --entrypoint '["/agnhost"]' --cmd pause "$c"
  suite_image agnhost:2.56 "$c"
fi
# jessie-dnsutils:1.7, the image of the suite's multiVolume [Slow] tests (their pods run sh, dd and
# sha256sum on the volumes): the Debian base stands in for it (labelled as such).
if ! [ -s "$img/jessie-dnsutils.tar" ]; then
  c=$("${bud[@]}" from --pull-never localhost/objfs-e2e/debian:bookworm)
  "${bud[@]}" config --label objfs.e2e.stand-in="Debian bookworm base for e2e-test-images/jessie-dnsutils:1.7" "$c"
  suite_image jessie-dnsutils:1.7 "$c"
fi
if [ -x /bin/busybox ] && ! { [ -s "$img/busybox.tar" ] && [ "$img/busybox.tar" -nt /bin/busybox ]; }; then
  rootfs="$(mktemp -d)"
  mkdir -p "$rootfs"/{bin,tmp,etc}
  cp /bin/busybox "$rootfs/bin/busybox"
  for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -s busybox "$rootfs/bin/$a"; done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$rootfs/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' > "$rootfs/etc/group"
  chmod 1777 "$rootfs/tmp"
  c=$("${bud[@]}" from scratch)
  "${bud[@]}" copy "$c" "$rootfs" / >/dev/null
  "${bud[@]}" config --env PATH=/bin:/usr/bin:/sbin:/usr/sbin --cmd sh "$c"
  rm -rf "$rootfs"
  suite_image busybox:1.37.0-1 "$c"
fi
