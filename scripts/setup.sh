#!/usr/bin/env bash
# Prepare this checkout to run Nox: system packages (as root), then a virtualenv with Nox, its
# SDK and the development tools. Safe to run again; it only does what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

# --- system packages ------------------------------------------------------------------------
# bwrap (bubblewrap) is the sandbox; libseccomp2 compiles its system call filter; setpriv
# (util-linux) drops root; Debian's python3 is the interpreter inside sandboxes.
missing=()
command -v bwrap >/dev/null 2>&1 || missing+=(bubblewrap)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
[ -x /usr/bin/python3 ] || missing+=(python3)
ldconfig -p 2>/dev/null | grep -q 'libseccomp\.so\.2' || missing+=(libseccomp2)
# node and npm build the dashboard's front-end files from ui/package-lock.json (see below).
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
# The test suite also needs servers it starts itself on loopback: Redis (rate limits shared by
# servers) and PostgreSQL (NOX_DATABASE_URL), and the Prometheus tools that check observability/.
if [ "${NOX_SETUP_FOR:-run}" = test ]; then
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    # promtool and amtool check the monitoring files of observability/.
    command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
    command -v amtool >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
    # tests/test_postgres.py starts a throw-away PostgreSQL server of its own on loopback.
    compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || command -v pg_ctl >/dev/null 2>&1 \
        || missing+=(postgresql)
    # tests/deploy: the release script behind real proxies, the units and the shell scripts.
    command -v caddy >/dev/null 2>&1 || missing+=(caddy)
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
    command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
    command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
    # tests/ui drive Debian's Chromium with Playwright (never `playwright install`).
    [ -x /usr/bin/chromium ] || missing+=(chromium)
    # tests/container build and run the image with rootful podman (runc; netavark, aardvark-dns
    # and iptables: published ports and service names), the base image from debootstrap, the
    # compose file with podman-compose; as another user they are skipped.
    if [ "$(id -u)" -eq 0 ]; then
        command -v podman >/dev/null 2>&1 || missing+=(podman netavark aardvark-dns iptables)
        command -v runc >/dev/null 2>&1 || missing+=(runc)
        [ -x /usr/sbin/debootstrap ] || command -v debootstrap >/dev/null 2>&1 \
            || missing+=(debootstrap)
        command -v podman-compose >/dev/null 2>&1 || missing+=(podman-compose)
    fi
fi
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt_options=()
        # apt verifies signatures as its unprivileged _apt user, in /tmp: where /tmp is not
        # world-writable (seen on this kind of machine: mode 0755) that fails, so apt keeps root.
        if [ "$(stat -c %a /tmp)" != 1777 ]; then
            apt_options+=(-o APT::Sandbox::User=root)
        fi
        apt-get "${apt_options[@]}" update -qq
        apt-get "${apt_options[@]}" install -y -qq --no-install-recommends "${missing[@]}" \
            >/dev/null
    else
        echo "setup: missing system packages: ${missing[*]}" >&2
        echo "setup: install them with: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi

# --- Python ---------------------------------------------------------------------------------
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup: Nox needs Python 3.11 or newer as '$PYTHON' (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating the virtualenv $VENV"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.nox-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ sdk/pyproject.toml -nt "$stamp" ]; then
    echo "setup: installing Nox and its development tools into $VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e './sdk[cli]' -e '.[dev]'
    touch "$stamp"
fi

# --- the dashboard's front-end files --------------------------------------------------------
# htmx comes from the npm registry at the versions of ui/package-lock.json; ui/build.mjs copies
# it into src/nox_api/ui/static/vendor/ (git-ignored, packed into the wheel). Rebuilt when
# missing or older than the lock file.
built=src/nox_api/ui/static/vendor/VERSIONS.txt
if [ ! -f "$built" ] || [ ui/package-lock.json -nt "$built" ] || [ ui/build.mjs -nt "$built" ]; then
    echo "setup: building the dashboard's front-end files (npm ci in ui/)"
    (cd ui && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build)
fi
