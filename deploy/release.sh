#!/usr/bin/env bash
# Blue-green release of Nox behind Caddy or nginx, without losing requests:
#
#   1. start the idle colour on its port (after building its virtualenv with --install SPEC)
#   2. wait for NOX_RELEASE_HEALTHY consecutive healthy answers of its /health and
#      /api/health/detailed (HTTP 200: status ok or degraded); give up on the start timeout or
#      after NOX_RELEASE_FAIL_AFTER consecutive answers with status fail (HTTP 503)
#   3. point the proxy's upstream file at it, check the proxy's configuration, reload the proxy
#   4. verify through the proxy that NOX_RELEASE_VERIFY consecutive requests reach the new colour
#      (the proxy names the upstream that answered in the X-Nox-Upstream header)
#   5. with systemd, enable the new colour's unit and disable the old one's; drain: wait until
#      the old colour has no open connection left (NOX_RELEASE_DRAIN_S at most)
#   6. stop the old colour
# When a step before 6 fails, everything is put back as it was (upstream file, proxy, the new
# colour stopped) and the script exits 1 with the reason on stderr. Exit 2: bad usage or settings;
# 3: another release is running.
#
# Usage:
#   release.sh [release] [--to blue|green] [--install SPEC...]   the release (default command)
#   release.sh start COLOUR      start one colour and wait until it is healthy (no switch)
#   release.sh stop COLOUR       stop one colour
#   release.sh status            the live colour and the health of both
#
# Settings (environment; read first from /etc/default/nox-release when that file exists):
#   NOX_RELEASE_PROXY         caddy | nginx (caddy)
#   NOX_RELEASE_PROXY_URL     the URL clients use, e.g. https://nox.example.com (required)
#   NOX_RELEASE_CURL_OPTS     extra curl options for it, e.g. "--cacert /etc/nox/tls/ca.pem"
#   NOX_RELEASE_UPSTREAM_FILE the file naming the live colour (/etc/nox/upstream.caddy or .nginx)
#   NOX_RELEASE_CHECK         command that checks the proxy configuration
#                             (caddy validate --config /etc/caddy/Caddyfile; nginx -t -q)
#   NOX_RELEASE_RELOAD        command that reloads the proxy (systemctl reload caddy|nginx)
#   NOX_RELEASE_MANAGER       systemd (nox-api@COLOUR units) | process (runs
#                             $NOX_RELEASE_HOME/COLOUR/bin/nox-api serve itself, for tests and
#                             machines without systemd; its settings come from this environment)
#   NOX_RELEASE_HOME          where the colours' virtualenvs are (/opt/nox)
#   NOX_RELEASE_STATE_DIR     lock, previous upstream file; pid and log files in process mode
#                             (/run/nox-release)
#   NOX_BLUE_PORT, NOX_GREEN_PORT   the colours' ports (8081, 8082: /etc/default/nox-api-COLOUR)
#   NOX_RELEASE_TOKEN         a viewer token for /api/health/detailed, or
#   NOX_RELEASE_TOKEN_FILE    the file holding it (/etc/nox/release.token)
#   NOX_RELEASE_HEALTHY (3), NOX_RELEASE_VERIFY (5)   consecutive good answers needed
#   NOX_RELEASE_FAIL_AFTER (5)   consecutive "fail" answers of the new colour that end the wait
#   NOX_RELEASE_INTERVAL_S (1)                       pause between two health checks
#   NOX_RELEASE_START_TIMEOUT_S (60), NOX_RELEASE_VERIFY_TIMEOUT_S (30),
#   NOX_RELEASE_DRAIN_S (30), NOX_RELEASE_STOP_TIMEOUT_S (30)   limits of each step, seconds
set -euo pipefail

CONFIG=${NOX_RELEASE_CONFIG:-/etc/default/nox-release}
if [ -r "$CONFIG" ]; then
    # shellcheck source=/dev/null
    . "$CONFIG"
fi

