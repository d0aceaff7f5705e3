#!/usr/bin/env bash
# make demo / make demo-down: bookinfo and the greeter gRPC example (examples/grpc) behind
# minimesh, and everything it started removed.
# As root on Linux the daemon runs on the host (`minimesh up --detach`); otherwise it runs as
# a compose service from compose/minimesh.yml (the Docker Desktop way).
set -euo pipefail
cd "$(dirname "$0")/.."
PROJECT=${MINIMESH_DEMO_PROJECT:-minimesh-demo}
BOOKINFO=examples/bookinfo
GRPC=examples/grpc
MINIMESH=.venv/bin/minimesh
URL=http://127.0.0.1:8080/productpage
step() { printf '==> %s\n' "$*"; }

compose() {
    local files=(-f "$BOOKINFO/docker-compose.yml" -f "$GRPC/docker-compose.yml")
    [ "$(id -u)" = 0 ] || files+=(-f compose/minimesh.yml)
    if docker compose version >/dev/null 2>&1; then
        docker compose -p "$PROJECT" "${files[@]}" "$@"
    else
        docker-compose -p "$PROJECT" "${files[@]}" "$@"
    fi
}

up() {
    bash compose/engine.sh
    step "starting bookinfo and the greeter (compose project $PROJECT)"
    compose up -d --remove-orphans
    if [ "$(id -u)" = 0 ]; then
        step "starting minimesh on this host (netns capture), watching $BOOKINFO/mesh.yaml and $GRPC/mesh.yaml (or finding it running)"
        "$MINIMESH" up --detach -f "$BOOKINFO/mesh.yaml" -f "$GRPC/mesh.yaml" --docker-label "com.docker.compose.project=$PROJECT"
    else
        step "not root: minimesh runs as the compose service 'minimesh' (compose/minimesh.yml)"
    fi
    step "waiting for $URL"
    for _ in $(seq 1 90); do
        if curl -fsS "$URL" 2>/dev/null | grep -q 'Reviews served by:'; then  # the apps behind it answer too
            cat <<MSG

bookinfo is up behind minimesh:  $URL

Try next:
  curl -s $URL | grep -o 'Reviews served by:.*</u>'
  $MINIMESH status                          # services, endpoints, capture, config generation
  $MINIMESH apply -f $BOOKINFO/variants/virtual-service-reviews-jason-v2.yaml   # jason gets reviews v2
  curl -s -b user=jason $URL | grep -o 'color="[a-z]*"' | head -1               # black stars
  $MINIMESH apply -f $BOOKINFO/variants/virtual-service-ratings-mysql.yaml      # stars read from MariaDB
  docker exec "\$(docker ps -qf label=com.docker.compose.project=$PROJECT -f label=app=frontend)" \\
      python -m greeter.client --calls 10  # gRPC calls to the greeter: README "gRPC tour"
  $MINIMESH apply --reset                   # back to the mesh.yaml files (edit them: changes are live)
  make demo-down                            # removes everything this started
MSG
            exit 0
        fi
        sleep 1
    done
    echo "make demo: $URL did not answer within 90 s; see .minimesh/minimesh.log and 'docker ps'" >&2
    exit 1
}

down() {
    if [ -x "$MINIMESH" ]; then
        step "stopping minimesh and removing its capture rules"
        "$MINIMESH" down || true
    fi
    if docker info >/dev/null 2>&1; then
        step "removing the bookinfo and greeter containers and network (compose project $PROJECT)"
        compose down -v --remove-orphans
    fi
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: compose/demo.sh up|down" >&2; exit 2 ;;
esac
