#!/usr/bin/env bash
# Supply-chain checks of the virtualenv: known vulnerabilities (pip-audit) and a CycloneDX SBOM.
#
#   scripts/audit.sh [pip-audit options]     e.g. -s osv, --osv-url URL, --timeout 5
#
# Exit 0: no known vulnerability in any dependency, or the audit was SKIPPED because the
#         vulnerability service could not be reached or could not tell about any dependency
#         (a line starting with "audit: SKIPPED" says so: nothing was checked).
# Exit 1: known vulnerabilities (listed), or some dependencies could not be audited while others
#         could (strict: a partial audit is a failure), or pip-audit failed another way.
# Writes the SBOM to $BUILD_DIR/sbom.cdx.json (cyclonedx-py environment, validated; not with
# NOX_AUDIT_SBOM=0) and pip-audit's JSON report to $BUILD_DIR/pip-audit.json when it produced one.
# BUILD_DIR defaults to build/.
# The project's own editable packages (nox-api, noxsdk) are not on PyPI and are left out.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
BUILD_DIR=${BUILD_DIR:-build}
mkdir -p "$BUILD_DIR"
report="$BUILD_DIR/pip-audit.json"
errors="$BUILD_DIR/pip-audit.stderr"
rm -f "$report"

# --- SBOM (NOX_AUDIT_SBOM=0 leaves it out) ----------------------------------------------------------
if [ "${NOX_AUDIT_SBOM:-1}" != 0 ]; then
    "$VENV/bin/cyclonedx-py" environment --pyproject pyproject.toml --of JSON \
        -o "$BUILD_DIR/sbom.cdx.json" "$VENV/bin/python"
    echo "audit: SBOM written to $BUILD_DIR/sbom.cdx.json"
fi

# --- vulnerabilities -------------------------------------------------------------------------------
set +e
"$VENV/bin/pip-audit" --local --skip-editable --progress-spinner off --format json \
    --output "$report" "$@" 2>"$errors"
rc=$?
set -e

if [ ! -s "$report" ]; then
    # No report: pip-audit stopped before auditing. Only an unreachable service is a skip.
    if grep -qE 'ConnectionError|ConnectTimeout|Max retries exceeded|Could not connect|Temporary failure in name resolution|Name or service not known|Connection refused|ReadTimeout' "$errors"; then
        echo "audit: SKIPPED: could not reach the vulnerability service, NOTHING WAS AUDITED:"
        grep -m 1 -oE '(ConnectionError|ConnectTimeout|ReadTimeout)[^"]*' "$errors" | cut -c1-300 \
            | sed 's/^/audit:   /' || true
        exit 0
    fi
    echo "audit: FAILED: pip-audit exited with $rc without a report:" >&2
    tail -n 20 "$errors" >&2
    exit 1
fi

"$VENV/bin/python" - "$report" <<'EOF'
import json
import sys

report = json.load(open(sys.argv[1]))
deps = report.get("dependencies", [])
# --skip-editable lists the project's own editable packages as skipped: they are not on PyPI.
EDITABLE = "distribution marked as editable"
skipped = [d for d in deps if "skip_reason" in d and d["skip_reason"] != EDITABLE]
audited = [d for d in deps if "skip_reason" not in d]
vulnerable = [d for d in audited if d.get("vulns")]
for dep in vulnerable:
    for vuln in dep["vulns"]:
        fixes = ", ".join(vuln.get("fix_versions", [])) or "no fixed version"
        print(f"audit: VULNERABLE {dep['name']} {dep['version']}: {vuln['id']} (fixed in {fixes})")
if vulnerable:
    print(f"audit: FAILED: {len(vulnerable)} of {len(audited)} dependencies have known vulnerabilities")
    sys.exit(1)
if skipped and not audited:
    reason = skipped[0]["skip_reason"]
    print(
        f"audit: SKIPPED: the vulnerability service could not tell about any of the {len(skipped)}"
        f" dependencies, NOTHING WAS AUDITED (first: {skipped[0]['name']}: {reason})"
    )
    sys.exit(0)
if skipped:
    for dep in skipped:
        print(f"audit: NOT AUDITED {dep['name']}: {dep['skip_reason']}")
    print(f"audit: FAILED: {len(skipped)} dependencies could not be audited (strict)")
    sys.exit(1)
print(f"audit: no known vulnerabilities in {len(audited)} dependencies")
EOF
