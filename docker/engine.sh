#!/usr/bin/env bash
# A Docker engine for `make image` / `make test-image` on a machine that may have none running.
#   docker/engine.sh start   # answers at once if an engine answers; else installs Debian's docker.io when
#                            # dockerd is missing, starts dockerd and prints "started"
#   docker/engine.sh stop    # stops the engine that `start` started, and only that one
set -euo pipefail
state=${PEFTOPT_ENGINE_STATE:-/run/peftopt-dockerd}
log=${PEFTOPT_ENGINE_LOG:-/var/log/peftopt-dockerd.log}

case "${1:-}" in
  start)
    if docker info >/dev/null 2>&1; then exit 0; fi
    if ! command -v dockerd >/dev/null; then
      [[ $(id -u) == 0 ]] || { echo "no Docker engine, and installing one needs root" >&2; exit 1; }
      echo "installing Debian's docker.io" >&2
      apt-get update -qq >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >&2
    fi
    mkdir -p "$(dirname "$state")"
    setsid dockerd --pidfile "$state.pid" >"$log" 2>&1 < /dev/null &
    for _ in $(seq 120); do
      if docker info >/dev/null 2>&1; then echo started; exit 0; fi
      sleep 0.5
    done
    echo "dockerd did not answer within 60 s; its log ($log) ends:" >&2
    tail -n 20 "$log" >&2
    exit 1
    ;;
  stop)
    [[ -f "$state.pid" ]] || exit 0
    pid=$(cat "$state.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    rm -f "$state.pid"
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
