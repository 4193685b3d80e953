#!/bin/sh
# Build the node image with podman, offline: the base from debootstrap (no registry), the
# Python packages from deploy/wheelhouse/ (no index inside the build).
#
#   deploy/image/build-node.sh [IMAGE] [BASE] [EXTRAS]
#   defaults: localhost/defer-node:latest  localhost/defer-base:bookworm  (none)
#
# Builds the base first when it is missing (deploy/image/base-from-debootstrap.sh, needs root).
set -eu
cd "$(dirname "$0")/../.."
image=${1:-localhost/defer-node:latest}
base=${2:-localhost/defer-base:bookworm}
extras=${3:-}
podman image exists "$base" || deploy/image/base-from-debootstrap.sh "$base"
deploy/image/wheelhouse.sh "$extras"
podman build --format docker -f deploy/Dockerfile --target node \
    --build-arg BASE="$base" --build-arg EXTRAS="$extras" --build-arg PIP_ARGS=--no-index \
    -t "$image" .
podman image ls "$image"
