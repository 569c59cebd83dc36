#!/usr/bin/env bash
# FUSE passthrough needs libfuse >= 3.17.3 (Debian bookworm has 3.14) and a pyfuse3 that can return a
# backing id from open (no release can). This builds both, cached by version under ROOT:
#   ROOT/libfuse-<v>/prefix              libfuse from Debian's source package, built with meson + ninja
#   ROOT/libfuse-<v>/pyfuse3-<v>-<patch>-r<rev>-<python>/*.whl
#                                        pyfuse3's sdist with native/pyfuse3-passthrough.patch, linked
#                                        against that libfuse, which the wheel carries beside the
#                                        module (rpath $ORIGIN: no LD_LIBRARY_PATH, and the servers'
#                                        uid loads it from the venv, not from root's home)
# and installs the wheel into PYTHON's environment. A second run with the same versions only checks.
#
# usage: native/build.sh PYTHON [ROOT]      (ROOT defaults to ~/.cache/objfs/native)
set -euo pipefail

LIBFUSE_VERSION=3.18.3
# sha256 of fuse3_<v>.orig.tar.gz, as the signed Debian .dsc of 3.18.3-1 lists it
LIBFUSE_SHA256=bcd19582c5e30f7fe45dd86a5540e998590aa01903afc7ebcbeea6c8ac5421ee
LIBFUSE_MIN=3.17.3  # conn->want/want_ext conversion fixed (passthrough negotiable through `want`)
PYFUSE3_VERSION=3.5.0
WHEEL_REV=2  # how the wheel is made (not the patch): raise it to rebuild cached wheels
POOL=http://deb.debian.org/debian/pool/main/f/fuse3

here="$(cd "$(dirname "$0")" && pwd)"
py="$1"
root="${2:-$HOME/.cache/objfs/native}"
patch_file="$here/pyfuse3-passthrough.patch"
patch_id="$(sha256sum "$patch_file" | cut -c1-12)"
pytag="$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
work="$root/work"
mkdir -p "$root" "$work"
exec 9>"$root/.lock"
flock 9  # one build at a time per cache (worktrees and CI on one machine share it)
started=$SECONDS

log() { echo "native: $*" >&2; }

version_ge() { [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]; }

# The pinned orig tarball from the pool, checked against the pinned sha256. Once the archive no
# longer carries that version, the newest one Debian's unstable suite has, through apt itself
# (a private deb-src list: the machine's apt configuration is left alone; apt checks signatures).
fetch_libfuse() {
  local tarball="$work/fuse3_${LIBFUSE_VERSION}.orig.tar.gz"
  if [ ! -f "$tarball" ]; then
    if curl -fsS --retry 3 --max-time 300 -o "$tarball.tmp" "$POOL/fuse3_${LIBFUSE_VERSION}.orig.tar.gz"; then
      mv "$tarball.tmp" "$tarball"
    else
      rm -f "$tarball.tmp"
      fetch_libfuse_with_apt
      return
    fi
  fi
  echo "$LIBFUSE_SHA256  $tarball" | sha256sum -c --quiet - || { rm -f "$tarball"; log "checksum mismatch"; exit 1; }
  echo "$tarball"
}

fetch_libfuse_with_apt() {
  local apt_dir="$work/apt"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/src"
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian sid main" \
    > "$apt_dir/sources.list"
  local opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/dev/null
              -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o APT::Sandbox::User=root)
  log "fuse3 $LIBFUSE_VERSION is gone from the pool: taking Debian unstable's fuse3 source with apt-get source"
  apt-get "${opts[@]}" -qq update >&2
  (cd "$apt_dir/src" && apt-get "${opts[@]}" -qq source --download-only fuse3 >&2)
  local tarball
  tarball="$(ls "$apt_dir"/src/fuse3_*.orig.tar.* | sort -V | tail -n1)"
  LIBFUSE_VERSION="$(basename "$tarball" | sed -E 's/^fuse3_([0-9.]+)\.orig\.tar\..*/\1/')"
  version_ge "$LIBFUSE_VERSION" "$LIBFUSE_MIN" || { log "Debian's fuse3 is $LIBFUSE_VERSION, < $LIBFUSE_MIN"; exit 1; }
  echo "$tarball"
}

build_libfuse() {
  local prefix="$1" tarball="$2"
  local src="$work/libfuse-src"
  rm -rf "$src" && mkdir -p "$src"
  tar -xf "$tarball" -C "$src" --strip-components=1 --no-same-owner
  # Only the library: no setuid helpers (the servers mount as root or get a mounted fd), no
  # examples or tests; io_uring off (pyfuse3 serves /dev/fuse from one trio thread).
  meson setup "$src/build" "$src" --prefix="$prefix" --libdir=lib --buildtype=release \
    -Dutils=false -Dexamples=false -Dtests=false -Duseroot=false -Denable-io-uring=false \
    -Dinitscriptdir= -Dudevrulesdir="$prefix/lib/udev" >"$work/meson.log" 2>&1 \
    || { tail -n 30 "$work/meson.log" >&2; exit 1; }
  ninja -C "$src/build" install >"$work/ninja.log" 2>&1 || { tail -n 30 "$work/ninja.log" >&2; exit 1; }
  rm -rf "$src"
}

