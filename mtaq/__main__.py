"""``python -m mtaq``: the same command as the ``mtaq`` console script."""

import sys

from mtaq.cli import main

sys.exit(main())
