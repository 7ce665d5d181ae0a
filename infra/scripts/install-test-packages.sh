#!/usr/bin/env bash
# Install the Debian packages the tests need, only when they are missing:
#   postgresql       PostgreSQL 15 server binaries (/usr/lib/postgresql/15/bin), for the Prefect
#                    and MLflow servers of tests/test_servers.py
#   chromium         /usr/bin/chromium, driven by Playwright in the browser tests
#   chromium-driver  /usr/bin/chromedriver
#   docker-compose   `docker-compose config` checks infra/docker-compose.yml (no engine needed)
# Fast and silent when everything is there (no apt-get update). When something is missing but
# this is not root or there is no apt-get, it says what is missing and exits 0: the tests that
# need it then fail with a message naming this script.
set -euo pipefail

missing=()

# `dpkg -s` says whether a package is installed; the command checks catch a binary that is
# present without the Debian package (installed by hand, another distribution).
has_package() {
    dpkg -s "$1" >/dev/null 2>&1
}

postgres_present() {
    has_package postgresql || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

postgres_present || missing+=(postgresql)
{ has_package chromium || command -v chromium >/dev/null 2>&1; } || missing+=(chromium)
{ has_package chromium-driver || command -v chromedriver >/dev/null 2>&1; } \
    || missing+=(chromium-driver)
{ has_package docker-compose || command -v docker-compose >/dev/null 2>&1; } \
    || missing+=(docker-compose)

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install-test-packages: missing Debian packages: ${missing[*]}" >&2
    echo "install-test-packages: cannot install them here (needs root and apt-get);" \
        "run as root: apt-get install ${missing[*]}" >&2
    exit 0
fi

echo "install-test-packages: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-test-packages: installed ${missing[*]}"
