#!/bin/sh
# Build the node image with podman, offline: the base from debootstrap (no registry), the
# Python packages from deploy/wheelhouse/ (no index inside the build).
#
#   deploy/image/build-node.sh [IMAGE] [BASE] [EXTRAS]
#   defaults: localhost/defer-node:latest  localhost/defer-base:bookworm  (none)
#
# Builds the base first when it is missing (deploy/image/base-from-debootstrap.sh, needs root).
# PODMAN_BUILD_ARGS goes to `podman build`, e.g. in a sandbox with hybrid cgroups (crun:
# "cgroups in hybrid mode not supported") and no CAP_SYS_RESOURCE (runc: "error setting
# rlimit"): PODMAN_BUILD_ARGS="--runtime runc --ulimit nproc=4096:4096 --ulimit nofile=20000:20000"
set -eu
cd "$(dirname "$0")/../.."
image=${1:-localhost/defer-node:latest}
base=${2:-localhost/defer-base:bookworm}
extras=${3:-}
podman image exists "$base" || deploy/image/base-from-debootstrap.sh "$base"
deploy/image/wheelhouse.sh "$extras"
podman build ${PODMAN_BUILD_ARGS:-} --format docker -f deploy/Dockerfile --target node \
    --build-arg BASE="$base" --build-arg EXTRAS="$extras" --build-arg PIP_ARGS=--no-index \
    -t "$image" .
podman image ls "$image"
