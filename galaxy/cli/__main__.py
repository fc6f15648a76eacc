"""`python -m galaxy.cli`: the `galaxy` command (how local workers are spawned)."""

import sys

from . import main

sys.exit(main())
