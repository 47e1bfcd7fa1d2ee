#!/usr/bin/env bash
# Makes a Debian bookworm base image from Debian's packages alone (no registry pull): debootstrap, then docker
# import. Usage: base-image.sh [TAG]; does nothing when TAG exists.
set -euo pipefail
tag=${1:-loraplex-base:bookworm}
docker image inspect "$tag" >/dev/null 2>&1 && exit 0
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase bookworm "$root" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import - "$tag" >/dev/null
echo "made $tag"
