#!/usr/bin/env bash
# Starts a throwaway PostgreSQL cluster and Redis server on free loopback ports for the test
# suite, installing them from Debian's packages if missing. Source it: it exports
# MEDAI_TEST_POSTGRES_URL and MEDAI_TEST_REDIS_URL (and the Redis pid file, for the benchmarks'
# CPU figures) and defines stop_test_servers.
set -euo pipefail

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then apt-get update -qq >&2; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}

pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$pg_bin" ] || [ ! -x "$pg_bin/initdb" ]; then
  echo "installing PostgreSQL" >&2
  apt_install postgresql
  pg_bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing Redis" >&2
  apt_install redis-server
fi

test_servers_dir=$(mktemp -d /tmp/medai-test-servers.XXXXXX)
chmod 755 "$test_servers_dir"
# PostgreSQL refuses to run as root; run it as the postgres user where we are root.
pg_user=$(id -un)
run_pg() { "$@"; }
if [ "$(id -u)" = 0 ]; then
  id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
  pg_user=postgres
  run_pg() { runuser -u postgres -- "$@"; }
fi
mkdir -p "$test_servers_dir/pg" "$test_servers_dir/pgsock"
chown "$pg_user" "$test_servers_dir/pg" "$test_servers_dir/pgsock"
pg_port=$(free_port)
run_pg "$pg_bin/initdb" -D "$test_servers_dir/pg/data" -U postgres --auth=trust -E UTF8 >"$test_servers_dir/initdb.log" 2>&1
run_pg "$pg_bin/pg_ctl" -D "$test_servers_dir/pg/data" -l "$test_servers_dir/pg/server.log" -w \
  -o "-p $pg_port -k $test_servers_dir/pgsock -c listen_addresses=127.0.0.1 -c max_connections=400" start >/dev/null
export MEDAI_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
export MEDAI_TEST_PG_BIN="$pg_bin"
export MEDAI_TEST_PG_DATA="$test_servers_dir/pg/data"

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
  --pidfile "$test_servers_dir/redis.pid" --logfile "$test_servers_dir/redis.log" >/dev/null
export MEDAI_TEST_REDIS_URL="redis://127.0.0.1:$redis_port"
export MEDAI_TEST_REDIS_PIDFILE="$test_servers_dir/redis.pid"
echo "test servers: PostgreSQL on $pg_port, Redis on $redis_port" >&2

stop_test_servers() {
  run_pg "$pg_bin/pg_ctl" -D "$test_servers_dir/pg/data" -m fast stop >/dev/null 2>&1 || true
  [ -f "$test_servers_dir/redis.pid" ] && kill "$(cat "$test_servers_dir/redis.pid")" 2>/dev/null || true
  rm -rf "$test_servers_dir"
}