PROXY=${NOX_RELEASE_PROXY:-caddy}
MANAGER=${NOX_RELEASE_MANAGER:-systemd}
NOX_HOME=${NOX_RELEASE_HOME:-/opt/nox}
STATE=${NOX_RELEASE_STATE_DIR:-/run/nox-release}
BLUE_PORT=${NOX_BLUE_PORT:-8081}
GREEN_PORT=${NOX_GREEN_PORT:-8082}
PROXY_URL=${NOX_RELEASE_PROXY_URL:-}
HEALTHY=${NOX_RELEASE_HEALTHY:-3}
VERIFY=${NOX_RELEASE_VERIFY:-5}
FAIL_AFTER=${NOX_RELEASE_FAIL_AFTER:-5}
INTERVAL=${NOX_RELEASE_INTERVAL_S:-1}
START_TIMEOUT=${NOX_RELEASE_START_TIMEOUT_S:-60}
VERIFY_TIMEOUT=${NOX_RELEASE_VERIFY_TIMEOUT_S:-30}
DRAIN=${NOX_RELEASE_DRAIN_S:-30}
STOP_TIMEOUT=${NOX_RELEASE_STOP_TIMEOUT_S:-30}
read -r -a CURL_OPTS <<<"${NOX_RELEASE_CURL_OPTS:-}"

case "$PROXY" in
    caddy)
        UPSTREAM=${NOX_RELEASE_UPSTREAM_FILE:-/etc/nox/upstream.caddy}
        CHECK=${NOX_RELEASE_CHECK:-caddy validate --config /etc/caddy/Caddyfile --adapter caddyfile}
        ;;
    nginx)
        UPSTREAM=${NOX_RELEASE_UPSTREAM_FILE:-/etc/nox/upstream.nginx}
        CHECK=${NOX_RELEASE_CHECK:-nginx -t -q}
        ;;
    *) echo "release: NOX_RELEASE_PROXY must be caddy or nginx, not '$PROXY'" >&2; exit 2 ;;
esac
RELOAD=${NOX_RELEASE_RELOAD:-systemctl reload $PROXY}
case "$MANAGER" in
    systemd | process) ;;
    *) echo "release: NOX_RELEASE_MANAGER must be systemd or process, not '$MANAGER'" >&2; exit 2 ;;
esac

log() { echo "release: $(date -u +%H:%M:%S) $*"; }
usage_error() { echo "release: $*" >&2; exit 2; }

port_of() {
    case "$1" in
        blue) echo "$BLUE_PORT" ;;
        green) echo "$GREEN_PORT" ;;
        *) usage_error "a colour is blue or green, not '$1'" ;;
    esac
}
other() { if [ "$1" = blue ]; then echo green; else echo blue; fi; }

# The upstream line the proxy reads for a port.
upstream_line() {
    if [ "$PROXY" = caddy ]; then echo "to 127.0.0.1:$1"; else echo "server 127.0.0.1:$1;"; fi
}

# The live colour, from the upstream file ("" when there is none yet).
live_colour() {
    [ -f "$UPSTREAM" ] || return 0
    local port
    port=$(grep -oE '127\.0\.0\.1:[0-9]+' "$UPSTREAM" | head -n 1 | cut -d: -f2)
    if [ "$port" = "$BLUE_PORT" ]; then
        echo blue
    elif [ "$port" = "$GREEN_PORT" ]; then
        echo green
    else
        echo "release: $UPSTREAM names port '${port}', neither blue's ($BLUE_PORT) nor" \
            "green's ($GREEN_PORT)" >&2
        exit 2
    fi
}

token() {
    if [ -n "${NOX_RELEASE_TOKEN:-}" ]; then
        printf '%s' "$NOX_RELEASE_TOKEN"
    else
        local file=${NOX_RELEASE_TOKEN_FILE:-/etc/nox/release.token}
        [ -r "$file" ] || usage_error "no token for /api/health/detailed: set NOX_RELEASE_TOKEN" \
            "or NOX_RELEASE_TOKEN_FILE ($file is not readable)"
        tr -d '[:space:]' <"$file"
    fi
}

