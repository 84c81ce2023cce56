#!/usr/bin/env bash
# A throwaway PostgreSQL server on a loopback port, for the aggregator's persistence tests.
#
#   eval "$(scripts/test-postgres.sh start)"   # installs Debian's postgresql if missing (root),
#                                              # starts a server, exports FEDEE_TEST_POSTGRES_URL
#                                              # and FEDEE_TEST_PG_DIR
#   scripts/test-postgres.sh stop "$FEDEE_TEST_PG_DIR"
#
# The server trusts local connections, listens on 127.0.0.1 only, and lives in a temporary
# folder that `stop` deletes. Progress goes to stderr; stdout carries only the exports.
set -euo pipefail

pg_bin() {
    ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1
}

as_pg() {
    if [ "$(id -u)" = 0 ]; then
        su postgres -s /bin/sh -c "$1"
    else
        sh -c "$1"
    fi
}

case "${1:-}" in
start)
    if [ -z "$(pg_bin)" ]; then
        if [ "$(id -u)" != 0 ]; then
            echo "PostgreSQL is not installed and this is not root: apt-get install postgresql" >&2
            exit 1
        fi
        echo "installing PostgreSQL from Debian's packages" >&2
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
    fi
    bin=$(pg_bin)
    if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
        useradd --system --no-create-home postgres
    fi
    dir=$(mktemp -d /tmp/fedee-pg.XXXXXX)
    chmod 755 "$dir"
    [ "$(id -u)" = 0 ] && chown postgres "$dir"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_pg "$bin/initdb -D $dir/data -A trust -U postgres --no-sync" >/dev/null
    as_pg "$bin/pg_ctl -D $dir/data -l $dir/server.log -w -o '-p $port -k $dir -c listen_addresses=127.0.0.1' start" >/dev/null
    echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port ($dir)" >&2
    echo "export FEDEE_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$port/postgres FEDEE_TEST_PG_DIR=$dir"
    ;;
stop)
    dir=${2:?usage: $0 stop DIR}
    as_pg "$(pg_bin)/pg_ctl -D $dir/data -m fast -w stop" >/dev/null 2>&1 || true
    rm -rf "$dir"
    ;;
*)
    echo "usage: $0 start | stop DIR" >&2
    exit 2
    ;;
esac
