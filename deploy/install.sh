#!/usr/bin/env bash
# Install Nox on a Debian or Ubuntu host: system packages, the `nox` user, a virtualenv per colour
# under /opt/nox, /etc/default/nox-api*, the data folder /var/lib/nox, the systemd template unit
# nox-api@.service, the proxy's upstream files in /etc/nox and a first admin token.
#
#   sudo deploy/install.sh                  install from this checkout and start nox-api@blue
#   deploy/install.sh --root /tmp/x         write everything below /tmp/x instead of / (no
#                                           packages, no user, no systemctl: for tests and images)
#   deploy/install.sh --dry-run             print what would be done, change nothing
#
# Options (or the environment variable in brackets):
#   --root DIR      [NOX_PREFIX]   root folder everything is written below (default /)
#   --source DIR    [NOX_SOURCE]   the Nox checkout to install (default: the one holding this script)
#   --python PATH   [NOX_PYTHON]   Python 3.11+ for the virtualenvs (default python3)
#   --no-venv                      do not build the virtualenv (when it exists already)
#   --no-start                     do not enable and start nox-api@blue
#   --dry-run                      print the actions only
# Safe to run again: files an administrator edits (/etc/default/nox-api*, /etc/nox/*) are kept.
set -euo pipefail

ROOT=${NOX_PREFIX:-/}
SOURCE=${NOX_SOURCE:-$(cd "$(dirname "$0")/.." && pwd)}
PYTHON=${NOX_PYTHON:-python3}
NOX_USER=nox
BLUE_PORT=8081
GREEN_PORT=8082
DRY=0
VENV=1
START=1

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=${2:?--root needs a folder}; shift 2 ;;
        --source) SOURCE=${2:?--source needs a folder}; shift 2 ;;
        --python) PYTHON=${2:?--python needs a path}; shift 2 ;;
        --no-venv) VENV=0; shift ;;
        --no-start) START=0; shift ;;
        --dry-run) DRY=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "install: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

ROOT=${ROOT%/}
SYSTEM=0 # 1: installing onto this machine itself (packages, user, systemctl)
[ -z "$ROOT" ] && SYSTEM=1
R=$ROOT # prefix for every path written

say() { echo "install: $*"; }
die() { echo "install: $*" >&2; exit 1; }

# run CMD...: print it; run it unless --dry-run.
run() {
    echo "+ $*"
    [ "$DRY" -eq 1 ] || "$@"
}

