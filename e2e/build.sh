#!/usr/bin/env bash
# Builds (once) everything `make e2e` runs, cached under $E2E_CACHE (outside the repository, keyed by
# version) so CI on this machine reuses it: the Kubernetes binaries from k8s.io/kubernetes through a
# wrapper module, the CSI external-provisioner, csi-snapshotter and snapshot-controller (with the
# snapshot CRDs), the pause program, and the objfs image; for `make
# conformance` also Kubernetes' storage e2e suite (e2e.test) and agnhost, one of its images.
# Usage: e2e/build.sh [debs|k8s|provisioner|snapshotter|csihelper|pause|images|e2etest|moto|all|suite]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/versions.sh"
mkdir -p "$E2E_CACHE/bin"
nice_="nice -n 19"
t0=$SECONDS
phase() { echo "e2e-build: $1 took $((SECONDS - t0)) s"; t0=$SECONDS; }

debs() {
  # etcd, containerd, runc, CNI plugins and the image tools: Debian's packages.
  local missing=""
  for p in $E2E_APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  fi
  # Debian starts containerd as a service on install; the e2e cluster runs its own, by PID.
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active -q containerd 2>/dev/null; then
    systemctl stop containerd || true
  fi
  phase "Debian packages"
}

k8s_version_flags() {
  local ver="-X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1"
  ver="$ver -X k8s.io/component-base/version.gitMinor=$(echo "$K8S_VERSION" | cut -d. -f2)"
  echo "$ver -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
}

k8s() {
  # k8s.io/kubernetes cannot be `go install`ed (its go.mod replaces the staging modules with
  # ./staging/...): a wrapper module requires it and points each staging module at its published
  # v0.x twin, the list read from kubernetes' own go.mod so it follows the pinned version.
  # The version is stamped in (the webhook picks native sidecars from the API server's version; an
  # unstamped build says v0.0.0); a binary without it is rebuilt (only a relink: the build cache).
  local ver all=1 c
  ver="$(k8s_version_flags)"
  stamped() {
    local flag=--version
    [ "$1" = kubectl ] && flag="version --client"
    # Read whole, not piped to grep -q: grep leaving at the first line kills kubectl's second with
    # SIGPIPE, which pipefail turns into "not stamped" (and a needless relink).
    local out
    # shellcheck disable=SC2086
    out="$("$E2E_CACHE/bin/$1" $flag 2>/dev/null)" || return 1
    [[ "$out" == *"$K8S_VERSION"* ]]
  }
  for c in $K8S_COMMANDS; do stamped "$c" || all=0; done
  [ $all = 1 ] && return 0
  local mod="$E2E_CACHE/src/k8s-wrapper"
  mkdir -p "$mod"
  local gomod
  gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  {
    echo "module objfs.dev/e2e/k8s"
    echo
    echo "go 1.24.0"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    sed -n 's#^\s*\(k8s.io/[^ ]*\) => ./staging/.*#\1#p' "$gomod" | while read -r m; do
      echo "replace $m => $m $K8S_STAGING_VERSION"
    done
  } > "$mod/go.mod"
  printf 'package main\n\nimport _ "k8s.io/kubernetes/cmd/kubelet/app"\n\nfunc main() {}\n' > "$mod/tools.go"
  (cd "$mod" && GOFLAGS=-mod=mod $nice_ go mod tidy >/dev/null 2>&1 || GOFLAGS=-mod=mod go mod download)
  for c in $K8S_COMMANDS; do
    stamped "$c" && continue
    (cd "$mod" && GOFLAGS=-mod=mod $nice_ go build -ldflags "$ver" -o "$E2E_CACHE/bin/$c.tmp" "k8s.io/kubernetes/cmd/$c")
    mv "$E2E_CACHE/bin/$c.tmp" "$E2E_CACHE/bin/$c"
    phase "go build $c"
  done
}

provisioner() {
  # Its go.mod has replace directives too (so no `go install ...@version`): build it as the main
  # module, from a copy of the module the Go proxy serves.
  [ -x "$E2E_CACHE/bin/csi-provisioner" ] && return 0
  local dir src="$E2E_CACHE/src/external-provisioner-$PROVISIONER_VERSION"
  dir="$(go mod download -json "github.com/kubernetes-csi/external-provisioner/v5@$PROVISIONER_VERSION" \
    | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  rm -rf "$src" && cp -r "$dir" "$src" && chmod -R u+w "$src"
  (cd "$src" && GOFLAGS=-mod=mod $nice_ go build -o "$E2E_CACHE/bin/csi-provisioner.tmp" ./cmd/csi-provisioner)
  mv "$E2E_CACHE/bin/csi-provisioner.tmp" "$E2E_CACHE/bin/csi-provisioner"
  phase "go install csi-provisioner"
}

