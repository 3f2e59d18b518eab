# Shared settings for the entry points in scripts/. Sourced, never run.
# Every setting comes from the environment, with a local default.

EO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export EO_STATE_DIR="${EO_STATE_DIR:-/var/tmp/effectively-once}"
export EO_PG_PORT="${EO_PG_PORT:-5432}"
export EO_PG_USER="${EO_PG_USER:-eo}"
export EO_PG_PASSWORD="${EO_PG_PASSWORD:-eo}"
export EO_PG_ADMIN_URL="${EO_PG_ADMIN_URL:-postgres://${EO_PG_USER}:${EO_PG_PASSWORD}@127.0.0.1:${EO_PG_PORT}/postgres}"
export EO_AMQP_URL="${EO_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
# ElasticMQ, the SQS-compatible server (scripts/elasticmq/). The Rust side
# reads the same variables (queue::sqs::SqsSettings::from_env).
export EO_SQS_PORT="${EO_SQS_PORT:-9324}"
export EO_SQS_ENDPOINT="${EO_SQS_ENDPOINT:-http://127.0.0.1:${EO_SQS_PORT}}"
export EO_SQS_JAVA_OPTS="${EO_SQS_JAVA_OPTS:--Xms64m -Xmx512m}"
# Apache Kafka in KRaft mode (scripts/kafka/). The Rust side reads
# EO_KAFKA_BROKERS (queue::kafka::brokers_from_env).
export EO_KAFKA_PORT="${EO_KAFKA_PORT:-9092}"
export EO_KAFKA_CONTROLLER_PORT="${EO_KAFKA_CONTROLLER_PORT:-9093}"
export EO_KAFKA_BROKERS="${EO_KAFKA_BROKERS:-127.0.0.1:${EO_KAFKA_PORT}}"
export EO_KAFKA_JAVA_OPTS="${EO_KAFKA_JAVA_OPTS:--Xms256m -Xmx768m}"
# The three-broker Kafka cluster of Leg 2 (scripts/kafka-cluster): broker N
# listens on EO_KAFKA_CLUSTER_PORT + N - 1, its controller on its own port.
export EO_KAFKA_CLUSTER_PORT="${EO_KAFKA_CLUSTER_PORT:-19092}"
export EO_KAFKA_CLUSTER_CONTROLLER_PORT="${EO_KAFKA_CLUSTER_CONTROLLER_PORT:-19099}"
export EO_KAFKA_CLUSTER_BROKERS="${EO_KAFKA_CLUSTER_BROKERS:-127.0.0.1:${EO_KAFKA_CLUSTER_PORT},127.0.0.1:$((EO_KAFKA_CLUSTER_PORT + 1)),127.0.0.1:$((EO_KAFKA_CLUSTER_PORT + 2))}"
export EO_KAFKA_CLUSTER_JAVA_OPTS="${EO_KAFKA_CLUSTER_JAVA_OPTS:--Xms128m -Xmx384m}"
# Kafka Connect (chapter 7) runs from the Kafka jars with Debezium's plugin
# unpacked here. The Rust side reads the same variables (cdc::ConnectSettings).
export EO_CONNECT_CLASSPATH="${EO_CONNECT_CLASSPATH:-$EO_STATE_DIR/kafka/lib/*}"
export EO_CONNECT_PLUGINS="${EO_CONNECT_PLUGINS:-$EO_STATE_DIR/connect/plugins}"
# A fixed node name keeps the RabbitMQ CLI tools independent of the hostname.
export RABBITMQ_NODENAME="${RABBITMQ_NODENAME:-rabbit@localhost}"
# Erlang's port mapper, started by RabbitMQ or by the first rabbitmqctl
# call, listens on loopback only.
export ERL_EPMD_ADDRESS="${ERL_EPMD_ADDRESS:-127.0.0.1}"
# Builds live outside the clone so that repeated runs reuse them.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/effectively-once/target}"
# Incremental compilation's caches grow with every rebuild (tens of GB after
# a few dozen runs) and buy these scripts nothing: they build each crate once
# per change. An editor's own cargo keeps its incremental builds.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

need() {
    command -v "$1" >/dev/null 2>&1 || die "$1 is missing. $2"
}

docker_engine_answers() {
    [ "${EO_NO_DOCKER:-0}" != 1 ] && command -v docker >/dev/null 2>&1 &&
        docker info >/dev/null 2>&1
}

# wait_until SECONDS WHAT COMMAND...: polls COMMAND until it succeeds.
wait_until() {
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || die "$what did not become ready in time"
        sleep 0.5
    done
}

