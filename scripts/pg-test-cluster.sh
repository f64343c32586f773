#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests that need one (the store suite on
# PostgreSQL, `baton db copy`, the manager on PostgreSQL end to end).
#
# Installs Debian's `postgresql` when it is missing, creates a cluster with initdb in a
# temporary directory (as the `postgres` user when run as root: initdb and postgres
# refuse root), starts it on a unix socket in that directory and on a free TCP port of
# 127.0.0.1 (no fsync: the data is thrown away), makes a role `baton` (password
# authentication over TCP, the password in a file), and exports for the tests:
#   BATON_TEST_POSTGRES_URL            postgresql://baton@127.0.0.1:PORT/postgres
#   BATON_TEST_POSTGRES_PASSWORD_FILE  the file holding baton's password
#   BATON_TEST_POSTGRES_SOCKET_DIR     the directory of the unix socket
#   BATON_TEST_POSTGRES_PORT           the port (also part of the socket's name)
# The cluster is stopped and its directory removed when the shell exits.
#
# Usage: scripts/pg-test-cluster.sh COMMAND [ARG...]   runs COMMAND with the cluster
#        . scripts/pg-test-cluster.sh; pg_test_cluster_start   (scripts/test.sh: until exit)

pg_test_cluster_stop() {
    if [ -n "${PG_TEST_DIR:-}" ] && [ -d "$PG_TEST_DIR" ]; then
        "${PG_TEST_RUN_AS[@]}" "$PG_TEST_BIN/pg_ctl" -D "$PG_TEST_DIR/data" -m immediate \
            -w -t 30 stop >/dev/null 2>&1 || true
        rm -rf "$PG_TEST_DIR"
    fi
}

pg_test_cluster_start() {
    if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
        local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
    fi
    PG_TEST_BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    PG_TEST_DIR=$(mktemp -d /tmp/baton-pg.XXXXXX)
    PG_TEST_RUN_AS=()
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres: "$PG_TEST_DIR"
        PG_TEST_RUN_AS=(runuser -u postgres --)
    fi
    chmod 755 "$PG_TEST_DIR"
    trap pg_test_cluster_stop EXIT
    ( umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$PG_TEST_DIR/password" )
    "${PG_TEST_RUN_AS[@]}" "$PG_TEST_BIN/initdb" -D "$PG_TEST_DIR/data" -U postgres -E UTF8 \
        --locale=C.UTF-8 --auth-local=trust --auth-host=scram-sha-256 -N >/dev/null
    local port
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "${PG_TEST_RUN_AS[@]}" "$PG_TEST_BIN/pg_ctl" -D "$PG_TEST_DIR/data" -l "$PG_TEST_DIR/data/log" \
        -w -t 30 -o "-k $PG_TEST_DIR -h 127.0.0.1 -p $port -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
        start >/dev/null
    "${PG_TEST_RUN_AS[@]}" "$PG_TEST_BIN/psql" -h "$PG_TEST_DIR" -p "$port" -U postgres -d postgres -qAt \
        -c "CREATE ROLE baton LOGIN CREATEDB PASSWORD '$(cat "$PG_TEST_DIR/password")'" >/dev/null
    export BATON_TEST_POSTGRES_URL="postgresql://baton@127.0.0.1:$port/postgres"
    export BATON_TEST_POSTGRES_PASSWORD_FILE="$PG_TEST_DIR/password"
    export BATON_TEST_POSTGRES_SOCKET_DIR="$PG_TEST_DIR"
    export BATON_TEST_POSTGRES_PORT="$port"
    echo "PostgreSQL $("$PG_TEST_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$port and $PG_TEST_DIR"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -euo pipefail
    [ "$#" -gt 0 ] || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }
    pg_test_cluster_start
    status=0
    "$@" || status=$?
    exit "$status"
fi
