"""Reads a nox log on stdin and prints one line per session: outcome, time, tests passed / failed / skipped (summed
over the pytest runs of the session), then a total line. So a red run shows where at a glance."""

from __future__ import annotations

import re
import sys

START = re.compile(r"^nox > Running session (\S+)")
DONE = re.compile(r"^nox > \* (\S+): (\w+)(?:, took (.+))?$")
PYTEST = re.compile(r"^=*\s*(\d+ (?:passed|failed|skipped|error|errors|deselected|xfailed|xpassed)\b.*) in [\d.]+s")
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?)")


def main() -> int:
    counts: dict[str, dict[str, int]] = {}
    session = None
    outcome: dict[str, tuple[str, str]] = {}
    for line in sys.stdin:
        line = line.rstrip("\n")
        if m := START.match(line):
            session = m.group(1)
            counts.setdefault(session, {"passed": 0, "failed": 0, "skipped": 0, "errors": 0})
        elif m := DONE.match(line):
            outcome[m.group(1)] = (m.group(2), m.group(3) or "")
        elif session and (m := PYTEST.match(line)):
            for n, kind in COUNT.findall(m.group(1)):
                counts[session]["errors" if kind.startswith("error") else kind] += int(n)
    total = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    print("\n=== sessions ===")
    for name, c in counts.items():
        state, took = outcome.get(name, ("unfinished", ""))
        tests = f"{c['passed']} passed  {c['failed']} failed  {c['skipped']} skipped" + (
            f"  {c['errors']} errors" if c["errors"] else ""
        )
        print(f"  {name:<22} {state:<10} {took:<22} {tests}")
        for key in total:
            total[key] += c[key]
    print(f"total: {total['passed']} passed, {total['failed'] + total['errors']} failed, {total['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
