#!/usr/bin/env bash
# A single-node Apache Kafka (KRaft, broker and controller in one process) for development
# and tests, on free ports of 127.0.0.1.
#
#   deploy/kafka.sh start DIR   start (or restart) the broker kept in DIR; prints host:port
#   deploy/kafka.sh stop DIR    stop it; its data stays in DIR for the next start
#   deploy/kafka.sh status DIR  exit 0 if it runs
#
# The jars come from Maven Central once (through Maven, whose ~/.m2 keeps them) into
# $STREAMSINK_KAFKA_HOME, checked against their recorded checksums at every start (a cache
# that lost or broke a jar is fetched again). The ports are chosen on the first start and kept
# in DIR, so a restart brings the same broker back at the same address: tests restart it mid-run.
# Whatever fails says so on stderr, with the end of the broker's logs.
set -Eeuo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kafka_home=${STREAMSINK_KAFKA_HOME:-$HOME/.cache/streamsink/kafka-4.1.1}
command=${1:?usage: kafka.sh start|stop|status DIR}
dir=${2:?usage: kafka.sh start|stop|status DIR}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)

# The end of each log this script keeps, the Java it ran and the room left, on stderr.
show_logs() {
  local log
  for log in "$dir/format.log" "$dir/kafka.log"; do
    if [ -s "$log" ]; then
      echo "--- the end of $log:" >&2
      tail -n 30 "$log" >&2
    fi
  done
  echo "--- $(java -version 2>&1 | head -n 1); room left: $(df -h "$dir" | tail -n 1)" >&2
}
trap 'status=$?; echo "kafka.sh $command: \"$BASH_COMMAND\" failed with exit $status" >&2; show_logs; exit $status' ERR

# True when every jar fetched before is still there, byte for byte.
jars_intact() {
  [ -s "$kafka_home/.complete" ] \
    && (cd "$kafka_home/libs" && sha256sum --quiet --status -c ../.complete) 2>/dev/null
}

# Maven Central can fail a fetch now and then: try a few times, and when it fails for good,
# show what Maven said instead of a bare exit code.
fetch_jars() {
  if jars_intact; then return; fi
  if [ -s "$kafka_home/.complete" ]; then
    echo "the Kafka jars in $kafka_home changed since they were fetched; fetching them again" >&2
  else
    echo "fetching the Kafka jars from Maven Central (once)" >&2
  fi
  rm -f "$kafka_home/.complete"
  mkdir -p "$kafka_home"
  local log="$kafka_home/fetch.log" attempt force=()
  for attempt in 1 2 3; do
    rm -rf "$kafka_home/libs"
    # Maven remembers a failed download; -U makes a retry ask Central again.
    if mvn -B "${force[@]}" -f "$here/kafka/pom.xml" dependency:copy-dependencies \
        -DoutputDirectory="$kafka_home/libs" -DincludeScope=runtime >"$log" 2>&1; then
      (cd "$kafka_home/libs" && sha256sum ./*.jar) >"$kafka_home/.complete"
      return
    fi
    echo "fetching the Kafka jars failed (attempt $attempt of 3)" >&2
    force=(-U)
    sleep $((attempt * 5))
  done
  echo "Maven could not fetch the Kafka jars; its last output:" >&2
  grep -E '\[(ERROR|WARNING)\]' "$log" | tail -n 40 >&2 || tail -n 40 "$log" >&2
  exit 1
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

running() {
  [ -f "$dir/kafka.pid" ] && kill -0 "$(cat "$dir/kafka.pid")" 2>/dev/null
}

# True once the broker answers a metadata request on its client port.
answers() {
  python3 - "$1" <<'PY'
import socket, struct, sys
# ApiVersions v0 request: the smallest request every Kafka broker answers.
request = struct.pack(">hhih", 18, 0, 1, 10) + b"streamsink"
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=2) as s:
        s.sendall(struct.pack(">i", len(request)) + request)
        size = struct.unpack(">i", s.recv(4))[0]
        body = s.recv(size)
        sys.exit(0 if len(body) >= 6 and struct.unpack(">h", body[4:6])[0] == 0 else 1)
except OSError:
    sys.exit(1)
PY
}

write_config() {
  cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
min.insync.replicas=1
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
PROPS
}

case "$command" in
  start)
    if running; then
      echo "127.0.0.1:$(cat "$dir/port")"
      exit 0
    fi
    command -v java >/dev/null || { echo "Java 17 is needed for the Kafka broker" >&2; exit 1; }
    fetch_jars
    if [ ! -f "$dir/port" ]; then
      free_port >"$dir/port"
      free_port >"$dir/controller_port"
    fi
    port=$(cat "$dir/port")
    controller_port=$(cat "$dir/controller_port")
    write_config
    classpath="$kafka_home/libs/*"
    if [ ! -f "$dir/data/meta.properties" ]; then
      # "=" joins the id to its option: a base64 id may begin with "-", like an option.
      cluster_id=$(python3 -c 'import base64, uuid; print(base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("="))')
      java -cp "$classpath" kafka.tools.StorageTool format --cluster-id="$cluster_id" \
        -c "$dir/server.properties" >"$dir/format.log" 2>&1
    fi
    nohup java ${KAFKA_HEAP_OPTS:--Xmx512m} \
      -Dlog4j2.level=WARN -cp "$classpath" kafka.Kafka "$dir/server.properties" \
      >>"$dir/kafka.log" 2>&1 &
    echo $! >"$dir/kafka.pid"
    for _ in $(seq 1 120); do
      if answers "$port"; then
        echo "127.0.0.1:$port"
        exit 0
      fi
      if ! running; then break; fi
      sleep 0.5
    done
    echo "the Kafka broker in $dir did not answer on port $port" >&2
    show_logs
    exit 1
    ;;
  stop)
    if running; then
      pid=$(cat "$dir/kafka.pid")
      kill "$pid"
      for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/kafka.pid"
    ;;
  status)
    if running; then exit 0; fi
    exit 1
    ;;
  *)
    echo "unknown command $command; use start, stop or status" >&2
    exit 2
    ;;
esac
