#!/usr/bin/env bash
# Starts PostgreSQL, RabbitMQ and Redis on this machine when they are installed but not answering.
set -u
up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() { for _ in $(seq 1 60); do up "$1" && return 0; sleep 1; done; echo "ensure_services: $2 did not come up on :$1" >&2; return 1; }
status=0
if ! up 5432; then
  echo "ensure_services: starting PostgreSQL" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  wait_for 5432 PostgreSQL || status=1
fi
if ! up 5672; then
  echo "ensure_services: starting RabbitMQ" >&2
  rabbitmq-server -detached || true
  wait_for 5672 RabbitMQ || status=1
fi
if ! up 6379; then
  echo "ensure_services: starting Redis" >&2
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no || true
  wait_for 6379 Redis || status=1
fi
exit $status
