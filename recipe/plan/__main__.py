"""``python -m recipe.plan``: see :mod:`recipe.plan.cli`."""

import sys

from recipe.plan.cli import main

sys.exit(main())
