#!/usr/bin/env bash
# Encrypted backup of a Nox data folder, for cron: `nox-api backup create` under a timestamped
# name, then only the newest KEEP backups of that prefix are kept. See docs/backups.md.
#
# Usage: backup_nox.sh [KEEP]
#   KEEP                  backups of this prefix to keep (default: $NOX_BACKUP_KEEP, else 7)
# Environment:
#   NOX_DATA_DIR          the data folder (default: data, as for nox-api)
#   NOX_BACKUP_KEY        64 hex characters, or NOX_BACKUP_PASSPHRASE: the backup's key
#   NOX_BACKUP_PREFIX     name prefix of these backups (default: nightly)
#   NOX_API_BIN           the nox-api command (default: nox-api on PATH)
#   NOX_ENV_FILE          a file of VAR=value lines read first (mode 0600 or stricter): keeps
#                         the key off the crontab line, which other users see in `ps`
# Exit status: 0 when the backup was written and old ones pruned, else non-zero (cron mails it).
#
# Example crontab line (03:15 every night, keep two weeks), /etc/nox/backup.env holding
# NOX_DATA_DIR=/srv/nox/data and NOX_BACKUP_KEY=<64 hex> with mode 0600:
#   15 3 * * *  NOX_ENV_FILE=/etc/nox/backup.env /opt/nox/backup/backup_nox.sh 14
set -euo pipefail
export LC_ALL=C  # name order of the globbed backups below is byte order

if [[ -n "${NOX_ENV_FILE:-}" ]]; then
    mode=$(stat -c %a -- "${NOX_ENV_FILE}") || exit 2
    if (( 8#${mode} & 8#077 )); then
        echo "backup_nox.sh: ${NOX_ENV_FILE} is readable by others (mode ${mode}): chmod 600 it" >&2
        exit 2
    fi
    set -a
    # shellcheck disable=SC1090 # the file is the operator's, named at run time
    . "${NOX_ENV_FILE}"
    set +a
fi

keep="${1:-${NOX_BACKUP_KEEP:-7}}"
prefix="${NOX_BACKUP_PREFIX:-nightly}"
nox_api="${NOX_API_BIN:-nox-api}"
data_dir="${NOX_DATA_DIR:-data}"

if ! [[ "${keep}" =~ ^[1-9][0-9]*$ ]]; then
    echo "backup_nox.sh: KEEP must be a whole number >= 1 (got '${keep}')" >&2
    exit 2
fi
if ! [[ "${prefix}" =~ ^[A-Za-z0-9_][A-Za-z0-9._-]{0,40}$ ]]; then
    echo "backup_nox.sh: NOX_BACKUP_PREFIX must be 1-41 of A-Z a-z 0-9 . _ - (got '${prefix}')" >&2
    exit 2
fi

name="${prefix}-$(date -u +%Y%m%dT%H%M%SZ)"
"${nox_api}" backup create "${name}"

# Names hold a UTC timestamp, so name order is age order: drop all but the newest KEEP.
shopt -s nullglob
# The exact stamp pattern: a prefix "nightly" must not match another job's "nightly-2-...".
stamp='[0-9][0-9][0-9][0-9][0-9][0-9][0-9][0-9]T[0-9][0-9][0-9][0-9][0-9][0-9]Z'
# shellcheck disable=SC2206 # the glob is the point: a pattern, expanded here
backups=("${data_dir}/backups/${prefix}"-${stamp}.noxbak)
count="${#backups[@]}"
if ((count > keep)); then
    for old in "${backups[@]:0:count-keep}"; do
        rm -f -- "${old}" "${old}.sha256"
        echo "backup_nox.sh: removed ${old}"
    done
fi
