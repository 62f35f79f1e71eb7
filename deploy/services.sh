#!/usr/bin/env bash
# Kafka and Redis for trying streamsink by hand:
#
#   eval "$(bash deploy/services.sh start)"   start both; exports their addresses
#   bash deploy/services.sh stop              stop both (data stays in the directory)
#
# DIR (second argument) defaults to .streamsink-services in the clone.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
command=${1:?usage: services.sh start|stop [DIR]}
dir=${2:-$here/../.streamsink-services}
case "$command" in
  start)
    bootstrap=$(bash "$here/kafka.sh" start "$dir/kafka")
    redis_url=$(bash "$here/redis.sh" start "$dir/redis")
    echo "Kafka at $bootstrap, Redis at $redis_url" >&2
    echo "export STREAMSINK_BOOTSTRAP_SERVERS=$bootstrap"
    echo "export STREAMSINK_REDIS_URL=$redis_url"
    ;;
  stop)
    bash "$here/kafka.sh" stop "$dir/kafka"
    bash "$here/redis.sh" stop "$dir/redis"
    ;;
  *)
    echo "unknown command $command; use start or stop" >&2
    exit 2
    ;;
esac
