#!/usr/bin/env bash
# A Redis server (Debian's redis-server) for development and tests, on a free port of
# 127.0.0.1, persisting every write to an append-only file in DIR.
#
#   deploy/redis.sh start DIR [OPTION...]  start (or restart) the server kept in DIR, with
#                                          any further redis-server options; prints its URL
#   deploy/redis.sh stop DIR               shut it down cleanly; its data stays in DIR
#   deploy/redis.sh status DIR             exit 0 if it runs
#
# The port is chosen on the first start and kept in DIR, so a restart comes back at the same
# URL with every acknowledged write (appendfsync always): tests restart it mid-run. The port
# plus 10000 is free as well when it is chosen: a cluster node's bus listens there
# (deploy/redis-cluster.sh starts three nodes through this script).
set -euo pipefail
command=${1:?usage: redis.sh start|stop|status DIR [OPTION...]}
dir=${2:?usage: redis.sh start|stop|status DIR [OPTION...]}
shift 2
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

running() {
  [ -f "$dir/port" ] && redis-cli -p "$(cat "$dir/port")" ping >/dev/null 2>&1
}

free_port() {
  python3 -c '
import random, socket
while True:
    port = random.randint(20000, 50000)
    try:
        with socket.socket() as server, socket.socket() as bus:
            server.bind(("127.0.0.1", port))
            bus.bind(("127.0.0.1", port + 10000))
    except OSError:
        continue
    print(port)
    break'
}

case "$command" in
  start)
    if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
      echo "redis-server is not installed; run deploy/system_packages.sh" >&2
      exit 1
    fi
    if [ ! -f "$dir/port" ]; then
      free_port >"$dir/port"
    fi
    port=$(cat "$dir/port")
    if ! running; then
      redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --daemonize yes \
        --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
        --appendonly yes --appendfsync always --save "" "$@"
      for _ in $(seq 1 100); do running && break; sleep 0.1; done
    fi
    if ! running; then
      echo "redis-server in $dir did not answer on port $port; the end of its log:" >&2
      tail -n 20 "$dir/redis.log" >&2
      exit 1
    fi
    echo "redis://127.0.0.1:$port/0"
    ;;
  stop)
    if running; then
      redis-cli -p "$(cat "$dir/port")" shutdown >/dev/null 2>&1 || true
      for _ in $(seq 1 100); do running || break; sleep 0.1; done
    fi
    ;;
  status)
    running
    ;;
  *)
    echo "unknown command $command; use start, stop or status" >&2
    exit 2
    ;;
esac