# --- starting and stopping a colour --------------------------------------------------------------

pid_file() { echo "$STATE/nox-$1.pid"; }

running() {
    if [ "$MANAGER" = systemd ]; then
        systemctl is-active --quiet "nox-api@$1.service"
    else
        local pid
        pid=$(cat "$(pid_file "$1")" 2>/dev/null) || return 1
        kill -0 "$pid" 2>/dev/null
    fi
}

start_colour() {
    local colour=$1 port
    port=$(port_of "$colour")
    if [ "$MANAGER" = systemd ]; then
        systemctl start "nox-api@$colour.service"
        return
    fi
    local exe="$NOX_HOME/$colour/bin/nox-api"
    [ -x "$exe" ] || { echo "$exe is not an executable" >&2; return 1; }
    # A session of its own, so that it outlives this script; no inherited lock descriptor.
    NOX_HOST=127.0.0.1 NOX_PORT=$port setsid "$exe" serve \
        </dev/null >>"$STATE/nox-$colour.log" 2>&1 9>&- &
    echo $! >"$(pid_file "$colour")"
}

stop_colour() {
    local colour=$1
    if [ "$MANAGER" = systemd ]; then
        systemctl stop "nox-api@$colour.service"
        return
    fi
    local pid waited=0
    pid=$(cat "$(pid_file "$colour")" 2>/dev/null) || return 0
    if kill -TERM "$pid" 2>/dev/null; then
        while kill -0 "$pid" 2>/dev/null; do
            if [ "$waited" -ge $((STOP_TIMEOUT * 10)) ]; then
                log "$colour did not stop within ${STOP_TIMEOUT}s: killing it"
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.1
            waited=$((waited + 1))
        done
    fi
    rm -f "$(pid_file "$colour")"
}

# --- health --------------------------------------------------------------------------------------

# One check of a colour: prints "ok" or the reason it is not healthy.
health_of() {
    local port=$1 code body status rc=0
    code=$(curl -s -m 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/health") || rc=$?
    [ "$rc" -eq 0 ] || { echo "/health: no answer (curl exit code $rc)"; return; }
    [ "$code" = 200 ] || { echo "/health answered HTTP $code"; return; }
    body=$(curl -s -m 10 -w '\n%{http_code}' -H "Authorization: Bearer $(token)" \
        "http://127.0.0.1:$port/api/health/detailed") || rc=$?
    [ "$rc" -eq 0 ] || { echo "/api/health/detailed: no answer (curl exit code $rc)"; return; }
    code=${body##*$'\n'}
    body=${body%$'\n'*}
    status=$(printf '%s' "$body" | python3 -c \
        'import json,sys; print(json.load(sys.stdin).get("status","?"))' 2>/dev/null || echo '?')
    if [ "$code" = 200 ] && { [ "$status" = ok ] || [ "$status" = degraded ]; }; then
        echo ok
    else
        echo "/api/health/detailed answered HTTP $code, status $status: $(printf '%s' "$body" | head -c 600)"
    fi
}

# wait_healthy COLOUR: NOX_RELEASE_HEALTHY consecutive good answers within the start timeout;
# gives up early after NOX_RELEASE_FAIL_AFTER consecutive answers "fail" of the detailed health.
wait_healthy() {
    local colour=$1 port good=0 failed=0 reason="no answer yet" deadline
    port=$(port_of "$colour")
    deadline=$((SECONDS + START_TIMEOUT))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if ! running "$colour"; then
            REASON="$colour stopped during start-up$(start_log_tail "$colour")"
            return 1
        fi
        reason=$(health_of "$port")
        if [ "$reason" = ok ]; then
            good=$((good + 1)) failed=0
            [ "$good" -ge "$HEALTHY" ] && return 0
        else
            good=0
            case "$reason" in
                *", status fail:"*) failed=$((failed + 1)) ;;
                *) failed=0 ;;
            esac
            if [ "$failed" -ge "$FAIL_AFTER" ]; then
                REASON="$colour answered fail $failed times in a row: $reason"
                return 1
            fi
        fi
        sleep "$INTERVAL"
    done
    REASON="$colour was not healthy $HEALTHY times in a row within ${START_TIMEOUT}s; last: $reason"
    return 1
}

