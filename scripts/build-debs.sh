#!/usr/bin/env bash
# Builds the Debian packages from the release binaries, with dpkg-deb from a staged tree:
#   baton        /usr/bin/baton, baton.service, /etc/baton/manager.toml, user baton,
#                /var/lib/baton (0700)
#   baton-agent  /usr/bin/baton-agent, baton-agent.service, /etc/baton/agent.toml,
#                user baton-agent, /var/lib/baton-agent (0700)
# The units, configuration files and maintainer scripts are in packaging/debian/.
# Usage: scripts/build-debs.sh [--version V] [--out DIR] [--no-build] [--uncompressed]
#   --version  package version (default: the workspace's, from Cargo.toml)
#   --out      where the .deb files go (default target/debian)
#   --no-build use target/release/{baton,baton-agent} as they are (default: cargo builds
#              them first, which does nothing when they are up to date)
#   --uncompressed  store the files without xz (for tests: saves ~10 s of CPU)
# Prints the path of each package built.
set -euo pipefail
cd "$(dirname "$0")/.."

version=""
out="target/debian"
build=1
compression=(-Zxz -z6)
while [ $# -gt 0 ]; do
    case "$1" in
        --version) version="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --no-build) build=0; shift ;;
        --uncompressed) compression=(-Znone); shift ;;
        *) echo "usage: $0 [--version V] [--out DIR] [--no-build] [--uncompressed]" >&2; exit 2 ;;
    esac
done
if [ -z "$version" ]; then
    version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
fi
if [ "$build" = 1 ]; then
    # Two builds, each as it is done elsewhere (the firmware stage builds `baton` this
    # way): built together, their dependencies' features would unify differently and
    # rebuild the manager.
    cargo build --release -p baton --bin baton
    cargo build --release -p baton-agent-core --features std --bin baton-agent
fi
release="${CARGO_TARGET_DIR:-target}/release"
arch=$(dpkg --print-architecture)
mkdir -p "$out"
stage_root=$(mktemp -d "${TMPDIR:-/tmp}/baton-deb.XXXXXX")
trap 'rm -rf "$stage_root"' EXIT

# package binary user data_dir unit config summary detail
build_package() {
    local package="$1" binary="$2" user="$3" data_dir="$4" unit="$5" config="$6"
    local summary="$7" detail="$8"
    local root="$stage_root/$package"
    install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" \
        "$root/etc/baton" "$root/usr/share/doc/$package"
    # Debug information stripped (symbols kept, so panics still name functions).
    objcopy --strip-debug "$release/$binary" "$root/usr/bin/$binary"
    chmod 0755 "$root/usr/bin/$binary"
    install -m 0644 "packaging/debian/$unit" "$root/lib/systemd/system/$unit"
    install -m 0644 "packaging/debian/$config" "$root/etc/baton/$config"
    install -m 0644 docs/operators-guide.md "$root/usr/share/doc/$package/operators-guide.md"
    printf 'Baton, %s\nLicense: Apache-2.0 (/usr/share/common-licenses/Apache-2.0)\n' \
        "$package" >"$root/usr/share/doc/$package/copyright"
    chmod 0644 "$root/usr/share/doc/$package/copyright"
    echo "/etc/baton/$config" >"$root/DEBIAN/conffiles"
    local glibc
    glibc=$(objdump -T "$root/usr/bin/$binary" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' |
        sort -Vu | tail -1)
    local size
    size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
    local substitute=(-e "s|@PACKAGE@|$package|g" -e "s|@USER@|$user|g"
        -e "s|@DATA_DIR@|$data_dir|g" -e "s|@UNIT@|$unit|g" -e "s|@VERSION@|$version|g"
        -e "s|@ARCH@|$arch|g" -e "s|@GLIBC@|$glibc|g" -e "s|@INSTALLED_SIZE@|$size|g"
        -e "s|@SUMMARY@|$summary|g" -e "s|@DETAIL@|$detail|g")
    sed "${substitute[@]}" packaging/debian/control >"$root/DEBIAN/control"
    for script in postinst prerm postrm; do
        sed "${substitute[@]}" "packaging/debian/$script" >"$root/DEBIAN/$script"
        chmod 0755 "$root/DEBIAN/$script"
    done
    local deb="$out/${package}_${version}_${arch}.deb"
    dpkg-deb --root-owner-group "${compression[@]}" --build "$root" "$deb" >/dev/null
    echo "$deb"
}

build_package baton baton baton /var/lib/baton baton.service manager.toml \
    "Baton manager: distributes content to a fleet by relay" \
    "This package holds the manager (baton serve, started by baton.service with /etc/baton/manager.toml) and the baton command that talks to it."
build_package baton-agent baton-agent baton-agent /var/lib/baton-agent baton-agent.service \
    agent.toml \
    "Baton agent: fetches, verifies, stores and relays content" \
    "This package holds the Linux agent (baton-agent, started by baton-agent.service with /etc/baton/agent.toml)."
