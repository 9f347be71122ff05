"""``python -m keyrelay.decisions``: print the answer catalogue of docs/answers.md."""

import sys

from .reasons import catalogue

sys.stdout.write(catalogue())
