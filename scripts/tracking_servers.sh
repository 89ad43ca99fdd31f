#!/usr/bin/env bash
# The tracking set-up teams run, on loopback, for the server tests (`make test-server`):
# a private PostgreSQL cluster and an MLflow tracking server on it (artifacts proxied by the
# server into a local directory).
#
#   scripts/tracking_servers.sh start DIR   # prints `export ...` lines for the tests
#   scripts/tracking_servers.sh stop DIR
#   scripts/tracking_servers.sh run DIR CMD...   # start, run CMD with those exports, stop
#
# Installs Debian's postgresql when its server binaries are missing (as root, with apt-get).
# PostgreSQL refuses to run as root: as root the cluster belongs to the `postgres` user.
set -euo pipefail
cd "$(dirname "$0")/.."

command=${1:?usage: tracking_servers.sh start|stop|run DIR [CMD...]}
dir=$(realpath -m "${2:?usage: tracking_servers.sh start|stop DIR}")
PG_PORT=${PG_PORT:-55432}
MLFLOW_PORT=${MLFLOW_PORT:-55000}
VENV=${VENV:-.venv}

pg_bin() {
    local initdb
    initdb=$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1 || true)
    if [ -z "$initdb" ] && command -v initdb >/dev/null 2>&1; then
        initdb=$(command -v initdb)
    fi
    [ -n "$initdb" ] && dirname "$initdb"
}

as_owner() {  # run a PostgreSQL command as the cluster's owner
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

start() {
    if [ -z "$(pg_bin)" ]; then
        if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
            echo "tracking_servers: installing Debian's postgresql" >&2
            apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
        else
            echo "tracking_servers: PostgreSQL is not installed (apt-get install postgresql)" >&2
            exit 1
        fi
    fi
    local bin
    bin=$(pg_bin)
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$dir"
    fi
    if [ ! -f "$dir/pg/PG_VERSION" ]; then
        as_owner "$bin/initdb" -D "$dir/pg" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log"
    fi
    as_owner "$bin/pg_ctl" -D "$dir/pg" -l "$dir/postgres.log" -w -t 60 \
        -o "-p $PG_PORT -k $dir -c listen_addresses=127.0.0.1" start >&2
    as_owner "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname='mlflow'" | grep -q 1 ||
        as_owner "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U postgres mlflow
    local pg_uri="postgresql+psycopg2://postgres@127.0.0.1:$PG_PORT"
    mkdir -p "$dir/artifacts"
    # its own process group, so that `stop` ends the server's workers too
    setsid "$VENV/bin/mlflow" server --backend-store-uri "$pg_uri/mlflow" \
        --artifacts-destination "$dir/artifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" \
        --workers 2 >"$dir/mlflow.log" 2>&1 &
    echo $! >"$dir/mlflow.pid"
    for _ in $(seq 1 120); do
        if ! kill -0 "$(cat "$dir/mlflow.pid")" 2>/dev/null; then
            break
        fi
        if "$VENV/bin/python" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$MLFLOW_PORT/health', timeout=2)" 2>/dev/null; then
            echo "export TDSEARCH_TEST_POSTGRES_URI=$pg_uri"
            echo "export TDSEARCH_TEST_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
            echo "export TDSEARCH_TEST_PG_BIN=$bin"
            return 0
        fi
        sleep 1
    done
    echo "tracking_servers: the MLflow server did not start; its log:" >&2
    tail -20 "$dir/mlflow.log" >&2
    exit 1
}

stop() {
    if [ -f "$dir/mlflow.pid" ]; then
        kill -TERM -- "-$(cat "$dir/mlflow.pid")" 2>/dev/null || true
        rm -f "$dir/mlflow.pid"
    fi
    local bin
    bin=$(pg_bin)
    if [ -n "$bin" ] && [ -f "$dir/pg/postmaster.pid" ]; then
        as_owner "$bin/pg_ctl" -D "$dir/pg" -m fast -w stop >&2 || true
    fi
}

run() {
    trap stop EXIT
    eval "$(start)"
    "$@"
}

case "$command" in
    start) start ;;
    stop) stop ;;
    run) shift 2; run "$@" ;;
    *) echo "usage: tracking_servers.sh start|stop|run DIR [CMD...]" >&2; exit 2 ;;
esac
