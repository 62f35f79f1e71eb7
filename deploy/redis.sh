#!/usr/bin/env bash
# A Redis server (Debian's redis-server) for development and tests, on a free port of
# 127.0.0.1, persisting every write to an append-only file in DIR.
#
#   deploy/redis.sh start DIR   start (or restart) the server kept in DIR; prints its URL
#   deploy/redis.sh stop DIR    shut it down cleanly; its data stays in DIR
#   deploy/redis.sh status DIR  exit 0 if it runs
#
# The port is chosen on the first start and kept in DIR, so a restart comes back at the same
# URL with every acknowledged write (appendfsync always): tests restart it mid-run.
set -euo pipefail
command=${1:?usage: redis.sh start|stop|status DIR}
dir=${2:?usage: redis.sh start|stop|status DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

running() {
  [ -f "$dir/port" ] && redis-cli -p "$(cat "$dir/port")" ping >/dev/null 2>&1
}

case "$command" in
  start)
    if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
      echo "redis-server is not installed; run deploy/system_packages.sh" >&2
      exit 1
    fi
    if [ ! -f "$dir/port" ]; then
      python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' \
        >"$dir/port"
    fi
    port=$(cat "$dir/port")
    if ! running; then
      redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --daemonize yes \
        --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" \
        --appendonly yes --appendfsync always --save ""
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