apt_install() {
    if [ -z "${EO_APT_UPDATED:-}" ]; then
        say "apt-get update"
        as_root apt-get update -qq
        EO_APT_UPDATED=1
    fi
    say "installing $* from Debian's packages"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# postgres_binaries: the directory of Debian's newest Postgres server
# binaries (initdb, pg_ctl, pgbench), installed when missing. The package
# is kept from creating and starting a cluster of its own: ours lives under
# EO_STATE_DIR with the settings the book needs, or in Docker.
postgres_binaries() {
    if [ -z "$(installed_postgres_binaries)" ]; then
        as_root mkdir -p /etc/postgresql-common
        echo "create_main_cluster = false" | as_root tee /etc/postgresql-common/createcluster.conf >/dev/null
        apt_install postgresql
    fi
    installed_postgres_binaries
}

# installed_postgres_binaries: the same directory, or nothing if Postgres's
# server package is not installed (never installs it).
installed_postgres_binaries() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

# need_build_tools: what the workspace's C build needs (rdkafka compiles
# librdkafka from source), installed from Debian's packages when missing.
need_build_tools() {
    local missing=()
    command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
    command -v c++ >/dev/null 2>&1 || missing+=(g++)
    command -v make >/dev/null 2>&1 || missing+=(make)
    command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
    [ -e /usr/include/zlib.h ] || missing+=(zlib1g-dev)
    [ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"
}

# starter_python: a Python with the grader's Python starter's requirements
# (pika, boto3, psycopg, confluent-kafka from PyPI) in a virtualenv under
# EO_STATE_DIR, refreshed when requirements.txt changes; exported as
# EO_STARTER_PYTHON for the grader's tests.
starter_python() {
    local requirements="$EO_ROOT/crates/grader/starters/python/requirements.txt"
    local venv="$EO_STATE_DIR/starter-venv"
    local stamp="$venv/requirements.sha256"
    local want
    want="$(sha256sum "$requirements" | cut -d' ' -f1)"
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        command -v python3 >/dev/null 2>&1 || apt_install python3
        python3 -m venv --help >/dev/null 2>&1 || apt_install python3-venv
        say "installing the Python starter's requirements into $venv"
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
        echo "$want" > "$stamp"
    fi
    export EO_STARTER_PYTHON="$venv/bin/python"
}

# sqs_answers: true when an SQS endpoint answers at EO_SQS_ENDPOINT.
sqs_answers() {
    curl -fs -o /dev/null --max-time 2 "$EO_SQS_ENDPOINT/?Action=ListQueues"
}

# jvm_pid PID_FILE MAIN_CLASS: the pid of a JVM that services-up started, if
# it still runs (and is still that server, not a recycled pid).
jvm_pid() {
    local pid_file=$1 main_class=$2 pid
    [ -s "$pid_file" ] || return 1
    pid="$(cat "$pid_file")"
    { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null | grep -qF " $main_class" || return 1
    echo "$pid"
}

# start_jvm PID_FILE LOG JAVA_ARGS...: starts a server in its own session,
# with no terminal, so that it outlives this script. The inner shell writes
# its own pid and then becomes java (exec), so the pid file names the server
# even where setsid has to fork (under job control $! would be the parent
# that exits).
start_jvm() {
    local pid_file=$1 log=$2
    shift 2
    rm -f "$pid_file"
    # shellcheck disable=SC2016 # $$ is the inner shell's
    setsid nohup bash -c 'echo $$ >"$0"; exec java "$@"' "$pid_file" "$@" \
        >>"$log" 2>&1 </dev/null &
    wait_until 10 "the pid file $pid_file" test -s "$pid_file"
}

# jvm_ready NAME PID_FUNCTION LOG CHECK...: CHECK answers, or fail fast with
# the log when the server we started has died.
jvm_ready() {
    local name=$1 pid_function=$2 log=$3
    shift 3
    "$@" && return 0
    if ! "$pid_function" >/dev/null; then
        tail -n 30 "$log" >&2 || true
        die "$name exited during startup (log: $log)"
    fi
    return 1
}

# The ElasticMQ process that services-up started natively, if it still runs.
elasticmq_pid() {
    jvm_pid "$EO_STATE_DIR/elasticmq/elasticmq.pid" org.elasticmq.server.Main
}

# The Kafka broker that services-up started natively, if it still runs.
kafka_pid() {
    jvm_pid "$EO_STATE_DIR/kafka/kafka.pid" kafka.Kafka
}

# kafka_answers: true when something listens on the Kafka port.
kafka_answers() {
    (exec 3<>"/dev/tcp/127.0.0.1/$EO_KAFKA_PORT") 2>/dev/null
}

# stop_jvm NAME PID_FILE MAIN_CLASS: SIGTERM, then SIGKILL after 20 s.
stop_jvm() {
    local name=$1 pid_file=$2 pid
    if pid="$(jvm_pid "$pid_file" "$3")"; then
        say "stopping $name (pid $pid)"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 80); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        # Still there: it is not shutting down by itself.
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pid_file"
}

# maven_jars NAME POM LIB [GOAL]: copies the pom's jars into LIB (or, with
# GOAL unpack-dependencies, unpacks its archives there), once per version of
# the pom (a stamp records which).
maven_jars() {
    local name=$1 pom=$2 lib=$3 goal=${4:-copy-dependencies} stamp
    stamp="$(sha256sum "$pom" | cut -d' ' -f1)"
    [ "$(cat "$lib/.pom.sha256" 2>/dev/null)" = "$stamp" ] && return 0
    say "resolving $name from Maven Central into $lib"
    rm -rf "$lib.partial"
    mvn -q -B -Dstyle.color=never -f "$pom" "dependency:$goal" \
        -DoutputDirectory="$lib.partial" -DmarkersDirectory="$lib.partial/.markers" ||
        die "Maven could not resolve $name (see the output above)"
    echo "$stamp" >"$lib.partial/.pom.sha256"
    rm -rf "$lib"
    mv "$lib.partial" "$lib"
}
