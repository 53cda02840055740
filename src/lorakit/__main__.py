"""``python -m lorakit``: the same command line as ``lorakit``."""

import sys

from lorakit.cli import main

sys.exit(main())
