"""``python -m producer.cli``: the same as the ``echoq`` command."""

import sys

from .main import main

sys.exit(main())
