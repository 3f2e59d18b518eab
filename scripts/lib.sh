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
# A fixed node name keeps the RabbitMQ CLI tools independent of the hostname.
export RABBITMQ_NODENAME="${RABBITMQ_NODENAME:-rabbit@localhost}"
# Builds live outside the clone so that repeated runs reuse them.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/effectively-once/target}"

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

# sqs_answers: true when an SQS endpoint answers at EO_SQS_ENDPOINT.
sqs_answers() {
    curl -fs -o /dev/null --max-time 2 "$EO_SQS_ENDPOINT/?Action=ListQueues"
}

# The ElasticMQ process that services-up started natively, if it still runs.
elasticmq_pid() {
    local pid_file="$EO_STATE_DIR/elasticmq/elasticmq.pid" pid
    [ -s "$pid_file" ] || return 1
    pid="$(cat "$pid_file")"
    # The pid must still be our server, not a recycled pid.
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q 'org\.elasticmq\.server\.Main' || return 1
    echo "$pid"
}
