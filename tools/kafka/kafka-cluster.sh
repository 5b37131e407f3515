#!/usr/bin/env bash
# kafka-cluster.sh - a real three-broker Apache Kafka cluster (KRaft) on 127.0.0.1, for the
# failover tests (tests/cluster.rs) and for benchmarks against replication. The one-broker
# script, tools/kafka/kafka-ci.sh, stays what every other test uses; this one reuses its
# functions (free ports, pid checks, the Maven fetch) and its conventions.
#
#   tools/kafka/kafka-cluster.sh start          # all nodes: pick free ports, format, start, wait
#   tools/kafka/kafka-cluster.sh start N        # node N only (again), on its old port and data
#   tools/kafka/kafka-cluster.sh stop [N]       # SIGTERM: controlled shutdown (all, or node N)
#   tools/kafka/kafka-cluster.sh kill N         # SIGKILL node N (a crash); keeps port and data
#   tools/kafka/kafka-cluster.sh pause N | resume N   # SIGSTOP / SIGCONT (+ wait) node N
#   tools/kafka/kafka-cluster.sh leader TOPIC [P]     # the node id leading partition P (0)
#   tools/kafka/kafka-cluster.sh isr TOPIC [P]        # its in-sync replicas, comma-separated
#   tools/kafka/kafka-cluster.sh wait-isr TOPIC       # until every partition has all replicas in sync
#   tools/kafka/kafka-cluster.sh status         # one line per node; exit 1 if one does not answer
#   tools/kafka/kafka-cluster.sh bootstrap | env | logs N [n] | clean
#
# Nodes: 0 is the KRaft controller (process.roles=controller, a quorum of one); 1, 2 and 3 are
# the brokers. The faults under test are the brokers' (leader failover, ISR shrink below
# min.insync.replicas, rolling restarts); a controller quorum of three would cost two more
# JVMs on a 2-core machine and is not what the gateway talks to. Topics get three replicas
# and need two in sync: default.replication.factor=3, min.insync.replicas=2 (so with two
# brokers down, acks=all writes are refused), one partition unless asked for more.
#
# Run dir ($KAFKA_CLUSTER_DIR, default <repo>/target/kafka-cluster): bootstrap (the three
# brokers, comma-separated), node-N/{server.properties,port,kafka.pid,data/,logs/},
# watch.pid, watchdog.pid. `start` on a run dir started before reuses ports and data.
#
# `env` prints, for tests:
#   EDGEGATE_TEST_KAFKA_CLUSTER       the bootstrap list
#   EDGEGATE_TEST_KAFKA_CLUSTER_CTL   this script
#   KAFKA_CLUSTER_DIR                 the run dir
#
# Environment (defaults): KAFKA_CLUSTER_DIR as above; KAFKA_VERSION, KAFKA_LIBS, JAVA_HOME as
# for kafka-ci.sh; KAFKA_BROKER_HEAP_OPTS="-Xms128m -Xmx384m",
# KAFKA_CONTROLLER_HEAP_OPTS="-Xms64m -Xmx256m"; KAFKA_START_TIMEOUT=120 (seconds);
# KAFKA_WATCH_PID=<pid> (every node is killed when that process is gone; remembered for later
# `start`s) and KAFKA_WATCH_CLEAN=1 (...and the run dir deleted); KAFKA_EXTRA_PROPERTIES
# (extra lines for every broker's server.properties).
#
# Needs what kafka-ci.sh needs (Java 17+, kcat); not openssl: the cluster has PLAINTEXT
# listeners only.
set -euo pipefail

CLUSTER_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The one-broker script's functions and settings (it does not dispatch when sourced).
# shellcheck source=tools/kafka/kafka-ci.sh
. "$CLUSTER_HERE/kafka-ci.sh"

