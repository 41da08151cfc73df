"""``python bench/chaos.py [options]``: the chaos load test, kept at its documented path.

The run itself is the package bench/chaos/ (``python -m bench.chaos`` is the same command);
its docstring says what the run does and what it checks.
"""

import sys
from pathlib import Path

if __name__ in ("__main__", "__mp_main__"):  # run as a script (or re-imported by a child)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.chaos.__main__ import main

    if __name__ == "__main__":
        sys.exit(main())
