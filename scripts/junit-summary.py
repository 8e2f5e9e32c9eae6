"""Add up junit XML files (pytest's --junitxml) into one closing line for CI logs.

Prints one line per test suite, then ``tests: N passed, N failed, N skipped``. Exits 1 when a
test failed or none passed, so a run that tested nothing cannot look green.
"""

import sys
import xml.etree.ElementTree as ET


def main(paths: list[str]) -> int:
    passed = failed = skipped = 0
    for path in paths:
        for suite in ET.parse(path).getroot().iter("testsuite"):
            tests = int(suite.get("tests", 0))
            skip = int(suite.get("skipped", 0))
            bad = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            print(f"{path}: {tests} tests, {bad} failed, {skip} skipped")
            passed += tests - bad - skip
            failed += bad
            skipped += skip
    print(f"tests: {passed} passed, {failed} failed, {skipped} skipped")
    if passed == 0:
        print("junit-summary: no test passed", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