KAFKA_CLUSTER_DIR=${KAFKA_CLUSTER_DIR:-$ROOT/target/kafka-cluster}
case "$KAFKA_CLUSTER_DIR" in /*) ;; *) KAFKA_CLUSTER_DIR=$PWD/$KAFKA_CLUSTER_DIR ;; esac
KAFKA_BROKER_HEAP_OPTS=${KAFKA_BROKER_HEAP_OPTS:--Xms128m -Xmx384m}
KAFKA_CONTROLLER_HEAP_OPTS=${KAFKA_CONTROLLER_HEAP_OPTS:--Xms64m -Xmx256m}
# Not the one-broker default: a different cluster id makes a mixed-up run dir fail loudly.
KAFKA_CLUSTER_ID=${KAFKA_CLUSTER_CLUSTER_ID:-ZWRnZWdhdGUtY2x1c3Rlcg}
BROKERS=(1 2 3)
NODES=(0 1 2 3)
WATCHDOG_PIDFILE=$KAFKA_CLUSTER_DIR/watchdog.pid

die() { echo "kafka-cluster: $*" >&2; exit 1; }
say() { echo "kafka-cluster: $*"; }

node_dir() { echo "$KAFKA_CLUSTER_DIR/node-$1"; }
node_port() { cat "$(node_dir "$1")/port" 2>/dev/null || die "node $1 has never been started in $KAFKA_CLUSTER_DIR"; }
node_pid() { live_pid "$(node_dir "$1")/kafka.pid" "kafka.Kafka $(node_dir "$1")/server.properties"; }
watchdog_pid() { live_pid "$WATCHDOG_PIDFILE" "kafka-cluster.sh watchdog"; }
cluster_bootstrap() { cat "$KAFKA_CLUSTER_DIR/bootstrap" 2>/dev/null || die "no cluster has been started in $KAFKA_CLUSTER_DIR"; }

check_node() {
  case "${1:-}" in 0|1|2|3) ;; *) die "node must be 0 (the controller) or 1, 2, 3 (the brokers), not '${1:-}'" ;; esac
}

# Ports for every node, chosen once per run dir.
assign_ports() {
  local taken=() n p
  for n in "${NODES[@]}"; do
    [ -f "$(node_dir "$n")/port" ] && taken+=("$(cat "$(node_dir "$n")/port")")
  done
  for n in "${NODES[@]}"; do
    mkdir -p "$(node_dir "$n")"
    [ -f "$(node_dir "$n")/port" ] && continue
    p=$(free_port "${taken[@]}")
    taken+=("$p")
    echo "$p" > "$(node_dir "$n")/port"
  done
  local list=()
  for n in "${BROKERS[@]}"; do list+=("$KAFKA_HOST:$(node_port "$n")"); done
  (IFS=,; echo "${list[*]}") > "$KAFKA_CLUSTER_DIR/bootstrap"
}

write_node_config() {
  local n=$1 dir cport port
  dir=$(node_dir "$n")
  cport=$(node_port 0)
  port=$(node_port "$n")
  mkdir -p "$dir/data" "$dir/logs"
  {
    echo "# generated by kafka-cluster.sh for Kafka $KAFKA_VERSION"
    echo "node.id=$n"
    echo "controller.quorum.voters=0@$KAFKA_HOST:$cport"
    echo "controller.listener.names=CONTROLLER"
    echo "log.dirs=$dir/data"
    # After a SIGKILL the controller fences a broker once its session lapses: 3 s, not 9 s.
    echo "broker.heartbeat.interval.ms=500"
    echo "broker.session.timeout.ms=3000"
    echo "num.network.threads=2"
    echo "num.io.threads=2"
    echo "num.recovery.threads.per.data.dir=1"
    echo "background.threads=2"
    if [ "$n" = 0 ]; then
      echo "process.roles=controller"
      echo "listeners=CONTROLLER://$KAFKA_HOST:$cport"
      echo "listener.security.protocol.map=CONTROLLER:PLAINTEXT"
    else
      cat <<EOF
process.roles=broker
listeners=PLAINTEXT://$KAFKA_HOST:$port
advertised.listeners=PLAINTEXT://$KAFKA_HOST:$port
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
# three replicas, two of them in sync for an acks=all write
num.partitions=1
default.replication.factor=3
min.insync.replicas=2
offsets.topic.replication.factor=3
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
# A restarted broker takes its preferred leaderships back soon, as in production.
leader.imbalance.check.interval.seconds=10
# A follower that stopped fetching leaves the ISR after 5 s, not 30 s.
replica.lag.time.max.ms=5000
EOF
      if [ -n "$KAFKA_EXTRA_PROPERTIES" ]; then printf '%s\n' "$KAFKA_EXTRA_PROPERTIES"; fi
    fi
  } > "$dir/server.properties"
}

# Formats the node's storage on first use and starts its JVM in the background.
launch_node() {
  local n=$1 dir heap
  dir=$(node_dir "$n")
  write_node_config "$n"
  if [ ! -f "$dir/data/meta.properties" ]; then
    "$JAVA" -Xmx128m -XX:TieredStopAtLevel=1 "-Dkafka.logs.dir=$dir/logs" \
        "-Dlog4j2.configurationFile=$HERE/log4j2.properties" -cp "$KAFKA_LIBS/*" \
        kafka.tools.StorageTool format -t "$KAFKA_CLUSTER_ID" -c "$dir/server.properties" \
        > "$dir/logs/format.out" 2>&1 \
      || { cat "$dir/logs/format.out" >&2; die "formatting node $n failed"; }
  fi
  if [ "$n" = 0 ]; then heap=$KAFKA_CONTROLLER_HEAP_OPTS; else heap=$KAFKA_BROKER_HEAP_OPTS; fi
  stat -c %s "$dir/logs/server.log" > "$dir/log-mark" 2>/dev/null || echo 0 > "$dir/log-mark"
  # shellcheck disable=SC2086 # the *_OPTS are word lists, as in kafka-run-class.sh
  nohup "$JAVA" $heap $KAFKA_JVM_PERFORMANCE_OPTS "-Dkafka.logs.dir=$dir/logs" \
      "-Dlog4j2.configurationFile=$HERE/log4j2.properties" -cp "$KAFKA_LIBS/*" \
      kafka.Kafka "$dir/server.properties" </dev/null >"$dir/logs/kafka.out" 2>&1 &
  echo $! > "$dir/kafka.pid"
}

# True when node $1 answers: the controller accepts TCP connections; a broker answers a
# Metadata request that lists it (it has registered with the controller).
node_answers() {
  local n=$1 port metadata
  port=$(node_port "$n")
  (exec 3<>"/dev/tcp/$KAFKA_HOST/$port") 2>/dev/null || return 1
  [ "$n" = 0 ] && return 0
  metadata=$(kcat -b "$KAFKA_HOST:$port" -L -m 2 2>/dev/null) || return 1
  [[ "$metadata" == *"broker $n at $KAFKA_HOST:$port"* ]]
}

explain_node() {
  local n=$1 dir mark errors
  dir=$(node_dir "$n")
  mark=$(cat "$dir/log-mark" 2>/dev/null || echo 0)
  errors=$(tail -c "+$((mark + 1))" "$dir/logs/server.log" 2>/dev/null \
    | grep -E '^\[[^]]*\] (ERROR|FATAL) |^Caused by: ' | tail -n 12) || true
  echo "kafka-cluster: node $n: $2; the details are in $dir/logs:" >&2
  if [ -n "$errors" ]; then echo "$errors" >&2; else tail -n 20 "$dir/logs/kafka.out" >&2 || true; fi
}

wait_node() {
  local n=$1 started=$SECONDS
  until node_answers "$n"; do
    if ! node_pid "$n" >/dev/null; then explain_node "$n" "the process exited"; return 1; fi
    if [ $((SECONDS - started)) -ge "$KAFKA_START_TIMEOUT" ]; then
      explain_node "$n" "no answer after ${KAFKA_START_TIMEOUT}s"; return 1
    fi
    sleep 0.2
  done
}

# Kills every node when the watched process is gone. One watchdog for the whole cluster; it
# reads the pid files each time, so nodes restarted by a test are covered too.
cmd_watchdog() {
  local watched=$1 clean=$2 n pid _
  trap '' HUP INT
  while [ -d "$KAFKA_CLUSTER_DIR" ]; do
    if ! alive "$watched"; then
      for n in "${NODES[@]}"; do
        if pid=$(node_pid "$n"); then kill -CONT "$pid" 2>/dev/null || true; kill -TERM "$pid" 2>/dev/null || true; fi
      done
      for _ in $(seq 1 100); do
        pid=
        for n in "${NODES[@]}"; do node_pid "$n" >/dev/null && pid=1; done
        [ -n "$pid" ] || break
        sleep 0.1
      done
      for n in "${NODES[@]}"; do
        if pid=$(node_pid "$n"); then kill -KILL "$pid" 2>/dev/null || true; fi
      done
      if [ "$clean" = 1 ]; then sleep 0.2; rm -rf "$KAFKA_CLUSTER_DIR"; fi
      exit 0
    fi
    sleep 1
  done
}

start_watchdog() {
  local watched=${KAFKA_WATCH_PID:-} clean=${KAFKA_WATCH_CLEAN:-}
  watchdog_pid >/dev/null && return 0
  if [ -z "$watched" ] && [ -f "$KAFKA_CLUSTER_DIR/watch.pid" ]; then
    read -r watched clean < "$KAFKA_CLUSTER_DIR/watch.pid"
  fi
  [ -n "$watched" ] || return 0
  alive "$watched" || { stop_nodes TERM "${NODES[@]}"; die "KAFKA_WATCH_PID $watched is not running"; }
  echo "$watched ${clean:-0}" > "$KAFKA_CLUSTER_DIR/watch.pid"
  KAFKA_CLUSTER_DIR=$KAFKA_CLUSTER_DIR nohup "$CLUSTER_HERE/kafka-cluster.sh" watchdog "$watched" "${clean:-0}" \
      </dev/null >/dev/null 2>&1 &
  echo $! > "$WATCHDOG_PIDFILE"
}

# Starts the nodes given (already running ones are only resumed), in parallel, then waits.
start_nodes() {
  local started=$SECONDS n pid launched=()
  [ -f "$KAFKA_LIBS/.complete" ] || die "Kafka $KAFKA_VERSION is not in $KAFKA_LIBS; run 'tools/kafka/kafka-ci.sh fetch'"
  command -v "$JAVA" >/dev/null 2>&1 || die "java not found (Debian: apt-get install default-jre-headless)"
  command -v kcat >/dev/null 2>&1 || die "kcat not found (Debian: apt-get install kcat)"
  mkdir -p "$KAFKA_CLUSTER_DIR"
  assign_ports
  for n in "$@"; do
    if pid=$(node_pid "$n"); then
      kill -CONT "$pid" 2>/dev/null || true
    else
      launch_node "$n"; launched+=("$n")
    fi
  done
  start_watchdog
  for n in "$@"; do
    wait_node "$n" || { stop_nodes KILL "${launched[@]}"; die "node $n did not start; see $(node_dir "$n")/logs"; }
  done
  say "node(s) $* ready in $((SECONDS - started))s; bootstrap $(cluster_bootstrap)"
}

# Stops the nodes given with signal $1 (TERM: controlled shutdown; KILL: a crash), all at
# once, then waits for each. Keeps data and ports.
stop_nodes() {
  local sig=$1 n pid _
  shift
  local pids=()
  for n in "$@"; do
    if pid=$(node_pid "$n"); then
      kill -CONT "$pid" 2>/dev/null || true
      kill "-$sig" "$pid"
      pids+=("$pid")
    fi
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 300); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
      say "pid $pid still running 30s after SIG$sig; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      while alive "$pid"; do sleep 0.1; done
    fi
  done
  for n in "$@"; do rm -f "$(node_dir "$n")/kafka.pid"; done
  say "node(s) $* stopped (SIG$sig)"
}

cmd_stop_all() {
  local wpid
  if wpid=$(watchdog_pid); then kill -TERM "$wpid" 2>/dev/null || true; fi
  rm -f "$WATCHDOG_PIDFILE"
  # Brokers first: the controller must be there for their controlled shutdown.
  stop_nodes TERM "${BROKERS[@]}"
  stop_nodes TERM 0
}

cmd_pause() {
  local pid
  check_node "$1"
  pid=$(node_pid "$1") || die "node $1 is not running"
  kill -STOP "$pid"
  say "node $1 paused (pid $pid)"
}

cmd_resume() {
  local pid
  check_node "$1"
  pid=$(node_pid "$1") || die "node $1 is not running"
  kill -CONT "$pid"
  wait_node "$1" || die "node $1 does not answer after SIGCONT"
  say "node $1 resumed (pid $pid)"
}

# `kcat -L` of topic $1 from the first broker that answers.
topic_metadata() {
  local n port out
  for n in "${BROKERS[@]}"; do
    port=$(node_port "$n")
    (exec 3<>"/dev/tcp/$KAFKA_HOST/$port") 2>/dev/null || continue
    if out=$(kcat -b "$KAFKA_HOST:$port" -L -t "$1" -m 5 2>/dev/null); then
      echo "$out"; return 0
    fi
  done
  return 1
}

# "partition P, leader L, replicas: a,b,c, isrs: x,y" -> field $3 (leader, replicas, isrs).
partition_field() {
  local topic=$1 partition=$2 field=$3 metadata line
  metadata=$(topic_metadata "$topic") || die "no broker answers a metadata request"
  while read -r line; do
    [[ "$line" =~ ^partition\ $partition,\ leader\ (-?[0-9]+),\ replicas:\ ([0-9,]*),\ isrs:\ ([0-9,]*) ]] || continue
    case "$field" in
      leader) echo "${BASH_REMATCH[1]}" ;;
      replicas) echo "${BASH_REMATCH[2]}" ;;
      isrs) echo "${BASH_REMATCH[3]}" ;;
    esac
    return 0
  done <<< "$metadata"
  die "topic $topic has no partition $partition (yet)"
}

# Until every partition of topic $1 has a leader and all its replicas in sync.
cmd_wait_isr() {
  local topic=$1 started=$SECONDS metadata line behind
  while :; do
    behind=1
    if metadata=$(topic_metadata "$topic"); then
      behind=0
      [[ "$metadata" == *"partition "* ]] || behind=1
      while read -r line; do
        [[ "$line" =~ ^partition\ [0-9]+,\ leader\ (-?[0-9]+),\ replicas:\ ([0-9,]*),\ isrs:\ ([0-9,]*) ]] || continue
        if [ "${BASH_REMATCH[1]}" -lt 0 ] \
            || [ "$(tr ',' '\n' <<< "${BASH_REMATCH[2]}" | sort | tr '\n' ,)" != "$(tr ',' '\n' <<< "${BASH_REMATCH[3]}" | sort | tr '\n' ,)" ]; then
          behind=1
        fi
      done <<< "$metadata"
    fi
    [ "$behind" = 0 ] && return 0
    [ $((SECONDS - started)) -lt "$KAFKA_START_TIMEOUT" ] || die "topic $topic: replicas not in sync after ${KAFKA_START_TIMEOUT}s"
    sleep 0.2
  done
}

cmd_status() {
  local n pid state rc=0
  for n in "${NODES[@]}"; do
    if ! pid=$(node_pid "$n"); then state="not running"; rc=1
    elif node_answers "$n"; then state="running (pid $pid) on $KAFKA_HOST:$(node_port "$n")"
    else state="not answering (pid $pid)"; rc=1
    fi
    if [ "$n" = 0 ]; then echo "node 0 (controller): $state"; else echo "node $n (broker): $state"; fi
  done
  return "$rc"
}

cmd_env() {
  echo "EDGEGATE_TEST_KAFKA_CLUSTER=$(cluster_bootstrap)"
  echo "EDGEGATE_TEST_KAFKA_CLUSTER_CTL=$CLUSTER_HERE/kafka-cluster.sh"
  echo "KAFKA_CLUSTER_DIR=$KAFKA_CLUSTER_DIR"
}

case "${1:-}" in
  fetch)     cmd_fetch ;;
  start)     if [ -n "${2:-}" ]; then check_node "$2"; start_nodes "$2"; else start_nodes 0 "${BROKERS[@]}"; fi ;;
  stop)      if [ -n "${2:-}" ]; then check_node "$2"; stop_nodes TERM "$2"; else cmd_stop_all; fi ;;
  kill)      check_node "${2:-}"; stop_nodes KILL "$2" ;;
  pause)     cmd_pause "${2:-}" ;;
  resume)    cmd_resume "${2:-}" ;;
  leader)    [ -n "${2:-}" ] || die "usage: $0 leader TOPIC [PARTITION]"; partition_field "$2" "${3:-0}" leader ;;
  isr)       [ -n "${2:-}" ] || die "usage: $0 isr TOPIC [PARTITION]"; partition_field "$2" "${3:-0}" isrs ;;
  wait-isr)  [ -n "${2:-}" ] || die "usage: $0 wait-isr TOPIC"; cmd_wait_isr "$2" ;;
  status)    cmd_status ;;
  bootstrap) cluster_bootstrap ;;
  env)       cmd_env ;;
  logs)      check_node "${2:-}"; tail -n "${3:-200}" "$(node_dir "$2")/logs/server.log" ;;
  clean)     cmd_stop_all >/dev/null; rm -rf "$KAFKA_CLUSTER_DIR"; say "removed $KAFKA_CLUSTER_DIR" ;;
  watchdog)  shift; cmd_watchdog "$@" ;;
  *) echo "usage: $0 start [N]|stop [N]|kill N|pause N|resume N|leader TOPIC [P]|isr TOPIC [P]|wait-isr TOPIC|status|bootstrap|env|logs N [n]|clean" >&2; exit 2 ;;
esac
