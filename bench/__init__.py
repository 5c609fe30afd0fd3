"""Benchmarks of vfiocaps measured side by side with their floors (run with ``bench/run``).

The test rigs are imported as the tests import them, ``support`` from ``tests/``: one copy of
each module, so a rig's classes are the same types in a benchmark and in a test.
"""

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent.parent / "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)