snapshotter() {
  # external-snapshotter's go.mod replaces its client module with ./client, which the module zip
  # leaves out (a folder with its own go.mod): build from a copy that requires the published client
  # module of the same version instead. The snapshot CRDs come from that client module too.
  local stamp="$E2E_CACHE/bin/.snapshotter-$SNAPSHOTTER_VERSION" crd="$E2E_CACHE/snapshot-crds-$SNAPSHOTTER_VERSION"
  [ -f "$stamp" ] && [ -x "$E2E_CACHE/bin/csi-snapshotter" ] && [ -x "$E2E_CACHE/bin/snapshot-controller" ] \
    && [ -d "$crd" ] && return 0
  local dir client src="$E2E_CACHE/src/external-snapshotter-$SNAPSHOTTER_VERSION"
  local mod=github.com/kubernetes-csi/external-snapshotter
  dir="$(go mod download -json "$mod/v8@$SNAPSHOTTER_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  client="$(go mod download -json "$mod/client/v8@$SNAPSHOTTER_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  rm -rf "$src" && cp -r "$dir" "$src" && chmod -R u+w "$src"
  (cd "$src" && go mod edit -dropreplace="$mod/client/v8" -require="$mod/client/v8@$SNAPSHOTTER_VERSION")
  local c
  for c in csi-snapshotter snapshot-controller; do
    (cd "$src" && GOFLAGS=-mod=mod $nice_ go build -o "$E2E_CACHE/bin/$c.tmp" "./cmd/$c")
    mv "$E2E_CACHE/bin/$c.tmp" "$E2E_CACHE/bin/$c"
    phase "go build $c"
  done
  rm -rf "$crd.tmp" && mkdir -p "$crd.tmp"
  cp "$client"/config/crd/snapshot.storage.k8s.io_*.yaml "$crd.tmp/"
  rm -rf "$crd" && mv "$crd.tmp" "$crd"
  rm -f "$E2E_CACHE"/bin/.snapshotter-* && touch "$stamp"
}

csihelper() {
  # The registrar/livenessprobe stand-in, built in the wrapper module (it has the kubelet's
  # registration API, the CSI spec and grpc at the versions Kubernetes uses).
  local out="$E2E_CACHE/bin/objfs-e2e-registrar" mod="$E2E_CACHE/src/k8s-wrapper"
  [ -x "$out" ] && [ "$out" -nt "$here/csihelper/main.go" ] && return 0
  mkdir -p "$mod/csihelper"
  cp "$here/csihelper/main.go" "$mod/csihelper/main.go"
  (cd "$mod" && GOFLAGS=-mod=mod $nice_ go build -o "$out" ./csihelper)
  phase "go build csihelper"
}

e2etest() {
  # Kubernetes' e2e suite as upstream builds it for out-of-tree drivers (`go test -c` of test/e2e), and
  # agnhost (test/images/agnhost, same module), through a module of its own that starts as a copy of
  # the wrapper's go.mod: the test's dependencies (ginkgo, gomega, ...) are added there, so the
  # cluster's binaries never see them. Cold: tens of minutes on 2 cores.
  local src="$E2E_CACHE/src/k8s-e2e" out="$E2E_CACHE/bin"
  [ -x "$out/e2e.test" ] && [ -x "$out/agnhost" ] && return 0
  k8s   # the wrapper's go.mod (a no-op when the cluster's binaries are built)
  mkdir -p "$src"
  [ -s "$src/go.mod" ] || cp "$E2E_CACHE/src/k8s-wrapper/go.mod" "$E2E_CACHE/src/k8s-wrapper/go.sum" "$src/"
  printf 'package main\n\nimport _ "k8s.io/kubernetes/test/e2e/framework"\n\nfunc main() {}\n' > "$src/tools.go"
  if [ ! -x "$out/e2e.test" ]; then
    (cd "$src" && GOFLAGS=-mod=mod $nice_ go test -c -ldflags "$(k8s_version_flags)" -o "$out/e2e.test.tmp" \
      k8s.io/kubernetes/test/e2e)
    mv "$out/e2e.test.tmp" "$out/e2e.test"
    phase "go test -c e2e.test"
  fi
  if [ ! -x "$out/agnhost" ]; then
    # Static: it runs on the Debian base image, and in tests that give it only its own binary.
    (cd "$src" && CGO_ENABLED=0 GOFLAGS=-mod=mod $nice_ go build -o "$out/agnhost.tmp" \
      k8s.io/kubernetes/test/images/agnhost)
    mv "$out/agnhost.tmp" "$out/agnhost"
    phase "go build agnhost"
  fi
}

moto() {
  # moto's S3 server for the suite's store, from PyPI, in a venv of its own (python -m moto.server: the
  # venv's scripts name the folder it was made in, the interpreter link does not).
  [ -x "$MOTO_VENV/bin/python" ] && return 0
  rm -rf "$MOTO_VENV.tmp"
  python3 -m venv "$MOTO_VENV.tmp"
  "$MOTO_VENV.tmp/bin/pip" install -q "moto[server]==$MOTO_VERSION"
  mv "$MOTO_VENV.tmp" "$MOTO_VENV"
  phase "moto $MOTO_VERSION"
}

pause() {
  # The sandbox image: a static program that sleeps until SIGTERM/SIGINT (no registry here).
  [ -x "$E2E_CACHE/bin/pause" ] && return 0
  gcc -O2 -static -o "$E2E_CACHE/bin/pause" "$here/pause.c"
  phase "pause"
}

images() {
  bash "$here/images.sh"
  phase "images"
}

what="${1:-all}"
case "$what" in
  debs) debs ;; k8s) k8s ;; provisioner) provisioner ;; snapshotter) snapshotter ;;
  csihelper) csihelper ;; pause) pause ;;
  images) images ;; e2etest) e2etest ;; moto) moto ;;
  all) debs; k8s; provisioner; snapshotter; csihelper; pause; images ;;
  suite) e2etest; moto ;;   # make conformance, before all (its images step adds agnhost's)
  *) echo "usage: $0 [debs|k8s|provisioner|snapshotter|csihelper|pause|images|e2etest|moto|all|suite]" >&2; exit 2 ;;
esac
