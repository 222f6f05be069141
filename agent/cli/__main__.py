"""`python -m agent.cli`: the `thox` command without the console script."""

import sys

from agent.cli import main

sys.exit(main())
