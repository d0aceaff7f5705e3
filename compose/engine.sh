#!/usr/bin/env bash
# A Docker Engine that answers, or one clear line on how to get one. On a Debian/Ubuntu
# machine where this runs as root, installs Debian's docker.io and starts dockerd, saying so.
set -euo pipefail
docker info >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    if ! command -v dockerd >/dev/null; then
        echo "==> no Docker Engine: installing Debian's docker.io, docker-compose, debootstrap, iptables"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap iptables >/dev/null
    fi
    echo "==> no Docker Engine answers: starting dockerd (log: /tmp/minimesh-dockerd.log)"
    (setsid dockerd >/tmp/minimesh-dockerd.log 2>&1 &)
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && exit 0; sleep 1; done
    echo "dockerd did not start; see /tmp/minimesh-dockerd.log" >&2
    exit 1
fi
echo "no Docker Engine answers: install Docker (https://docs.docker.com/engine/install/) and start it, or run as root on Debian/Ubuntu" >&2
exit 1
