"""Where the test suite's wall time goes.

    python benchmarks/suite_time.py                 # runs the README's test command, then reports
    python benchmarks/suite_time.py --junit FILE    # reports on a finished run's JUnit XML

Prints the suite's wall time, the summed time of every test (setup, call and
teardown, as pytest's JUnit report counts them), their ratio (how well the
xdist workers overlap), the time of each xdist group (the `multiprocess` group
runs serially on one worker) and the slowest tests. A test that waits on a fixture
another worker builds (`built_once`) counts the wait as its own setup.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the README's test command (`.ci/run` runs exactly this), less the table pytest prints itself
TEST_COMMAND = [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "tests"]


def run_suite(junit: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run([*TEST_COMMAND, f"--junitxml={junit}", "-p", "no:cacheprovider"], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - start
    print(f"pytest exit code {result.returncode}")
    return wall


def read_junit(path: Path):
    """[(seconds, test id, xdist group or '')] for every test case of a JUnit XML report
    (under `--dist loadgroup` a grouped test's name ends in '@<group>')."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name, _, group = case.get("name").partition("@")
        cases.append((float(case.get("time", 0.0)), f"{case.get('classname', '').replace('.', '/')}.py::{name}", group))
    return cases


def report(cases, wall, top: int) -> None:
    total = sum(t for t, _, _ in cases)
    print(f"tests: {len(cases)}")
    if wall is not None:
        print(f"wall time: {wall / 60:.1f} min")
        print(f"summed test time: {total / 60:.1f} min ({total / wall:.2f}x the wall time)")
    else:
        print(f"summed test time: {total / 60:.1f} min")
    groups = {}
    for seconds, _, group in cases:
        if group:
            groups.setdefault(group, []).append(seconds)
    for group, times in sorted(groups.items(), key=lambda g: -sum(g[1])):
        print(f"group {group} (one worker, one test after another): {sum(times) / 60:.1f} min in {len(times)} tests")
    print(f"\nslowest {top}:")
    for seconds, name, group in sorted(cases, reverse=True)[:top]:
        print(f"{seconds:8.1f} s  {name}" + (f"  [{group}]" if group else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit", type=Path, help="a finished run's JUnit XML (else the suite is run)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    wall = None
    junit = args.junit
    if junit is None:
        junit = Path(tempfile.mkdtemp()) / "suite.xml"
        wall = run_suite(junit)
    report(read_junit(junit), wall, args.top)


if __name__ == "__main__":
    main()
