"""``python -m keyrelay.demo [RUN_DIR]``: see keyrelay.demo.cli."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