# put FILE MODE [keep]: write stdin to FILE with MODE; with "keep", an existing file stays.
put() {
    local file=$1 mode=$2 keep=${3:-}
    if [ "$keep" = keep ] && [ -e "$file" ]; then
        say "kept $file (already there)"
        cat >/dev/null
        return
    fi
    echo "+ write $file (mode $mode)"
    if [ "$DRY" -eq 1 ]; then
        cat >/dev/null
        return
    fi
    local tmp
    tmp=$(mktemp "$(dirname "$file")/.nox-install.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$file"
}

# own USER:GROUP PATH...: chown on this machine only (a root prefix has no nox user).
own() {
    local who=$1
    shift
    if [ "$SYSTEM" -eq 1 ]; then
        run chown "$who" "$@"
    fi
}

if [ ! -f "$SOURCE/pyproject.toml" ] || [ ! -d "$SOURCE/sdk" ]; then
    die "$SOURCE is not a Nox checkout"
fi
if [ "$SYSTEM" -eq 1 ] && [ "$DRY" -eq 0 ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (sudo), or give --root DIR or --dry-run"
fi
say "installing Nox from $SOURCE into ${ROOT:-/}$([ "$DRY" -eq 1 ] && echo ' (dry run)')"

# --- system packages ---------------------------------------------------------------------------
if [ "$SYSTEM" -eq 1 ]; then
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script is for Debian/Ubuntu"
    run env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        bubblewrap libseccomp2 util-linux python3 python3-venv curl
    restrict=/proc/sys/kernel/apparmor_restrict_unprivileged_userns
    if [ -r "$restrict" ] && [ "$(cat "$restrict")" = 1 ]; then
        say "WARNING: AppArmor forbids unprivileged user namespaces (Ubuntu 23.10+): bubblewrap"
        say "         needs its profile (apparmor package, bwrap-userns-restrict) or run Nox as root;"
        say "         /api/health/detailed tells whether sandboxes start"
    fi
else
    say "skipped: system packages and the $NOX_USER user (root prefix $ROOT)"
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || [ "$DRY" -eq 1 ] || die "$PYTHON is not Python 3.11 or newer (give --python)"

# --- user --------------------------------------------------------------------------------------
if [ "$SYSTEM" -eq 1 ] && ! getent passwd "$NOX_USER" >/dev/null; then
    run useradd --system --user-group --home-dir /var/lib/nox --no-create-home \
        --shell /usr/sbin/nologin --comment "Nox API server" "$NOX_USER"
fi

# --- folders -----------------------------------------------------------------------------------
# /etc/nox is readable by the proxy (Caddy runs as its own user and imports the upstream file);
# the only secret there, release.token, is 0600 root.
run install -d -m 0755 "$R/opt/nox" "$R/opt/nox/deploy" "$R/etc/default" "$R/etc/systemd/system" \
    "$R/etc/nox"
run install -d -m 0750 "$R/var/lib/nox"
own "$NOX_USER:$NOX_USER" "$R/var/lib/nox"

# --- virtualenv of the first colour (release.sh --install builds the other one) ---------------
if [ "$VENV" -eq 1 ]; then
    run "$PYTHON" -m venv --clear "$R/opt/nox/blue"
    run "$R/opt/nox/blue/bin/python" -m pip install -q --no-cache-dir --disable-pip-version-check \
        "$SOURCE/sdk" "$SOURCE"
else
    say "skipped: the virtualenv (--no-venv)"
fi
for f in release.sh install.sh README.md; do
    run install -m 0755 "$SOURCE/deploy/$f" "$R/opt/nox/deploy/$f"
done
run chmod 0644 "$R/opt/nox/deploy/README.md"
run cp -r "$SOURCE/deploy/caddy" "$SOURCE/deploy/nginx" "$SOURCE/deploy/systemd" "$R/opt/nox/deploy/"

# --- settings ----------------------------------------------------------------------------------
put "$R/etc/default/nox-api" 0640 keep <<'EOF'
# Settings of every Nox colour (nox-api@blue, nox-api@green); all are listed in
# docs/configuration.md. This file may hold secrets (NOX_BACKUP_KEY ...): mode 0640, root:nox.
NOX_HOST=127.0.0.1
NOX_DATA_DIR=/var/lib/nox
# The reverse proxy on this machine: its X-Forwarded-For names the client.
NOX_TRUSTED_PROXIES=127.0.0.1,::1
EOF
put "$R/etc/default/nox-api-blue" 0640 keep <<EOF
# Settings of nox-api@blue only. deploy/release.sh expects this port (NOX_BLUE_PORT).
NOX_PORT=$BLUE_PORT
EOF
put "$R/etc/default/nox-api-green" 0640 keep <<EOF
# Settings of nox-api@green only. deploy/release.sh expects this port (NOX_GREEN_PORT).
NOX_PORT=$GREEN_PORT
EOF
own "root:$NOX_USER" "$R/etc/default/nox-api" "$R/etc/default/nox-api-blue" \
    "$R/etc/default/nox-api-green"

put "$R/etc/default/nox-release" 0644 keep <<EOF
# Settings of /opt/nox/deploy/release.sh (it reads this file first); all are listed in
# docs/deploy.md. Set at least the URL clients use.
NOX_RELEASE_PROXY=caddy
#NOX_RELEASE_PROXY_URL=https://nox.example.com
NOX_BLUE_PORT=$BLUE_PORT
NOX_GREEN_PORT=$GREEN_PORT
EOF

# The proxy's upstream: one line naming the live colour's port (deploy/release.sh rewrites it).
put "$R/etc/nox/upstream.caddy" 0644 keep <<EOF
to 127.0.0.1:$BLUE_PORT
EOF
put "$R/etc/nox/upstream.nginx" 0644 keep <<EOF
server 127.0.0.1:$BLUE_PORT;
EOF

put "$R/etc/systemd/system/nox-api@.service" 0644 <"$SOURCE/deploy/systemd/nox-api@.service"

# --- tokens: the first admin token (shown once) and the release script's viewer token ----------
nox_cli() {
    if [ "$SYSTEM" -eq 1 ]; then
        run setpriv --reuid "$NOX_USER" --regid "$NOX_USER" --init-groups \
            env NOX_DATA_DIR=/var/lib/nox "$R/opt/nox/blue/bin/nox-api" "$@"
    else
        run env NOX_DATA_DIR="$R/var/lib/nox" "$R/opt/nox/blue/bin/nox-api" "$@"
    fi
}
if [ ! -e "$R/var/lib/nox/nox.db" ] && { [ "$DRY" -eq 1 ] || [ -x "$R/opt/nox/blue/bin/nox-api" ]; }; then
    say "the first admin token (shown this once; keep it safe):"
    nox_cli token create --role admin --name admin
fi
if [ ! -e "$R/etc/nox/release.token" ]; then
    if [ "$DRY" -eq 1 ] || [ -x "$R/opt/nox/blue/bin/nox-api" ]; then
        echo "+ write $R/etc/nox/release.token (mode 0600): a viewer token for release.sh"
        if [ "$DRY" -eq 0 ]; then
            token=$(nox_cli token create --role viewer --name release | tail -n 1)
            (umask 077 && printf '%s\n' "$token" >"$R/etc/nox/release.token")
        fi
    fi
fi

# --- start -------------------------------------------------------------------------------------
if [ "$SYSTEM" -eq 1 ] && [ "$START" -eq 1 ] && [ -d /run/systemd/system ]; then
    run systemctl daemon-reload
    run systemctl enable --now nox-api@blue.service
    say "nox-api@blue listens on 127.0.0.1:$BLUE_PORT"
else
    say "not started; start it with: systemctl daemon-reload && systemctl enable --now nox-api@blue"
fi
say "next: a reverse proxy (/opt/nox/deploy/caddy/Caddyfile or nginx/nox.conf), see docs/deploy.md"