build_pyfuse3() {
  local prefix="$1" wheel_dir="$2" local_version="$3"
  local dl="$work/pyfuse3-dl"
  mkdir -p "$dl"
  [ -f "$dl/pyfuse3-$PYFUSE3_VERSION.tar.gz" ] \
    || "$py" -m pip download -q --no-deps --no-binary pyfuse3 "pyfuse3==$PYFUSE3_VERSION" -d "$dl"
  local src="$work/pyfuse3-src"
  rm -rf "$src" && mkdir -p "$src"
  tar -xzf "$dl/pyfuse3-$PYFUSE3_VERSION.tar.gz" -C "$src" --strip-components=1 --no-same-owner
  patch -s --batch -d "$src" -p1 < "$patch_file"
  rm -f "$src/src/pyfuse3/__init__.c"  # generated from the unpatched sources: Cython makes it anew
  mkdir -p "$wheel_dir.tmp"
  # -L first in LDFLAGS: some Pythons' link line (Debian's) names the system library directory
  # before pkg-config's -L, and -lfuse3 would then bind the system libfuse3.so.3 (no passthrough).
  PKG_CONFIG_PATH="$prefix/lib/pkgconfig" LDFLAGS="-L$prefix/lib -Wl,-rpath,\$ORIGIN -Wl,-rpath,$prefix/lib" \
    SETUPTOOLS_SCM_PRETEND_VERSION="$local_version" \
    "$py" -m pip wheel -q --no-deps -w "$wheel_dir.tmp" "$src" >&2
  # libfuse goes into the wheel beside the module (its RECORD updated): one self-contained file
  "$py" - "$wheel_dir.tmp"/pyfuse3-*.whl "$prefix/lib/libfuse3.so.4" <<'EOF'
import base64, hashlib, os, sys, zipfile
wheel, lib = sys.argv[1:3]
name = "pyfuse3/" + os.path.basename(lib)
with zipfile.ZipFile(wheel) as z:  # a wheel linked against another libfuse is never cached
    module = next(n for n in z.namelist() if n.startswith("pyfuse3/__init__") and n.endswith(".so"))
    if b"libfuse3.so.4\0" not in z.read(module):
        sys.exit(f"native: {module} is not linked against {os.path.basename(lib)}")
with open(lib, "rb") as f:  # the symlink's target, under the soname
    data = f.read()
with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(wheel + ".new", "w", zipfile.ZIP_DEFLATED) as zout:
    record_name, record = "", ""
    for item in zin.infolist():
        if item.filename.endswith(".dist-info/RECORD"):
            record_name, record = item.filename, zin.read(item).decode()
            continue
        zout.writestr(item, zin.read(item))
    info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
    info.external_attr = 0o755 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    zout.writestr(info, data)
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    zout.writestr(record_name, record + f"{name},sha256={digest},{len(data)}\n")
os.replace(wheel + ".new", wheel)
EOF
  rm -rf "$wheel_dir" && mv "$wheel_dir.tmp" "$wheel_dir"
  rm -rf "$src"
}

tarball=""
if ! ls "$root"/libfuse-"$LIBFUSE_VERSION"/prefix/lib/libfuse3.so.* >/dev/null 2>&1; then
  tarball="$(fetch_libfuse)"
  LIBFUSE_VERSION="$(basename "$tarball" | sed -E 's/^fuse3_([0-9.]+)\.orig\.tar\..*/\1/')"
fi
dir="$root/libfuse-$LIBFUSE_VERSION"
prefix="$dir/prefix"
local_version="$PYFUSE3_VERSION+objfs.$patch_id.$WHEEL_REV"
wheel_dir="$dir/pyfuse3-$PYFUSE3_VERSION-$patch_id-r$WHEEL_REV-$pytag"

if ! ls "$prefix"/lib/libfuse3.so.* >/dev/null 2>&1; then
  log "building libfuse $LIBFUSE_VERSION into $prefix"
  [ -n "$tarball" ] || tarball="$(fetch_libfuse)"
  build_libfuse "$prefix" "$tarball"
fi
if ! ls "$wheel_dir"/pyfuse3-*.whl >/dev/null 2>&1; then
  log "building pyfuse3 $local_version against $prefix"
  build_pyfuse3 "$prefix" "$wheel_dir" "$local_version"
fi

installed="$("$py" -c 'import importlib.metadata as m; print(m.version("pyfuse3"))' 2>/dev/null || true)"
if [ "$installed" != "$local_version" ]; then
  "$py" -m pip install -q --no-deps --force-reinstall "$wheel_dir"/pyfuse3-*.whl
  "$py" -m pip install -q "$wheel_dir"/pyfuse3-*.whl  # its dependencies (trio), where missing
fi
# The module must load the libfuse it carries and have the patch's API.
"$py" - <<'EOF'
import os, sys
import pyfuse3
here = os.path.dirname(pyfuse3.__file__)
maps = open("/proc/self/maps").read()
missing = [n for n in ("passthrough_supported", "fuse_fd") if not hasattr(pyfuse3, n)]
missing += [n for n in ("backing_id", "noflush") if not hasattr(pyfuse3.FileInfo(), n)]
if missing:
    sys.exit(f"native: {here} lacks the patch's API ({missing})")
if os.path.join(here, "libfuse3.so.4") not in maps:
    sys.exit(f"native: {pyfuse3.__file__} does not load the libfuse3.so.4 beside it")
EOF
log "pyfuse3 $local_version with libfuse $LIBFUSE_VERSION ready ($((SECONDS - started)) s)"
echo "$wheel_dir"
