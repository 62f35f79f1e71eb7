#!/usr/bin/env bash
# A Redis Cluster of three primaries (no replicas) for development and tests, on 127.0.0.1.
# Each node is a deploy/redis.sh server (its own port, an append-only file, appendfsync
# always) in DIR/node1..3, with cluster mode on.
#
#   deploy/redis-cluster.sh start DIR   start (or restart) the cluster kept in DIR; prints the
#                                       URL of one node (clients find the others from it)
#   deploy/redis-cluster.sh stop DIR    shut every node down cleanly; the data stays in DIR
#   deploy/redis-cluster.sh status DIR  exit 0 if every node runs and says cluster_state:ok
#
# The slots are assigned once, on the first start (redis-cli --cluster create). Each node
# keeps its cluster configuration (nodes.conf) in its directory, so a restart comes back as
# the same cluster, at the same ports, with every acknowledged write.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
command=${1:?usage: redis-cluster.sh start|stop|status DIR}
dir=${2:?usage: redis-cluster.sh start|stop|status DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
nodes=(node1 node2 node3)

port() {
  cat "$dir/$1/port"
}

every_node_ok() {
  for node in "${nodes[@]}"; do
    [ -f "$dir/$node/port" ] || return 1
    redis-cli -p "$(port "$node")" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
  done
}

case "$command" in
  start)
    for node in "${nodes[@]}"; do
      bash "$here/redis.sh" start "$dir/$node" --cluster-enabled yes \
        --cluster-config-file nodes.conf --cluster-node-timeout 5000 >/dev/null
    done
    if ! redis-cli -p "$(port node1)" cluster info | grep -q '^cluster_slots_assigned:16384'; then
      addresses=()
      for node in "${nodes[@]}"; do addresses+=("127.0.0.1:$(port "$node")"); done
      if ! redis-cli --cluster create "${addresses[@]}" --cluster-replicas 0 --cluster-yes \
        >"$dir/create.log" 2>&1; then
        echo "redis-cli --cluster create failed; the end of its output:" >&2
        tail -n 20 "$dir/create.log" >&2
        exit 1
      fi
    fi
    for _ in $(seq 1 300); do every_node_ok && break; sleep 0.1; done
    if ! every_node_ok; then
      echo "the cluster in $dir is not ok after 30 s:" >&2
      for node in "${nodes[@]}"; do
        echo "$node: $(redis-cli -p "$(port "$node")" cluster info 2>&1 | head -n 1)" >&2
      done
      exit 1
    fi
    echo "redis://127.0.0.1:$(port node1)"
    ;;
  stop)
    for node in "${nodes[@]}"; do bash "$here/redis.sh" stop "$dir/$node"; done
    ;;
  status)
    every_node_ok
    ;;
  *)
    echo "unknown command $command; use start, stop or status" >&2
    exit 2
    ;;
esac
