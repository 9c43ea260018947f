"""Run code in a Nox sandbox and handle every way it can go wrong.

A program that fails is still a result (look at ``status`` and ``exit_code``); a request that
fails raises one exception of ``noxsdk.errors``. Needs a runner token:

    NOX_URL=http://127.0.0.1:8080 NOX_API_TOKEN=... python examples/run_and_handle_errors.py
"""

from __future__ import annotations

import sys

from noxsdk import (
    AuthError,
    InvalidRequestError,
    NoxClient,
    NoxConnectionError,
    NoxError,
    QuotaExceededError,
    RateLimitedError,
)

PROGRAMS = {
    "works": "print(sum(range(10)))",
    "raises": "raise ValueError('bad input')",
    "loops forever": "while True:\n    pass",
}


def main() -> int:
    try:
        with NoxClient() as nox:  # NOX_URL and NOX_API_TOKEN from the environment
            for title, code in PROGRAMS.items():
                run = nox.run_py(code, timeout_s=2)
                if run.status == "ok":
                    print(f"{title}: ok, printed {run.stdout.strip()!r}")
                elif run.status == "timeout":
                    print(f"{title}: stopped after {run.duration_ms / 1000:.1f} s (timeout)")
                else:
                    last = run.stderr.strip().splitlines()[-1] if run.stderr.strip() else ""
                    print(f"{title}: {run.status}, exit code {run.exit_code}: {last}")
            try:  # a limit above the policy's maximum is refused, never lowered silently
                nox.run_py("print(1)", timeout_s=86_400)
            except InvalidRequestError as exc:
                print(f"refused: {exc.message}")
    except AuthError:
        print("the token is wrong: set NOX_API_TOKEN", file=sys.stderr)
        return 3
    except NoxConnectionError as exc:
        print(f"no server: {exc.message} (set NOX_URL)", file=sys.stderr)
        return 1
    except (RateLimitedError, QuotaExceededError) as exc:
        print(f"over a limit, try later: {exc.message}", file=sys.stderr)
        return 5
    except NoxError as exc:  # the base of every other error; str() has the request id
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
