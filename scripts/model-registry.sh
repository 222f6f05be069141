#!/bin/sh
# An OCI registry for models, on loopback: Debian's docker-registry (the CNCF distribution registry), its blobs
# under DIR. `make run` starts one and publishes the bundled models to it; the tests start their own.
#   model-registry.sh start DIR [ADDR]   serve at ADDR (default 127.0.0.1:5390); a registry already answering
#                                         there is left as it is
#   model-registry.sh stop DIR           stop the registry started with this DIR
set -eu

usage="usage: model-registry.sh start DIR [ADDR] | stop DIR"
command=${1:?$usage}
dir=${2:?$usage}
addr=${3:-127.0.0.1:5390}

answers() {
    python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "http://$addr/v2/" \
        >/dev/null 2>&1
}

case "$command" in
start)
    if answers; then
        echo "model-registry: a registry already answers at http://$addr"
        exit 0
    fi
    command -v docker-registry >/dev/null 2>&1 || {
        echo "model-registry: docker-registry is not installed; run sh scripts/system-deps.sh" >&2
        exit 1
    }
    mkdir -p "$dir/storage"
    dir=$(cd "$dir" && pwd) # the registry wants an absolute storage path
    # Loopback only, no auth: the registry a box (or CI) pulls its bundled models from. Deletion is on so that
    # `docker-registry garbage-collect` can reclaim replaced models.
    cat >"$dir/config.yml" <<CONFIG
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/storage
  delete:
    enabled: true
http:
  addr: $addr
CONFIG
    # setsid: the registry outlives this script (and make), as a server should; `stop` ends it.
    setsid docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 </dev/null &
    echo $! >"$dir/registry.pid"
    tries=0
    until answers; do
        tries=$((tries + 1))
        if [ "$tries" -gt 100 ] || ! kill -0 "$(cat "$dir/registry.pid")" 2>/dev/null; then
            echo "model-registry: the registry did not start at http://$addr; its log:" >&2
            cat "$dir/registry.log" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "model-registry: serving http://$addr (data in $dir/storage)"
    ;;
stop)
    if [ -f "$dir/registry.pid" ]; then
        kill "$(cat "$dir/registry.pid")" 2>/dev/null || true
        rm -f "$dir/registry.pid"
    fi
    ;;
*)
    echo "$usage" >&2
    exit 2
    ;;
esac
