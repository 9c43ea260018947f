#!/usr/bin/env bash
# The whole test gate: lint, format, types, then every test (fast and real-sandbox ones).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
"$VENV/bin/mypy"

set +e
"$VENV/bin/python" -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "test: pytest collected no tests: the suite is misconfigured, failing on purpose" >&2
    exit 1
fi
exit "$rc"
