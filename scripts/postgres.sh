#!/usr/bin/env bash
# Debian's PostgreSQL server binaries for tests/test_search.py, which starts a server of its own
# on a free port with its data in a temporary folder (idempotent; nothing is started here).
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
    exit 0
fi
echo "installing postgresql (Debian package) for the shared-study test" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq postgresql >/dev/null
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
