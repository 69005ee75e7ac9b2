#!/usr/bin/env bash
# Makes sure Postgres (127.0.0.1:5432, user postgres, trust auth) and RabbitMQ
# (127.0.0.1:5672, guest/guest) answer. In order: already running → start the installed
# servers → install them from Debian's packages (as root) → docker compose (when a Docker
# engine runs) → say what is missing. Source it for `ensure_infra`, or run it.
set -euo pipefail

INFRA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port name seconds
  for _ in $(seq 1 $(($3 * 4))); do port_open "$1" && return 0; sleep 0.25; done
  echo "infra: $2 did not come up on 127.0.0.1:$1 within $3 s" >&2
  return 1
}

is_root() { [ "$(id -u)" -eq 0 ]; }
have() { command -v "$1" >/dev/null 2>&1; }
docker_engine() { have docker && docker info >/dev/null 2>&1; }

apt_install() {
  if [ -z "${INFRA_APT_UPDATED:-}" ]; then
    echo "infra: apt-get update" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    INFRA_APT_UPDATED=1
  fi
  echo "infra: installing $*" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

start_postgres() {
  local version
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  [ -n "$version" ] || return 1
  echo "infra: starting PostgreSQL $version" >&2
  pg_ctlcluster --skip-systemctl-redirect "$version" main start >&2 || true
  wait_port 5432 PostgreSQL 30
}

trust_local_postgres() { # only on a cluster this script installed
  local hba
  hba=$(ls /etc/postgresql/*/main/pg_hba.conf | head -n 1)
  sed -i -E 's/^(host\s+all\s+all\s+(127\.0\.0\.1\/32|::1\/128)\s+)\S+/\1trust/; s/^(local\s+all\s+postgres\s+)\S+/\1trust/' "$hba"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main reload >&2 || true
}

start_rabbitmq() {
  have rabbitmq-server || return 1
  echo "infra: starting RabbitMQ" >&2
  rabbitmq-server -detached >&2 2>&1 || true
  wait_port 5672 RabbitMQ 90
}

compose_up() {
  echo "infra: starting $* with docker compose" >&2
  docker compose -f "$INFRA_ROOT/docker-compose.yml" up -d "$@" >&2
}

ensure_postgres() {
  port_open 5432 && return 0
  if have pg_ctlcluster && start_postgres; then return 0; fi
  if is_root && have apt-get; then
    apt_install postgresql
    start_postgres && trust_local_postgres && return 0
  fi
  if docker_engine; then compose_up postgres && wait_port 5432 PostgreSQL 60 && return 0; fi
  echo "infra: PostgreSQL is not reachable on 127.0.0.1:5432 and could not be started." >&2
  echo "       Install it (apt-get install postgresql, as root), run it in Docker, or point" >&2
  echo "       TASKER_DATABASE__URL / TASKER_TEST_DATABASE_URL at a server with trust auth." >&2
  return 1
}

ensure_rabbitmq() {
  port_open 5672 && return 0
  if start_rabbitmq; then return 0; fi
  if is_root && have apt-get; then
    apt_install rabbitmq-server
    start_rabbitmq && return 0
  fi
  if docker_engine; then compose_up rabbitmq && wait_port 5672 RabbitMQ 90 && return 0; fi
  echo "infra: RabbitMQ is not reachable on 127.0.0.1:5672 and could not be started." >&2
  echo "       Install it (apt-get install rabbitmq-server, as root), run it in Docker, or point" >&2
  echo "       TASKER_AMQP__URL / TASKER_TEST_AMQP_URL at a broker." >&2
  return 1
}

ensure_infra() {
  ensure_postgres || return 1
  ensure_rabbitmq || return 1
  echo "infra: PostgreSQL and RabbitMQ are up" >&2
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  ensure_infra
fi
