"""`make faults`: run every test of tests/test_faults.py (the slow fault-injection ones too) and print the catalogue
of docs/faults.md with pass/fail per row, then the totals: bad inputs tried, faults survived, data lost.

    .venv/bin/python tests/faults/report.py [extra pytest arguments]

A row passes when all of its test cases pass; an expected failure (`xfail`: a known gap, its fix listed in the
catalogue) is shown as such and counts as neither. Exit status 1 when any test case fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROW = re.compile(r"test_([DSPF]\d\d)_")


def catalogue(path: Path):
    """(id, input or fault, entry point, what happens) for each table row of docs/faults.md."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.fullmatch(r"[DSPF]\d\d", cells[0]):
            rows.append(cells[:4])
    return rows


def outcomes(junit: Path):
    """Row id -> list of outcomes ("passed", "failed", "xfailed", "skipped") of its test cases."""
    result = defaultdict(list)
    for case in ET.parse(junit).getroot().iter("testcase"):
        match = ROW.search(case.get("name", ""))
        if not match:
            continue
        kinds = {child.tag for child in case}
        skipped = case.find("skipped")
        if "failure" in kinds or "error" in kinds:
            outcome = "failed"
        elif skipped is not None:
            outcome = "xfailed" if skipped.get("type") == "pytest.xfail" else "skipped"
        else:
            outcome = "passed"
        result[match.group(1)].append(outcome)
    return result


def main(argv) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "faults.xml"
        env = dict(os.environ, CLHA_FAULTS="1")
        cmd = [sys.executable, "-m", "pytest", "-q", str(REPO / "tests" / "test_faults.py"), f"--junitxml={junit}",
               "-p", "no:cacheprovider", *argv]
        subprocess.run(cmd, cwd=REPO, env=env)
        if not junit.exists():
            print("make faults: pytest wrote no results", file=sys.stderr)
            return 1
        results = outcomes(junit)
    rows = catalogue(REPO / "docs" / "faults.md")
    print(f"\n{'row':4} {'result':14} {'input or fault':58} entry point")
    failed = 0
    for rid, what, entry, _ in rows:
        cases = results.get(rid, [])
        passed = cases.count("passed")
        if not cases:
            status = "NO TEST"
        elif "failed" in cases:
            status = f"FAIL {cases.count('failed')}/{len(cases)}"
        elif passed == 0 and "xfailed" in cases:
            status = f"known gap ({len(cases)})"
        elif passed == 0:
            status = "skipped"
        else:
            status = f"pass {passed}/{len(cases)}" + (f" +{cases.count('xfailed')} gap" if "xfailed" in cases else "")
        failed += cases.count("failed") + (not cases)
        print(f"{rid:4} {status:14} {what[:58]:58} {entry[:40]}")
    count = lambda prefixes, kind: sum(results[r].count(kind) for r in results if r[0] in prefixes)  # noqa: E731
    inputs = count("DSP", "passed")
    faults, faults_failed = count("F", "passed"), count("F", "failed")
    print(f"\nbad inputs tried: {inputs + count('DSP', 'failed')}, refused or handled as documented: {inputs}; "
          f"faults injected: {faults + faults_failed}, survived: {faults}; "
          f"known gaps (xfail): {count('DSPF', 'xfailed')}; skipped: {count('DSPF', 'skipped')}")
    print("data lost: " + ("0 (every fault test checks that only the steps since the last saved state are redone "
                           "and no partial file carries a final name)" if faults and not faults_failed
                           else "not established (fault tests failed or did not run)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
