"""``python -m stepflow_tl``: the ``stepflow-tl`` command line."""

import sys

from .cli import main

sys.exit(main())
