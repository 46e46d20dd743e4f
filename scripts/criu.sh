#!/usr/bin/env bash
# Build CRIU and its Python package pycriu into .criu/ of this checkout, as root.
#
# shieldproxy needs CRIU 4.2 or newer: Debian 12's criu 3.17 fails on recent
# kernels ("Unexpected rt vDSO area bounds"), and CRIU 4.1 cannot dump TCP
# sockets on Linux 6.16 and later. The upstream tarball comes from Debian's
# source package (testing or unstable) and is checked against a pinned SHA-256.
#
# Result: .criu/bin/criu, .criu/lib/python/pycriu, and a .pth file that makes
# pycriu importable from .venv (if .venv exists). A second run returns at once
# when that CRIU passes `criu check`. The system's apt sources and apt state
# are not changed: the deb-src list, package lists and cache live in .criu/apt.
set -euo pipefail

cd "$(dirname "$0")/.."
repo=$(pwd)

CRIU_VERSION=4.2.1
CRIU_MIN_VERSION=4.2
CRIU_DEBIAN_VERSION=4.2.1-1
CRIU_TARBALL=criu_${CRIU_VERSION}.orig.tar.xz
CRIU_TARBALL_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
DEFAULT_MIRROR=http://deb.debian.org/debian/

BUILD_PACKAGES=(
  build-essential pkg-config xz-utils
  libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler
  libnl-3-dev libnet1-dev libcap-dev libbsd-dev libgnutls28-dev
  libnftables-dev uuid-dev python3-protobuf
)

prefix=$repo/.criu
criu_bin=$prefix/bin/criu
python_dir=$prefix/lib/python
build_log=$prefix/build.log

fail() {
  echo "criu.sh: $*" >&2
  exit 1
}

if [ "$(id -u)" -ne 0 ]; then
  fail "needs root: it installs Debian packages and runs 'criu check' (run it with sudo)"
fi

mkdir -p "$prefix"
# Two runs at once (parallel `make` targets) would build into the same folder.
exec 9>"$prefix/.lock"
flock -w 600 9 || fail "another criu.sh run holds $prefix/.lock for over 600 s"

# Return 0 when the installed CRIU is new enough and `criu check` passes.
criu_works() {
  [ -x "$criu_bin" ] || return 1
  [ -f "$python_dir/pycriu/images/tcp_stream_pb2.py" ] || return 1
  local version
  version=$("$criu_bin" --version 2>/dev/null | sed -n 's/^Version: *//p')
  [ -n "$version" ] || return 1
  dpkg --compare-versions "$version" ge "$CRIU_MIN_VERSION" || return 1
  "$criu_bin" check >/dev/null 2>&1
}

# Point .venv at the installed pycriu and check that it imports there.
link_pycriu() {
  if [ ! -x .venv/bin/python ]; then
    echo "criu.sh: no .venv yet, so pycriu is not linked; run scripts/setup.sh" >&2
    return 0
  fi
  local site pth
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  pth=$site/shieldproxy-pycriu.pth
  if [ "$(cat "$pth" 2>/dev/null)" != "$python_dir" ]; then
    echo "$python_dir" >"$pth"
  fi
  if ! .venv/bin/python -c 'import pycriu.images' 2>"$prefix/import.log"; then
    cat "$prefix/import.log" >&2
    fail "pycriu from $python_dir does not import in .venv (it needs protobuf below 7): run scripts/setup.sh"
  fi
}

if criu_works; then
  link_pycriu
  exit 0
fi

missing=()
for package in "${BUILD_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$package")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing CRIU build dependencies: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The Debian mirror the system already uses, as configured in its apt sources.
mirror=$(apt-get indextargets --format '$(REPO_URI) $(LABEL)' 2>/dev/null |
  awk '$2 == "Debian" { print $1; exit }')
mirror=${mirror:-$DEFAULT_MIRROR}
case "$mirror" in */) ;; *) mirror=$mirror/ ;; esac

src_dir=$prefix/src
tarball=$src_dir/$CRIU_TARBALL
mkdir -p "$src_dir"

if [ ! -f "$tarball" ]; then
  apt_dir=$prefix/apt
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/sources.list.d"
  {
    for suite in testing unstable; do
      echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main"
    done
  } >"$apt_dir/sources.list"
  apt_options=(
    -o "Dir::Etc::SourceList=$apt_dir/sources.list"
    -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d"
    -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache"
    -o "Dir::Cache::pkgcache="
    -o "Dir::Cache::srcpkgcache="
  )
  echo "downloading the CRIU $CRIU_VERSION source from $mirror"
  # Both commands may fail and leave the tarball behind: the mirror can return 404
  # for the .dsc or the .debian.tar.xz, which a tarball-only build does not need.
  if apt-get "${apt_options[@]}" update -qq >"$prefix/apt.log" 2>&1; then
    (cd "$src_dir" && apt-get "${apt_options[@]}" source --download-only \
      "criu=$CRIU_DEBIAN_VERSION" >>"$prefix/apt.log" 2>&1) || true
  fi
  if [ ! -f "$tarball" ]; then
    url=${mirror}pool/main/c/criu/$CRIU_TARBALL
    echo "apt-get source did not fetch $CRIU_TARBALL (see $prefix/apt.log), downloading $url"
    /usr/lib/apt/apt-helper download-file "$url" "$tarball.part" >>"$prefix/apt.log" 2>&1 ||
      fail "downloading $url failed, see $prefix/apt.log"
    mv "$tarball.part" "$tarball"
  fi
  # The source lists take about 50 MB and are needed only for this download.
  rm -rf "$apt_dir"
fi

got=$(sha256sum "$tarball" | cut -d' ' -f1)
if [ "$got" != "$CRIU_TARBALL_SHA256" ]; then
  mv "$tarball" "$tarball.rejected"
  fail "checksum mismatch for $tarball: expected sha256 $CRIU_TARBALL_SHA256, got $got. The file is kept as $tarball.rejected; run scripts/criu.sh again to download it again"
fi

build_dir=$prefix/build
source_tree=$build_dir/criu-$CRIU_VERSION
rm -rf "$build_dir"
mkdir -p "$build_dir"
tar -xJf "$tarball" -C "$build_dir"
echo "building CRIU $CRIU_VERSION in $build_dir (log: $build_log)"
started=$SECONDS
if ! make -C "$source_tree" -j"$(nproc)" criu lib >"$build_log" 2>&1; then
  tail -n 30 "$build_log" >&2
  fail "building CRIU failed, see $build_log"
fi
echo "built CRIU in $((SECONDS - started)) s"

install -D -m 0755 "$source_tree/criu/criu" "$criu_bin.new"
mv -f "$criu_bin.new" "$criu_bin"
rm -rf "$python_dir/pycriu.new" "$python_dir/pycriu"
mkdir -p "$python_dir"
cp -r "$source_tree/lib/pycriu" "$python_dir/pycriu.new"
find "$python_dir/pycriu.new" \( -name Makefile -o -name __pycache__ \) -prune -exec rm -rf {} +
mv "$python_dir/pycriu.new" "$python_dir/pycriu"
rm -rf "$build_dir"

if ! "$criu_bin" check >"$prefix/check.log" 2>&1; then
  cat "$prefix/check.log" >&2
  fail "'$criu_bin check' failed: this kernel lacks something CRIU needs"
fi
echo "installed $("$criu_bin" --version | sed -n 's/^Version: *//p') as $criu_bin"
link_pycriu
