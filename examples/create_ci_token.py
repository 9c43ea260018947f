"""An admin script: create a runner token for a CI job, check it, print it for the job.

The secret is printed once, on stdout, to be stored as the CI job's secret variable
(``NOX_API_TOKEN``); it expires after ``--days`` days. Needs an admin token:

    NOX_URL=http://127.0.0.1:8080 NOX_API_TOKEN=<admin> python examples/create_ci_token.py \\
        --name ci-nightly --workspace ci --days 30
"""

from __future__ import annotations

import argparse
import sys

from noxsdk import NoxClient, NoxError, PermissionDenied, TokenRole


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="who uses the token, e.g. ci-nightly")
    parser.add_argument("--workspace", default="ci", help="the CI job's workspace")
    parser.add_argument("--days", type=int, default=30, help="days until the token expires")
    args = parser.parse_args()
    try:
        with NoxClient() as admin:  # NOX_URL and NOX_API_TOKEN (an admin's) from the environment
            made = admin.create_token(
                args.name, TokenRole.RUNNER, workspace=args.workspace, expires_in_days=args.days
            )
        with NoxClient(token=made.token) as ci:  # what the CI job will do with it
            me = ci.me()
            check = ci.run_sh("echo ready", timeout_s=10)
    except PermissionDenied:
        print("creating tokens needs an admin token in NOX_API_TOKEN", file=sys.stderr)
        return 3
    except NoxError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    print(
        f"token {made.id} for {me.name!r}: role {me.role.value}, workspace {me.workspace}, "
        f"expires {made.expires_at:%Y-%m-%d}; test run said {check.stdout.strip()!r}",
        file=sys.stderr,
    )
    print(made.token)  # the secret, shown this once: store it in the CI job's secrets
    return 0


if __name__ == "__main__":
    sys.exit(main())
