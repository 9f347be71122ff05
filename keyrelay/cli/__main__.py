"""``python -m keyrelay.cli``: the ``keyrelay`` command."""

import sys

from . import main

sys.exit(main())
