"""A longer run of the receiver fuzzer: minutes of hostile connections against a real receiver.

The test suite runs tests/property/test_receiver_fuzz.py with 150 examples; this
runs the same properties with many more (default 3000, a few minutes here) and
prints what pytest prints. Usage: python3 bench/fuzz_receiver.py [EXAMPLES]
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def main() -> int:
    examples = sys.argv[1] if len(sys.argv) > 1 else "3000"
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "FUZZ_EXAMPLES": examples}
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(root / "tests" / "property" / "test_receiver_fuzz.py")],
                           cwd=root, env=env)


if __name__ == "__main__":
    sys.exit(main())
