"""``python -m miner`` is the ``miner`` command."""

import sys

from miner.cli import main

sys.exit(main())