start_log_tail() {
    if [ "$MANAGER" = process ] && [ -s "$STATE/nox-$1.log" ]; then
        printf '; its last output:\n%s' "$(tail -n 5 "$STATE/nox-$1.log")"
    elif [ "$MANAGER" = systemd ]; then
        printf ' (journalctl -u nox-api@%s)' "$1"
    fi
}

# verify_proxy PORT: NOX_RELEASE_VERIFY consecutive answers through the proxy from that port.
verify_proxy() {
    local port=$1 good=0 headers upstream deadline last="no answer yet"
    deadline=$((SECONDS + VERIFY_TIMEOUT))
    while [ "$SECONDS" -lt "$deadline" ]; do
        if headers=$(curl -sS -m 5 -o /dev/null -D - "${CURL_OPTS[@]}" "$PROXY_URL/health" 2>&1); then
            upstream=$(printf '%s' "$headers" | tr -d '\r' \
                | sed -n 's/^[Xx]-[Nn]ox-[Uu]pstream: *//p' | tail -n 1)
            if [ "${upstream##*, }" = "127.0.0.1:$port" ]; then
                good=$((good + 1))
                [ "$good" -ge "$VERIFY" ] && return 0
                continue
            fi
            last="answered by '${upstream:-no X-Nox-Upstream header}'"
        else
            last=${headers##*curl: }
        fi
        good=0
        sleep 0.2
    done
    REASON="the proxy at $PROXY_URL did not send $VERIFY requests in a row to 127.0.0.1:$port"
    REASON+=" within ${VERIFY_TIMEOUT}s; last: $last"
    return 1
}

# drain PORT: wait until no TCP connection to that port is open, NOX_RELEASE_DRAIN_S at most.
drain() {
    local port=$1 deadline open
    deadline=$((SECONDS + DRAIN))
    while [ "$SECONDS" -lt "$deadline" ]; do
        open=$(ss -Htn state established "( sport = :$port )" 2>/dev/null | wc -l)
        [ "$open" -eq 0 ] && { log "drained: no connection left to port $port"; return; }
        sleep 0.5
    done
    log "drain: still $open connection(s) to port $port after ${DRAIN}s; stopping anyway" \
        "(the server finishes the requests under way before it exits)"
}

# --- the proxy -----------------------------------------------------------------------------------

switch_to() {
    local port=$1 tmp
    tmp=$(mktemp "$(dirname "$UPSTREAM")/.upstream.XXXXXX")
    upstream_line "$port" >"$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$UPSTREAM"
}

proxy_apply() {
    local out
    if ! out=$(bash -c "$CHECK" 2>&1); then
        REASON="the proxy configuration check failed ($CHECK): $(printf '%s' "$out" | tail -n 5)"
        return 1
    fi
    if ! out=$(bash -c "$RELOAD" 2>&1); then
        REASON="the proxy reload failed ($RELOAD): $(printf '%s' "$out" | tail -n 5)"
        return 1
    fi
}

# --- commands ------------------------------------------------------------------------------------

lock() {
    mkdir -p "$STATE"
    exec 9>"$STATE/release.lock"
    flock -n 9 || { echo "release: another release is running ($STATE/release.lock)" >&2; exit 3; }
}

install_colour() {
    local colour=$1
    shift
    log "building the virtualenv of $colour: $*"
    python3 -m venv --clear "$NOX_HOME/$colour"
    "$NOX_HOME/$colour/bin/python" -m pip install -q --disable-pip-version-check "$@"
}

fail() {
    echo "release: FAILED: $1" >&2
    exit 1
}

release() {
    local to="" specs=()
    while [ $# -gt 0 ]; do
        case "$1" in
            --to) to=${2:?--to needs a colour}; port_of "$to" >/dev/null; shift 2 ;;
            --install) shift; specs=("$@"); break ;;
            *) usage_error "unknown option $1" ;;
        esac
    done
    [ -n "$PROXY_URL" ] || usage_error "set NOX_RELEASE_PROXY_URL (the URL clients use)"
    token >/dev/null
    lock
    local live new old_port new_port
    live=$(live_colour)
    new=${to:-$(other "${live:-green}")}
    [ "$new" != "$live" ] || usage_error "$new is the live colour already"
    new_port=$(port_of "$new")
    log "live: ${live:-none}; releasing $new on port $new_port"

    if running "$new"; then
        log "$new is running (left from an earlier attempt): stopping it first"
        stop_colour "$new"
    fi
    if [ ${#specs[@]} -gt 0 ]; then
        install_colour "$new" "${specs[@]}" || fail "installing ${specs[*]} into $new failed"
    fi

    if ! start_colour "$new"; then
        stop_colour "$new" || true
        fail "$new could not be started$(start_log_tail "$new"); nothing was switched"
    fi
    if ! wait_healthy "$new"; then
        stop_colour "$new" || true
        fail "$REASON; $new stopped, nothing was switched"
    fi
    log "$new is healthy ($HEALTHY answers in a row)"

    mkdir -p "$STATE"
    local previous="$STATE/upstream.previous"
    if [ -f "$UPSTREAM" ]; then cp -p "$UPSTREAM" "$previous"; else rm -f "$previous"; fi
    switch_to "$new_port"
    if ! proxy_apply || ! verify_proxy "$new_port"; then
        local why=$REASON
        if [ -f "$previous" ]; then cp -p "$previous" "$UPSTREAM"; else rm -f "$UPSTREAM"; fi
        proxy_apply || log "WARNING: reloading the proxy with the old upstream failed too: $REASON"
        stop_colour "$new" || true
        fail "$why; the proxy is back on ${live:-its old upstream} and $new is stopped"
    fi
    log "the proxy sends traffic to $new ($VERIFY answers in a row)"
    if [ "$MANAGER" = systemd ]; then
        # after a reboot, the colour the proxy points at is the one that starts
        systemctl enable --quiet "nox-api@$new.service" \
            || log "WARNING: systemctl enable nox-api@$new failed"
        if [ -n "$live" ]; then
            systemctl disable --quiet "nox-api@$live.service" \
                || log "WARNING: systemctl disable nox-api@$live failed"
        fi
    fi

    if [ -n "$live" ]; then
        old_port=$(port_of "$live")
        drain "$old_port"
        stop_colour "$live" || fail "$new is live, but stopping $live failed"
        log "$live stopped"
    fi
    log "released: $new is live on port $new_port"
}

status() {
    local live colour port
    live=$(live_colour)
    echo "live: ${live:-none} (from $UPSTREAM)"
    for colour in blue green; do
        port=$(port_of "$colour")
        if running "$colour"; then
            echo "$colour: running on port $port, health: $(health_of "$port")"
        else
            echo "$colour: stopped"
        fi
    done
}

command=${1:-release}
case "$command" in
    release) shift || true; release "$@" ;;
    --to | --install) release "$@" ;;
    start)
        colour=${2:?start needs a colour}
        port_of "$colour" >/dev/null
        lock
        if running "$colour"; then log "$colour is running already"; exit 0; fi
        start_colour "$colour" || fail "$colour could not be started$(start_log_tail "$colour")"
        wait_healthy "$colour" || { stop_colour "$colour" || true; fail "$REASON"; }
        log "$colour is healthy on port $(port_of "$colour")"
        ;;
    stop)
        colour=${2:?stop needs a colour}
        port_of "$colour" >/dev/null
        lock
        stop_colour "$colour"
        log "$colour stopped"
        ;;
    status) status ;;
    -h | --help) sed -n '2,45p' "$0" | sed 's/^# \{0,1\}//' ;;
    *) usage_error "unknown command $command (see --help)" ;;
esac
