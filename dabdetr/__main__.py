"""``python -m dabdetr train|eval|predict|convert|bench`` (see :mod:`dabdetr.cli`)."""

import sys

from .cli import main

sys.exit(main())
