#!/usr/bin/env bash
# Makes the Debian base image the Dockerfile starts from (debian:bookworm-slim) without a
# container registry: debootstrap --variant=minbase bookworm into a temporary folder, trimmed
# like Debian's slim images, imported with `podman import`. For machines that reach Debian's
# package mirror but no registry (the tests of tests/container run it).
#
#   deploy/container/make-base.sh [--force]
#
# Cached: when the image exists already it does nothing (--force rebuilds it). Needs root,
# debootstrap and podman. Environment: NOX_BASE_IMAGE (default debian:bookworm-slim),
# NOX_BASE_SUITE (bookworm), NOX_BASE_MIRROR (debootstrap's default mirror when unset).
set -euo pipefail

image=${NOX_BASE_IMAGE:-debian:bookworm-slim}
suite=${NOX_BASE_SUITE:-bookworm}
mirror=${NOX_BASE_MIRROR:-}
force=0

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --force) force=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "make-base: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

if [ "$force" -eq 0 ] && podman image exists "$image"; then
    echo "make-base: $image exists already (--force rebuilds it)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "make-base: debootstrap needs root" >&2
    exit 2
fi
for tool in debootstrap podman; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "make-base: $tool is missing (apt-get install $tool)" >&2
        exit 2
    fi
done

work=$(mktemp -d "${TMPDIR:-/var/tmp}/nox-base.XXXXXX")
cleanup() {
    # debootstrap leaves /proc and /sys mounted when it fails half-way.
    umount -R "$work/root/proc" "$work/root/sys" 2>/dev/null || true
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT

root=$work/root
echo "make-base: debootstrap --variant=minbase $suite into $root"
args=(--variant=minbase "$suite" "$root")
if [ -n "$mirror" ]; then
    args+=("$mirror")
fi
debootstrap "${args[@]}" >"$work/debootstrap.log" 2>&1 || {
    tail -20 "$work/debootstrap.log" >&2
    echo "make-base: debootstrap failed" >&2
    exit 1
}

# Package sources: the suite, its updates and its security archive, next to the mirror
# debootstrap used (".../debian" has ".../debian-security" beside it).
used=$(awk '$1 == "deb" { print $2; exit }' "$root/etc/apt/sources.list")
cat >"$root/etc/apt/sources.list" <<SOURCES
deb $used $suite main
deb $used $suite-updates main
deb ${used%/}-security $suite-security main
SOURCES

# What Debian's slim images leave out: documentation, manual pages and translations of the
# packages installed later, and the package lists and caches.
cat >"$root/etc/dpkg/dpkg.cfg.d/slim" <<'SLIM'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
SLIM
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'CLEAN'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CLEAN
cat >"$root/etc/apt/apt.conf.d/docker-no-languages" <<'LANGS'
Acquire::Languages "none";
LANGS
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root/usr/share/man/"* "$root/usr/share/info/"* "$root/usr/share/locale/"* \
    "$root/var/lib/apt/lists/"* "$root/var/cache/apt/"*.bin "$root/var/cache/apt/archives/"*.deb \
    "$root/var/log/"*.log "$root/tmp/"* "$root/root/".bash_history
# The container runtime provides these.
: >"$root/etc/hostname"
: >"$root/etc/resolv.conf"

echo "make-base: importing as $image"
tar --numeric-owner --xattrs -C "$root" -c . |
    podman import --quiet --change 'CMD ["bash"]' --message "debootstrap --variant=minbase $suite" \
        - "$image" >/dev/null
podman image exists "$image"
echo "make-base: $image ready ($(podman image inspect --format '{{.Size}}' "$image") bytes)"
