#!/bin/sh
# Fill deploy/wheelhouse/ with every wheel the node image needs (defer itself, its runtime
# dependencies, EXTRAS, and setuptools to build defer inside the image), so the image builds
# with `--build-arg PIP_ARGS=--no-index`: no package index is reached from inside the build.
#
#   deploy/image/wheelhouse.sh [EXTRAS]        e.g.  deploy/image/wheelhouse.sh tflite
#
# The wheels match this machine's Python and CPU (cp311 on x86_64 here). For another target,
# e.g. arm64 devices, run it on such a machine, or use `pip download --platform
# manylinux2014_aarch64 --python-version 3.11 --only-binary=:all:` with the same requirements.
set -eu
cd "$(dirname "$0")/../.."
extras=${1:-}
python3 -m pip wheel --wheel-dir deploy/wheelhouse "setuptools>=68" \
    ".${extras:+[$extras]}"
ls deploy/wheelhouse
