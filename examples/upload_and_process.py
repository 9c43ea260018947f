"""Upload a data file into the workspace, process it in a sandbox, download the result.

The workspace is the sandbox's ``/workspace`` (and its working folder), so code finds the
uploaded file by its path. Needs a runner token:

    NOX_URL=http://127.0.0.1:8080 NOX_API_TOKEN=... python examples/upload_and_process.py
"""

from __future__ import annotations

import csv
import random
import sys
import tempfile
from pathlib import Path

from noxsdk import NoxClient

ANALYSIS = """
import csv, json
with open("example/sales.csv", newline="") as f:
    rows = list(csv.DictReader(f))
totals = {}
for row in rows:
    totals[row["region"]] = totals.get(row["region"], 0) + int(row["amount"])
with open("example/totals.json", "w") as f:
    json.dump(totals, f, sort_keys=True)
print(f"{len(rows)} rows, {len(totals)} regions")
"""


def main() -> int:
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / "sales.csv"
        with local.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["region", "amount"])
            for _ in range(1000):
                writer.writerow([random.choice("NSEW"), random.randint(1, 100)])  # noqa: S311

        with NoxClient() as nox:  # NOX_URL and NOX_API_TOKEN from the environment
            info = nox.write_file("example/sales.csv", local)  # streamed from disk
            print(f"uploaded {info.path}: {info.size} bytes, sha256 {info.sha256}")
            run = nox.run_py(ANALYSIS, timeout_s=10)
            if run.status != "ok":
                print(f"the analysis failed ({run.status}):\n{run.stderr}", file=sys.stderr)
                return run.exit_code or 1
            print(run.stdout.strip())
            result = Path(folder) / "totals.json"
            nox.download("example/totals.json", result)  # written whole or not at all
            print(f"totals: {result.read_text()}")
            nox.delete_file("example", recursive=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
