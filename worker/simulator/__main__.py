"""``python -m worker.simulator``: the same as ``echoq simulate``."""

import sys

from .replica import main

sys.exit(main())
