#!/bin/sh
# Build a minimal Debian base image without a container registry: debootstrap a rootfs from
# the Debian mirror apt already uses, then `podman import` it. The result is the BASE build
# argument of deploy/Dockerfile (it has python3 and venv, like python:3.11-slim).
#
#   sudo deploy/image/base-from-debootstrap.sh [IMAGE] [SUITE] [MIRROR]
#   defaults: localhost/defer-base:bookworm  bookworm  http://deb.debian.org/debian
#
# Needs root, debootstrap and podman. The rootfs is built in a temporary folder and removed.
set -eu
image=${1:-localhost/defer-base:bookworm}
suite=${2:-bookworm}
mirror=${3:-http://deb.debian.org/debian}
work=$(mktemp -d /tmp/defer-rootfs.XXXXXX)
trap 'rm -rf "$work"' EXIT

debootstrap --variant=minbase --include=python3,python3-venv \
    "$suite" "$work/rootfs" "$mirror"
# What a slim base does not need: apt lists, docs, man pages, locales, caches.
chroot "$work/rootfs" apt-get clean
rm -rf "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/usr/share/doc/"* \
    "$work/rootfs/usr/share/man/"* "$work/rootfs/usr/share/locale/"* \
    "$work/rootfs/var/cache/debconf/"*-old "$work/rootfs/var/log/"*.log
tar -C "$work/rootfs" --numeric-owner -c . |
    podman import --change 'CMD ["/bin/bash"]' - "$image"
podman image ls "$image"
