#!/usr/bin/env bash
# make images: every image the examples need, built from local parts (no registry needed).
# A Debian base from debootstrap + docker import when python:3.12-slim cannot be pulled;
# Python packages from a host-side wheelhouse (pip download), never fetched inside a build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BIN=${PYTHON_BIN:-.venv/bin/python}
DEBIAN_BASE=minimesh/debian-base:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BUILD=build/images
step() { printf '==> %s\n' "$*"; }

bash compose/engine.sh

base=""
if docker image inspect python:3.12-slim >/dev/null 2>&1; then
    base=python:3.12-slim
elif [ "${MINIMESH_TRY_PULL:-1}" = 1 ] && timeout 30 docker pull -q python:3.12-slim >/dev/null 2>&1; then
    base=python:3.12-slim
fi
if [ -z "$base" ]; then
    base=$DEBIAN_BASE
    if docker image inspect "$DEBIAN_BASE" >/dev/null 2>&1; then
        step "base image $DEBIAN_BASE is already built (python:3.12-slim cannot be pulled here)"
    else
        command -v debootstrap >/dev/null || { echo "make images: debootstrap is missing; apt-get install debootstrap" >&2; exit 1; }
        root=$(mktemp -d /tmp/minimesh-rootfs.XXXXXX)
        step "building $DEBIAN_BASE with debootstrap from $MIRROR (about a minute, once)"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,iptables,iproute2,procps \
            bookworm "$root" "$MIRROR" > "$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
        step "importing it into Docker"
        tar -C "$root" -c . | docker import - "$DEBIAN_BASE" >/dev/null
        rm -rf "$root" "$root.log"
    fi
fi

pyver=$(docker run --rm "$base" python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
tag=cp${pyver/./}
wheels=build/wheelhouse-$tag
arch=$(uname -m)
mkdir -p "$wheels"
step "wheelhouse $wheels for Python $pyver ($arch)"
"$PYTHON_BIN" -m pip wheel --quiet --no-deps --wheel-dir "$wheels" . >/dev/null
"$PYTHON_BIN" -m pip download --quiet --only-binary=:all: --python-version "$pyver" --implementation cp --abi "$tag" \
    --platform "manylinux2014_$arch" --platform "manylinux_2_28_$arch" --platform "manylinux_2_34_$arch" \
    --dest "$wheels" "$wheels"/minimesh-*.whl aiohttp uvloop 2>&1 | grep -v '^WARNING: Location' || true
ls "$wheels"/aiohttp-*.whl >/dev/null 2>&1 || { echo "make images: pip download found no aiohttp wheel for $tag" >&2; exit 1; }

build() {  # build NAME DOCKERFILE CONTEXT-FILES...
    local name=$1 dockerfile=$2; shift 2
    local context=$BUILD/$name
    rm -rf "$context"; mkdir -p "$context"
    local part
    for part in "$@"; do
        if [ -d "$part" ]; then cp -r "$part"/. "$context"/; else cp "$part" "$context"/; fi
    done
    mkdir -p "$context/wheels"; cp "$wheels"/*.whl "$context/wheels/"
    step "docker build $name (cached after the first time)"
    docker build --build-arg BASE_IMAGE="$base" -f "$dockerfile" -t "$name" "$context" > "$context.log" 2>&1 \
        || { tail -30 "$context.log" >&2; echo "make images: docker build $name failed (log: $context.log)" >&2; exit 1; }
}
build minimesh/bookinfo:local compose/bookinfo.Dockerfile examples/bookinfo/services
build minimesh/minimesh:local compose/minimesh.Dockerfile compose/minimesh-entrypoint.sh
step "images ready: minimesh/bookinfo:local, minimesh/minimesh:local (base $base)"
