"""``python -m busted.cli``: the ``busted`` command."""

import sys

from busted.cli import main

sys.exit(main())
