#!/usr/bin/env bash
# make images: every image the examples need, built from local parts (no registry needed).
# A Debian base from debootstrap + docker import when python:3.12-slim cannot be pulled;
# Python packages from a host-side wheelhouse (pip download) and Debian packages as .deb
# files fetched outside the build (apt-get in a throwaway container of the base), never
# fetched inside a build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_BIN=${PYTHON_BIN:-.venv/bin/python}
DEBIAN_BASE=minimesh/debian-base:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
BUILD=build/images
TOOLS_DEBS="redis-server redis-tools mariadb-server mariadb-client curl openssl netcat-openbsd nginx-light libnginx-mod-stream"
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
# A fixed SOURCE_DATE_EPOCH makes the wheel byte-identical while the code is, so the builds stay cached.
SOURCE_DATE_EPOCH=315532800 "$PYTHON_BIN" -m pip wheel --quiet --no-deps --wheel-dir "$wheels" . >/dev/null
"$PYTHON_BIN" -m pip download --quiet --only-binary=:all: --python-version "$pyver" --implementation cp --abi "$tag" \
    --platform "manylinux2014_$arch" --platform "manylinux_2_28_$arch" --platform "manylinux_2_34_$arch" \
    --dest "$wheels" "$wheels"/minimesh-*.whl aiohttp uvloop PyMySQL grpcio 2>&1 | grep -v '^WARNING: Location' || true
for wheel in aiohttp PyMySQL grpcio; do
    ls "$wheels" | grep -qi "^$wheel-.*\.whl$" || { echo "make images: pip download found no $wheel wheel for $tag" >&2; exit 1; }
done

# The tools image's Debian packages, resolved against the base itself and kept per base image,
# so they are fetched once; `docker build` then installs them from its context, offline.
base_id=$(docker image inspect -f '{{.Id}}' "$base")
base_id=${base_id#sha256:}
debs=build/debs/${base_id:0:12}
if [ "$(cat "$debs/packages" 2>/dev/null)" != "$TOOLS_DEBS" ]; then
    step "fetching the tools image's .deb files with apt-get in a throwaway $base container (once per base)"
    rm -rf build/debs
    mkdir -p "$debs/debs"
    docker run --rm -v "$PWD/$debs/debs:/debs" "$base" sh -c \
        "apt-get update -qq && apt-get install -qq -y --download-only --no-install-recommends -o Dir::Cache::archives=/debs $TOOLS_DEBS" \
        > "$debs.log" 2>&1 \
        || { tail -20 "$debs.log" >&2; echo "make images: apt-get could not fetch $TOOLS_DEBS (log: $debs.log)" >&2; exit 1; }
    rm -rf "$debs/debs/partial" "$debs/debs/lock"
    echo "$TOOLS_DEBS" > "$debs/packages"
fi

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
build minimesh/tools:local compose/tools.Dockerfile "$debs" compose/mysqldb.sh compose/mysqldb.cnf examples/bookinfo/mysql/mysqldb-init.sql
build minimesh/grpc:local compose/grpc.Dockerfile examples/grpc
step "images ready: minimesh/bookinfo:local, minimesh/minimesh:local, minimesh/tools:local, minimesh/grpc:local (base $base)"
